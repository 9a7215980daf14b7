package unwedge_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

const testRoom = id.RoomID("!portal:example.org")

// recordingSink stands in for bridgev2 (the bridge side is tested end to end in e2e): it records
// what Recovery hands it.
type recordingSink struct {
	lock      sync.Mutex
	delivered []string
	gaveUp    []id.EventID
	reasons   []string
}

func (s *recordingSink) Deliver(_ context.Context, original, decrypted *event.Event, _ int) error {
	s.lock.Lock()
	defer s.lock.Unlock()
	if decrypted.ID != original.ID {
		return fmt.Errorf("decrypted event has ID %s, want %s", decrypted.ID, original.ID)
	}
	s.delivered = append(s.delivered, decrypted.Content.AsMessage().Body)
	return nil
}

func (s *recordingSink) GiveUp(_ context.Context, original *event.Event, reason string) {
	s.lock.Lock()
	defer s.lock.Unlock()
	s.gaveUp = append(s.gaveUp, original.ID)
	s.reasons = append(s.reasons, reason)
}

// OutboundRooms: the bridge shares no room keys of its own in these tests.
func (s *recordingSink) OutboundRooms(context.Context) ([]id.RoomID, error) { return nil, nil }

func (s *recordingSink) IsMember(context.Context, id.RoomID, id.UserID) bool { return true }

func (s *recordingSink) bodies() []string {
	s.lock.Lock()
	defer s.lock.Unlock()
	return append([]string(nil), s.delivered...)
}

// recoveryFixture adds a Recovery, with a clock the test moves, to the bridge of a fixture.
type recoveryFixture struct {
	*fixture
	sink    *recordingSink
	pending *database.PendingQuery
	rec     *unwedge.Recovery
	clock   time.Time
	healing bool
	megolm  *crypto.OutboundGroupSession
}

func newRecoveryFixture(t *testing.T, mutate func(*unwedge.RecoveryConfig)) *recoveryFixture {
	f := &recoveryFixture{fixture: newFixture(t), sink: &recordingSink{}, clock: time.Now()}
	f.establish()
	f.pending = f.udb.Pending
	cfg := f.cfg.Recovery
	if mutate != nil {
		mutate(&cfg)
	}
	f.startRecovery(cfg, f.sink)
	f.peer.Mach.AllowKeyShare = func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection { return nil }
	f.megolm = f.newPeerMegolm()
	return f
}

// startRecovery makes a Recovery on the bridge's machine that hands events to sink, as a bridge
// start does.
func (f *recoveryFixture) startRecovery(cfg unwedge.RecoveryConfig, sink unwedge.Sink) {
	f.rec = unwedge.NewRecovery(cfg, f.bridge.Mach, f.pending, sink, func(id.UserID, id.SenderKey) bool { return f.healing }, "owner-"+f.t.Name(), cryptotest.Logger(f.t))
	unwedge.SetClock(f.rec, func() time.Time { return f.clock })
	f.bridge.Mach.SessionReceived = func(_ context.Context, roomID id.RoomID, sessionID id.SessionID, firstKnownIndex uint32) {
		f.rec.SessionReceived(roomID, sessionID, firstKnownIndex)
	}
}

// newPeerMegolm starts a Megolm session on the peer that the bridge never gets.
func (f *recoveryFixture) newPeerMegolm() *crypto.OutboundGroupSession {
	ogs, err := crypto.NewOutboundGroupSession(testRoom, nil, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	ogs.Shared = true
	ogs.MaxMessages = 1 << 20 // TestRecoveryManyEvents sends more than a session's default 100
	own := f.peer.Mach.OwnIdentity()
	igs, err := crypto.NewInboundGroupSession(own.IdentityKey, own.SigningKey, testRoom, ogs.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		f.t.Fatal(err)
	}
	if err = f.peer.Mach.CryptoStore.PutGroupSession(f.ctx, igs); err != nil {
		f.t.Fatal(err)
	}
	if err = f.peer.Mach.CryptoStore.AddOutboundGroupSession(f.ctx, ogs); err != nil {
		f.t.Fatal(err)
	}
	return ogs
}

// undecryptable makes the peer send a room message the bridge cannot decrypt, and records it as
// bridgev2's wait for its session does.
func (f *recoveryFixture) undecryptable(body string, sentAt time.Time) *event.Event {
	f.t.Helper()
	evt := f.undecryptableEvent(body, sentAt)
	if err := f.rec.Record(f.ctx, evt); err != nil {
		f.t.Fatal(err)
	}
	return evt
}

// undecryptableEvent makes the peer send a room message the bridge cannot decrypt.
func (f *recoveryFixture) undecryptableEvent(body string, sentAt time.Time) *event.Event {
	f.t.Helper()
	content, err := f.peer.Mach.EncryptMegolmEvent(f.ctx, testRoom, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		f.t.Fatal(err)
	}
	evt := &event.Event{
		ID: id.EventID("$" + body), RoomID: testRoom, Sender: peerUser, Type: event.EventEncrypted,
		Timestamp: sentAt.UnixMilli(), Content: event.Content{Parsed: content},
	}
	if _, err = f.bridge.Mach.DecryptMegolmEvent(f.ctx, evt); err == nil || !strings.Contains(err.Error(), "no session with given ID") {
		f.t.Fatalf("bridge decrypt of %s: %v, want no session", body, err)
	}
	return evt
}

func (f *recoveryFixture) pass(after time.Duration) {
	f.clock = f.clock.Add(after)
	unwedge.Pass(f.ctx, f.rec, true)
}

// keyRequests takes the peer's queued to-device events and returns its key requests, after
// handing them to the peer's machine (which answers them with a forwarded key).
func (f *recoveryFixture) keyRequests() []*event.RoomKeyRequestEventContent {
	var out []*event.RoomKeyRequestEventContent
	for _, evt := range f.hs.Inbox(f.peer) {
		if evt.Type == event.ToDeviceRoomKeyRequest {
			if evt.Content.Parsed == nil {
				if err := evt.Content.ParseRaw(evt.Type); err != nil {
					f.t.Fatal(err)
				}
			}
			out = append(out, evt.Content.AsRoomKeyRequest())
		}
		f.peer.Mach.HandleToDeviceEvent(f.ctx, evt)
	}
	return out
}

// awaitForwardedKey hands the bridge the peer's forwarded key once it is queued.
func (f *recoveryFixture) awaitForwardedKey() {
	f.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if len(f.deliverToBridge()) > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.t.Fatal("the peer did not forward the key")
}

func (f *recoveryFixture) pendingCount() int {
	n, err := f.pending.Count(f.ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	return n
}

// TestRecoveryLateKey: the key arrives long after bridgev2 gave up. Nothing is requested while
// bridgev2 still waits; then the key is requested, arrives as a forwarded key, and the events are
// bridged in the order they arrived, once, and the request is cancelled.
func TestRecoveryLateKey(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	t0 := f.clock
	// Their origin_server_ts says another order: a sender (or its homeserver) writes what it
	// likes there. The order of arrival is the homeserver's.
	f.undecryptable("first", t0.Add(-time.Second))
	f.undecryptable("second", t0.Add(-2*time.Second))
	f.undecryptable("third", t0.Add(-3*time.Second))

	f.pass(10 * time.Second)
	if reqs := f.keyRequests(); len(reqs) != 0 {
		t.Fatalf("%d key requests while bridgev2 still waits, want 0", len(reqs))
	}
	f.pass(unwedge.StockWait)
	reqs := f.keyRequests()
	if len(reqs) != 1 || reqs[0].Action != event.KeyRequestActionRequest || reqs[0].Body.SessionID != f.megolm.ID() || reqs[0].RequestingDeviceID != bridgeDevice {
		t.Fatalf("key requests = %+v, want one request for %s", reqs, f.megolm.ID())
	}
	f.awaitForwardedKey()
	f.pass(time.Second)
	if got := f.sink.bodies(); strings.Join(got, ",") != "first,second,third" {
		t.Fatalf("bridged %v, want first,second,third", got)
	}
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d events still pending", n)
	}
	cancels := f.keyRequests()
	if len(cancels) != 1 || cancels[0].Action != event.KeyRequestActionCancel || cancels[0].RequestID != reqs[0].RequestID {
		t.Fatalf("after the key arrived the peer got %+v, want a cancellation of %s", cancels, reqs[0].RequestID)
	}

	// The same key again (a second answer): nothing is bridged twice.
	f.undecryptableNoop()
	counts := f.rec.Counts()
	if counts[unwedge.CountRecovered] != 3 || counts[unwedge.CountRequestsSent] != 1 || counts[unwedge.CountRequestsFilled] != 1 {
		t.Fatalf("counts = %v", counts)
	}
}

// TestRecordAfterDecrypted: an event the bridge decrypted before it was recorded (another event's
// wait for the same session records it, just after its own wait got the key) leaves no row: it
// would be handed to the bridge a second time.
func TestRecordAfterDecrypted(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	content, err := f.peer.Mach.EncryptMegolmEvent(f.ctx, testRoom, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "raced"})
	if err != nil {
		t.Fatal(err)
	}
	evt := &event.Event{ID: "$raced", RoomID: testRoom, Sender: peerUser, Type: event.EventEncrypted, Content: event.Content{Parsed: content}}
	f.rec.Decrypted(f.ctx, evt.ID)
	if err = f.rec.Record(f.ctx, evt); err != nil {
		t.Fatal(err)
	}
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d rows for an event decrypted before it was recorded, want 0", n)
	}
	// An event not decrypted before is recorded as usual.
	f.undecryptable("later", f.clock)
	if n := f.pendingCount(); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

// TestRecoveryManyEvents: a session with more events than one hand-over batch loads (200) has
// them all bridged when its key arrives, in the order they arrived, not only the first batch.
func TestRecoveryManyEvents(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	const n = 230
	want := make([]string, n)
	for i := range n {
		want[i] = fmt.Sprintf("message %d", i)
		f.undecryptable(want[i], f.clock)
	}
	f.pass(unwedge.StockWait + time.Second)
	if reqs := f.keyRequests(); len(reqs) != 1 {
		t.Fatalf("%d key requests, want one for the session", len(reqs))
	}
	f.awaitForwardedKey()
	// The pass the arriving key starts, without the sweep (that runs every 30 s).
	f.clock = f.clock.Add(time.Second)
	unwedge.Pass(f.ctx, f.rec, false)
	if got := f.sink.bodies(); !slices.Equal(got, want) {
		t.Fatalf("bridged %d events (%v ...), want all %d in order", len(got), got[:min(len(got), 3)], n)
	}
	if left := f.pendingCount(); left != 0 {
		t.Fatalf("%d events still pending", left)
	}
}

// undecryptableNoop makes the peer forward the same key again and checks nothing more is bridged.
func (f *recoveryFixture) undecryptableNoop() {
	f.t.Helper()
	before := len(f.sink.bodies())
	err := f.peer.Mach.SendEncryptedToDevice(f.ctx, f.peer.Fetch(bridgeUser, bridgeDevice), event.ToDeviceForwardedRoomKey, f.forwardedKey())
	if err != nil {
		f.t.Fatal(err)
	}
	f.awaitForwardedKey()
	f.pass(time.Second)
	if after := len(f.sink.bodies()); after != before {
		f.t.Fatalf("a duplicate key bridged %d more events", after-before)
	}
}

func (f *recoveryFixture) forwardedKey() event.Content {
	igs, err := f.peer.Mach.CryptoStore.GetGroupSession(f.ctx, testRoom, f.megolm.ID())
	if err != nil || igs == nil {
		f.t.Fatalf("peer's own inbound session: %v", err)
	}
	exported, err := igs.Internal.Export(igs.Internal.FirstKnownIndex())
	if err != nil {
		f.t.Fatal(err)
	}
	return event.Content{Parsed: &event.ForwardedRoomKeyEventContent{
		RoomKeyEventContent: event.RoomKeyEventContent{Algorithm: id.AlgorithmMegolmV1, RoomID: testRoom, SessionID: igs.ID(), SessionKey: string(exported)},
		SenderKey:           igs.SenderKey,
		SenderClaimedKey:    igs.SigningKey,
	}}
}

// TestRecoveryRestart: events recorded before a restart are requested and bridged by the next
// process, which knows nothing of them but the database.
func TestRecoveryRestart(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	f.undecryptable("before-restart-1", f.clock)
	f.undecryptable("before-restart-2", f.clock.Add(time.Millisecond))

	f.restartBridge()
	f.startRecovery(f.cfg.Recovery, f.sink)
	f.pass(unwedge.StockWait + time.Second)
	if reqs := f.keyRequests(); len(reqs) != 1 {
		t.Fatalf("after restart %d key requests, want 1", len(reqs))
	}
	f.awaitForwardedKey()
	f.pass(time.Second)
	if got := f.sink.bodies(); strings.Join(got, ",") != "before-restart-1,before-restart-2" {
		t.Fatalf("bridged %v after restart", got)
	}
}

// TestRecoveryKeyAtOnce: an event is bridgev2's only while bridgev2's own wait for its session
// runs in this process. A key that arrives at any other time (after a restart, whose waits died
// with the old process, or after bridgev2's wait ran out) has its events bridged by the round the
// key starts, seconds after it, not after the hand-over time (StockWait); after a restart the key
// is requested at once too. A key that arrives while bridgev2 waits is left to bridgev2.
func TestRecoveryKeyAtOnce(t *testing.T) {
	cases := []struct {
		name string
		// wedge makes the events pending and returns them; the clock has moved less than
		// StockWait when the key arrives.
		wedge func(f *recoveryFixture) []*event.Event
		// requested: the key is requested (and the peer answers); otherwise the peer sends it
		// unasked.
		requested bool
		want      string
	}{
		{"after a restart", func(f *recoveryFixture) []*event.Event {
			evts := []*event.Event{f.undecryptable("one", f.clock), f.undecryptable("two", f.clock)}
			f.clock = f.clock.Add(time.Second)
			f.restartBridge()
			f.startRecovery(f.cfg.Recovery, f.sink)
			return evts
		}, true, "one,two"},
		{"after bridgev2's wait ran out", func(f *recoveryFixture) []*event.Event {
			evt := f.undecryptableEvent("late", f.clock)
			f.waitForSession(evt, 50*time.Millisecond, false)
			f.clock = f.clock.Add(2 * time.Second)
			return []*event.Event{evt}
		}, false, "late"},
		{"while bridgev2 waits", func(f *recoveryFixture) []*event.Event {
			evt := f.undecryptableEvent("waited", f.clock)
			f.waitForSession(evt, 10*time.Second, true)
			return []*event.Event{evt}
		}, false, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newRecoveryFixture(t, nil)
			start := f.clock
			evts := tc.wedge(f)
			f.clock = f.clock.Add(time.Second)
			unwedge.Pass(f.ctx, f.rec, false)
			if reqs := f.keyRequests(); (len(reqs) == 1) != tc.requested {
				t.Fatalf("%d key requests %s after the events were recorded, want requested: %v", len(reqs), f.clock.Sub(start), tc.requested)
			}
			if tc.requested {
				f.awaitForwardedKey()
			} else {
				if err := f.peer.Mach.SendEncryptedToDevice(f.ctx, f.peer.Fetch(bridgeUser, bridgeDevice), event.ToDeviceForwardedRoomKey, f.forwardedKey()); err != nil {
					t.Fatal(err)
				}
				f.awaitForwardedKey()
			}
			// The round the key starts (SessionReceived pokes the loop), without the sweep.
			unwedge.Pass(f.ctx, f.rec, false)
			if tc.want == "" {
				// bridgev2's wait got the key: its decrypt bridges the event, and the row goes.
				for _, evt := range evts {
					f.rec.Decrypted(f.ctx, evt.ID)
				}
				f.clock = f.clock.Add(2 * time.Second)
				unwedge.Pass(f.ctx, f.rec, true)
			}
			if got := strings.Join(f.sink.bodies(), ","); got != tc.want {
				t.Fatalf("recovery bridged %q %s after the events were recorded, want %q", got, f.clock.Sub(start), tc.want)
			}
			if n := f.pendingCount(); n != 0 {
				t.Fatalf("%d events still pending", n)
			}
		})
	}
}

// waitForSession runs bridgev2's wait for evt's session, as bridgev2 does after a failed
// decrypt: with background, in the background until the key arrives (it returns once the wait has
// recorded the event); without, until timeout runs out.
func (f *recoveryFixture) waitForSession(evt *event.Event, timeout time.Duration, background bool) {
	f.t.Helper()
	content := evt.Content.AsEncrypted()
	f.rec.Undecryptable(evt)
	wait := func() bool {
		return f.rec.WaitForSession(f.ctx, evt.RoomID, content.SenderKey, content.SessionID, timeout)
	}
	if !background {
		if wait() {
			f.t.Fatal("bridgev2's wait got a key nobody sent")
		}
		return
	}
	got := make(chan bool, 1)
	go func() { got <- wait() }()
	f.t.Cleanup(func() {
		select {
		case ok := <-got:
			if !ok {
				f.t.Error("bridgev2's wait did not see the key arrive")
			}
		case <-time.After(timeout + time.Second):
			f.t.Error("bridgev2's wait did not end")
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for f.pendingCount() == 0 {
		if time.Now().After(deadline) {
			f.t.Fatal("bridgev2's wait did not record the event")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRecoveryBackoff: requests back off, stop at the configured number, wait while the device
// is being healed, and go out at once after its heal.
func TestRecoveryBackoff(t *testing.T) {
	f := newRecoveryFixture(t, func(c *unwedge.RecoveryConfig) {
		c.KeyRequests, c.MinBackoff, c.MaxBackoff = 3, 10*time.Second, 15*time.Second
	})
	// The peer ignores requests here: the key never comes.
	f.peer.Mach.AllowKeyShare = func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection {
		return &crypto.KeyShareRejectNoResponse
	}
	f.undecryptable("lost", f.clock)
	steps := []struct {
		after time.Duration
		want  int
	}{
		{unwedge.StockWait, 1}, // first request at the hand-over
		{5 * time.Second, 0},   // backoff: 10 s
		{5 * time.Second, 1},
		{10 * time.Second, 0}, // backoff: 15 s (capped)
		{5 * time.Second, 1},  // third and last
		{time.Hour, 0},
	}
	for i, step := range steps {
		f.pass(step.after)
		if got := len(f.keyRequests()); got != step.want {
			t.Fatalf("step %d: %d requests, want %d", i, got, step.want)
		}
	}

	f.undecryptable("while-healing", f.clock)
	// A new session is due at the hand-over, but the device is healing: deferred.
	f.megolm = f.newPeerMegolm()
	f.undecryptable("new-session-while-healing", f.clock)
	f.healing = true
	f.pass(unwedge.StockWait + time.Second)
	if got := len(f.keyRequests()); got != 0 {
		t.Fatalf("%d requests to a healing device, want 0", got)
	}
	f.healing = false
	f.rec.DeviceHealed(f.ctx, f.bridge.Fetch(peerUser, peerDevice))
	f.pass(0)
	if got := len(f.keyRequests()); got != 1 {
		t.Fatalf("after the heal %d requests, want 1 (the exhausted session is not asked again)", got)
	}
	if c := f.rec.Counts(); c[unwedge.CountRequestsDeferred] != 1 {
		t.Fatalf("counts = %v, want 1 deferred request", c)
	}
}

// TestRecoveryRetention: an event whose key never comes is given up after the retention, and
// its row goes.
func TestRecoveryRetention(t *testing.T) {
	f := newRecoveryFixture(t, func(c *unwedge.RecoveryConfig) { c.Retention = time.Hour })
	evt := f.undecryptable("never", f.clock)
	f.pass(59 * time.Minute)
	if len(f.sink.gaveUp) != 0 {
		t.Fatal("given up before the retention")
	}
	f.pass(2 * time.Minute)
	if len(f.sink.gaveUp) != 1 || f.sink.gaveUp[0] != evt.ID || !strings.Contains(f.sink.reasons[0], unwedge.ErrGaveUp.Error()) {
		t.Fatalf("gave up %v (%v), want %s", f.sink.gaveUp, f.sink.reasons, evt.ID)
	}
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d rows left after giving up", n)
	}
}

// TestRecoveryDecryptedByBridge: when bridgev2's own wait got the key, the row goes and nothing
// is bridged twice.
func TestRecoveryDecryptedByBridge(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	evt := f.undecryptable("in-time", f.clock)
	f.rec.Decrypted(f.ctx, evt.ID)
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d rows after bridgev2 decrypted the event", n)
	}
	if c := f.rec.Counts(); c[unwedge.CountDecryptedStock] != 1 {
		t.Fatalf("counts = %v", c)
	}
}

// TestRecoveryLimit: a sender cannot fill the table.
func TestRecoveryLimit(t *testing.T) {
	f := newRecoveryFixture(t, func(c *unwedge.RecoveryConfig) { c.MaxPendingPerUser = 2 })
	f.undecryptable("one", f.clock)
	f.undecryptable("two", f.clock)
	content, err := f.peer.Mach.EncryptMegolmEvent(f.ctx, testRoom, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "three"})
	if err != nil {
		t.Fatal(err)
	}
	err = f.rec.Record(f.ctx, &event.Event{ID: "$three", RoomID: testRoom, Sender: peerUser, Type: event.EventEncrypted, Content: event.Content{Parsed: content}})
	var full *unwedge.PendingFullError
	if !errors.As(err, &full) || full.Cap != unwedge.CapSender || f.pendingCount() != 2 {
		t.Fatalf("third event: err=%v, %d rows; want the sender cap and 2 rows", err, f.pendingCount())
	}
	if counts := f.rec.Counts(); counts[unwedge.CountNotRecorded] != 1 || counts[unwedge.CountFullSender] != 1 {
		t.Fatalf("counts = %v; want 1 not recorded, over the sender cap", counts)
	}
	// Not Megolm: refused with an error, nothing stored.
	if err = f.rec.Record(f.ctx, &event.Event{ID: "$plain", RoomID: testRoom, Sender: "@bob:example.org", Content: event.Content{Parsed: &event.MessageEventContent{}}}); err == nil {
		t.Fatal("a plaintext event was recorded")
	}
}

// TestRecoveryWaitsForEarlierIndex: after a heal, clients share their current Megolm session again
// from its current index, which cannot decrypt a pending event sent before it. Such an event is
// tried once and logged once, and then waits, without being tried every round, until a copy of
// the session from an earlier index arrives; a copy from no earlier an index changes nothing.
func TestRecoveryWaitsForEarlierIndex(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	// The bridge's store counts its reads of the session: each try of the event reads it.
	reads := &sessionReads{}
	f.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store { reads.Store = inner; return reads }
	f.restartBridge()
	f.startRecovery(f.cfg.Recovery, f.sink)
	f.undecryptable("first", f.clock)
	var logs strings.Builder
	ctx := zerolog.New(&logs).WithContext(f.ctx)
	round := func() {
		f.clock = f.clock.Add(unwedge.StockWait + time.Second)
		unwedge.Pass(ctx, f.rec, true)
	}
	// The peer shares its session again from its current index (1), as after a new Olm session.
	share := func() {
		ogs, err := f.peer.Mach.CryptoStore.GetOutboundGroupSession(f.ctx, testRoom)
		if err != nil || ogs == nil {
			t.Fatalf("peer's outbound session: %v", err)
		}
		if err = f.peer.Mach.SendEncryptedToDevice(f.ctx, f.peer.Fetch(bridgeUser, bridgeDevice), event.ToDeviceRoomKey, ogs.ShareContent()); err != nil {
			t.Fatal(err)
		}
		f.deliverToBridge()
	}
	share()
	round()
	before := reads.n.Load()
	for range 5 {
		round()
	}
	if n := reads.n.Load() - before; n != 0 {
		t.Errorf("the event was tried %d more times in 5 rounds with no new copy of its key, want none", n)
	}
	share() // again from the current index: no earlier copy (importing it reads the session once)
	before = reads.n.Load()
	round()
	if n := reads.n.Load() - before; n != 0 {
		t.Errorf("a copy from no earlier an index made the event be tried (%d reads)", n)
	}
	if n := strings.Count(logs.String(), "Pending events wait for an earlier copy of their room key"); n != 1 {
		t.Errorf("logged %d times that the event waits for an earlier index, want once:\n%s", n, logs.String())
	}
	if n := strings.Count(logs.String(), "Pending event still cannot be bridged"); n != 0 {
		t.Errorf("warned %d times that the event cannot be bridged, want never", n)
	}
	if f.pendingCount() != 1 || len(f.sink.bodies()) != 0 {
		t.Fatalf("pending %d, bridged %v; want the event waiting", f.pendingCount(), f.sink.bodies())
	}
	// A copy from index 0 (the peer forwards it) ends the wait.
	if err := f.peer.Mach.SendEncryptedToDevice(f.ctx, f.peer.Fetch(bridgeUser, bridgeDevice), event.ToDeviceForwardedRoomKey, f.forwardedKey()); err != nil {
		t.Fatal(err)
	}
	f.awaitForwardedKey()
	round()
	if got := f.sink.bodies(); len(got) != 1 || got[0] != "first" {
		t.Fatalf("bridged %v after a copy from index 0, want the event", got)
	}
}

// sessionReads counts the reads of Megolm sessions of testRoom from the crypto store.
type sessionReads struct {
	crypto.Store
	n atomic.Int64
}

func (s *sessionReads) GetGroupSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (*crypto.InboundGroupSession, error) {
	if roomID == testRoom {
		s.n.Add(1)
	}
	return s.Store.GetGroupSession(ctx, roomID, sessionID)
}
