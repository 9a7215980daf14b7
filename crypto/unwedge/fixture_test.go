package unwedge_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
	"github.com/unwedge/unwedge/internal/testenv"
)

func init() {
	crypto.PostgresArrayWrapper = pq.Array
}

// fixture is a bridge and a peer device, two real OlmMachines with SQL crypto stores on a real
// Postgres database, talking through mautrix-go's in-memory homeserver (mockserver). The
// homeserver is wrapped to count key claims and to inject failures a real one cannot produce on
// demand.
type fixture struct {
	t     testing.TB
	ctx   context.Context
	ms    *mockserver.MockServer
	srv   *httptest.Server
	db    *dbutil.Database
	dbURI string

	serverLock sync.Mutex
	claims     atomic.Int32
	queries    atomic.Int32
	// failClaims answers the next N key claims with 503.
	failClaims atomic.Int32
	// loseClaims passes the next N key claims to the homeserver, which hands out a key, and then
	// answers with lostAnswer instead of the homeserver's answer (a proxy's 504, a connection
	// dropped): the key is spent, and the bridge does not learn it. Set lostAnswer first.
	loseClaims atomic.Int32
	lostAnswer func(w http.ResponseWriter)
	// failSends answers the bridge's next N to-device sends with 502, as a proxy in front of a
	// stopped homeserver does.
	failSends atomic.Int32
	// failQueries answers the next N device key queries with 502.
	failQueries atomic.Int32

	bridge *party
	peer   *party

	unwedger  *unwedge.Unwedger
	ledger    *database.LedgerQuery
	shared    *database.SharedQuery
	cfg       unwedge.Config
	scope     *staticScope
	decisions chan unwedge.Decision
	// unwedgerLog, if set, is where the Unwedger logs (at debug level) from its next start.
	unwedgerLog io.Writer
	// wrapStore, if set, wraps the bridge's SQL crypto store (under unwedge's Store) from the next
	// loadMachine, for faults of the database that a real one cannot produce on demand.
	wrapStore func(crypto.Store) crypto.Store
}

type party struct {
	userID   id.UserID
	deviceID id.DeviceID
	client   *mautrix.Client
	sql      *crypto.SQLCryptoStore
	mach     *crypto.OlmMachine
}

type staticScope struct{ allowed atomic.Bool }

func (s *staticScope) InScope(context.Context, id.UserID) (bool, error) { return s.allowed.Load(), nil }

const (
	bridgeUser   = id.UserID("@bridgebot:example.org")
	bridgeDevice = id.DeviceID("BRIDGE")
	peerUser     = id.UserID("@alice:example.org")
	peerDevice   = id.DeviceID("PHONE")
)

func newFixture(t testing.TB) *fixture {
	env := testenv.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	f := &fixture{t: t, ctx: ctx, ms: mockserver.Create(t), decisions: make(chan unwedge.Decision, 100)}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	f.dbURI = env.NewDatabase(t)
	f.db = f.openDB()
	f.cfg = unwedge.DefaultConfig()
	f.cfg.MinBackoff, f.cfg.MaxBackoff = 20*time.Millisecond, 100*time.Millisecond
	f.scope = &staticScope{}
	f.scope.allowed.Store(true)
	udb := database.NewUnwedgeDB("test", f.db, dbutil.ZeroLogger(zerolog.Nop()))
	if err := udb.Upgrade(f.ctx); err != nil {
		t.Fatal(err)
	}
	f.ledger, f.shared = udb.Ledger, udb.Shared
	f.bridge = f.newParty(bridgeUser, bridgeDevice, true)
	f.peer = f.newParty(peerUser, peerDevice, false)
	f.startUnwedger()
	return f
}

func (f *fixture) openDB() *dbutil.Database {
	db, err := dbutil.NewWithDialect(f.dbURI, "postgres")
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _ = db.Close() })
	return db
}

// serve runs the in-memory homeserver one request at a time (its maps are not synchronized).
func (f *fixture) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/_matrix/client/v3/keys/query" {
		f.queries.Add(1)
		if f.failQueries.Load() > 0 {
			f.failQueries.Add(-1)
			http.Error(w, "homeserver unreachable", http.StatusBadGateway)
			return
		}
	}
	if r.URL.Path == "/_matrix/client/v3/keys/claim" {
		f.claims.Add(1)
		if f.failClaims.Load() > 0 {
			f.failClaims.Add(-1)
			http.Error(w, `{"errcode":"M_UNKNOWN","error":"overloaded"}`, http.StatusServiceUnavailable)
			return
		}
		if f.loseClaims.Load() > 0 {
			f.loseClaims.Add(-1)
			f.serverLock.Lock()
			f.ms.Router.ServeHTTP(httptest.NewRecorder(), r)
			f.serverLock.Unlock()
			f.lostAnswer(w)
			return
		}
	}
	if strings.HasPrefix(r.URL.Path, "/_matrix/client/v3/sendToDevice/") && f.failSends.Load() > 0 &&
		r.Header.Get("Authorization") == "Bearer "+f.bridge.client.AccessToken {
		f.failSends.Add(-1)
		http.Error(w, "homeserver unreachable", http.StatusBadGateway)
		return
	}
	f.serverLock.Lock()
	defer f.serverLock.Unlock()
	f.ms.Router.ServeHTTP(w, r)
}

func (f *fixture) newParty(userID id.UserID, deviceID id.DeviceID, wrap bool) *party {
	p := &party{userID: userID, deviceID: deviceID}
	client, err := mautrix.NewClient(f.srv.URL, "", "")
	if err != nil {
		f.t.Fatal(err)
	}
	_, err = client.Login(f.ctx, &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(userID)},
		DeviceID:         deviceID,
		Password:         "password",
		StoreCredentials: true,
	})
	if err != nil {
		f.t.Fatal(err)
	}
	p.client = client
	f.loadMachine(p, wrap)
	if err = p.mach.ShareKeys(f.ctx, 0); err != nil {
		f.t.Fatal(err)
	}
	return p
}

// loadMachine (re)builds a party's store and machine from the database, as a restart does.
func (f *fixture) loadMachine(p *party, wrap bool) {
	p.sql = crypto.NewSQLCryptoStore(f.db, dbutil.ZeroLogger(zerolog.Nop()), string(p.deviceID), p.deviceID, []byte("pickle key"))
	if err := p.sql.DB.Upgrade(f.ctx); err != nil {
		f.t.Fatal(err)
	}
	var store crypto.Store = p.sql
	if wrap {
		if f.wrapStore != nil {
			store = f.wrapStore(store)
		}
		store = unwedge.NewStore(store, f.shared)
	}
	log := f.logger().With().Stringer("party", p.deviceID).Logger()
	p.mach = crypto.NewOlmMachine(p.client, &log, store, mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err := p.mach.Load(f.ctx); err != nil {
		f.t.Fatal(err)
	}
}

// logger writes warnings to the test's log. A fuzz target may not log through its *testing.F,
// so under fuzzing the fixture is quiet.
func (f *fixture) logger() zerolog.Logger {
	if _, fuzzing := f.t.(*testing.F); fuzzing {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.NewTestWriter(f.t)).Level(zerolog.WarnLevel)
}

func (f *fixture) startUnwedger() {
	repairer := &unwedge.SQLRepairer{DB: f.bridge.sql.DB, AccountID: string(bridgeDevice), PickleKey: []byte("pickle key")}
	log := f.logger()
	if f.unwedgerLog != nil {
		log = zerolog.New(f.unwedgerLog).Level(zerolog.DebugLevel)
	}
	u, err := unwedge.New(f.cfg, f.bridge.mach, f.ledger, f.scope, repairer, fmt.Sprintf("owner-%p", f.bridge.mach), log)
	if err != nil {
		f.t.Fatal(err)
	}
	u.OnDecision = func(d unwedge.Decision) { f.decisions <- d }
	f.unwedger = u
	f.t.Cleanup(u.Stop)
}

// restartBridge stops the Unwedger and reloads the bridge's machine from the database.
func (f *fixture) restartBridge() {
	f.unwedger.Stop()
	f.loadMachine(f.bridge, true)
	f.startUnwedger()
}

func (f *fixture) device(of *party, user id.UserID, dev id.DeviceID) *id.Device {
	d, err := of.mach.GetOrFetchDevice(f.ctx, user, dev)
	if err != nil {
		f.t.Fatal(err)
	}
	return d
}

// peerSends sends an m.dummy from the peer to the bridge over the peer's latest session.
func (f *fixture) peerSends() {
	if err := f.peer.mach.SendEncryptedToDevice(f.ctx, f.device(f.peer, bridgeUser, bridgeDevice), event.ToDeviceDummy, event.Content{}); err != nil {
		f.t.Fatal(err)
	}
}

// bridgeSends sends an m.dummy from the bridge to the peer.
func (f *fixture) bridgeSends() {
	if err := f.bridge.mach.SendEncryptedToDevice(f.ctx, f.device(f.bridge, peerUser, peerDevice), event.ToDeviceDummy, event.Content{}); err != nil {
		f.t.Fatal(err)
	}
}

// awaitInbox waits until a to-device event waits for the party, and leaves it there.
func (f *fixture) awaitInbox(p *party, timeout time.Duration) {
	f.t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		f.serverLock.Lock()
		n := len(f.ms.DeviceInbox[p.userID][p.deviceID])
		f.serverLock.Unlock()
		if n > 0 {
			return
		} else if time.Now().After(deadline) {
			f.t.Fatalf("nothing was sent to %s's %s within %s", p.userID, p.deviceID, timeout)
		}
	}
}

// inbox takes the to-device events waiting for a party.
func (f *fixture) inbox(p *party) []*event.Event {
	f.serverLock.Lock()
	defer f.serverLock.Unlock()
	queued := f.ms.DeviceInbox[p.userID][p.deviceID]
	f.ms.DeviceInbox[p.userID][p.deviceID] = nil
	out := make([]*event.Event, len(queued))
	for i := range queued {
		evt := queued[i]
		evt.Type.Class = event.ToDeviceEventType
		evt.ToUserID, evt.ToDeviceID = p.userID, p.deviceID
		out[i] = &evt
	}
	return out
}

// deliverToBridge hands the bridge's queued to-device events to the Unwedger.
func (f *fixture) deliverToBridge() []*event.Event {
	events := f.inbox(f.bridge)
	for _, evt := range events {
		f.unwedger.HandleToDevice(f.ctx, evt)
	}
	return events
}

// deliverToPeer hands the peer's queued events to its machine.
func (f *fixture) deliverToPeer() {
	for _, evt := range f.inbox(f.peer) {
		f.peer.mach.HandleToDeviceEvent(f.ctx, evt)
	}
}

// decision waits for the Unwedger's next decision.
func (f *fixture) decision() unwedge.Decision {
	f.t.Helper()
	select {
	case d := <-f.decisions:
		return d
	case <-time.After(10 * time.Second):
		f.t.Fatal("no decision from the Unwedger")
		return unwedge.Decision{}
	}
}

// noDecision checks that the Unwedger stays quiet.
func (f *fixture) noDecision() {
	f.t.Helper()
	select {
	case d := <-f.decisions:
		f.t.Fatalf("unexpected decision %+v", d)
	case <-time.After(100 * time.Millisecond):
	}
}

// establish opens a working session both ways: the peer speaks first, the bridge answers.
func (f *fixture) establish() {
	f.peerSends()
	f.deliverToBridge()
	f.noDecision()
	f.bridgeSends()
	f.deliverToPeer()
}

// oneTimeKeys counts the one-time keys of a party's device that the homeserver has left to hand out.
func (f *fixture) oneTimeKeys(p *party) int {
	f.serverLock.Lock()
	defer f.serverLock.Unlock()
	return len(f.ms.OneTimeKeys[p.userID][p.deviceID])
}

// sessions counts the bridge's stored sessions with the peer.
func (f *fixture) sessions(p *party, key id.SenderKey) int {
	var n int
	if err := f.db.QueryRow(f.ctx, "SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2", string(p.deviceID), key).Scan(&n); err != nil {
		f.t.Fatal(err)
	}
	return n
}

func (f *fixture) peerKey() id.SenderKey   { return f.peer.mach.OwnIdentity().IdentityKey }
func (f *fixture) bridgeKey() id.SenderKey { return f.bridge.mach.OwnIdentity().IdentityKey }

// healedBothWays checks the end of a heal: the peer got m.dummy on a new session and its next
// message decrypts at the bridge.
func (f *fixture) healedBothWays() {
	f.t.Helper()
	f.deliverToPeer()
	f.peerSends()
	f.deliverToBridge()
	f.noDecision()
}

func zerologNop() zerolog.Logger { return zerolog.Nop() }
