package unwedge

import (
	"context"
	"sync"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// Store decorates the bridge's crypto.Store. The OlmMachine asks its store whether and which Olm
// session to use, and tells it what it decrypted; Store uses that to
//   - see how each Olm to-device event ended (decrypted, replayed, unreadable session, a peer
//     that went back in time), through an observation that HandleToDevice puts in the context,
//   - make SendEncryptedToDevice create a new outbound session during a heal (a heal in the
//     context makes HasSession false until the new session exists, and then returns only it).
//
// mautrix-go's own unwedging is not switched off here: since v0.32 the machine asks
// NeedsUnwedgeCallback instead of unwedging by itself, and the Unwedger sets that callback.
//
// Without such a context value every call goes to the wrapped store unchanged.
type Store struct {
	crypto.Store
}

// NewStore wraps a crypto store.
func NewStore(inner crypto.Store) *Store {
	return &Store{Store: inner}
}

func (s *Store) HasSession(ctx context.Context, key id.SenderKey) bool {
	if h := healFrom(ctx, key); h != nil {
		return h.session() != nil
	}
	return s.Store.HasSession(ctx, key)
}

func (s *Store) GetLatestSession(ctx context.Context, key id.SenderKey) (*crypto.OlmSession, error) {
	if h := healFrom(ctx, key); h != nil {
		// Only the replacement session: if no one-time key could be claimed, SendEncryptedToDevice
		// fails instead of sending m.dummy over the broken session.
		return h.session(), nil
	}
	return s.Store.GetLatestSession(ctx, key)
}

func (s *Store) AddSession(ctx context.Context, key id.SenderKey, session *crypto.OlmSession) error {
	err := s.Store.AddSession(ctx, key, session)
	if err != nil {
		if h := healFrom(ctx, key); h != nil {
			// The machine only logs this; the heal must know the failure was the database's.
			h.setStoreErr(err)
		}
		return err
	}
	if h := healFrom(ctx, key); h != nil {
		h.setSession(session)
		if h.onCreated != nil {
			h.onCreated(session)
		}
	} else if obs := observationFrom(ctx); obs != nil {
		obs.newInbound = true
	}
	return nil
}

func (s *Store) UpdateSession(ctx context.Context, key id.SenderKey, session *crypto.OlmSession) error {
	if obs := observationFrom(ctx); obs != nil && obs.hash != ([32]byte{}) && wentBack(session, obs.ratchet) {
		obs.wentBack = true
	}
	return s.Store.UpdateSession(ctx, key, session)
}

func (s *Store) GetSessions(ctx context.Context, key id.SenderKey) (crypto.OlmSessionList, error) {
	sessions, err := s.Store.GetSessions(ctx, key)
	if obs := observationFrom(ctx); obs != nil {
		obs.sessionsRead = true
		obs.sessionCount = len(sessions)
		obs.sessionsErr = err
	}
	return sessions, err
}

func (s *Store) GetOlmHash(ctx context.Context, hash [32]byte) (time.Time, error) {
	at, err := s.Store.GetOlmHash(ctx, hash)
	if obs := observationFrom(ctx); obs != nil && obs.hash == hash && err == nil && !at.IsZero() {
		obs.duplicate = true
	}
	return at, err
}

func (s *Store) PutOlmHash(ctx context.Context, hash [32]byte, at time.Time) error {
	if obs := observationFrom(ctx); obs != nil && obs.hash == hash {
		obs.decrypted = true
	}
	return s.Store.PutOlmHash(ctx, hash, at)
}

type contextKey int

const (
	observationKey contextKey = iota
	healKey
)

// observation collects what the store saw while the machine handled one Olm ciphertext.
// The machine handles one to-device event at a time under its Olm lock, so no locking is needed.
type observation struct {
	hash         [32]byte
	ratchet      ratchetPosition
	wentBack     bool
	duplicate    bool
	decrypted    bool
	newInbound   bool
	sessionsRead bool
	sessionCount int
	sessionsErr  error
	// needsUnwedge: the machine said it would unwedge the sender (NeedsUnwedgeCallback).
	needsUnwedge bool
}

func withObservation(ctx context.Context, obs *observation) context.Context {
	return context.WithValue(ctx, observationKey, obs)
}

func observationFrom(ctx context.Context) *observation {
	obs, _ := ctx.Value(observationKey).(*observation)
	return obs
}

// healContext marks a heal of one device: the machine must create a new session with it.
type healContext struct {
	key     id.SenderKey
	lock    sync.Mutex
	created *crypto.OlmSession
	// storeErr is why the crypto store could not keep a new session, until takeStoreErr.
	storeErr error
	// onCreated is called once the new session is stored.
	onCreated func(*crypto.OlmSession)
}

func (h *healContext) setStoreErr(err error) {
	h.lock.Lock()
	h.storeErr = err
	h.lock.Unlock()
}

func (h *healContext) takeStoreErr() error {
	h.lock.Lock()
	defer h.lock.Unlock()
	err := h.storeErr
	h.storeErr = nil
	return err
}

func (h *healContext) session() *crypto.OlmSession {
	h.lock.Lock()
	defer h.lock.Unlock()
	return h.created
}

func (h *healContext) setSession(sess *crypto.OlmSession) {
	h.lock.Lock()
	h.created = sess
	h.lock.Unlock()
}

func withHeal(ctx context.Context, h *healContext) context.Context {
	return context.WithValue(ctx, healKey, h)
}

func healFrom(ctx context.Context, key id.SenderKey) *healContext {
	h, _ := ctx.Value(healKey).(*healContext)
	if h == nil || h.key != key {
		return nil
	}
	return h
}
