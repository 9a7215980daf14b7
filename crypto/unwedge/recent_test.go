package unwedge

import "testing"

// TestRecentSet: the set of recorded events keeps only the latest ones (security finding 2: the
// in-memory sets are bounded), and removing or re-adding members keeps its count right.
func TestRecentSet(t *testing.T) {
	set := newRecentSet[int](3)
	for i := range 10 {
		set.add(i)
	}
	set.add(8) // re-added: now the latest
	if !set.remove(7) || set.remove(7) || set.remove(5) {
		t.Fatal("7 must be in the set once, 5 must have been forgotten")
	}
	set.add(10)
	set.add(11)
	if len(set.members) != 3 || !set.remove(8) || !set.remove(10) || !set.remove(11) || set.remove(9) {
		t.Fatalf("the set must hold 8, 10 and 11")
	}
	for i := range 10_000 {
		set.add(i % 7)
	}
	if len(set.members) != 3 {
		t.Fatalf("len = %d, want 3", len(set.members))
	}
}
