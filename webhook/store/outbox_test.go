package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"

	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook/store"
)

// openDatabases returns the webhook tables on a fresh database of each dialect.
func openDatabases(t *testing.T) map[string]*store.DB {
	dbs := map[string]*store.DB{}
	for dialect, uri := range testenv.Databases(t) {
		db := store.New("test-bridge", testenv.OpenDatabase(t, dialect, uri), dbutil.ZeroLogger(zerolog.Nop()))
		testenv.Upgrade(t, db)
		dbs[dialect] = db
	}
	return dbs
}

func TestOutbox(t *testing.T) {
	for dialect, db := range openDatabases(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			now := time.Now()
			msg := func(event string, status store.OutboxStatus) *store.OutboxMessage {
				return &store.OutboxMessage{LoginID: "alice", ChatID: "general", EventID: event,
					SenderMXID: "@alice:localhost", Body: "hi " + event, Timestamp: now.UnixMilli(), Status: status}
			}
			first, err := db.Outbox.Insert(ctx, msg("$1", store.OutboxPending))
			if err != nil {
				t.Fatal(err)
			}
			again, err := db.Outbox.Insert(ctx, msg("$1", store.OutboxPending))
			if err != nil {
				t.Fatal(err)
			} else if again.ID != first.ID {
				t.Fatalf("redelivered event got a new row: %d != %d", again.ID, first.ID)
			}
			second, err := db.Outbox.Insert(ctx, msg("$2", store.OutboxStored))
			if err != nil {
				t.Fatal(err)
			}

			due, err := db.Outbox.Due(ctx, now, 10)
			if err != nil || len(due) != 1 || due[0].ID != first.ID {
				t.Fatalf("due = %v, %v; want only the pending message", due, err)
			}
			next := now.Add(time.Minute)
			if err = db.Outbox.MarkAttemptFailed(ctx, first.ID, store.OutboxPending, next, "503"); err != nil {
				t.Fatal(err)
			}
			if due, _ = db.Outbox.Due(ctx, now, 10); len(due) != 0 {
				t.Fatalf("message retried before its backoff: %v", due)
			}
			if at, ok, err := db.Outbox.NextDue(ctx); err != nil || !ok || at.UnixMilli() != next.UnixMilli() {
				t.Fatalf("NextDue = %v %v %v, want %v", at, ok, err, next)
			}
			if err = db.Outbox.MarkDelivered(ctx, first.ID, next); err != nil {
				t.Fatal(err)
			}
			if _, ok, err := db.Outbox.NextDue(ctx); err != nil || ok {
				t.Fatalf("NextDue with nothing pending = %v %v", ok, err)
			}

			list, err := db.Outbox.List(ctx, "alice", 0, 10)
			if err != nil || len(list) != 2 {
				t.Fatalf("list = %v, %v", list, err)
			}
			if got := list[0]; got.Status != store.OutboxDelivered || got.Attempts != 2 || got.LastError != "" {
				t.Errorf("first message = %+v, want delivered after 2 attempts", got)
			}
			if got := list[1]; got.ID != second.ID || got.Status != store.OutboxStored {
				t.Errorf("second message = %+v", got)
			}
			if list, _ = db.Outbox.List(ctx, "alice", first.ID, 10); len(list) != 1 || list[0].ID != second.ID {
				t.Errorf("list after first = %v", list)
			}
			if list, _ = db.Outbox.List(ctx, "bob", 0, 10); len(list) != 0 {
				t.Errorf("other login sees %v", list)
			}
		})
	}
}
