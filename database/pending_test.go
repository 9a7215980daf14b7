package database_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/database"
)

func openPending(t *testing.T) map[string]*database.UnwedgeDB {
	dbs := map[string]*database.UnwedgeDB{}
	for dialect, uri := range databaseURIs(t) {
		db := database.NewUnwedgeDB("test-bridge", open(t, dialect, uri), dbutil.ZeroLogger(zerolog.Nop()))
		upgrade(t, db)
		dbs[dialect] = db
	}
	return dbs
}

func pendingEvent(n int, session id.SessionID, seen time.Time) *database.Pending {
	evtID := id.EventID(fmt.Sprintf("$event%d", n))
	content := &event.EncryptedEventContent{
		Algorithm: id.AlgorithmMegolmV1, SenderKey: "curve-key-a", SessionID: session,
		MegolmCiphertext: []byte(fmt.Sprintf("ciphertext-%d", n)),
	}
	evt := &event.Event{
		ID: evtID, RoomID: "!room:localhost", Sender: "@alice:localhost", Type: event.EventEncrypted,
		Timestamp: seen.Add(-time.Duration(10-n) * time.Second).UnixMilli(), Content: event.Content{Parsed: content},
	}
	return &database.Pending{
		EventID: evtID, RoomID: evt.RoomID, SessionID: session, SenderKey: content.SenderKey, Sender: evt.Sender,
		DeviceID: "PHONE", Event: evt, OriginTS: time.UnixMilli(evt.Timestamp), FirstSeen: seen, NextRequest: seen,
	}
}

func TestPending(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	handover := 30 * time.Second
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			// Added out of order: two events of session A, one of B, one of A seen later.
			for _, p := range []*database.Pending{pendingEvent(3, "A", t0), pendingEvent(1, "A", t0), pendingEvent(2, "B", t0), pendingEvent(4, "A", t0.Add(time.Minute))} {
				if added, err := pq.Add(ctx, p); err != nil || !added {
					t.Fatalf("add %s: added=%v err=%v", p.EventID, added, err)
				}
			}
			if added, err := pq.Add(ctx, pendingEvent(1, "A", t0)); err != nil || added {
				t.Fatalf("adding a recorded event again: added=%v err=%v, want false", added, err)
			}
			if n, err := pq.CountBySender(ctx, "@alice:localhost"); err != nil || n != 4 {
				t.Fatalf("count by sender = %d, %v; want 4", n, err)
			}

			// Before the hand-over time nothing is due; after it, both sessions are.
			if due, err := pq.DueSessions(ctx, t0.Add(time.Second), t0.Add(time.Second-handover), 10); err != nil || len(due) != 0 {
				t.Fatalf("due before hand-over = %v, %v; want none", due, err)
			}
			due, err := pq.DueSessions(ctx, t0.Add(handover), t0, 10)
			if err != nil || len(due) != 2 {
				t.Fatalf("due after hand-over = %v, %v; want 2 sessions", due, err)
			}
			var sessA *database.PendingSession
			for _, s := range due {
				if s.SessionID == "A" {
					sessA = s
				}
			}
			if sessA == nil || sessA.Events != 2 || sessA.DeviceID != "PHONE" || sessA.SenderKey != "curve-key-a" {
				t.Fatalf("session A = %+v; want 2 events (the third is not handed over yet) from PHONE", sessA)
			}
			// A request pushes the session back; a heal of the device makes it due again.
			if err = pq.MarkRequested(ctx, sessA, 1, t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
			if due, _ = pq.DueSessions(ctx, t0.Add(handover), t0, 10); len(due) != 1 || due[0].SessionID != "B" {
				t.Fatalf("due after requesting A = %+v; want only B", due)
			}
			if n, err := pq.RequestNow(ctx, "curve-key-a", t0.Add(handover)); err != nil || n != 3 {
				t.Fatalf("request now = %d, %v; want the 3 rows of session A", n, err)
			}

			// Claiming session A gets its handed-over events in the order they were sent; a
			// second owner gets nothing while the claim lasts, and the released event after.
			now := t0.Add(2 * time.Minute)
			claimed, err := pq.ClaimSession(ctx, "!room:localhost", "A", "owner-1", now, now.Add(time.Minute), now.Add(-handover))
			if err != nil || len(claimed) != 3 {
				t.Fatalf("claim = %d events, %v; want 3", len(claimed), err)
			}
			for i, want := range []id.EventID{"$event1", "$event3", "$event4"} {
				if claimed[i].EventID != want {
					t.Fatalf("claimed[%d] = %s, want %s", i, claimed[i].EventID, want)
				}
			}
			content := claimed[0].Event.Content.AsEncrypted()
			if content.SessionID != "A" || string(content.MegolmCiphertext) != "ciphertext-1" || claimed[0].Event.RoomID != "!room:localhost" {
				t.Fatalf("stored event did not round-trip: %+v", claimed[0].Event)
			}
			if other, err := pq.ClaimSession(ctx, "!room:localhost", "A", "owner-2", now, now.Add(time.Minute), now.Add(-handover)); err != nil || len(other) != 0 {
				t.Fatalf("second claim = %d events, %v; want none", len(other), err)
			}
			if err = pq.Done(ctx, "$event1", "owner-1"); err != nil {
				t.Fatal(err)
			}
			if err = pq.Done(ctx, "$event3", "owner-2"); err != nil {
				t.Fatal(err)
			}
			if err = pq.Release(ctx, "$event3", "owner-1", "still no key"); err != nil {
				t.Fatal(err)
			}
			other, err := pq.ClaimSession(ctx, "!room:localhost", "A", "owner-2", now, now.Add(time.Minute), now.Add(-handover))
			if err != nil || len(other) != 1 || other[0].EventID != "$event3" || other[0].LastError != "still no key" {
				t.Fatalf("claim after release = %+v, %v; want $event3 with its error", other, err)
			}
			// $event4 is still held by owner-1 until its claim runs out.
			later := now.Add(2 * time.Minute)
			if other, err = pq.ClaimSession(ctx, "!room:localhost", "A", "owner-2", later, later.Add(time.Minute), later.Add(-handover)); err != nil || len(other) != 2 {
				t.Fatalf("claim after the claims ran out = %d events, %v; want 2", len(other), err)
			}

			// Retention: only events first seen before the cut-off are claimed to be given up.
			expired, err := pq.ClaimExpired(ctx, t0.Add(time.Second), "owner-3", later.Add(2*time.Minute), later.Add(3*time.Minute))
			if err != nil || len(expired) != 2 || expired[0].EventID != "$event2" || expired[1].EventID != "$event3" {
				t.Fatalf("expired = %+v, %v; want $event2, $event3", expired, err)
			}
			if deleted, err := pq.Delete(ctx, "$event4"); err != nil || !deleted {
				t.Fatalf("delete = %v, %v", deleted, err)
			}
			list, err := pq.List(ctx, "", 10)
			if err != nil || len(list) != 2 {
				t.Fatalf("list = %d, %v; want 2", len(list), err)
			}
			if n, err := pq.Count(ctx); err != nil || n != 2 {
				t.Fatalf("count = %d, %v", n, err)
			}
		})
	}
}

// TestPendingUpgrade upgrades a database from the first version of unwedge's tables.
// TestUnwedgeUpgrades: a database at each earlier version of unwedge's tables upgrades to the
// latest, and the tables the steps add work.
func TestUnwedgeUpgrades(t *testing.T) {
	for _, tc := range []struct {
		from    int
		dropped []string // the tables that versions after from added
	}{
		{1, []string{"unwedge_megolm_shared", "unwedge_pending"}},
		{2, []string{"unwedge_megolm_shared"}},
	} {
		for dialect, db := range openPending(t) {
			t.Run(fmt.Sprintf("from v%d/%s", tc.from, dialect), func(t *testing.T) {
				ctx := context.Background()
				for _, table := range tc.dropped {
					if _, err := db.Exec(ctx, "DROP TABLE "+table); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := db.Exec(ctx, "UPDATE unwedge_version SET version = $1", tc.from); err != nil {
					t.Fatal(err)
				}
				upgrade(t, db)
				if _, err := db.Pending.Add(ctx, pendingEvent(1, "A", time.Now())); err != nil {
					t.Errorf("pending after upgrading: %v", err)
				}
				if err := db.Shared.RecordShared(ctx, "session", "key", 3); err != nil {
					t.Errorf("shared after upgrading: %v", err)
				} else if index, ok, err := db.Shared.FirstShared(ctx, "session", "key"); err != nil || !ok || index != 3 {
					t.Errorf("shared index after upgrading: %d %v %v", index, ok, err)
				}
			})
		}
	}
}
