package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
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
// D/50 claim requests. Sizes: UNWEDGE_BENCH_PROACTIVE (default 100); UNWEDGE_BENCH_PROACTIVE_PROFILE
// names a directory for CPU profiles of the heals. The database is Postgres; without the stack,
// SQLite checks the counts.
func TestProactiveStorm(t *testing.T) {
	requireStackForFigures(t)
	var results []ProactiveResult
	for _, devices := range envInts(t, "UNWEDGE_BENCH_PROACTIVE", 100) {
		t.Run(strconv.Itoa(devices), func(t *testing.T) {
			results = append(results, healBothWays(t, newProactiveLab(t, devices))...)
		})
	}
	benchOut(t, "proactive", results)
}

// healBothWays heals the lab's devices one by one, then batched, and checks that each way
// created exactly one replacement session per device with one claimed key each, and that the
// batch claimed at most unwedge.BatchDevices devices' keys per request.
func healBothWays(t *testing.T, lab *proactiveLab) []ProactiveResult {
	devices := len(lab.devices)
	var results []ProactiveResult
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
	t.Logf("one-by-one / batch at D = %d on %s: seconds %.2f, claim requests %.1f, sendToDevice requests %.1f, peak RSS %.2f, peak heap %.2f, allocated %.2f",
		devices, r.Homeserver, r.Seconds, r.KeyClaims, r.SendRequests, r.PeakRSS, r.PeakHeap, r.Alloc)
	return results
}

// proactiveLab is a bridge on Postgres (SQLite without the stack) and D devices, each of which
// had an Olm session with the bridge, on a homeserver.
type proactiveLab struct {
	ctx     context.Context
	hs      proactiveHomeserver
	db      *dbutil.Database
	bridge  *cryptotest.Device
	devices []*id.Device // the peers as the bridge knows them
}

// proactiveHomeserver is what the proactive storm heals through, and where it counts the bridge's
// requests.
type proactiveHomeserver interface {
	name() string
	// requests is what the bridge sent so far: /keys/claim requests and the devices in them,
	// /sendToDevice requests of m.room.encrypted and the messages in them.
	requests() requestCounts
	// settle hands the devices what they were sent, which is no part of the measurement.
	settle(t testing.TB)
}

type requestCounts struct{ claims, claimedKeys, sends, sent int64 }

func (c requestCounts) minus(d requestCounts) requestCounts {
	return requestCounts{c.claims - d.claims, c.claimedKeys - d.claimedKeys, c.sends - d.sends, c.sent - d.sent}
}

// memoryHomeserver is the crypto test kit's homeserver with the storm's simulated devices.
type memoryHomeserver struct {
	hs    *cryptotest.Homeserver
	peers []*cryptotest.Device
}

func (memoryHomeserver) name() string { return HomeserverMemory }

func (m memoryHomeserver) requests() requestCounts {
	return requestCounts{m.hs.Claims(), m.hs.ClaimedKeys(), m.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type), m.hs.ToDevice(event.ToDeviceEncrypted.Type)}
}

func (m memoryHomeserver) settle(testing.TB) {
	for _, peer := range m.peers {
		m.hs.Inbox(peer)
	}
}

// setupChunk is how many devices the bridge opens sessions with per request while setting up.
const setupChunk = 500

func newProactiveLab(t *testing.T, devices int) *proactiveLab {
	hs := newHomeserver(t)
	l := &proactiveLab{ctx: t.Context(), db: cryptotest.Database(t)}
	sizePool(l.db)
	l.bridge = newBridgeDevice(t, hs, l.db, false)
	memory := memoryHomeserver{hs: hs}
	peers := make([]id.Device, devices)
	for i := range devices {
		peer := newMemoryDevice(hs, id.UserID(fmt.Sprintf("@user%d:example.org", i)), "PHONE")
		memory.peers = append(memory.peers, peer)
		peers[i] = id.Device{UserID: peer.UserID, DeviceID: peer.DeviceID}
	}
	l.hs = memory
	l.openSessions(t, peers)
	return l
}

// openSessions has the bridge open a session with every peer (a chunk at a time: one key query,
// one claim and one send each), as it had before the backup that lost them was restored.
func (l *proactiveLab) openSessions(t *testing.T, peers []id.Device) {
	for start := 0; start < len(peers); start += setupChunk {
		chunk := peers[start:min(start+setupChunk, len(peers))]
		var users []id.UserID
		req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{}}
		for _, peer := range chunk {
			if req.Messages[peer.UserID] == nil {
				users = append(users, peer.UserID)
				req.Messages[peer.UserID] = map[id.DeviceID]*event.Content{}
			}
			req.Messages[peer.UserID][peer.DeviceID] = &event.Content{}
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
	l.hs.settle(t)
	for _, peer := range peers {
		l.devices = append(l.devices, l.bridge.Fetch(peer.UserID, peer.DeviceID))
	}
	if n := countSessions(t, l.ctx, l.bridge); n != len(peers) {
		t.Fatalf("%d sessions established, want %d", n, len(peers))
	}
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
	l.hs.settle(t)
	before := l.hs.requests()
	peak := startPhasePeak(t)
	stopProfile := startProfile(t, fmt.Sprintf("proactive-%s-%s-%d", l.hs.name(), mode, len(l.devices)))
	started := time.Now()
	var decisions []unwedge.Decision
	if mode == modeBatch {
		decisions = u.HealBatch(l.ctx, l.devices, unwedge.ClassRolledBack)
	} else {
		decisions = healOneByOne(l.ctx, u, l.devices)
	}
	seconds := time.Since(started).Seconds()
	stopProfile()
	res := ProactiveResult{Homeserver: l.hs.name(), Mode: mode, Devices: len(l.devices), Seconds: seconds,
		MSPerDevice: Round(seconds * 1000 / float64(len(l.devices)))}
	res.PeakRSSMB, res.PeakHeapMB, res.BaseHeapMB, res.AllocMB = peak.stop()
	sent := l.hs.requests().minus(before)
	res.KeyClaims, res.ClaimedKeys, res.SendRequests, res.ToDeviceSent = sent.claims, sent.claimedKeys, sent.sends, sent.sent
	res.ReplacementSessions = int64(countSessions(t, l.ctx, l.bridge))
	for _, d := range decisions {
		if d.Action == unwedge.ActionHealed {
			res.Healed++
		}
	}
	return res
}

// varProfile names a directory for CPU profiles of the proactive storm's heals alone (not of its
// setup, which go test's -cpuprofile would include): one file per homeserver, mode and D.
const varProfile = "UNWEDGE_BENCH_PROACTIVE_PROFILE"

// startProfile starts a CPU profile named name in the directory varProfile names, if any, and
// returns what stops it.
func startProfile(t testing.TB, name string) func() {
	dir := os.Getenv(varProfile)
	if dir == "" {
		return func() {}
	}
	f, err := os.Create(filepath.Join(dir, name+".cpu"))
	if err != nil {
		t.Fatal(err)
	}
	if err = pprof.StartCPUProfile(f); err != nil {
		t.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	}
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
