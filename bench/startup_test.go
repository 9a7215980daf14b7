package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

// The startup check at scale: a bridge whose crypto store holds N Olm sessions starts, with and
// without a rollback (the generation behind the homeserver's: every device healed, at most
// 100,000), while a message arrives every 100 ms. The test fills the store and runs the
// in-memory homeserver; the start runs in a child process (this test binary again, for that entry
// alone) against them, so that its peak RSS is the bridge's alone, as in production, where the
// homeserver is another machine.
const (
	varStartupPostgres = "UNWEDGE_BENCH_STARTUP"        // Postgres sizes
	varStartupSQLite   = "UNWEDGE_BENCH_STARTUP_SQLITE" // SQLite sizes
	// Set in the child: which entry (dialect/sessions/rollback), the database and the homeserver
	// it starts on (URI, URL, the bridge's access token), and where it writes its figures.
	varStartupEntry  = "UNWEDGE_BENCH_STARTUP_ENTRY"
	varStartupDB     = "UNWEDGE_BENCH_STARTUP_DB"
	varStartupHS     = "UNWEDGE_BENCH_STARTUP_HS"
	varStartupToken  = "UNWEDGE_BENCH_STARTUP_TOKEN"
	varStartupResult = "UNWEDGE_BENCH_STARTUP_RESULT"
	// varStartupHeapProfile, if set, is a directory where each child writes its heap profile
	// (pprof, named after its entry) when the heals ended, before it lets go of anything.
	varStartupHeapProfile = "UNWEDGE_BENCH_STARTUP_HEAPPROFILE"
	// startupHealCap is unwedge's maxStartupHeals.
	startupHealCap = 100_000
	// eventEvery is how often a message arrives during the start.
	eventEvery = 100 * time.Millisecond
)

// TestStartupScale: for each size and database, with and without a rollback, the events wait at
// most unwedge.MaxStartupWait, a rollback heals min(N, 100,000) devices and a start without one
// heals none. Sizes: UNWEDGE_BENCH_STARTUP (Postgres, default 300) and
// UNWEDGE_BENCH_STARTUP_SQLITE (default 300); Postgres only when the stack runs.
func TestStartupScale(t *testing.T) {
	if entry := os.Getenv(varStartupEntry); entry != "" {
		runStartupChild(t, entry)
		return
	}
	requireStackForFigures(t)
	type entry struct {
		dialect  string
		sessions int
		rollback bool
	}
	var entries []entry
	_, postgres := testenv.Databases(t)[testenv.Postgres]
	for _, size := range envInts(t, varStartupPostgres, 300) {
		if postgres {
			entries = append(entries, entry{testenv.Postgres, size, false}, entry{testenv.Postgres, size, true})
		}
	}
	for _, size := range envInts(t, varStartupSQLite, 300) {
		entries = append(entries, entry{testenv.SQLite, size, false}, entry{testenv.SQLite, size, true})
	}
	var results []StartupResult
	for _, e := range entries {
		name := fmt.Sprintf("%s/%d/%v", e.dialect, e.sessions, e.rollback)
		res := runStartupEntry(t, name, e.dialect, e.sessions, e.rollback)
		t.Logf("%+v", res)
		want := 0
		if res.Rollback {
			want = min(res.Sessions, startupHealCap)
		}
		if res.Heals != want || res.Healed != want {
			t.Errorf("%s: %d heals, %d healed, want %d each", name, res.Heals, res.Healed, want)
		}
		if res.EventsBlockedMaxMS > float64(unwedge.MaxStartupWait.Milliseconds()) {
			t.Errorf("%s: an event waited %.0f ms, want at most %s", name, res.EventsBlockedMaxMS, unwedge.MaxStartupWait)
		}
		results = append(results, res)
	}
	benchOut(t, "startup", results)
}

// runStartupEntry fills a bridge's crypto store with sessions Olm sessions on a fresh database
// of dialect, behind the homeserver's generation if rollback, and runs its start in a child
// process.
func runStartupEntry(t *testing.T, name, dialect string, sessions int, rollback bool) StartupResult {
	ctx := t.Context()
	uri := testenv.SQLiteURI(t)
	if dialect != testenv.SQLite {
		uri = testenv.Databases(t)[dialect] // a fresh Postgres database
	}
	db := testenv.OpenDatabase(t, dialect, uri)
	sizePool(db)
	hs := newHomeserver(t)
	hs.DiscardToDevice()
	bridge := newBridgeDevice(t, hs, db, false)
	began := time.Now()
	healable := 0
	if rollback {
		healable = min(sessions, startupHealCap)
	}
	fillSessions(t, ctx, hs, db, string(bridge.DeviceID), sessions, healable)
	fill := time.Since(began).Seconds()
	if rollback {
		// The homeserver's generation is ahead of the database's (none): a restore.
		if err := bridge.Client.SetAccountData(ctx, unwedge.GenerationEventType, unwedge.Generation{IdentityKey: bridge.IdentityKey(), Value: 5}); err != nil {
			t.Fatal(err)
		}
	}

	out := t.TempDir() + "/startup.json"
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run", "^TestStartupScale$", "-test.count=1", "-test.timeout=120m", "-test.v")
	cmd.Env = append(os.Environ(), varStartupEntry+"="+name, varStartupDB+"="+uri, varStartupHS+"="+bridge.Client.HomeserverURL.String(),
		varStartupToken+"="+bridge.Client.AccessToken, varStartupResult+"="+out)
	if output, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", name, err, output)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("%s: no figures: %v", name, err)
	}
	var res StartupResult
	if err = json.Unmarshal(data, &res); err != nil {
		t.Fatal(err)
	}
	res.FillSeconds = fill
	return res
}

// runStartupChild is the child process of one entry: the bridge's start, measured.
func runStartupChild(t *testing.T, entry string) {
	parts := strings.Split(entry, "/")
	if len(parts) != 3 {
		t.Fatalf("bad entry %q", entry)
	}
	sessions, err := strconv.Atoi(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	res := measureStartup(t, parts[0], sessions, parts[2] == "true")
	data, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	if err = os.WriteFile(os.Getenv(varStartupResult), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// measureStartup starts the bridge whose store the parent filled, against the parent's
// homeserver, and measures its startup check while messages arrive.
func measureStartup(t *testing.T, dialect string, sessions int, rollback bool) StartupResult {
	ctx := t.Context()
	db := testenv.OpenDatabase(t, dialect, os.Getenv(varStartupDB))
	sizePool(db)
	client, err := mautrix.NewClient(os.Getenv(varStartupHS), bridgeUser, os.Getenv(varStartupToken))
	if err != nil {
		t.Fatal(err)
	}
	client.DeviceID = bridgeDevice
	bridge := cryptotest.Open(t, client, bridgeStore(t, db, bridgeDevice, false), zerolog.Nop())
	u, udb := unwedgeBridge(t, bridge, db, "startup")
	keeper := unwedge.NewGenerationKeeper(udb.Generation, &unwedge.AccountDataMirror{Client: bridge.Client}, bridge.Wrapped, bridge.IdentityKey(), zerolog.Nop())

	res := StartupResult{DB: dialect, Sessions: sessions, Rollback: rollback}
	peak := startPhasePeak(t)
	started := time.Now()
	events := startEvents(ctx, db, string(bridge.DeviceID))
	run := u.StartHealAtStartup(zerolog.Nop().WithContext(ctx), keeper, udb.Shared, nil)
	run.WaitFirst(ctx, unwedge.MaxStartupWait)
	res.SecondsToFirstEvent = time.Since(started).Seconds()
	events.open()
	<-run.Done()
	if dir := os.Getenv(varStartupHeapProfile); dir != "" {
		writeHeapProfile(t, filepath.Join(dir, fmt.Sprintf("heap-%s-%d-%v.pprof", dialect, sessions, rollback)))
	}
	res.TotalSeconds = time.Since(started).Seconds()
	res.EventsBlockedMaxMS = events.stop()
	// VmHWM, reset when the phase started: the loading of the machine is no part of it.
	res.PeakRSSMB, res.PeakHeapMB, res.BaseHeapMB, _ = peak.stop()
	report := run.Report()
	res.CheckSeconds, res.HealSeconds = report.CheckDuration.Seconds(), report.HealDuration.Seconds()
	res.Heals, res.Healed = report.Heals, report.Outcomes[unwedge.ActionHealed]
	if !report.Finished {
		t.Errorf("the check did not finish: %+v", report)
	}
	// The bridge lives on after its start: what its machine and Unwedger hold counts.
	runtime.KeepAlive(bridge)
	runtime.KeepAlive(u)
	return res
}

// writeHeapProfile writes the heap in use to path (pprof), after a collection.
func writeHeapProfile(t *testing.T, path string) {
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err = pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}

// fillSessions writes n Olm sessions of the bridge's account, one per device, with a real pickle
// under distinct session IDs and sender keys, and the devices' crypto_device rows; device i was
// used i ms before device i-1. The first healable devices are on the homeserver with a one-time
// key (they can be healed); the others exist only in the tables.
func fillSessions(t *testing.T, ctx context.Context, hs *cryptotest.Homeserver, db *dbutil.Database, account string, n, healable int) {
	pickle := cryptotest.SessionPickle(t)
	const rowsPerInsert = 100
	now := time.Now().Add(-time.Hour)
	for start := 0; start < n; start += rowsPerInsert {
		end := min(start+rowsPerInsert, n)
		var sessionRows, deviceRows []string
		var sessionArgs, deviceArgs []any
		for i := start; i < end; i++ {
			userID := id.UserID(fmt.Sprintf("@user%d:example.org", i))
			var dev *id.Device
			if i < healable {
				dev = hs.AddPeer(userID, "PHONE")
			} else {
				dev = &id.Device{UserID: userID, DeviceID: "PHONE", IdentityKey: tableOnlyKey(i), SigningKey: id.Ed25519(fmt.Sprintf("s%042d", i))}
			}
			used := now.Add(-time.Duration(i) * time.Millisecond)
			p := len(sessionArgs)
			sessionRows = append(sessionRows, fmt.Sprintf("($%d, $%d, $%d, $%d, $%d, $%d, $%d)", p+1, p+2, p+3, p+4, p+5, p+6, p+7))
			sessionArgs = append(sessionArgs, account, fmt.Sprintf("session%036d", i), dev.IdentityKey, pickle, used.Add(-time.Hour), used, used.Add(-time.Minute))
			p = len(deviceArgs)
			deviceRows = append(deviceRows, fmt.Sprintf("($%d, $%d, $%d, $%d, 0, false, '')", p+1, p+2, p+3, p+4))
			deviceArgs = append(deviceArgs, dev.UserID, dev.DeviceID, dev.IdentityKey, dev.SigningKey)
		}
		if err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
			if _, err := db.Exec(ctx, "INSERT INTO crypto_olm_session (account_id, session_id, sender_key, session, created_at, last_encrypted, last_decrypted) VALUES "+strings.Join(sessionRows, ","), sessionArgs...); err != nil {
				return err
			}
			_, err := db.Exec(ctx, "INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, deleted, name) VALUES "+strings.Join(deviceRows, ","), deviceArgs...)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// tableOnlyKey is the identity key of device i when it exists only in the tables (not on the
// homeserver): the fill writes its session under it, and the i-th message during the start reads
// that session.
func tableOnlyKey(i int) id.IdentityKey { return id.IdentityKey(fmt.Sprintf("k%042d", i)) }

// startupEvents are the messages that arrive while the bridge starts: one every eventEvery, each
// handled once the bridge handles events (open), with a read of the sender's latest session as a
// decryption does; the longest wait from arrival to handled is the figure.
type startupEvents struct {
	gate     chan struct{}
	done     chan struct{}
	wg       sync.WaitGroup
	lock     sync.Mutex
	blocked  time.Duration
	stopOnce sync.Once
}

func startEvents(ctx context.Context, db *dbutil.Database, account string) *startupEvents {
	e := &startupEvents{gate: make(chan struct{}), done: make(chan struct{})}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		ticker := time.NewTicker(eventEvery)
		defer ticker.Stop()
		for i := 0; ; i++ {
			arrived := time.Now()
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				select {
				case <-e.gate:
				case <-ctx.Done():
					return
				}
				var pickled []byte
				_ = db.QueryRow(ctx, "SELECT session FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2 ORDER BY last_decrypted DESC LIMIT 1",
					account, tableOnlyKey(i)).Scan(&pickled)
				waited := time.Since(arrived)
				e.lock.Lock()
				e.blocked = max(e.blocked, waited)
				e.lock.Unlock()
			}()
			select {
			case <-e.done:
				return
			case <-ticker.C:
			}
		}
	}()
	return e
}

// open lets the messages be handled: the bridge handles events from now on.
func (e *startupEvents) open() { close(e.gate) }

// stop ends the arrivals and returns the longest wait, in ms.
func (e *startupEvents) stop() float64 {
	e.stopOnce.Do(func() { close(e.done) })
	e.wg.Wait()
	return float64(e.blocked.Microseconds()) / 1000
}
