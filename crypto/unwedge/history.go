package unwedge

// This file keeps the Olm history: earlier states of the bridge's Olm sessions, so that what a
// client restored from a backup sends can still be decrypted. A restored client sends from the
// state it had at its backup:
//
//   - after a message from the bridge, it starts a new sending chain against the bridge's ratchet
//     key of that time; the bridge has moved its ratchet on since and kept only its current
//     private key, so the chain it derives is not the client's (bad MAC);
//   - after a message of its own, it goes on with its old chain at an index the bridge already
//     consumed (message key not found).
//
// Either way the bridge once held what decrypts the message (its ratchet private key and root
// key at an earlier step, or a receiving chain's key at an earlier index) and threw it away. The
// history keeps it: the Store pickles a session whenever it begins, whenever the bridge starts a
// new sending chain and whenever a new receiving chain begins, for unwedge.olm_history. When an
// Olm message fails, the Unwedger tries the states of the sender key's sessions, newest first, on
// throw-away copies; one that decrypts it is handed to the machine for that one message (so the
// message is handled as usual: its room key is imported), and is never written back. The heal
// still follows, since the sender's state went back. The hashes of the Olm messages the bridge
// decrypted are kept as long: mautrix-go deletes its own after minutes, and the Store copies them
// first, so a message decrypted once is never decrypted again from the history.

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// OlmHistory keeps earlier states of Olm sessions and the hashes of the Olm messages decrypted
// (OlmHistoryQuery implements it).
type OlmHistory interface {
	KeepState(ctx context.Context, key id.SenderKey, sessionID id.SessionID, pickle []byte, at time.Time) error
	// States returns at most limit states of the sessions with key taken at or after since, the
	// newest first.
	States(ctx context.Context, key id.SenderKey, since time.Time, limit int) ([]OlmState, error)
	// KeepHashes copies the hashes of decrypted Olm messages that mautrix-go's SQL crypto store
	// (account accountID, in the same database) recorded before before.
	KeepHashes(ctx context.Context, accountID string, before time.Time) (int64, error)
	Seen(ctx context.Context, hash [32]byte, since time.Time) (bool, error)
	Prune(ctx context.Context, before time.Time) (states, hashes int64, err error)
}

// OlmState is one kept state of an Olm session, pickled with the crypto store's pickle key.
type OlmState struct {
	SessionID id.SessionID
	TakenAt   time.Time
	Pickle    []byte
}

// History is what the Store keeps of its Olm sessions' past (NewStore takes it; nil keeps none).
type History struct {
	db OlmHistory
	// accountID is the crypto store's account, whose message hashes are kept.
	accountID string
	pickleKey []byte
	retention time.Duration
	// received holds, per session, a hash of the ratchet key of the last message decrypted with
	// it: a message with another key began a new receiving chain.
	received lockedMap[id.SessionID, [8]byte]
}

// NewHistory keeps states in db for retention (unwedge.olm_history), pickled with pickleKey (the
// crypto store's: encryption.pickle_key), and the message hashes of the crypto store's account
// accountID. With a retention of 0 it keeps nothing, and its pruning deletes what an earlier
// configuration kept.
func NewHistory(db OlmHistory, accountID string, pickleKey []byte, retention time.Duration) *History {
	return &History{db: db, accountID: accountID, pickleKey: pickleKey, retention: retention}
}

// on reports whether the history keeps states (a nil History keeps none).
func (h *History) on() bool { return h != nil && h.retention > 0 }

// maxReceived bounds the sessions whose last receiving chain is remembered; past it the memory is
// dropped, and each session's next message is kept once more.
const maxReceived = 65536

// keep pickles the session's state into the history. A failure is logged and costs only that
// state: the crypto store's own write goes on.
func (h *History) keep(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession, why string) {
	pickle, err := sess.Internal.Pickle(h.pickleKey)
	if err == nil {
		err = h.db.KeepState(ctx, key, sess.ID(), pickle, time.Now())
	}
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("identity_key", key).Str("olm_session_id", sess.ID().String()).Str("why", why).
			Msg("Failed to keep a state of an Olm session in the Olm history")
	}
}

// decrypted keeps the session's state if the message at pos began a new receiving chain (or
// this process has not seen the session receive yet).
func (h *History) decrypted(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession, pos ratchetPosition) {
	if !pos.ok {
		return
	}
	chain := chainOf(pos)
	if last, ok := h.received.get(sess.ID()); ok && last == chain {
		return
	}
	if h.received.len() >= maxReceived {
		h.received.prune(0, func(id.SessionID, [8]byte) bool { return true })
	}
	h.received.update(sess.ID(), func([8]byte, bool) ([8]byte, bool) { return chain, true })
	h.keep(ctx, key, sess, "new receiving chain")
}

// encrypted keeps the session's state if the bridge just began a new sending chain: its first
// message on a chain leaves the chain at index 1.
func (h *History) encrypted(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) {
	if senderChainIndex(sess) == 1 {
		h.keep(ctx, key, sess, "new sending chain")
	}
}

// senderChainIndex reads the index of the session's sending chain from its description, which
// goolm and libolm write alike ("sender chain index: N receiver chain indices: ..."); -1 when it
// cannot be read.
func senderChainIndex(sess *crypto.OlmSession) int {
	rest, ok := strings.CutPrefix(sess.Internal.Describe(), "sender chain index: ")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(rest, " ", 2)[0]))
	if err != nil {
		return -1
	}
	return n
}

// unpickle makes a throw-away copy of a kept state.
func (h *History) unpickle(st OlmState) (*crypto.OlmSession, error) {
	inner, err := olm.SessionFromPickled(st.Pickle, h.pickleKey)
	if err != nil {
		return nil, fmt.Errorf("failed to unpickle a state of Olm session %s: %w", st.SessionID, err)
	}
	return &crypto.OlmSession{Internal: inner}, nil
}

// HistoryOutcome is what the Olm history did for a failed Olm message (the label of
// unwedge_olm_history_total).
type HistoryOutcome string

const (
	// HistoryRecovered: a kept state decrypted the message, and the machine handled it.
	HistoryRecovered HistoryOutcome = "recovered_from_history"
	// HistoryNoState: no kept state of the sender key's sessions decrypts it.
	HistoryNoState HistoryOutcome = "no_state"
	// HistoryReplay: the bridge decrypted this very message before; it is not decrypted again.
	HistoryReplay HistoryOutcome = "replay_refused"
	// HistoryLimited: the sender's device tried the history too often lately.
	HistoryLimited HistoryOutcome = "limited"
	// HistoryFailed: the history could not be read, or the machine failed on what a state
	// decrypted.
	HistoryFailed HistoryOutcome = "failed"
)

// HistoryOutcomes lists every outcome, so that metrics show each from the start.
func HistoryOutcomes() []HistoryOutcome {
	return []HistoryOutcome{HistoryRecovered, HistoryNoState, HistoryReplay, HistoryLimited, HistoryFailed}
}

const (
	// maxHistoryStates bounds the states tried for one message.
	maxHistoryStates = 32
	// historyTries bounds the messages of one device tried against the history per
	// historyWindow: a client restored from a backup sends a few at most before it learns the
	// bridge's new session; garbage sent under a device's key costs the bridge little more.
	historyTries  = 100
	historyWindow = 10 * time.Minute
)

// historyBudget counts one device's tries of the history in the current window.
type historyBudget struct {
	start time.Time
	tries int
}

// fromHistory tries to decrypt a failed Olm message with the kept states of its sender key's
// sessions. A state that decrypts it is handed to the machine for this one message, in a
// replay observation: the machine reads only that state and writes nothing of it back. It
// returns what happened; the caller heals the sender all the same.
func (u *Unwedger) fromHistory(ctx context.Context, evt *event.Event, msg *olmMessage) HistoryOutcome {
	h := u.store.history
	now := time.Now()
	since := now.Add(-h.retention)
	log := zerolog.Ctx(ctx).With().Stringer("user_id", evt.Sender).Stringer("identity_key", msg.senderKey).Logger()
	chain := senderChain{peer{evt.Sender, msg.senderKey}, chainOf(msg.ratchet)}
	outcome := func() HistoryOutcome {
		if at, ok := u.historyMisses.get(chain); ok && msg.ratchet.ok && now.Sub(at) < historyWindow {
			// An earlier message of this very chain was tried: no kept state derives the chain,
			// and none derives it for this message either.
			return HistoryNoState
		}
		if !u.historyBudget(chain.peer, now) {
			return HistoryLimited
		}
		states, err := h.db.States(ctx, msg.senderKey, since, maxHistoryStates)
		if err != nil {
			log.Warn().Err(err).Msg("Failed to read the Olm history")
			return HistoryFailed
		}
		for _, st := range states {
			if !h.decrypts(st, msg) {
				continue
			}
			// Only now (a kept state decrypts it) is it asked whether the bridge decrypted these
			// very bytes before: most failures end above without a second query.
			if seen, err := h.db.Seen(ctx, msg.hash, since); err != nil {
				log.Warn().Err(err).Msg("Failed to look up an Olm message in the Olm history")
				return HistoryFailed
			} else if seen {
				return HistoryReplay
			}
			replay, err := h.unpickle(st)
			if err != nil {
				return HistoryFailed
			}
			obs := &observation{hash: msg.hash, ratchet: msg.ratchet, replay: replay}
			if err = u.catch(ctx, PanicHandleToDevice, func() error {
				u.mach.HandleToDeviceEvent(withObservation(ctx, obs), evt)
				return nil
			}); err != nil || !obs.decrypted {
				return HistoryFailed
			}
			log.Info().Str("olm_session_id", st.SessionID.String()).Time("state_taken_at", st.TakenAt).
				Msg("Decrypted an Olm message with an earlier state of its session: the sender went back in time")
			return HistoryRecovered
		}
		if msg.ratchet.ok {
			u.historyMisses.prune(4096, func(_ senderChain, at time.Time) bool { return now.Sub(at) >= historyWindow })
			u.historyMisses.update(chain, func(time.Time, bool) (time.Time, bool) { return now, true })
		}
		return HistoryNoState
	}()
	u.historyCounts.update(outcome, func(n int64, _ bool) (int64, bool) { return n + 1, true })
	return outcome
}

// senderChain is one sending chain of a device: its ratchet key (a hash of it).
type senderChain struct {
	peer
	chain [8]byte
}

// chainOf hashes the ratchet key of a message's position.
func chainOf(pos ratchetPosition) [8]byte {
	var chain [8]byte
	sum := sha256.Sum256(pos.key)
	copy(chain[:], sum[:])
	return chain
}

// decrypts reports whether a throw-away copy of the state decrypts the message (a prekey message
// must also match the session, as the machine checks before it decrypts).
func (h *History) decrypts(st OlmState, msg *olmMessage) bool {
	trial, err := h.unpickle(st)
	if err != nil {
		return false
	}
	if msg.msgType == id.OlmMsgTypePreKey {
		if matches, err := trial.Internal.MatchesInboundSession(msg.body); err != nil || !matches {
			return false
		}
	}
	_, err = trial.Internal.Decrypt(msg.body, msg.msgType)
	return err == nil
}

// historyBudget takes one try of the history for the device, if it has one left in the window.
func (u *Unwedger) historyBudget(p peer, now time.Time) bool {
	u.historyTries.prune(4096, func(_ peer, b historyBudget) bool { return now.Sub(b.start) >= historyWindow })
	allowed := false
	u.historyTries.update(p, func(b historyBudget, _ bool) (historyBudget, bool) {
		if now.Sub(b.start) >= historyWindow {
			b = historyBudget{start: now}
		}
		if allowed = b.tries < historyTries; allowed {
			b.tries++
		}
		return b, true
	})
	return allowed
}

// HistoryCounts returns how many failed Olm messages the history decrypted, and why it did not.
func (u *Unwedger) HistoryCounts() map[HistoryOutcome]int64 { return u.historyCounts.snapshot() }

// pruneHistory deletes what the Olm history keeps beyond its retention (everything when it is
// off).
func (u *Unwedger) pruneHistory(ctx context.Context, now time.Time) {
	h := u.store.history
	if h == nil {
		return
	}
	states, hashes, err := h.db.Prune(ctx, now.Add(-h.retention))
	if err != nil && ctx.Err() == nil {
		u.log.Err(err).Msg("Failed to prune the Olm history")
	} else if states+hashes > 0 {
		u.log.Debug().Int64("states", states).Int64("hashes", hashes).Msg("Pruned the Olm history")
	}
}
