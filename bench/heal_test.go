package bench

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestHealLatency wedges the session between a bridge device and a user's device on the local
// Synapse again and again (the bridge loses its session row and restarts), and times each heal
// from the moment the bridge receives the undecryptable Olm message that carries a new room key:
// to m.dummy sent, and to that room key back at the bridge after its key request. The same
// wedges on mautrix-go's built-in unwedge, and the floor (one key claim, one to-device round
// trip) measured alone, are beside it. Heals: UNWEDGE_BENCH_HEALS (default 5).
func TestHealLatency(t *testing.T) {
	env := testenv.Require(t)
	heals := envInts(t, "UNWEDGE_BENCH_HEALS", 5)[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	lab := newHealLab(t, ctx, env)
	var res HealResult
	var healMS, recoveredMS, detectMS, claimMS, sessionMS, sendMS, roundTripMS, stockMS []float64
	for _, mode := range []string{"unwedge", "stock"} {
		for i := range heals {
			m, err := lab.wedgeAndHeal(ctx, mode == "stock")
			if err != nil {
				t.Fatalf("%s heal %d: %v", mode, i, err)
			}
			if mode == "stock" {
				stockMS = append(stockMS, ms(m.dummySent.Sub(m.received)))
				continue
			}
			healMS = append(healMS, ms(m.dummySent.Sub(m.received)))
			recoveredMS = append(recoveredMS, ms(m.keyBack.Sub(m.received)))
			detectMS = append(detectMS, ms(m.claimStart.Sub(m.received)))
			claimMS = append(claimMS, ms(m.claimEnd.Sub(m.claimStart)))
			sessionMS = append(sessionMS, ms(m.sendStart.Sub(m.claimEnd)))
			sendMS = append(sendMS, ms(m.dummySent.Sub(m.sendStart)))
			roundTripMS = append(roundTripMS, ms(m.keyBack.Sub(m.requested)))
		}
	}
	floorClaim, floorOneWay := lab.floor(t, ctx, heals)
	res = HealResult{
		Heals: heals, HealP50ms: pct(healMS, 50), HealP95ms: pct(healMS, 95),
		RecoveredP50ms: pct(recoveredMS, 50), RecoveredP95ms: pct(recoveredMS, 95),
		DetectP50ms: pct(detectMS, 50), ClaimP50ms: pct(claimMS, 50), SessionP50ms: pct(sessionMS, 50),
		SendP50ms: pct(sendMS, 50), KeyRoundTripP50ms: pct(roundTripMS, 50),
		FloorClaimP50ms: pct(floorClaim, 50), FloorOneWayP50ms: pct(floorOneWay, 50),
		StockHealP50ms: pct(stockMS, 50), StockHealP95ms: pct(stockMS, 95),
	}
	res.FloorP50ms = res.FloorClaimP50ms + 2*res.FloorOneWayP50ms
	t.Logf("%+v", res)
	benchOut(t, "heal", res)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// pct is the p-th percentile (nearest rank) of values.
func pct(values []float64, p int) float64 {
	if len(values) == 0 {
		return -1
	}
	sorted := slices.Clone(values)
	slices.Sort(sorted)
	i := (len(sorted)*p + 99) / 100
	return sorted[max(i-1, 0)]
}

// healLab is a bridge device (an OlmMachine on Postgres, syncing to-device events from Synapse
// like the bridge's /sync transport) and a user's device (the test client).
type healLab struct {
	t      *testing.T
	env    *testenv.Env
	db     *dbutil.Database
	client *mautrix.Client
	peer   *testclient.Client

	bridge *cryptotest.Device

	lock sync.Mutex
	// current measurement, filled in by the hooks
	cur       *healTimes
	stopSync  context.CancelFunc
	syncDone  chan struct{}
	pingsSeen chan time.Time
}

type healTimes struct {
	sessionID                                 id.SessionID
	stock                                     bool
	received, claimStart, claimEnd, sendStart time.Time
	dummySent, requested, keyBack             time.Time
	done                                      chan struct{}
	doneOnce                                  sync.Once
}

func newHealLab(t *testing.T, ctx context.Context, env *testenv.Env) *healLab {
	l := &healLab{t: t, env: env, db: openDB(t, env.NewDatabase(t)), pingsSeen: make(chan time.Time, 100)}
	var err error
	if l.client, err = mautrix.NewClient(env.HomeserverURL, "", ""); err != nil {
		t.Fatal(err)
	}
	resp, err := l.client.RegisterDummy(ctx, &mautrix.ReqRegister[any]{Username: testenv.UniqueName("benchbridge"), Password: "bench password 1719"})
	if err != nil {
		t.Fatal(err)
	}
	l.client.UserID, l.client.AccessToken, l.client.DeviceID = resp.UserID, resp.AccessToken, resp.DeviceID
	l.client.ResponseHook = l.responseHook
	// One sync store for every restart: the next sync acknowledges what the last one got, so
	// old to-device messages are not delivered again.
	l.client.Store = mautrix.NewMemorySyncStore()
	l.peer, err = testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL, Username: testenv.UniqueName("benchuser"), Password: "bench password 1719",
		DataDir: filepath.Join(t.TempDir(), "peer"), Log: zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.peer.Close() })
	l.peer.Machine().AllowKeyShare = func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection { return nil }
	l.bridge = cryptotest.Open(t, l.client, cryptotest.Store{DB: l.db}, zerolog.Nop())
	l.start(ctx, false)
	t.Cleanup(l.stop)
	// The user's device opens a session with the bridge.
	if err = l.peerSend(ctx, event.ToDeviceDummy, event.Content{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	return l
}

// start (re)loads the bridge's machine from the database, with or without unwedge, and syncs.
func (l *healLab) start(ctx context.Context, stock bool) {
	udb := cryptotest.UnwedgeDB(l.t, l.db)
	l.bridge.Store.Shared = nil
	if !stock {
		l.bridge.Store.Shared = udb.Shared
	}
	l.bridge.Restart()
	mach := l.bridge.Mach
	if err := mach.ShareKeys(ctx, -1); err != nil {
		l.t.Fatal(err)
	}
	mach.SessionReceived = func(_ context.Context, _ id.RoomID, sessionID id.SessionID, _ uint32) {
		if cur := l.current(); cur != nil && cur.sessionID == sessionID {
			cur.keyBack = time.Now()
			cur.finish()
		}
	}
	if !stock {
		cfg := unwedge.DefaultConfig()
		cfg.Scope = unwedge.ScopeEveryone
		cfg.MinInterval, cfg.HistoryRetention = time.Millisecond, time.Hour // a heal every round
		l.bridge.Unwedge(cryptotest.Unwedging{Config: cfg, Ledger: udb.Ledger, Owner: "heal-bench", Followers: healFollower{l}})
	}

	syncCtx, cancel := context.WithCancel(ctx)
	l.stopSync, l.syncDone = cancel, make(chan struct{})
	syncer := mautrix.NewDefaultSyncer()
	syncer.OnSync(func(ctx context.Context, resp *mautrix.RespSync, _ string) bool {
		for _, evt := range resp.ToDevice.Events {
			evt.Type.Class = event.ToDeviceEventType
			if evt.Content.Parsed == nil {
				_ = evt.Content.ParseRaw(evt.Type)
			}
			if evt.Type.Type == pingType {
				l.pingsSeen <- time.Now()
				continue
			}
			if cur := l.current(); cur != nil && evt.Type == event.ToDeviceEncrypted && cur.received.IsZero() {
				cur.received = time.Now()
			}
			l.bridge.Handle(evt)
		}
		mach.HandleOTKCounts(ctx, &resp.DeviceOTKCount)
		return true
	})
	l.client.Syncer = syncer
	go func() {
		defer close(l.syncDone)
		for syncCtx.Err() == nil {
			if err := l.client.SyncWithContext(syncCtx); err != nil && !errors.Is(err, context.Canceled) {
				time.Sleep(100 * time.Millisecond)
			}
		}
	}()
}

func (l *healLab) stop() {
	if l.stopSync != nil {
		l.stopSync()
		<-l.syncDone
		l.stopSync = nil
	}
	if l.bridge.Unwedger != nil {
		l.bridge.Unwedger.Stop()
	}
}

const pingType = "org.unwedge.bench.ping"

func (l *healLab) current() *healTimes {
	l.lock.Lock()
	defer l.lock.Unlock()
	return l.cur
}

func (h *healTimes) finish() { h.doneOnce.Do(func() { close(h.done) }) }

// responseHook times the bridge's key claims and to-device sends.
func (l *healLab) responseHook(req *http.Request, _ *http.Response, _ error, duration time.Duration) {
	cur := l.current()
	if cur == nil || cur.received.IsZero() {
		return
	}
	end := time.Now()
	switch {
	case strings.HasSuffix(req.URL.Path, "/keys/claim") && cur.claimStart.IsZero():
		cur.claimStart, cur.claimEnd = end.Add(-duration), end
	case strings.Contains(req.URL.Path, "/sendToDevice/m.room.encrypted") && cur.dummySent.IsZero():
		cur.sendStart, cur.dummySent = end.Add(-duration), end
		if cur.stock {
			cur.finish() // stock: nothing more to time
		}
	}
}

// healFollower follows the bench's heals: DeviceHealed asks for the lost key (onHealed).
type healFollower struct{ l *healLab }

func (f healFollower) DeviceHealed(ctx context.Context, device *id.Device) { f.l.onHealed(ctx, device) }
func (healFollower) Reshare(context.Context, *id.Device)                   {}

// onHealed asks the healed device for the room key that was lost, as the bridge does for the
// sessions bridgev2 waits for.
func (l *healLab) onHealed(ctx context.Context, device *id.Device) {
	cur := l.current()
	if cur == nil {
		return
	}
	cur.requested = time.Now()
	err := l.bridge.Mach.SendRoomKeyRequest(ctx, roomForBench, device.IdentityKey, cur.sessionID, "", map[id.UserID][]id.DeviceID{device.UserID: {device.DeviceID}})
	if err != nil {
		l.t.Errorf("key request: %v", err)
	}
}

var roomForBench = id.RoomID("!healbench:localhost")

// wedgeAndHeal makes the bridge lose its session with the device (a restart without the row),
// then the device shares a new room key over its side of the old session, and waits for the heal.
func (l *healLab) wedgeAndHeal(ctx context.Context, stock bool) (*healTimes, error) {
	l.stop()
	if _, err := l.db.Exec(ctx, "DELETE FROM crypto_olm_session WHERE account_id=$1", string(l.bridge.DeviceID)); err != nil {
		return nil, err
	}
	l.start(ctx, stock)
	// Let the new sync loop catch up before the message goes out.
	time.Sleep(300 * time.Millisecond)

	peerMach := l.peer.Machine()
	ogs, err := crypto.NewOutboundGroupSession(roomForBench, nil, nil)
	if err != nil {
		return nil, err
	}
	own := peerMach.OwnIdentity()
	igs, err := crypto.NewInboundGroupSession(own.IdentityKey, own.SigningKey, roomForBench, ogs.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		return nil, err
	}
	if err = peerMach.CryptoStore.PutGroupSession(ctx, igs); err != nil {
		return nil, err
	}
	cur := &healTimes{sessionID: ogs.ID(), stock: stock, done: make(chan struct{})}
	l.lock.Lock()
	l.cur = cur
	l.lock.Unlock()
	defer func() {
		l.lock.Lock()
		l.cur = nil
		l.lock.Unlock()
	}()
	if err = l.peerSend(ctx, event.ToDeviceRoomKey, ogs.ShareContent()); err != nil {
		return nil, err
	}
	select {
	case <-cur.done:
	case <-time.After(30 * time.Second):
		return nil, fmt.Errorf("no heal within 30 s (%+v)", cur)
	}
	if cur.claimStart.IsZero() || cur.dummySent.IsZero() {
		return nil, fmt.Errorf("incomplete timings: %+v", cur)
	}
	return cur, nil
}

// peerSend sends an Olm-encrypted to-device event from the user's device to the bridge's.
func (l *healLab) peerSend(ctx context.Context, evtType event.Type, content event.Content) error {
	target, err := l.peer.Machine().GetOrFetchDevice(ctx, l.client.UserID, l.client.DeviceID)
	if err != nil {
		return err
	}
	return l.peer.Machine().SendEncryptedToDevice(ctx, target, evtType, content)
}

// floor measures, alone, one key claim of the user's device and one-way to-device trips from
// the user's device to the bridge's /sync.
func (l *healLab) floor(t *testing.T, ctx context.Context, n int) (claim, oneWay []float64) {
	l.stop()
	l.start(ctx, true)
	time.Sleep(300 * time.Millisecond)
	peerUser, peerDevice := l.peer.UserID(), l.peer.DeviceID()
	for range n {
		started := time.Now()
		_, err := l.client.ClaimKeys(ctx, &mautrix.ReqClaimKeys{
			OneTimeKeys: mautrix.OneTimeKeysRequest{peerUser: {peerDevice: id.KeyAlgorithmSignedCurve25519}},
		})
		if err != nil {
			t.Fatal(err)
		}
		claim = append(claim, ms(time.Since(started)))
		started = time.Now()
		_, err = l.peer.Mautrix().SendToDevice(ctx, event.Type{Type: pingType, Class: event.ToDeviceEventType}, &mautrix.ReqSendToDevice{
			Messages: map[id.UserID]map[id.DeviceID]*event.Content{l.client.UserID: {l.client.DeviceID: {Raw: map[string]any{"n": 1}}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case at := <-l.pingsSeen:
			oneWay = append(oneWay, ms(at.Sub(started)))
		case <-time.After(10 * time.Second):
			t.Fatal("ping did not arrive")
		}
	}
	return claim, oneWay
}
