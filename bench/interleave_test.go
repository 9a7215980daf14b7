package bench

import (
	"runtime"
	"slices"
	"testing"
	"time"
)

// modes are the two sides of the success path benchmarks; their index is the mode's in turns.
var modes = [2]string{"stock", "unwedge"}

// turns is what interleave measured: the time of each mode's turns, round by round (two per
// round, one for the last round when n is odd), and the heap allocations of all its turns.
type turns struct {
	events int
	took   [2][][]time.Duration
	allocs [2]uint64
}

// interleave has both modes handle their events 0 to n-1, in order, one event per turn, in
// rounds of ABBA order. A turn is one event because the noise on this machine (other processes
// on its two cores, Postgres writing back, a GC cycle) changes within milliseconds: of turns of
// 1, 3, 10 and 30 events, one gave the steadiest ratios. Each turn is timed alone; counting its
// allocations stops the world, outside the timed part.
func interleave(n int, handle [2]func(i int)) turns {
	// Each mode goes first as often as second, and a drift of the machine's speed during the
	// round weighs on both alike.
	abba := [4]int{0, 1, 1, 0}
	t := turns{events: n}
	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	allocs := mem.Mallocs
	for round := 0; 2*round < n; round++ {
		var took [2][]time.Duration
		for k, mode := range abba {
			i := 2*round + k/2
			if i == n {
				break
			}
			began := time.Now()
			handle[mode](i)
			took[mode] = append(took[mode], time.Since(began))
			runtime.ReadMemStats(&mem)
			t.allocs[mode] += mem.Mallocs - allocs
			allocs = mem.Mallocs
		}
		for m := range took {
			t.took[m] = append(t.took[m], took[m])
		}
	}
	return t
}

// perEvent is a mode's mean time per event, in nanoseconds.
func (t turns) perEvent(mode int) float64 {
	var total time.Duration
	for _, round := range t.took[mode] {
		total += sum(round)
	}
	return float64(total.Nanoseconds()) / float64(t.events)
}

// ratio is mode 0's total time over mode 1's: stock / unwedge, below 1 when unwedge is slower.
// It is the throughput ratio, so it holds every event, also a burst of noise that hit one side.
func (t turns) ratio() float64 {
	return t.perEvent(0) / t.perEvent(1)
}

// pairedRatio is the median over the rounds of each round's ratio: what a typical event costs in
// one mode against the other, at the same moment. A burst of noise moves it by one rank where it
// moves the ratio of the totals by its whole length; a cost unwedge adds to every event moves
// both alike, but one it adds to a few events only (a periodic flush, say) shows in the totals
// alone.
func (t turns) pairedRatio() float64 {
	ratios := make([]float64, len(t.took[0]))
	for r := range ratios {
		ratios[r] = float64(sum(t.took[0][r])) / float64(sum(t.took[1][r]))
	}
	return Median(ratios)
}

// report gives the figures to the benchmark, for cmd/bench. Units name the mode; both ratios
// are stock time over unwedge time.
func (t turns) report(b *testing.B) {
	for m, mode := range modes {
		b.ReportMetric(t.perEvent(m), mode+"-ns/event")
		b.ReportMetric(float64(t.allocs[m])/float64(t.events), mode+"-allocs/event")
	}
	b.ReportMetric(t.ratio(), "stock/unwedge")
	b.ReportMetric(t.pairedRatio(), "paired-stock/unwedge")
}

func sum(durations []time.Duration) time.Duration {
	var total time.Duration
	for _, d := range durations {
		total += d
	}
	return total
}

func TestInterleave(t *testing.T) {
	tests := []struct {
		name  string
		n     int
		order []int // the mode of each turn
	}{
		{"one event", 1, []int{0, 1}},
		{"one round", 2, []int{0, 1, 1, 0}},
		{"odd", 5, []int{0, 1, 1, 0, 0, 1, 1, 0, 0, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var seen [2][]int
			var order []int
			var handle [2]func(int)
			for m := range handle {
				handle[m] = func(i int) {
					order = append(order, m)
					seen[m] = append(seen[m], i)
				}
			}
			got := interleave(tt.n, handle)
			if !slices.Equal(order, tt.order) {
				t.Errorf("turns went to modes %v, want %v", order, tt.order)
			}
			for m := range seen {
				if len(seen[m]) != tt.n || !slices.IsSorted(seen[m]) || seen[m][tt.n-1] != tt.n-1 {
					t.Errorf("mode %d handled events %v, want 0 to %d in order", m, seen[m], tt.n-1)
				}
				if rounds := len(got.took[m]); rounds != (tt.n+1)/2 {
					t.Errorf("mode %d has %d rounds, want %d", m, rounds, (tt.n+1)/2)
				}
			}
		})
	}
}

func TestTurnsFigures(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name                   string
		stock, unwedge         [][]time.Duration
		stockNS, ratio, paired float64
	}{
		{"equal", [][]time.Duration{{1 * ms, 2 * ms}, {3 * ms}}, [][]time.Duration{{2 * ms, 1 * ms}, {3 * ms}}, 2e6, 1, 1},
		{"unwedge 10 % slower", [][]time.Duration{{1 * ms, 1 * ms}, {2 * ms, 2 * ms}}, [][]time.Duration{{1.1e6, 1.1e6}, {2.2e6, 2.2e6}}, 1.5e6, 1 / 1.1, 1 / 1.1},
		// One round where noise hit stock alone: the total moves, the median of the rounds not.
		{"noise on one side", [][]time.Duration{{1 * ms, 1 * ms}, {1 * ms, 1 * ms}, {1 * ms, 7 * ms}}, [][]time.Duration{{1 * ms, 1 * ms}, {1 * ms, 1 * ms}, {1 * ms, 1 * ms}}, 2e6, 2, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var events int
			for _, round := range tt.stock {
				events += len(round)
			}
			got := turns{events: events, took: [2][][]time.Duration{tt.stock, tt.unwedge}}
			if ns := got.perEvent(0); !near(ns, tt.stockNS) {
				t.Errorf("stock per event = %v ns, want %v", ns, tt.stockNS)
			}
			if r := got.ratio(); !near(r, tt.ratio) {
				t.Errorf("ratio = %v, want %v", r, tt.ratio)
			}
			if r := got.pairedRatio(); !near(r, tt.paired) {
				t.Errorf("paired ratio = %v, want %v", r, tt.paired)
			}
		})
	}
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }
