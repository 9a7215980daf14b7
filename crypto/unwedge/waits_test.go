package unwedge

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"slices"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// liveEvent is an undecryptable Megolm event of sender in room, naming key and session.
func liveEvent(n int, sender id.UserID, room id.RoomID, key id.SenderKey, sessionName string) *event.Event {
	sum := sha256.Sum256([]byte(sessionName))
	return &event.Event{
		ID: id.EventID(fmt.Sprintf("$live%d", n)), RoomID: room, Sender: sender, Type: event.EventEncrypted,
		Content: event.Content{Parsed: &event.EncryptedEventContent{
			Algorithm: id.AlgorithmMegolmV1, SenderKey: key, SessionID: id.SessionID(base64.RawStdEncoding.EncodeToString(sum[:])),
		}},
	}
}

// TestLiveEventsBounded: what recovery holds between a failed decrypt and bridgev2's wait stays
// within its bounds, whatever is sent (security finding 2: in-memory sets are bounded), and the
// events come out once while their senders stay known for bridgev2's second wait.
func TestLiveEventsBounded(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name     string
		sessions int // distinct sessions, the events spread over them
		events   int
		take     bool // bridgev2 waits for each event's session right away
	}{
		{"many sessions", 3 * maxLiveSessions, 3 * maxLiveSessions, false},
		{"one session", 1, 3 * maxLiveEvents, false},
		{"some sessions", 10, 3 * maxLiveEvents, false},
		{"all taken", 10, 3 * maxLiveQueue, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var l liveEvents
			for i := range tc.events {
				at := now.Add(time.Duration(i) * time.Millisecond)
				evt := liveEvent(i, "@alice:x", "!room:x", "key", fmt.Sprint(i%tc.sessions))
				l.remember(evt, at)
				if tc.take {
					l.take("!room:x", "key", evt.Content.AsEncrypted().SessionID, at)
				}
				if len(l.sessions) > maxLiveSessions || l.held > maxLiveEvents || len(l.queue) > maxLiveQueue {
					t.Fatalf("after %d events: %d sessions, %d events held, %d queued", i+1, len(l.sessions), l.held, len(l.queue))
				}
			}
		})
	}
}

// TestLiveEventsTake: bridgev2's first wait takes the events of the session and their senders;
// its second wait, 3 s later, gets the senders again and no event twice; an event nobody waited
// for within liveTTL (one bridgev2 fetched for history or a reply) is forgotten, sender and all.
func TestLiveEventsTake(t *testing.T) {
	t0 := time.Now()
	sessionID := func(name string) id.SessionID { return liveEvent(0, "", "", "", name).Content.AsEncrypted().SessionID }
	var l liveEvents
	l.remember(liveEvent(1, "@alice:x", "!room:x", "key", "s"), t0)
	l.remember(liveEvent(2, "@bob:x", "!room:x", "key", "s"), t0)
	fresh, senders := l.take("!room:x", "key", sessionID("s"), t0)
	if len(fresh) != 2 || !slices.Equal(senders, []id.UserID{"@alice:x", "@bob:x"}) {
		t.Fatalf("first wait: %d events, senders %v", len(fresh), senders)
	}
	fresh, senders = l.take("!room:x", "key", sessionID("s"), t0.Add(3*time.Second))
	if len(fresh) != 0 || len(senders) != 2 || l.held != 0 {
		t.Fatalf("second wait: %d events, senders %v, %d held", len(fresh), senders, l.held)
	}

	// Fetched: no wait follows. A live event of the same session later is taken alone.
	l.remember(liveEvent(3, "@carol:x", "!room:x", "key", "f"), t0)
	l.remember(liveEvent(4, "@dave:x", "!room:x", "key", "f"), t0.Add(liveTTL+time.Second))
	fresh, senders = l.take("!room:x", "key", sessionID("f"), t0.Add(liveTTL+time.Second))
	if len(fresh) != 1 || fresh[0].ID != "$live4" || !slices.Equal(senders, []id.UserID{"@dave:x"}) {
		t.Fatalf("live event after a fetched one: %d events, senders %v; want only $live4 of dave", len(fresh), senders)
	}
	if fresh, senders = l.take("!room:x", "key", sessionID("s"), t0.Add(liveTTL+time.Second)); len(fresh)+len(senders) != 0 {
		t.Fatalf("a session remembered more than liveTTL ago: %d events, senders %v", len(fresh), senders)
	}
}
