package bench

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

// The bench's devices and homeserver are the crypto test kit's, kept quiet: what they would log
// is no measurement.

// newHomeserver is the kit's in-memory homeserver, with quiet devices.
func newHomeserver(t testing.TB) *cryptotest.Homeserver {
	hs := cryptotest.NewHomeserver(t)
	hs.Log = zerolog.Nop()
	return hs
}

// newMemoryDevice is a simulated user device: an OlmMachine on an in-memory store.
func newMemoryDevice(hs *cryptotest.Homeserver, userID id.UserID, deviceID id.DeviceID) *cryptotest.Device {
	return hs.NewDevice(userID, deviceID, cryptotest.Store{})
}

// newBridgeDevice is the bridge's device: an OlmMachine on mautrix-go's SQL store in db,
// wrapped by unwedge's store unless stock.
func newBridgeDevice(t testing.TB, hs *cryptotest.Homeserver, db *dbutil.Database, stock bool) *cryptotest.Device {
	return newBridgeDeviceAs(t, hs, db, bridgeUser, bridgeDevice, stock)
}

// The bridge's bot and its device.
const (
	bridgeUser   id.UserID   = "@bridgebot:example.org"
	bridgeDevice id.DeviceID = "BRIDGE"
)

// newBridgeDeviceAs is newBridgeDevice with other IDs, for two bridges in one database: the
// store's account is named after the device.
func newBridgeDeviceAs(t testing.TB, hs *cryptotest.Homeserver, db *dbutil.Database, userID id.UserID, deviceID id.DeviceID, stock bool) *cryptotest.Device {
	return hs.NewDevice(userID, deviceID, bridgeStore(t, db, deviceID, stock))
}

// bridgeStore is the bridge device's store in db: mautrix-go's SQL store, wrapped by unwedge's
// unless stock.
func bridgeStore(t testing.TB, db *dbutil.Database, deviceID id.DeviceID, stock bool) cryptotest.Store {
	store := cryptotest.Store{DB: db}
	if !stock {
		// unwedge's store as the bridge has it by default: with the Olm history on.
		udb := cryptotest.UnwedgeDB(t, db)
		store.Shared = udb.Shared
		store.History = unwedge.NewHistory(udb.History, string(deviceID), []byte(cryptotest.PickleKey), unwedge.DefaultConfig().OlmHistory)
	}
	return store
}

// unwedgeBridge puts an Unwedger healing everyone's devices on the bridge's machine, with its
// tables in db.
func unwedgeBridge(t testing.TB, bridge *cryptotest.Device, db *dbutil.Database, owner string) (*unwedge.Unwedger, *database.UnwedgeDB) {
	udb := cryptotest.UnwedgeDB(t, db)
	cfg := unwedge.DefaultConfig()
	cfg.Scope = unwedge.ScopeEveryone
	return bridge.Unwedge(cryptotest.Unwedging{Config: cfg, Ledger: udb.Ledger, Owner: owner}), udb
}

// maxConns bounds the connections to Postgres of the bridges of one measurement.
const maxConns = 20

// openDB opens the Postgres database at uri.
func openDB(t testing.TB, uri string) *dbutil.Database {
	db := testenv.OpenDatabase(t, testenv.Postgres, uri)
	sizePool(db)
	return db
}

// sizePool lets a Postgres database of the bench keep maxConns connections open and as many idle:
// database/sql keeps 2 idle by default, so a storm of heals that uses up to maxConns at once
// closed and opened connections all the time, each with lib/pq's SCRAM handshake (15 % of the
// CPU of a 10,000-device storm). SQLite's pool is left as it is.
func sizePool(db *dbutil.Database) {
	if db.Dialect == dbutil.Postgres {
		db.RawDB.SetMaxOpenConns(maxConns)
		db.RawDB.SetMaxIdleConns(maxConns)
	}
}

// requireStackForFigures requires the stack when the test writes figures for cmd/bench
// (UNWEDGE_BENCH_OUT): they are Postgres's. Without figures to write, a test that needs only a
// database checks its counts on SQLite too.
func requireStackForFigures(t testing.TB) {
	if os.Getenv(varBenchOut) != "" {
		testenv.Require(t)
	}
}

// varBenchOut names the directory the tests write their figures to, for cmd/bench.
const varBenchOut = "UNWEDGE_BENCH_OUT"

// benchOut writes a figure file for cmd/bench when UNWEDGE_BENCH_OUT names a directory.
func benchOut(t testing.TB, name string, v any) {
	dir := os.Getenv(varBenchOut)
	if dir == "" {
		return
	}
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err = os.WriteFile(filepath.Join(dir, name+".json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// envInts reads a comma-separated list of sizes from an environment variable, or def.
func envInts(t testing.TB, name string, def ...int) []int {
	value := os.Getenv(name)
	if value == "" {
		return def
	}
	var out []int
	for _, part := range strings.Split(value, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(part))
		if err != nil || n < 1 {
			t.Fatalf("%s: bad size %q", name, part)
		}
		out = append(out, n)
	}
	return out
}
