package unwedge_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// memoryMirror stands for the bot's account data on the homeserver, which replicas of one bridge
// share.
type memoryMirror struct {
	lock sync.Mutex
	gen  unwedge.Generation
	ok   bool
}

func (m *memoryMirror) Get(context.Context) (unwedge.Generation, bool, error) {
	m.lock.Lock()
	defer m.lock.Unlock()
	return m.gen, m.ok, nil
}

func (m *memoryMirror) Put(_ context.Context, gen unwedge.Generation) error {
	m.lock.Lock()
	defer m.lock.Unlock()
	m.gen, m.ok = gen, true
	return nil
}

// gatedGenerations and gatedMirror call before ahead of every call, so that a test runs another
// replica's steps between them.
type gatedGenerations struct {
	unwedge.Generations
	before func()
}

func (g gatedGenerations) Current(ctx context.Context) (unwedge.Generation, bool, error) {
	g.before()
	return g.Generations.Current(ctx)
}

func (g gatedGenerations) Advance(ctx context.Context, key id.IdentityKey) (unwedge.Generation, error) {
	g.before()
	return g.Generations.Advance(ctx, key)
}

type gatedMirror struct {
	unwedge.GenerationMirror
	before func()
}

func (g gatedMirror) Get(ctx context.Context) (unwedge.Generation, bool, error) {
	g.before()
	return g.GenerationMirror.Get(ctx)
}

func (g gatedMirror) Put(ctx context.Context, gen unwedge.Generation) error {
	g.before()
	return g.GenerationMirror.Put(ctx, gen)
}

// TestGenerationCheckReplicas: two replicas of a bridge on one database and one homeserver
// account. Replica A moves the generation on (the database, then the homeserver) while replica B
// starts and checks it; wherever A's two steps fall among B's calls (its two reads, then its own
// move on), B never takes A's progress for a rollback, and the check after both does not either.
// A database that really went back is still noticed.
func TestGenerationCheckReplicas(t *testing.T) {
	const key = id.IdentityKey("bridge-identity-key")
	db := cryptotest.Database(t)
	generations := cryptotest.UnwedgeDB(t, db).Generation
	ctx := t.Context()

	// newKeeper is a replica: its own store and keeper, the shared database and mirror.
	newKeeper := func(local unwedge.Generations, remote unwedge.GenerationMirror) (*unwedge.GenerationKeeper, *unwedge.Store) {
		store := unwedge.NewStore(crypto.NewMemoryStore(nil), nil, nil)
		return unwedge.NewGenerationKeeper(local, remote, store, key, zerolog.Nop()), store
	}
	// start is a replica that ran before: the generation is 1 in both places.
	start := func(t *testing.T, mirror *memoryMirror) {
		if _, err := db.Exec(ctx, "DELETE FROM unwedge_generation"); err != nil {
			t.Fatal(err)
		}
		keeper, _ := newKeeper(generations, mirror)
		if check, err := keeper.Check(ctx); err != nil || check.RolledBack {
			t.Fatalf("first start: %s, %v", check, err)
		}
	}

	// B's Check makes four calls: two reads, then its own Advance and Put. A's steps run before
	// call i (i < 4) or after the check (i = 4).
	const points = 5
	for advanceAt := 0; advanceAt < points; advanceAt++ {
		for putAt := advanceAt; putAt < points; putAt++ {
			t.Run(fmt.Sprintf("A advances at %d, puts at %d", advanceAt, putAt), func(t *testing.T) {
				mirror := &memoryMirror{}
				start(t, mirror)

				// Replica A: its Put waits until the test lets it go.
				var paused atomic.Bool
				advanced, release, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
				keeperA, storeA := newKeeper(generations, gatedMirror{mirror, func() {
					if paused.Load() {
						close(advanced)
						<-release
					}
				}})
				if _, err := keeperA.Check(ctx); err != nil {
					t.Fatal(err)
				}
				paused.Store(true)
				if err := storeA.PutAccount(ctx, &crypto.OlmAccount{}); err != nil {
					t.Fatal(err)
				}
				stepsAt := func(point int) {
					if point == advanceAt {
						// Stop moves the generation on once more: the store changed.
						go func() { keeperA.Stop(ctx); close(done) }()
						<-advanced
					}
					if point == putAt {
						close(release)
						<-done
					}
				}

				// Replica B starts.
				calls := 0
				before := func() {
					stepsAt(calls)
					calls++
				}
				keeperB, _ := newKeeper(gatedGenerations{generations, before}, gatedMirror{mirror, before})
				check, err := keeperB.Check(ctx)
				if err != nil {
					t.Fatal(err)
				}
				stepsAt(points - 1)
				if check.RolledBack {
					t.Errorf("replica B took replica A's progress for a rollback: %s", check)
				}

				// A third start, after both: A's Put may have come after B's and left the
				// homeserver behind the database, which is no rollback either.
				keeperC, _ := newKeeper(generations, mirror)
				if check, err = keeperC.Check(ctx); err != nil {
					t.Fatal(err)
				} else if check.RolledBack {
					t.Errorf("the start after both replicas found a rollback: %s", check)
				}
			})
		}
	}

	t.Run("database restored", func(t *testing.T) {
		mirror := &memoryMirror{}
		start(t, mirror)
		keeper, store := newKeeper(generations, mirror)
		for range 3 {
			if err := store.PutAccount(ctx, &crypto.OlmAccount{}); err != nil {
				t.Fatal(err)
			}
			keeper.Stop(ctx)
		}
		if _, err := db.Exec(ctx, "UPDATE unwedge_generation SET generation = 2"); err != nil {
			t.Fatal(err)
		}
		keeperB, _ := newKeeper(generations, mirror)
		if check, err := keeperB.Check(ctx); err != nil {
			t.Fatal(err)
		} else if !check.RolledBack {
			t.Errorf("a database restored to generation 2 was not noticed: %s", check)
		}
	})
}
