package bench

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

const ledgerDecisions = 2000

// TestLedgerScale measures Acquire, the one-statement "may this device get a new session now?",
// with the ledger holding many devices (UNWEDGE_BENCH_LEDGER, default 1000), on SQLite and, when
// the stack runs, Postgres: half the decisions are for known devices (some limited, some
// granted), half for new ones. Then it prunes the devices with nothing in the retention window.
func TestLedgerScale(t *testing.T) {
	requireStackForFigures(t)
	var results []LedgerResult
	for _, rows := range envInts(t, "UNWEDGE_BENCH_LEDGER", 1000) {
		uris := testenv.Databases(t)
		for _, dialect := range slices.Sorted(maps.Keys(uris)) {
			t.Run(fmt.Sprintf("%s/%d", dialect, rows), func(t *testing.T) {
				res := runLedger(t, dialect, uris[dialect], rows)
				t.Logf("%+v", res)
				results = append(results, res)
			})
		}
	}
	benchOut(t, "ledger", results)
}

func runLedger(t *testing.T, dialect, uri string, rows int) LedgerResult {
	ctx := context.Background()
	udb := cryptotest.UnwedgeDB(t, testenv.OpenDatabase(t, dialect, uri))
	now := time.Now()
	// Devices healed over the last two hours, one per user: half of them within the interval.
	fill := `INSERT INTO unwedge_device (bridge_id, user_id, device_id, identity_key, last_created_at)
		SELECT $3, '@user' || g || ':example.org', 'PHONE', 'key' || g, CAST($1 AS BIGINT) - CAST(g AS BIGINT) * 7200000 / CAST($2 AS BIGINT) FROM %s`
	series := "generate_series(1, $2) AS g"
	if dialect != testenv.Postgres {
		fill = "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < $2) " + fill
		series = "s"
	}
	if _, err := udb.Exec(ctx, fmt.Sprintf(fill, series), now.UnixMilli(), rows, udb.Ledger.BridgeID); err != nil {
		t.Fatal(err)
	}
	if dialect == testenv.Postgres {
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
		_, err := udb.Ledger.AcquireDevice(ctx, dev, unwedge.AcquireParams{
			Now: now, MinInterval: time.Hour, Owner: "bench", Lease: time.Minute, Class: "no_session",
		})
		durations = append(durations, time.Since(started))
		if err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(durations)
	res := LedgerResult{
		DB: map[string]string{testenv.Postgres: "postgres", testenv.SQLite: "sqlite"}[dialect], Rows: rows, Decisions: ledgerDecisions,
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
