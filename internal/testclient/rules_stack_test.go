package testclient_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// rulesPair is alice, who follows the rules under test, and bob (mautrix-go's rules) in an
// encrypted room that alice created. blank is a snapshot of bob's crypto state from before any
// Olm session or room key reached him: restoring it makes bob lose alice's keys, the way a device
// restored from an old backup does, without breaking the Olm session alice has with him (alice
// has not heard from bob on it, so she still sends pre-key messages that the restored bob can
// open with the one-time key he still holds).
type rulesPair struct {
	env        *testenv.Env
	log        zerolog.Logger
	alice, bob *testclient.Client
	room       id.RoomID
	blank      string
}

func newRulesPair(t *testing.T, ctx context.Context, rules testclient.Rules) *rulesPair {
	t.Helper()
	p := &rulesPair{env: testenv.Require(t), log: testLog(t)}
	p.alice = startClient(t, ctx, "alice", testclient.Options{
		HomeserverURL: p.env.HomeserverURL,
		Username:      testenv.UniqueName("alice"),
		Password:      "correct horse battery",
		DataDir:       t.TempDir(),
		Rules:         rules,
		Log:           p.log.With().Str("client", "alice").Logger(),
	})
	if got := p.alice.Rules(); got != rules {
		t.Fatalf("alice follows %s, want %s", got, rules)
	}
	p.bob = newClient(t, ctx, p.env, "bob", p.log)
	var err error
	if p.room, err = p.alice.CreateEncryptedRoom(ctx, p.bob.UserID()); err != nil {
		t.Fatal(err)
	}
	if err = p.bob.WaitForJoin(ctx, p.room); err != nil {
		t.Fatal(err)
	}
	p.blank = filepath.Join(t.TempDir(), "bob-blank.db")
	if err = p.bob.Snapshot(ctx, p.blank); err != nil {
		t.Fatal(err)
	}
	return p
}

// outsiderRequest makes a new user, who is not in the room, ask alice for the session: alice
// never shared it with any of its devices. (A new device of bob's would not do: mautrix-go, under
// every rule, drops the room's outbound session when a member's device list changes.)
func (p *rulesPair) outsiderRequest(t *testing.T, ctx context.Context, sessionID id.SessionID) *testclient.Client {
	t.Helper()
	carol := newClient(t, ctx, p.env, "carol", p.log)
	err := carol.RequestRoomKey(ctx, &event.Event{
		ID:     "$unseen",
		RoomID: p.room,
		Sender: p.alice.UserID(),
		Type:   event.EventEncrypted,
		Content: event.Content{Parsed: &event.EncryptedEventContent{
			Algorithm: id.AlgorithmMegolmV1,
			SenderKey: p.alice.IdentityKey(),
			SessionID: sessionID,
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return carol
}

// requestFrom matches a key request of the device for the session.
func requestFrom(c *testclient.Client, sessionID id.SessionID) func(testclient.KeyRequest) bool {
	return func(req testclient.KeyRequest) bool {
		return req.From == c.UserID() && req.Device == c.DeviceID() && req.SessionID == sessionID
	}
}

// encryptedEvent fetches an event from the homeserver as it was sent, encrypted.
func encryptedEvent(t *testing.T, ctx context.Context, c *testclient.Client, roomID id.RoomID, eventID id.EventID) *event.Event {
	t.Helper()
	evt, err := c.Mautrix().GetEvent(ctx, roomID, eventID)
	if err != nil {
		t.Fatal(err)
	}
	if err = evt.Content.ParseRaw(evt.Type); err != nil {
		t.Fatal(err)
	}
	evt.RoomID = roomID
	return evt
}

// roomKeyIndex returns the first index of the room key the client holds, or false if it has none.
func roomKeyIndex(t *testing.T, ctx context.Context, c *testclient.Client, roomID id.RoomID, sessionID id.SessionID) (uint32, bool) {
	t.Helper()
	igs, err := c.Machine().CryptoStore.GetGroupSession(ctx, roomID, sessionID)
	if errors.Is(err, crypto.ErrGroupSessionWithheld) {
		return 0, false
	} else if err != nil {
		t.Fatal(err)
	}
	if igs == nil {
		return 0, false
	}
	return igs.Internal.FirstKnownIndex(), true
}

// waitUntil checks cond every 50 ms until it holds.
func waitUntil(ctx context.Context, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// Bob, restored from a backup, lost alice's room keys and asks her for a rotated-away session and
// for the current one; then a device she never shared the current one with asks for it.
func TestKeyRequestRules(t *testing.T) {
	cases := []struct {
		rules testclient.Rules
		// What alice decides on bob's request for the rotated-away session, for the current
		// one, and on an outsider's request for the current one.
		rotated, current, outsider testclient.KeyShareDecision
	}{
		// mautrix-go shares any of its sessions with a device it shared it with, from index 0.
		{testclient.RulesMautrix, testclient.KeyShareAccepted, testclient.KeyShareAccepted, testclient.KeyShareRejected},
		// Element Web shares only the current session, with the devices it shared it with.
		{testclient.RulesElementWeb, testclient.KeyShareMissingOutboundSession, testclient.KeyShareAccepted, testclient.KeyShareOutboundSessionNotShared},
		// Element X never answers.
		{testclient.RulesElementX, testclient.KeyShareForwardingDisabled, testclient.KeyShareForwardingDisabled, testclient.KeyShareForwardingDisabled},
	}
	for _, tc := range cases {
		t.Run(tc.rules.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			p := newRulesPair(t, ctx, tc.rules)
			alice, bob, room := p.alice, p.bob, p.room

			oldEvt, _ := exchange(t, ctx, alice, bob, room, "old session")
			rotated := bob.MegolmSessionID(oldEvt)
			if err := alice.RotateRoomKey(ctx, room); err != nil {
				t.Fatal(err)
			}
			firstEvt, _ := exchange(t, ctx, alice, bob, room, "current session")
			current := bob.MegolmSessionID(firstEvt)
			if err := bob.Restore(ctx, p.blank); err != nil {
				t.Fatal(err)
			}
			if _, ok := roomKeyIndex(t, ctx, bob, room, current); ok {
				t.Fatal("bob kept the current room key through the restore")
			}
			lateID, err := alice.SendText(ctx, room, "current session, after the restore")
			if err != nil {
				t.Fatal(err)
			}
			late, decrypted, err := bob.WaitForEvent(ctx, room, lateID)
			if err != nil {
				t.Fatal(err)
			} else if decrypted {
				t.Fatal("bob decrypted a message whose room key the restore removed")
			}

			// The rotated-away session: bob's history still shows the message decrypted, so
			// the request is made from the event as the homeserver has it.
			if err = bob.RequestRoomKey(ctx, encryptedEvent(t, ctx, bob, room, oldEvt)); err != nil {
				t.Fatal(err)
			}
			req, err := alice.WaitForKeyRequest(ctx, requestFrom(bob, rotated))
			if err != nil {
				t.Fatal(err)
			} else if req.Decision != tc.rotated || req.Err != nil {
				t.Errorf("alice's decision on the rotated-away session: %s (err %v), want %s", req.Decision, req.Err, tc.rotated)
			}
			if req.Decision == testclient.KeyShareAccepted {
				var index uint32
				err = waitUntil(ctx, func() bool {
					var ok bool
					index, ok = roomKeyIndex(t, ctx, bob, room, rotated)
					return ok
				})
				if err != nil || index != 0 {
					t.Errorf("bob got the rotated-away session from index %d (err %v), want 0", index, err)
				}
			}

			// The current session, shared with bob at index 0.
			if err = bob.RequestRoomKey(ctx, late); err != nil {
				t.Fatal(err)
			}
			if req, err = alice.WaitForKeyRequest(ctx, requestFrom(bob, current)); err != nil {
				t.Fatal(err)
			} else if req.Decision != tc.current || req.Err != nil {
				t.Errorf("alice's decision on the current session: %s (err %v), want %s", req.Decision, req.Err, tc.current)
			}
			if req.Decision == testclient.KeyShareAccepted {
				if _, err = bob.WaitForMessage(ctx, room, func(e *event.Event) bool { return e.ID == lateID }); err != nil {
					t.Fatal(err)
				}
				if index, _ := roomKeyIndex(t, ctx, bob, room, current); index != 0 || req.Index != 0 {
					t.Errorf("bob got the current session from index %d (alice says %d), want 0", index, req.Index)
				}
			} else if _, ok := roomKeyIndex(t, ctx, bob, room, current); ok {
				t.Error("bob got the current session although alice refused")
			}

			// A device that alice never shared the current session with.
			carol := p.outsiderRequest(t, ctx, current)
			if req, err = alice.WaitForKeyRequest(ctx, requestFrom(carol, current)); err != nil {
				t.Fatal(err)
			} else if req.Decision != tc.outsider || req.Err != nil {
				t.Errorf("alice's decision on an outsider's device: %s (err %v), want %s", req.Decision, req.Err, tc.outsider)
			}
		})
	}
}

// Bob, restored from a backup, lost alice's room key and sends her m.dummy over a new Olm session
// (as the bridge does when it heals). Under the Element rules alice's next message shares her
// current session with bob again, from that message on; then bob loses it once more and asks.
func TestReshareAfterNewOlmSession(t *testing.T) {
	cases := []struct {
		rules testclient.Rules
		// reshares: alice's next message brings bob the current session again.
		reshares bool
		// What alice decides when bob then asks for the session, and from which index.
		request testclient.KeyShareDecision
		index   uint32
	}{
		{testclient.RulesMautrix, false, testclient.KeyShareAccepted, 0},
		// From index 2, where alice shared the session again, not from 0.
		{testclient.RulesElementWeb, true, testclient.KeyShareAccepted, 2},
		{testclient.RulesElementX, true, testclient.KeyShareForwardingDisabled, 0},
	}
	for _, tc := range cases {
		t.Run(tc.rules.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			p := newRulesPair(t, ctx, tc.rules)
			alice, bob, room := p.alice, p.bob, p.room

			zero, _ := exchange(t, ctx, alice, bob, room, "index 0")
			exchange(t, ctx, alice, bob, room, "index 1")
			session := bob.MegolmSessionID(zero)
			if err := bob.Restore(ctx, p.blank); err != nil {
				t.Fatal(err)
			}

			// Bob has no Olm session with alice any more: m.dummy makes one, with a pre-key
			// message. Wait until alice has it.
			aliceDevice, err := bob.Machine().GetOrFetchDevice(ctx, alice.UserID(), alice.DeviceID())
			if err != nil {
				t.Fatal(err)
			}
			if err = bob.Machine().SendEncryptedToDevice(ctx, aliceDevice, event.ToDeviceDummy, event.Content{}); err != nil {
				t.Fatal(err)
			}
			olmSession, err := bob.Machine().CryptoStore.GetLatestSession(ctx, alice.IdentityKey())
			if err != nil || olmSession == nil {
				t.Fatalf("bob has no Olm session with alice after m.dummy (err %v)", err)
			}
			err = waitUntil(ctx, func() bool {
				sessions, err := alice.Machine().CryptoStore.GetSessions(ctx, bob.IdentityKey())
				for _, s := range sessions {
					if err == nil && s.ID() == olmSession.ID() {
						return true
					}
				}
				return false
			})
			if err != nil {
				t.Fatalf("alice did not get bob's new Olm session: %v", err)
			}
			// Alice noted the session under every rule: the lab times heals by it.
			var newSession time.Time
			for _, s := range alice.NewOlmSessions() {
				if s.SenderKey == bob.IdentityKey() {
					newSession = s.At
				}
			}
			if newSession.IsZero() {
				t.Fatalf("alice's NewOlmSessions %+v has none from bob", alice.NewOlmSessions())
			}
			// Bob as he is now: the new Olm session, no room key.
			healed := filepath.Join(t.TempDir(), "bob-healed.db")
			if err = bob.Snapshot(ctx, healed); err != nil {
				t.Fatal(err)
			}

			twoID, err := alice.SendText(ctx, room, "index 2")
			if err != nil {
				t.Fatal(err)
			}
			_, decrypted, err := bob.WaitForEvent(ctx, room, twoID)
			if err != nil {
				t.Fatal(err)
			}
			checkKeyTraffic(t, alice, bob, session, zero, twoID, newSession, tc.reshares)
			index, ok := roomKeyIndex(t, ctx, bob, room, session)
			switch {
			case tc.reshares && (!decrypted || !ok || index != 2):
				t.Fatalf("after alice's next message bob decrypted it: %t, has the session: %t from index %d; want true, true, 2", decrypted, ok, index)
			case !tc.reshares && (decrypted || ok):
				t.Fatalf("alice shared her session again (bob decrypted her next message: %t, has the session: %t)", decrypted, ok)
			}
			if tc.reshares {
				// Messages before the index stay undecryptable.
				if _, err = bob.Machine().DecryptMegolmEvent(ctx, encryptedEvent(t, ctx, bob, room, zero)); err == nil {
					t.Error("bob decrypted index 0 with the session shared again from index 2")
				}
			}

			// Bob loses the session again (keeping the new Olm session) and asks for it.
			if err = bob.Restore(ctx, healed); err != nil {
				t.Fatal(err)
			}
			threeID, err := alice.SendText(ctx, room, "index 3")
			if err != nil {
				t.Fatal(err)
			}
			three, decrypted, err := bob.WaitForEvent(ctx, room, threeID)
			if err != nil {
				t.Fatal(err)
			} else if decrypted {
				t.Fatal("bob decrypted a message whose room key the restore removed")
			}
			if err = bob.RequestRoomKey(ctx, three); err != nil {
				t.Fatal(err)
			}
			req, err := alice.WaitForKeyRequest(ctx, requestFrom(bob, session))
			if err != nil {
				t.Fatal(err)
			} else if req.Decision != tc.request || req.Err != nil {
				t.Fatalf("alice's decision: %s (err %v), want %s", req.Decision, req.Err, tc.request)
			}
			if req.Decision != testclient.KeyShareAccepted {
				return
			}
			if _, err = bob.WaitForMessage(ctx, room, func(e *event.Event) bool { return e.ID == threeID }); err != nil {
				t.Fatal(err)
			}
			if index, _ = roomKeyIndex(t, ctx, bob, room, session); index != tc.index || req.Index != tc.index {
				t.Errorf("bob got the session from index %d (alice says %d), want %d", index, req.Index, tc.index)
			}
			copies := copiesTo(alice, bob, session, testclient.RoomKeyForwarded)
			if len(copies) != 1 || copies[0].Index != tc.index {
				t.Errorf("alice's forwarded copies of %s to bob: %+v, want one from index %d", session, copies, tc.index)
			}
		})
	}
}

// checkKeyTraffic checks what alice recorded of her key traffic with bob: her messages at index 0
// and 2 of the session, one copy of it shared with bob from index 0 before his new Olm session,
// and, when she shares it again, one more from index 2, begun after that session.
func checkKeyTraffic(t *testing.T, alice, bob *testclient.Client, session id.SessionID, zero, two id.EventID, newSession time.Time, reshares bool) {
	t.Helper()
	for evtID, want := range map[id.EventID]uint32{zero: 0, two: 2} {
		if enc, ok := alice.Sent(evtID); !ok || enc.SessionID != session || enc.Index != want {
			t.Errorf("alice.Sent(%s) = %+v, %t; want session %s index %d", evtID, enc, ok, session, want)
		}
	}
	shared := copiesTo(alice, bob, session, testclient.RoomKeyShared)
	if len(shared) != 1 || shared[0].Index != 0 || !shared[0].At.Before(newSession) {
		t.Errorf("alice's shared copies of %s to bob: %+v, want one from index 0 before %s", session, shared, newSession)
	}
	reshared := copiesTo(alice, bob, session, testclient.RoomKeyReshared)
	switch {
	case reshares && (len(reshared) != 1 || reshared[0].Index != 2 || reshared[0].At.Before(newSession)):
		t.Errorf("alice's copies of %s shared again with bob: %+v, want one from index 2 after %s", session, reshared, newSession)
	case !reshares && len(reshared) != 0:
		t.Errorf("alice shared %s again with bob: %+v", session, reshared)
	}
}

// copiesTo returns the copies of a session of the kind that one client sent to another's device.
func copiesTo(from, to *testclient.Client, session id.SessionID, kind testclient.RoomKeyCopyKind) []testclient.RoomKeyCopy {
	var out []testclient.RoomKeyCopy
	for _, c := range from.RoomKeysSent() {
		if c.SessionID == session && c.Kind == kind && c.UserID == to.UserID() && c.DeviceID == to.DeviceID() {
			out = append(out, c)
		}
	}
	return out
}

// Alice's new device asks her first device for her room keys, unverified and then verified.
func TestKeyRequestOwnDevice(t *testing.T) {
	cases := []struct {
		rules                testclient.Rules
		unverified, verified testclient.KeyShareDecision
	}{
		// mautrix-go answers its own user's devices from cross-signed (TOFU) trust on.
		{testclient.RulesMautrix, testclient.KeyShareRejected, testclient.KeyShareAccepted},
		// matrix-rust-sdk answers its own user's verified devices for any session, and treats
		// unverified ones like other users' devices.
		{testclient.RulesElementWeb, testclient.KeyShareUntrustedDevice, testclient.KeyShareAccepted},
		{testclient.RulesElementX, testclient.KeyShareForwardingDisabled, testclient.KeyShareForwardingDisabled},
	}
	for _, tc := range cases {
		t.Run(tc.rules.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			env := testenv.Require(t)
			log := testLog(t)
			opts := testclient.Options{
				HomeserverURL: env.HomeserverURL,
				Username:      testenv.UniqueName("alice"),
				Password:      "correct horse battery",
				DataDir:       t.TempDir(),
				Rules:         tc.rules,
				Log:           log.With().Str("client", "alice").Logger(),
			}
			alice := startClient(t, ctx, "alice", opts)
			room, err := alice.CreateEncryptedRoom(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var sent []id.EventID
			for _, text := range []string{"first session", "second session"} {
				if err = alice.RotateRoomKey(ctx, room); err != nil {
					t.Fatal(err)
				}
				evtID, err := alice.SendText(ctx, room, text)
				if err != nil {
					t.Fatal(err)
				}
				sent = append(sent, evtID)
			}

			// A new device: mautrix-go drops alice's outbound session when it sees it, so
			// neither session is the current one.
			opts.DataDir, opts.Rules = t.TempDir(), testclient.RulesMautrix
			opts.Log = log.With().Str("client", "alice2").Logger()
			alice2 := startClient(t, ctx, "alice2", opts)
			for i, evtID := range sent {
				evt, err := alice2.WaitForUndecryptable(ctx, room, func(e *event.Event) bool { return e.ID == evtID })
				if err != nil {
					t.Fatal(err)
				}
				if i == 1 {
					// Alice verifies her new device before it asks for the second session.
					device, err := alice.Machine().GetOrFetchDevice(ctx, alice.UserID(), alice2.DeviceID())
					if err != nil {
						t.Fatal(err)
					}
					device.Trust = id.TrustStateVerified
					if err = alice.Machine().CryptoStore.PutDevice(ctx, alice.UserID(), device); err != nil {
						t.Fatal(err)
					}
				}
				if err = alice2.RequestRoomKey(ctx, evt); err != nil {
					t.Fatal(err)
				}
				want := []testclient.KeyShareDecision{tc.unverified, tc.verified}[i]
				req, err := alice.WaitForKeyRequest(ctx, requestFrom(alice2, alice2.MegolmSessionID(evtID)))
				if err != nil {
					t.Fatal(err)
				} else if req.Decision != want || req.Err != nil {
					t.Errorf("alice's decision on session %d: %s (err %v), want %s", i+1, req.Decision, req.Err, want)
				}
				if req.Decision == testclient.KeyShareAccepted {
					if _, err = alice2.WaitForMessage(ctx, room, func(e *event.Event) bool { return e.ID == evtID }); err != nil {
						t.Fatal(err)
					}
				}
			}
		})
	}
}
