package unwedge

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"
)

// This file notices that the bridge's crypto store went back in time (restored from a backup, or
// rolled back), so that the bridge heals before its peers send over sessions it lost.
//
// A counter, the generation, goes up while the store's Olm sessions, account or Megolm sessions
// change (GenerationKeeper, at most every generationInterval and when the bridge stops). It is
// kept in two places: in the bridge's database (Generations), which a backup takes back with the
// crypto tables, and in the bot's account data on the homeserver (GenerationMirror), which it does
// not. At startup, a database generation behind the homeserver's means the crypto state is older
// than the state the bridge last ran with.
//
// Why this and not the one-time keys: the homeserver reports only how many of the bot's one-time
// keys it holds, not which, and the count after a restore can equal the count before; a key
// counter moves only when keys are used, not while the ratchets of existing sessions move on. The
// generation moves with every change that a restore takes back. What it misses: changes within
// generationInterval before the process was killed (not stopped) and then restored to exactly
// that moment, and a store restored while the homeserver's account data was restored with it.

// Generation is how far the bridge's crypto state has come, for the bot device with IdentityKey.
type Generation struct {
	IdentityKey id.IdentityKey `json:"identity_key"`
	Value       int64          `json:"generation"`
}

// Generations keeps the generation in the bridge's database (GenerationQuery implements it).
type Generations interface {
	// Current returns the stored generation; ok is false when none is stored.
	Current(ctx context.Context) (gen Generation, ok bool, err error)
	// Advance moves the identity key's generation on by one and returns it: 1 when none is
	// stored or the stored one is another identity key's. It is atomic across replicas.
	Advance(ctx context.Context, key id.IdentityKey) (Generation, error)
}

// GenerationMirror keeps a copy of the generation outside the bridge's database.
type GenerationMirror interface {
	Get(ctx context.Context) (gen Generation, ok bool, err error)
	Put(ctx context.Context, gen Generation) error
}

// GenerationEventType is the bot's account data that mirrors the generation.
const GenerationEventType = "com.github.unwedge.generation"

// AccountDataMirror keeps the generation in the bot's account data on the homeserver.
type AccountDataMirror struct {
	Client *mautrix.Client
}

func (m *AccountDataMirror) Get(ctx context.Context) (Generation, bool, error) {
	var gen Generation
	err := m.Client.GetAccountData(ctx, GenerationEventType, &gen)
	if errors.Is(err, mautrix.MNotFound) {
		return Generation{}, false, nil
	} else if err != nil {
		return Generation{}, false, fmt.Errorf("failed to read the generation from the bot's account data: %w", err)
	}
	return gen, gen.IdentityKey != "", nil
}

func (m *AccountDataMirror) Put(ctx context.Context, gen Generation) error {
	if err := m.Client.SetAccountData(ctx, GenerationEventType, gen); err != nil {
		return fmt.Errorf("failed to write the generation to the bot's account data: %w", err)
	}
	return nil
}

// GenerationCheck is what the startup check found.
type GenerationCheck struct {
	Local, Remote       Generation
	HasLocal, HasRemote bool
	// RolledBack: the database's generation is behind the homeserver's for the same device, or
	// gone while the homeserver has one: the crypto state is older than the last one run with.
	RolledBack bool
}

// String says, for people, what the check found.
func (c GenerationCheck) String() string {
	switch {
	case c.RolledBack && !c.HasLocal:
		return fmt.Sprintf("the database has no crypto generation, the homeserver has %d", c.Remote.Value)
	case c.RolledBack:
		return fmt.Sprintf("the database's crypto generation %d is behind the homeserver's %d", c.Local.Value, c.Remote.Value)
	case !c.HasRemote:
		return "the homeserver has no crypto generation yet"
	default:
		return fmt.Sprintf("the crypto generation is %d here and %d on the homeserver", c.Local.Value, c.Remote.Value)
	}
}

// generationInterval is how often, at most, the generation moves on while the store changes.
const generationInterval = 15 * time.Second

// GenerationKeeper moves the generation on while the crypto store changes.
type GenerationKeeper struct {
	local  Generations
	remote GenerationMirror
	store  *Store
	key    id.IdentityKey
	log    zerolog.Logger

	// panicGuard keeps the loop going (panics.go).
	panicGuard

	lock sync.Mutex
	// flushed is the store's write count when the generation last moved on; mirrored is whether
	// the homeserver got that generation.
	flushed  uint64
	mirrored bool
	stop     context.CancelFunc
	done     chan struct{}
}

// NewGenerationKeeper keeps the generation of the bot device with the identity key, for the
// writes to store.
func NewGenerationKeeper(local Generations, remote GenerationMirror, store *Store, key id.IdentityKey, log zerolog.Logger) *GenerationKeeper {
	return &GenerationKeeper{local: local, remote: remote, store: store, key: key, log: log}
}

// Check compares the database's generation with the homeserver's, then moves the generation on
// (the bridge starts a new one whatever it found). An error reading either side is returned with
// no check: the caller cannot tell.
//
// The homeserver is read first. Every replica writes a generation to the database (Advance,
// committed) before it mirrors it, so a generation read from the homeserver is at most the
// database's from then on, unless the database went back. Read the other way round, another
// replica moving the generation on between the two reads would look like a rollback, and this
// replica would heal every device for nothing.
//
// A slower replica's mirror write can land after a faster one's and take the homeserver back
// (the database has 6, the homeserver 5): that is harmless, a homeserver behind the database is no
// rollback. It only lets a restore to those last generations go unnoticed until the next write
// mirrors the database's generation again, the same blind spot as a write the homeserver missed.
func (k *GenerationKeeper) Check(ctx context.Context) (GenerationCheck, error) {
	var check GenerationCheck
	var err error
	if check.Remote, check.HasRemote, err = k.remote.Get(ctx); err != nil {
		return check, err
	}
	if check.Local, check.HasLocal, err = k.local.Current(ctx); err != nil {
		return check, err
	}
	// A generation of another device (the bot's device was reset) says nothing about this one.
	check.HasRemote = check.HasRemote && check.Remote.IdentityKey == k.key
	check.HasLocal = check.HasLocal && check.Local.IdentityKey == k.key
	check.RolledBack = check.HasRemote && (!check.HasLocal || check.Local.Value < check.Remote.Value)
	if err = k.advance(ctx, true); err != nil {
		k.log.Warn().Err(err).Msg("Failed to move the crypto generation on; retried while the bridge runs")
	}
	return check, nil
}

// advance moves the generation on when the store changed since it last did (or always), and
// mirrors it; a generation the homeserver missed is mirrored on the next call.
func (k *GenerationKeeper) advance(ctx context.Context, always bool) error {
	k.lock.Lock()
	defer k.lock.Unlock()
	writes := k.store.Writes()
	if !always && writes == k.flushed && k.mirrored {
		return nil
	}
	gen, err := k.local.Advance(ctx, k.key)
	if err != nil {
		return err
	}
	k.flushed, k.mirrored = writes, false
	if err = k.remote.Put(ctx, gen); err != nil {
		return err
	}
	k.mirrored = true
	return nil
}

// Start moves the generation on every generationInterval while the store changes, until Stop.
func (k *GenerationKeeper) Start() {
	ready := make(chan struct{})
	close(ready)
	k.StartAfter(ready)
}

// StartAfter is Start, the loop's first round waiting for ready to be closed: the startup check
// (StartupRun.Checked) runs in the background, and moving the generation on before it compared
// the two would hide a rollback.
func (k *GenerationKeeper) StartAfter(ready <-chan struct{}) {
	ctx, cancel := context.WithCancel(k.log.WithContext(context.Background()))
	k.stop, k.done = cancel, make(chan struct{})
	go func() {
		defer close(k.done)
		select {
		case <-ctx.Done():
			return
		case <-ready:
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(generationInterval):
			}
			// One request: the next round tries again.
			if err := k.catch(ctx, PanicAdvanceGeneration, func() error {
				return k.advance(mautrix.WithMaxRetries(ctx, 0), false)
			}); err != nil && ctx.Err() == nil {
				k.log.Warn().Err(err).Msg("Failed to move the crypto generation on")
			}
		}
	}()
}

// stopTimeout bounds the last move of the generation when the bridge stops.
const stopTimeout = 10 * time.Second

// Stop ends the loop and moves the generation on one last time if the store changed (one request
// to the homeserver, within stopTimeout: a homeserver that is down does not hold the stop up).
func (k *GenerationKeeper) Stop(ctx context.Context) {
	if k.stop != nil {
		k.stop()
		<-k.done
	}
	ctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	if err := k.advance(mautrix.WithMaxRetries(ctx, 0), false); err != nil {
		k.log.Warn().Err(err).Msg("Failed to move the crypto generation on before stopping")
	}
}
