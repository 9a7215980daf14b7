package database_test

import (
	"context"
	"crypto/sha256"
	"testing"
	"time"
)

// TestOlmHistoryHashes: the hashes mautrix-go's crypto store is about to delete are kept in the
// history, in the form unwedge looks them up (hex of the SHA-256), on both dialects; only the
// account's, only those from before the time given; pruning drops them with the states.
func TestOlmHistoryHashes(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			old, recent, other := sha256.Sum256([]byte("old")), sha256.Sum256([]byte("recent")), sha256.Sum256([]byte("other account"))
			for _, account := range []string{"BRIDGE", "SOMEONE"} {
				if _, err := db.Exec(ctx, "INSERT INTO crypto_account (account_id, device_id, shared, sync_token, account) VALUES ($1, $1, true, '', $2)",
					account, []byte("pickle")); err != nil {
					t.Fatal(err)
				}
			}
			for _, row := range []struct {
				account string
				hash    [32]byte
				at      time.Time
			}{{"BRIDGE", old, t0}, {"BRIDGE", recent, t0.Add(time.Hour)}, {"SOMEONE", other, t0}} {
				if _, err := db.Exec(ctx, "INSERT INTO crypto_olm_message_hash (account_id, received_at, message_hash) VALUES ($1, $2, $3)",
					row.account, row.at.UnixMilli(), row.hash[:]); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := db.History.KeepHashes(ctx, "BRIDGE", t0.Add(time.Minute)); err != nil || n != 1 {
				t.Fatalf("KeepHashes = %d, %v; want the old one", n, err)
			}
			for _, tc := range []struct {
				hash [32]byte
				want bool
			}{{old, true}, {recent, false}, {other, false}} {
				if seen, err := db.History.Seen(ctx, tc.hash, t0.Add(-time.Hour)); err != nil || seen != tc.want {
					t.Errorf("Seen(%x) = %v, %v; want %v", tc.hash[:4], seen, err, tc.want)
				}
			}
			if _, hashes, err := db.History.Prune(ctx, t0.Add(time.Minute)); err != nil || hashes != 1 {
				t.Errorf("Prune: %d hashes, %v; want 1", hashes, err)
			}
			if seen, _ := db.History.Seen(ctx, old, time.Time{}); seen {
				t.Error("a pruned hash is still seen")
			}
		})
	}
}
