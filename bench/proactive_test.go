package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// Modes of the proactive storm: the heals of all devices at startup with HealBatch, and one by
// one (Heal per device, oneByOneWorkers at once: HealBatch before it batched).
const (
	modeBatch    = "batch"
	modeOneByOne = "one-by-one"
	// oneByOneWorkers is how many heals one by one run at once.
	oneByOneWorkers = 8
)

// TestProactiveStorm: the bridge's crypto store comes back from a backup without its Olm sessions
// with D devices, and the bridge heals them all at startup, before any of them speaks: one by one
// (a key claim and a send per device) and with HealBatch (one claim and one send per
// unwedge.BatchDevices devices), in the same process on the same devices, one after the other.
// Each must create exactly D replacement sessions with D claimed keys; the batch with at most
// D/50 claim requests. Sizes: UNWEDGE_BENCH_PROACTIVE (default 100). The database is Postgres;
// without the stack, SQLite checks the counts.
func TestProactiveStorm(t *testing.T) {
	requireStackForFigures(t)
	var results []ProactiveResult
	for _, devices := range envInts(t, "UNWEDGE_BENCH_PROACTIVE", 100) {
		t.Run(strconv.Itoa(devices), func(t *testing.T) {
			lab := newProactiveLab(t, devices)
			byMode := map[string]ProactiveResult{}
			for _, mode := range []string{modeOneByOne, modeBatch} {
				res := lab.run(t, mode)
				t.Logf("%+v", res)
				if res.ReplacementSessions != int64(devices) || res.ClaimedKeys != int64(devices) || res.Healed != devices {
					t.Errorf("%s: %d replacement sessions, %d claimed keys and %d healed for %d devices, want %d each",
						mode, res.ReplacementSessions, res.ClaimedKeys, res.Healed, devices, devices)
				}
				if maxClaims := int64((devices + unwedge.BatchDevices - 1) / unwedge.BatchDevices); mode == modeBatch && res.KeyClaims > maxClaims {
					t.Errorf("batch: %d claim requests for %d devices, want at most %d", res.KeyClaims, devices, maxClaims)
				}
				byMode[mode] = res
				results = append(results, res)
			}
			r := ProactiveRatios(byMode[modeOneByOne], byMode[modeBatch])
			t.Logf("one-by-one / batch at D = %d: seconds %.2f, claim requests %.1f, sendToDevice requests %.1f, peak RSS %.2f, peak heap %.2f, allocated %.2f",
				devices, r.Seconds, r.KeyClaims, r.SendRequests, r.PeakRSS, r.PeakHeap, r.Alloc)
		})
	}
	benchOut(t, "proactive", results)
}

// proactiveLab is a bridge on Postgres (SQLite without the stack) and D devices, each of which
// had an Olm session with the bridge.
type proactiveLab struct {
	ctx     context.Context
	hs      *cryptotest.Homeserver
	db      *dbutil.Database
	bridge  *cryptotest.Device
	peers   []*cryptotest.Device
	devices []*id.Device // the peers as the bridge knows them
}

// setupChunk is how many devices the bridge opens sessions with per request while setting up.
const setupChunk = 500

func newProactiveLab(t *testing.T, devices int) *proactiveLab {
	l := &proactiveLab{ctx: t.Context(), hs: newHomeserver(t), db: cryptotest.Database(t)}
	if l.db.Dialect == dbutil.Postgres {
		l.db.RawDB.SetMaxOpenConns(maxConns)
	}
	l.bridge = newBridgeDevice(t, l.hs, l.db, false)
	for i := range devices {
		l.peers = append(l.peers, newMemoryDevice(l.hs, id.UserID(fmt.Sprintf("@user%d:example.org", i)), "PHONE"))
	}
	// The bridge opens a session with every device (a chunk at a time: one key query, one claim
	// and one send each), as it had before the backup that lost them was restored.
	for start := 0; start < devices; start += setupChunk {
		chunk := l.peers[start:min(start+setupChunk, devices)]
		users := make([]id.UserID, len(chunk))
		req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{}}
		for i, peer := range chunk {
			users[i] = peer.UserID
			req.Messages[peer.UserID] = map[id.DeviceID]*event.Content{peer.DeviceID: {}}
		}
		if _, err := l.bridge.Mach.FetchKeys(l.ctx, users, true); err != nil {
			t.Fatal(err)
		}
		encrypted, err := l.bridge.Mach.EncryptToDevices(l.ctx, event.ToDeviceDummy, req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err = l.bridge.Client.SendToDevice(l.ctx, event.ToDeviceEncrypted, encrypted); err != nil {
			t.Fatal(err)
		}
	}
	for _, peer := range l.peers {
		l.hs.Inbox(peer) // what the devices were sent is no part of the measurement
		l.devices = append(l.devices, l.bridge.Fetch(peer.UserID, peer.DeviceID))
	}
	if n := countSessions(t, l.ctx, l.bridge); n != devices {
		t.Fatalf("%d sessions established, want %d", n, devices)
	}
	return l
}

// run restores the bridge without its sessions and with an empty ledger, restarts it, and heals
// every device in the mode.
func (l *proactiveLab) run(t *testing.T, mode string) ProactiveResult {
	for _, query := range []string{"DELETE FROM crypto_olm_session WHERE account_id=$1", "DELETE FROM unwedge_heal WHERE $1<>''", "DELETE FROM unwedge_device WHERE $1<>''"} {
		if _, err := l.db.Exec(l.ctx, query, string(l.bridge.DeviceID)); err != nil {
			t.Fatal(err)
		}
	}
	l.bridge.Restart()
	u, _ := unwedgeBridge(t, l.bridge, l.db, "proactive-"+mode)
	for _, peer := range l.peers {
		l.hs.Inbox(peer)
	}
	claims, keys := l.hs.Claims(), l.hs.ClaimedKeys()
	sends, sent := l.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type), l.hs.ToDevice(event.ToDeviceEncrypted.Type)
	peak := startPhasePeak(t)
	started := time.Now()
	var decisions []unwedge.Decision
	if mode == modeBatch {
		decisions = u.HealBatch(l.ctx, l.devices, unwedge.ClassRolledBack)
	} else {
		decisions = healOneByOne(l.ctx, u, l.devices)
	}
	seconds := time.Since(started).Seconds()
	res := ProactiveResult{Mode: mode, Devices: len(l.devices), Seconds: seconds}
	res.PeakRSSMB, res.PeakHeapMB, res.BaseHeapMB, res.AllocMB = peak.stop()
	res.KeyClaims, res.ClaimedKeys = l.hs.Claims()-claims, l.hs.ClaimedKeys()-keys
	res.SendRequests, res.ToDeviceSent = l.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type)-sends, l.hs.ToDevice(event.ToDeviceEncrypted.Type)-sent
	res.ReplacementSessions = int64(countSessions(t, l.ctx, l.bridge))
	for _, d := range decisions {
		if d.Action == unwedge.ActionHealed {
			res.Healed++
		}
	}
	return res
}

// healOneByOne heals each device with Heal, oneByOneWorkers at once: a key claim and a send per
// device.
func healOneByOne(ctx context.Context, u *unwedge.Unwedger, devices []*id.Device) []unwedge.Decision {
	decisions := make([]unwedge.Decision, len(devices))
	next := make(chan int)
	var wg sync.WaitGroup
	for range oneByOneWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				decisions[i] = u.Heal(ctx, devices[i], unwedge.ClassRolledBack, "")
			}
		}()
	}
	for i := range devices {
		next <- i
	}
	close(next)
	wg.Wait()
	return decisions
}

// phasePeak records the peak resident memory and Go heap of one phase of the process: the heap
// in use is sampled, and the kernel's peak RSS is reset at the start (Linux's clear_refs), so
// that what an earlier phase held does not count.
type phasePeak struct {
	sampler             *peakSampler
	baseHeap, baseAlloc uint64
}

func startPhasePeak(t testing.TB) *phasePeak {
	runtime.GC()
	debug.FreeOSMemory()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Logf("Peak RSS not reset (%v): it includes the phases before", err)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return &phasePeak{sampler: startPeakSampler(), baseHeap: ms.HeapInuse, baseAlloc: ms.TotalAlloc}
}

// stop returns the phase's peak RSS and heap, the heap in use when it started, and what the
// phase allocated, in MB.
func (p *phasePeak) stop() (rssMB, heapMB, baseHeapMB, allocMB float64) {
	rssMB, heapMB = p.sampler.stop()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return rssMB, heapMB, float64(p.baseHeap) / (1 << 20), float64(ms.TotalAlloc-p.baseAlloc) / (1 << 20)
}
