package bench

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

// historyWeekRounds is the Olm traffic of one device with the bridge in a week, as this
// measurement models it: the device shares a room key with the bridge and the bridge one with the
// device, each in turn, 10 times (Element rotates a room's Megolm session weekly or every 100
// messages; 10 rooms with both sides rotating weekly). Taking turns is the worst case for the
// history: every message begins a new chain, so every one is kept.
const historyWeekRounds = 10

// TestOlmHistoryStorage measures what the Olm history (unwedge.olm_history) costs. A real pair of
// devices runs a modeled week of Olm traffic (historyWeekRounds) through unwedge's store: the
// states kept and their bytes. Then the history of UNWEDGE_BENCH_HISTORY sessions (default 1000;
// cmd/bench: 100000) is filled on Postgres with that many states of that real pickle per
// session, and the table's size on disk (with its indexes), a lookup of one device's states (what
// a failed Olm message costs) and the weekly prune are measured.
func TestOlmHistoryStorage(t *testing.T) {
	requireStackForFigures(t)
	ctx := context.Background()
	db := openDB(t, testenv.Require(t).PostgresURI)
	udb := cryptotest.UnwedgeDB(t, db)
	hs := cryptotest.NewHomeserver(t)
	// Devices of their own each run: the database outlives the in-memory homeserver.
	run := time.Now().UnixNano()
	deviceID := id.DeviceID(fmt.Sprintf("HISTORY%d", run))
	history := unwedge.NewHistory(udb.History, string(deviceID), []byte(cryptotest.PickleKey), unwedge.DefaultConfig().OlmHistory)
	bridge := hs.NewDevice(id.UserID(fmt.Sprintf("@bridge%d:example.org", run)), deviceID, cryptotest.Store{DB: db, Shared: udb.Shared, History: history})
	bridge.Unwedge(cryptotest.Unwedging{Config: unwedge.DefaultConfig(), Ledger: udb.Ledger, Owner: "history-bench"})
	peer := hs.NewDevice(id.UserID(fmt.Sprintf("@alice%d:example.org", run)), "PHONE", cryptotest.Store{})
	hs.Exchange(peer, bridge)
	hs.Exchange(bridge, peer)
	sessionID := latestSession(t, bridge, peer.IdentityKey())
	before, err := udb.History.SessionStates(ctx, sessionID)
	if err != nil {
		t.Fatal(err)
	}
	for range historyWeekRounds {
		hs.Exchange(peer, bridge)
		hs.Exchange(bridge, peer)
	}
	perWeek, err := udb.History.SessionStates(ctx, sessionID)
	if err != nil {
		t.Fatal(err)
	}
	perWeek -= before
	states, err := udb.History.States(ctx, peer.IdentityKey(), time.Now().Add(-time.Hour), 1000)
	if err != nil || len(states) == 0 {
		t.Fatalf("states of the session: %d, %v", len(states), err)
	}
	pickle := states[0].Pickle
	if perWeek < historyWeekRounds {
		t.Fatalf("%d states kept in a week of %d rounds taking turns, want at least one a round", perWeek, historyWeekRounds)
	}

	var results []OlmHistoryResult
	for _, sessions := range envInts(t, "UNWEDGE_BENCH_HISTORY", 1000) {
		t.Run(fmt.Sprint(sessions), func(t *testing.T) {
			res := fillHistory(t, db, sessions, perWeek, pickle)
			res.StatesPerSessionWeek = perWeek
			t.Logf("%+v", res)
			results = append(results, res)
		})
	}
	benchOut(t, "olm_history", results)
}

// latestSession is the ID of the bridge's newest Olm session with key.
func latestSession(t *testing.T, bridge *cryptotest.Device, key id.SenderKey) id.SessionID {
	t.Helper()
	sess, err := bridge.Mach.CryptoStore.GetLatestSession(context.Background(), key)
	if err != nil || sess == nil {
		t.Fatalf("no session with %s: %v", key, err)
	}
	return sess.ID()
}

// fillHistory fills the history of a bridge ID of its own with perSession states of pickle for
// each of sessions sessions, spread over a week, and measures its size, a lookup and an hourly
// prune; then deletes it.
func fillHistory(t *testing.T, parent *dbutil.Database, sessions, perSession int, pickle []byte) OlmHistoryResult {
	ctx := context.Background()
	udb := database.NewUnwedgeDB(fmt.Sprintf("history-bench-%d", sessions), parent, dbutil.ZeroLogger(zerolog.Nop()))
	size := func() int64 {
		var n int64
		if err := udb.QueryRow(ctx, "SELECT pg_total_relation_size('unwedge_olm_history')").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	cleanup := func() {
		if _, err := udb.Exec(ctx, "DELETE FROM unwedge_olm_history WHERE bridge_id = $1", udb.History.BridgeID); err != nil {
			t.Fatal(err)
		}
		_, _ = udb.Exec(ctx, "VACUUM FULL unwedge_olm_history")
	}
	cleanup()
	empty := size()
	now := time.Now()
	week := (7 * 24 * time.Hour).Milliseconds()
	rows := sessions * perSession
	started := time.Now()
	_, err := udb.Exec(ctx, `INSERT INTO unwedge_olm_history (bridge_id, sender_key, session_id, taken_at, pickle)
		SELECT $1, 'key' || (g % $2), 'session' || (g % $2), CAST($3 AS BIGINT) - CAST(g AS BIGINT) * $4 / $5, $6
		FROM generate_series(0, $5 - 1) AS g`, udb.History.BridgeID, sessions, now.UnixMilli(), week, rows, string(pickle))
	if err != nil {
		t.Fatal(err)
	}
	fillSeconds := time.Since(started).Seconds()
	_, _ = udb.Exec(ctx, "ANALYZE unwedge_olm_history")
	res := OlmHistoryResult{Sessions: sessions, States: rows, PickleBytes: len(pickle), TableBytes: size() - empty, FillSeconds: fillSeconds}
	res.BytesPerSessionWeek = float64(res.TableBytes) / float64(sessions)
	var lookups []float64
	for i := range 200 {
		started := time.Now()
		got, err := udb.History.States(ctx, id.SenderKey(fmt.Sprintf("key%d", i*7919%sessions)), now.Add(-7*24*time.Hour), 32)
		lookups = append(lookups, float64(time.Since(started).Microseconds()))
		if err != nil || len(got) == 0 {
			t.Fatalf("lookup: %d states, %v", len(got), err)
		}
	}
	res.LookupP50us = Median(lookups)
	// The hourly prune of a history in its steady state deletes its oldest hour.
	started = time.Now()
	pruned, _, err := udb.History.Prune(ctx, now.Add(-7*24*time.Hour+time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	res.PrunedStates, res.PruneMS = pruned, float64(time.Since(started).Microseconds())/1000
	cleanup()
	return res
}
