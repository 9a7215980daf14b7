package main

import (
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/unwedge/unwedge/bench"
)

// output is go test's, as package bench's success path benchmarks print it.
const output = `goos: linux
BenchmarkMegolmDecrypt-2   	     200	   2911739 ns/op	         0.9927 paired-stock/unwedge	       444.7 stock-allocs/event	   1354145 stock-ns/event	         0.9238 stock/unwedge	       444.4 unwedge-allocs/event	   1465829 unwedge-ns/event
BenchmarkMegolmDecrypt-2   	     200	   2887941 ns/op	         1.000 paired-stock/unwedge	       444.7 stock-allocs/event	   1406939 stock-ns/event	         0.9799 stock/unwedge	       444.3 unwedge-allocs/event	   1435739 unwedge-ns/event
BenchmarkOlmDecrypt
BenchmarkOlmDecrypt-2      	     200	   2647112 ns/op	         0.9722 paired-stock/unwedge	       460.2 stock-allocs/event	   1196898 stock-ns/event	         0.9533 stock/unwedge	       474.1 unwedge-allocs/event	   1255511 unwedge-ns/event
PASS
`

func TestParseBenchmarks(t *testing.T) {
	got := parseBenchmarks(output)
	tests := []struct {
		name, unit string
		want       []float64
	}{
		{"MegolmDecrypt", "ns/op", []float64{2911739, 2887941}},
		{"MegolmDecrypt", "stock/unwedge", []float64{0.9238, 0.9799}},
		{"MegolmDecrypt", "paired-stock/unwedge", []float64{0.9927, 1}},
		{"OlmDecrypt", "unwedge-allocs/event", []float64{474.1}},
		{"OlmDecrypt", "stock-ns/event", []float64{1196898}},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(got[tt.name][tt.unit], tt.want) {
			t.Errorf("%s %s = %v, want %v", tt.name, tt.unit, got[tt.name][tt.unit], tt.want)
		}
	}
}

func TestDecryptFigures(t *testing.T) {
	results := parseBenchmarks(output)
	megolm, err := decryptFigures(results, "MegolmDecrypt")
	if err != nil {
		t.Fatal(err)
	}
	want := decrypt{
		stockNS: (1354145 + 1406939) / 2.0, unwedgeNS: (1465829 + 1435739) / 2.0, stockAllocs: 444.7, unwedgeAllocs: 444.35,
		ratio: 0.952, pairedRatio: 0.996,
		runs: DecryptRuns{Ratio: []float64{0.9238, 0.9799}, PairedRatio: []float64{0.9927, 1}},
	}
	if !reflect.DeepEqual(megolm, want) {
		t.Errorf("figures = %+v, want %+v", megolm, want)
	}
	if _, err = decryptFigures(results, "SomethingElse"); err == nil || !strings.Contains(err.Error(), "no stock-ns/event figures") {
		t.Errorf("figures of a benchmark that did not run: error %v", err)
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		values []float64
		want   float64
	}{
		{nil, 0},
		{[]float64{3}, 3},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		if got := bench.Median(tt.values); got != tt.want {
			t.Errorf("bench.Median(%v) = %v, want %v", tt.values, got, tt.want)
		}
	}
}

// TestProactiveRatios: the proactive storm's figures are paired by homeserver and D, one-by-one
// over batch.
func TestProactiveRatios(t *testing.T) {
	const memory, synapse = bench.HomeserverMemory, bench.HomeserverSynapse
	results := []bench.ProactiveResult{
		{Homeserver: memory, Mode: "one-by-one", Devices: 1000, KeyClaims: 1000, SendRequests: 1000, Seconds: 6, PeakRSSMB: 300, PeakHeapMB: 200, AllocMB: 90},
		{Homeserver: memory, Mode: "batch", Devices: 1000, KeyClaims: 20, SendRequests: 20, Seconds: 4, PeakRSSMB: 300, PeakHeapMB: 250, AllocMB: 60},
		{Homeserver: memory, Mode: "one-by-one", Devices: 10, KeyClaims: 10, SendRequests: 10, Seconds: 1, PeakRSSMB: 30, PeakHeapMB: 20},
		{Homeserver: memory, Mode: "batch", Devices: 10, KeyClaims: 1, SendRequests: 1, Seconds: 0.5, PeakRSSMB: 30, PeakHeapMB: 20},
		{Homeserver: memory, Mode: "batch", Devices: 7, KeyClaims: 1, SendRequests: 1, Seconds: 1}, // no one-by-one run: no ratio
		// The same D on Synapse is a pair of its own.
		{Homeserver: synapse, Mode: "one-by-one", Devices: 1000, KeyClaims: 1000, SendRequests: 1000, Seconds: 30, PeakRSSMB: 100, PeakHeapMB: 50},
		{Homeserver: synapse, Mode: "batch", Devices: 1000, KeyClaims: 20, SendRequests: 20, Seconds: 3, PeakRSSMB: 100, PeakHeapMB: 50},
	}
	want := []bench.ProactiveRatio{
		{Homeserver: memory, Devices: 1000, Seconds: 1.5, KeyClaims: 50, SendRequests: 50, PeakRSS: 1, PeakHeap: 0.8, Alloc: 1.5},
		{Homeserver: memory, Devices: 10, Seconds: 2, KeyClaims: 10, SendRequests: 10, PeakRSS: 1, PeakHeap: 1},
		{Homeserver: synapse, Devices: 1000, Seconds: 10, KeyClaims: 50, SendRequests: 50, PeakRSS: 1, PeakHeap: 1},
	}
	if got := proactiveRatios(results); !reflect.DeepEqual(got, want) {
		t.Errorf("ratios = %+v, want %+v", got, want)
	}
}

// TestPrintProactive: the table has a row per homeserver, mode and D, and the ratios of each.
func TestPrintProactive(t *testing.T) {
	r := &Report{Proactive: []bench.ProactiveResult{
		{Homeserver: "memory", Mode: "one-by-one", Devices: 1000, Healed: 1000, ReplacementSessions: 1000, KeyClaims: 1000, ClaimedKeys: 1000, SendRequests: 1000, Seconds: 6, MSPerDevice: 6, PeakRSSMB: 300, PeakHeapMB: 200},
		{Homeserver: "memory", Mode: "batch", Devices: 1000, Healed: 1000, ReplacementSessions: 1000, KeyClaims: 20, ClaimedKeys: 1000, SendRequests: 20, Seconds: 4, MSPerDevice: 4, PeakRSSMB: 300, PeakHeapMB: 250},
		{Homeserver: "synapse", Mode: "one-by-one", Devices: 1000, Healed: 1000, ReplacementSessions: 1000, KeyClaims: 1000, ClaimedKeys: 1000, SendRequests: 1000, Seconds: 12.5, MSPerDevice: 12.5, PeakRSSMB: 90, PeakHeapMB: 40},
		{Homeserver: "synapse", Mode: "batch", Devices: 1000, Healed: 1000, ReplacementSessions: 1000, KeyClaims: 20, ClaimedKeys: 1000, SendRequests: 20, Seconds: 2.5, MSPerDevice: 2.5, PeakRSSMB: 90, PeakHeapMB: 40},
	}}
	r.ProactiveRatios = proactiveRatios(r.Proactive)
	var out strings.Builder
	printProactive(&out, r)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 7 {
		t.Fatalf("%d lines, want a header, four runs and two ratios:\n%s", len(lines), out.String())
	}
	for i, want := range [][]string{
		{"one-by-one", "memory", "1000", "6.0", "6.00", "300", "200"},
		{"batch", "memory", "1000", "20", "4.0", "4.00", "250"},
		{"one-by-one", "synapse", "1000", "12.5", "12.50", "90", "40"},
		{"batch", "synapse", "1000", "20", "2.5", "2.50"},
		{"one-by-one / batch", "memory", "1000", "50.0", "1.50", "1.00", "0.80"},
		{"one-by-one / batch", "synapse", "1000", "50.0", "5.00"},
	} {
		if fields := strings.Join(strings.Fields(lines[i+1]), " "); !containsAll(fields, want) {
			t.Errorf("line %d = %q, want %q in it", i+1, fields, want)
		}
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// TestProactiveKeys: the keys of the proactive storm's and the startup's JSON entries, which
// docs/performance.md and other checks read; keys are added, never renamed.
func TestProactiveKeys(t *testing.T) {
	tests := []struct {
		value any
		want  []string
	}{
		{bench.ProactiveResult{}, []string{"homeserver", "mode", "devices", "healed", "replacement_sessions", "key_claims", "claimed_keys",
			"send_to_device_requests", "to_device_sent", "seconds", "ms_per_device", "peak_rss_mb", "peak_heap_mb", "base_heap_mb", "alloc_mb"}},
		{bench.ProactiveRatio{}, []string{"homeserver", "devices", "seconds_ratio", "key_claims_ratio", "send_to_device_requests_ratio",
			"peak_rss_ratio", "peak_heap_ratio", "alloc_ratio"}},
		{bench.StartupResult{}, []string{"db", "sessions", "rollback", "seconds_to_first_event", "events_blocked_max_ms", "check_seconds",
			"heal_seconds", "total_seconds", "peak_rss_mb", "heals", "healed", "fill_seconds", "base_heap_mb", "peak_heap_mb"}},
	}
	for _, tt := range tests {
		data, err := json.Marshal(tt.value)
		if err != nil {
			t.Fatal(err)
		}
		var fields map[string]any
		if err = json.Unmarshal(data, &fields); err != nil {
			t.Fatal(err)
		}
		got := slices.Sorted(maps.Keys(fields))
		if want := slices.Sorted(slices.Values(tt.want)); !slices.Equal(got, want) {
			t.Errorf("%T keys = %v, want %v", tt.value, got, want)
		}
	}
}

// TestFigureFiles: every file whose figures goTest shows is one of package bench's.
func TestFigureFiles(t *testing.T) {
	for _, file := range figureFiles {
		if _, err := os.Stat(filepath.Join("..", "..", "bench", file)); err != nil {
			t.Errorf("figureFiles names %s: %v", file, err)
		}
	}
}
