package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestStorm: the bridge loses its Olm sessions with D devices at once (restored from a backup
// without them), and each device sends M messages. unwedge must create exactly D replacement
// sessions (one key claim each), and none more after a restart within the hour, when the devices
// (not yet online to learn the new sessions) keep sending on the old ones. The same storm on
// mautrix-go's built-in unwedge is measured beside it, and so are two replicas of the bridge on
// one database sharing the events (the same numbers must hold). Sizes: UNWEDGE_BENCH_STORM
// (default 50). The database is Postgres; without the stack, SQLite checks the counts.
func TestStorm(t *testing.T) {
	requireStackForFigures(t)
	messages := envInts(t, "UNWEDGE_BENCH_STORM_MESSAGES", 5)[0]
	var results []StormResult
	for _, devices := range envInts(t, "UNWEDGE_BENCH_STORM", 50) {
		for _, mode := range []string{"unwedge", "unwedge-2-replicas", "stock"} {
			t.Run(fmt.Sprintf("%s/%d", mode, devices), func(t *testing.T) {
				res := runStorm(t, mode, devices, messages)
				t.Logf("%+v", res)
				if mode != "stock" {
					if res.ReplacementSessions != int64(devices) || res.ClaimedKeys != int64(devices) {
						t.Errorf("%d replacement sessions and %d claimed keys for %d wedged devices, want %d each",
							res.ReplacementSessions, res.ClaimedKeys, devices, devices)
					}
					if res.AfterRestartSessions != 0 {
						t.Errorf("%d sessions after a restart within the hour, want 0", res.AfterRestartSessions)
					}
				}
				results = append(results, res)
			})
		}
	}
	benchOut(t, "storm", results)
}

func runStorm(t *testing.T, mode string, devices, messages int) StormResult {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	stock := mode == "stock"
	hs := newHomeserver(t)
	db := cryptotest.Database(t)
	sizePool(db)
	bridge := newBridgeDevice(t, hs, db, stock)
	if !stock {
		unwedgeBridge(t, bridge, db, "storm-1")
	}
	// D devices open sessions with the bridge, in batches as a syncing bridge sees them: it
	// decrypts a batch, then tops up its one-time keys (an account keeps at most 100, so topping
	// up before decrypting would drop keys the devices are about to use).
	peers := make([]*cryptotest.Device, devices)
	for i := range peers {
		peers[i] = newMemoryDevice(hs, id.UserID(fmt.Sprintf("@user%d:example.org", i)), "PHONE")
		peers[i].SendDummy(bridge)
		if i%25 == 24 || i == devices-1 {
			hs.Receive(bridge)
			if err := bridge.Mach.ShareKeys(ctx, hs.OneTimeKeys(bridge)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := countSessions(t, ctx, bridge); n != devices {
		t.Fatalf("%d sessions established, want %d", n, devices)
	}

	// The storm: the bridge comes back without its sessions (wedge), and every device talks.
	if _, err := db.Exec(ctx, "DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridge.DeviceID)); err != nil {
		t.Fatal(err)
	}
	// With two replicas, a second bridge process on the same database (its own machine and
	// Unwedger) gets every other to-device event, as behind a load balancer.
	var replica *cryptotest.Device
	if mode == "unwedge-2-replicas" {
		replica = hs.Replica(bridge)
	}
	handle := bridge.Handle
	restart := func(owner string) {
		bridge.Restart()
		if stock {
			return
		}
		unwedgeBridge(t, bridge, db, owner)
		if replica != nil {
			replica.Restart()
			unwedgeBridge(t, replica, db, owner+"-replica")
			next := 0
			handle = func(evt *event.Event) {
				if next++; next%2 == 0 {
					replica.Handle(evt)
				} else {
					bridge.Handle(evt)
				}
			}
		}
	}
	restart("storm-2")
	for round := 0; round < messages; round++ {
		for _, peer := range peers {
			peer.SendDummy(bridge)
		}
	}
	claimsBefore, keysBefore, sentBefore := hs.Claims(), hs.ClaimedKeys(), hs.ToDevice("m.room.encrypted")
	peak := startPeakSampler()
	started := time.Now()
	for _, evt := range hs.Inbox(bridge) {
		handle(evt)
	}
	// Heals run in the background: wait until every device has its session (or nothing moves).
	created := waitStable(ctx, func() int64 { return int64(countSessions(t, ctx, bridge)) }, int64(devices))
	seconds := time.Since(started).Seconds()
	rss, heap := peak.stop()
	res := StormResult{
		Mode: mode, Devices: devices, MessagesPerDevice: messages, ReplacementSessions: created,
		KeyClaims: hs.Claims() - claimsBefore, ClaimedKeys: hs.ClaimedKeys() - keysBefore,
		ToDeviceSent: hs.ToDevice("m.room.encrypted") - sentBefore, Seconds: seconds, PeakRSSMB: rss, PeakHeapMB: heap,
	}

	// A restart within the hour; the devices have not been online, so they still use the old
	// sessions and fail again.
	restart("storm-3")
	for _, peer := range peers {
		peer.SendDummy(bridge)
	}
	for _, evt := range hs.Inbox(bridge) {
		handle(evt)
	}
	res.AfterRestartSessions = waitStable(ctx, func() int64 { return int64(countSessions(t, ctx, bridge)) }, -1) - created
	return res
}

func countSessions(t testing.TB, ctx context.Context, bridge *cryptotest.Device) int {
	var n int
	if err := bridge.SQL.DB.QueryRow(ctx, "SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1", string(bridge.DeviceID)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitStable polls value until it reaches want (or, with want < 0, stops changing for 2 s).
func waitStable(ctx context.Context, value func() int64, want int64) int64 {
	last, lastChange := value(), time.Now()
	for ctx.Err() == nil {
		v := value()
		if want >= 0 && v >= want {
			return v
		}
		if v != last {
			last, lastChange = v, time.Now()
		} else if time.Since(lastChange) > 5*time.Second || (want < 0 && time.Since(lastChange) > 2*time.Second) {
			return v
		}
		time.Sleep(20 * time.Millisecond)
	}
	return last
}

// peakSampler records the process's peak resident memory and Go heap while it runs.
type peakSampler struct {
	stopCh chan struct{}
	wg     sync.WaitGroup
	heap   uint64
}

func startPeakSampler() *peakSampler {
	p := &peakSampler{stopCh: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			p.heap = max(p.heap, ms.HeapInuse)
			select {
			case <-p.stopCh:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return p
}

func (p *peakSampler) stop() (rssMB, heapMB float64) {
	close(p.stopCh)
	p.wg.Wait()
	return float64(vmHWM()) / 1024, float64(p.heap) / (1 << 20)
}

// vmHWM is the process's peak resident set size in KiB (Linux), or 0.
func vmHWM() int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			fields := strings.Fields(line)
			if len(fields) >= 2 {
				n, _ := strconv.ParseInt(fields[1], 10, 64)
				return n
			}
		}
	}
	return 0
}
