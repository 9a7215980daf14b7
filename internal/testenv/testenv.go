// Package testenv tells tests where the local Synapse and PostgreSQL stack (scripts/stack.sh) is.
//
// The stack writes its addresses to an env file (KEY=VALUE lines, no quoting); the same keys can
// also be set in the process environment, which takes precedence over the file.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/unwedge/unwedge/internal/envfile"
)

// Environment variables read by Load.
const (
	VarHomeserverURL = "UNWEDGE_HS_URL"
	VarDomain        = "UNWEDGE_HS_DOMAIN"
	VarPostgresURI   = "UNWEDGE_PG_URI"
	VarSlotsDir      = "UNWEDGE_SLOTS_DIR"
	VarSynapseLog    = "UNWEDGE_SYNAPSE_LOG"

	// VarStackEnv overrides the path of the env file written by scripts/stack.sh.
	VarStackEnv = "UNWEDGE_STACK_ENV"
	// VarRequireStack makes Require fail instead of skip when the stack is missing ("1").
	VarRequireStack = "UNWEDGE_REQUIRE_STACK"
	// VarFaultTests allows tests to stop and restart the shared homeserver and Postgres ("1"):
	// only safe when nothing else uses the stack meanwhile (scripts/test.sh sets it for its
	// first phase, which runs those tests alone on the stack).
	VarFaultTests = "UNWEDGE_FAULT_TESTS"

	// DefaultEnvFile is where scripts/stack.sh writes the env file.
	DefaultEnvFile = "/var/cache/unwedge/stack/env"
)

// Env is the local stack as seen by tests.
type Env struct {
	HomeserverURL string
	Domain        string
	PostgresURI   string
	SlotsDir      string
	SynapseLog    string
}

// StackEnvPath returns the path of the stack's env file: $UNWEDGE_STACK_ENV or DefaultEnvFile.
func StackEnvPath() string {
	if path := os.Getenv(VarStackEnv); path != "" {
		return path
	}
	return DefaultEnvFile
}

// Load reads the UNWEDGE_* variables from the process environment, falling back to the env file
// at $UNWEDGE_STACK_ENV (default /var/cache/unwedge/stack/env) for the ones that are not set.
// It fails if the homeserver URL or the Postgres URI is missing.
func Load() (*Env, error) {
	path := StackEnvPath()
	fileVals, fileErr := envfile.Read(path)
	get := func(key string) string {
		if val := os.Getenv(key); val != "" {
			return val
		}
		return fileVals[key]
	}
	env := &Env{
		HomeserverURL: strings.TrimRight(get(VarHomeserverURL), "/"),
		Domain:        get(VarDomain),
		PostgresURI:   get(VarPostgresURI),
		SlotsDir:      get(VarSlotsDir),
		SynapseLog:    get(VarSynapseLog),
	}
	var missing []string
	if env.HomeserverURL == "" {
		missing = append(missing, VarHomeserverURL)
	}
	if env.PostgresURI == "" {
		missing = append(missing, VarPostgresURI)
	}
	if len(missing) > 0 {
		err := fmt.Errorf("%s not set in the environment or in %s", strings.Join(missing, " and "), path)
		if fileErr != nil && !errors.Is(fileErr, os.ErrNotExist) {
			err = fmt.Errorf("%w (reading the env file failed: %w)", err, fileErr)
		} else if fileErr != nil {
			err = fmt.Errorf("%w (the env file does not exist; start the stack with scripts/stack.sh up)", err)
		}
		return nil, err
	}
	if env.Domain == "" {
		if u, err := url.Parse(env.HomeserverURL); err == nil && u.Hostname() != "" {
			env.Domain = u.Hostname()
		}
	}
	return env, nil
}

// stackWait is how long Require waits for a configured but not yet answering stack.
const stackWait = 15 * time.Second

// Require returns the stack's Env, or skips the test with a clear message when the stack is not
// configured or not answering. With UNWEDGE_REQUIRE_STACK=1 it fails the test instead of
// skipping, so that CI can never skip silently.
func Require(t testing.TB) *Env {
	t.Helper()
	env, err := available()
	if err != nil {
		if os.Getenv(VarRequireStack) == "1" {
			t.Fatalf("%v", err)
		} else {
			t.Skipf("%v", err)
		}
		return nil
	}
	return env
}

// available returns the stack's Env when it is configured and answering.
func available() (*Env, error) {
	env, err := Load()
	if err != nil {
		return nil, fmt.Errorf("local Synapse/Postgres stack not available: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), stackWait)
	defer cancel()
	if err = env.Ping(ctx); err != nil {
		return nil, fmt.Errorf("local Synapse/Postgres stack configured in %s but not answering: %w", StackEnvPath(), err)
	}
	return env, nil
}

// RequireFaults is Require for tests that stop the homeserver or Postgres (StopHomeserver and
// friends): without UNWEDGE_FAULT_TESTS=1 they are skipped, since other tests running at the same
// time would fail.
func RequireFaults(t testing.TB) *Env {
	t.Helper()
	if os.Getenv(VarFaultTests) != "1" {
		t.Skipf("stops the shared homeserver and Postgres: set %s=1 when nothing else uses the stack (scripts/test.sh does)", VarFaultTests)
		return nil
	}
	return Require(t)
}

// Ping checks that the homeserver and Postgres answer, retrying until ctx is done.
func (e *Env) Ping(ctx context.Context) error {
	for {
		err := e.pingOnce(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (e *Env) pingOnce(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := e.pingHomeserver(ctx); err != nil {
		return err
	}
	return e.pingPostgres(ctx)
}

func (e *Env) pingHomeserver(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.HomeserverURL+"/_matrix/client/versions", nil)
	if err != nil {
		return fmt.Errorf("failed to build homeserver request: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("homeserver %s not answering: %w", e.HomeserverURL, err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("homeserver %s answered /versions with HTTP %d", e.HomeserverURL, resp.StatusCode)
	}
	return nil
}

func (e *Env) pingPostgres(ctx context.Context) error {
	db, err := sql.Open("postgres", e.PostgresURI)
	if err != nil {
		return fmt.Errorf("failed to open postgres: %w", err)
	}
	defer db.Close()
	if err = db.PingContext(ctx); err != nil {
		return fmt.Errorf("postgres not answering: %w", err)
	}
	return nil
}

// restartWait is how long Start* wait for a restarted service to answer.
const restartWait = 60 * time.Second

// StopHomeserver stops the stack's Synapse (scripts/stack.sh down synapse), to inject a fault.
func (e *Env) StopHomeserver(ctx context.Context) error {
	return runStack(ctx, "down", "synapse")
}

// StartHomeserver starts the stack's Synapse again and returns once it answers.
func (e *Env) StartHomeserver(ctx context.Context) error {
	if err := runStack(ctx, "up", "synapse"); err != nil {
		return err
	}
	return waitFor(ctx, e.pingHomeserver)
}

// StopPostgres stops the stack's Postgres cluster (scripts/stack.sh down postgres), to inject a fault.
func (e *Env) StopPostgres(ctx context.Context) error {
	return runStack(ctx, "down", "postgres")
}

// StartPostgres starts the stack's Postgres cluster again and returns once it accepts connections.
func (e *Env) StartPostgres(ctx context.Context) error {
	if err := runStack(ctx, "up", "postgres"); err != nil {
		return err
	}
	return waitFor(ctx, e.pingPostgres)
}

// waitFor calls ping until it succeeds, for at most restartWait.
func waitFor(ctx context.Context, ping func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, restartWait)
	defer cancel()
	for {
		attempt, cancelAttempt := context.WithTimeout(ctx, 3*time.Second)
		err := ping(attempt)
		cancelAttempt()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("still down after restart: %w", err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// runStack runs scripts/stack.sh with the given arguments (which needs root).
func runStack(ctx context.Context, args ...string) error {
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(root, "scripts", "stack.sh")}, args...)...)
	cmd.Dir = root
	// A daemon that kept the output pipe open would otherwise block Wait after the script exited.
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil && !(errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState.Success()) {
		return fmt.Errorf("stack.sh %s failed: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// moduleRoot is the directory of the module's go.mod, as the go command finds it from the test's
// working directory (its package's). Asking harness.ModuleRoot instead would make every test
// that imports testenv depend on the reference bridge, and so on the bridge package.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("failed to find the module root: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("failed to find the module root: not in a module")
	}
	return filepath.Dir(gomod), nil
}

// NewDatabase creates a fresh, uniquely named Postgres database for one test and returns its URI.
// The database is dropped (WITH (FORCE)) when the test and its cleanups registered earlier finish.
func (e *Env) NewDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name := UniqueName("unwedge_test")
	uri, err := e.CreateDatabase(ctx, name)
	if err != nil {
		t.Fatalf("failed to create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := e.DropDatabase(ctx, name); err != nil {
			t.Errorf("failed to drop test database %s: %v", name, err)
		}
	})
	return uri
}

// CreateDatabase creates an empty database next to the stack's and returns its URI.
func (e *Env) CreateDatabase(ctx context.Context, name string) (string, error) {
	u, err := url.Parse(e.PostgresURI)
	if err != nil {
		return "", fmt.Errorf("failed to parse %s: %w", VarPostgresURI, err)
	}
	db, err := sql.Open("postgres", e.PostgresURI)
	if err != nil {
		return "", fmt.Errorf("failed to open postgres: %w", err)
	}
	defer db.Close()
	if _, err = db.ExecContext(ctx, "CREATE DATABASE "+pq.QuoteIdentifier(name)); err != nil {
		return "", fmt.Errorf("failed to create database %s: %w", name, err)
	}
	u.Path = "/" + name
	return u.String(), nil
}

// DropDatabase drops a database, closing its connections.
func (e *Env) DropDatabase(ctx context.Context, name string) error {
	db, err := sql.Open("postgres", e.PostgresURI)
	if err != nil {
		return fmt.Errorf("failed to open postgres: %w", err)
	}
	defer db.Close()
	for attempt := 1; ; attempt++ {
		_, err = db.ExecContext(ctx, "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(name)+" WITH (FORCE)")
		// FORCE may not end an autovacuum worker that is busy in the new database (it belongs to
		// the superuser: 42501 insufficient_privilege); it is done within moments.
		var pqErr *pq.Error
		if err == nil || !errors.As(err, &pqErr) || pqErr.Code != "42501" || attempt == dropAttempts {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("failed to drop database %s: %w", name, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("failed to drop database %s: %w", name, err)
	}
	return nil
}

// dropAttempts bounds DropDatabase's attempts while an autovacuum worker holds the database.
const dropAttempts = 25

const nameAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

// UniqueName returns a short random lowercase name starting with the prefix, such as
// "alice_k3x9q2m7d1" (no "_" is added when the prefix already ends with one), usable as a Matrix
// localpart and as an unquoted Postgres identifier.
func UniqueName(prefix string) string {
	buf := make([]byte, 10)
	// crypto/rand.Read never returns an error.
	_, _ = rand.Read(buf)
	for i, b := range buf {
		buf[i] = nameAlphabet[int(b)%len(nameAlphabet)]
	}
	prefix = strings.ToLower(prefix)
	switch {
	case prefix == "":
		return "n" + string(buf)
	case strings.HasSuffix(prefix, "_"):
		return prefix + string(buf)
	default:
		return prefix + "_" + string(buf)
	}
}
