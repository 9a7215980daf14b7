package bridge

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2"
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

	lock       sync.RWMutex
	cancelSync context.CancelFunc
	syncDone   sync.WaitGroup

	// waiting holds the Megolm sessions bridgev2 is waiting for, by the sender's identity key,
	// so a heal of that device can re-request them at once over the new session.
	waitingLock sync.Mutex
	waiting     map[id.SenderKey]map[id.SessionID]id.RoomID
	// healed remembers devices healed in the last recentHeal: a Megolm event from them whose key
	// is missing was probably sent with a key lost in the wedge, so it is requested at once
	// instead of after bridgev2's fixed wait.
	healed map[id.SenderKey]healedDevice
}

type healedDevice struct {
	device *id.Device
	at     time.Time
}

const recentHeal = 2 * time.Minute

var _ matrix.Crypto = (*Helper)(nil)

// NewHelper makes the helper; Init (called by the Matrix connector) sets it up.
func NewHelper(conn *matrix.Connector, cfg unwedge.Config) *Helper {
	return &Helper{conn: conn, cfg: cfg, log: conn.Log.With().Str("component", "crypto").Logger()}
}

// Unwedger is the middleware, once Init has run.
func (h *Helper) Unwedger() *unwedge.Unwedger { return h.unwedger }

// Recovery keeps undecryptable events until their keys arrive, once Init has run (nil when
// recovery is disabled).
func (h *Helper) Recovery() *unwedge.Recovery { return h.recovery }

// Pending is the table of events waiting for their keys, once Init has run.
func (h *Helper) Pending() *database.PendingQuery { return h.db.Pending }

// Ledger is unwedge's heal ledger, once Init has run.
func (h *Helper) Ledger() *database.LedgerQuery { return h.db.Ledger }

// Metrics is unwedge's Prometheus metrics handler, once Init has run.
func (h *Helper) Metrics() http.Handler { return h.metrics }

// Machine is the OlmMachine, once Init has run.
func (h *Helper) Machine() *crypto.OlmMachine { return h.mach }

func (h *Helper) Init(ctx context.Context) error {
	cfg := h.conn.Config
	if cfg.Encryption.PickleKey == "" {
		return errors.New("encryption.pickle_key is not set")
	}
	br := h.conn.Bridge
	dbLog := func(section string) dbutil.DatabaseLogger {
		return dbutil.ZeroLogger(h.conn.Log.With().Str("db_section", section).Logger())
	}
	ghostPattern := fmt.Sprintf("@%s:%s", strings.ReplaceAll(cfg.AppService.FormatUsername("%"), "_", `\_`), h.conn.AS.HomeserverDomain)
	h.store = matrix.NewSQLCryptoStore(br.DB.Database, dbLog("crypto"), string(br.ID), h.conn.AS.BotMXID(), ghostPattern, cfg.Encryption.PickleKey)
	if err := h.store.DB.Upgrade(ctx); err != nil {
		return bridgev2.DBUpgradeError{Section: "crypto", Err: err}
	}
	h.db = database.NewUnwedgeDB(string(br.ID), br.DB.Database, dbLog("unwedge"))
	if err := h.db.Upgrade(ctx); err != nil {
		return bridgev2.DBUpgradeError{Section: "unwedge", Err: err}
	}
	var err error
	if h.client, err = h.loginBot(ctx); err != nil {
		return err
	}
	h.log.Debug().Stringer("device_id", h.client.DeviceID).Msg("Logged in as bridge bot")

	h.mach = crypto.NewOlmMachine(h.client, &h.log, unwedge.NewStore(h.store), h.conn.StateStore)
	h.configureMachine()
	h.client.Store = h.store
	h.client.Syncer = &syncer{helper: h}
	if err = h.mach.Load(ctx); err != nil {
		return fmt.Errorf("failed to load olm account: %w", err)
	}
	if err = h.mach.ShareKeys(ctx, -1); err != nil {
		return fmt.Errorf("failed to share device keys: %w", err)
	}

	hostname, _ := os.Hostname()
	owner := fmt.Sprintf("%s/%d/%d", hostname, os.Getpid(), time.Now().UnixNano())
	repairer := &unwedge.SQLRepairer{DB: h.store.DB, AccountID: string(br.ID), PickleKey: []byte(cfg.Encryption.PickleKey)}
	h.unwedger, err = unwedge.New(h.cfg, h.mach, h.db.Ledger, NewScope(br, h.conn.StateStore, h.cfg.Scope), repairer, owner, h.log)
	if err != nil {
		return err
	}
	if h.metrics == nil {
		h.metrics = newMetrics(h)
	}
	h.unwedger.OnDecision = h.metrics.observe
	if h.cfg.Metrics.Enabled {
		if err = h.metrics.start(h.cfg.Metrics.Listen); err != nil {
			return err
		}
	}
	var faultHook func(string)
	if spec := os.Getenv(FaultEnv); spec != "" {
		// Tests crash or hold the bridge where a fault would hurt most (see FaultEnv).
		f, err := parseFault(spec)
		if err != nil {
			return err
		}
		h.log.Warn().Str("point", f.point).Str("hold", f.hold).Msg("Fault injection armed")
		faultHook = f.hook(context.Background(), h.log)
		h.unwedger.FaultHook = faultHook
	}
	h.unwedger.OnHealed = h.afterHeal
	h.unwedger.OnNewSession = h.reshareRoomKeys
	h.unwedger.Start()
	h.recovery = nil
	if h.cfg.Recovery.Enabled {
		h.recovery = unwedge.NewRecovery(h.cfg.Recovery, h.mach, h.db.Pending, &recoverySink{h: h}, h.unwedger.Healing, owner, h.log)
		h.recovery.FaultHook = faultHook
		h.recovery.Lease = h.cfg.Lease
		h.mach.SessionReceived = func(_ context.Context, roomID id.RoomID, sessionID id.SessionID, _ uint32) {
			h.recovery.SessionReceived(roomID, sessionID)
		}
		h.recovery.Start()
	}
	if cfg.Encryption.Appservice {
		h.log.Debug().Msg("End-to-bridge encryption in appservice mode: to-device events come in transactions")
		h.conn.AS.Registration.EphemeralEvents = true
		h.mach.AddAppserviceListener(&transactionListener{EventProcessor: h.conn.EventProcessor, unwedger: h.unwedger})
		h.conn.EventProcessor.On(event.StateHistoryVisibility, h.mach.HandleHistoryVisibility)
	}
	return nil
}

func (h *Helper) configureMachine() {
	enc := h.conn.Config.Encryption
	// Tracking who got each of the bridge's Megolm sessions lets it share them again with a
	// device whose Olm session was replaced, and answer that device's key requests for them.
	h.mach.DisableSharedGroupSessionTracking = false
	h.mach.AllowKeyShare = h.allowKeyShare
	h.mach.SendKeysMinTrust = enc.VerificationLevels.Receive
	h.mach.PlaintextMentions = enc.PlaintextMentions
	h.mach.DeleteOutboundKeysOnAck = enc.DeleteKeys.DeleteOutboundOnAck
	h.mach.DontStoreOutboundKeys = enc.DeleteKeys.DontStoreOutbound
	h.mach.RatchetKeysOnDecrypt = enc.DeleteKeys.RatchetOnDecrypt
	h.mach.DeleteFullyUsedKeysOnDecrypt = enc.DeleteKeys.DeleteFullyUsedOnDecrypt
	h.mach.DeletePreviousKeysOnReceive = enc.DeleteKeys.DeletePrevOnNewSession
	h.mach.DeleteKeysOnDeviceDelete = enc.DeleteKeys.DeleteOnDeviceDelete
	h.mach.DisableDeviceChangeKeyRotation = enc.Rotation.DisableDeviceChangeKeyRotation
}

// allowKeyShare answers key requests for portal rooms from devices of users logged in to the
// bridge, when key sharing is allowed and the device is trusted enough.
func (h *Helper) allowKeyShare(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
	enc := h.conn.Config.Encryption
	if !enc.AllowKeySharing {
		return &crypto.KeyShareRejectNoResponse
	} else if device.Trust == id.TrustStateBlacklisted {
		return &crypto.KeyShareRejectBlacklisted
	} else if h.hadOwnSession(ctx, device, info) {
		// The bridge sent this device the session before (over an Olm session it may not have
		// been able to read): it may have it again, whatever its verification level.
		return nil
	} else if trust, _ := h.mach.ResolveTrustContext(ctx, device); trust < enc.VerificationLevels.Share {
		return &crypto.KeyShareRejectUnverified
	}
	portal, err := h.conn.Bridge.GetPortalByMXID(ctx, info.RoomID)
	if err != nil || portal == nil {
		return &crypto.KeyShareRejection{Code: event.RoomKeyWithheldUnavailable, Reason: "Requested room is not a portal room"}
	}
	user, err := h.conn.Bridge.GetExistingUserByMXID(ctx, device.UserID)
	if err != nil || user == nil || len(user.GetUserLoginIDs()) == 0 {
		return &crypto.KeyShareRejection{Code: event.RoomKeyWithheldUnauthorized, Reason: "Not a user of this bridge"}
	}
	return nil
}

// hadOwnSession reports whether the requested session is one of the bridge's own, the bridge
// shared it with this device, and the device's user is still in the room.
func (h *Helper) hadOwnSession(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) bool {
	igs, err := h.mach.CryptoStore.GetGroupSession(ctx, info.RoomID, info.SessionID)
	if err != nil || igs == nil || igs.SenderKey != h.mach.OwnIdentity().IdentityKey {
		return false
	}
	shared, err := h.mach.CryptoStore.IsOutboundGroupSessionShared(ctx, device.UserID, device.IdentityKey, info.SessionID)
	if err != nil || !shared {
		return false
	}
	return h.conn.StateStore.IsInRoom(ctx, info.RoomID, device.UserID)
}

// loginBot creates or reuses the bot's device, with MSC4190 or appservice login like the stock helper.
func (h *Helper) loginBot(ctx context.Context) (*mautrix.Client, error) {
	deviceID, err := h.store.FindDeviceID(ctx)
	if err != nil {
		return nil, fmt.Errorf("failed to find existing device ID: %w", err)
	}
	client := h.conn.AS.NewMautrixClient(h.conn.AS.BotMXID())
	name := fmt.Sprintf("%s bridge", h.conn.Bridge.Network.GetName().DisplayName)
	if h.conn.Config.Encryption.MSC4190 {
		if err = client.CreateDeviceMSC4190(ctx, deviceID, name); err != nil {
			return nil, fmt.Errorf("failed to create device for bridge bot: %w", err)
		}
	} else {
		_, err = client.Login(ctx, &mautrix.ReqLogin{
			Type:                     mautrix.AuthTypeAppservice,
			Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(h.conn.AS.BotMXID())},
			DeviceID:                 deviceID,
			StoreCredentials:         true,
			InitialDeviceDisplayName: name,
		})
		if err != nil {
			return nil, fmt.Errorf("failed to log in as bridge bot: %w", err)
		}
	}
	h.store.DeviceID = client.DeviceID
	return client, nil
}

func (h *Helper) Start() {
	if h.conn.Config.Encryption.Appservice {
		return
	}
	h.syncDone.Add(1)
	defer h.syncDone.Done()
	var ctx context.Context
	ctx, h.cancelSync = context.WithCancel(h.log.WithContext(context.Background()))
	h.log.Debug().Msg("Starting syncer for receiving to-device messages")
	for {
		err := h.client.SyncWithContext(ctx)
		if err == nil || ctx.Err() != nil {
			return
		} else if errors.Is(err, mautrix.MUnknownToken) {
			h.log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Fatal error syncing: the bot's access token is no longer valid")
			os.Exit(51)
		}
		// bridgev2 exits here; a database restart (the sync token could not be saved) is no
		// reason to. The same batch is fetched again, and duplicates are dropped by their hash.
		h.log.Err(err).Msg("Syncing to-device events stopped with an error, restarting in 10 seconds")
		select {
		case <-ctx.Done():
			return
		case <-time.After(syncRestartDelay):
		}
	}
}

// syncRestartDelay is how long the to-device sync waits after an error that stopped it.
const syncRestartDelay = 10 * time.Second

func (h *Helper) Stop() {
	if h.client != nil {
		h.client.StopSync()
	}
	if h.cancelSync != nil {
		h.cancelSync()
	}
	h.syncDone.Wait()
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

// Reset throws the bot's device and Olm state away and starts over, as the stock helper does
// when the device's keys vanished from the server.
func (h *Helper) Reset(ctx context.Context, startAfterReset bool) error {
	h.lock.Lock()
	defer h.lock.Unlock()
	h.Stop()
	for _, table := range []string{"crypto_account", "crypto_olm_session", "crypto_megolm_outbound_session"} {
		if _, err := h.store.DB.Exec(ctx, "DELETE FROM "+table); err != nil {
			h.log.Warn().Err(err).Str("table", table).Msg("Failed to clear crypto table")
		}
	}
	if _, err := h.client.LogoutAll(ctx); err != nil {
		h.log.Warn().Err(err).Msg("Failed to log out all devices")
	}
	if err := h.Init(ctx); err != nil {
		return fmt.Errorf("failed to reinitialize encryption: %w", err)
	}
	if startAfterReset {
		go h.Start()
	}
	return nil
}

func (h *Helper) Client() *mautrix.Client { return h.client }

// Decrypt decrypts a room event. An event whose Megolm session is missing is also recorded, so
// it is bridged when its key arrives even after bridgev2's own wait gave up on it.
func (h *Helper) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	decrypted, err := h.mach.DecryptMegolmEvent(ctx, evt)
	if h.recovery == nil {
		return decrypted, err
	}
	if err == nil {
		h.recovery.Decrypted(ctx, evt.ID)
	} else if errors.Is(err, crypto.ErrNoSessionFound) {
		if recErr := h.recovery.Record(ctx, evt); recErr != nil {
			zerolog.Ctx(ctx).Warn().Err(recErr).Msg("Undecryptable event not kept for recovery")
		}
	}
	return decrypted, err
}

func (h *Helper) Encrypt(ctx context.Context, roomID id.RoomID, evtType event.Type, content *event.Content) error {
	h.lock.RLock()
	defer h.lock.RUnlock()
	encrypted, err := h.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
	if errors.Is(err, crypto.ErrSessionExpired) || errors.Is(err, crypto.ErrSessionNotShared) || errors.Is(err, crypto.ErrNoGroupSession) {
		users, err := h.store.GetRoomJoinedOrInvitedMembers(ctx, roomID)
		if err != nil {
			return fmt.Errorf("failed to get room member list: %w", err)
		} else if err = h.mach.ShareGroupSession(ctx, roomID, users); err != nil {
			return fmt.Errorf("failed to share group session: %w", err)
		}
		encrypted, err = h.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
		if err != nil {
			return fmt.Errorf("failed to encrypt event after sharing group session: %w", err)
		}
	} else if err != nil {
		return err
	}
	content.Parsed, content.Raw = encrypted, nil
	return nil
}

func (h *Helper) WaitForSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, timeout time.Duration) bool {
	h.lock.RLock()
	defer h.lock.RUnlock()
	h.waitingLock.Lock()
	if h.waiting == nil {
		h.waiting = make(map[id.SenderKey]map[id.SessionID]id.RoomID)
	}
	if h.waiting[senderKey] == nil {
		h.waiting[senderKey] = make(map[id.SessionID]id.RoomID)
	}
	h.waiting[senderKey][sessionID] = roomID
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
	if wasHealed && time.Since(healed.at) < recentHeal {
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

// requestWaitingKeys asks a healed device again for the Megolm sessions bridgev2 is waiting for:
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
	for sessionID, roomID := range h.waiting[device.IdentityKey] {
		sessions[sessionID] = roomID
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
	log := h.log.With().Stringer("user_id", userID).Stringer("device_id", deviceID).Stringer("session_id", sessionID).Stringer("room_id", roomID).Logger()
	if h.unwedger != nil && h.unwedger.Healing(userID, senderKey) {
		// The answer would come over the broken Olm session; the heal asks again when it is done
		// (requestWaitingKeys), over the new one.
		log.Debug().Msg("Not sending key request while the sender's Olm session is being replaced")
		return
	}
	if err := h.mach.SendRoomKeyRequest(ctx, roomID, senderKey, sessionID, "", map[id.UserID][]id.DeviceID{userID: {deviceID}}); err != nil {
		log.Warn().Err(err).Msg("Failed to send key request")
	} else {
		log.Debug().Msg("Sent key request")
	}
}

func (h *Helper) ResetSession(ctx context.Context, roomID id.RoomID) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	if err := h.mach.CryptoStore.RemoveOutboundGroupSession(ctx, roomID); err != nil {
		h.log.Debug().Err(err).Stringer("room_id", roomID).Msg("Failed to remove outbound group session")
	}
}

func (h *Helper) HandleMemberEvent(ctx context.Context, evt *event.Event) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	h.mach.HandleMemberEvent(ctx, evt)
}

func (h *Helper) ShareKeys(ctx context.Context) error {
	return h.mach.ShareKeys(ctx, -1)
}

func (h *Helper) BeeperStreamPublisher() bridgev2.BeeperStreamPublisher { return nil }
