// Package testenv tells tests where the local stack (scripts/stack.sh) runs.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/unwedge/unwedge/internal/harness"
)

// DefaultEnvFile is where scripts/stack.sh writes the stack's settings.
const DefaultEnvFile = "/var/cache/unwedge/stack/env"

// Env is the local stack.
type Env struct {
	HomeserverURL string
	Domain        string
	PostgresURI   string
	SlotsDir      string
	SynapseLog    string
}

// Load reads the UNWEDGE_* variables from the environment, falling back to the env file at
// $UNWEDGE_STACK_ENV (default DefaultEnvFile).
func Load() (*Env, error) {
	get := func(key string) string { return os.Getenv(key) }
	if os.Getenv("UNWEDGE_HS_URL") == "" {
		path := os.Getenv("UNWEDGE_STACK_ENV")
		if path == "" {
			path = DefaultEnvFile
		}
		vals, err := harness.ReadEnvFile(path)
		if err != nil {
			return nil, fmt.Errorf("failed to read stack env (run scripts/stack.sh up): %w", err)
		}
		get = func(key string) string { return vals[key] }
	}
	env := &Env{
		HomeserverURL: get("UNWEDGE_HS_URL"),
		Domain:        get("UNWEDGE_HS_DOMAIN"),
		PostgresURI:   get("UNWEDGE_PG_URI"),
		SlotsDir:      get("UNWEDGE_SLOTS_DIR"),
		SynapseLog:    get("UNWEDGE_SYNAPSE_LOG"),
	}
	if env.HomeserverURL == "" || env.PostgresURI == "" || env.Domain == "" {
		return nil, errors.New("stack env lacks UNWEDGE_HS_URL, UNWEDGE_HS_DOMAIN or UNWEDGE_PG_URI")
	}
	return env, nil
}

// Require returns the stack or skips the test; with UNWEDGE_REQUIRE_STACK=1 (the README's test
// command sets it) a missing stack fails the test instead, so CI never skips silently.
func Require(t testing.TB) *Env {
	t.Helper()
	env, err := Load()
	if err == nil {
		return env
	}
	if os.Getenv("UNWEDGE_REQUIRE_STACK") == "1" {
		t.Fatalf("local stack required: %v", err)
	}
	t.Skipf("local stack not available (run scripts/test.sh): %v", err)
	return nil
}

// NewDatabase creates an empty Postgres database for one test, dropped when the test ends.
func (e *Env) NewDatabase(t testing.TB) string {
	t.Helper()
	name := UniqueName("test_")
	admin, err := sql.Open("postgres", e.PostgresURI)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err = admin.ExecContext(ctx, "CREATE DATABASE "+pq.QuoteIdentifier(name)); err != nil {
		_ = admin.Close()
		t.Fatalf("failed to create test database: %v", err)
	}
	t.Cleanup(func() {
		defer admin.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.ExecContext(ctx, "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(name)+" WITH (FORCE)"); err != nil {
			t.Errorf("failed to drop test database %s: %v", name, err)
		}
	})
	u, err := url.Parse(e.PostgresURI)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// UniqueName returns prefix followed by random lowercase hex, for users, accounts and databases.
func UniqueName(prefix string) string {
	buf := make([]byte, 5)
	_, _ = rand.Read(buf)
	return prefix + hex.EncodeToString(buf)
}
