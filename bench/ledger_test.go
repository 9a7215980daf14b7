package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/testenv"
)

const ledgerDecisions = 2000

// TestLedgerScale measures Acquire, the one-statement "may this device get a new session now?",
// with the ledger holding many devices (UNWEDGE_BENCH_LEDGER, default 1000), on Postgres and
// SQLite: half the decisions are for known devices (some limited, some granted), half for new
// ones. Then it prunes the devices with nothing in the retention window.
func TestLedgerScale(t *testing.T) {
	env := testenv.Require(t)
	var results []LedgerResult
	for _, rows := range envInts(t, "UNWEDGE_BENCH_LEDGER", 1000) {
		for _, dialect := range []string{"postgres", "sqlite3-fk-wal"} {
			t.Run(fmt.Sprintf("%s/%d", dialect, rows), func(t *testing.T) {
				uri := "file:" + filepath.Join(t.TempDir(), "ledger.db") + "?_txlock=immediate"
				if dialect == "postgres" {
					uri = env.NewDatabase(t)
				}
				res := runLedger(t, dialect, uri, rows)
				t.Logf("%+v", res)
				results = append(results, res)
			})
		}
	}
	benchOut(t, "ledger", results)
}

func runLedger(t *testing.T, dialect, uri string, rows int) LedgerResult {
	ctx := context.Background()
	raw, err := dbutil.NewWithDialect(uri, dialect)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = raw.Close() })
	udb := database.NewUnwedgeDB("bench", raw, dbutil.ZeroLogger(quiet))
	if err = udb.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	// Devices healed over the last two hours, one per user: half of them within the interval.
	fill := `INSERT INTO unwedge_device (bridge_id, user_id, device_id, identity_key, last_created_at)
		SELECT 'bench', '@user' || g || ':example.org', 'PHONE', 'key' || g, CAST($1 AS BIGINT) - CAST(g AS BIGINT) * 7200000 / CAST($2 AS BIGINT) FROM %s`
	series := "generate_series(1, $2) AS g"
	if dialect != "postgres" {
		fill = "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < $2) " + fill
		series = "s"
	}
	if _, err = udb.Exec(ctx, fmt.Sprintf(fill, series), now.UnixMilli(), rows); err != nil {
		t.Fatal(err)
	}
	if dialect == "postgres" {
		_, _ = udb.Exec(ctx, "ANALYZE unwedge_device")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	durations := make([]time.Duration, 0, ledgerDecisions)
	for i := range ledgerDecisions {
		dev := unwedge.LedgerDevice{UserID: id.UserID(fmt.Sprintf("@new%d:example.org", i)), DeviceID: "PHONE", IdentityKey: id.IdentityKey(fmt.Sprintf("new%d", i))}
		if i%2 == 0 {
			g := rng.IntN(rows) + 1
			dev = unwedge.LedgerDevice{UserID: id.UserID(fmt.Sprintf("@user%d:example.org", g)), DeviceID: "PHONE", IdentityKey: id.IdentityKey(fmt.Sprintf("key%d", g))}
		}
		started := time.Now()
		_, err = udb.Ledger.Acquire(ctx, dev, unwedge.AcquireParams{
			Now: now, MinInterval: time.Hour, Owner: "bench", Lease: time.Minute, Class: "no_session",
		})
		durations = append(durations, time.Since(started))
		if err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(durations)
	res := LedgerResult{
		DB: map[string]string{"postgres": "postgres", "sqlite3-fk-wal": "sqlite"}[dialect], Rows: rows, Decisions: ledgerDecisions,
		P50us: float64(durations[len(durations)/2].Microseconds()), P99us: float64(durations[len(durations)*99/100].Microseconds()),
	}
	// Pruning: devices whose last session is older than an hour and that no lease holds go.
	started := time.Now()
	_, devices, err := udb.Ledger.Prune(ctx, now.Add(-time.Hour), now.Add(2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	res.Pruned, res.PruneMS = devices, float64(time.Since(started).Microseconds())/1000
	if devices < int64(rows)/3 {
		t.Errorf("pruned %d of %d devices, want about half", devices, rows)
	}
	return res
}
