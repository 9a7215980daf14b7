package unwedge

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Audience decides whose devices are healed: the users in unwedge.scope (bridge.Audience).
type Audience interface {
	InScope(ctx context.Context, userID id.UserID) (bool, error)
}

// Repairer removes stored Olm sessions with a sender key that cannot be loaded, so that the
// replacement session is not hidden behind them.
type Repairer interface {
	DeleteUnreadableSessions(ctx context.Context, key id.SenderKey) (int, error)
}

// KeyOwners finds every device the crypto store knows with given identity keys, of any user
// (CryptoTables): mautrix-go accepts any curve25519 key that a device signs with its own ed25519
// key, so a hostile user can list another user's identity key as their device's.
type KeyOwners interface {
	DevicesByKey(ctx context.Context, keys []id.IdentityKey) ([]*id.Device, error)
}

// Tables is what the Unwedger reads and repairs in the crypto store's tables (CryptoTables): the
// heals delete unreadable sessions and check identity keys for a second owner, and startup reads
// the Olm peers a page at a time and discards the outbound Megolm sessions after a rollback.
type Tables interface {
	Repairer
	KeyOwners
	// Account is the crypto store's account the sessions belong to.
	Account() string
	RecentPeers(ctx context.Context, since time.Time, after RecentCursor, limit int) ([]id.SenderKey, RecentCursor, error)
	UsedSincePeers(ctx context.Context, since time.Time, after id.SenderKey, limit int) ([]id.SenderKey, error)
	UnreadablePeers(ctx context.Context, after SessionsCursor, limit int) (unreadable []id.SenderKey, rows int, next SessionsCursor, err error)
	DiscardOutboundSessions(ctx context.Context) (int64, error)
}

// Unwedger is the middleware between the bridge's to-device transport and its OlmMachine: it
// hands every Olm event to the machine, classifies failures, and heals wedged sessions.
type Unwedger struct {
	cfg      Config
	mach     *crypto.OlmMachine
	store    *Store
	ledger   Ledger
	audience Audience
	// tables is nil where the crypto store is not mautrix-go's SQL store: then no unreadable
	// session is deleted and no identity key is checked for a second owner.
	tables Tables
	owner  string
	log    zerolog.Logger
	// answers filters the homeserver's answers about keys (answers.go).
	answers *answerGuard
	// ownKey is read once: OlmAccount caches it lazily without a lock.
	ownKey id.IdentityKey

	ctx    context.Context
	cancel context.CancelFunc
	heals  sync.WaitGroup
	// The in-memory marks below are kept by peer (a user and an identity key), never by identity
	// key alone: a user who lists another user's identity key as a device of theirs must not
	// spend, block or take that user's heal.
	//
	// healing holds the devices with a heal running in this process, so a burst of failures
	// from one device makes one ledger request, not one per event.
	healing lockedMap[peer, struct{}]
	// replacing counts the heals that hold a ledger grant for a device (shared with Recovery).
	replacing *Replacing
	// running holds the ledger IDs of the heals this process is running, which ResumeHeals
	// must not take for abandoned ones.
	running lockedMap[int64, struct{}]
	// replaced remembers when this process last created a session with a device (or learned
	// from the ledger that one was created), for at most MinInterval.
	replaced lockedMap[peer, time.Time]
	// lookupMiss remembers when a sender's devices were last fetched for an unknown identity key.
	lookupMiss lockedMap[id.UserID, time.Time]

	// countsLock guards the record of decisions: their counts and the recent ones.
	countsLock sync.Mutex
	counts     map[Count]int64
	// recent is a ring of the last decisions that were not ignored, for admins.
	recent     []Decision
	recentNext int

	// observe and followers are Parts.Observer and Parts.Followers.
	observe   func(Decision)
	followers Followers

	// newSessionAt remembers when a device last opened a new session with the bridge.
	newSessionAt lockedMap[peer, time.Time]
	// historyTries counts each device's tries of the Olm history (historyBudget), and
	// historyCounts what the tries came to.
	historyTries  lockedMap[peer, historyBudget]
	historyCounts lockedMap[HistoryOutcome, int64]
	// historyMisses remembers, per sending chain of a device, when no kept state decrypted a
	// message of it: the chain's later messages are not tried again within historyWindow.
	historyMisses lockedMap[senderChain, time.Time]

	// panicGuard recovers and counts panics (panics.go).
	panicGuard

	// messagesLock guards messages: the hashes of the Olm messages handled lately, or being
	// handled, so that one that reaches the bridge twice (in an appservice transaction and again
	// from the bot device's inbox) goes to the machine once.
	messagesLock sync.Mutex
	messages     recentSet[[32]byte]
}

// recentMessages is how many Olm messages the Unwedger remembers having handled.
const recentMessages = 16384

// Action is what unwedge did about one Olm event or heal.
type Action string

const (
	// ActionIgnored: the event is no wedge (it decrypted, is a replay, or is malformed).
	ActionIgnored Action = "ignored"
	// ActionOutOfScope: the user is outside unwedge.scope; the device is left to mautrix-go's
	// own unwedging.
	ActionOutOfScope Action = "out_of_scope"
	// ActionUnknownDevice: the identity key is no device of the sender; nothing is claimed.
	ActionUnknownDevice Action = "unknown_device"
	// ActionLimited: the ledger refused a new session (MSC1719's interval, or a running heal).
	ActionLimited Action = "limited"
	// ActionCapped: the user's devices had max_heals_per_user heals within the interval.
	ActionCapped Action = "capped"
	// ActionThrottled: the bridge started max_heals_per_minute heals within the last minute.
	ActionThrottled Action = "throttled"
	// ActionHealed: a replacement session exists and m.dummy went out over it.
	ActionHealed Action = "healed"
	// ActionDeferred: the replacement session exists but m.dummy could not be sent yet (the
	// homeserver is unreachable); ResumeHeals sends it later.
	ActionDeferred Action = "deferred"
	// ActionFailed: the heal failed (the ledger could not be asked, no one-time key, ...).
	ActionFailed Action = "failed"
	// ActionKeyConflict: another device (of this or another user) in the crypto store lists the
	// same identity key. Olm sessions are stored by identity key alone, so a session made with
	// one of them would replace the other's: neither is healed, and both are logged.
	ActionKeyConflict Action = "key_conflict"
	// ActionHealing: a heal is running (only in the heal history, never decided).
	ActionHealing Action = "healing"
)

// Refused reports whether the action is a heal that did not start: a refusal by the scope, the
// caps or the ledger.
func (a Action) Refused() bool {
	switch a {
	case ActionOutOfScope, ActionLimited, ActionCapped, ActionThrottled, ActionKeyConflict:
		return true
	}
	return false
}

// Decision is what unwedge did about one Olm event or heal.
type Decision struct {
	At       time.Time
	Class    Class
	UserID   id.UserID
	DeviceID id.DeviceID
	Key      id.SenderKey
	Action   Action
	Duration time.Duration
	// ForcedBy is the admin who forced a heal.
	ForcedBy id.UserID
	// Detail says more, for people (why a heal was limited, the new session's ID).
	Detail string
	Err    error
	// Resumed marks a decision about a heal that an earlier decision already counted: a heal
	// that waited for the homeserver (deferred) or that a stopped process left, finished or
	// postponed by ResumeHeals. It is no new Olm event: Olm failures count only the others.
	Resumed bool
}

// recentDecisions is how many decisions Recent can look back on.
const recentDecisions = 512

// Parts are what an Unwedger works with besides its machine: all of it is given to New, and
// nothing is set afterwards.
type Parts struct {
	// Store is the machine's CryptoStore (the machine was made with it: NewStore).
	Store    *Store
	Ledger   Ledger
	Audience Audience
	// Tables is nil where the crypto store is not mautrix-go's SQL store (see Unwedger.tables).
	Tables Tables
	// Replacing says which sessions are being replaced; Recovery reads it (NewReplacing). New
	// makes one when it is nil.
	Replacing *Replacing
	// Followers, if not nil, is told of every heal and of every session a peer opened (Recovery).
	Followers Followers
	// Observer, if not nil, is told every decision (metrics).
	Observer func(Decision)
}

// Followers act on what the Unwedger did (Recovery implements it).
type Followers interface {
	// DeviceHealed is called after a device got its replacement session: the time to re-request
	// the Megolm keys that were lost with the old one.
	DeviceHealed(ctx context.Context, device *id.Device)
	// Reshare is called (at most once per device per MinInterval) when a device of an in-scope
	// user opened a new Olm session with the bridge (it unwedged its side): the time to send it
	// again the room keys that went over the old session.
	Reshare(ctx context.Context, device *id.Device)
}

// New makes an Unwedger for a loaded machine whose CryptoStore is parts.Store. owner names this
// process in the ledger's leases (unique per process, e.g. hostname and PID). It takes over the
// machine's unwedging: the machine's NeedsUnwedgeCallback is set to the Unwedger's.
//
// It also filters, from now on, the homeserver's answers to the machine client's key claims and
// queries to what was asked (answers.go): they relay other servers' answers.
func New(cfg Config, mach *crypto.OlmMachine, parts Parts, owner string, log zerolog.Logger) (*Unwedger, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if parts.Store == nil || mach.CryptoStore != crypto.Store(parts.Store) {
		return nil, fmt.Errorf("the OlmMachine's store must be the unwedge.Store given (unwedge.NewStore)")
	} else if parts.Ledger == nil || parts.Audience == nil {
		return nil, fmt.Errorf("an Unwedger needs a ledger and a scope")
	}
	if parts.Replacing == nil {
		parts.Replacing = NewReplacing()
	}
	ctx, cancel := context.WithCancel(context.Background())
	u := &Unwedger{
		cfg: cfg, mach: mach, store: parts.Store, ledger: parts.Ledger, audience: parts.Audience, tables: parts.Tables,
		replacing: parts.Replacing, followers: parts.Followers, observe: parts.Observer,
		owner: owner, ownKey: mach.OwnIdentity().IdentityKey,
		answers: guardAnswers(mach.Client, log),
		log:     log, ctx: log.WithContext(ctx), cancel: cancel, counts: make(map[Count]int64),
		messages: newRecentSet[[32]byte](recentMessages),
	}
	mach.NeedsUnwedgeCallback = u.needsUnwedge
	return u, nil
}

// needsUnwedge is the machine's word (mautrix-go v0.32+) that it would replace the sender's
// session now: an Olm message failed with a matching session, a normal message found none, or a
// prekey message could not open one. During HandleToDevice it marks the event's observation, and
// HandleToDevice decides; an event that reached the machine another way is decided here.
// Relies on crypto/decryptolm.go calling NeedsUnwedgeCallback with the decryption's own context (pinned in internal/upstream).
func (u *Unwedger) needsUnwedge(ctx context.Context, sender id.UserID, key id.SenderKey) {
	if obs := observationFrom(ctx); obs != nil {
		obs.needsUnwedge = true
		return
	}
	u.wedged(ctx, sender, key, ClassFailed)
}

// Start prunes the ledger now and then every pruneInterval, until Stop: heal records older than
// HistoryRetention go, and so do devices with nothing recent. It also finishes the heals a
// stopped process left in progress: now, and once more when that process's leases ran out.
func (u *Unwedger) Start() {
	u.spawn(u.ctx, PanicResumeHeals, func() {
		// Heals left by a stopped process are taken over once their lease runs out, and heals
		// postponed by an unreachable homeserver are retried, within half a lease.
		for {
			u.ResumeHeals(u.ctx)
			select {
			case <-u.ctx.Done():
				return
			case <-time.After(u.cfg.Lease / 2):
			}
		}
	})
	u.spawn(u.ctx, PanicPruneLedger, func() {
		for {
			now := time.Now()
			u.pruneHistory(u.ctx, now)
			heals, devices, err := u.ledger.Prune(u.ctx, now.Add(-u.cfg.HistoryRetention), now)
			if err != nil && u.ctx.Err() == nil {
				u.log.Err(err).Msg("Failed to prune the unwedge ledger")
			} else if heals+devices > 0 {
				u.log.Debug().Int64("heals", heals).Int64("devices", devices).Msg("Pruned the unwedge ledger")
			}
			select {
			case <-u.ctx.Done():
				return
			case <-time.After(pruneInterval):
			}
		}
	})
}

const pruneInterval = time.Hour

// Stop cancels running heals and waits for them (their leases run out; a restart resumes).
func (u *Unwedger) Stop() {
	u.cancel()
	u.heals.Wait()
}

// HandleToDevice hands a to-device event to the machine. For Olm events it watches the outcome
// and, when the sending device's session is wedged, starts a heal in the background.
// Relies on crypto/machine.go HandleToDeviceEvent decrypting synchronously with this context (pinned in internal/upstream).
func (u *Unwedger) HandleToDevice(ctx context.Context, evt *event.Event) {
	if evt.Type != event.ToDeviceEncrypted {
		// Key requests and the like: a peer's content all the same.
		_ = u.catch(ctx, PanicHandleToDevice, func() error {
			u.mach.HandleToDeviceEvent(ctx, evt)
			return nil
		})
		return
	}
	msg, class := parseOlm(evt, u.ownKey)
	if msg == nil {
		// The machine would only log these; it is not given malformed input at all.
		u.decide(ctx, Decision{Class: class, UserID: evt.Sender, Action: ActionIgnored})
		return
	}
	if !u.firstHandling(msg.hash) {
		u.decide(ctx, Decision{Class: ClassDuplicate, UserID: evt.Sender, Key: msg.senderKey, Action: ActionIgnored})
		return
	}
	obs := &observation{hash: msg.hash, ratchet: msg.ratchet}
	if err := u.catch(ctx, PanicHandleToDevice, func() error {
		u.mach.HandleToDeviceEvent(withObservation(ctx, obs), evt)
		return nil
	}); err != nil {
		u.decide(ctx, Decision{Class: ClassMalformed, UserID: evt.Sender, Key: msg.senderKey, Action: ActionIgnored, Err: err})
		return
	}
	if !obs.decrypted && !obs.duplicate && (obs.sessionsErr != nil || !obs.sessionsRead) {
		// The store failed (or the machine stopped before reading it): the same message handled
		// again, after a sync is fetched again, must reach the machine.
		u.forgetHandled(msg.hash)
	}
	switch {
	case obs.duplicate:
		u.decide(ctx, Decision{Class: ClassDuplicate, UserID: evt.Sender, Key: msg.senderKey, Action: ActionIgnored})
		return
	case obs.decrypted && obs.wentBack:
		u.wedged(ctx, evt.Sender, msg.senderKey, ClassPeerRestored)
		return
	case obs.decrypted && obs.newInbound:
		u.peerNewSession(ctx, evt.Sender, msg.senderKey)
		return
	case obs.decrypted:
		return
	}
	var sessions crypto.OlmSessionList
	if msg.msgType == id.OlmMsgTypePreKey && obs.sessionsErr == nil {
		sessions, _ = u.store.peekSessions(ctx, msg.senderKey)
	}
	class = classifyFailure(obs, msg, sessions)
	// Either side suffices: the machine knows its own failure points (and any it adds later);
	// the detector also sees what the machine does not treat as a wedge (unreadable session rows).
	if !class.Wedged() && !obs.needsUnwedge {
		u.decide(ctx, Decision{Class: class, UserID: evt.Sender, Key: msg.senderKey, Action: ActionIgnored})
		return
	}
	if u.store.history.on() && class.Wedged() {
		// A sender that went back in time sends from a state the bridge once had: an earlier
		// state of the session may decrypt the message. The session is replaced all the same.
		u.fromHistory(ctx, evt, msg)
	}
	u.wedged(ctx, evt.Sender, msg.senderKey, class)
}

// HandleCopy hands over a to-device event that may have reached the bridge before, by another way
// (in appservice mode, the bot device's inbox read after the transactions): an Olm message this
// process handled, or that the crypto store remembers decrypting, is ignored without the machine
// (which would log each as a failure); anything else goes to HandleToDevice.
func (u *Unwedger) HandleCopy(ctx context.Context, evt *event.Event) {
	if evt.Type == event.ToDeviceEncrypted {
		if msg, _ := parseOlm(evt, u.ownKey); msg != nil {
			u.messagesLock.Lock()
			seen := u.messages.has(msg.hash)
			u.messagesLock.Unlock()
			if !seen {
				at, err := u.mach.CryptoStore.GetOlmHash(ctx, msg.hash)
				seen = err == nil && !at.IsZero()
			}
			if seen {
				u.decide(ctx, Decision{Class: ClassDuplicate, UserID: evt.Sender, Key: msg.senderKey, Action: ActionIgnored})
				return
			}
		}
	}
	u.HandleToDevice(ctx, evt)
}

// firstHandling marks an Olm message as handled, and reports false when it was already.
func (u *Unwedger) firstHandling(hash [32]byte) bool {
	u.messagesLock.Lock()
	defer u.messagesLock.Unlock()
	if u.messages.has(hash) {
		return false
	}
	u.messages.add(hash)
	return true
}

func (u *Unwedger) forgetHandled(hash [32]byte) {
	u.messagesLock.Lock()
	defer u.messagesLock.Unlock()
	u.messages.remove(hash)
}

// wedged checks scope and the sender's device, then starts a heal unless one runs already.
func (u *Unwedger) wedged(ctx context.Context, sender id.UserID, key id.SenderKey, class Class) {
	log := zerolog.Ctx(ctx).With().Stringer("user_id", sender).Stringer("identity_key", key).Str("class", string(class)).Logger()
	p := peer{sender, key}
	// The ledger decides, but a device this process replaced the session of within the interval
	// is refused without asking it (or the homeserver): a storm of failures from devices that
	// are not online yet to learn their new sessions stays cheap.
	if at, ok := u.recentlyReplaced(p); ok {
		u.decide(ctx, Decision{Class: class, UserID: sender, Key: key, Action: ActionLimited,
			Detail: fmt.Sprintf("this bridge replaced the session %s ago (at most one per %s)", time.Since(at).Round(time.Second), u.cfg.MinInterval)})
		return
	}
	// A burst of failures from one device makes one heal: the rest stop here, before the scope
	// and device lookups (which may query the homeserver).
	running := false
	u.healing.update(p, func(_ struct{}, ok bool) (struct{}, bool) {
		running = ok
		return struct{}{}, true
	})
	if running {
		u.decide(ctx, Decision{Class: class, UserID: sender, Key: key, Action: ActionLimited, Detail: "a heal of this device is running"})
		return
	}
	release := func() { u.healing.delete(p) }
	if action, detail, err := u.admission(ctx, sender); action != "" {
		release()
		if action == ActionOutOfScope || action == ActionCapped || action == ActionThrottled {
			// Never worse than the stock bridge: a wedge unwedge does not heal for a reason other
			// than its own heal gets what the machine would have done without unwedge.
			detail += "; left to mautrix-go's own unwedging"
			u.leaveToStock(log.WithContext(u.ctx), sender, key)
		}
		u.decide(ctx, Decision{Class: class, UserID: sender, Key: key, Action: action, Detail: detail, Err: err})
		return
	}
	// A sender key that is not one of the sender's devices is never healed: no key is claimed for it.
	device, err := u.lookupDevice(ctx, sender, key)
	if err != nil || device == nil {
		release()
		u.decide(ctx, Decision{Class: ClassUnknownDevice, UserID: sender, Key: key, Action: ActionUnknownDevice, Err: err})
		return
	}
	log.Info().Stringer("device_id", device.DeviceID).Msg("Olm session wedged, healing")
	u.spawn(u.ctx, PanicHeal, func() {
		defer release()
		u.Heal(u.ctx, device, class, "")
	})
}

// leaveToStock hands a wedge to mautrix-go's own unwedging (OlmMachine.UnwedgeDevice: its own
// interval, a key claim and m.dummy), in the background, as the machine would have done without
// unwedge. Not when another user's device lists the sender's identity key: the machine would
// store the session it makes under that key, in place of the other user's.
func (u *Unwedger) leaveToStock(ctx context.Context, sender id.UserID, key id.SenderKey) {
	u.spawn(ctx, PanicStockUnwedge, func() {
		if others, err := u.otherOwners(ctx, sender, "", key); err != nil || len(others) > 0 {
			zerolog.Ctx(ctx).Warn().Err(err).Strs("also_listed_by", deviceNames(others)).
				Msg("Not leaving the wedge to mautrix-go's own unwedging: another user's device lists the identity key")
			return
		}
		u.mach.UnwedgeDevice(ctx, sender, key)
	})
}

// devicesByKey returns the crypto store's devices (of any user) with each of the identity keys.
func (u *Unwedger) devicesByKey(ctx context.Context, keys []id.IdentityKey) (map[id.IdentityKey][]*id.Device, error) {
	if u.tables == nil {
		return nil, nil
	}
	devices, err := u.tables.DevicesByKey(ctx, keys)
	if err != nil {
		return nil, fmt.Errorf("failed to look up the devices with the identity key: %w", err)
	}
	byKey := make(map[id.IdentityKey][]*id.Device, len(keys))
	for _, dev := range devices {
		byKey[dev.IdentityKey] = append(byKey[dev.IdentityKey], dev)
	}
	return byKey, nil
}

// otherOwners lists the devices in the crypto store other than the user's device (of any user,
// or, with no device ID, of other users) that list the identity key.
func (u *Unwedger) otherOwners(ctx context.Context, userID id.UserID, deviceID id.DeviceID, key id.IdentityKey) ([]*id.Device, error) {
	byKey, err := u.devicesByKey(ctx, []id.IdentityKey{key})
	return othersThan(byKey[key], userID, deviceID), err
}

// othersThan keeps the devices that are not the user's device (not the user's, with no device ID).
func othersThan(devices []*id.Device, userID id.UserID, deviceID id.DeviceID) []*id.Device {
	var others []*id.Device
	for _, dev := range devices {
		if dev.UserID != userID || deviceID != "" && dev.DeviceID != deviceID {
			others = append(others, dev)
		}
	}
	return others
}

// deviceNames names devices as "user device", for logs.
func deviceNames(devices []*id.Device) []string {
	names := make([]string, len(devices))
	for i, dev := range devices {
		names[i] = fmt.Sprintf("%s %s", dev.UserID, dev.DeviceID)
	}
	return names
}

// HealRequested heals a device on an admin's request (the bridge's `unwedge heal`), with
// ClassForced (no Olm failure). Without force it is the heal a wedge of the device would get: the
// user must be in scope (out_of_scope otherwise; nothing is left to mautrix-go here), the user's
// devices must have had fewer than max_heals_per_user heals within min_interval (capped), the
// bridge fewer than max_heals_per_minute heals within the last minute (throttled), and the ledger
// refuses it within min_interval of the device's last session (limited); the ledger records no
// forced_by. With force, the scope, the caps, the interval and the check for another device with
// the same identity key (key_conflict) are skipped (the heal still counts
// towards max_heals_per_minute) and the ledger records by as forced_by (Heal with forcedBy): the
// caller must limit how often it does that, since every forced heal claims one of the device's
// one-time keys. It returns the decision, whose Action, Detail and Err say how it ended or why
// there was no heal.
func (u *Unwedger) HealRequested(ctx context.Context, device *id.Device, by id.UserID, force bool) Decision {
	if force {
		return u.Heal(ctx, device, ClassForced, by)
	}
	if action, detail, err := u.admission(ctx, device.UserID); action != "" {
		d := Decision{Class: ClassForced, UserID: device.UserID, DeviceID: device.DeviceID, Key: device.IdentityKey, Action: action, Detail: detail, Err: err}
		u.decide(ctx, d)
		return d
	}
	return u.Heal(ctx, device, ClassForced, "")
}

// admission decides whether a heal of the user's devices may start now, before any lookup or key
// claim: the user is in scope, their devices had fewer than max_heals_per_user heals within
// min_interval, and the bridge (every replica on the database) started fewer than
// max_heals_per_minute heals within the last minute. It returns no action when it may, or the
// refusal's action (out_of_scope, capped, throttled, or failed when the ledger could not be
// asked) with its detail and error. Both caps are counted in the ledger before the heal's row
// exists, so heals admitted while others are still starting can pass a cap by the number starting.
func (u *Unwedger) admission(ctx context.Context, userID id.UserID) (action Action, detail string, err error) {
	if ok, err := u.audience.InScope(ctx, userID); err != nil || !ok {
		return ActionOutOfScope, fmt.Sprintf("unwedge.scope is %s", u.cfg.Scope), err
	}
	now := time.Now()
	heals, err := u.ledger.RecentHeals(ctx, userID, now.Add(-u.cfg.MinInterval), now.Add(-time.Minute))
	switch {
	case err != nil:
		return ActionFailed, "", err
	case heals.User >= u.cfg.MaxHealsPerUser:
		return ActionCapped, fmt.Sprintf("%d heals of this user's devices within %s (max_heals_per_user)", heals.User, u.cfg.MinInterval), nil
	case heals.All >= u.cfg.MaxHealsPerMinute:
		return ActionThrottled, fmt.Sprintf("%d heals of all users' devices within the last minute (max_heals_per_minute)", heals.All), nil
	}
	return "", "", nil
}

// maxNewSessions bounds the devices remembered for having opened a new session.
const maxNewSessions = 4096

// peerNewSession passes a session the peer opened to the followers (Reshare), for devices of
// users in scope, at most once per device per MinInterval (a peer cannot make the bridge send
// room keys at will).
func (u *Unwedger) peerNewSession(ctx context.Context, sender id.UserID, key id.SenderKey) {
	if u.followers == nil {
		return
	}
	p := peer{sender, key}
	now := time.Now()
	if at, ok := u.newSessionAt.get(p); ok && now.Sub(at) < u.cfg.MinInterval {
		return
	}
	// Only users in scope are remembered: identity keys cost anyone nothing, and a user in no
	// room with the bridge could otherwise fill the set, so that real devices that unwedged
	// themselves get no keys again.
	if ok, err := u.audience.InScope(ctx, sender); err != nil || !ok {
		return
	}
	u.newSessionAt.prune(1024, func(_ peer, at time.Time) bool { return now.Sub(at) >= u.cfg.MinInterval })
	// Beyond maxNewSessions within the interval, new ones get no keys again (a heal still does).
	full := u.newSessionAt.len() >= maxNewSessions
	recent := false
	u.newSessionAt.update(p, func(at time.Time, ok bool) (time.Time, bool) {
		if recent = ok && now.Sub(at) < u.cfg.MinInterval; recent || full {
			return at, ok
		}
		return now, true
	})
	if recent || full {
		return
	}
	u.spawn(u.ctx, PanicNewSession, func() {
		ctx := u.log.WithContext(u.ctx)
		device, err := u.lookupDevice(ctx, sender, key)
		if err != nil || device == nil {
			return
		}
		ctx = u.log.With().Stringer("user_id", sender).Stringer("device_id", device.DeviceID).Stringer("identity_key", key).Logger().WithContext(ctx)
		u.followers.Reshare(ctx, device)
	})
}

// Healing reports whether this process is replacing the user's device's Olm session right now
// (Replacing.Healing).
func (u *Unwedger) Healing(userID id.UserID, key id.SenderKey) bool {
	return u.replacing.Healing(userID, key)
}

// Replacing counts, per device, the heals that hold a ledger grant in this process: the Unwedger
// marks them, and Recovery asks before it sends a key request.
type Replacing struct {
	devices lockedMap[peer, int]
}

// NewReplacing makes an empty Replacing, to share between an Unwedger and a Recovery.
func NewReplacing() *Replacing { return &Replacing{} }

// Healing reports whether this process is replacing the user's device's Olm session right now
// (from the ledger's grant until m.dummy was sent or the heal failed): a key request sent
// meanwhile would be answered over the broken session.
func (r *Replacing) Healing(userID id.UserID, key id.SenderKey) bool {
	n, _ := r.devices.get(peer{userID, key})
	return n > 0
}

// begin marks the peer's session as being replaced until done is called (done may be called more
// than once).
func (r *Replacing) begin(p peer) (done func()) {
	r.devices.update(p, func(n int, _ bool) (int, bool) { return n + 1, true })
	return sync.OnceFunc(func() {
		r.devices.update(p, func(n int, _ bool) (int, bool) { return n - 1, n-1 > 0 })
	})
}

// recentlyReplaced reports when the device's session was last replaced, if within MinInterval.
func (u *Unwedger) recentlyReplaced(p peer) (time.Time, bool) {
	at := u.replaced.update(p, func(at time.Time, ok bool) (time.Time, bool) {
		return at, ok && time.Since(at) < u.cfg.MinInterval
	})
	return at, !at.IsZero() && time.Since(at) < u.cfg.MinInterval
}

// noteReplaced remembers a replacement session created at at, dropping expired entries now and
// then so the map stays as small as the set of devices replaced within the interval.
func (u *Unwedger) noteReplaced(p peer, at time.Time) {
	if at.IsZero() || time.Since(at) >= u.cfg.MinInterval {
		return
	}
	u.replaced.prune(1024, func(_ peer, t time.Time) bool { return time.Since(t) >= u.cfg.MinInterval })
	u.replaced.update(p, func(old time.Time, _ bool) (time.Time, bool) {
		if at.After(old) {
			return at, true
		}
		return old, true
	})
}

// refuseConflict refuses a heal of a device whose identity key another device in the crypto store
// also lists (of any user): mautrix-go keeps Olm sessions by identity key alone, so the session
// made with one would become the other's newest. Both are named in the log. It returns the
// refusal, or ok when the key is the device's alone (or the error looking the others up).
func refuseConflict(ctx context.Context, d Decision, others []*id.Device, err error) (Decision, bool) {
	switch {
	case err != nil:
		d.Action, d.Err = ActionFailed, err
	case len(others) > 0:
		d.Action, d.Detail = ActionKeyConflict, "the identity key is also listed by "+strings.Join(deviceNames(others), ", ")
		zerolog.Ctx(ctx).Warn().Stringer("user_id", d.UserID).Stringer("device_id", d.DeviceID).Stringer("identity_key", d.Key).
			Strs("also_listed_by", deviceNames(others)).
			Msg("Not healing: another device in the crypto store lists this device's identity key")
	default:
		return d, true
	}
	return d, false
}

// keyOwnerSet is what refuseConflict reads, for a group of devices at once (one query).
type keyOwnerSet struct {
	byKey map[id.IdentityKey][]*id.Device
	err   error
}

func (u *Unwedger) keyOwners(ctx context.Context, devices []*id.Device) keyOwnerSet {
	keys := make([]id.IdentityKey, len(devices))
	for i, dev := range devices {
		keys[i] = dev.IdentityKey
	}
	byKey, err := u.devicesByKey(ctx, keys)
	return keyOwnerSet{byKey, err}
}

// check is refuseConflict for one device of the set.
func (s keyOwnerSet) check(ctx context.Context, d Decision) (Decision, bool) {
	return refuseConflict(ctx, d, othersThan(s.byKey[d.Key], d.UserID, d.DeviceID), s.err)
}

// hold marks a heal as running in this process and keeps its ledger lease fresh (renewed every
// third of the lease, also while a request to the homeserver hangs), so that neither this
// process's ResumeHeals nor another replica takes it over; release (which may be called more than
// once) undoes both and returns once no renewal can happen any more.
func (u *Unwedger) hold(ctx context.Context, ref HealRef) (release func()) {
	u.running.update(ref.HealID, func(struct{}, bool) (struct{}, bool) { return struct{}{}, true })
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		defer func() {
			if r := recover(); r != nil {
				_ = u.panicked(ctx, PanicRenewLease, r)
			}
		}()
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(u.cfg.Lease / 3):
			}
			if err := u.ledger.RenewLease(ctx, ref, time.Now().Add(u.cfg.Lease)); err != nil && ctx.Err() == nil {
				zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to renew the lease of a running heal")
			}
		}
	}()
	return sync.OnceFunc(func() {
		close(stop)
		<-stopped
		u.running.delete(ref.HealID)
	})
}

func (u *Unwedger) isRunning(healID int64) bool {
	_, ok := u.running.get(healID)
	return ok
}

// unknownKeyBackoff is how long after a sender's devices were fetched for an unknown identity key
// only the stored devices are searched: forged keys do not make the bridge query the homeserver
// once per message.
const unknownKeyBackoff = time.Minute

// lookupDevice finds the sender's device with the identity key, asking the homeserver at most
// once per unknownKeyBackoff per sender when the key is not among the stored devices.
func (u *Unwedger) lookupDevice(ctx context.Context, sender id.UserID, key id.SenderKey) (*id.Device, error) {
	missedAt, missed := u.lookupMiss.get(sender)
	if missed && time.Since(missedAt) < unknownKeyBackoff {
		return u.mach.CryptoStore.FindDeviceByKey(ctx, sender, key)
	}
	var device *id.Device
	err := u.catch(ctx, PanicFetchDevice, func() (err error) {
		device, err = u.mach.GetOrFetchDeviceByKey(ctx, sender, key)
		return err
	})
	if err == nil && device != nil {
		return device, nil
	}
	u.lookupMiss.prune(4096, func(_ id.UserID, at time.Time) bool { return time.Since(at) >= unknownKeyBackoff })
	u.lookupMiss.update(sender, func(time.Time, bool) (time.Time, bool) { return time.Now(), true })
	return device, err
}

// peer is a device as a to-device event names it before it is looked up: its user and its
// identity key. Another user's device that lists the same identity key is another peer.
type peer struct {
	user id.UserID
	key  id.SenderKey
}

func devicePeer(device *id.Device) peer { return peer{device.UserID, device.IdentityKey} }

// Count is one kind of decision: what was detected and what unwedge did about it. Resumed
// decisions (see Decision.Resumed) are counted apart, so that the decisions that are not resumed
// count the Olm events: one decision per undecryptable or wedge-signalling event.
type Count struct {
	Class   Class
	Action  Action
	Resumed bool
}

// Counts returns how many decisions of each kind this Unwedger made since it started.
func (u *Unwedger) Counts() map[Count]int64 {
	u.countsLock.Lock()
	defer u.countsLock.Unlock()
	return maps.Clone(u.counts)
}

// Recent returns the user's latest decisions that were not ignored, newest first (all users'
// when userID is empty).
func (u *Unwedger) Recent(userID id.UserID) []Decision {
	u.countsLock.Lock()
	defer u.countsLock.Unlock()
	var out []Decision
	for i := range len(u.recent) {
		d := u.recent[(u.recentNext-1-i+len(u.recent))%len(u.recent)]
		if userID == "" || d.UserID == userID {
			out = append(out, d)
		}
	}
	return out
}

// decide counts a decision and writes its one log line: every line about a device carries its
// user_id, device_id and identity_key, so one filter follows a wedge from detection to heal.
func (u *Unwedger) decide(ctx context.Context, d Decision) {
	if d.At.IsZero() {
		d.At = time.Now()
	}
	u.countsLock.Lock()
	u.counts[Count{Class: d.Class, Action: d.Action, Resumed: d.Resumed}]++
	if d.Action != ActionIgnored {
		if len(u.recent) < recentDecisions {
			u.recent = append(u.recent, d)
			u.recentNext = len(u.recent) % recentDecisions
		} else {
			u.recent[u.recentNext] = d
			u.recentNext = (u.recentNext + 1) % recentDecisions
		}
	}
	u.countsLock.Unlock()

	level := zerolog.InfoLevel
	switch d.Action {
	case ActionIgnored:
		level = zerolog.DebugLevel
	case ActionFailed, ActionDeferred, ActionUnknownDevice, ActionCapped, ActionThrottled, ActionKeyConflict:
		level = zerolog.WarnLevel
	}
	evt := zerolog.Ctx(ctx).WithLevel(level).
		Str("unwedge", string(d.Action)).
		Str("class", string(d.Class)).
		Stringer("user_id", d.UserID).
		Stringer("identity_key", d.Key)
	if d.DeviceID != "" {
		evt = evt.Stringer("device_id", d.DeviceID)
	}
	if d.Duration > 0 {
		evt = evt.Dur("duration", d.Duration)
	}
	if d.ForcedBy != "" {
		evt = evt.Stringer("forced_by", d.ForcedBy)
	}
	if d.Detail != "" {
		evt = evt.Str("detail", d.Detail)
	}
	if d.Resumed {
		evt = evt.Bool("resumed", true)
	}
	evt.AnErr("error", d.Err).Msg(decisionMessages[d.Action])
	if u.observe != nil {
		u.observe(d)
	}
}

var decisionMessages = map[Action]string{
	ActionIgnored:       "Undecryptable Olm event is not a wedge",
	ActionOutOfScope:    "Olm session wedged, but the user is out of scope",
	ActionUnknownDevice: "Olm session wedged, but the identity key is not a device of the sender",
	ActionLimited:       "Olm session wedged, not replaced: limited by the MSC1719 interval or a heal in progress",
	ActionCapped:        "Olm session wedged, not replaced: the user's devices had too many heals within the interval",
	ActionThrottled:     "Olm session wedged, not replaced: the bridge started too many heals within the last minute",
	ActionHealed:        "Replaced wedged Olm session and sent m.dummy",
	ActionDeferred:      "Replaced wedged Olm session; m.dummy not sent yet, it is sent when the homeserver answers",
	ActionFailed:        "Failed to replace wedged Olm session",
	ActionKeyConflict:   "Olm session not replaced: another device in the crypto store lists the same identity key",
}
