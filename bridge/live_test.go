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

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
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
	f.h.recovery = unwedge.NewRecovery(unwedge.DefaultConfig().Recovery, f.mach, f.udb.Pending, nil, f.h.unwedger.Healing, "test", zerolog.Nop())
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
		return slices.Contains(f.sentKeyRequests(), keyRequest{cmdAlice, "PHONE", session(name)})
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
	f.h.requestWaitingKeys(f.ctx, f.phone)
	f.receive(megolmEvent(1, cmdBob, phoneKey, session("bobs-choice")), time.Millisecond)
	f.receive(megolmEvent(2, cmdAlice, phoneKey, session("alices")), time.Millisecond)
	waitSent("alices")

	// A heal while bridgev2 waits for both.
	done := make(chan struct{}, 2)
	for i, evt := range []*event.Event{megolmEvent(3, cmdBob, phoneKey, session("bobs-second")), megolmEvent(4, cmdAlice, phoneKey, session("alices-second"))} {
		go func() {
			defer func() { done <- struct{}{} }()
			f.receive(evt, time.Duration(i+1)*time.Second)
		}()
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		f.h.waitingLock.Lock()
		waiting := len(f.h.waiting[phoneKey])
		f.h.waitingLock.Unlock()
		if waiting == 2 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("bridgev2 waits for %d sessions, want 2", waiting)
		}
	}
	f.h.requestWaitingKeys(f.ctx, f.phone)
	waitSent("alices-second")
	<-done
	<-done
	// Requests started with the ones above would have been sent by now.
	time.Sleep(100 * time.Millisecond)
	for _, req := range f.sentKeyRequests() {
		if req.sessionID == session("bobs-choice") || req.sessionID == session("bobs-second") {
			t.Errorf("key request for bob's session %s went to %s's %s", req.sessionID, req.to, req.device)
		}
	}
}

// TestLiveEventsBounded: what the helper holds between a failed decrypt and bridgev2's wait stays
// within its bounds, whatever is sent (security finding 2: in-memory sets are bounded), and the
// events come out once while their senders stay known for bridgev2's second wait.
func TestLiveEventsBounded(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name     string
		sessions int // distinct sessions, the events spread over them
		events   int
	}{
		{"many sessions", 3 * maxLiveSessions, 3 * maxLiveSessions},
		{"one session", 1, 3 * maxLiveEvents},
		{"some sessions", 10, 3 * maxLiveEvents},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var l liveEvents
			for i := range tc.events {
				evt := megolmEvent(i, cmdAlice, "key", session(fmt.Sprint(i%tc.sessions)))
				l.remember(evt, now.Add(time.Duration(i)*time.Millisecond))
				if len(l.sessions) > maxLiveSessions || l.held > maxLiveEvents {
					t.Fatalf("after %d events: %d sessions, %d events held", i+1, len(l.sessions), l.held)
				}
			}
		})
	}

	var l liveEvents
	l.remember(megolmEvent(1, cmdAlice, "key", session("s")), now)
	l.remember(megolmEvent(2, cmdBob, "key", session("s")), now)
	fresh, senders := l.take(cmdPortal, "key", session("s"))
	if len(fresh) != 2 || !slices.Equal(senders, []id.UserID{cmdAlice, cmdBob}) {
		t.Fatalf("first take: %d events, senders %v", len(fresh), senders)
	}
	fresh, senders = l.take(cmdPortal, "key", session("s"))
	if len(fresh) != 0 || len(senders) != 2 || l.held != 0 {
		t.Fatalf("second take: %d events, senders %v, %d held", len(fresh), senders, l.held)
	}
}
