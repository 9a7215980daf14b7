// Package cryptotest is the test kit of the crypto tests, in the spirit of matrix-rust-sdk's
// machine/test_helpers.rs: mautrix-go's in-memory homeserver, counting what clients ask of it and
// failing as a real one cannot on demand; devices with real OlmMachines on a memory or SQL store,
// wrapped in unwedge's store or stock, that restart on the same store and pass to-device events
// between them; the database they keep their state in, unwedge's tables, and an Unwedger. The
// tests of crypto/unwedge, bench and bridge share it.
//
// Tests that need only a database run everywhere: Database gives Postgres, the production
// database, when the local stack runs, and SQLite otherwise.
package cryptotest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/testenv"
)

func init() {
	// As bridgev2 sets it for the bridge: mautrix-go's SQL store queries Postgres with arrays.
	crypto.PostgresArrayWrapper = pq.Array
}

// Database opens a fresh database for one test: Postgres, the production database, when the
// local stack runs, and SQLite otherwise; the test's log says which. With UNWEDGE_REQUIRE_STACK=1
// a missing stack fails the test instead.
func Database(t testing.TB) *dbutil.Database {
	t.Helper()
	uris := testenv.Databases(t)
	dialect := testenv.Postgres
	if _, ok := uris[dialect]; !ok {
		dialect = testenv.SQLite
	}
	t.Logf("Database: %s", dialect)
	return testenv.OpenDatabase(t, dialect, uris[dialect])
}

// Databases opens a fresh database of each dialect there is, by dialect: SQLite always, and
// Postgres when the local stack runs (testenv.Databases). For tests whose SQL differs between
// the two.
func Databases(t testing.TB) map[string]*dbutil.Database {
	t.Helper()
	dbs := map[string]*dbutil.Database{}
	for dialect, uri := range testenv.Databases(t) {
		dbs[dialect] = testenv.OpenDatabase(t, dialect, uri)
	}
	return dbs
}

// SQLite opens a fresh SQLite database, for tests that want no more (fuzz targets: many inputs).
func SQLite(t testing.TB) *dbutil.Database {
	t.Helper()
	return testenv.OpenDatabase(t, testenv.SQLite, testenv.SQLiteURI(t))
}

// UnwedgeDB makes unwedge's tables in db, for a bridge named "test", beside mautrix-go's crypto
// tables (CryptoTables) as in the bridge's database.
func UnwedgeDB(t testing.TB, db *dbutil.Database) *database.UnwedgeDB {
	t.Helper()
	CryptoTables(t, db)
	udb := database.NewUnwedgeDB("test", db, dbutil.ZeroLogger(zerolog.Nop()))
	testenv.Upgrade(t, udb)
	return udb
}

// CryptoTables makes the tables of mautrix-go's SQL crypto store in db, which the bridge's
// database always has beside unwedge's: the ledger's prune reads and prunes them too.
func CryptoTables(t testing.TB, db *dbutil.Database) {
	t.Helper()
	testenv.Upgrade(t, crypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(zerolog.Nop()), "", "", nil).DB)
}

// Config is unwedge's default configuration with retries that take milliseconds, not minutes.
func Config() unwedge.Config {
	cfg := unwedge.DefaultConfig()
	cfg.MinBackoff, cfg.MaxBackoff = 20*time.Millisecond, 100*time.Millisecond
	return cfg
}

// Everyone is the scope of every user.
type Everyone struct{}

func (Everyone) InScope(context.Context, id.UserID) (bool, error) { return true, nil }

// Logger writes warnings to the test's log. A fuzz target may not log through its *testing.F
// while it fuzzes, so under fuzzing it is quiet.
func Logger(t testing.TB) zerolog.Logger {
	if _, fuzzing := t.(*testing.F); fuzzing {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
}

// SessionPickle is a real Olm session, pickled with PickleKey as the devices' SQL stores pickle
// theirs: rows of crypto_olm_session that load, made without a homeserver (the startup check's
// tests and the bench fill the table with it under distinct session IDs and sender keys).
func SessionPickle(t testing.TB) []byte {
	t.Helper()
	outbound, _, _ := OlmPair(t)
	pickled, err := outbound.Pickle([]byte(PickleKey))
	if err != nil {
		t.Fatal(err)
	}
	return pickled
}

// OlmPair makes two Olm accounts and a session between them, without a homeserver: outbound,
// opened by the first account with the second's one-time key, and inbound, the second's, made
// from outbound's first message, which it decrypted (that message is first).
func OlmPair(t testing.TB) (outbound, inbound olm.Session, first []byte) {
	t.Helper()
	ours, err := olm.NewAccount()
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := olm.NewAccount()
	if err != nil {
		t.Fatal(err)
	}
	if err = theirs.GenOneTimeKeys(1); err != nil {
		t.Fatal(err)
	}
	keys, err := theirs.OneTimeKeys()
	if err != nil || len(keys) != 1 {
		t.Fatalf("one-time keys: %v, %v", keys, err)
	}
	_, identity, err := theirs.IdentityKeys()
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range keys {
		if outbound, err = ours.NewOutboundSession(identity, key); err != nil {
			t.Fatal(err)
		}
	}
	first = []byte("room key")
	msgType, msg, err := outbound.Encrypt(first)
	if err != nil {
		t.Fatal(err)
	}
	if inbound, err = theirs.NewInboundSession(string(msg)); err != nil {
		t.Fatal(err)
	}
	if _, err = inbound.Decrypt(string(msg), msgType); err != nil {
		t.Fatal(err)
	}
	return outbound, inbound, first
}

// SignedDeviceKeys is what a client uploads as a device's keys: identityKey (the account's own,
// or another's to forge one) and the account's Ed25519 signing key, signed with the latter.
func SignedDeviceKeys(account *crypto.OlmAccount, device id.Device, identityKey id.IdentityKey) (*mautrix.DeviceKeys, error) {
	keys := &mautrix.DeviceKeys{
		UserID:     device.UserID,
		DeviceID:   device.DeviceID,
		Algorithms: []id.Algorithm{id.AlgorithmMegolmV1, id.AlgorithmOlmV1},
		Keys: map[id.DeviceKeyID]string{
			id.NewDeviceKeyID(id.KeyAlgorithmCurve25519, device.DeviceID): string(identityKey),
			id.NewDeviceKeyID(id.KeyAlgorithmEd25519, device.DeviceID):    string(account.SigningKey()),
		},
	}
	signature, err := account.SignJSON(keys)
	if err != nil {
		return nil, fmt.Errorf("failed to sign device keys: %w", err)
	}
	keys.Signatures = signatures.NewSingleSignature(device.UserID, id.KeyAlgorithmEd25519, device.DeviceID.String(), signature)
	return keys, nil
}
