package unwedge

import (
	"maps"
	"sync"
)

// lockedMap is a map with a lock of its own: each piece of an Unwedger's state has one, so that
// unrelated state never waits on the same lock. The zero value is ready to use.
type lockedMap[K comparable, V any] struct {
	lock sync.Mutex
	m    map[K]V
	// pruneAt is the size at which prune scans next (prune).
	pruneAt int
}

func (l *lockedMap[K, V]) get(k K) (V, bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	v, ok := l.m[k]
	return v, ok
}

func (l *lockedMap[K, V]) len() int {
	l.lock.Lock()
	defer l.lock.Unlock()
	return len(l.m)
}

func (l *lockedMap[K, V]) delete(k K) {
	l.lock.Lock()
	defer l.lock.Unlock()
	delete(l.m, k)
}

// update sets k to what f returns for its current value, or deletes k when f says not to keep
// it; it returns the value f returned.
func (l *lockedMap[K, V]) update(k K, f func(old V, ok bool) (v V, keep bool)) V {
	l.lock.Lock()
	defer l.lock.Unlock()
	old, ok := l.m[k]
	v, keep := f(old, ok)
	if !keep {
		delete(l.m, k)
		return v
	}
	if l.m == nil {
		l.m = make(map[K]V)
	}
	l.m[k] = v
	return v
}

// prune deletes the entries that drop returns true for, once the map has at least atLeast of
// them (so a map that stays small is never scanned), and then again only once the map has grown
// to twice what a scan left: when nothing is old enough to drop (a storm of heals within
// min_interval), scanning on every call would cost the whole map per entry added, quadratic in
// the storm. The map holds at most twice its live entries, or atLeast.
func (l *lockedMap[K, V]) prune(atLeast int, drop func(K, V) bool) {
	l.lock.Lock()
	defer l.lock.Unlock()
	if len(l.m) < max(atLeast, l.pruneAt) {
		return
	}
	for k, v := range l.m {
		if drop(k, v) {
			delete(l.m, k)
		}
	}
	l.pruneAt = 2 * len(l.m)
}

// snapshot returns a copy of the map.
func (l *lockedMap[K, V]) snapshot() map[K]V {
	l.lock.Lock()
	defer l.lock.Unlock()
	return maps.Clone(l.m)
}
