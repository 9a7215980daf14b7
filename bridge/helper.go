package bridge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/beeperstream"
	"maunium.net/go/mautrix/bridgev2/matrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
)

// Helper is the bridge's encryption helper with unwedge in it. It implements matrix.Crypto on an
// OlmMachine built over an unwedge.Store, in place of mautrix-go's matrix.CryptoHelper (whose
// machine and store cannot be reached), and routes every to-device event through the Unwedger.
// stock.go holds what it does as the stock helper does; this file holds what unwedge adds.
type Helper struct {
	conn *matrix.Connector
	cfg  unwedge.Config
	log  zerolog.Logger

	store *matrix.SQLCryptoStore
	// wrapped decorates store; it is the machine's CryptoStore.
	wrapped  *unwedge.Store
	db       *database.UnwedgeDB
	client   *mautrix.Client
	mach     *crypto.OlmMachine
	unwedger *unwedge.Unwedger
	recovery *unwedge.Recovery
	metrics  *Metrics
	// generation keeps the crypto store's generation (unwedge.startup); nil when that is off.
	generation *unwedge.GenerationKeeper
	// stopInbox stops reading the bot device's to-device inbox (inbox.go), and inboxDone is done
	// when it stopped.
	stopInbox context.CancelFunc
	inboxDone sync.WaitGroup
	inboxPoke chan struct{}
	// inboxHandled counts the encrypted to-device messages read from the inbox.
	inboxHandled atomic.Int64
	// inboxPanics counts the inbox rounds that panicked (inboxRound).
	inboxPanics atomic.Int64
	// startup is what the heals at startup found (nil until they ended, or when they are off).
	startup atomic.Pointer[unwedge.StartupReport]

	streams *beeperstream.Helper

	lock                     sync.RWMutex
	cancelSync               context.CancelFunc
	cancelPeriodicDeleteLoop context.CancelFunc
	syncDone                 sync.WaitGroup

	// forcedHeals are the `unwedge heal --force` this helper started lately (commands.go).
	forcedHeals forcedHeals
}

var _ matrix.Crypto = (*Helper)(nil)

// NewHelper makes the helper; Init (called by the Matrix connector) sets it up.
func NewHelper(conn *matrix.Connector, cfg unwedge.Config) *Helper {
	return &Helper{conn: conn, cfg: cfg, log: conn.Log.With().Str("component", "crypto").Logger()}
}

// initUnwedge starts unwedge on the loaded machine (its tables are upgraded): the Unwedger (which takes over
// the machine's unwedging), metrics and recovery.
func (h *Helper) initUnwedge(ctx context.Context) error {
	br := h.conn.Bridge
	hostname, _ := os.Hostname()
	owner := fmt.Sprintf("%s/%d/%d", hostname, os.Getpid(), time.Now().UnixNano())
	tables := &unwedge.CryptoTables{DB: h.store.DB, AccountID: string(br.ID), PickleKey: []byte(h.conn.Config.Encryption.PickleKey)}
	if h.metrics == nil {
		h.metrics = newMetrics(h)
		// Once, like the metrics (Reset runs initUnwedge again): a redaction of a pending event
		// drops it. On appends, so bridgev2's own redaction handler still runs, first.
		h.conn.EventProcessor.On(event.EventRedaction, h.handleRedaction)
	}
	// The parts are built in the order they need each other, each with all it needs: recovery
	// asks which sessions are being replaced, and the Unwedger replaces them and tells recovery.
	replacing := unwedge.NewReplacing()
	// Recovery owns everything about waiting for a key; the helper routes bridgev2's calls to it.
	h.recovery = unwedge.NewRecovery(h.cfg.Recovery, h.mach, h.db.Pending, &recoverySink{h: h}, replacing.Healing, owner, h.log)
	h.recovery.Lease = h.cfg.Lease
	var err error
	if err = armRecoveryFaults(h.log, h.recovery); err != nil {
		return err
	}
	h.unwedger, err = unwedge.New(h.cfg, h.mach, unwedge.Parts{
		Store: h.wrapped, Ledger: h.db.Ledger, Audience: NewAudience(br, h.conn.StateStore, h.cfg.Scope), Tables: tables,
		Replacing: replacing, Followers: h.recovery, Observer: h.metrics.observe,
	}, owner, h.log)
	if err != nil {
		return err
	}
	if h.cfg.Metrics.Enabled {
		if err = h.metrics.start(h.cfg.Metrics.Listen); err != nil {
			return err
		}
	}
	if err = armHealFaults(h.log, h.unwedger); err != nil {
		return err
	}
	h.unwedger.Start()
	if h.cfg.Recovery.Enabled {
		h.mach.SessionReceived = func(_ context.Context, roomID id.RoomID, sessionID id.SessionID, firstKnownIndex uint32) {
			h.recovery.SessionReceived(roomID, sessionID, firstKnownIndex)
		}
		h.recovery.Start()
	}
	if h.cfg.AppserviceInbox && h.conn.Config.Encryption.Appservice {
		// Room keys that failed transactions lost come first, before the heals and the events.
		if report, err := h.readInbox(ctx, inboxStartupPages, 0); err != nil {
			h.log.Warn().Err(err).Msg("Failed to read the bot device's to-device inbox at startup")
		} else {
			h.log.Info().Int("handled", report.Handled).Int("pages", report.Pages).Bool("more", report.More).Msg("Read the bot device's to-device inbox at startup")
		}
		inboxCtx, cancel := context.WithCancel(h.log.WithContext(context.Background()))
		h.stopInbox, h.inboxPoke = cancel, make(chan struct{}, 1)
		h.inboxDone.Add(1)
		go func() {
			defer h.inboxDone.Done()
			h.followInbox(inboxCtx)
		}()
	}
	if h.cfg.Startup.Enabled {
		// Before Init returns, so before bridgev2 handles any event, but for at most
		// unwedge.MaxStartupWait: the heals of the devices used most recently go out before they
		// send again; the check of every other session and its heals go on in the background.
		wait := h.cfg.Startup.Wait
		if wait > unwedge.MaxStartupWait {
			h.log.Warn().Dur("configured", wait).Dur("waited_at_most", unwedge.MaxStartupWait).
				Msg("unwedge.startup.wait is above the longest events wait at startup; waiting that long at most")
		}
		h.generation = unwedge.NewGenerationKeeper(h.db.Generation, &unwedge.AccountDataMirror{Client: h.client}, h.wrapped, h.mach.OwnIdentity().IdentityKey, h.log)
		started := time.Now()
		run := h.unwedger.StartHealAtStartup(h.log.WithContext(ctx), h.generation, h.db.Shared, func(report *unwedge.StartupReport) {
			h.startup.Store(report)
			h.logStartup(report)
		})
		h.generation.StartAfter(run.Checked())
		if !run.WaitFirst(ctx, wait) {
			h.log.Warn().Dur("waited", time.Since(started)).Msg("Heals at startup still running; handling events meanwhile")
		}
	}
	return nil
}

// startupReport is what the heals at startup found, or nil.
func (h *Helper) startupReport() *unwedge.StartupReport { return h.startup.Load() }

// logStartup writes the one line that says what the heals at startup found and did.
func (h *Helper) logStartup(report *unwedge.StartupReport) {
	h.log.Info().
		Bool("rolled_back", report.RolledBack()).
		Str("generation", report.Generation.String()).
		Int64("outbound_discarded", report.OutboundDiscarded).
		Int("lost", report.Lost).
		Int("unreadable", report.Unreadable).
		Int("keys_on_server", report.KeysOnServer).
		Int("keys_published", report.KeysPublished).
		Bool("keys_replaced", report.KeysReplaced).
		Int("heals", report.Heals).
		Int("healed", report.Outcomes[unwedge.ActionHealed]).
		Bool("finished", report.Finished).
		Int("sessions_checked", report.SessionsChecked).
		Int("pages", report.Pages).
		Dur("first_page", report.FirstPage).
		Dur("check_duration", report.CheckDuration).
		Dur("heal_duration", report.HealDuration).
		Msg("Checked the Olm sessions at startup")
}

// stopUnwedge stops recovery, the Unwedger and the metrics listener.
func (h *Helper) stopUnwedge() {
	if h.stopInbox != nil {
		h.stopInbox()
		h.inboxDone.Wait()
	}
	if h.recovery != nil {
		h.recovery.Stop()
	}
	if h.unwedger != nil {
		// Stops the check and heals at startup too; the generation moves on after them.
		h.unwedger.Stop()
	}
	if h.generation != nil {
		h.generation.Stop(h.log.WithContext(context.Background()))
	}
	if h.metrics != nil {
		h.metrics.stop()
	}
}

// allowKeyShare answers key requests as the stock helper does (stockAllowKeyShare), with one
// exception: a device that asks for one of the bridge's own Megolm sessions that the bridge had
// shared with it gets that session again, from the index it first got it at, while its user is
// in the room, whatever the device's verification level or the user's permissions
// (unwedge.AnswerOwnSession). It had the key already; it may have lost it with an Olm session that
// wedged. Blacklisted devices get nothing, and nobody gets more than stock gives them otherwise.
// Relies on crypto/keysharing.go sending nothing after KeyShareRejectNoResponse (pinned in internal/upstream).
func (h *Helper) allowKeyShare(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
	enc := h.conn.Config.Encryption
	if enc.AllowKeySharing && device.Trust != id.TrustStateBlacklisted && h.conn.StateStore.IsInRoom(ctx, info.RoomID, device.UserID) {
		handled, err := unwedge.AnswerOwnSession(ctx, h.mach, h.db.Shared, device, info)
		switch {
		case err != nil:
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to send the bridge's own room key again")
		case handled:
			zerolog.Ctx(ctx).Debug().Msg("Sent the bridge's own room key again, from the index the device had")
		}
		if handled {
			// Answered here (or failed to be): the machine must not answer as well.
			return &crypto.KeyShareRejectNoResponse
		}
	}
	return h.stockAllowKeyShare(ctx, device, info)
}

// Decrypt decrypts a room event. An event whose Megolm session is missing goes to recovery,
// which keeps it if bridgev2 waits for its session (WaitForSession).
func (h *Helper) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	decrypted, err := h.mach.DecryptMegolmEvent(ctx, evt)
	if err == nil {
		h.recovery.Decrypted(ctx, evt.ID)
	} else if errors.Is(err, crypto.ErrNoSessionFound) {
		h.recovery.Undecryptable(evt)
		if h.inboxPoke != nil {
			h.pokeInbox()
		}
	}
	return decrypted, err
}

// WaitForSession is recovery's (Recovery.WaitForSession): the stock wait, and the events it
// waits for are kept.
func (h *Helper) WaitForSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, timeout time.Duration) bool {
	h.lock.RLock()
	defer h.lock.RUnlock()
	return h.recovery.WaitForSession(ctx, roomID, senderKey, sessionID, timeout)
}

// RequestSession is recovery's (Recovery.RequestSession): the stock request, not while the
// device's Olm session is being replaced.
func (h *Helper) RequestSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, userID id.UserID, deviceID id.DeviceID) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	h.recovery.RequestSession(ctx, roomID, senderKey, sessionID, userID, deviceID)
}
