package unwedge

// This file owns the heals the bridge starts on its own for many devices at once (HealBatch):
// after the crypto store was restored from a backup, every device the bridge held a session with
// is healed at startup. Each device gets what Heal gives one (the ledger's decision, one key at
// most, the session recorded before m.dummy, healed / deferred / failed / limited), but a batch
// of devices shares one /keys/claim and one /sendToDevice.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/fault"
)

const (
	// BatchDevices is how many devices one batch of HealBatch heals: one /keys/claim for their
	// one-time keys and one /sendToDevice with their m.dummy events, so 1,000 devices cost at
	// most 20 of each.
	BatchDevices = 50
	// batchesInFlight bounds the batches HealBatch runs at once: a few keep the homeserver and
	// the database busy while one batch encrypts under the machine's Olm lock, without a storm
	// of requests after a restore.
	batchesInFlight = 4
)

// HealBatch heals many devices that no Olm event named (class rolled_back or session_lost, found
// at startup), in batches of BatchDevices with batchesInFlight batches at once. Per device it
// keeps Heal's rules: the ledger decides (MSC1719's interval, leases), at most one one-time key is
// claimed, the replacement session is recorded in the ledger before m.dummy goes out over it, and
// a session whose m.dummy could not be sent is left to ResumeHeals (deferred). A device with no
// one-time key fails alone, not its batch. The caller has checked the scope; the per-user and
// per-minute caps, which bound what peers can make the bridge do, do not apply to heals the
// bridge starts on its own. It returns one decision per device, in the order given, once all are
// done; each was logged and passed to OnDecision, and OnHealed was called for each healed one.
func (u *Unwedger) HealBatch(ctx context.Context, devices []*id.Device, class Class) []Decision {
	decisions := make([]Decision, len(devices))
	// A device listed twice would be two heals of one session: the second is refused here, as
	// the ledger's lease would refuse it.
	seen := make(map[id.SenderKey]struct{}, len(devices))
	owners := u.keyOwners(ctx, devices)
	var batches [][]int
	for i, dev := range devices {
		d := Decision{Class: class, UserID: dev.UserID, DeviceID: dev.DeviceID, Key: dev.IdentityKey}
		if _, dup := seen[dev.IdentityKey]; dup {
			decisions[i] = d
			decisions[i].Action, decisions[i].Detail = ActionLimited, "listed twice in one batch of heals"
			u.decide(ctx, decisions[i])
			continue
		}
		if refusal, ok := owners.check(ctx, d); !ok {
			decisions[i] = refusal
			u.decide(ctx, refusal)
			continue
		}
		seen[dev.IdentityKey] = struct{}{}
		if n := len(batches); n == 0 || len(batches[n-1]) == BatchDevices {
			batches = append(batches, make([]int, 0, BatchDevices))
		}
		batches[len(batches)-1] = append(batches[len(batches)-1], i)
	}
	next := make(chan []int)
	var wg sync.WaitGroup
	for range min(batchesInFlight, len(batches)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for batch := range next {
				members := make([]*batchMember, len(batch))
				for j, i := range batch {
					members[j] = &batchMember{device: devices[i], decision: &decisions[i]}
				}
				_ = u.catch(ctx, PanicHealBatch, func() error {
					u.healBatch(ctx, members, class)
					return nil
				})
			}
		}()
	}
	for _, batch := range batches {
		next <- batch
	}
	close(next)
	wg.Wait()
	return decisions
}

// batchMember is one device of a batch, and how far its heal got.
type batchMember struct {
	device   *id.Device
	decision *Decision
	log      zerolog.Logger

	ref     HealRef
	hc      *healContext
	release func()
	// doneReplacing ends Healing for the device.
	doneReplacing func()
	// recorded: the ledger has the replacement session. checked: the machine's store has the
	// device with this identity key (the machine encrypts to the device it stores).
	recorded, checked bool
	attempts          int
	// done: the heal ended (outcome); err is the last failure, claimLost says the answer to
	// the device's key claim was lost.
	done      bool
	outcome   HealOutcome
	err       error
	claimLost bool
}

// end ends the member's heal with an outcome.
func (m *batchMember) end(outcome HealOutcome, err error) {
	m.done, m.outcome, m.err = true, outcome, err
}

// healBatch runs the heals of one batch: the ledger's decisions, one key claim and one send per
// attempt for all members still going, retried on transient failures as Heal retries.
func (u *Unwedger) healBatch(ctx context.Context, members []*batchMember, class Class) {
	started := time.Now()
	batchLog := zerolog.Ctx(ctx).With().Str("action", "unwedge").Str("class", string(class)).Logger()
	grants, errs := u.acquireMembers(ctx, members, class, started)
	granted := members[:0:0]
	for i, m := range members {
		if u.grantMember(ctx, m, started, grants[i], errs[i]) {
			granted = append(granted, m)
		}
	}
	if len(granted) == 0 {
		return
	}
	set := make(healSet, len(granted))
	for _, m := range granted {
		set[m.device.IdentityKey] = m.hc
		m.release = u.hold(m.log.WithContext(ctx), m.ref)
		m.doneReplacing = u.replacingFor(devicePeer(m.device))
		fault.At(u.ctx, FaultHealGranted)
	}
	// One HTTP request per attempt, as in Heal: the client's own retries would claim again
	// after a claim whose answer was lost.
	healCtx := withHeals(mautrix.WithMaxRetries(ctx, 0), set)
	for attempt := 1; ctx.Err() == nil; attempt++ {
		if going := u.prepareAttempt(ctx, granted); len(going) > 0 {
			u.attemptGroup(ctx, healCtx, going, batchLog)
		}
		left := pendingMembers(granted)
		if left == 0 || attempt >= u.cfg.MaxRetries || ctx.Err() != nil {
			break
		}
		wait := u.cfg.backoff(attempt)
		batchLog.Warn().Err(firstErr(granted)).Int("attempt", attempt).Int("devices", left).Dur("retry_in", wait).
			Msg("Transient failure while replacing Olm sessions in a batch")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	for _, m := range granted {
		m.doneReplacing()
		m.release()
	}
	u.finishMembers(ctx, granted, started)
}

// batchLedger is a Ledger that decides for a batch of devices with a few statements instead of
// a few per device (LedgerQuery on Postgres): one device at a time, the grants and the outcomes
// took about 30 % of a batch's time. A batch uses it when the ledger has it.
type batchLedger interface {
	// AcquireMany is Acquire for each device (each listed once): one grant per device, in order.
	AcquireMany(ctx context.Context, devs []LedgerDevice, p AcquireParams) ([]*Grant, error)
	// FinishMany is Finish for each heal, refs[i] ending as ends[i].
	FinishMany(ctx context.Context, refs []HealRef, ends []HealEnd) error
}

// acquireMembers asks the ledger for the members' heals: a grant or an error per member.
func (u *Unwedger) acquireMembers(ctx context.Context, members []*batchMember, class Class, now time.Time) ([]*Grant, []error) {
	grants, errs := make([]*Grant, len(members)), make([]error, len(members))
	p := AcquireParams{Now: now, MinInterval: u.cfg.MinInterval, Owner: u.owner, Lease: u.cfg.Lease, Class: class}
	devs := make([]LedgerDevice, len(members))
	for i, m := range members {
		dev := m.device
		devs[i] = LedgerDevice{UserID: dev.UserID, DeviceID: dev.DeviceID, IdentityKey: dev.IdentityKey}
		*m.decision = Decision{Class: class, UserID: dev.UserID, DeviceID: dev.DeviceID, Key: dev.IdentityKey}
		m.log = deviceLogger(*zerolog.Ctx(ctx), devs[i], class)
	}
	if bl, ok := u.ledger.(batchLedger); ok {
		all, err := bl.AcquireMany(ctx, devs, p)
		if err == nil && len(all) != len(devs) {
			err = fmt.Errorf("the ledger answered %d of %d devices", len(all), len(devs))
		}
		for i := range members {
			if err != nil {
				errs[i] = err
			} else {
				grants[i] = all[i]
			}
		}
		return grants, errs
	}
	for i, m := range members {
		grants[i], errs[i] = u.ledger.Acquire(m.log.WithContext(ctx), devs[i], p)
	}
	return grants, errs
}

// grantMember takes the ledger's answer for a member. Granted, the member has its ledger
// reference and heal context; refused or failed, its decision is made.
func (u *Unwedger) grantMember(ctx context.Context, m *batchMember, now time.Time, grant *Grant, err error) bool {
	dev := m.device
	ldev := LedgerDevice{UserID: dev.UserID, DeviceID: dev.DeviceID, IdentityKey: dev.IdentityKey}
	if err != nil {
		m.decision.Action, m.decision.Err = ActionFailed, fmt.Errorf("failed to ask the ledger whether the session may be replaced: %w", err)
		u.decide(ctx, *m.decision)
		return false
	} else if !grant.Granted {
		u.noteReplaced(devicePeer(dev), grant.LastCreatedAt)
		m.decision.Action, m.decision.Detail = ActionLimited, grant.Reason(now, u.cfg.MinInterval)
		u.decide(ctx, *m.decision)
		return false
	}
	m.ref = HealRef{Device: ldev, Owner: u.owner, HealID: grant.HealID}
	if m.decision.Class == ClassUnreadableSession && u.tables != nil {
		deleteUnreadable(ctx, u.tables, m.log, dev.IdentityKey)
	}
	// As in Heal: the session is recorded the moment it exists, before m.dummy goes out, so the
	// interval runs from its creation and ResumeHeals can finish the heal over it.
	m.hc = &healContext{key: dev.IdentityKey, onCreated: func(sess *crypto.OlmSession) {
		createdAt := time.Now()
		u.noteReplaced(devicePeer(dev), createdAt)
		if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), m.ref, sess.ID(), createdAt); err != nil {
			m.log.Err(err).Msg("Failed to record replacement session in the ledger")
			return
		}
		m.recorded = true
		fault.At(u.ctx, FaultSessionCreated)
	}}
	return true
}

// prepareAttempt readies the members still going for the next attempt and returns those that
// take part: each one's device is the one the machine stores (the machine encrypts to that one;
// devices missing from the store are fetched in one key query for the batch), and a session the
// crypto store failed to keep is stored first (one device's store failure would fail the
// machine's call for the whole batch).
func (u *Unwedger) prepareAttempt(ctx context.Context, members []*batchMember) []*batchMember {
	u.checkDevices(ctx, members)
	store := u.mach.CryptoStore.(*Store)
	var going []*batchMember
	for _, m := range members {
		if m.done || !m.checked {
			continue
		}
		sess, stored := m.hc.replacement()
		if sess != nil && !stored {
			if err := store.keep(ctx, m.device.IdentityKey, sess); err != nil {
				m.err = fmt.Errorf("%w: %w", errCryptoStore, err)
				continue
			}
			m.hc.setStored()
		}
		if sess != nil && !m.recorded {
			// The ledger was unreachable when the session was made: try again.
			if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), m.ref, sess.ID(), time.Now()); err == nil {
				m.recorded = true
			}
		}
		going = append(going, m)
	}
	return going
}

// checkDevices checks, once per member, that the machine's store has its device with its
// identity key, fetching the devices it lacks with one key query. A device the homeserver no
// longer lists, or lists with another key, fails; a lookup that failed is tried again.
func (u *Unwedger) checkDevices(ctx context.Context, members []*batchMember) {
	var missing []*batchMember
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

// checkKey ends the member's heal unless the machine's device is the member's.
func (m *batchMember) checkKey(stored *id.Device) {
	switch {
	case stored == nil:
		m.end(HealFailedPermanent, errors.New("the homeserver does not list the device"))
	case stored.IdentityKey != m.device.IdentityKey:
		m.end(HealFailedPermanent, errors.New("the device has another identity key now"))
	default:
		m.checked = true
	}
}

// attemptGroup makes one attempt for the members going (attemptBatch). When the machine failed
// on the bridge's side for the whole group, for no member's own reason (a crypto store error
// while it looked the devices up, a panic on what one member's server answered), the halves are
// tried again at once, down to single members: the member at fault fails alone, and the others
// heal in this attempt, for a few more requests than one.
func (u *Unwedger) attemptGroup(ctx context.Context, healCtx context.Context, going []*batchMember, log zerolog.Logger) {
	if !u.attemptBatch(ctx, healCtx, going, log) || len(going) < 2 || ctx.Err() != nil {
		return
	}
	half := len(going) / 2
	for _, part := range [][]*batchMember{going[:half], going[half:]} {
		if part = slices.DeleteFunc(slices.Clone(part), func(m *batchMember) bool { return m.done }); len(part) > 0 {
			u.attemptGroup(ctx, healCtx, part, log)
		}
	}
}

// attemptBatch makes one attempt for the members going: the machine claims one key for each
// that has no replacement session yet (one request), creates and stores the sessions (the
// heal contexts record them) and encrypts m.dummy over them; then one request sends them all.
// It reports whether the machine failed for the whole group on the bridge's side before any
// member's claim was answered (split: worth trying in smaller groups); with more than one member
// such a failure ends no member's heal.
func (u *Unwedger) attemptBatch(ctx context.Context, healCtx context.Context, going []*batchMember, log zerolog.Logger) (split bool) {
	req := &mautrix.ReqSendToDevice{Messages: make(map[id.UserID]map[id.DeviceID]*event.Content)}
	for _, m := range going {
		m.attempts++
		if req.Messages[m.device.UserID] == nil {
			req.Messages[m.device.UserID] = make(map[id.DeviceID]*event.Content)
		}
		req.Messages[m.device.UserID][m.device.DeviceID] = &event.Content{}
	}
	var encrypted *mautrix.ReqSendToDevice
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
	var sending []*batchMember
	for _, m := range going {
		claimed := m.hc.takeClaimed()
		sess, _ := m.hc.replacement()
		if sess != nil && !m.recorded {
			if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), m.ref, sess.ID(), time.Now()); err == nil {
				m.recorded = true
			}
		}
		switch {
		case claimed && sess == nil && answered:
			// The homeserver gave no key of the device, or one without a valid signature: this
			// device fails, the others of the batch go on.
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
		default:
			if send.Messages[m.device.UserID] == nil {
				send.Messages[m.device.UserID] = make(map[id.DeviceID]*event.Content)
			}
			send.Messages[m.device.UserID][m.device.DeviceID] = encrypted.Messages[m.device.UserID][m.device.DeviceID]
			sending = append(sending, m)
		}
	}
	if err != nil && ctx.Err() == nil {
		log.Debug().Err(err).Int("devices", len(going)).Msg("Failed to create replacement Olm sessions in a batch")
	}
	if len(sending) == 0 {
		return split
	}
	if _, err = u.mach.Client.SendToDevice(mautrix.WithMaxRetries(ctx, 0), event.ToDeviceEncrypted, send); err != nil {
		err = fmt.Errorf("failed to send m.dummy to %d devices: %w", len(sending), err)
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

// finishMembers records how the members' heals ended, in the ledger and as their decisions, as
// Heal does for one: each ended heal is finished (in one statement with a batchLedger), a heal
// whose session exists but whose m.dummy could not be sent is postponed for ResumeHeals.
func (u *Unwedger) finishMembers(ctx context.Context, members []*batchMember, started time.Time) {
	// A stopping bridge leaves the heals to the lease and the next failure; it is no failure.
	finishCtx := context.WithoutCancel(ctx)
	var refs []HealRef
	var ends []HealEnd
	var finished []*batchMember
	for _, m := range members {
		if !m.done {
			m.outcome = HealFailedTransient
		}
		errText := ""
		if m.outcome != HealHealed && m.err != nil {
			errText = m.err.Error()
		}
		if _, stored := m.hc.replacement(); m.outcome == HealFailedTransient && m.recorded && stored {
			// The session exists and the ledger counts it: ResumeHeals sends m.dummy over it
			// once the homeserver answers again.
			if err := u.ledger.Postpone(finishCtx, m.ref, m.attempts, errText); err != nil {
				m.log.Err(err).Msg("Failed to postpone heal in the ledger")
			}
			continue
		}
		end := HealEnd{Outcome: m.outcome, Attempts: m.attempts, Err: errText, At: time.Now()}
		if sess, stored := m.hc.replacement(); sess != nil && !stored && ctx.Err() != nil {
			// The bridge stopped before the store kept the session: see HealEnd.Discarded.
			end.Discarded = sess.ID()
		}
		refs = append(refs, m.ref)
		ends = append(ends, end)
		finished = append(finished, m)
	}
	if bl, ok := u.ledger.(batchLedger); ok && len(refs) > 0 {
		if err := bl.FinishMany(finishCtx, refs, ends); err != nil {
			zerolog.Ctx(ctx).Err(err).Int("devices", len(refs)).Msg("Failed to record the outcomes of a batch of heals in the ledger")
		}
	} else {
		for i, m := range finished {
			if err := u.ledger.Finish(finishCtx, refs[i], ends[i]); err != nil {
				m.log.Err(err).Msg("Failed to record heal outcome in the ledger")
			}
		}
	}
	for _, m := range members {
		u.decideMember(ctx, m, started)
	}
}

// decideMember makes the decision of a member whose heal ended (finishMembers).
func (u *Unwedger) decideMember(ctx context.Context, m *batchMember, started time.Time) {
	d := m.decision
	d.Duration = time.Since(started)
	sess, stored := m.hc.replacement()
	switch {
	case m.outcome == HealFailedTransient && m.recorded && stored:
		d.Action, d.Err = ActionDeferred, m.err
		d.Detail = fmt.Sprintf("session %s created in a batch; m.dummy failed %d time(s), retried within %s", sess.ID(), m.attempts, u.cfg.Lease/2)
	case m.outcome == HealHealed:
		d.Action = ActionHealed
		d.Detail = fmt.Sprintf("new Olm session %s in a batch, after %d attempt(s)", sess.ID(), m.attempts)
		u.decide(ctx, *d)
		if u.OnHealed != nil {
			u.OnHealed(m.log.WithContext(ctx), m.device)
		}
		return
	case m.claimLost:
		d.Action, d.Err = ActionFailed, m.err
		d.Detail = fmt.Sprintf("%s after %d attempt(s): the answer to the batch's key claim was lost and the homeserver may have handed out a key, so this heal claims no other", m.outcome, m.attempts)
	case sess != nil && !stored:
		d.Action, d.Err = ActionFailed, m.err
		d.Detail = fmt.Sprintf("%s after %d attempt(s): the crypto store never kept session %s", m.outcome, m.attempts, sess.ID())
	default:
		d.Action, d.Err = ActionFailed, m.err
		d.Detail = fmt.Sprintf("%s after %d attempt(s)", m.outcome, m.attempts)
	}
	u.decide(ctx, *d)
}

// pendingMembers counts the members whose heal has not ended.
func pendingMembers(members []*batchMember) int {
	n := 0
	for _, m := range members {
		if !m.done {
			n++
		}
	}
	return n
}

// firstErr is the last failure of the first member still going, for the batch's retry log line.
func firstErr(members []*batchMember) error {
	for _, m := range members {
		if !m.done && m.err != nil {
			return m.err
		}
	}
	return nil
}
