package testenv

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	_ "github.com/lib/pq" // the production database
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream" // SQLite
)

// SQLite and Postgres are the dialect names of the databases the project supports, as dbutil
// spells them.
const (
	SQLite   = "sqlite3-fk-wal"
	Postgres = "postgres"
)

// Databases returns the URI of a fresh, empty database of each supported dialect, by dialect: a
// SQLite file always, and a Postgres database of the stack when it runs. Without the stack the
// Postgres one is left out and the test says so in its log; with UNWEDGE_REQUIRE_STACK=1 the
// test fails instead. So tests that need only a database run everywhere, and on both databases
// where the stack is.
func Databases(t testing.TB) map[string]string {
	t.Helper()
	uris := map[string]string{SQLite: SQLiteURI(t)}
	env, err := available()
	switch {
	case err == nil:
		uris[Postgres] = env.NewDatabase(t)
	case os.Getenv(VarRequireStack) == "1":
		t.Fatalf("%v", err)
	default:
		t.Logf("SQLite only: %v", err)
	}
	return uris
}

// SQLiteURI returns the URI of a fresh SQLite database file, deleted when the test ends.
func SQLiteURI(t testing.TB) string {
	return "file:" + filepath.Join(t.TempDir(), "bridge.db") + "?_txlock=immediate"
}

// OpenDatabase connects to a database like a bridge process would: its own connection pool,
// closed when the test ends.
func OpenDatabase(t testing.TB, dialect, uri string) *dbutil.Database {
	t.Helper()
	db, err := dbutil.NewWithDialect(uri, dialect)
	if err != nil {
		t.Fatalf("open %s: %v", dialect, err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

// Upgrade upgrades a component's tables twice: the second time, as on a bridge restart, must do
// nothing.
func Upgrade(t testing.TB, db interface{ Upgrade(context.Context) error }) {
	t.Helper()
	for range 2 {
		if err := db.Upgrade(context.Background()); err != nil {
			t.Fatalf("upgrade: %v", err)
		}
	}
}
