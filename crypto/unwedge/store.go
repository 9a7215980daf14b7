package unwedge

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/id"
)

// Store decorates the bridge's crypto.Store. The OlmMachine asks its store whether and which Olm
// session to use, and tells it what it decrypted; Store uses that to
//   - see how each Olm to-device event ended (decrypted, replayed, unreadable session, a peer
//     that went back in time), through an observation that HandleToDevice puts in the context,
//   - make EncryptToDevices (the heal engine's one call) create a new outbound session for each
//     device it heals (a heal in the context makes HasSession false until the
//     new session exists, and then returns only it),
//     with one one-time key claimed per heal: a session the crypto store failed to keep stays
//     in the heal and is stored on its next attempt, instead of being lost with its key,
//   - record at which index each device got each of the bridge's Megolm sessions, so that a
//     device asking for one again gets no more than it had (AnswerOwnSession).
//
// mautrix-go's own unwedging is not switched off here: since v0.32 the machine asks
// NeedsUnwedgeCallback instead of unwedging by itself, and the Unwedger sets that callback.
//
// Without such a context value every call goes to the wrapped store unchanged.
//
// Relies on the call orders of crypto/decryptolm.go, crypto/encryptolm.go and
// crypto/encryptmegolm.go (pinned in internal/upstream).
type Store struct {
	crypto.Store
	shared SharedIndex
	// history, if not nil, keeps earlier states of the Olm sessions (history.go).
	history *History

	// outbound holds the bridge's outbound Megolm sessions that the machine loaded or stored, by
	// session ID (the latest one per room), to read the index a share hands out. A session the
	// machine removes stays until the room has another: mautrix-go removes a room's session when
	// it learns of a device change, also while it is sharing that very session.
	outboundLock sync.Mutex
	outbound     map[id.SessionID]*crypto.OutboundGroupSession
	outboundRoom map[id.RoomID]id.SessionID

	// writes counts the changes to the state a restore from a backup takes back: the account, Olm
	// sessions, and Megolm sessions in and out (GenerationKeeper).
	writes atomic.Uint64

	// tables, when the wrapped store is mautrix-go's SQL store, writes the heals' replacement
	// sessions to its table without its session cache, and uncached holds those of the running
	// heals, by session ID (storeReplacement).
	tables   *CryptoTables
	uncached lockedMap[id.SessionID, *healContext]
}

// SharedIndex keeps the index at which the bridge first shared each of its own Megolm sessions
// with a device. SharedQuery implements it.
type SharedIndex interface {
	RecordShared(ctx context.Context, sessionID id.SessionID, key id.IdentityKey, index uint32) error
	FirstShared(ctx context.Context, sessionID id.SessionID, key id.IdentityKey) (index uint32, ok bool, err error)
}

// NewStore wraps a crypto store. shared, if not nil, records the index each device got the
// bridge's Megolm sessions at; history, if not nil, keeps earlier states of the Olm sessions
// (unwedge.olm_history).
func NewStore(inner crypto.Store, shared SharedIndex, history *History) *Store {
	s := &Store{Store: inner, shared: shared, history: history,
		outbound: make(map[id.SessionID]*crypto.OutboundGroupSession), outboundRoom: make(map[id.RoomID]id.SessionID)}
	if sql, ok := inner.(*crypto.SQLCryptoStore); ok {
		s.tables = &CryptoTables{DB: sql.DB, AccountID: sql.AccountID, PickleKey: sql.PickleKey}
	}
	return s
}

// A heal's replacement session is written to the SQL store's table but not to its session cache.
// mautrix-go's SQLCryptoStore keeps every Olm session it adds or loads in memory for the life of
// the process (about 1 kB each): a start after a rollback heals up to 100,000 devices, most of
// which may not talk for a long time, and the cache would hold all their sessions. The heal holds
// the one object of its session until it ends; the machine loads the session from the table (into
// its cache) when it next needs it.
//
// The cache is how the machine keeps one object per session: two objects of one session would
// each move the ratchet, and the one written last would undo the other. So:
//   - the machine loads and uses sessions only under its olmLock, and the heal uses its object
//     only there too, in EncryptToDevices, which writes it back (UpdateSession) before it lets
//     go: whenever the machine loads the session, the table holds the heal's state;
//   - when the machine loads the session while the heal runs, the heal adopts the machine's
//     object (adopt) and uses that one from then on;
//   - if writing it back failed, the heal does not send what it encrypted (unsaved), so the
//     table's older state is still one the peer can follow;
//   - the Unwedger's own reads outside olmLock are copies (peekSessions), never the cache's.
//
// Relies on crypto/sql_store.go's session cache and crypto/encryptolm.go, decryptolm.go,
// encryptmegolm.go and machine.go loading sessions under olmLock (pinned in internal/upstream).

// storeReplacement writes a heal's new session: to the SQL store's table only, or, in another
// store, with its AddSession.
func (s *Store) storeReplacement(ctx context.Context, h *healContext, key id.SenderKey, sess *crypto.OlmSession) error {
	if s.tables == nil {
		return s.Store.AddSession(ctx, key, sess)
	}
	// Held before the write: an insert that reports an error may still have been committed.
	s.uncached.update(sess.ID(), func(*healContext, bool) (*healContext, bool) { return h, true })
	return s.tables.InsertSession(ctx, key, sess)
}

// adopt gives the running heals whose sessions the machine just loaded the machine's objects.
func (s *Store) adopt(sessions ...*crypto.OlmSession) {
	if s.uncached.len() == 0 {
		return
	}
	for _, sess := range sessions {
		if sess == nil {
			continue
		}
		if h, ok := s.uncached.get(sess.ID()); ok {
			s.uncached.delete(sess.ID())
			h.adopt(sess)
		}
	}
}

// forget lets go of a heal that ended: the machine loads its session from the table from now on.
func (s *Store) forget(h *healContext) {
	if sess, _ := h.replacement(); sess != nil {
		s.uncached.update(sess.ID(), func(held *healContext, ok bool) (*healContext, bool) { return held, ok && held != h })
	}
}

// peekSessions reads the sessions with the key for reading only, outside the machine's olmLock:
// copies, which the SQL store's cache does not get.
func (s *Store) peekSessions(ctx context.Context, key id.SenderKey) (crypto.OlmSessionList, error) {
	if s.tables == nil {
		return s.Store.GetSessions(ctx, key)
	}
	return s.tables.PeekSessions(ctx, key)
}

// keepOutbound remembers the room's current outbound session.
func (s *Store) keepOutbound(sess *crypto.OutboundGroupSession) {
	if sess == nil {
		return
	}
	s.outboundLock.Lock()
	defer s.outboundLock.Unlock()
	if old, ok := s.outboundRoom[sess.RoomID]; ok && old != sess.ID() {
		delete(s.outbound, old)
	}
	s.outboundRoom[sess.RoomID] = sess.ID()
	s.outbound[sess.ID()] = sess
}

// Writes returns how many times the account, an Olm session or a Megolm session was written.
func (s *Store) Writes() uint64 { return s.writes.Load() }

func (s *Store) PutAccount(ctx context.Context, account *crypto.OlmAccount) error {
	s.writes.Add(1)
	return s.Store.PutAccount(ctx, account)
}

func (s *Store) PutGroupSession(ctx context.Context, session *crypto.InboundGroupSession) error {
	s.writes.Add(1)
	return s.Store.PutGroupSession(ctx, session)
}

func (s *Store) AddOutboundGroupSession(ctx context.Context, sess *crypto.OutboundGroupSession) error {
	s.writes.Add(1)
	s.keepOutbound(sess)
	return s.Store.AddOutboundGroupSession(ctx, sess)
}

func (s *Store) UpdateOutboundGroupSession(ctx context.Context, sess *crypto.OutboundGroupSession) error {
	s.writes.Add(1)
	s.keepOutbound(sess)
	return s.Store.UpdateOutboundGroupSession(ctx, sess)
}

func (s *Store) GetOutboundGroupSession(ctx context.Context, roomID id.RoomID) (*crypto.OutboundGroupSession, error) {
	sess, err := s.Store.GetOutboundGroupSession(ctx, roomID)
	if err == nil {
		s.keepOutbound(sess)
	}
	return sess, err
}

// MarkOutboundGroupSessionShared is called once the machine sent a device the session's key: the
// key it sent is the session's share content (which the machine computes once per loaded
// session, so a device may get an earlier index than the session's current one).
func (s *Store) MarkOutboundGroupSessionShared(ctx context.Context, userID id.UserID, key id.IdentityKey, sessionID id.SessionID) error {
	if err := s.Store.MarkOutboundGroupSessionShared(ctx, userID, key, sessionID); err != nil {
		return err
	}
	if s.shared == nil {
		return nil
	}
	s.outboundLock.Lock()
	sess := s.outbound[sessionID]
	s.outboundLock.Unlock()
	if sess == nil {
		// The machine shares only sessions it loaded or stored through this store.
		return fmt.Errorf("outbound Megolm session %s shared without passing the store", sessionID)
	}
	index, err := sharedIndex(sess)
	if err != nil {
		return err
	}
	return s.shared.RecordShared(ctx, sessionID, key, index)
}

// sharedIndex is the first index of the key in the session's share content.
func sharedIndex(sess *crypto.OutboundGroupSession) (uint32, error) {
	content := sess.ShareContent()
	igs, err := olm.NewInboundGroupSession([]byte(content.AsRoomKey().SessionKey))
	if err != nil {
		return 0, fmt.Errorf("failed to read the shared key of Megolm session %s: %w", sess.ID(), err)
	}
	return igs.FirstKnownIndex(), nil
}

// HasSession in a heal says whether the heal has its replacement session yet. The machine claims
// one of the device's one-time keys when told false, so false is said only until a claim gave one
// (whether or not the store could keep the session it made), and is noted as a claim.
//
// Relies on crypto/encryptolm.go createOutboundSessions claiming a key when HasSession is false
// (pinned in internal/upstream).
func (s *Store) HasSession(ctx context.Context, key id.SenderKey) bool {
	if h := healFrom(ctx, key); h != nil {
		return !h.claiming()
	}
	return s.Store.HasSession(ctx, key)
}

// GetLatestSession in a heal returns only the replacement session, and only once the store has
// it: if no one-time key could be claimed, EncryptToDevices encrypts nothing instead of m.dummy
// over the broken session, and no message goes over a session that a restart would lose. A
// session the store failed to keep when it was made is stored now, or the attempt fails.
//
// Relies on crypto/encryptolm.go EncryptToDevices calling it after createOutboundSessions (pinned
// in internal/upstream).
func (s *Store) GetLatestSession(ctx context.Context, key id.SenderKey) (*crypto.OlmSession, error) {
	if h := healFrom(ctx, key); h != nil {
		sess, stored := h.replacement()
		if sess == nil || stored {
			return sess, nil
		}
		if err := s.keep(ctx, h, key, sess); err != nil {
			return nil, fmt.Errorf("%w: %w", errCryptoStore, err)
		}
		h.setStored()
		sess, _ = h.replacement()
		return sess, nil
	}
	sess, err := s.Store.GetLatestSession(ctx, key)
	s.adopt(sess)
	return sess, storeErr(err)
}

// errStore marks the crypto store's own failures (its database), which say nothing about a
// peer's device and may go away by themselves: a heal that meets one is retried, and does not
// end as the device's fault. The device lookups a heal makes go through these methods.
var errStore = errors.New("crypto store")

func storeErr(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", errStore, err)
}

func (s *Store) GetDevice(ctx context.Context, userID id.UserID, deviceID id.DeviceID) (*id.Device, error) {
	dev, err := s.Store.GetDevice(ctx, userID, deviceID)
	return dev, storeErr(err)
}

func (s *Store) GetDevices(ctx context.Context, userID id.UserID) (map[id.DeviceID]*id.Device, error) {
	devices, err := s.Store.GetDevices(ctx, userID)
	return devices, storeErr(err)
}

func (s *Store) FindDeviceByKey(ctx context.Context, userID id.UserID, key id.IdentityKey) (*id.Device, error) {
	dev, err := s.Store.FindDeviceByKey(ctx, userID, key)
	return dev, storeErr(err)
}

func (s *Store) PutDevice(ctx context.Context, userID id.UserID, device *id.Device) error {
	return storeErr(s.Store.PutDevice(ctx, userID, device))
}

func (s *Store) PutDevices(ctx context.Context, userID id.UserID, devices map[id.DeviceID]*id.Device) error {
	return storeErr(s.Store.PutDevices(ctx, userID, devices))
}

// keep stores a heal's replacement session that the store failed to keep when it was made. The
// first insert may have been written although it reported an error (a connection that broke
// after the commit), so a session the store already holds counts as kept (and the heal adopts
// the store's object of it).
func (s *Store) keep(ctx context.Context, h *healContext, key id.SenderKey, sess *crypto.OlmSession) error {
	err := s.storeReplacement(ctx, h, key, sess)
	if err == nil {
		return nil
	}
	sessions, listErr := s.Store.GetSessions(ctx, key)
	s.adopt(sessions...)
	if listErr == nil && slices.ContainsFunc(sessions, func(stored *crypto.OlmSession) bool {
		return stored.ID() == sess.ID()
	}) {
		return nil
	}
	return fmt.Errorf("failed to store replacement Olm session %s: %w", sess.ID(), err)
}

// AddSession notes a new session: a heal's replacement (whether or not the store kept it), or an
// inbound session a peer opened. Relies on crypto/encryptolm.go only logging AddSession's error,
// and crypto/decryptolm.go calling it after PutOlmHash for a new inbound session (pinned in
// internal/upstream).
func (s *Store) AddSession(ctx context.Context, key id.SenderKey, session *crypto.OlmSession) error {
	obs := observationFrom(ctx)
	if obs != nil && obs.replay != nil {
		// A state from the history decrypts one message; nothing else is stored meanwhile.
		return errReplayOnly
	}
	s.writes.Add(1)
	h := healFrom(ctx, key)
	var err error
	if h != nil {
		err = s.storeReplacement(ctx, h, key, session)
	} else {
		err = s.Store.AddSession(ctx, key, session)
	}
	if err == nil && s.history.on() {
		s.history.keep(ctx, key, session, "new session")
	}
	if h != nil {
		// The machine only logs a failure here and would forget the session, whose one-time key
		// is spent: the heal keeps it, and its next attempt stores it instead of claiming again.
		h.created(session, err == nil)
		if h.onCreated != nil {
			h.onCreated(session)
		}
		return err
	}
	if obs != nil && err == nil {
		obs.newInbound = true
	}
	return err
}

// errReplayOnly refuses to store a session while a state from the history decrypts a message.
var errReplayOnly = errors.New("no session is stored while a state from the Olm history decrypts a message")

// UpdateSession also keeps the session's state in the history when its ratchet moved: after a
// decryption (an observation) that began a new receiving chain, after an encryption that began a
// new sending chain. A state from the history that decrypted one message is never written back.
func (s *Store) UpdateSession(ctx context.Context, key id.SenderKey, session *crypto.OlmSession) error {
	obs := observationFrom(ctx)
	if obs != nil && obs.replay != nil {
		return nil
	}
	if obs != nil && obs.hash != ([32]byte{}) && wentBack(session, obs.ratchet) {
		obs.wentBack = true
	}
	s.writes.Add(1)
	if err := s.Store.UpdateSession(ctx, key, session); err != nil {
		if h := healFrom(ctx, key); h != nil {
			h.setUnsaved()
		}
		return err
	}
	switch {
	case !s.history.on():
	case obs != nil:
		s.history.decrypted(ctx, key, session, obs.ratchet)
	default:
		s.history.encrypted(ctx, key, session)
	}
	return nil
}

func (s *Store) GetSessions(ctx context.Context, key id.SenderKey) (crypto.OlmSessionList, error) {
	obs := observationFrom(ctx)
	if obs != nil && obs.replay != nil {
		return crypto.OlmSessionList{obs.replay}, nil
	}
	sessions, err := s.Store.GetSessions(ctx, key)
	s.adopt(sessions...)
	if obs != nil {
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

// DeleteOldOlmHashes first keeps the hashes in the Olm history, as long as its states, so that
// none of them decrypts those messages again (mautrix-go deletes its own after minutes). Hashes
// that could not be kept are not deleted.
//
// Relies on crypto/machine.go MarkOlmHashSavePoint deleting hashes only through this call (pinned
// in internal/upstream).
func (s *Store) DeleteOldOlmHashes(ctx context.Context, before time.Time) error {
	if s.history.on() {
		if _, err := s.history.db.KeepHashes(ctx, s.history.accountID, before); err != nil {
			return fmt.Errorf("not deleting old Olm message hashes: %w", err)
		}
	}
	return s.Store.DeleteOldOlmHashes(ctx, before)
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
	// replay, if set, is a state from the Olm history that decrypts this message: the store
	// gives the machine only this session and writes nothing of it back.
	replay *crypto.OlmSession
}

func withObservation(ctx context.Context, obs *observation) context.Context {
	return context.WithValue(ctx, observationKey, obs)
}

func observationFrom(ctx context.Context) *observation {
	obs, _ := ctx.Value(observationKey).(*observation)
	return obs
}

// healContext marks a heal of one device: the machine must create a new session with it, with at
// most one one-time key claimed for the whole heal.
type healContext struct {
	key  id.SenderKey
	lock sync.Mutex
	// session is the replacement session once a claim gave one, and stored whether the crypto
	// store has it.
	session *crypto.OlmSession
	stored  bool
	// claimed is set when the machine is about to claim a one-time key, until takeClaimed.
	claimed bool
	// onCreated is called once the new session exists, stored or not: its key is spent.
	onCreated func(*crypto.OlmSession)
	// unsaved is set when the session could not be written back after the machine encrypted
	// over it, until takeUnsaved.
	unsaved bool
}

// claiming reports whether the machine must claim a key (the heal has no replacement session
// yet), and notes the claim.
func (h *healContext) claiming() bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	if h.session != nil {
		return false
	}
	h.claimed = true
	return true
}

// takeClaimed reports whether the machine claimed a key since the last call.
func (h *healContext) takeClaimed() bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	claimed := h.claimed
	h.claimed = false
	return claimed
}

// replacement returns the replacement session (nil until a claim gave one) and whether it is stored.
func (h *healContext) replacement() (*crypto.OlmSession, bool) {
	if h == nil {
		return nil, false
	}
	h.lock.Lock()
	defer h.lock.Unlock()
	return h.session, h.stored
}

func (h *healContext) created(sess *crypto.OlmSession, stored bool) {
	h.lock.Lock()
	h.session, h.stored = sess, stored
	h.lock.Unlock()
}

// adopt makes the machine's object of the replacement session the heal's (Store.adopt).
func (h *healContext) adopt(sess *crypto.OlmSession) {
	h.lock.Lock()
	defer h.lock.Unlock()
	if h.session != nil && h.session.ID() == sess.ID() {
		h.session = sess
	}
}

func (h *healContext) setUnsaved() {
	h.lock.Lock()
	h.unsaved = true
	h.lock.Unlock()
}

// takeUnsaved reports whether the session could not be written back since the last call.
func (h *healContext) takeUnsaved() bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	unsaved := h.unsaved
	h.unsaved = false
	return unsaved
}

func (h *healContext) setStored() {
	h.lock.Lock()
	h.stored = true
	h.lock.Unlock()
}

// healSet marks the heals of a group (the heal engine), by identity key: one call of the machine
// creates the replacement sessions of them all. It is not changed while the machine uses it.
type healSet map[id.SenderKey]*healContext

func withHeals(ctx context.Context, set healSet) context.Context {
	return context.WithValue(ctx, healKey, set)
}

func healFrom(ctx context.Context, key id.SenderKey) *healContext {
	set, _ := ctx.Value(healKey).(healSet)
	return set[key]
}
