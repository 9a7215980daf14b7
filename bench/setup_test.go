package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/mockserver"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
)

func init() {
	crypto.PostgresArrayWrapper = pq.Array
}

// homeserver is mautrix-go's in-memory homeserver, serialized (its maps are not synchronized),
// counting what the bridge asks of it.
type homeserver struct {
	ms   *mockserver.MockServer
	srv  *httptest.Server
	lock sync.Mutex

	claimRequests atomic.Int64
	claimedKeys   atomic.Int64
	toDevice      sync.Map // event type -> *atomic.Int64 of messages
}

func newHomeserver(t testing.TB) *homeserver {
	hs := &homeserver{ms: mockserver.Create(t)}
	hs.srv = httptest.NewServer(http.HandlerFunc(hs.serve))
	t.Cleanup(hs.srv.Close)
	return hs
}

func (hs *homeserver) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/_matrix/client/v3/keys/claim":
		var req mautrix.ReqClaimKeys
		body, _ := readBody(r)
		if json.Unmarshal(body, &req) == nil {
			hs.claimRequests.Add(1)
			for _, devices := range req.OneTimeKeys {
				hs.claimedKeys.Add(int64(len(devices)))
			}
		}
	case strings.HasPrefix(r.URL.Path, "/_matrix/client/v3/sendToDevice/"):
		var req mautrix.ReqSendToDevice
		body, _ := readBody(r)
		if json.Unmarshal(body, &req) == nil {
			n := 0
			for _, devices := range req.Messages {
				n += len(devices)
			}
			evtType := strings.Split(strings.TrimPrefix(r.URL.Path, "/_matrix/client/v3/sendToDevice/"), "/")[0]
			counter, _ := hs.toDevice.LoadOrStore(evtType, &atomic.Int64{})
			counter.(*atomic.Int64).Add(int64(n))
		}
	}
	hs.lock.Lock()
	defer hs.lock.Unlock()
	hs.ms.Router.ServeHTTP(w, r)
}

func (hs *homeserver) toDeviceCount(evtType string) int64 {
	if counter, ok := hs.toDevice.Load(evtType); ok {
		return counter.(*atomic.Int64).Load()
	}
	return 0
}

// inbox takes the to-device events waiting for a device.
func (hs *homeserver) inbox(userID id.UserID, deviceID id.DeviceID) []*event.Event {
	hs.lock.Lock()
	defer hs.lock.Unlock()
	queued := hs.ms.DeviceInbox[userID][deviceID]
	if queued == nil {
		return nil
	}
	hs.ms.DeviceInbox[userID][deviceID] = nil
	out := make([]*event.Event, len(queued))
	for i := range queued {
		evt := queued[i]
		evt.Type.Class = event.ToDeviceEventType
		evt.ToUserID, evt.ToDeviceID = userID, deviceID
		out[i] = &evt
	}
	return out
}

func (hs *homeserver) oneTimeKeys(userID id.UserID, deviceID id.DeviceID) int {
	hs.lock.Lock()
	defer hs.lock.Unlock()
	return len(hs.ms.OneTimeKeys[userID][deviceID])
}

// device is one logged-in device with its own OlmMachine.
type device struct {
	userID   id.UserID
	deviceID id.DeviceID
	client   *mautrix.Client
	mach     *crypto.OlmMachine
	sql      *crypto.SQLCryptoStore // nil for in-memory devices
}

func login(t testing.TB, ctx context.Context, hs *homeserver, userID id.UserID, deviceID id.DeviceID) *mautrix.Client {
	client, err := mautrix.NewClient(hs.srv.URL, "", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = client.Login(ctx, &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(userID)},
		DeviceID:         deviceID,
		Password:         "password",
		StoreCredentials: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

var quiet = zerolog.Nop()

// newMemoryDevice is a simulated user device: an OlmMachine on an in-memory store.
func newMemoryDevice(t testing.TB, ctx context.Context, hs *homeserver, userID id.UserID, deviceID id.DeviceID) *device {
	d := &device{userID: userID, deviceID: deviceID, client: login(t, ctx, hs, userID, deviceID)}
	d.mach = crypto.NewOlmMachine(d.client, &quiet, crypto.NewMemoryStore(nil), mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err := d.mach.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.mach.ShareKeys(ctx, 0); err != nil {
		t.Fatal(err)
	}
	return d
}

// newBridgeDevice is the bridge's device: an OlmMachine on mautrix-go's SQL store in Postgres,
// wrapped by unwedge's store unless stock.
func newBridgeDevice(t testing.TB, ctx context.Context, hs *homeserver, db *dbutil.Database, stock bool) *device {
	return newBridgeDeviceAs(t, ctx, hs, db, "@bridgebot:example.org", "BRIDGE", stock)
}

// newBridgeDeviceAs is newBridgeDevice with other IDs, for two bridges in one database: the
// store's account is named after the device.
func newBridgeDeviceAs(t testing.TB, ctx context.Context, hs *homeserver, db *dbutil.Database, userID id.UserID, deviceID id.DeviceID, stock bool) *device {
	d := &device{userID: userID, deviceID: deviceID, client: login(t, ctx, hs, userID, deviceID)}
	loadBridgeMachine(t, ctx, d, db, stock)
	if err := d.mach.ShareKeys(ctx, 0); err != nil {
		t.Fatal(err)
	}
	return d
}

// loadBridgeMachine (re)builds the bridge's machine from the database, as a restart does.
func loadBridgeMachine(t testing.TB, ctx context.Context, d *device, db *dbutil.Database, stock bool) {
	d.sql = crypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(quiet), string(d.deviceID), d.deviceID, []byte("pickle key"))
	if err := d.sql.DB.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	var store crypto.Store = d.sql
	if !stock {
		store = unwedge.NewStore(d.sql, unwedgeDB(t, ctx, db).Shared)
	}
	d.mach = crypto.NewOlmMachine(d.client, &quiet, store, mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err := d.mach.Load(ctx); err != nil {
		t.Fatal(err)
	}
}

type everyone struct{}

func (everyone) InScope(context.Context, id.UserID) (bool, error) { return true, nil }

// newUnwedger puts unwedge on the bridge's machine, with its ledger in db.
func newUnwedger(t testing.TB, ctx context.Context, bridge *device, db *dbutil.Database, owner string) (*unwedge.Unwedger, *database.UnwedgeDB) {
	udb := database.NewUnwedgeDB("bench", db, dbutil.ZeroLogger(quiet))
	if err := udb.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	cfg := unwedge.DefaultConfig()
	cfg.Scope = unwedge.ScopeEveryone
	u, err := unwedge.New(cfg, bridge.mach, udb.Ledger, everyone{}, nil, owner, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Stop)
	return u, udb
}

func openDB(t testing.TB, uri string) *dbutil.Database {
	db, err := dbutil.NewWithDialect(uri, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	db.RawDB.SetMaxOpenConns(20)
	t.Cleanup(func() { _ = db.Close() })
	return db
}

// benchOut writes a figure file for cmd/bench when UNWEDGE_BENCH_OUT names a directory.
func benchOut(t testing.TB, name string, v any) {
	dir := os.Getenv("UNWEDGE_BENCH_OUT")
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

// readBody reads a request's body and puts it back for the next handler.
func readBody(r *http.Request) ([]byte, error) {
	body, err := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	return body, err
}

// newLedger makes unwedge's tables in db and returns its ledger.
func newLedger(t testing.TB, ctx context.Context, db *dbutil.Database) *database.LedgerQuery {
	return unwedgeDB(t, ctx, db).Ledger
}

// unwedgeDB upgrades and returns unwedge's tables in db.
func unwedgeDB(t testing.TB, ctx context.Context, db *dbutil.Database) *database.UnwedgeDB {
	udb := database.NewUnwedgeDB("bench", db, dbutil.ZeroLogger(quiet))
	if err := udb.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	return udb
}
