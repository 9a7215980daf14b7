package unwedge

import (
	"context"
	"errors"
	"fmt"
	"sync"
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

// SharedPeers lists, a page at a time, the devices the bridge shared its Megolm sessions with and
// holds no Olm session with (SharedQuery).
type SharedPeers interface {
	LostKeys(ctx context.Context, accountID string, since time.Time, after SharedCursor, limit int) ([]id.IdentityKey, SharedCursor, error)
}

// SharedCursor is where a page of SharedPeers.LostKeys ended: the last device's latest share (Unix
// ms) and its key. The zero value starts at the first page.
type SharedCursor struct {
	SharedAt int64
	Key      id.IdentityKey
}

const (
	// maxStartupHeals bounds the devices one startup heals.
	maxStartupHeals = 100_000
	// startupPage is how many devices the check reads and the engine heals at a time: the check's
	// memory is one page, whatever the number of sessions (10^5 to 10^6 on a large bridge).
	startupPage = 1000
	// firstStartupPage is the first page, the one events wait for: the most recently used
	// devices, as many as the engine heals in one round (batchesInFlight groups at once).
	firstStartupPage = BatchDevices * batchesInFlight
)

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
	// Heals counts the devices in scope handed to the engine, Outcomes their heals by how they
	// ended. Only counts are kept: a rollback heals up to 100,000 devices, and each heal's
	// decision went to the log, the Observer (metrics) and Recent as it was made.
	Heals    int
	Outcomes map[Action]int
	// Finished: the check read every page and every heal ended (the process did not stop first).
	Finished bool
	// SessionsChecked counts the Olm session rows read for unreadable ones (none after a
	// rollback: every device is healed then); Pages the pages of devices handed to the engine.
	SessionsChecked, Pages int
	// CheckDuration is the time spent reading the tables (and unpickling), HealDuration the
	// time spent in the engine, and FirstPage the time from the start until the first page's
	// heals ended (what events wait for, up to MaxStartupWait).
	CheckDuration, HealDuration, FirstPage time.Duration
}

// RolledBack reports whether the crypto store was found to have gone back in time.
func (r *StartupReport) RolledBack() bool { return r.Generation.RolledBack }

// StartupRun is the check and the heals at startup, going on in the background
// (StartHealAtStartup).
type StartupRun struct {
	// checked is closed after the generation check, first after the first page's heals (or when
	// there was nothing to heal), done when all ended; report is complete then.
	checked, first, done chan struct{}
	firstOnce            sync.Once
	report               *StartupReport
}

// Checked is closed once the crypto store's generation was checked (GenerationKeeper.StartAfter).
func (r *StartupRun) Checked() <-chan struct{} { return r.checked }

// Done is closed when the check and all its heals ended.
func (r *StartupRun) Done() <-chan struct{} { return r.done }

// Report is what the check found and did; nil until Done is closed.
func (r *StartupRun) Report() *StartupReport {
	select {
	case <-r.done:
		return r.report
	default:
		return nil
	}
}

// WaitFirst waits until the heals of the first page (the devices used most recently) ended, at
// most wait and never more than MaxStartupWait. It reports whether they ended.
func (r *StartupRun) WaitFirst(ctx context.Context, wait time.Duration) bool {
	timer := time.NewTimer(min(wait, MaxStartupWait))
	defer timer.Stop()
	select {
	case <-r.first:
		return true
	case <-timer.C:
	case <-ctx.Done():
	}
	return false
}

func (r *StartupRun) firstDone() { r.firstOnce.Do(func() { close(r.first) }) }

// StartHealAtStartup starts healing, in the background, the sessions the bridge can know are
// broken; the bridge waits for the first page's heals (StartupRun.WaitFirst) before it handles
// events:
//   - after the crypto store went back in time (keeper's check), every session: with each device
//     the bridge holds a session with or shared room keys with since history_retention, the most
//     recently used first. The one-time keys on the homeserver are replaced first (a key
//     published after the backup is one the restored account lacks), and the outbound Megolm
//     sessions are discarded;
//   - otherwise, devices the bridge shared room keys with but holds no session with (a lost row;
//     the latest shared first), then devices with a corrupt row (deleted first); and the one-time
//     keys on the homeserver are replaced when it holds more than the account published
//     (countOneTimeKeys).
//
// The tables are read a page at a time and each page goes to the engine (HealBatch) before the
// next is read, so memory stays one page, whatever the number of sessions. Only devices of users
// in scope are healed, each as the ledger allows (class rolled_back or session_lost; the caps for
// peers' heals do not apply), at most maxStartupHeals. The run stops with the Unwedger (Stop).
// keeper may be nil (no generation is kept). ended, if not nil, is given the report when the run
// ended, in the run's goroutine (a panic in it is recovered and counted as the run's), before
// Done is closed and before Stop returns.
func (u *Unwedger) StartHealAtStartup(ctx context.Context, keeper *GenerationKeeper, shared SharedPeers, ended func(*StartupReport)) *StartupRun {
	run := &StartupRun{checked: make(chan struct{}), first: make(chan struct{}), done: make(chan struct{}), report: &StartupReport{Outcomes: map[Action]int{}}}
	log := zerolog.Ctx(ctx).With().Str("action", "unwedge startup").Logger()
	u.spawn(log.WithContext(u.ctx), PanicStartupHeals, func() {
		defer close(run.done)
		defer run.firstDone()
		u.healAtStartup(log.WithContext(u.ctx), run, keeper, shared)
		if ended != nil {
			ended(run.report)
		}
	})
	return run
}

// healAtStartup is the run of StartHealAtStartup.
func (u *Unwedger) healAtStartup(ctx context.Context, run *StartupRun, keeper *GenerationKeeper, shared SharedPeers) {
	log := zerolog.Ctx(ctx)
	started := time.Now()
	report := run.report
	if keeper == nil {
		report.GenerationErr = fmt.Errorf("no generation is kept")
	} else {
		report.Generation, report.GenerationErr = keeper.Check(ctx)
	}
	close(run.checked)
	if report.GenerationErr != nil {
		log.Warn().Err(report.GenerationErr).Msg("Could not tell whether the crypto store went back in time; looking for lost sessions only")
	}
	tables := u.tables
	if tables == nil {
		log.Error().Msg("The crypto store's tables are not known (not mautrix-go's SQL store); no heals at startup")
		return
	}
	s := &startupStream{u: u, run: run, tables: tables, started: started, left: maxStartupHeals, class: ClassSessionLost}
	since := started.Add(-u.cfg.HistoryRetention)
	var err error
	if report.RolledBack() {
		s.class = ClassRolledBack
		log.Warn().Str("generation", report.Generation.String()).Msg("The crypto store went back in time: healing every Olm session, the most recently used first")
		u.replaceOneTimeKeys(ctx, report)
		if report.OutboundDiscarded, err = tables.DiscardOutboundSessions(ctx); err != nil {
			log.Err(err).Msg("Failed to discard the outbound Megolm sessions")
		}
		err = s.recentPeers(ctx)
		if err == nil {
			_, err = s.lostPeers(ctx, shared, since)
		}
		if err == nil {
			err = s.usedSincePeers(ctx)
		}
	} else {
		log.Debug().Str("generation", report.Generation.String()).Msg("The crypto store did not go back in time")
		if err = u.countOneTimeKeys(ctx, report); err != nil {
			log.Warn().Err(err).Msg("Failed to compare the one-time keys on the homeserver with the account's")
		} else if report.KeysOnServer > report.KeysPublished {
			log.Warn().Int("on_server", report.KeysOnServer).Int("published", report.KeysPublished).
				Msg("The homeserver holds one-time keys the account does not have: replacing them")
			u.replaceOneTimeKeys(ctx, report)
		}
		// Lost first: the anti-join sees a corrupt row as a session, which is deleted (and its
		// device healed) only after.
		report.Lost, err = s.lostPeers(ctx, shared, since)
		if err == nil {
			// Events wait for no more: the scan for corrupt rows reads every session.
			s.firstEnded()
			err = s.unreadablePeers(ctx)
		}
	}
	switch {
	case errors.Is(err, errStartupCap):
		log.Warn().Int("healed_at_most", maxStartupHeals).
			Msg("More devices to heal at startup than one startup heals; the others heal when they next send")
		report.Finished = ctx.Err() == nil
	case err != nil && ctx.Err() == nil:
		log.Err(err).Msg("Failed to list the Olm sessions to heal at startup; the heals at startup stop here")
	case err == nil:
		report.Finished = ctx.Err() == nil
	}
}

// errStartupCap ends the check when maxStartupHeals devices were handed to the engine.
var errStartupCap = errors.New("the heals of one startup are at their cap")

// startupStream hands the pages of devices to heal to the engine, one at a time.
type startupStream struct {
	u       *Unwedger
	run     *StartupRun
	tables  Tables
	started time.Time
	class   Class
	// left is how many more devices this startup may hand to the engine.
	left int
}

// pageSize is the size of the next page: the first is the one events wait for.
func (s *startupStream) pageSize() int {
	if s.run.report.Pages == 0 {
		return min(firstStartupPage, s.left)
	}
	return min(startupPage, s.left)
}

// read times a read of the tables.
func (s *startupStream) read(f func() error) error {
	began := time.Now()
	err := f()
	s.run.report.CheckDuration += time.Since(began)
	return err
}

// heal hands a page of devices to the engine and waits for their heals; it returns errStartupCap
// once the cap is reached.
func (s *startupStream) heal(ctx context.Context, keys []id.IdentityKey) error {
	report := s.run.report
	keys = keys[:min(len(keys), s.left)]
	s.left -= len(keys)
	var devices []*id.Device
	err := s.read(func() (err error) {
		devices, err = s.tables.DevicesByKey(ctx, keys)
		return err
	})
	if err != nil {
		return fmt.Errorf("failed to look up the devices to heal: %w", err)
	}
	devices = s.u.inScope(ctx, devices)
	report.Pages++
	if len(devices) > 0 {
		zerolog.Ctx(ctx).Debug().Int("devices", len(devices)).Int("pages", report.Pages).Str("class", string(s.class)).Msg("Healing a page of Olm sessions at startup")
		began := time.Now()
		for _, d := range s.u.HealBatch(ctx, devices, s.class) {
			report.Heals++
			report.Outcomes[d.Action]++
		}
		report.HealDuration += time.Since(began)
	}
	if report.Pages == 1 {
		s.firstEnded()
	}
	if s.left == 0 {
		return errStartupCap
	}
	return ctx.Err()
}

// firstEnded lets events go on: the first page's heals ended, or the check found nothing more
// recent to heal.
func (s *startupStream) firstEnded() {
	if s.run.report.FirstPage == 0 {
		s.run.report.FirstPage = time.Since(s.started)
	}
	s.run.firstDone()
}

// healPages reads pages of identity keys with next (given the page's size) and hands each to the
// engine before reading the next, until a page is empty; it returns how many keys it read.
func (s *startupStream) healPages(ctx context.Context, next func(limit int) ([]id.IdentityKey, error)) (found int, err error) {
	for {
		var keys []id.IdentityKey
		if err = s.read(func() (err error) {
			keys, err = next(s.pageSize())
			return err
		}); err != nil || len(keys) == 0 {
			return found, err
		}
		found += len(keys)
		if err = s.heal(ctx, keys); err != nil {
			return found, err
		}
	}
}

// recentPeers heals the devices the bridge held a session with before the check, the most
// recently used first.
func (s *startupStream) recentPeers(ctx context.Context) error {
	var cursor RecentCursor
	_, err := s.healPages(ctx, func(limit int) (keys []id.IdentityKey, err error) {
		keys, cursor, err = s.tables.RecentPeers(ctx, s.started, cursor, limit)
		return keys, err
	})
	return err
}

// usedSincePeers heals the devices recentPeers passed over: their session older than the check
// was used during it, which moved them ahead of its cursor.
func (s *startupStream) usedSincePeers(ctx context.Context) error {
	var after id.SenderKey
	_, err := s.healPages(ctx, func(limit int) ([]id.IdentityKey, error) {
		keys, err := s.tables.UsedSincePeers(ctx, s.started, after, limit)
		if len(keys) > 0 {
			after = keys[len(keys)-1]
		}
		return keys, err
	})
	return err
}

// lostPeers heals the devices the bridge shared room keys with since then and holds no session
// with, the latest shared first; it returns how many there were.
func (s *startupStream) lostPeers(ctx context.Context, shared SharedPeers, since time.Time) (int, error) {
	var cursor SharedCursor
	return s.healPages(ctx, func(limit int) (keys []id.IdentityKey, err error) {
		if keys, cursor, err = shared.LostKeys(ctx, s.tables.Account(), since, cursor, limit); err != nil {
			err = fmt.Errorf("failed to list the devices the bridge shared room keys with: %w", err)
		}
		return keys, err
	})
}

// unreadablePeers reads every stored session in pages and heals the devices with one that cannot
// be unpickled, after deleting those rows: one corrupt row makes the store's GetSessions fail
// for the whole sender key, the replacement session included.
func (s *startupStream) unreadablePeers(ctx context.Context) error {
	report := s.run.report
	log := zerolog.Ctx(ctx)
	var cursor SessionsCursor
	for {
		var keys []id.SenderKey
		var rows int
		err := s.read(func() (err error) {
			keys, rows, cursor, err = s.tables.UnreadablePeers(ctx, cursor, startupPage)
			return err
		})
		if err != nil {
			return err
		}
		report.SessionsChecked += rows
		for _, key := range keys {
			deleteUnreadable(ctx, s.tables, log.With().Stringer("identity_key", key).Logger(), key)
		}
		report.Unreadable += len(keys)
		if len(keys) > 0 {
			if err = s.heal(ctx, keys); err != nil {
				return err
			}
		}
		if rows == 0 {
			return nil
		}
	}
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
