package unwedge_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestWedges makes each kind of wedge happen between two real machines, and checks that the
// Unwedger names it, creates exactly one replacement session (one key claim), sends m.dummy over
// it, and that the peer's next message decrypts. The wedges change the crypto store's rows, so
// they run on each database there is.
func TestWedges(t *testing.T) {
	cases := []struct {
		name  string
		wedge func(f *fixture)
		class unwedge.Class
	}{{
		name: "bridge lost its session",
		wedge: func(f *fixture) {
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			f.restartBridge()
			f.peerSends()
		},
		class: unwedge.ClassNoSession,
	}, {
		name: "bridge restored from backup",
		wedge: func(f *fixture) {
			backup := f.backupSessions(f.bridge)
			// After the backup the bridge makes a new ratchet key and the peer answers on it: the
			// restored state lacks that key and cannot follow the peer's chain.
			f.peerSends()
			f.deliverToBridge()
			f.bridgeSends()
			f.deliverToPeer()
			f.peerSends()
			f.deliverToBridge()
			f.noDecision()
			f.restoreSessions(f.bridge, backup)
			f.restartBridge()
			f.peerSends()
		},
		class: unwedge.ClassNoMatchingSession,
	}, {
		name: "peer restored from backup",
		wedge: func(f *fixture) {
			// The backup is taken while the peer's sending chain is current at the bridge.
			f.peerSends()
			f.deliverToBridge()
			backup := f.backupSessions(f.peer)
			// Then the conversation moves on: the peer starts a new chain the bridge follows.
			f.bridgeSends()
			f.deliverToPeer()
			f.peerSends()
			f.deliverToBridge()
			f.noDecision()
			// The restored peer sends on its old chain: the bridge can read it, but the peer
			// cannot read the bridge's chain any more.
			f.restoreSessions(f.peer, backup)
			f.peer.Restart()
			f.peerSends()
		},
		class: unwedge.ClassPeerRestored,
	}, {
		name: "peer used a one-time key the bridge no longer has",
		wedge: func(f *fixture) {
			f.forgetOneTimeKeys()
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(peerDevice))
			f.peer.Restart()
			f.peerSends()
		},
		class: unwedge.ClassPrekeyUnknownOTK,
	}, {
		name: "prekey message for a stored session does not decrypt",
		wedge: func(f *fixture) {
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(peerDevice))
			f.peer.Restart()
			f.peerSends()
			evt := f.hs.Inbox(f.bridge)[0]
			f.unwedger.HandleToDevice(f.ctx, evt) // the bridge learns the new session
			f.noDecision()
			f.peerSends() // still a prekey message (no answer yet): tamper with its MAC
			tampered := f.hs.Inbox(f.bridge)[0]
			content := tampered.Content.AsEncrypted()
			ct := content.OlmCiphertext[f.bridgeKey()]
			ct.Body = flipMACChar(ct.Body)
			content.OlmCiphertext[f.bridgeKey()] = ct
			f.hs.Requeue(f.bridge, tampered)
		},
		class: unwedge.ClassBadMAC,
	}, {
		name: "bridge's stored session is corrupt",
		wedge: func(f *fixture) {
			f.exec("UPDATE crypto_olm_session SET session=$1 WHERE account_id=$2", []byte("corrupt"), string(bridgeDevice))
			f.restartBridge()
			f.peerSends()
		},
		class: unwedge.ClassUnreadableSession,
	}}
	for _, tc := range cases {
		for dialect, db := range cryptotest.Databases(t) {
			t.Run(tc.name+"/"+dialect, func(t *testing.T) {
				f := newFixtureOn(t, db)
				f.establish()
				tc.wedge(f)
				claimsWedge := f.hs.Claims()
				f.deliverToBridge()
				if d := f.decision(); d.Class != tc.class || d.Action != unwedge.ActionHealed || d.DeviceID != peerDevice {
					t.Fatalf("decision = %+v, want %s healed for %s", d, tc.class, peerDevice)
				}
				if n := f.hs.Claims() - claimsWedge; n != 1 {
					t.Errorf("heal made %d key claims, want 1", n)
				}
				f.healedBothWays()
				heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 10)
				if err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealHealed || heals[0].SessionID == "" || heals[0].Class != tc.class {
					t.Fatalf("ledger = %+v, %v", heals, err)
				}
				// MSC1719: the same device wedging again within the hour gets no second session.
				f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
				f.restartBridge()
				claims := f.hs.Claims()
				f.peerSends()
				f.deliverToBridge()
				if d := f.decision(); d.Action != unwedge.ActionLimited {
					t.Fatalf("second wedge within the hour: %+v, want limited", d)
				}
				if f.hs.Claims() != claims {
					t.Error("a limited heal claimed a key")
				}
			})
		}
	}
}

// TestNotWedges: replays, strangers and malformed events never make the bridge claim a key.
func TestNotWedges(t *testing.T) {
	f := newFixture(t)
	f.establish()
	claims := f.hs.Claims()

	// A replay of a message that was decrypted.
	f.peerSends()
	evt := f.hs.Inbox(f.bridge)[0]
	f.unwedger.HandleToDevice(f.ctx, evt)
	f.noDecision()
	replay := *evt
	f.unwedger.HandleToDevice(f.ctx, &replay)
	if d := f.decision(); d.Class != unwedge.ClassDuplicate || d.Action != unwedge.ActionIgnored {
		t.Errorf("replay: %+v", d)
	}

	// A message delivered late, after the peer moved on to a newer chain, is decrypted with a
	// skipped message key: not a peer restored from backup.
	f.bridgeSends()
	f.deliverToPeer()
	f.peerSends()
	late := f.hs.Inbox(f.bridge)[0]
	f.peerSends()
	f.deliverToBridge()
	f.bridgeSends()
	f.deliverToPeer()
	f.peerSends()
	f.deliverToBridge()
	f.unwedger.HandleToDevice(f.ctx, late)
	f.noDecision()

	malformed := []struct {
		name   string
		mutate func(c *event.EncryptedEventContent)
		class  unwedge.Class
	}{
		{"bad base64", func(c *event.EncryptedEventContent) { c.OlmCiphertext[f.bridgeKey()] = olmCT(0, "!!!") }, unwedge.ClassMalformed},
		{"empty ciphertext", func(c *event.EncryptedEventContent) { c.OlmCiphertext[f.bridgeKey()] = olmCT(1, "") }, unwedge.ClassMalformed},
		{"huge ciphertext", func(c *event.EncryptedEventContent) {
			c.OlmCiphertext[f.bridgeKey()] = olmCT(1, strings.Repeat("A", 300*1024))
		}, unwedge.ClassMalformed},
		{"unknown message type", func(c *event.EncryptedEventContent) { c.OlmCiphertext[f.bridgeKey()] = olmCT(7, "AAAA") }, unwedge.ClassMalformed},
		{"not for us", func(c *event.EncryptedEventContent) { delete(c.OlmCiphertext, f.bridgeKey()) }, unwedge.ClassNotForUs},
		{"megolm algorithm", func(c *event.EncryptedEventContent) { c.Algorithm = id.AlgorithmMegolmV1 }, unwedge.ClassUnsupportedAlgorithm},
		{"no sender key", func(c *event.EncryptedEventContent) { c.SenderKey = "" }, unwedge.ClassMalformed},
	}
	for _, tc := range malformed {
		t.Run(tc.name, func(t *testing.T) {
			f.peerSends()
			evt := f.hs.Inbox(f.bridge)[0]
			tc.mutate(evt.Content.AsEncrypted())
			f.unwedger.HandleToDevice(f.ctx, evt)
			if d := f.decision(); d.Class != tc.class || d.Action != unwedge.ActionIgnored {
				t.Errorf("decision = %+v, want %s ignored", d, tc.class)
			}
		})
	}
	t.Run("wrong content type", func(t *testing.T) {
		f.unwedger.HandleToDevice(f.ctx, &event.Event{Type: event.ToDeviceEncrypted, Sender: peerUser,
			Content: event.Content{Parsed: &event.MessageEventContent{Body: "hi"}}})
		if d := f.decision(); d.Class != unwedge.ClassMalformed {
			t.Errorf("decision = %+v", d)
		}
	})

	counts := f.unwedger.Counts()
	for count, want := range map[unwedge.Count]int64{
		{Class: unwedge.ClassDuplicate, Action: unwedge.ActionIgnored}:            1,
		{Class: unwedge.ClassMalformed, Action: unwedge.ActionIgnored}:            6,
		{Class: unwedge.ClassNotForUs, Action: unwedge.ActionIgnored}:             1,
		{Class: unwedge.ClassUnsupportedAlgorithm, Action: unwedge.ActionIgnored}: 1,
	} {
		if counts[count] != want {
			t.Errorf("count %v = %d, want %d (all: %v)", count, counts[count], want, counts)
		}
	}

	t.Run("identity key of no device of the sender", func(t *testing.T) {
		// A stranger's fresh session claims to come from alice: it fails to decrypt, but the key is
		// not one of alice's devices.
		stranger := f.newPeer("@mallory:example.org", "EVIL")
		stranger.SendDummy(f.bridge)
		evt := f.hs.Inbox(f.bridge)[0]
		evt.Sender = peerUser
		f.forgetOneTimeKeys()
		f.restartBridge()
		before := f.hs.Claims()
		f.unwedger.HandleToDevice(f.ctx, evt)
		if d := f.decision(); d.Class != unwedge.ClassUnknownDevice || d.Action != unwedge.ActionUnknownDevice {
			t.Errorf("decision = %+v", d)
		}
		if f.hs.Claims() != before {
			t.Error("claimed a key for an identity key that is no device of the sender")
		}
	})

	if f.hs.Claims() != claims+1 { // the stranger's own session
		t.Errorf("%d key claims by the bridge, want none", f.hs.Claims()-claims-1)
	}
}

// TestOutOfScope: a wedged device of a user outside the scope is not healed by unwedge, but gets
// what the stock bridge does: mautrix-go's own unwedging (one key claim, m.dummy over the new
// session), never nothing.
func TestOutOfScope(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.scope.allowed.Store(false)
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	before := f.hs.Claims()
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionOutOfScope || d.Class != unwedge.ClassNoSession {
		t.Errorf("decision = %+v, want no_session out_of_scope", d)
	}
	// mautrix-go's own unwedging runs in the background: its m.dummy reaches the peer. (Stop
	// cancels it, so stopping before the m.dummy went out would make it fail.)
	f.hs.AwaitInbox(f.peer, 10*time.Second)
	f.unwedger.Stop()
	if n := f.hs.Claims() - before; n != 1 {
		t.Errorf("%d key claims, want 1", n)
	}
	f.healedBothWays()
	if n := f.unwedger.Counts()[unwedge.Count{Class: unwedge.ClassNoSession, Action: unwedge.ActionOutOfScope}]; n != 1 {
		t.Errorf("out-of-scope count = %d", n)
	}
	if c, err := f.ledger.RecentHeals(f.ctx, peerUser, time.Now().Add(-time.Hour), time.Now()); err != nil || c.User != 0 {
		t.Errorf("ledger has %d heals of the user (%v): the stock unwedging is not unwedge's", c.User, err)
	}
}

// TestMachineCallback: the Unwedger takes over the machine's unwedging through mautrix-go's
// NeedsUnwedgeCallback, so an Olm event handed to the machine directly, past HandleToDevice, is
// healed by unwedge (one key claim, recorded in the ledger), not by the machine's own unwedging.
func TestMachineCallback(t *testing.T) {
	f := newFixture(t)
	f.establish()
	if f.bridge.Mach.NeedsUnwedgeCallback == nil {
		t.Fatal("the Unwedger did not set the machine's NeedsUnwedgeCallback")
	}
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	before := f.hs.Claims()
	f.peerSends()
	for _, evt := range f.hs.Inbox(f.bridge) {
		f.bridge.Mach.HandleToDeviceEvent(f.ctx, evt)
	}
	if d := f.decision(); d.Action != unwedge.ActionHealed || d.Class != unwedge.ClassFailed {
		t.Fatalf("decision = %+v, want failed-class wedge healed", d)
	}
	if n := f.hs.Claims() - before; n != 1 {
		t.Errorf("%d key claims, want 1", n)
	}
	if c, err := f.ledger.RecentHeals(f.ctx, peerUser, time.Now().Add(-time.Hour), time.Now()); err != nil || c.User != 1 {
		t.Errorf("ledger has %d heals (%v), want 1", c.User, err)
	}
	f.healedBothWays()
}

// TestUserCap: at most max_heals_per_user heals of one user's devices within the interval; then
// wedges are counted as capped, unwedge claims no key and leaves them to mautrix-go's own
// unwedging. A forced heal is neither counted nor refused.
func TestUserCap(t *testing.T) {
	f := newFixture(t)
	f.cfg.MaxHealsPerUser = 1
	f.restartBridge()
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("first heal: %+v", d)
	}
	f.healedBothWays()
	// The same user's second device wedges within the interval.
	second := f.newPeer(peerUser, "PEER2")
	second.SendDummy(f.bridge)
	f.unwedger.HandleToDevice(f.ctx, f.hs.Inbox(f.bridge)[0])
	f.noDecision()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2", string(bridgeDevice), second.Mach.OwnIdentity().IdentityKey)
	f.restartBridge()
	before := f.hs.Claims()
	second.SendDummy(f.bridge)
	f.unwedger.HandleToDevice(f.ctx, f.hs.Inbox(f.bridge)[0])
	if d := f.decision(); d.Action != unwedge.ActionCapped || d.UserID != peerUser {
		t.Fatalf("second device's wedge: %+v, want capped", d)
	}
	// Over the cap, unwedge claims nothing; mautrix-go's own unwedging, as on the stock bridge,
	// claims one key and sends its m.dummy (TestCappedWedgeLeftToStock).
	f.hs.AwaitInbox(second, 5*time.Second)
	if n := f.hs.Claims() - before; n != 1 {
		t.Errorf("%d key claims over the user's cap, want 1 (mautrix-go's own unwedging)", n)
	}
	if d := f.unwedger.Heal(f.ctx, f.bridge.Fetch(peerUser, "PEER2"), unwedge.ClassForced, "@admin:example.org"); d.Action != unwedge.ActionHealed {
		t.Errorf("forced heal over the cap: %s, want healed", d.Action)
	}
	f.decision()
}

// TestBurst: a burst of undecryptable messages from one device, handled by many goroutines and
// two Unwedgers on one database (two bridge replicas), creates exactly one session.
func TestBurst(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	for range 10 {
		f.peerSends()
	}
	events := f.hs.Inbox(f.bridge)
	second, err := unwedge.New(f.cfg, f.bridge.Mach, unwedge.Parts{Store: f.bridge.Wrapped, Ledger: f.ledger, Audience: f.scope,
		Observer: func(d unwedge.Decision) { f.decisions <- d }}, "replica-2", zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Stop()
	before := f.hs.Claims()
	done := make(chan struct{})
	for i, evt := range events {
		go func() {
			defer func() { done <- struct{}{} }()
			if i%2 == 0 {
				f.unwedger.HandleToDevice(f.ctx, evt)
			} else {
				second.HandleToDevice(f.ctx, evt)
			}
		}()
	}
	for range events {
		<-done
	}
	healed := 0
	for healed == 0 {
		if d := f.decision(); d.Action == unwedge.ActionHealed {
			healed++
		} else if d.Action != unwedge.ActionLimited {
			t.Fatalf("decision = %+v", d)
		}
	}
	f.unwedger.Stop()
	second.Stop()
	if n := f.hs.Claims() - before; n != 1 {
		t.Errorf("%d key claims for one wedged device, want 1", n)
	}
	n, err := f.ledger.CountCreated(f.ctx, peerUser, peerDevice, time.Now().Add(-time.Minute))
	if err != nil || n != 1 {
		t.Errorf("ledger counts %d sessions, %v", n, err)
	}
}

// TestTransientFailure: the homeserver turns the key claim away twice (503: no key was handed
// out, so the claim may be repeated); the heal retries and succeeds, and the hour is not burnt by
// the failures.
func TestTransientFailure(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	f.hs.FailClaims(2)
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("decision = %+v", d)
	}
	heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 1)
	if err != nil || len(heals) != 1 || heals[0].Attempts != 3 || heals[0].Outcome != unwedge.HealHealed {
		t.Fatalf("heal = %+v, %v; want healed on the third attempt", heals, err)
	}
	f.healedBothWays()
}

// TestHomeserverOutlastsRetries: the session was created but the homeserver stays unreachable
// for longer than the heal retries. The heal is not given up (that would leave the device wedged
// for the hour): it stays in progress without a lease, and ResumeHeals sends m.dummy over the same
// session once the homeserver answers; no second session, no second claim.
func TestHomeserverOutlastsRetries(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.cfg.MaxRetries = 2
	f.restartBridge()
	claims := f.hs.Claims()
	f.hs.FailSends(f.bridge, 1000)
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionDeferred || d.Err == nil {
		t.Fatalf("decision = %+v, want deferred with the send error", d)
	}
	heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 5)
	if err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealInProgress || heals[0].SessionID == "" || heals[0].Attempts != 2 {
		t.Fatalf("heals = %+v, %v; want one in progress with its session after 2 attempts", heals, err)
	}
	session := heals[0].SessionID

	// While it waits, another failure from the device makes no new session.
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionLimited {
		t.Errorf("second failure while deferred: %+v, want limited", d)
	}
	// Still unreachable on the next rounds: still in progress, and not counted again (the heal
	// was counted as deferred once).
	for range 2 {
		f.unwedger.ResumeHeals(f.ctx)
		f.noDecision()
	}
	if heals, err = f.ledger.Heals(f.ctx, peerUser, peerDevice, 5); err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealInProgress || heals[0].Attempts != 6 {
		t.Fatalf("heals = %+v, %v; want one in progress after 2+2+2 attempts", heals, err)
	}
	deferred := int64(0)
	for count, n := range f.unwedger.Counts() {
		if count.Action == unwedge.ActionDeferred {
			deferred += n
		}
	}
	if deferred != 1 {
		t.Errorf("deferred counted %d times, want once", deferred)
	}
	// The device is no longer in the bridge's store and cannot be fetched either: the round
	// cannot look the session up, which is no reason to give the heal up.
	f.exec("DELETE FROM crypto_device WHERE user_id=$1", string(peerUser))
	f.hs.FailQueries(1000)
	f.unwedger.ResumeHeals(f.ctx)
	f.noDecision()
	if heals, err = f.ledger.Heals(f.ctx, peerUser, peerDevice, 5); err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealInProgress ||
		!strings.Contains(heals[0].Error, "failed to fetch the device's keys") {
		t.Fatalf("heals = %+v, %v; want one in progress that failed to fetch its device", heals, err)
	}
	f.hs.FailQueries(0)
	f.hs.FailSends(f.bridge, 0)
	f.unwedger.ResumeHeals(f.ctx)
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("resume after the homeserver returned: %+v, want healed", d)
	}
	heals, _ = f.ledger.Heals(f.ctx, peerUser, peerDevice, 5)
	if len(heals) != 1 || heals[0].Outcome != unwedge.HealHealed || heals[0].SessionID != session {
		t.Fatalf("heals = %+v, want the one heal healed over %s", heals, session)
	}
	if n := f.hs.Claims() - claims; n != 1 {
		t.Errorf("%d key claims, want 1", n)
	}
	f.healedBothWays()
}

// TestPermanentFailure: the device has no one-time keys left. Nothing is sent over the broken
// session, the failure is recorded, and the device is not retried within the hour.
func TestPermanentFailure(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	f.hs.ClaimAllKeys(f.peer)
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionFailed {
		t.Fatalf("decision = %+v", d)
	}
	heals, _ := f.ledger.Heals(f.ctx, peerUser, peerDevice, 1)
	if len(heals) != 1 || heals[0].Outcome != unwedge.HealFailedPermanent || heals[0].Error == "" {
		t.Fatalf("heal = %+v", heals)
	}
	if got := f.hs.Inbox(f.peer); len(got) != 0 {
		t.Errorf("the bridge sent %d events to the peer without a new session", len(got))
	}
	before := f.hs.Claims()
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionLimited || f.hs.Claims() != before {
		t.Errorf("retry within the hour: %+v, %d claims", d, f.hs.Claims()-before)
	}
}

// TestSessionChoice: MSC1719 says to encrypt with the session that last received and
// successfully decrypted a message. When the peer unwedges towards the bridge (a new session
// from its side), the bridge must switch to the peer's new session.
func TestSessionChoice(t *testing.T) {
	f := newFixture(t)
	f.establish()
	old, err := f.bridge.SQL.GetLatestSession(f.ctx, f.peerKey())
	if err != nil || old == nil {
		t.Fatal(err)
	}
	// The peer loses its session and opens a new one: its m.dummy arrives as a prekey message.
	f.peerOpensNewSession()
	latest, err := f.bridge.Mach.CryptoStore.GetLatestSession(f.ctx, f.peerKey())
	if err != nil || latest == nil || latest.ID() == old.ID() {
		t.Fatalf("bridge still encrypts with %v (old %s), err %v", latest, old.ID(), err)
	}
	// And the peer, which only has its new session, can read what the bridge sends.
	f.bridgeSends()
	events := f.hs.Inbox(f.peer)
	if len(events) != 1 {
		t.Fatalf("%d events for the peer", len(events))
	}
	if decrypted := f.peer.Mach.HandleEncryptedEvent(f.ctx, events[0]); decrypted != nil {
		t.Fatalf("unexpected payload %s", decrypted.Type.Type)
	}
	if n := f.sessions(f.peer, f.bridgeKey()); n != 1 {
		t.Errorf("the peer has %d sessions with the bridge, want its one new session", n)
	}
}

// olmCT is one recipient's entry of an Olm event's ciphertext map.
func olmCT(msgType id.OlmMsgType, body string) (ct struct {
	Body string        `json:"body"`
	Type id.OlmMsgType `json:"type"`
}) {
	ct.Body, ct.Type = body, msgType
	return ct
}

// flipMACChar changes a character inside the message's MAC (its last 8 bytes). Not the last
// character: in unpadded base64 some of its bits may be dropped when decoding.
func flipMACChar(s string) string {
	i := len(s) - 4
	repl := byte('A')
	if s[i] == 'A' {
		repl = 'B'
	}
	return s[:i] + string(repl) + s[i+1:]
}

func (f *fixture) exec(query string, args ...any) {
	f.t.Helper()
	if _, err := f.db.Exec(f.ctx, query, args...); err != nil {
		f.t.Fatal(err)
	}
}

type sessionRow struct {
	ID, Key string
	Pickle  []byte
}

func (f *fixture) backupSessions(p *cryptotest.Device) []sessionRow {
	rows, err := f.db.Query(f.ctx, "SELECT session_id, sender_key, session FROM crypto_olm_session WHERE account_id=$1", string(p.DeviceID))
	if err != nil {
		f.t.Fatal(err)
	}
	defer rows.Close()
	var out []sessionRow
	for rows.Next() {
		var r sessionRow
		if err = rows.Scan(&r.ID, &r.Key, &r.Pickle); err != nil {
			f.t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func (f *fixture) restoreSessions(p *cryptotest.Device, backup []sessionRow) {
	for _, r := range backup {
		f.exec("UPDATE crypto_olm_session SET session=$1 WHERE account_id=$2 AND session_id=$3", r.Pickle, string(p.DeviceID), r.ID)
	}
}

// forgetOneTimeKeys drops the private halves of the bridge's published one-time keys.
func (f *fixture) forgetOneTimeKeys() {
	var pickled []byte
	if err := f.db.QueryRow(f.ctx, "SELECT account FROM crypto_account WHERE account_id=$1", string(bridgeDevice)).Scan(&pickled); err != nil {
		f.t.Fatal(err)
	}
	acc, err := account.AccountFromPickled(pickled, []byte(cryptotest.PickleKey))
	if err != nil {
		f.t.Fatal(err)
	}
	acc.OTKeys = nil
	if pickled, err = acc.Pickle([]byte(cryptotest.PickleKey)); err != nil {
		f.t.Fatal(err)
	}
	f.exec("UPDATE crypto_account SET account=$1 WHERE account_id=$2", pickled, string(bridgeDevice))
	f.restartBridge()
}

// TestDeferredHealCountsOnce: a wedge whose heal waits for the homeserver and is finished later
// by ResumeHeals is one Olm failure, not two: the later decision is Resumed. Every line the
// Unwedger writes about the device carries its user_id and identity_key.
func TestDeferredHealCountsOnce(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.cfg.MaxRetries = 1
	var logs lockedBuffer
	f.unwedgerLog = &logs
	f.restartBridge()
	// Decisions log through the context's logger, as they do under the bridge's own context.
	ctx := zerolog.New(&logs).Level(zerolog.DebugLevel).With().Str("via", "context").Logger().WithContext(f.ctx)
	f.hs.FailSends(f.bridge, 1000)
	f.peerSends()
	for _, evt := range f.hs.Inbox(f.bridge) {
		f.unwedger.HandleToDevice(ctx, evt)
	}
	if d := f.decision(); d.Action != unwedge.ActionDeferred || d.Resumed {
		t.Fatalf("decision = %+v, want deferred, not resumed", d)
	}
	// A round that still cannot send is logged at debug level and decides nothing.
	f.unwedger.ResumeHeals(ctx)
	f.noDecision()
	f.hs.FailSends(f.bridge, 0)
	f.unwedger.ResumeHeals(ctx)
	if d := f.decision(); d.Action != unwedge.ActionHealed || !d.Resumed {
		t.Fatalf("decision = %+v, want healed, resumed", d)
	}
	var failures int64
	for c, n := range f.unwedger.Counts() {
		if !c.Resumed && c.Class != unwedge.ClassForced {
			failures += n
		}
	}
	if failures != 1 {
		t.Errorf("%d Olm failures counted for one wedge (counts %v)", failures, f.unwedger.Counts())
	}
	if n := f.unwedger.Counts()[unwedge.Count{Class: unwedge.ClassNoSession, Action: unwedge.ActionHealed, Resumed: true}]; n != 1 {
		t.Errorf("resumed heals counted %d times, want 1 (counts %v)", n, f.unwedger.Counts())
	}
	f.healedBothWays()

	lines := 0
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var fields map[string]any
		if err := json.Unmarshal([]byte(line), &fields); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if _, ok := fields["user_id"]; !ok {
			continue
		}
		lines++
		if key, _ := fields["identity_key"].(string); key != string(f.peerKey()) {
			t.Errorf("log line about %v without the device's identity_key: %s", fields["user_id"], line)
		}
	}
	for _, want := range []string{`"unwedge":"deferred"`, `"message":"Heal still deferred"`, `"unwedge":"healed"`, `"resumed":true`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s:\n%s", want, logs.String())
		}
	}
	if lines < 3 {
		t.Errorf("only %d log lines about the device:\n%s", lines, logs.String())
	}
}

// lockedBuffer is a log writer for goroutines.
type lockedBuffer struct {
	lock sync.Mutex
	buf  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.lock.Lock()
	defer b.lock.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.lock.Lock()
	defer b.lock.Unlock()
	return b.buf.String()
}
