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
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/database"
)

// Heal replaces the Olm session with a device, as MSC1719 says: claim one of its one-time keys,
// create a new outbound session and send m.dummy over it, so the device learns the new session.
// The ledger first decides whether a new session may be created now (not if unwedge created one
// within MinInterval, unless forcedBy names the admin who forces it). Transient failures are
// retried with backoff and do not start the interval; permanent ones are recorded.
func (u *Unwedger) Heal(ctx context.Context, device *id.Device, class Class, forcedBy id.UserID) database.HealOutcome {
	started := time.Now()
	dev := database.LedgerDevice{UserID: device.UserID, DeviceID: device.DeviceID, IdentityKey: device.IdentityKey}
	log := zerolog.Ctx(ctx).With().
		Str("action", "unwedge").
		Stringer("user_id", device.UserID).
		Stringer("device_id", device.DeviceID).
		Stringer("identity_key", device.IdentityKey).
		Str("class", string(class)).
		Logger()
	// Decisions log their own user, device and key fields.
	decideCtx := ctx
	ctx = log.WithContext(ctx)
	decision := Decision{Class: class, UserID: device.UserID, DeviceID: device.DeviceID, Key: device.IdentityKey, ForcedBy: forcedBy}

	grant, err := u.ledger.Acquire(ctx, dev, database.AcquireParams{
		Now: started, MinInterval: u.cfg.MinInterval, Force: forcedBy != "", Owner: u.owner, Lease: u.cfg.Lease,
		Class: string(class), ForcedBy: forcedBy,
	})
	if err != nil {
		decision.Action, decision.Err = "failed", fmt.Errorf("failed to ask the ledger whether the session may be replaced: %w", err)
		u.decide(decideCtx, decision)
		return database.HealFailedTransient
	} else if !grant.Granted {
		u.noteReplaced(device.IdentityKey, grant.LastCreatedAt)
		decision.Action, decision.Detail = "limited", grant.Reason(started, u.cfg.MinInterval)
		u.decide(decideCtx, decision)
		return ""
	}

	if class == ClassUnreadableSession && u.repairer != nil {
		if n, err := u.repairer.DeleteUnreadableSessions(ctx, device.IdentityKey); err != nil {
			log.Err(err).Msg("Failed to delete unreadable Olm sessions")
		} else {
			log.Info().Int("deleted", n).Msg("Deleted unreadable Olm sessions")
		}
	}

	hc := &healContext{key: device.IdentityKey}
	// Until the loop ends, key requests to the device wait (Healing).
	u.setReplacing(device.IdentityKey, 1)
	recorded := false
	outcome, attempts, healErr := database.HealFailedTransient, 0, error(nil)
	for attempts < u.cfg.MaxRetries && ctx.Err() == nil {
		attempts++
		if attempts > 1 { // the grant's lease is fresh for the first attempt
			_ = u.ledger.RenewLease(ctx, dev, u.owner, time.Now().Add(u.cfg.Lease))
		}
		healErr = u.mach.SendEncryptedToDevice(withHeal(ctx, hc), device, event.ToDeviceDummy, event.Content{})
		if sess := hc.session(); sess != nil && !recorded {
			// The interval runs from the session's creation: even if m.dummy never goes out, the
			// session exists and the peer will learn it from the next message sent over it.
			createdAt := time.Now()
			u.noteReplaced(device.IdentityKey, createdAt)
			if err := u.ledger.SessionCreated(context.WithoutCancel(ctx), dev, u.owner, grant.HealID, sess.ID(), createdAt); err != nil {
				log.Err(err).Msg("Failed to record replacement session in the ledger")
			} else {
				recorded = true
			}
		}
		if healErr == nil {
			outcome = database.HealHealed
			break
		}
		if !transient(healErr) {
			outcome = database.HealFailedPermanent
			break
		}
		wait := u.cfg.backoff(attempts)
		log.Warn().Err(healErr).Int("attempt", attempts).Dur("retry_in", wait).Msg("Transient failure while replacing Olm session")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	u.setReplacing(device.IdentityKey, -1)
	errText := ""
	if outcome != database.HealHealed && healErr != nil {
		errText = healErr.Error()
	}
	// A stopping bridge leaves the heal to the lease and the next failure; it is not a failure.
	finishCtx := context.WithoutCancel(ctx)
	if err = u.ledger.Finish(finishCtx, dev, u.owner, grant.HealID, outcome, attempts, errText, time.Now()); err != nil {
		log.Err(err).Msg("Failed to record heal outcome in the ledger")
	}
	decision.Duration = time.Since(started)
	if outcome == database.HealHealed {
		decision.Action = "healed"
		if sess := hc.session(); sess != nil {
			decision.Detail = fmt.Sprintf("new Olm session %s after %d attempt(s)", sess.ID(), attempts)
		}
		u.decide(decideCtx, decision)
		if u.OnHealed != nil {
			u.OnHealed(ctx, device)
		}
	} else {
		decision.Action, decision.Err = "failed", healErr
		decision.Detail = fmt.Sprintf("%s after %d attempt(s)", outcome, attempts)
		u.decide(decideCtx, decision)
	}
	return outcome
}

// transient reports whether a failure may go away by itself: the homeserver could not be reached,
// timed out, or answered 429/5xx. Everything else (no one-time key to claim, invalid key
// signatures, 4xx) is permanent.
func transient(err error) bool {
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
