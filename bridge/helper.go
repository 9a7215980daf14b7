package bridge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
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

	store    *matrix.SQLCryptoStore
	db       *database.UnwedgeDB
	client   *mautrix.Client
	mach     *crypto.OlmMachine
	unwedger *unwedge.Unwedger
	recovery *unwedge.Recovery
	metrics  *Metrics

	streams *beeperstream.Helper

	lock                     sync.RWMutex
	cancelSync               context.CancelFunc
	cancelPeriodicDeleteLoop context.CancelFunc
	syncDone                 sync.WaitGroup

	// live holds the events that just failed to decrypt, until bridgev2 waits for their session.
	live liveEvents
	// waiting holds the Megolm sessions bridgev2 is waiting for, by the sender's identity key,
	// so a heal of that device can re-request them at once over the new session.
	waitingLock sync.Mutex
	waiting     map[id.SenderKey]map[id.SessionID]waitingSession
	// healed remembers devices healed in the last recentHeal: a Megolm event from them whose key
	// is missing was probably sent with a key lost in the wedge, so it is requested at once
	// instead of after bridgev2's fixed wait.
	healed map[id.SenderKey]healedDevice

	// forcedHeals are the `unwedge heal --force` this helper started lately (commands.go).
	forcedHeals forcedHeals
}

type healedDevice struct {
	device *id.Device
	at     time.Time
}

// waitingSession is a session bridgev2 waits for, and the senders of its events. The sender key
// of an event is whatever its sender wrote: a key request goes to a healed device only when its
// user sent one of the events.
type waitingSession struct {
	roomID  id.RoomID
	senders []id.UserID
}

const recentHeal = 2 * time.Minute

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
	repairer := &unwedge.SQLRepairer{DB: h.store.DB, AccountID: string(br.ID), PickleKey: []byte(h.conn.Config.Encryption.PickleKey)}
	var err error
	h.unwedger, err = unwedge.New(h.cfg, h.mach, h.db.Ledger, NewScope(br, h.conn.StateStore, h.cfg.Scope), repairer, owner, h.log)
	if err != nil {
		return err
	}
	if h.metrics == nil {
		h.metrics = newMetrics(h)
		// Once, like the metrics (Reset runs initUnwedge again): a redaction of a pending event
		// drops it. On appends, so bridgev2's own redaction handler still runs, first.
		h.conn.EventProcessor.On(event.EventRedaction, h.handleRedaction)
	}
	h.unwedger.OnDecision = h.metrics.observe
	if h.cfg.Metrics.Enabled {
		if err = h.metrics.start(h.cfg.Metrics.Listen); err != nil {
			return err
		}
	}
	if err = armHealFaults(h.log, h.unwedger); err != nil {
		return err
	}
	h.unwedger.OnHealed = h.afterHeal
	h.unwedger.OnNewSession = h.reshareRoomKeys
	h.unwedger.Start()
	h.recovery = nil
	if h.cfg.Recovery.Enabled {
		h.recovery = unwedge.NewRecovery(h.cfg.Recovery, h.mach, h.db.Pending, &recoverySink{h: h}, h.unwedger.Healing, owner, h.log)
		if err = armRecoveryFaults(h.log, h.recovery); err != nil {
			return err
		}
		h.recovery.Lease = h.cfg.Lease
		h.mach.SessionReceived = func(_ context.Context, roomID id.RoomID, sessionID id.SessionID, _ uint32) {
			h.recovery.SessionReceived(roomID, sessionID)
		}
		h.recovery.Start()
	}
	return nil
}

// stopUnwedge stops recovery, the Unwedger and the metrics listener.
func (h *Helper) stopUnwedge() {
	if h.recovery != nil {
		h.recovery.Stop()
	}
	if h.unwedger != nil {
		h.unwedger.Stop()
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
func (h *Helper) allowKeyShare(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
	enc := h.conn.Config.Encryption
	if enc.AllowKeySharing && device.Trust != id.TrustStateBlacklisted && h.conn.StateStore.IsInRoom(ctx, info.RoomID, device.UserID) {
		handled, err := unwedge.AnswerOwnSession(ctx, h.mach, device, info)
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

// Decrypt decrypts a room event. An event whose Megolm session is missing is held until bridgev2
// waits for its session (WaitForSession), which it does only for live events.
func (h *Helper) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	decrypted, err := h.mach.DecryptMegolmEvent(ctx, evt)
	if err == nil && h.recovery != nil {
		h.recovery.Decrypted(ctx, evt.ID)
	} else if errors.Is(err, crypto.ErrNoSessionFound) {
		h.live.remember(evt, time.Now())
	}
	return decrypted, err
}

// WaitForSession waits for a Megolm session, as the stock helper does. The events bridgev2 waits
// for are also recorded, so they are bridged when their key arrives even after bridgev2's own
// wait gave up on them.
func (h *Helper) WaitForSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, timeout time.Duration) bool {
	h.lock.RLock()
	defer h.lock.RUnlock()
	fresh, senders := h.live.take(roomID, senderKey, sessionID)
	if h.recovery != nil {
		for _, evt := range fresh {
			if err := h.recovery.Record(ctx, evt); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Stringer("event_id", evt.ID).Msg("Undecryptable event not kept for recovery")
			}
		}
	}
	h.waitingLock.Lock()
	if h.waiting == nil {
		h.waiting = make(map[id.SenderKey]map[id.SessionID]waitingSession)
	}
	if h.waiting[senderKey] == nil {
		h.waiting[senderKey] = make(map[id.SessionID]waitingSession)
	}
	h.waiting[senderKey][sessionID] = waitingSession{roomID: roomID, senders: senders}
	healed, wasHealed := h.healed[senderKey]
	h.waitingLock.Unlock()
	defer func() {
		h.waitingLock.Lock()
		delete(h.waiting[senderKey], sessionID)
		if len(h.waiting[senderKey]) == 0 {
			delete(h.waiting, senderKey)
		}
		h.waitingLock.Unlock()
	}()
	if wasHealed && time.Since(healed.at) < recentHeal && slices.Contains(senders, healed.device.UserID) {
		go h.RequestSession(context.WithoutCancel(ctx), roomID, senderKey, sessionID, healed.device.UserID, healed.device.DeviceID)
	}
	return h.mach.WaitForSession(ctx, roomID, senderKey, sessionID, timeout)
}

// afterHeal follows a heal: the keys lost with the old session are asked for again.
func (h *Helper) afterHeal(ctx context.Context, device *id.Device) {
	h.requestWaitingKeys(ctx, device)
	h.reshareRoomKeys(ctx, device)
	if h.recovery != nil {
		h.recovery.DeviceHealed(ctx, device)
	}
}

// requestWaitingKeys asks a healed device again for the Megolm sessions bridgev2 is waiting for
// that its user sent events with (the sender key in an event is what its sender wrote):
// their keys were lost with the broken Olm session, and the answer to a request sent before the
// heal came back over that session too.
func (h *Helper) requestWaitingKeys(ctx context.Context, device *id.Device) {
	h.waitingLock.Lock()
	if h.healed == nil {
		h.healed = make(map[id.SenderKey]healedDevice)
	}
	now := time.Now()
	for key, healed := range h.healed {
		if now.Sub(healed.at) > recentHeal {
			delete(h.healed, key)
		}
	}
	h.healed[device.IdentityKey] = healedDevice{device: device, at: now}
	sessions := make(map[id.SessionID]id.RoomID, len(h.waiting[device.IdentityKey]))
	for sessionID, waiting := range h.waiting[device.IdentityKey] {
		if slices.Contains(waiting.senders, device.UserID) {
			sessions[sessionID] = waiting.roomID
		}
	}
	h.waitingLock.Unlock()
	for sessionID, roomID := range sessions {
		h.RequestSession(ctx, roomID, device.IdentityKey, sessionID, device.UserID, device.DeviceID)
	}
}

func (h *Helper) RequestSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, userID id.UserID, deviceID id.DeviceID) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	if deviceID == "" {
		deviceID = "*"
	}
	if h.unwedger != nil && h.unwedger.Healing(userID, senderKey) {
		// The answer would come over the broken Olm session; the heal asks again when it is done
		// (requestWaitingKeys), over the new one.
		h.log.Debug().Stringer("user_id", userID).Stringer("device_id", deviceID).Stringer("session_id", sessionID).Stringer("room_id", roomID).
			Msg("Not sending key request while the sender's Olm session is being replaced")
		return
	}
	h.sendKeyRequest(ctx, roomID, senderKey, sessionID, userID, deviceID)
}
