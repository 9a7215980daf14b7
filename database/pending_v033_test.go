package database_test

import (
	"context"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// inRoom moves a pending event to another room.
func inRoom(p *unwedge.Pending, room id.RoomID) *unwedge.Pending {
	p.RoomID, p.Event.RoomID = room, room
	return p
}

// sessionsOf lists pending sessions readably for failure messages.
func sessionsOf(list []*unwedge.PendingSession) []unwedge.PendingSession {
	out := make([]unwedge.PendingSession, len(list))
	for i, s := range list {
		out[i] = *s
	}
	return out
}

// TestPendingSameSessionTwoRooms: mautrix-go v0.33 keys Megolm sessions by room and session ID
// ("to avoid cross-room session confusion"): a session ID names a session only within its room.
// Pending events are kept, asked for and retried by room and session, so events of the same
// session ID in another room neither join a session's requests nor are claimed with it.
func TestPendingSameSessionTwoRooms(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	const (
		session = id.SessionID("same-session")
		roomA   = id.RoomID("!a:localhost")
		roomB   = id.RoomID("!b:localhost")
	)
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			add := func(p *unwedge.Pending) {
				t.Helper()
				if ok, err := pq.Add(ctx, p, roomy); err != nil || !ok {
					t.Fatalf("Add %s: %v %v", p.EventID, ok, err)
				}
			}
			add(inRoom(pendingEvent(1, session, t0), roomA))
			if waiting, err := pq.Waiting(ctx, roomB, session); err != nil || waiting {
				t.Fatalf("Waiting(%s) = %v, %v with events only in %s", roomB, waiting, err, roomA)
			}

			// Room A's session was asked for three times; room B's event of the same session ID
			// starts its own count.
			due, err := pq.DueSessions(ctx, t0, t0, 10)
			if err != nil || len(due) != 1 {
				t.Fatalf("DueSessions = %+v, %v", sessionsOf(due), err)
			}
			if err = pq.MarkRequested(ctx, due[0], 3, t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
			add(inRoom(pendingEvent(2, session, t0), roomB))
			due, err = pq.DueSessions(ctx, t0, t0, 10)
			if err != nil || len(due) != 1 || due[0].RoomID != roomB || due[0].Requests != 0 {
				t.Fatalf("DueSessions after room A's requests = %+v, %v; want room B's session alone, not asked yet", sessionsOf(due), err)
			}
			waiting, err := pq.WaitingSessions(ctx, t0, 10)
			if err != nil || len(waiting) != 2 {
				t.Fatalf("WaitingSessions = %+v, %v; want one session per room", sessionsOf(waiting), err)
			}

			// A key for room A's session retries room A's event only.
			claimed, err := pq.LeaseSession(ctx, roomA, session, "owner", t0, t0.Add(time.Minute), t0, 10)
			if err != nil || len(claimed) != 1 || claimed[0].RoomID != roomA {
				t.Fatalf("LeaseSession(%s) = %+v, %v; want room A's event alone", roomA, claimed, err)
			}
			if waiting, err := pq.Waiting(ctx, roomB, session); err != nil || !waiting {
				t.Fatalf("Waiting(%s) = %v, %v after room A's claim", roomB, waiting, err)
			}
		})
	}
}
