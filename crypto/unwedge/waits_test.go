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
	}{
		{"many sessions", 3 * maxLiveSessions, 3 * maxLiveSessions},
		{"one session", 1, 3 * maxLiveEvents},
		{"some sessions", 10, 3 * maxLiveEvents},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var l liveEvents
			for i := range tc.events {
				evt := liveEvent(i, "@alice:x", "!room:x", "key", fmt.Sprint(i%tc.sessions))
				l.remember(evt, now.Add(time.Duration(i)*time.Millisecond))
				if len(l.sessions) > maxLiveSessions || l.held > maxLiveEvents {
					t.Fatalf("after %d events: %d sessions, %d events held", i+1, len(l.sessions), l.held)
				}
			}
		})
	}

	var l liveEvents
	l.remember(liveEvent(1, "@alice:x", "!room:x", "key", "s"), now)
	l.remember(liveEvent(2, "@bob:x", "!room:x", "key", "s"), now)
	fresh, senders := l.take("!room:x", "key", liveEvent(0, "", "", "", "s").Content.AsEncrypted().SessionID)
	if len(fresh) != 2 || !slices.Equal(senders, []id.UserID{"@alice:x", "@bob:x"}) {
		t.Fatalf("first take: %d events, senders %v", len(fresh), senders)
	}
	fresh, senders = l.take("!room:x", "key", liveEvent(0, "", "", "", "s").Content.AsEncrypted().SessionID)
	if len(fresh) != 0 || len(senders) != 2 || l.held != 0 {
		t.Fatalf("second take: %d events, senders %v, %d held", len(fresh), senders, l.held)
	}
}
