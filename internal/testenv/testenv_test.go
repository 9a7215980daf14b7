package testenv

import (
	"context"
	"database/sql"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

var allVars = []string{VarHomeserverURL, VarDomain, VarPostgresURI, VarSlotsDir, VarSynapseLog}

func TestLoad(t *testing.T) {
	const fullFile = `# written by scripts/stack.sh
UNWEDGE_HS_URL=http://127.0.0.1:8008
UNWEDGE_HS_DOMAIN=localhost

UNWEDGE_PG_URI=postgres://u:p@127.0.0.1:5432/db?sslmode=disable
UNWEDGE_SLOTS_DIR=/tmp/slots
UNWEDGE_SYNAPSE_LOG=/tmp/synapse.log
`
	cases := []struct {
		name    string
		file    string // "" = no file
		env     map[string]string
		want    *Env
		wantErr string
	}{
		{
			name: "file only",
			file: fullFile,
			want: &Env{
				HomeserverURL: "http://127.0.0.1:8008", Domain: "localhost",
				PostgresURI: "postgres://u:p@127.0.0.1:5432/db?sslmode=disable",
				SlotsDir:    "/tmp/slots", SynapseLog: "/tmp/synapse.log",
			},
		},
		{
			name: "environment overrides file",
			file: fullFile,
			env:  map[string]string{VarHomeserverURL: "http://hs.test:8448/", VarDomain: "hs.test"},
			want: &Env{
				HomeserverURL: "http://hs.test:8448", Domain: "hs.test",
				PostgresURI: "postgres://u:p@127.0.0.1:5432/db?sslmode=disable",
				SlotsDir:    "/tmp/slots", SynapseLog: "/tmp/synapse.log",
			},
		},
		{
			name: "environment only, domain from URL",
			env:  map[string]string{VarHomeserverURL: "http://localhost:8008", VarPostgresURI: "postgres://x"},
			want: &Env{HomeserverURL: "http://localhost:8008", Domain: "localhost", PostgresURI: "postgres://x"},
		},
		{
			name:    "no file, no environment",
			wantErr: "does not exist",
		},
		{
			name:    "postgres missing",
			file:    "UNWEDGE_HS_URL=http://127.0.0.1:8008\n",
			wantErr: VarPostgresURI,
		},
		{
			name:    "malformed line",
			file:    "UNWEDGE_HS_URL\n",
			wantErr: "expected KEY=VALUE",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "env")
			if tc.file != "" {
				if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			t.Setenv(VarStackEnv, path)
			for _, key := range allVars {
				t.Setenv(key, tc.env[key])
			}
			got, err := Load()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Load() error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Load() error = %v", err)
			}
			if *got != *tc.want {
				t.Errorf("Load() = %+v, want %+v", *got, *tc.want)
			}
		})
	}
}

func TestUniqueName(t *testing.T) {
	cases := []struct {
		prefix string
		want   string
	}{
		{"alice", `^alice_[a-z0-9]{10}$`},
		{"Acct", `^acct_[a-z0-9]{10}$`},
		{"test_", `^test_[a-z0-9]{10}$`},
		{"", `^n[a-z0-9]{10}$`},
	}
	for _, tc := range cases {
		t.Run(tc.prefix, func(t *testing.T) {
			re := regexp.MustCompile(tc.want)
			seen := make(map[string]bool)
			for range 100 {
				name := UniqueName(tc.prefix)
				if !re.MatchString(name) {
					t.Fatalf("UniqueName(%q) = %q, want %s", tc.prefix, name, tc.want)
				} else if seen[name] {
					t.Fatalf("UniqueName(%q) repeated %q", tc.prefix, name)
				}
				seen[name] = true
			}
		})
	}
}

func TestNewDatabase(t *testing.T) {
	env := Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var name string
	t.Run("use", func(t *testing.T) {
		// Closed only after the database was dropped: the drop must force the open connection out.
		var db *sql.DB
		t.Cleanup(func() {
			if db != nil {
				_ = db.Close()
			}
		})
		uri := env.NewDatabase(t)
		var err error
		if db, err = sql.Open("postgres", uri); err != nil {
			t.Fatal(err)
		}
		if err = db.QueryRowContext(ctx, "SELECT current_database()").Scan(&name); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(name, "unwedge_test_") {
			t.Errorf("database name = %q, want unwedge_test_ prefix", name)
		}
		if _, err = db.ExecContext(ctx, "CREATE TABLE t (x INT); INSERT INTO t VALUES (1)"); err != nil {
			t.Fatal(err)
		}
	})
	admin, err := sql.Open("postgres", env.PostgresURI)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	var exists bool
	if err = admin.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Errorf("database %s still exists after its test", name)
	}
}

func TestStackControl(t *testing.T) {
	env := RequireFaults(t)
	// Opened before the outage: the query after the restart also checks that the pool reconnects.
	db, err := sql.Open("postgres", env.PostgresURI)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	cases := []struct {
		name        string
		stop, start func(context.Context) error
		probe       func(context.Context) error
	}{
		{
			name: "postgres", stop: env.StopPostgres, start: env.StartPostgres,
			probe: func(ctx context.Context) error {
				var one int
				return db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
			},
		},
		{
			name: "homeserver", stop: env.StopHomeserver, start: env.StartHomeserver,
			probe: func(ctx context.Context) error {
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, env.HomeserverURL+"/_matrix/client/versions", nil)
				if err != nil {
					return err
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					return err
				}
				_ = resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					return fmt.Errorf("HTTP %d", resp.StatusCode)
				}
				return nil
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			probe := func() error {
				ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				return tc.probe(ctx)
			}
			if err := probe(); err != nil {
				t.Fatalf("%s not answering before the stop: %v", tc.name, err)
			}
			// Whatever happens below, the stack is up again for the tests that follow.
			restarted := false
			t.Cleanup(func() {
				if restarted {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				if err := tc.start(ctx); err != nil {
					t.Errorf("failed to restart %s: %v", tc.name, err)
				}
			})

			begin := time.Now()
			if err := tc.stop(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("stopping %s took %s", tc.name, time.Since(begin).Round(time.Millisecond))
			if err := probe(); err == nil {
				t.Errorf("%s still answers after the stop", tc.name)
			} else {
				t.Logf("while %s is down: %v", tc.name, err)
			}

			begin = time.Now()
			if err := tc.start(ctx); err != nil {
				t.Fatal(err)
			}
			restarted = true
			t.Logf("starting %s took %s", tc.name, time.Since(begin).Round(time.Millisecond))
			if err := probe(); err != nil {
				t.Errorf("%s not answering after the restart: %v", tc.name, err)
			}
		})
	}
}

func TestRequire(t *testing.T) {
	t.Setenv(VarStackEnv, filepath.Join(t.TempDir(), "missing"))
	for _, key := range allVars {
		t.Setenv(key, "")
	}
	cases := []struct {
		name        string
		require     string
		wantSkipped bool
		wantFailed  bool
	}{
		{"skips by default", "", true, false},
		{"fails when required", "1", false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(VarRequireStack, tc.require)
			rec := &recordingTB{TB: t}
			done := make(chan struct{})
			go func() {
				// Skipf and Fatalf end the goroutine with runtime.Goexit, as in a real test.
				defer close(done)
				Require(rec)
			}()
			<-done
			if rec.skipped != tc.wantSkipped || rec.failed != tc.wantFailed {
				t.Errorf("skipped=%t failed=%t, want skipped=%t failed=%t (message: %s)",
					rec.skipped, rec.failed, tc.wantSkipped, tc.wantFailed, rec.msg)
			}
			if !strings.Contains(rec.msg, "stack not available") {
				t.Errorf("message %q does not explain what is missing", rec.msg)
			}
		})
	}
}

// recordingTB records Skipf and Fatalf instead of acting on the real test.
type recordingTB struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (r *recordingTB) Helper() {}

func (r *recordingTB) Skipf(format string, args ...any) {
	r.skipped, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (r *recordingTB) Fatalf(format string, args ...any) {
	r.failed, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// TestModuleRoot: the stack's script is found from a package's directory, where go test runs.
func TestModuleRoot(t *testing.T) {
	root, err := moduleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err = os.Stat(filepath.Join(root, "scripts", "stack.sh")); err != nil {
		t.Errorf("module root %s: %v", root, err)
	}
}
