package unwedge

import "testing"

// TestLockedMapPrune: prune drops what it is told to once the map reaches its size, and a map
// where nothing is old enough to drop (a storm of heals within min_interval) is not scanned on
// every entry added: the scans cost O(entries) in all, not O(entries²) (10,000 heals spent 10 %
// of their CPU in such scans), and the map never holds more than twice its live entries.
func TestLockedMapPrune(t *testing.T) {
	cases := []struct {
		name string
		// old tells which entries are old enough to drop.
		old func(k int) bool
		// live is how many of the n entries are not old.
		n, live int
	}{
		{"nothing to drop", func(int) bool { return false }, 10_000, 10_000},
		{"everything to drop", func(int) bool { return true }, 10_000, 0},
		{"every other entry", func(k int) bool { return k%2 == 0 }, 10_000, 5000},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var m lockedMap[int, bool]
			visits := 0
			for i := range tc.n {
				m.update(i, func(bool, bool) (bool, bool) { return true, true })
				m.prune(1024, func(k int, _ bool) bool { visits++; return tc.old(k) })
			}
			if visits > 4*tc.n {
				t.Errorf("prune visited %d entries for %d added, want at most %d", visits, tc.n, 4*tc.n)
			}
			if left, most := m.len(), max(1024, 2*tc.live); left > most {
				t.Errorf("%d entries left of %d live, want at most %d", left, tc.live, most)
			}
		})
	}
}
