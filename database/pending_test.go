package database_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

func openPending(t *testing.T) map[string]*database.UnwedgeDB {
	dbs := map[string]*database.UnwedgeDB{}
	for dialect, uri := range testenv.Databases(t) {
		parent := testenv.OpenDatabase(t, dialect, uri)
		cryptotest.CryptoTables(t, parent)
		db := database.NewUnwedgeDB("test-bridge", parent, dbutil.ZeroLogger(zerolog.Nop()))
		testenv.Upgrade(t, db)
		dbs[dialect] = db
	}
	return dbs
}

func pendingEvent(n int, session id.SessionID, seen time.Time) *unwedge.Pending {
	evtID := id.EventID(fmt.Sprintf("$event%d", n))
	content := &event.EncryptedEventContent{
		Algorithm: id.AlgorithmMegolmV1, SenderKey: "curve-key-a", SessionID: session,
		MegolmCiphertext: []byte(fmt.Sprintf("ciphertext-%d", n)),
	}
	evt := &event.Event{
		ID: evtID, RoomID: "!room:localhost", Sender: "@alice:localhost", Type: event.EventEncrypted,
		Timestamp: seen.Add(-time.Duration(10-n) * time.Second).UnixMilli(), Content: event.Content{Parsed: content},
	}
	return &unwedge.Pending{
		EventID: evtID, RoomID: evt.RoomID, SessionID: session, SenderKey: content.SenderKey, Sender: evt.Sender,
		DeviceID: "PHONE", Event: evt, OriginTS: time.UnixMilli(evt.Timestamp), FirstSeen: seen, Arrival: int64(n), NextRequest: seen,
	}
}

// roomy are limits no test reaches.
var roomy = unwedge.PendingLimits{PerSender: 1000, PerRoom: 1000, Total: 1000}

func TestPending(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	handover := 30 * time.Second
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			// Added out of order: two events of session A, one of B, one of A seen later.
			for _, p := range []*unwedge.Pending{pendingEvent(3, "A", t0), pendingEvent(1, "A", t0), pendingEvent(2, "B", t0), pendingEvent(4, "A", t0.Add(time.Minute))} {
				if added, err := pq.Add(ctx, p, roomy); err != nil || !added {
					t.Fatalf("add %s: added=%v err=%v", p.EventID, added, err)
				}
			}
			if added, err := pq.Add(ctx, pendingEvent(1, "A", t0), roomy); err != nil || added {
				t.Fatalf("adding a recorded event again: added=%v err=%v, want false", added, err)
			}
			if n, err := pq.Count(ctx); err != nil || n != 4 {
				t.Fatalf("count = %d, %v; want 4", n, err)
			}

			// Before the hand-over time nothing is due; after it, both sessions are.
			if due, err := pq.DueSessions(ctx, t0.Add(time.Second), t0.Add(time.Second-handover), 10); err != nil || len(due) != 0 {
				t.Fatalf("due before hand-over = %v, %v; want none", due, err)
			}
			due, err := pq.DueSessions(ctx, t0.Add(handover), t0, 10)
			if err != nil || len(due) != 2 {
				t.Fatalf("due after hand-over = %v, %v; want 2 sessions", due, err)
			}
			var sessA *unwedge.PendingSession
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
			if n, err := pq.RequestNow(ctx, "@alice:localhost", "curve-key-a", t0.Add(handover)); err != nil || n != 3 {
				t.Fatalf("request now = %d, %v; want the 3 rows of session A", n, err)
			}

			// Claiming session A gets its handed-over events in the order they arrived; a
			// second owner gets nothing while the claim lasts, and the released event after.
			now := t0.Add(2 * time.Minute)
			claimed, err := pq.LeaseSession(ctx, "!room:localhost", "A", "owner-1", now, now.Add(time.Minute), now.Add(-handover), 10)
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
			if other, err := pq.LeaseSession(ctx, "!room:localhost", "A", "owner-2", now, now.Add(time.Minute), now.Add(-handover), 10); err != nil || len(other) != 0 {
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
			other, err := pq.LeaseSession(ctx, "!room:localhost", "A", "owner-2", now, now.Add(time.Minute), now.Add(-handover), 10)
			if err != nil || len(other) != 1 || other[0].EventID != "$event3" || other[0].LastError != "still no key" {
				t.Fatalf("claim after release = %+v, %v; want $event3 with its error", other, err)
			}
			// $event4 is still held by owner-1 until its claim runs out.
			later := now.Add(2 * time.Minute)
			if other, err = pq.LeaseSession(ctx, "!room:localhost", "A", "owner-2", later, later.Add(time.Minute), later.Add(-handover), 10); err != nil || len(other) != 2 {
				t.Fatalf("claim after the claims ran out = %d events, %v; want 2", len(other), err)
			}

			// Retention: only events first seen before the cut-off are claimed to be given up, at
			// most as many as asked for at once (security finding 2: queries that load rows have
			// limits), the first to arrive first.
			expired, err := pq.LeaseExpired(ctx, t0.Add(time.Second), "owner-3", later.Add(2*time.Minute), later.Add(3*time.Minute), 1)
			if err != nil || len(expired) != 1 || expired[0].EventID != "$event2" {
				t.Fatalf("expired, one at most = %+v, %v; want $event2", expired, err)
			}
			expired, err = pq.LeaseExpired(ctx, t0.Add(time.Second), "owner-3", later.Add(2*time.Minute), later.Add(3*time.Minute), 10)
			if err != nil || len(expired) != 1 || expired[0].EventID != "$event3" {
				t.Fatalf("expired = %+v, %v; want $event3 (the claim of $event2 holds)", expired, err)
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

// TestUnwedgeUpgrades: a database at each earlier version of unwedge's tables upgrades to the
// latest, and the tables the steps add work.
func TestUnwedgeUpgrades(t *testing.T) {
	// unwedge_pending as versions 2 and 3 had it (before v4 added its arrival column).
	pendingV2, err := os.ReadFile("upgrades/unwedge/02-pending.sql")
	if err != nil {
		t.Fatal(err)
	}
	// unwedge_pending's changes of v4 (arrival, and unwedge_pending_lock).
	pendingV4, err := os.ReadFile("upgrades/unwedge/04-pending-limits.sql")
	if err != nil {
		t.Fatal(err)
	}
	history := []string{"unwedge_olm_history", "unwedge_olm_seen"} // v7
	for _, tc := range []struct {
		from    int
		dropped []string // the tables that versions after from added or changed
	}{
		{1, append([]string{"unwedge_megolm_shared", "unwedge_pending", "unwedge_pending_lock", "unwedge_generation"}, history...)},
		{2, append([]string{"unwedge_megolm_shared", "unwedge_pending", "unwedge_pending_lock", "unwedge_generation"}, history...)},
		{3, append([]string{"unwedge_pending", "unwedge_pending_lock", "unwedge_generation"}, history...)},
		{4, append([]string{"unwedge_pending", "unwedge_pending_lock", "unwedge_generation"}, history...)},
		{5, append([]string{"unwedge_pending", "unwedge_pending_lock"}, history...)},
		{6, history},
	} {
		for dialect, db := range openPending(t) {
			t.Run(fmt.Sprintf("from v%d/%s", tc.from, dialect), func(t *testing.T) {
				ctx := context.Background()
				for _, table := range tc.dropped {
					if _, err := db.Exec(ctx, "DROP TABLE "+table); err != nil {
						t.Fatal(err)
					}
				}
				if tc.from >= 2 && tc.from < 6 {
					// unwedge_pending as versions 2 to 5 had it (v6 renamed its claim columns).
					if _, err := db.Exec(ctx, string(pendingV2)); err != nil {
						t.Fatal(err)
					}
				}
				if tc.from >= 4 && tc.from < 6 {
					if _, err := db.Exec(ctx, string(pendingV4)); err != nil {
						t.Fatal(err)
					}
				}
				if tc.from >= 2 && tc.from < 4 {
					// A row from before v4 gets an arrival from when it was first seen.
					if _, err := db.Exec(ctx, `INSERT INTO unwedge_pending (bridge_id, event_id, room_id, session_id, sender_key, sender, device_id, event, origin_ts, first_seen, next_request)
						VALUES ('test-bridge', '$old', '!room:localhost', 'A', 'curve-key-a', '@alice:localhost', 'PHONE', '{}', 5, 7, 0)`); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := db.Exec(ctx, "UPDATE unwedge_version SET version = $1", tc.from); err != nil {
					t.Fatal(err)
				}
				testenv.Upgrade(t, db)
				if _, err := db.Pending.Add(ctx, pendingEvent(1, "A", time.Now()), roomy); err != nil {
					t.Errorf("pending after upgrading: %v", err)
				}
				if tc.from >= 2 && tc.from < 4 {
					var arrival int64
					if err := db.QueryRow(ctx, "SELECT arrival FROM unwedge_pending WHERE event_id = '$old'").Scan(&arrival); err != nil || arrival != 7_000_000 {
						t.Errorf("arrival of a row from before v4 = %d, %v; want 7000000 (first_seen in ns)", arrival, err)
					}
				}
				if err := db.Shared.RecordShared(ctx, "session", "key", 3); err != nil {
					t.Errorf("shared after upgrading: %v", err)
				} else if index, ok, err := db.Shared.FirstShared(ctx, "session", "key"); err != nil || !ok || index != 3 {
					t.Errorf("shared index after upgrading: %d %v %v", index, ok, err)
				}
				if gen, err := db.Generation.Advance(ctx, "key"); err != nil || gen.Value != 1 {
					t.Errorf("generation after upgrading: %+v %v", gen, err)
				}
				if err := db.History.KeepState(ctx, "key", "session", []byte("pickle"), time.Now()); err != nil {
					t.Errorf("Olm history after upgrading: %v", err)
				} else if states, err := db.History.States(ctx, "key", time.Now().Add(-time.Hour), 10); err != nil || len(states) != 1 {
					t.Errorf("Olm history after upgrading: %+v %v", states, err)
				}
			})
		}
	}
}

// TestPendingOldest: the oldest pending event is the one the bridge first failed on earliest
// (first_seen), not the one whose sender wrote the earliest origin_server_ts; another bridge's
// events in the same database do not count, and with none pending there is no oldest.
func TestPendingOldest(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			if _, ok, err := pq.Oldest(ctx); err != nil || ok {
				t.Fatalf("oldest of none: ok=%v err=%v, want none", ok, err)
			}
			// Another bridge's event, seen an hour before any of this bridge's.
			if _, err := db.Exec(ctx, `INSERT INTO unwedge_pending (bridge_id, event_id, room_id, session_id, sender_key, sender, device_id, event, origin_ts, first_seen, next_request)
				VALUES ('other-bridge', '$other', '!room:localhost', 'A', 'curve-key-a', '@alice:localhost', 'PHONE', '{}', $1, $1, $1)`, t0.Add(-time.Hour).UnixMilli()); err != nil {
				t.Fatal(err)
			}
			later := pendingEvent(1, "A", t0.Add(time.Minute))
			// Backdated by its sender: seen later all the same.
			later.OriginTS = t0.Add(-24 * time.Hour)
			later.Event.Timestamp = later.OriginTS.UnixMilli()
			earlier := pendingEvent(2, "B", t0)
			for _, p := range []*unwedge.Pending{later, earlier} {
				if _, err := pq.Add(ctx, p, roomy); err != nil {
					t.Fatal(err)
				}
			}
			for _, step := range []struct {
				deleted id.EventID
				want    time.Time
			}{{"", t0}, {earlier.EventID, t0.Add(time.Minute)}} {
				if step.deleted != "" {
					if deleted, err := pq.Delete(ctx, step.deleted); err != nil || !deleted {
						t.Fatalf("delete %s: %v, %v", step.deleted, deleted, err)
					}
				}
				if oldest, ok, err := pq.Oldest(ctx); err != nil || !ok || !oldest.Equal(step.want) {
					t.Errorf("after deleting %q: oldest %v (ok=%v, %v), want %v", step.deleted, oldest, ok, err, step.want)
				}
			}
		})
	}
}

// TestPendingSenders: events of another room member that name the same session and sender key
// as a victim's are kept apart from the victim's (security finding 4). They neither join nor use
// up the victim's key requests, a heal of the victim's device hurries only the victim's, and
// events come back in the order they arrived, whatever origin_server_ts their senders wrote.
func TestPendingSenders(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			victim := pendingEvent(1, "A", t0)
			// The attacker copies the session and sender key, and backdates their event.
			attacker := pendingEvent(2, "A", t0)
			attacker.Sender, attacker.Event.Sender = "@mallory:localhost", "@mallory:localhost"
			attacker.OriginTS = t0.Add(-time.Hour)
			attacker.Event.Timestamp = attacker.OriginTS.UnixMilli()
			for _, p := range []*unwedge.Pending{victim, attacker} {
				if _, err := pq.Add(ctx, p, roomy); err != nil {
					t.Fatal(err)
				}
			}
			due, err := pq.DueSessions(ctx, t0, t0, 10)
			if err != nil || len(due) != 2 {
				t.Fatalf("due = %+v, %v; want the session twice, once per sender", due, err)
			}
			// The attacker's group uses up all its requests: the victim's stays due.
			for _, s := range due {
				if s.Sender == attacker.Sender {
					if err = pq.MarkRequested(ctx, s, 8, t0.Add(24*time.Hour)); err != nil {
						t.Fatal(err)
					}
				}
			}
			due, err = pq.DueSessions(ctx, t0, t0, 10)
			if err != nil || len(due) != 1 || due[0].Sender != victim.Sender || due[0].Requests != 0 {
				t.Fatalf("due after the attacker's requests = %+v, %v; want only the victim's, with 0 requests", due, err)
			}
			// A new attacker event joins the attacker's schedule, not the victim's.
			third := pendingEvent(3, "A", t0)
			third.Sender, third.Event.Sender = attacker.Sender, attacker.Sender
			if _, err = pq.Add(ctx, third, roomy); err != nil {
				t.Fatal(err)
			}
			if due, _ = pq.DueSessions(ctx, t0, t0, 10); len(due) != 1 || due[0].Sender != victim.Sender || due[0].Events != 1 {
				t.Fatalf("due after another attacker event = %+v; want the victim's 1 event", due)
			}
			// A heal of the victim's device hurries the victim's events only.
			if n, err := pq.RequestNow(ctx, attacker.Sender, "curve-key-a", t0); err != nil || n != 2 {
				t.Fatalf("request now for the attacker = %d, %v; want their 2 rows", n, err)
			}
			if err = pq.MarkRequested(ctx, due[0], 1, t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
			if n, err := pq.RequestNow(ctx, victim.Sender, "curve-key-a", t0); err != nil || n != 1 {
				t.Fatalf("request now for the victim = %d, %v; want 1 row", n, err)
			}
			// First arrival first: the victim's event, although the attacker's claims to be older.
			claimed, err := pq.LeaseSession(ctx, victim.RoomID, "A", "owner", t0, t0.Add(time.Minute), t0, 10)
			if err != nil || len(claimed) != 3 || claimed[0].EventID != victim.EventID {
				t.Fatalf("claimed = %+v, %v; want 3 events, the victim's first", claimed, err)
			}
			list, err := pq.List(ctx, "", 10)
			if err != nil || len(list) != 3 || list[0].EventID != victim.EventID {
				t.Fatalf("list = %+v, %v; want the victim's event first", list, err)
			}
		})
	}
}

// TestPendingLimits: the caps per sender, per room and in total hold (security finding 2), also
// when many events are added at once from separate connections, as replicas would.
func TestPendingLimits(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	limits := unwedge.PendingLimits{PerSender: 3, PerRoom: 5, Total: 7}
	event := func(n int, sender id.UserID, room id.RoomID) *unwedge.Pending {
		p := pendingEvent(n, "A", t0)
		p.Sender, p.Event.Sender, p.RoomID, p.Event.RoomID = sender, sender, room, room
		return p
	}
	full := func(err error) unwedge.PendingCap {
		var fullErr *unwedge.PendingFullError
		if errors.As(err, &fullErr) {
			return fullErr.Cap
		}
		return ""
	}
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			pq := db.Pending
			steps := []struct {
				sender id.UserID
				room   id.RoomID
				want   unwedge.PendingCap
			}{
				{"@a:x", "!r1:x", ""}, {"@a:x", "!r1:x", ""}, {"@a:x", "!r1:x", ""},
				{"@a:x", "!r1:x", unwedge.CapSender},
				{"@b:x", "!r1:x", ""}, {"@b:x", "!r1:x", ""},
				{"@c:x", "!r1:x", unwedge.CapRoom},
				{"@c:x", "!r2:x", ""}, {"@c:x", "!r2:x", ""},
				{"@d:x", "!r3:x", unwedge.CapTotal},
			}
			for i, step := range steps {
				added, err := pq.Add(ctx, event(100+i, step.sender, step.room), limits)
				if got := full(err); got != step.want || (step.want == "" && (err != nil || !added)) {
					t.Fatalf("event %d of %s in %s: added=%v err=%v; want cap %q", i, step.sender, step.room, added, err, step.want)
				}
			}
			if n, err := pq.Count(ctx); err != nil || n != limits.Total {
				t.Fatalf("count = %d, %v; want %d", n, err, limits.Total)
			}
			// An event already recorded is not refused by a full table: it is simply there.
			if added, err := pq.Add(ctx, event(100, "@a:x", "!r1:x"), limits); err != nil || added {
				t.Fatalf("re-adding a recorded event: added=%v err=%v", added, err)
			}

			// Concurrent adds over separate connections (as from replicas) never pass the total.
			fresh := database.NewUnwedgeDB("other-bridge", db.Database, dbutil.ZeroLogger(zerolog.Nop())).Pending
			var wg sync.WaitGroup
			var lock sync.Mutex
			added := 0
			for i := range 20 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ok, err := fresh.Add(ctx, event(200+i, id.UserID(fmt.Sprintf("@u%d:x", i)), id.RoomID(fmt.Sprintf("!r%d:x", i))), limits)
					if err != nil && full(err) == "" {
						t.Error(err)
					}
					if ok {
						lock.Lock()
						added++
						lock.Unlock()
					}
				}()
			}
			wg.Wait()
			if n, err := fresh.Count(ctx); err != nil || n != limits.Total || added != limits.Total {
				t.Fatalf("after 20 concurrent adds: %d rows (%v), %d added; want %d", n, err, added, limits.Total)
			}
		})
	}
}

// TestPendingConcurrentClaims: two owners claiming the same events at once (two replicas, each
// with its own connections) never both get one, so no event is handed to the bridge twice.
func TestPendingConcurrentClaims(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			var replicas []*database.UnwedgeDB
			for range 2 {
				db := database.NewUnwedgeDB("test-bridge", testenv.OpenDatabase(t, dialect, uri), dbutil.ZeroLogger(zerolog.Nop()))
				testenv.Upgrade(t, db)
				replicas = append(replicas, db)
			}
			for round := range 20 {
				session := id.SessionID(fmt.Sprintf("S%d", round))
				for i := range 10 {
					if _, err := replicas[0].Pending.Add(ctx, pendingEvent(round*100+i, session, t0), roomy); err != nil {
						t.Fatal(err)
					}
				}
				// Even rounds hand a session over, odd ones give expired events up.
				claim := func(pq *database.PendingQuery, owner string) ([]*unwedge.Pending, error) {
					if round%2 == 0 {
						return pq.LeaseSession(ctx, "!room:localhost", session, owner, t0, t0.Add(time.Minute), t0, 100)
					}
					return pq.LeaseExpired(ctx, t0.Add(time.Second), owner, t0, t0.Add(time.Minute), 100)
				}
				var wg sync.WaitGroup
				claimed := make([][]*unwedge.Pending, len(replicas))
				for r, db := range replicas {
					wg.Add(1)
					go func() {
						defer wg.Done()
						var err error
						if claimed[r], err = claim(db.Pending, fmt.Sprintf("owner-%d", r)); err != nil {
							t.Error(err)
						}
					}()
				}
				wg.Wait()
				seen := map[id.EventID]bool{}
				for _, list := range claimed {
					for _, p := range list {
						if seen[p.EventID] {
							t.Fatalf("round %d: both owners claimed %s", round, p.EventID)
						}
						seen[p.EventID] = true
					}
				}
				if len(seen) != 10 {
					t.Fatalf("round %d: %d events claimed, want 10", round, len(seen))
				}
				if _, err := replicas[0].Exec(ctx, "DELETE FROM unwedge_pending"); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
