package bridge

import (
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/cryptotest"
)

// session is a well-formed Megolm session ID for a name.
func session(name string) id.SessionID {
	sum := sha256.Sum256([]byte(name))
	return id.SessionID(base64.RawStdEncoding.EncodeToString(sum[:]))
}

// megolmEvent is a room event of sender in the portal, encrypted with a Megolm session the bridge
// does not have; the event names senderKey as its sender's key.
func megolmEvent(n int, sender id.UserID, senderKey id.SenderKey, sessionID id.SessionID) *event.Event {
	return &event.Event{
		ID: id.EventID(fmt.Sprintf("$live%d", n)), RoomID: cmdPortal, Sender: sender, Type: event.EventEncrypted,
		Timestamp: time.Now().UnixMilli(),
		Content: event.Content{Parsed: &event.EncryptedEventContent{
			Algorithm: id.AlgorithmMegolmV1, SenderKey: senderKey, SessionID: sessionID,
			MegolmCiphertext: []byte("Aw" + strings.Repeat("A", 198)),
		}},
	}
}

// receive does what bridgev2 does with an event it received live: decrypt it and, lacking its
// session, wait for that.
func (f *commandFixture) receive(evt *event.Event, wait time.Duration) {
	f.t.Helper()
	if _, err := f.h.Decrypt(f.ctx, evt); !errors.Is(err, crypto.ErrNoSessionFound) {
		f.t.Fatalf("decrypt %s: %v, want no session", evt.ID, err)
	}
	content := evt.Content.AsEncrypted()
	f.h.WaitForSession(f.ctx, evt.RoomID, content.SenderKey, content.SessionID, wait)
}

// TestOnlyLiveEventsRecorded: an undecryptable event is recorded for recovery only when bridgev2
// waits for its session, which it does for events it received live from users allowed to send,
// not for events it fetched later (ASIntent.GetEvent, for history and replies, also decrypts).
// Security finding 2: "only the live event path records".
func TestOnlyLiveEventsRecorded(t *testing.T) {
	f := newCommandFixture(t)
	fetched := megolmEvent(1, cmdAlice, f.phone.IdentityKey, session("fetched"))
	if _, err := f.h.Decrypt(f.ctx, fetched); !errors.Is(err, crypto.ErrNoSessionFound) {
		t.Fatalf("decrypt: %v, want no session", err)
	}
	live := megolmEvent(2, cmdAlice, f.phone.IdentityKey, session("live"))
	f.receive(live, time.Millisecond)
	// bridgev2 waits a second time (its longer wait): the event is not recorded twice.
	f.h.WaitForSession(f.ctx, live.RoomID, f.phone.IdentityKey, session("live"), time.Millisecond)
	list, err := f.udb.Pending.List(f.ctx, "", 10)
	if err != nil || len(list) != 1 || list[0].EventID != live.ID {
		t.Fatalf("pending = %+v, %v; want only the live event", list, err)
	}
}

// TestKeyRequestsFollowSender: a key request goes to a healed device only for sessions its own
// user's events named. Another user who writes that device's key into their events, with a session
// of their choosing, gets no request sent to it (security finding 5): neither right after the
// heal, nor by a heal while bridgev2 waits.
func TestKeyRequestsFollowSender(t *testing.T) {
	f := newCommandFixture(t)
	phoneKey := f.phone.IdentityKey
	sent := func(name string) bool {
		return slices.Contains(f.sentKeyRequests(), cryptotest.KeyRequest{To: cmdAlice, Device: "PHONE", SessionID: session(name)})
	}
	waitSent := func(name string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); !sent(name); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no key request for %s to alice's PHONE; sent %+v", name, f.sentKeyRequests())
			}
		}
	}

	// Just after a heal of alice's PHONE.
	f.h.recovery.DeviceHealed(f.ctx, f.phone)
	f.receive(megolmEvent(1, cmdBob, phoneKey, session("bobs-choice")), time.Millisecond)
	f.receive(megolmEvent(2, cmdAlice, phoneKey, session("alices")), time.Millisecond)
	waitSent("alices")

	// A heal while bridgev2 waits for both (a restarted bridge: no heal in memory). The heal is
	// told again until alice's key is requested: bridgev2's waits may start after the first.
	f.restart()
	done := make(chan struct{}, 2)
	for i, evt := range []*event.Event{megolmEvent(3, cmdBob, phoneKey, session("bobs-second")), megolmEvent(4, cmdAlice, phoneKey, session("alices-second"))} {
		go func() {
			defer func() { done <- struct{}{} }()
			f.receive(evt, time.Duration(i+1)*time.Second)
		}()
	}
	for deadline := time.Now().Add(5 * time.Second); !sent("alices-second"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no key request for alices-second to alice's PHONE; sent %+v", f.sentKeyRequests())
		}
		f.h.recovery.DeviceHealed(f.ctx, f.phone)
	}
	<-done
	<-done
	// Requests started with the ones above would have been sent by now.
	time.Sleep(100 * time.Millisecond)
	for _, req := range f.sentKeyRequests() {
		if req.SessionID == session("bobs-choice") || req.SessionID == session("bobs-second") {
			t.Errorf("key request for bob's session %s went to %s's %s", req.SessionID, req.To, req.Device)
		}
	}
}
