package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestWedgedLatencies(t *testing.T) {
	sent := time.Date(2026, 11, 30, 7, 0, 0, 0, time.UTC)
	after := func(ms int) time.Time { return sent.Add(time.Duration(ms) * time.Millisecond) }
	sendTimes := map[string]time.Time{"wedged-0": sent, "wedged-1": sent, "wedged-2": sent, "wedged-3": sent, "after-0": sent}
	cases := []struct {
		name         string
		bridged      map[string]time.Time
		p50, longest int64
	}{
		{"none bridged", map[string]time.Time{}, -1, -1},
		{"only after the wedge", map[string]time.Time{"after-0": after(9000)}, -1, -1},
		{"one", map[string]time.Time{"wedged-1": after(250)}, 250, 250},
		{"odd count", map[string]time.Time{"wedged-0": after(300), "wedged-1": after(100), "wedged-2": after(200)}, 200, 300},
		{"even count: the lower middle", map[string]time.Time{
			"wedged-0": after(400), "wedged-1": after(100), "wedged-2": after(300), "wedged-3": after(200), "after-0": after(5000),
		}, 200, 400},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if p50, longest := wedgedLatencies(tc.bridged, sendTimes); p50 != tc.p50 || longest != tc.longest {
				t.Errorf("wedgedLatencies = %d, %d; want %d, %d", p50, longest, tc.p50, tc.longest)
			}
		})
	}
}

func TestSynapseHoldsDown(t *testing.T) {
	const (
		before     = "2026-11-30 07:15:10,000 - synapse.appservice.scheduler - 439 - INFO - as-sender-1 - Starting recoverer for AS ID unwedge-2\n"
		started    = "2026-11-30 07:15:12,971 - synapse.appservice.scheduler - 439 - INFO - as-sender-5802 - Starting recoverer for AS ID unwedge-2\n"
		other      = "2026-11-30 07:15:13,000 - synapse.appservice.scheduler - 439 - INFO - as-sender-5803 - Starting recoverer for AS ID unwedge-22\n"
		scheduling = "2026-11-30 07:15:14,162 - synapse.appservice.scheduler - 509 - INFO - as-recoverer-265 - Scheduling retries on unwedge-2 in 2.000000s\n"
		recovered  = "2026-11-30 07:15:16,162 - synapse.appservice.scheduler - 417 - INFO - retry-90 - Successfully recovered application service AS ID unwedge-2\n"
	)
	cases := []struct {
		name string
		// head is in the log before the offset, tail after it.
		head, tail string
		down       bool
	}{
		{"no transaction failed", "", scheduling, false},
		{"a recoverer runs", "", started + scheduling, true},
		{"recovered since", "", started + scheduling + recovered, false},
		{"another appservice", "", other, false},
		{"before the offset", before, "", false},
		{"started again after recovering", "", started + recovered + started, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "synapse.log")
			if err := os.WriteFile(path, []byte(tc.head+tc.tail), 0o600); err != nil {
				t.Fatal(err)
			}
			down, err := synapseHoldsDown(path, int64(len(tc.head)), "unwedge-2")
			if err != nil || down != tc.down {
				t.Errorf("synapseHoldsDown = %t, %v; want %t", down, err, tc.down)
			}
		})
	}
	if _, err := synapseHoldsDown(filepath.Join(t.TempDir(), "missing.log"), 0, "unwedge-2"); err == nil || !strings.Contains(err.Error(), "missing.log") {
		t.Errorf("a missing log: err = %v", err)
	}
}
