package unwedge

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
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

// Heal replaces the Olm session with a device, as MSC1719 says: claim one of its one-time keys,
// create a new outbound session and send m.dummy over it, so the device learns the new session.
// The ledger first decides whether a new session may be created now (not if unwedge created one
// within MinInterval, unless forcedBy names the admin who forces it). Transient failures are
// retried with backoff and do not start the interval; permanent ones are recorded. A heal claims
// at most one key: its retries reuse the session the claim gave, and a claim whose answer was
// lost is not repeated. A device whose identity key another device in the crypto store also
// claims is not healed (key_conflict) unless an admin forces it. The decision it returns says how
// it ended (healed, deferred, failed) or why there was none (limited, key_conflict).
func (u *Unwedger) Heal(ctx context.Context, device *id.Device, class Class, forcedBy id.UserID) (result Decision) {
	started := time.Now()
	dev := LedgerDevice{UserID: device.UserID, DeviceID: device.DeviceID, IdentityKey: device.IdentityKey}
	log := deviceLogger(*zerolog.Ctx(ctx), dev, class)
	// Decisions log their own user, device and key fields.
	decideCtx := ctx
	ctx = log.WithContext(ctx)
	decision := Decision{Class: class, UserID: device.UserID, DeviceID: device.DeviceID, Key: device.IdentityKey, ForcedBy: forcedBy}
	p := devicePeer(device)

	// An admin who forces the heal has looked at both devices (the refusal names them).
	if forcedBy == "" {
		if conflict, ok := u.keyConflict(ctx, decision); !ok {
			u.decide(decideCtx, conflict)
			return conflict
		}
	}

	grant, err := u.ledger.Acquire(ctx, dev, AcquireParams{
		Now: started, MinInterval: u.cfg.MinInterval, Force: forcedBy != "", Owner: u.owner, Lease: u.cfg.Lease,
		Class: class, ForcedBy: forcedBy,
	})
	if err != nil {
		decision.Action, decision.Err = ActionFailed, fmt.Errorf("failed to ask the ledger whether the session may be replaced: %w", err)
		u.decide(decideCtx, decision)
		return decision
	} else if !grant.Granted {
		u.noteReplaced(p, grant.LastCreatedAt)
		decision.Action, decision.Detail = ActionLimited, grant.Reason(started, u.cfg.MinInterval)
		u.decide(decideCtx, decision)
		return decision
	}
	ref := HealRef{Device: dev, Owner: u.owner, HealID: grant.HealID}
	// What a peer sent may reach a bug (ours, or mautrix-go's) below: the heal then ends for good,
	// so that min_interval starts and the peer cannot make the bridge repeat it every lease.
	finished := false
	defer func() {
		if r := recover(); r != nil && !finished {
			err := u.panicked(ctx, PanicHeal, r)
			if ferr := u.ledger.Finish(context.WithoutCancel(ctx), ref, HealEnd{Outcome: HealFailedPermanent, Attempts: 1, Err: err.Error(), At: time.Now()}); ferr != nil {
				log.Err(ferr).Msg("Failed to record heal outcome in the ledger")
			}
			decision.Action, decision.Err, decision.Duration = ActionFailed, err, time.Since(started)
			u.decide(decideCtx, decision)
			result = decision
		}
	}()

	if class == ClassUnreadableSession && u.tables != nil {
		deleteUnreadable(ctx, u.tables, log, device.IdentityKey)
	}

	// The session is recorded in the ledger the moment it exists, before m.dummy goes out and
	// even if the crypto store failed to keep it (its key is spent either way): the interval
	// runs from its creation (the peer learns it from whatever is sent over it next), and a
	// process that dies before sending m.dummy leaves a heal that ResumeHeals finishes over this
	// very session instead of making a second one.
	recorded := false
	hc := &healContext{key: device.IdentityKey, onCreated: func(sess *crypto.OlmSession) {
		createdAt := time.Now()
		u.noteReplaced(p, createdAt)
		if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), ref, sess.ID(), createdAt); err != nil {
			log.Err(err).Msg("Failed to record replacement session in the ledger")
		} else {
			recorded = true
		}
		if recorded {
			fault.At(u.ctx, FaultSessionCreated)
		}
	}}
	release := u.hold(ctx, ref)
	defer release()
	fault.At(u.ctx, FaultHealGranted)
	// One HTTP request per attempt: the client's own retries (bridgev2 sets
	// homeserver.retry_limit) would claim again after a claim whose answer was lost, and this loop
	// retries a claim only when its failure proves that no key was handed out.
	sendCtx := withHeal(mautrix.WithMaxRetries(ctx, 0), hc)
	// Until the loop ends, key requests to the device wait (Healing).
	doneReplacing := u.replacingFor(p)
	defer doneReplacing()
	outcome, attempts, healErr, claimLost := HealFailedTransient, 0, error(nil), false
	for attempts < u.cfg.MaxRetries && ctx.Err() == nil {
		attempts++
		healErr = u.catch(ctx, PanicSendDummy, func() error {
			return u.mach.SendEncryptedToDevice(sendCtx, device, event.ToDeviceDummy, event.Content{})
		})
		claimed := hc.takeClaimed()
		sess, _ := hc.replacement()
		if sess != nil && !recorded {
			// The ledger was unreachable when the session was made: try again.
			if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), ref, sess.ID(), time.Now()); err == nil {
				recorded = true
			}
		}
		if healErr == nil {
			outcome = HealHealed
			break
		}
		if ctx.Err() != nil {
			break // the bridge is stopping: not the device's fault
		}
		if !transient(healErr) {
			outcome = HealFailedPermanent
			break
		}
		if claimed && sess == nil && !refused(healErr) {
			// The claim request failed after it may have reached the homeserver, which may have
			// handed out a key whose answer is lost: claiming again could spend a second one.
			claimLost = true
			break
		}
		wait := u.cfg.backoff(attempts)
		log.Warn().Err(healErr).Int("attempt", attempts).Dur("retry_in", wait).Msg("Transient failure while replacing Olm session")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	doneReplacing()
	release()
	errText := ""
	if outcome != HealHealed && healErr != nil {
		errText = healErr.Error()
	}
	// A stopping bridge leaves the heal to the lease and the next failure; it is not a failure.
	finishCtx := context.WithoutCancel(ctx)
	decision.Duration = time.Since(started)
	sess, stored := hc.replacement()
	if outcome == HealFailedTransient && recorded && stored {
		// The session exists and the ledger counts it, so finishing as failed would leave the
		// device wedged for the whole interval: the heal stays in progress without a lease, and
		// ResumeHeals sends m.dummy over this session once the homeserver answers again.
		finished = true
		if err = u.ledger.Postpone(finishCtx, ref, attempts, errText); err != nil {
			log.Err(err).Msg("Failed to postpone heal in the ledger")
		}
		decision.Action, decision.Err = ActionDeferred, healErr
		decision.Detail = fmt.Sprintf("session %s created; m.dummy failed %d time(s), retried within %s", sess.ID(), attempts, u.cfg.Lease/2)
		u.decide(decideCtx, decision)
		return decision
	}
	end := HealEnd{Outcome: outcome, Attempts: attempts, Err: errText, At: time.Now()}
	discarded := sess != nil && !stored && ctx.Err() != nil
	if discarded {
		end.Discarded = sess.ID()
	}
	finished = true
	if err = u.ledger.Finish(finishCtx, ref, end); err != nil {
		log.Err(err).Msg("Failed to record heal outcome in the ledger")
	}
	switch {
	case outcome == HealHealed:
		decision.Action = ActionHealed
		if sess != nil {
			decision.Detail = fmt.Sprintf("new Olm session %s after %d attempt(s)", sess.ID(), attempts)
		}
		u.decide(decideCtx, decision)
		if u.OnHealed != nil {
			u.OnHealed(ctx, device)
		}
		return decision
	case claimLost:
		decision.Detail = fmt.Sprintf("%s after %d attempt(s): the answer to the key claim was lost and the homeserver may have handed out a key, so this heal claims no other", outcome, attempts)
	case discarded:
		// The bridge stopped before the store kept the session: no peer can know it, so the
		// ledger forgot it, and the next process may heal the device again.
		decision.Detail = fmt.Sprintf("%s after %d attempt(s): the bridge stopped before the crypto store kept session %s, which was discarded", outcome, attempts, sess.ID())
	case sess != nil && !stored:
		// The session dies with this process; its key is spent, and the ledger, which recorded
		// the session, gives the device no new one within the interval.
		decision.Detail = fmt.Sprintf("%s after %d attempt(s): the crypto store never kept session %s", outcome, attempts, sess.ID())
	default:
		decision.Detail = fmt.Sprintf("%s after %d attempt(s)", outcome, attempts)
	}
	decision.Action, decision.Err = ActionFailed, healErr
	u.decide(decideCtx, decision)
	return decision
}

// errCryptoStore marks a heal's failure to store the new session.
var errCryptoStore = errors.New("the crypto store could not keep the new session")

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
// and permanent.
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
	if errors.As(err, &netErr) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	// mautrix wraps connection failures as plain errors with the transport's message.
	msg := err.Error()
	return strings.Contains(msg, "connection refused") || strings.Contains(msg, "connection reset") || strings.Contains(msg, "EOF")
}

// ResumeHeals finishes heals that a stopped process left in progress (found in the ledger), once
// their lease ran out, so a crash between creating the replacement session and sending m.dummy
// over it loses neither the heal nor the hour: m.dummy goes out over the session that was
// created, and no second session is made. A heal that had not created its session yet is closed
// as failed_transient, so the next failure from the device heals it.
func (u *Unwedger) ResumeHeals(ctx context.Context) {
	heals, err := u.ledger.UnfinishedHeals(ctx)
	if err != nil {
		if ctx.Err() == nil {
			u.log.Err(err).Msg("Failed to list unfinished heals")
		}
		return
	}
	for _, heal := range heals {
		if u.isRunning(heal.ID) {
			continue // this process is at it (its lease may have run out while a request hung)
		}
		// Every line about the heal carries the device's fields, as the heal's own lines do.
		log := healLogger(u.log, heal)
		now := time.Now()
		ok, err := u.ledger.Resume(ctx, heal, u.owner, now, now.Add(u.cfg.Lease))
		if err != nil {
			log.Err(err).Msg("Failed to take over an unfinished heal")
			continue
		} else if !ok {
			continue // another process still holds it, or it was already taken over
		}
		u.resumeHeal(log.WithContext(ctx), ctx, heal)
	}
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

// healLogger is the logger of a resumed heal: the fields of the heal's device and its ID.
func healLogger(log zerolog.Logger, heal *Heal) zerolog.Logger {
	return deviceLogger(log, heal.Device, heal.Class).With().Int64("heal_id", heal.ID).Logger()
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

// postponeResumed keeps a resumed heal in progress for the next round. A heal is counted and
// logged as deferred once, when it is first postponed; the rounds after that log at debug level.
func (u *Unwedger) postponeResumed(ctx, decideCtx context.Context, heal *Heal, decision Decision, attempts int, err error) {
	if perr := u.ledger.Postpone(context.WithoutCancel(ctx), HealRef{Device: heal.Device, Owner: u.owner, HealID: heal.ID}, heal.Attempts+attempts, err.Error()); perr != nil {
		zerolog.Ctx(ctx).Err(perr).Msg("Failed to postpone heal in the ledger")
	}
	if heal.Postponed() {
		zerolog.Ctx(ctx).Debug().Err(err).Msg("Heal still deferred")
		return
	}
	decision.Action, decision.Err, decision.Detail = ActionDeferred, err, "resuming an interrupted heal"
	u.decide(decideCtx, decision)
}

// resumeHeal finishes or postpones a heal found in the ledger. ctx carries the heal's logger
// (healLogger); decisions are logged with decideCtx, as they write the device's fields themselves.
// Its decisions are Resumed: the Olm event behind the heal was counted when it was detected.
func (u *Unwedger) resumeHeal(ctx, decideCtx context.Context, heal *Heal) {
	dev := heal.Device
	decision := Decision{Class: heal.Class, UserID: dev.UserID, DeviceID: dev.DeviceID, Key: dev.IdentityKey, ForcedBy: heal.ForcedBy, Resumed: true}
	finish := func(outcome HealOutcome, attempts int, healErr error) {
		text := ""
		if healErr != nil {
			text = healErr.Error()
		}
		if err := u.ledger.Finish(context.WithoutCancel(ctx), HealRef{Device: dev, Owner: u.owner, HealID: heal.ID}, HealEnd{Outcome: outcome, Attempts: heal.Attempts + attempts, Err: text, At: time.Now()}); err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to record the outcome of a resumed heal")
		}
	}
	if heal.SessionID == "" {
		finish(HealFailedTransient, 0, errors.New("interrupted before a session was created"))
		decision.Action, decision.Detail = ActionFailed, "a stopped process left this heal before creating a session; the next failure heals again"
		u.decide(decideCtx, decision)
		return
	}
	var device *id.Device
	err := u.catch(ctx, PanicFetchDevice, func() (err error) {
		device, err = u.mach.GetOrFetchDevice(ctx, dev.UserID, dev.DeviceID)
		return err
	})
	var sess *crypto.OlmSession
	if err == nil && device != nil && device.IdentityKey == dev.IdentityKey {
		var sessions crypto.OlmSessionList
		sessions, err = u.mach.CryptoStore.GetSessions(ctx, dev.IdentityKey)
		for _, s := range sessions {
			if s.ID() == heal.SessionID {
				sess = s
			}
		}
	}
	if err != nil {
		err = fmt.Errorf("failed to look up the session of the interrupted heal: %w", err)
		if time.Since(heal.StartedAt) < u.cfg.MinInterval {
			// The store or the homeserver is unreachable, which says nothing about the session:
			// tried again on the next round.
			u.postponeResumed(ctx, decideCtx, heal, decision, 0, err)
			return
		}
		finish(HealFailedTransient, 0, err)
		decision.Action, decision.Err, decision.Detail = ActionFailed, err, "resuming an interrupted heal"
		u.decide(decideCtx, decision)
		return
	}
	if sess == nil {
		finish(HealFailedPermanent, 0, fmt.Errorf("the session %s of the interrupted heal is gone", heal.SessionID))
		decision.Action, decision.Err = ActionFailed, fmt.Errorf("the replacement session of an interrupted heal is gone")
		u.decide(decideCtx, decision)
		return
	}
	// m.dummy over exactly the session that was created (the heal context makes the machine use it).
	hc := &healContext{key: dev.IdentityKey, session: sess, stored: true}
	attempts := 0
	release := u.hold(ctx, HealRef{Device: dev, Owner: u.owner, HealID: heal.ID})
	for attempts < u.cfg.MaxRetries && ctx.Err() == nil {
		attempts++
		err = u.catch(ctx, PanicSendDummy, func() error {
			return u.mach.SendEncryptedToDevice(withHeal(ctx, hc), device, event.ToDeviceDummy, event.Content{})
		})
		if err == nil || !transient(err) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(u.cfg.backoff(attempts)):
		}
	}
	release()
	if attempts == 0 {
		err = ctx.Err() // stopping before the first try
	}
	if err != nil && (ctx.Err() != nil || transient(err) && time.Since(heal.StartedAt) < u.cfg.MinInterval) {
		// Still unreachable (or stopping): tried again on the next round, until the interval
		// would allow a new session anyway.
		u.postponeResumed(ctx, decideCtx, heal, decision, attempts, fmt.Errorf("m.dummy over session %s failed %d time(s): %w", sess.ID(), attempts, err))
		return
	} else if err != nil {
		outcome := HealFailedTransient
		if !transient(err) {
			outcome = HealFailedPermanent
		}
		finish(outcome, attempts, err)
		decision.Action, decision.Err, decision.Detail = ActionFailed, err, "resuming an interrupted heal"
		u.decide(decideCtx, decision)
		return
	}
	finish(HealHealed, attempts, nil)
	decision.Action, decision.Detail = ActionHealed, fmt.Sprintf("resumed an interrupted heal: m.dummy sent over session %s", sess.ID())
	u.decide(decideCtx, decision)
	if u.OnHealed != nil {
		u.OnHealed(ctx, device)
	}
}
