package database_test

import (
	"context"
	"slices"
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

// TestSharedKeys: the devices the bridge shared room keys with, each once, the latest first, not
// those shared with only before the given time, at most the limit.
func TestSharedKeys(t *testing.T) {
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			shares := []struct {
				session id.SessionID
				key     id.IdentityKey
				at      time.Time
			}{
				{"s1", "old", time.Now().Add(-2 * time.Hour)},
				{"s1", "phone", time.Now().Add(-30 * time.Minute)},
				{"s2", "phone", time.Now().Add(-20 * time.Minute)},
				{"s2", "laptop", time.Now().Add(-10 * time.Minute)},
			}
			for _, s := range shares {
				if _, err := db.Exec(ctx, "INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at) VALUES ($1, $2, $3, 0, $4)",
					db.Shared.BridgeID, s.session, s.key, s.at.UnixMilli()); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range []struct {
				limit int
				want  []id.IdentityKey
			}{{10, []id.IdentityKey{"laptop", "phone"}}, {1, []id.IdentityKey{"laptop"}}} {
				keys, err := db.Shared.SharedKeys(ctx, time.Now().Add(-time.Hour), tc.limit)
				if err != nil || !slices.Equal(keys, tc.want) {
					t.Errorf("limit %d: %v (%v), want %v", tc.limit, keys, err, tc.want)
				}
			}
		})
	}
}
