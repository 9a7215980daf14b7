package database_test

import (
	"context"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"
)

// TestSharedIndex: the first share of a session with a device is kept; later, higher indices do
// not replace it; the ledger's prune deletes old records.
func TestSharedIndex(t *testing.T) {
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			for _, index := range []uint32{4, 9} {
				if err := db.Shared.RecordShared(ctx, "session", "phone", index); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range []struct {
				key    id.IdentityKey
				index  uint32
				shared bool
			}{{"phone", 4, true}, {"laptop", 0, false}} {
				index, shared, err := db.Shared.FirstShared(ctx, "session", tc.key)
				if err != nil || index != tc.index || shared != tc.shared {
					t.Errorf("%s: index %d, shared %v (%v), want %d, %v", tc.key, index, shared, err, tc.index, tc.shared)
				}
			}
			if _, _, err := db.Ledger.Prune(ctx, time.Now().Add(time.Minute), time.Now()); err != nil {
				t.Fatal(err)
			}
			if _, shared, err := db.Shared.FirstShared(ctx, "session", "phone"); err != nil || shared {
				t.Errorf("record survived the prune (%v)", err)
			}
		})
	}
}
