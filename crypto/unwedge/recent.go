package unwedge

// recentSet is a set that keeps at most its capacity of the latest added members: adding to a
// full set forgets the oldest member. It is not safe for concurrent use.
type recentSet[T comparable] struct {
	capacity int
	members  map[T]uint64
	// order holds the members by when they were added, with the stamp they were added with; a
	// removed or re-added member leaves a stale entry that is skipped.
	order []recentEntry[T]
	next  uint64
}

type recentEntry[T comparable] struct {
	member T
	stamp  uint64
}

func newRecentSet[T comparable](capacity int) recentSet[T] {
	return recentSet[T]{capacity: capacity, members: make(map[T]uint64)}
}

func (s *recentSet[T]) add(member T) {
	s.next++
	s.members[member] = s.next
	s.order = append(s.order, recentEntry[T]{member, s.next})
	for len(s.members) > s.capacity {
		s.dropOldest()
	}
	if len(s.order) > 2*s.capacity {
		s.compact()
	}
}

func (s *recentSet[T]) has(member T) bool {
	_, ok := s.members[member]
	return ok
}

// remove reports whether member was in the set.
func (s *recentSet[T]) remove(member T) bool {
	_, ok := s.members[member]
	delete(s.members, member)
	return ok
}

func (s *recentSet[T]) dropOldest() {
	for len(s.order) > 0 {
		e := s.order[0]
		s.order = s.order[1:]
		if s.members[e.member] == e.stamp {
			delete(s.members, e.member)
			return
		}
	}
}

// compact drops the stale entries of order, so it stays within twice the capacity.
func (s *recentSet[T]) compact() {
	live := make([]recentEntry[T], 0, len(s.members))
	for _, e := range s.order {
		if stamp, ok := s.members[e.member]; ok && stamp == e.stamp {
			live = append(live, e)
		}
	}
	s.order = live
}
