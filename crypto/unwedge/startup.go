package unwedge

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/id"
)

// This file heals before the first event: MSC1719 heals a session only after a message over it
// failed, and the Megolm key that message carried is gone with clients that do not answer key
// requests (Element X) or answer them only for their current session (Element Web). At startup,
// the bridge can know some sessions are broken before anyone sends over them.

// SharedPeers lists the devices the bridge shared its Megolm sessions with (SharedQuery).
type SharedPeers interface {
	SharedKeys(ctx context.Context, since time.Time, limit int) ([]id.IdentityKey, error)
}

// maxStartupHeals bounds the devices one startup heals.
const maxStartupHeals = 100_000

// StartupReport is what HealAtStartup found and did.
type StartupReport struct {
	// Generation is the check of the crypto store's generation; GenerationErr, if set, says why
	// there was none (then only lost and unreadable sessions were looked for).
	Generation    GenerationCheck
	GenerationErr error
	// OutboundDiscarded counts the bridge's outbound Megolm sessions discarded after a rollback:
	// their ratchets went back, and messages at indexes already used would be refused as replays.
	OutboundDiscarded int64
	// Lost and Unreadable count the devices found without a readable session (no rollback).
	Lost, Unreadable int
	// KeysOnServer and KeysPublished are the bot's one-time keys the homeserver holds and those
	// the account has marked published; KeysReplaced: the homeserver's were replaced (after a
	// rollback, or when it held more than the account has: keys the account lost).
	KeysOnServer, KeysPublished int
	KeysReplaced                bool
	// Decisions are the heals, one per device in scope.
	Decisions []Decision
	// Finished: every heal ended within the wait.
	Finished bool
}

// RolledBack reports whether the crypto store was found to have gone back in time.
func (r *StartupReport) RolledBack() bool { return r.Generation.RolledBack }

// HealAtStartup heals, before the bridge handles events, the sessions it can know are broken:
//   - after the crypto store went back in time (keeper's check), every session: with each device
//     the bridge holds a session with or shared room keys with since history_retention. The
//     one-time keys on the homeserver are replaced first (a key published after the backup is
//     one the restored account lacks), and the outbound Megolm sessions are discarded;
//   - otherwise, devices the bridge shared room keys with but holds no readable session with (a
//     lost or corrupt row; corrupt rows are deleted first), and devices with a corrupt row; and
//     the one-time keys on the homeserver are replaced when it holds more than the account
//     published (countOneTimeKeys).
//
// Only devices of users in scope are healed, each as the ledger allows (class rolled_back or
// session_lost; the caps for peers' heals do not apply). It waits for the heals up to wait; heals
// still running then go on in the background. keeper may be nil (no generation is kept).
func (u *Unwedger) HealAtStartup(ctx context.Context, keeper *GenerationKeeper, shared SharedPeers, wait time.Duration) *StartupReport {
	log := zerolog.Ctx(ctx).With().Str("action", "unwedge startup").Logger()
	ctx = log.WithContext(ctx)
	report := &StartupReport{}
	if keeper == nil {
		report.GenerationErr = fmt.Errorf("no generation is kept")
	} else {
		report.Generation, report.GenerationErr = keeper.Check(ctx)
	}
	if report.GenerationErr != nil {
		log.Warn().Err(report.GenerationErr).Msg("Could not tell whether the crypto store went back in time; looking for lost sessions only")
	}
	tables := u.tables
	if tables == nil {
		log.Error().Msg("The crypto store's tables are not known (not mautrix-go's SQL store); no heals at startup")
		return report
	}
	readable, unreadable, err := tables.OlmPeers(ctx)
	if err != nil {
		log.Err(err).Msg("Failed to list the Olm sessions; no heals at startup")
		return report
	}
	sharedKeys, err := shared.SharedKeys(ctx, time.Now().Add(-u.cfg.HistoryRetention), maxStartupHeals)
	if err != nil {
		log.Err(err).Msg("Failed to list the devices the bridge shared room keys with; no heals at startup")
		return report
	}
	class := ClassSessionLost
	var keys []id.IdentityKey
	if report.RolledBack() {
		class = ClassRolledBack
		log.Warn().Str("generation", report.Generation.String()).Msg("The crypto store went back in time: healing every Olm session before handling events")
		u.replaceOneTimeKeys(ctx, report)
		if report.OutboundDiscarded, err = tables.DiscardOutboundSessions(ctx); err != nil {
			log.Err(err).Msg("Failed to discard the outbound Megolm sessions")
		}
		keys = union(readable, unreadable, sharedKeys)
	} else {
		log.Debug().Str("generation", report.Generation.String()).Msg("The crypto store did not go back in time")
		if err = u.countOneTimeKeys(ctx, report); err != nil {
			log.Warn().Err(err).Msg("Failed to compare the one-time keys on the homeserver with the account's")
		} else if report.KeysOnServer > report.KeysPublished {
			log.Warn().Int("on_server", report.KeysOnServer).Int("published", report.KeysPublished).
				Msg("The homeserver holds one-time keys the account does not have: replacing them")
			u.replaceOneTimeKeys(ctx, report)
		}
		have := make(map[id.IdentityKey]bool, len(readable))
		for _, key := range readable {
			have[key] = true
		}
		var lost []id.IdentityKey
		for _, key := range sharedKeys {
			if !have[key] {
				lost = append(lost, key)
			}
		}
		for _, key := range unreadable {
			deleteUnreadable(ctx, tables, log.With().Stringer("identity_key", key).Logger(), key)
		}
		report.Unreadable = len(unreadable)
		keys = union(unreadable, lost)
		report.Lost = len(keys) - len(unreadable)
	}
	if len(keys) > maxStartupHeals {
		log.Warn().Int("devices", len(keys)).Int("healed_at_most", maxStartupHeals).
			Msg("More devices to heal at startup than one startup heals; the others heal when they next send")
		keys = keys[:maxStartupHeals]
	}
	devices, err := tables.DevicesByKey(ctx, keys)
	if err != nil {
		log.Err(err).Msg("Failed to look up the devices to heal; no heals at startup")
		return report
	}
	devices = u.inScope(ctx, devices)
	if len(devices) == 0 {
		report.Finished = true
		return report
	}
	log.Info().Int("devices", len(devices)).Str("class", string(class)).Msg("Healing Olm sessions at startup, before handling events")
	done := make(chan []Decision, 1)
	u.spawn(u.log.WithContext(u.ctx), PanicStartupHeals, func() {
		done <- u.HealBatch(u.log.WithContext(u.ctx), devices, class)
	})
	select {
	case report.Decisions = <-done:
		report.Finished = true
	case <-time.After(wait):
		log.Warn().Dur("waited", wait).Msg("Heals at startup still running; handling events meanwhile")
	case <-ctx.Done():
	}
	return report
}

// countOneTimeKeys reads how many one-time keys the homeserver holds for the bot device, and how
// many the account has published and not seen used. Every key on the homeserver is one the
// account published, and the account forgets a key only when a session was made with it, which
// takes it off the homeserver first: so more on the homeserver than published means keys the
// account no longer has, and a client that claims one cannot open a session with the bridge.
func (u *Unwedger) countOneTimeKeys(ctx context.Context, report *StartupReport) error {
	resp, err := u.mach.Client.UploadKeys(ctx, &mautrix.ReqUploadKeys{})
	if err != nil {
		return fmt.Errorf("failed to read the one-time key count: %w", err)
	}
	acc, err := u.mach.CryptoStore.GetAccount(ctx)
	if err != nil || acc == nil {
		return fmt.Errorf("failed to load the account: %w", err)
	}
	inner, ok := acc.Internal.(*account.Account)
	if !ok {
		return fmt.Errorf("the account is not goolm's (%T): its one-time keys cannot be read", acc.Internal)
	}
	report.KeysOnServer = resp.OneTimeKeyCounts.SignedCurve25519
	for _, key := range inner.OTKeys {
		if key.Published {
			report.KeysPublished++
		}
	}
	return nil
}

// replaceOneTimeKeys claims every one-time key the homeserver holds for the bot device (nobody
// can claim one the account lacks any more) and publishes new ones (mautrix-go's
// RepairOneTimeKeys).
func (u *Unwedger) replaceOneTimeKeys(ctx context.Context, report *StartupReport) {
	if err := u.mach.RepairOneTimeKeys(ctx); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to replace the one-time keys on the homeserver")
		return
	}
	report.KeysReplaced = true
}

// inScope keeps the devices whose users are in scope (asking once per user).
func (u *Unwedger) inScope(ctx context.Context, devices []*id.Device) []*id.Device {
	users := map[id.UserID]bool{}
	kept := devices[:0]
	for _, dev := range devices {
		ok, seen := users[dev.UserID]
		if !seen {
			var err error
			if ok, err = u.audience.InScope(ctx, dev.UserID); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Stringer("user_id", dev.UserID).Msg("Failed to check whether a user is in scope; not healing their devices at startup")
			}
			users[dev.UserID] = ok
		}
		if ok {
			kept = append(kept, dev)
		}
	}
	return kept
}

// union returns the keys of all lists, each once, in the order first seen.
func union(lists ...[]id.IdentityKey) []id.IdentityKey {
	seen := map[id.IdentityKey]bool{}
	var out []id.IdentityKey
	for _, list := range lists {
		for _, key := range list {
			if !seen[key] {
				seen[key] = true
				out = append(out, key)
			}
		}
	}
	return out
}
