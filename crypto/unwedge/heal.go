package unwedge

// This file is the heal engine. Every heal goes through it, for one device or many: a wedge the
// bridge detected (Heal), an admin's request (HealRequested, then Heal), the devices found broken
// at startup (HealBatch) and heals a stopped process or an unreachable homeserver left in the
// ledger (ResumeHeals). The story, top to bottom:
//
//   - admit: a device listed twice, or whose identity key another device in the crypto store
//     also lists (key_conflict, unless an admin forces the heal), gets no heal;
//   - acquire: the ledger grants each heal (MSC1719's interval, the lease), in one call for a
//     group; a resumed heal was taken over in the ledger already;
//   - attempt: one /keys/claim for the devices without a replacement session, the sessions made
//     and recorded in the ledger the moment they exist, m.dummy encrypted over each and sent in
//     one /sendToDevice; transient failures are retried with backoff (a device whose server the
//     claim answer's failures name too: answers.go notes them), and one device's failure stays
//     with that device;
//   - record: each heal ends in the ledger (finished, or postponed for ResumeHeals when its
//     session exists but m.dummy could not be sent), in one call for a group, and each device
//     gets its decision.
//
// A group is at most BatchDevices devices; batchesInFlight groups run at once.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/fault"
)

// Fault points of a heal (package fault): only test builds have them, armed with
// Unwedger.ArmFaults.
const (
	// FaultHealGranted is after the ledger granted a heal, before a one-time key is claimed.
	FaultHealGranted = "heal_granted"
	// FaultSessionCreated is between creating a replacement session and sending m.dummy over it.
	FaultSessionCreated = "session_created"
)

const (
	// BatchDevices is how many devices one group of the engine heals together: one /keys/claim
	// for their one-time keys and one /sendToDevice with their m.dummy events, so 1,000 devices
	// cost at most 20 of each.
	BatchDevices = 50
	// batchesInFlight bounds the groups that run at once: a few keep the homeserver and the
	// database busy while one group encrypts under the machine's Olm lock, without a storm of
	// requests after a restore.
	batchesInFlight = 4
)

// Heal replaces the Olm session with a device, as MSC1719 says: claim one of its one-time keys,
// create a new outbound session and send m.dummy over it, so the device learns the new session.
// The ledger first decides whether a new session may be created now (not if unwedge created one
// within MinInterval, unless forcedBy names the admin who forces it). Transient failures are
// retried with backoff and do not start the interval; permanent ones are recorded. A heal claims
// at most one key: its retries reuse the session the claim gave, and a claim whose answer was
// lost is not repeated. A device whose identity key another device in the crypto store also
// lists is not healed (key_conflict) unless an admin forces it. The decision it returns says how
// it ended (healed, deferred, failed) or why there was none (limited, key_conflict).
func (u *Unwedger) Heal(ctx context.Context, device *id.Device, class Class, forcedBy id.UserID) Decision {
	var d Decision
	u.heal(ctx, []*member{{device: device, class: class, forcedBy: forcedBy, decision: &d}})
	return d
}

// HealBatch heals many devices that no Olm event named (class rolled_back or session_lost, found
// at startup), in groups of BatchDevices, with Heal's rules for each device. The caller has
// checked the scope; the per-user and per-minute caps, which bound what peers can make the bridge
// do, do not apply to heals the bridge starts on its own. It returns one decision per device, in
// the order given, once all are done.
func (u *Unwedger) HealBatch(ctx context.Context, devices []*id.Device, class Class) []Decision {
	decisions := make([]Decision, len(devices))
	members := make([]*member, len(devices))
	for i, dev := range devices {
		members[i] = &member{device: dev, class: class, decision: &decisions[i]}
	}
	u.heal(ctx, members)
	return decisions
}

// ResumeHeals finishes heals that a stopped process left in progress (found in the ledger), once
// their lease ran out, and heals postponed while the homeserver was unreachable, so a crash
// between creating the replacement session and sending m.dummy over it loses neither the heal nor
// the hour: m.dummy goes out over the session that was created, and no second session is made.
// A heal that had not created its session yet is closed as failed_transient, so the next failure
// from the device heals it. The heals go through the engine in groups, as HealBatch's do; their
// decisions are Resumed (the Olm event behind each was counted when it was detected).
func (u *Unwedger) ResumeHeals(ctx context.Context) {
	heals, err := u.ledger.UnfinishedHeals(ctx)
	if err != nil {
		if ctx.Err() == nil {
			u.log.Err(err).Msg("Failed to list unfinished heals")
		}
		return
	}
	var members []*member
	for _, heal := range heals {
		if u.isRunning(heal.ID) {
			continue // this process is at it (its lease may have run out while a request hung)
		}
		now := time.Now()
		ok, err := u.ledger.Resume(ctx, heal, u.owner, now, now.Add(u.cfg.Lease))
		if err != nil {
			log := deviceLogger(u.log, heal.Device, heal.Class)
			log.Err(err).Int64("heal_id", heal.ID).Msg("Failed to take over an unfinished heal")
			continue
		} else if !ok {
			continue // another process still holds it, or it was already taken over
		}
		dev := heal.Device
		members = append(members, &member{
			device:   &id.Device{UserID: dev.UserID, DeviceID: dev.DeviceID, IdentityKey: dev.IdentityKey},
			class:    heal.Class,
			forcedBy: heal.ForcedBy,
			resumed:  heal,
			decision: new(Decision),
		})
	}
	u.heal(ctx, members)
}

// member is one device in the engine, and how far its heal got.
type member struct {
	device   *id.Device
	class    Class
	forcedBy id.UserID
	// resumed is the ledger's heal that ResumeHeals took over; nil for a new heal.
	resumed  *HealRecord
	decision *Decision
	log      zerolog.Logger

	// started is when the heal began: the grant, or the resumed heal's start.
	started time.Time
	ref     HealRef
	hc      *healContext
	// release ends the heal's hold on its lease; doneReplacing ends Healing for the device.
	release, doneReplacing func()
	// recorded: the ledger has the replacement session. checked: the machine's store has the
	// device with this identity key (the machine encrypts to the device it stores).
	recorded, checked bool
	attempts          int
	// done: the heal ended (outcome); err is the last failure, claimLost says the answer to the
	// device's key claim was lost. ended: the ledger has the heal's end (or postponement), and
	// deferred says it was postponed (deferrable, decided once in record).
	done, ended, deferred bool
	outcome               HealOutcome
	err                   error
	claimLost             bool
}

// end ends the member's heal with an outcome.
func (m *member) end(outcome HealOutcome, err error) {
	m.done, m.outcome, m.err = true, outcome, err
}

// heal runs the engine for the members: admit, then groups of at most BatchDevices, each
// acquired, attempted and recorded. Every member's decision is made and logged when it returns.
func (u *Unwedger) heal(ctx context.Context, members []*member) {
	admitted := u.admit(ctx, members)
	var groups [][]*member
	for start := 0; start < len(admitted); start += BatchDevices {
		groups = append(groups, admitted[start:min(start+BatchDevices, len(admitted))])
	}
	if len(groups) == 1 {
		u.healGroup(ctx, groups[0])
		return
	}
	next := make(chan []*member)
	var wg sync.WaitGroup
	for range min(batchesInFlight, len(groups)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for group := range next {
				// healGroup recovers what panics in a heal; this catches a panic in that recovery
				// too, since no caller's recover reaches this goroutine.
				_ = u.catch(ctx, PanicHeal, func() error {
					u.healGroup(ctx, group)
					return nil
				})
			}
		}()
	}
	for _, group := range groups {
		next <- group
	}
	close(next)
	wg.Wait()
}

// admit makes each member's decision so far and returns those that may be healed: a device
// listed twice would be two heals of one session (the second is refused, as the ledger's lease
// would refuse it), and a device whose identity key another device also lists is refused
// (key_conflict) unless an admin forces its heal or a resumed heal already made its session.
func (u *Unwedger) admit(ctx context.Context, members []*member) []*member {
	var checked []*id.Device
	for _, m := range members {
		dev := m.device
		*m.decision = Decision{Class: m.class, UserID: dev.UserID, DeviceID: dev.DeviceID, Key: dev.IdentityKey, ForcedBy: m.forcedBy, Resumed: m.resumed != nil}
		m.log = deviceLogger(*zerolog.Ctx(ctx), LedgerDevice{UserID: dev.UserID, DeviceID: dev.DeviceID, IdentityKey: dev.IdentityKey}, m.class)
		if m.resumed != nil {
			m.log = m.log.With().Int64("heal_id", m.resumed.ID).Logger()
		}
		if m.forcedBy == "" && m.resumed == nil {
			checked = append(checked, dev)
		}
	}
	var owners keyOwnerSet
	if len(checked) > 0 {
		owners = u.keyOwners(ctx, checked)
	}
	seen := make(map[id.SenderKey]struct{}, len(members))
	admitted := make([]*member, 0, len(members))
	for _, m := range members {
		if _, dup := seen[m.device.IdentityKey]; dup {
			m.decision.Action, m.decision.Detail = ActionLimited, "listed twice in one batch of heals"
			u.decide(ctx, *m.decision)
			continue
		}
		if m.forcedBy == "" && m.resumed == nil {
			if refusal, ok := owners.check(ctx, *m.decision); !ok {
				*m.decision = refusal
				u.decide(ctx, refusal)
				continue
			}
		}
		seen[m.device.IdentityKey] = struct{}{}
		admitted = append(admitted, m)
	}
	return admitted
}

// healGroup acquires, attempts and records the heals of one group. What a peer sent may reach a
// bug (ours, or mautrix-go's) on the way: the group's heals then end for good, so that
// min_interval starts and the peer cannot make the bridge repeat them every lease.
func (u *Unwedger) healGroup(ctx context.Context, members []*member) {
	started := time.Now()
	// Every heal granted so far lets go of its device (release and doneReplacing may be called
	// more than once).
	releaseAll := func() {
		for _, m := range members {
			if m.release != nil {
				m.doneReplacing()
				m.release()
			}
			if m.hc != nil {
				u.store.forget(m.hc)
			}
		}
	}
	defer func() {
		releaseAll()
		if r := recover(); r != nil {
			err := u.panicked(ctx, PanicHeal, r)
			var left []*member
			for _, m := range members {
				if m.ref.HealID != 0 && !m.ended {
					m.end(HealFailedPermanent, err)
					left = append(left, m)
				}
			}
			u.record(ctx, left, started)
		}
	}()
	granted := u.acquire(ctx, members, started)
	// One HTTP request per attempt: the client's own retries (bridgev2 sets
	// homeserver.retry_limit) would claim again after a claim whose answer was lost, and this loop
	// retries a claim only when its failure proves that no key was handed out.
	set := make(healSet, len(granted))
	for _, m := range granted {
		set[m.device.IdentityKey] = m.hc
	}
	failures := &claimFailures{}
	healCtx := withClaimFailures(withHeals(mautrix.WithMaxRetries(ctx, 0), set), failures)
	for attempt := 1; len(granted) > 0 && ctx.Err() == nil; attempt++ {
		if going := u.prepareAttempt(ctx, granted); len(going) > 0 {
			u.attemptGroup(ctx, healCtx, failures, going)
		}
		left := pendingMembers(granted)
		if left == 0 || attempt >= u.cfg.MaxRetries || ctx.Err() != nil {
			break
		}
		wait := u.cfg.backoff(attempt)
		groupLogger(ctx, granted).Warn().Err(firstErr(granted)).Int("attempt", attempt).Int("devices", left).Dur("retry_in", wait).
			Msg("Transient failure while replacing Olm sessions")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	releaseAll()
	u.record(ctx, granted, started)
}

// acquire asks the ledger for the new heals (one call per class and forcing admin: in practice
// one), takes over the resumed ones, and readies the granted for their attempts. It returns the
// granted; refused and failed members have their decision.
func (u *Unwedger) acquire(ctx context.Context, members []*member, now time.Time) []*member {
	type key struct {
		class    Class
		forcedBy id.UserID
	}
	asks := make(map[key][]*member)
	var order []key
	var granted []*member
	for _, m := range members {
		if m.resumed != nil {
			m.started = m.resumed.StartedAt
			m.ref = HealRef{Device: m.resumed.Device, Owner: u.owner, HealID: m.resumed.ID}
			// The session exists and the ledger has it: m.dummy goes out over exactly that one
			// (the heal context makes the machine use it, and claim nothing).
			m.recorded = true
			m.hc = &healContext{key: m.device.IdentityKey}
			if m.resumed.SessionID == "" {
				m.end(HealFailedTransient, errors.New("interrupted before a session was created"))
			}
			granted = append(granted, u.ready(ctx, m))
			continue
		}
		k := key{m.class, m.forcedBy}
		if _, ok := asks[k]; !ok {
			order = append(order, k)
		}
		asks[k] = append(asks[k], m)
	}
	for _, k := range order {
		group := asks[k]
		devs := make([]LedgerDevice, len(group))
		for i, m := range group {
			devs[i] = LedgerDevice{UserID: m.device.UserID, DeviceID: m.device.DeviceID, IdentityKey: m.device.IdentityKey}
		}
		grants, err := u.ledger.Acquire(ctx, devs, AcquireParams{
			Now: now, MinInterval: u.cfg.MinInterval, Force: k.forcedBy != "", Owner: u.owner, Lease: u.cfg.Lease,
			Class: k.class, ForcedBy: k.forcedBy,
		})
		if err == nil && len(grants) != len(devs) {
			err = fmt.Errorf("the ledger answered %d of %d devices", len(grants), len(devs))
		}
		for i, m := range group {
			switch {
			case err != nil:
				m.decision.Action, m.decision.Err = ActionFailed, fmt.Errorf("failed to ask the ledger whether the session may be replaced: %w", err)
				u.decide(ctx, *m.decision)
			case !grants[i].Granted:
				u.noteReplaced(devicePeer(m.device), grants[i].LastCreatedAt)
				m.decision.Action, m.decision.Detail = ActionLimited, grants[i].Reason(now, u.cfg.MinInterval)
				u.decide(ctx, *m.decision)
			default:
				m.started = now
				m.ref = HealRef{Device: devs[i], Owner: u.owner, HealID: grants[i].HealID}
				if m.class == ClassUnreadableSession && u.tables != nil {
					deleteUnreadable(ctx, u.tables, m.log, m.device.IdentityKey)
				}
				m.hc = &healContext{key: m.device.IdentityKey, onCreated: func(sess *crypto.OlmSession) { u.sessionCreated(ctx, m, sess) }}
				granted = append(granted, u.ready(ctx, m))
			}
		}
	}
	return granted
}

// ready holds a granted heal's lease and marks its device Healing until the heal ends.
func (u *Unwedger) ready(ctx context.Context, m *member) *member {
	m.release = u.hold(m.log.WithContext(ctx), m.ref)
	m.doneReplacing = u.replacing.begin(devicePeer(m.device))
	if m.resumed == nil {
		fault.At(u.ctx, FaultHealGranted)
	}
	return m
}

// sessionCreated records a member's replacement session in the ledger the moment it exists,
// before m.dummy goes out and even if the crypto store failed to keep it (its key is spent either
// way): the interval runs from its creation (the peer learns it from whatever is sent over it
// next), and a process that dies before sending m.dummy leaves a heal that ResumeHeals finishes
// over this very session instead of making a second one.
func (u *Unwedger) sessionCreated(ctx context.Context, m *member, sess *crypto.OlmSession) {
	createdAt := time.Now()
	u.noteReplaced(devicePeer(m.device), createdAt)
	if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), m.ref, sess.ID(), createdAt); err != nil {
		m.log.Err(err).Msg("Failed to record replacement session in the ledger")
		return
	}
	m.recorded = true
	fault.At(u.ctx, FaultSessionCreated)
}

// prepareAttempt readies the members still going for the next attempt and returns those that
// take part: each one's device is the one the machine stores (the machine encrypts to that one;
// devices missing from the store are fetched in one key query for the group), a resumed heal has
// found its session in the crypto store, and a session the crypto store failed to keep is stored
// first (one device's store failure would fail the machine's call for the whole group).
func (u *Unwedger) prepareAttempt(ctx context.Context, members []*member) []*member {
	u.checkDevices(ctx, members)
	var going []*member
	for _, m := range members {
		if m.done || !m.checked {
			continue
		}
		sess, stored := m.hc.replacement()
		if m.resumed != nil && sess == nil {
			if !u.findResumed(ctx, m) {
				continue
			}
			sess, stored = m.hc.replacement()
		}
		if sess != nil && !stored {
			if err := u.store.keep(ctx, m.hc, m.device.IdentityKey, sess); err != nil {
				m.err = fmt.Errorf("%w: %w", errCryptoStore, err)
				continue
			}
			m.hc.setStored()
		}
		u.recordLate(ctx, m, sess)
		going = append(going, m)
	}
	return going
}

// recordLate records the member's replacement session in the ledger if the ledger was unreachable
// when the session was made (sessionCreated): tried again before and after each attempt.
func (u *Unwedger) recordLate(ctx context.Context, m *member, sess *crypto.OlmSession) {
	if sess != nil && !m.recorded {
		if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), m.ref, sess.ID(), time.Now()); err == nil {
			m.recorded = true
		}
	}
}

// findResumed looks up the session of a resumed heal in the crypto store. The heal ends for good
// when the session is gone; a lookup that failed is tried again.
func (u *Unwedger) findResumed(ctx context.Context, m *member) bool {
	sessions, err := u.mach.CryptoStore.GetSessions(ctx, m.device.IdentityKey)
	if err != nil {
		m.err = fmt.Errorf("failed to look up the session of the interrupted heal: %w", storeErr(err))
		return false
	}
	for _, s := range sessions {
		if s.ID() == m.resumed.SessionID {
			m.hc.created(s, true)
			return true
		}
	}
	m.end(HealFailedPermanent, fmt.Errorf("the session %s of the interrupted heal is gone", m.resumed.SessionID))
	return false
}

// checkDevices checks, once per member, that the machine's store has its device with its
// identity key, fetching the devices it lacks with one key query. A device the homeserver no
// longer lists, or lists with another key, fails; a lookup that failed is tried again.
func (u *Unwedger) checkDevices(ctx context.Context, members []*member) {
	var missing []*member
	var users []id.UserID
	for _, m := range members {
		if m.done || m.checked {
			continue
		}
		stored, err := u.mach.CryptoStore.GetDevice(ctx, m.device.UserID, m.device.DeviceID)
		switch {
		case err != nil:
			m.err = fmt.Errorf("failed to look up the device in the crypto store: %w", err)
		case stored == nil:
			missing = append(missing, m)
			if !slices.Contains(users, m.device.UserID) {
				users = append(users, m.device.UserID)
			}
		default:
			m.checkKey(stored)
		}
	}
	if len(users) == 0 {
		return
	}
	fetched, errs := u.fetchKeys(ctx, users)
	for _, m := range missing {
		switch err := errs[m.device.UserID]; {
		case err != nil && transient(err):
			m.err = fmt.Errorf("failed to fetch the device's keys: %w", err)
		case err != nil:
			m.end(HealFailedPermanent, fmt.Errorf("failed to fetch the device's keys: %w", err))
		default:
			m.checkKey(fetched[m.device.UserID][m.device.DeviceID])
		}
	}
}

// fetchKeys fetches the users' devices in one key query. When that fails for good (a panic on
// the answer, say), each user is fetched alone, so that one user's answer fails only that user's
// devices. It returns the devices and each user's error.
func (u *Unwedger) fetchKeys(ctx context.Context, users []id.UserID) (map[id.UserID]map[id.DeviceID]*id.Device, map[id.UserID]error) {
	fetch := func(users []id.UserID) (fetched map[id.UserID]map[id.DeviceID]*id.Device, err error) {
		err = u.catch(ctx, PanicFetchKeys, func() error {
			fetched, err = u.mach.FetchKeys(ctx, users, true)
			return err
		})
		return fetched, err
	}
	errs := make(map[id.UserID]error, len(users))
	fetched, err := fetch(users)
	if err == nil || len(users) == 1 || transient(err) {
		for _, userID := range users {
			errs[userID] = err
		}
		return fetched, errs
	}
	fetched = make(map[id.UserID]map[id.DeviceID]*id.Device, len(users))
	for _, userID := range users {
		one, err := fetch([]id.UserID{userID})
		fetched[userID], errs[userID] = one[userID], err
	}
	return fetched, errs
}

// checkKey ends the member's heal unless the machine's device is the member's; the member then
// carries the stored device (with its signing key).
func (m *member) checkKey(stored *id.Device) {
	switch {
	case stored == nil:
		m.end(HealFailedPermanent, errors.New("the homeserver does not list the device"))
	case stored.IdentityKey != m.device.IdentityKey:
		m.end(HealFailedPermanent, errors.New("the device has another identity key now"))
	default:
		m.device, m.checked = stored, true
	}
}

// attemptGroup makes one attempt for the members going (attempt). When the machine failed on
// the bridge's side for the whole group, for no member's own reason (a crypto store error while
// it looked the devices up, a panic on what one member's server answered), the halves are tried
// again at once, down to single members: the member at fault fails alone, and the others heal in
// this attempt, for a few more requests than one.
func (u *Unwedger) attemptGroup(ctx context.Context, healCtx context.Context, failures *claimFailures, going []*member) {
	if !u.attempt(ctx, healCtx, failures, going) || len(going) < 2 || ctx.Err() != nil {
		return
	}
	half := len(going) / 2
	for _, part := range [][]*member{going[:half], going[half:]} {
		if part = slices.DeleteFunc(slices.Clone(part), func(m *member) bool { return m.done }); len(part) > 0 {
			u.attemptGroup(ctx, healCtx, failures, part)
		}
	}
}

// attempt makes one attempt for the members going: the machine claims one key for each that has
// no replacement session yet (one request), creates and stores the sessions (the heal contexts
// record them) and encrypts m.dummy over them; then one request sends them all. This is the one
// place that sends a heal's m.dummy. It reports whether the machine failed for the whole group on
// the bridge's side before any member's claim was answered (split: worth trying in smaller
// groups); with more than one member such a failure ends no member's heal.
//
// It relies on the order in which mautrix-go's EncryptToDevices (crypto/encryptolm.go) calls the
// store: HasSession per device, one ClaimKeys, AddSession per new session, then GetLatestSession
// per device before encrypting (Store and healContext answer them; pinned in internal/upstream).
func (u *Unwedger) attempt(ctx context.Context, healCtx context.Context, failures *claimFailures, going []*member) (split bool) {
	req := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	for _, m := range going {
		m.attempts++
		if req.Messages[m.device.UserID] == nil {
			req.Messages[m.device.UserID] = make(map[id.DeviceID]*event.Content)
		}
		req.Messages[m.device.UserID][m.device.DeviceID] = &event.Content{}
	}
	var encrypted *mautrix.ReqSendToDevice
	failures.reset()
	err := u.catch(ctx, PanicEncryptDummies, func() (err error) {
		encrypted, err = u.mach.EncryptToDevices(healCtx, event.ToDeviceDummy, req)
		return err
	})
	// The machine looks the devices up, claims one key for each member without a session, then
	// reads each member's session from the store, which fails only with errCryptoStore (the
	// heal contexts answer it): with no error or that one, the claim was answered.
	answered := err == nil || errors.Is(err, errCryptoStore)
	split = err != nil && !answered && !fromHomeserver(err) && ctx.Err() == nil
	send := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	var sending []*member
	for _, m := range going {
		claimed, unsaved := m.hc.takeClaimed(), m.hc.takeUnsaved()
		sess, _ := m.hc.replacement()
		u.recordLate(ctx, m, sess)
		switch {
		case claimed && sess == nil && answered && failures.failed(m.device.UserID.Homeserver()):
			// The homeserver could not reach the device's server (the answer's failures): no
			// key was handed out, and it is no fault of the device. Tried again with backoff,
			// and, if it never answers, failed_transient (min_interval does not start).
			m.err = fmt.Errorf("%w: %s", errServerFailed, m.device.UserID.Homeserver())
		case claimed && sess == nil && answered:
			// The homeserver gave no key of the device, or one without a valid signature: this
			// device fails, the others of the group go on.
			m.end(HealFailedPermanent, errNoOneTimeKey)
		case claimed && sess == nil:
			// The claim request itself failed.
			m.err = err
			if ctx.Err() != nil {
				continue // the bridge is stopping: not the device's fault
			} else if !transient(err) {
				m.end(HealFailedPermanent, err)
			} else if !refused(err) {
				// It may have reached the homeserver, which may have handed out a key whose
				// answer is lost: claiming again could spend a second one.
				m.claimLost = true
				m.end(HealFailedTransient, err)
			}
		case err != nil:
			// A step before the claim (looking up the devices) or after it (the crypto store)
			// failed: tried again, over the session if one was made. A failure of a group is
			// no member's own until the member is tried alone (attemptGroup).
			m.err = err
			if sess == nil && ctx.Err() == nil && !transient(err) && !(split && len(going) > 1) {
				m.end(HealFailedPermanent, err)
			}
		case sess == nil:
			// The machine claimed nothing for the member (it found another device under its ID
			// since prepareAttempt): whatever it encrypted went over no replacement session.
			m.err = errors.New("the machine created no replacement session")
		case encrypted.Messages[m.device.UserID][m.device.DeviceID] == nil:
			m.err = fmt.Errorf("the machine encrypted no m.dummy over session %s", sess.ID())
		case unsaved:
			// The session's state after this m.dummy is not in the store: sent, it would be one
			// the machine may load behind the peer's. Tried again over the session.
			m.err = fmt.Errorf("%w: session %s was not written back after encrypting m.dummy", errCryptoStore, sess.ID())
		default:
			if send.Messages[m.device.UserID] == nil {
				send.Messages[m.device.UserID] = make(map[id.DeviceID]*event.Content)
			}
			send.Messages[m.device.UserID][m.device.DeviceID] = encrypted.Messages[m.device.UserID][m.device.DeviceID]
			sending = append(sending, m)
		}
	}
	if err != nil && ctx.Err() == nil {
		zerolog.Ctx(ctx).Debug().Err(err).Int("devices", len(going)).Msg("Failed to create replacement Olm sessions")
	}
	if len(sending) == 0 {
		return split
	}
	err = u.catch(ctx, PanicSendDummy, func() error {
		_, err := u.mach.Client.SendToDevice(mautrix.WithMaxRetries(ctx, 0), event.ToDeviceEncrypted, send)
		return err
	})
	if err != nil {
		err = fmt.Errorf("failed to send m.dummy to %d device(s): %w", len(sending), err)
	}
	for _, m := range sending {
		switch {
		case err == nil:
			m.end(HealHealed, nil)
		case ctx.Err() == nil && !transient(err):
			m.end(HealFailedPermanent, err)
		default:
			m.err = err
		}
	}
	return split
}

// errNoOneTimeKey: the claim was answered, but without a usable one-time key of the device.
var errNoOneTimeKey = errors.New("the homeserver gave no one-time key of the device with a valid signature")

// errServerFailed: the claim was answered, but the homeserver could not reach the device's server
// (named in the answer's failures).
var errServerFailed = errors.New("the homeserver could not claim a one-time key from the device's server")

// errCryptoStore marks a heal's failure to store the new session.
var errCryptoStore = errors.New("the crypto store could not keep the new session")

// deferrable reports whether a heal that did not end is kept in progress for ResumeHeals instead
// of finished: its session exists and the ledger counts it (finishing it as failed would leave the
// device wedged for the whole interval), and the interval since it began has not passed (after
// that a new heal may start anyway). A stopping bridge always leaves it for the next process.
func (u *Unwedger) deferrable(ctx context.Context, m *member) bool {
	_, stored := m.hc.replacement()
	return m.outcome == HealFailedTransient && !m.claimLost && m.recorded && (stored || m.resumed != nil && m.resumed.SessionID != "") &&
		(ctx.Err() != nil || time.Since(m.started) < u.cfg.MinInterval)
}

// record ends the members' heals in the ledger (finished in one call, or postponed) and makes
// their decisions. A stopping bridge leaves the heals to the lease and the next failure; that is
// no failure.
func (u *Unwedger) record(ctx context.Context, members []*member, started time.Time) {
	finishCtx := context.WithoutCancel(ctx)
	var refs []HealRef
	var ends []HealEnd
	var finished []*member
	for _, m := range members {
		if !m.done {
			m.outcome = HealFailedTransient
		}
		m.ended = true
		errText := ""
		if m.outcome != HealHealed && m.err != nil {
			errText = m.err.Error()
		}
		attempts := m.attempts
		if m.resumed != nil {
			attempts += m.resumed.Attempts
		}
		if m.deferred = u.deferrable(ctx, m); m.deferred {
			if err := u.ledger.Postpone(finishCtx, m.ref, attempts, errText); err != nil {
				m.log.Err(err).Msg("Failed to postpone heal in the ledger")
			}
			continue
		}
		end := HealEnd{Outcome: m.outcome, Attempts: attempts, Err: errText, At: time.Now()}
		if sess, stored := m.hc.replacement(); sess != nil && !stored && ctx.Err() != nil {
			// The bridge stopped before the store kept the session: see HealEnd.Discarded.
			end.Discarded = sess.ID()
		}
		refs, ends, finished = append(refs, m.ref), append(ends, end), append(finished, m)
	}
	if len(refs) > 0 {
		if err := u.ledger.Finish(finishCtx, refs, ends); err != nil {
			groupLogger(ctx, finished).Err(err).Int("devices", len(refs)).Msg("Failed to record heal outcomes in the ledger")
		}
	}
	for _, m := range members {
		u.decideMember(ctx, m, started)
	}
}

// decideMember makes the decision of a member whose heal ended or was postponed (record). A
// resumed heal that stays postponed is decided once, when it is first postponed; the rounds after
// that log at debug level.
func (u *Unwedger) decideMember(ctx context.Context, m *member, started time.Time) {
	d := m.decision
	d.Duration = time.Since(started)
	d.Action, d.Detail, d.Err = outcomeOf(m, m.deferred, ctx.Err() != nil, u.cfg.Lease)
	if d.Action == ActionDeferred && m.resumed != nil && m.resumed.Postponed() {
		m.log.Debug().Err(m.err).Msg("Heal still deferred")
		return
	}
	u.decide(ctx, *d)
	if d.Action == ActionHealed && u.followers != nil {
		u.followers.DeviceHealed(m.log.WithContext(ctx), m.device)
	}
}

// outcomeOf and HealRecord.Decision are the one place that says, for people and for the
// decision, how a heal ended: outcomeOf as the engine ends it, Decision as the ledger recorded it.
func outcomeOf(m *member, deferred, stopping bool, lease time.Duration) (action Action, detail string, err error) {
	sess, stored := m.hc.replacement()
	attempts := fmt.Sprintf("%d attempt(s)", m.attempts)
	switch {
	case deferred && m.resumed != nil:
		return ActionDeferred, "resuming an interrupted heal", m.err
	case deferred:
		return ActionDeferred, fmt.Sprintf("session %s created; m.dummy failed %d time(s), retried within %s", sess.ID(), m.attempts, lease/2), m.err
	case m.outcome == HealHealed && m.resumed != nil:
		return ActionHealed, fmt.Sprintf("resumed an interrupted heal: m.dummy sent over session %s", sess.ID()), nil
	case m.outcome == HealHealed:
		return ActionHealed, healedDetail(sess.ID(), m.attempts), nil
	case m.resumed != nil && m.resumed.SessionID == "":
		return ActionFailed, "a stopped process left this heal before creating a session; the next failure heals again", m.err
	case m.resumed != nil:
		return ActionFailed, fmt.Sprintf("resuming an interrupted heal: %s after %s", m.outcome, attempts), m.err
	case m.claimLost:
		return ActionFailed, fmt.Sprintf("%s after %s: the answer to the key claim was lost and the homeserver may have handed out a key, so this heal claims no other", m.outcome, attempts), m.err
	case sess != nil && !stored && stopping:
		// The bridge stopped before the store kept the session: no peer can know it, so the
		// ledger forgot it (HealEnd.Discarded), and the next process may heal the device again.
		return ActionFailed, fmt.Sprintf("%s after %s: the bridge stopped before the crypto store kept session %s, which was discarded", m.outcome, attempts, sess.ID()), m.err
	case sess != nil && !stored:
		// The session dies with this process; its key is spent, and the ledger, which recorded
		// the session, gives the device no new one within the interval (unless it was discarded:
		// see HealEnd.Discarded).
		return ActionFailed, fmt.Sprintf("%s after %s: the crypto store never kept session %s", m.outcome, attempts, sess.ID()), m.err
	default:
		return ActionFailed, fmt.Sprintf("%s after %s", m.outcome, attempts), m.err
	}
}

// healedDetail says which session a heal made, and how many attempts it took.
func healedDetail(session id.SessionID, attempts int) string {
	return fmt.Sprintf("new Olm session %s after %d attempt(s)", session, attempts)
}

// Decision is the decision a heal in the ledger ended with, or is at: healed, failed, deferred
// (its session exists, m.dummy waits for the homeserver) or healing (still running).
func (h *HealRecord) Decision() Decision {
	d := Decision{At: h.StartedAt, Class: h.Class, UserID: h.Device.UserID, DeviceID: h.Device.DeviceID,
		Key: h.Device.IdentityKey, ForcedBy: h.ForcedBy}
	if !h.FinishedAt.IsZero() {
		d.At = h.FinishedAt
	}
	switch {
	case h.Outcome == HealHealed:
		d.Action, d.Detail = ActionHealed, healedDetail(h.SessionID, h.Attempts)
	case h.Postponed():
		d.Action = ActionDeferred
		d.Detail = fmt.Sprintf("session %s created, m.dummy not sent yet after %d attempt(s): %s", h.SessionID, h.Attempts, h.Error)
	case h.Outcome == HealInProgress:
		d.Action, d.Detail = ActionHealing, "a heal is running"
	default:
		d.Action = ActionFailed
		d.Detail = fmt.Sprintf("%s after %d attempt(s): %s", h.Outcome, h.Attempts, h.Error)
	}
	return d
}

// groupLogger is the logger of a line about the members: the member's own, with its device's
// fields, when there is one.
func groupLogger(ctx context.Context, members []*member) *zerolog.Logger {
	if len(members) == 1 {
		return &members[0].log
	}
	return zerolog.Ctx(ctx)
}

// pendingMembers counts the members whose heal has not ended.
func pendingMembers(members []*member) int {
	n := 0
	for _, m := range members {
		if !m.done {
			n++
		}
	}
	return n
}

// firstErr is the last failure of the first member still going, for the retry log line.
func firstErr(members []*member) error {
	for _, m := range members {
		if !m.done && m.err != nil {
			return m.err
		}
	}
	return nil
}

// refused reports whether a failed request was refused before the homeserver acted on it: the
// connection was never made (refused, unresolvable, unreachable: the dial failed), or the
// homeserver or a proxy in front of it turned the request away (429, and 503, which load
// balancers and rate limiters answer without forwarding). After a timeout, a dropped connection
// or another 5xx (a proxy's 502 or 504 may come after the homeserver did the work) it may have.
func refused(err error) bool {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		code := httpErr.Response.StatusCode
		return code == http.StatusTooManyRequests || code == http.StatusServiceUnavailable
	}
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "dial"
}

// fromHomeserver reports whether a failure came from the homeserver or the way to it (an error
// answer, the network, a timeout), not from the bridge's own side.
func fromHomeserver(err error) bool {
	var httpErr mautrix.HTTPError
	var netErr net.Error
	return errors.As(err, &httpErr) || errors.As(err, &netErr) || errors.Is(err, context.DeadlineExceeded)
}

// transient reports whether a failure may go away by itself: the homeserver could not be reached,
// timed out, or answered 429/5xx, or the crypto store failed (Store marks its errors). Everything
// else (no one-time key to claim, invalid key signatures, 4xx, a recovered panic) is the device's
// and permanent. mautrix-go wraps transport errors (HTTPError.Unwrap), so they are matched by
// type and errno, never by their text.
func transient(err error) bool {
	switch {
	case errors.Is(err, ErrPanicked):
		return false
	case errors.Is(err, errCryptoStore), errors.Is(err, errStore):
		return true
	}
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		code := httpErr.Response.StatusCode
		return code == http.StatusTooManyRequests || code == http.StatusRequestTimeout || code >= 500
	}
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// deviceLogger is the logger of a heal of dev: every line carries the device's fields and the
// heal's class.
func deviceLogger(log zerolog.Logger, dev LedgerDevice, class Class) zerolog.Logger {
	return log.With().
		Str("action", "unwedge").
		Stringer("user_id", dev.UserID).
		Stringer("device_id", dev.DeviceID).
		Stringer("identity_key", dev.IdentityKey).
		Str("class", string(class)).
		Logger()
}

// deleteUnreadable deletes the stored sessions with key that cannot be loaded (one corrupt row
// hides every session with the device from the store, the replacement included), and logs it.
func deleteUnreadable(ctx context.Context, repairer Repairer, log zerolog.Logger, key id.SenderKey) {
	if n, err := repairer.DeleteUnreadableSessions(ctx, key); err != nil {
		log.Err(err).Msg("Failed to delete unreadable Olm sessions")
	} else {
		log.Info().Int("deleted", n).Msg("Deleted unreadable Olm sessions")
	}
}
