package unwedge_test

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// fixture is a bridge and a peer device, two real OlmMachines with SQL crypto stores in one
// database (Postgres when the stack runs, SQLite otherwise), talking through the test kit's
// in-memory homeserver. The bridge's store is wrapped in unwedge's, and an Unwedger gets its
// to-device events and reports its decisions.
type fixture struct {
	t   testing.TB
	ctx context.Context
	hs  *cryptotest.Homeserver
	db  *dbutil.Database
	udb *database.UnwedgeDB

	bridge *cryptotest.Device
	peer   *cryptotest.Device

	unwedger  *unwedge.Unwedger
	ledger    *database.LedgerQuery
	cfg       unwedge.Config
	scope     *staticScope
	decisions chan unwedge.Decision
	// unwedgerLog, if set, is where the Unwedger logs (at debug level) from its next start.
	unwedgerLog io.Writer
	// From the Unwedger's next start: observe, if set, gets its decisions instead of decisions;
	// reshare, if set, follows the sessions peers open (Followers.Reshare). quiet drops the
	// decisions at once.
	observe func(unwedge.Decision)
	reshare func(ctx context.Context, device *id.Device)
	quiet   atomic.Bool
}

// fixtureFollowers passes the sessions peers open to the fixture's reshare.
type fixtureFollowers struct{ f *fixture }

func (fixtureFollowers) DeviceHealed(context.Context, *id.Device)         {}
func (x fixtureFollowers) Reshare(ctx context.Context, device *id.Device) { x.f.reshare(ctx, device) }

type staticScope struct{ allowed atomic.Bool }

func (s *staticScope) InScope(context.Context, id.UserID) (bool, error) { return s.allowed.Load(), nil }

const (
	bridgeUser   = id.UserID("@bridgebot:example.org")
	bridgeDevice = id.DeviceID("BRIDGE")
	peerUser     = id.UserID("@alice:example.org")
	peerDevice   = id.DeviceID("PHONE")
)

// newFixture makes a fixture on Postgres when the stack runs, and on SQLite otherwise.
func newFixture(t testing.TB) *fixture { return newFixtureOn(t, cryptotest.Database(t)) }

func newFixtureOn(t testing.TB, db *dbutil.Database) *fixture {
	f := &fixture{t: t, ctx: t.Context(), hs: cryptotest.NewHomeserver(t), db: db,
		cfg: cryptotest.Config(), scope: &staticScope{}, decisions: make(chan unwedge.Decision, 100)}
	f.scope.allowed.Store(true)
	f.udb = cryptotest.UnwedgeDB(t, f.db)
	f.ledger = f.udb.Ledger
	f.bridge = f.hs.NewDevice(bridgeUser, bridgeDevice, cryptotest.Store{DB: f.db, Shared: f.udb.Shared})
	f.peer = f.newPeer(peerUser, peerDevice)
	f.startUnwedger()
	return f
}

// newPeer is another device with a stock SQL store in the bridge's database.
func (f *fixture) newPeer(userID id.UserID, deviceID id.DeviceID) *cryptotest.Device {
	return f.hs.NewDevice(userID, deviceID, cryptotest.Store{DB: f.db})
}

func (f *fixture) startUnwedger() {
	opts := cryptotest.Unwedging{Config: f.cfg, Ledger: f.ledger, Audience: f.scope, Owner: fmt.Sprintf("owner-%p", f.bridge.Mach)}
	if f.unwedgerLog != nil {
		log := zerolog.New(f.unwedgerLog).Level(zerolog.DebugLevel)
		opts.Log = &log
	}
	opts.Observer = func(d unwedge.Decision) {
		switch {
		case f.quiet.Load():
		case f.observe != nil:
			f.observe(d)
		default:
			f.decisions <- d
		}
	}
	if f.reshare != nil {
		opts.Followers = fixtureFollowers{f}
	}
	f.unwedger = f.bridge.Unwedge(opts)
}

// restartBridge stops the Unwedger and reloads the bridge's machine from the database.
func (f *fixture) restartBridge() {
	f.bridge.Restart()
	f.startUnwedger()
}

// peerSends sends an m.dummy from the peer to the bridge over the peer's latest session.
func (f *fixture) peerSends() { f.peer.SendDummy(f.bridge) }

// peerOpensNewSession makes the peer lose its sessions and open a new one with the bridge: its
// m.dummy reaches the bridge as a prekey message, and decrypts (no decision).
func (f *fixture) peerOpensNewSession() {
	f.t.Helper()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(peerDevice))
	f.peer.Restart()
	time.Sleep(1100 * time.Millisecond) // the SQL store keeps second precision
	f.peerSends()
	f.deliverToBridge()
	f.noDecision()
}

// bridgeSends sends an m.dummy from the bridge to the peer.
func (f *fixture) bridgeSends() { f.bridge.SendDummy(f.peer) }

// deliverToBridge hands the bridge's queued to-device events to the Unwedger.
func (f *fixture) deliverToBridge() []*event.Event { return f.hs.Receive(f.bridge) }

// deliverToPeer hands the peer's queued events to its machine.
func (f *fixture) deliverToPeer() { f.hs.Receive(f.peer) }

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
	f.hs.Exchange(f.peer, f.bridge)
	f.noDecision()
	f.hs.Exchange(f.bridge, f.peer)
}

// sessions counts a device's stored sessions with the device of key.
func (f *fixture) sessions(p *cryptotest.Device, key id.SenderKey) int {
	var n int
	if err := f.db.QueryRow(f.ctx, "SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2", string(p.DeviceID), key).Scan(&n); err != nil {
		f.t.Fatal(err)
	}
	return n
}

func (f *fixture) peerKey() id.SenderKey   { return f.peer.IdentityKey() }
func (f *fixture) bridgeKey() id.SenderKey { return f.bridge.IdentityKey() }

// peerDecryptsAll hands the peer's queued to-device events to its machine and checks that there
// are n and that it decrypts each (its machine logs no error).
func (f *fixture) peerDecryptsAll(n int) {
	f.t.Helper()
	events := f.hs.Inbox(f.peer)
	if len(events) != n {
		f.t.Fatalf("%d events for the peer, want %d", len(events), n)
	}
	for i, evt := range events {
		var errs strings.Builder
		log := zerolog.New(&errs).Level(zerolog.ErrorLevel)
		f.peer.Mach.HandleEncryptedEvent(log.WithContext(f.ctx), evt)
		if errs.Len() > 0 {
			f.t.Errorf("the peer could not decrypt event %d of %d: %s", i+1, n, errs.String())
		}
	}
}

// healedBothWays checks the end of a heal: the peer got m.dummy on a new session and its next
// message decrypts at the bridge.
func (f *fixture) healedBothWays() {
	f.t.Helper()
	f.deliverToPeer()
	f.hs.Exchange(f.peer, f.bridge)
	f.noDecision()
}
