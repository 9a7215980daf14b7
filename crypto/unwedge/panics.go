package unwedge

// This file keeps the process alive when what a peer sent reaches a bug, ours or mautrix-go's:
// every goroutine unwedge starts, and every call into the machine with a peer's data, turns a
// panic into a logged, counted error. A heal that panics ends as failed_permanent, which starts
// min_interval, so a peer cannot make the bridge repeat it after every lease.

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"

	"github.com/rs/zerolog"
)

// ErrPanicked marks a failure that was a recovered panic. It is never transient.
var ErrPanicked = errors.New("recovered from a panic")

// PanicSite names where a panic was recovered (the label of unwedge_panics_total).
type PanicSite string

const (
	PanicHandleToDevice    PanicSite = "handle_to_device"
	PanicHeal              PanicSite = "heal"
	PanicSendDummy         PanicSite = "send_dummy"
	PanicFetchDevice       PanicSite = "fetch_device"
	PanicFetchKeys         PanicSite = "fetch_keys"
	PanicEncryptDummies    PanicSite = "encrypt_dummies"
	PanicStartupHeals      PanicSite = "startup_heals"
	PanicNewSession        PanicSite = "new_session"
	PanicStockUnwedge      PanicSite = "stock_unwedge"
	PanicResumeHeals       PanicSite = "resume_heals"
	PanicPruneLedger       PanicSite = "prune_ledger"
	PanicRenewLease        PanicSite = "renew_lease"
	PanicRecoveryPass      PanicSite = "recovery_pass"
	PanicAdvanceGeneration PanicSite = "advance_generation"
	// PanicAppserviceInbox is the bridge's reading of the bot device's inbox (package bridge).
	PanicAppserviceInbox PanicSite = "appservice_inbox"
)

// PanicSites lists every site, so that metrics show each from the start.
func PanicSites() []PanicSite {
	return []PanicSite{PanicHandleToDevice, PanicHeal, PanicSendDummy, PanicFetchDevice, PanicFetchKeys, PanicEncryptDummies, PanicStartupHeals, PanicNewSession, PanicStockUnwedge, PanicResumeHeals, PanicPruneLedger, PanicRenewLease, PanicRecoveryPass, PanicAdvanceGeneration, PanicAppserviceInbox}
}

// panicGuard recovers panics and counts them by where; the Unwedger, Recovery and the
// GenerationKeeper each have one.
type panicGuard struct {
	panics lockedMap[PanicSite, int64]
}

// catch runs f and returns its error, or an ErrPanicked error when f panicked (logged once, with
// the stack, and counted by where).
func (g *panicGuard) catch(ctx context.Context, where PanicSite, f func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = g.panicked(ctx, where, p)
		}
	}()
	return f()
}

// panicked logs and counts a recovered panic and returns it as an error.
func (g *panicGuard) panicked(ctx context.Context, where PanicSite, p any) error {
	g.panics.update(where, func(n int64, _ bool) (int64, bool) { return n + 1, true })
	zerolog.Ctx(ctx).Error().Str("panic_in", string(where)).Interface("panic", p).Bytes(zerolog.ErrorStackFieldName, debug.Stack()).
		Msg("Recovered from a panic; the process goes on")
	return fmt.Errorf("%w in %s: %v", ErrPanicked, where, p)
}

// Panics returns how many panics were recovered since the start, by where.
func (g *panicGuard) Panics() map[PanicSite]int64 {
	return g.panics.snapshot()
}

// spawn runs f in a goroutine that Stop waits for; a panic in it is recovered, logged and counted.
func (u *Unwedger) spawn(ctx context.Context, where PanicSite, f func()) {
	u.heals.Add(1)
	go func() {
		defer u.heals.Done()
		_ = u.catch(ctx, where, func() error {
			f()
			return nil
		})
	}()
}

// AnswersDropped returns how many entries of the homeserver's answers to key claims and queries
// were dropped for naming what the bridge did not ask (answers.go), by endpoint.
func (u *Unwedger) AnswersDropped() map[Endpoint]int64 {
	return u.answers.Dropped()
}
