package bridge

// This file is the stock encryption helper of mautrix-go, matrix.CryptoHelper in
// bridgev2/matrix/crypto.go, as of the mautrix-go release and file hash pinned in internal/upstream
// (v0.33.0, whose crypto.go is byte-identical to v0.32.0's), written again on an OlmMachine that
// unwedge can reach (the stock helper keeps its machine unexported).
// Every `encryption:` option of the bridge config does here what it does there, in the same
// order; the places where unwedge deviates are marked "unwedge:". TestStockMirror (and
// internal/upstream's TestPinned, for every file unwedge relies on) fails when go.mod moves to a
// mautrix-go whose crypto.go differs from the one mirrored: then read the diff, bring this file
// along, and update its entry in internal/upstream.
//
// The parity table in docs/admin-guide.md lists every option and the test that shows it.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/beeperstream"
	"maunium.net/go/mautrix/bridgev2"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/matrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
)

// otkRepairNeeded is the bridgev2 kv_store key that asks the helper to repair the bot's one-time
// keys at the next start.
const otkRepairNeeded bridgedb.Key = "otk_repair_needed"

// Init sets encryption up as the stock helper does, with unwedge's store decorator under the
// machine and unwedge started before the first to-device event can arrive.
func (h *Helper) Init(ctx context.Context) error {
	enc := h.conn.Config.Encryption
	if enc.PickleKey == "" {
		// The stock helper panics here.
		return errors.New("encryption.pickle_key is not set")
	}
	h.log.Debug().Msg("Initializing end-to-bridge encryption with unwedge")
	br := h.conn.Bridge
	ghostPattern := fmt.Sprintf("@%s:%s", strings.ReplaceAll(h.conn.Config.AppService.FormatUsername("%"), "_", `\_`), h.conn.AS.HomeserverDomain)
	h.store = matrix.NewSQLCryptoStore(br.DB.Database, h.dbLog("crypto"), string(br.ID), h.conn.AS.BotMXID(), ghostPattern, enc.PickleKey)
	if err := h.store.DB.Upgrade(ctx); err != nil {
		return bridgev2.DBUpgradeError{Section: "crypto", Err: err}
	}
	existingDevice, err := h.loginBot(ctx)
	if err != nil {
		return err
	}
	h.log.Debug().Stringer("device_id", h.client.DeviceID).Msg("Logged in as bridge bot")

	// unwedge: the machine's store is decorated, so unwedge sees how each Olm event ended and
	// which device got which of the bridge's room keys (in unwedge's tables).
	h.db = database.NewUnwedgeDB(string(br.ID), br.DB.Database, h.dbLog("unwedge"))
	if err = h.db.Upgrade(ctx); err != nil {
		return bridgev2.DBUpgradeError{Section: "unwedge", Err: err}
	}
	// unwedge: earlier states of the Olm sessions, pickled as the crypto store pickles them (with
	// unwedge.olm_history 0, none, and those kept before are pruned).
	history := unwedge.NewHistory(h.db.History, string(br.ID), []byte(enc.PickleKey), h.cfg.OlmHistory)
	h.wrapped = unwedge.NewStore(h.store, h.db.Shared, history)
	h.mach = crypto.NewOlmMachine(h.client, &h.log, h.wrapped, h.conn.StateStore)
	h.configureMachine()
	if enc.DeleteKeys.PeriodicallyDeleteExpired {
		loopCtx, cancel := context.WithCancel(context.Background())
		h.cancelPeriodicDeleteLoop = cancel
		go h.mach.ExpiredKeyDeleteLoop(loopCtx)
	}
	if enc.DeleteKeys.DeleteOutdatedInbound {
		deleted, err := h.store.RedactOutdatedGroupSessions(ctx)
		if err != nil {
			return fmt.Errorf("failed to delete inbound keys without expiry metadata: %w", err)
		}
		if len(deleted) > 0 {
			h.log.Debug().Int("deleted", len(deleted)).Msg("Deleted inbound keys which lacked expiration metadata")
		}
	}
	if h.streams, err = beeperstream.New(h.client); err != nil {
		return fmt.Errorf("failed to set up beeper streams: %w", err)
	}
	h.client.Syncer = &syncer{helper: h}
	h.client.Store = h.store
	if err = h.mach.Load(ctx); err != nil {
		return fmt.Errorf("failed to load olm account: %w", err)
	}
	if existingDevice {
		if ok, err := h.verifyKeysAreOnServer(ctx); err != nil || !ok {
			// Not ok: the device was reset, and Reset ran Init again from the start.
			return err
		}
		if err = h.repairOTKsIfNeeded(ctx); err != nil {
			return fmt.Errorf("failed to repair one-time keys: %w", err)
		}
	} else {
		br.DB.KV.Delete(ctx, otkRepairNeeded)
		if err = h.ShareKeys(ctx); err != nil {
			return fmt.Errorf("failed to share device keys: %w", err)
		}
	}
	if enc.SelfSign && !h.selfSign(h.log.WithContext(ctx)) {
		return matrix.ExitError{ExitCode: 34}
	}
	// unwedge: its ledger, heals and recovery start before any to-device event is handled.
	if err = h.initUnwedge(ctx); err != nil {
		return err
	}
	if enc.Appservice {
		h.log.Debug().Msg("End-to-bridge encryption in appservice mode: to-device events come in transactions")
		h.conn.AS.Registration.EphemeralEvents = true
		// unwedge: encrypted to-device events go through the Unwedger.
		h.mach.AddAppserviceListener(&transactionListener{EventProcessor: h.conn.EventProcessor, unwedger: h.unwedger})
		h.conn.EventProcessor.On(event.StateHistoryVisibility, h.mach.HandleHistoryVisibility)
		if err = h.streams.InitAppservice(h.conn.EventProcessor); err != nil {
			h.log.Err(err).Msg("Failed to initialize beeper stream appservice listener")
		}
	}
	go h.resyncEncryptionInfo(h.log.WithContext(context.Background()))
	return nil
}

func (h *Helper) dbLog(section string) dbutil.DatabaseLogger {
	return dbutil.ZeroLogger(h.conn.Log.With().Str("db_section", section).Logger())
}

// configureMachine applies the `encryption:` options that are the machine's.
func (h *Helper) configureMachine() {
	enc := h.conn.Config.Encryption
	// unwedge: the stock helper switches tracking off. Knowing who got each of the bridge's
	// Megolm sessions lets it send them again to a device whose Olm session was replaced, and
	// answer that device's requests for them (allowKeyShare).
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

// selfSign cross-signs the bot device: with new keys and a new recovery key (kept in bridgev2's
// kv_store) when the server has none or the admin asked to overwrite them, or with the stored
// recovery key when the device or master key is not verified yet. false means the bridge must
// not start (the stock helper exits with code 34); the reason is logged.
func (h *Helper) selfSign(ctx context.Context) bool {
	log := zerolog.Ctx(ctx)
	hasKeys, deviceVerified, err := h.mach.GetOwnVerificationStatus(ctx)
	if err != nil {
		log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Failed to check verification status")
		return false
	}
	masterVerified, sskVerified, uskVerified, err := h.mach.GetOwnCrossSigningVerificationStatus(ctx)
	if err != nil {
		log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Failed to check cross-signing key verification status")
		return false
	}
	log.Debug().Bool("has_keys", hasKeys).Bool("device_verified", deviceVerified).Bool("mk_verified", masterVerified).
		Bool("usk_verified", uskVerified).Bool("ssk_verified", sskVerified).Msg("Checked verification status")
	kv := h.conn.Bridge.DB.KV
	stored := kv.Get(ctx, bridgedb.KeyRecoveryKey)
	switch {
	case !hasKeys || stored == "overwrite":
		if stored != "" && stored != "overwrite" {
			log.WithLevel(zerolog.FatalLevel).Msg("No keys on server, but database already has recovery key. Delete `recovery_key` from `kv_store` manually to continue.")
			return false
		}
		recoveryKey, err := h.mach.GenerateAndVerifyWithRecoveryKey(ctx)
		if recoveryKey != "" {
			kv.Set(ctx, bridgedb.KeyRecoveryKey, recoveryKey)
		}
		if err != nil {
			log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Failed to generate recovery key and self-sign")
			return false
		}
		log.Info().Msg("Generated new recovery key and self-signed bot device")
	case !deviceVerified || !masterVerified:
		if stored == "" {
			log.WithLevel(zerolog.FatalLevel).Msg("Server already has cross-signing keys, but no key in database. Add `recovery_key` to `kv_store`, or set it to `overwrite` to generate new keys.")
			return false
		}
		if err = h.mach.VerifyWithRecoveryKey(ctx, stored); err != nil {
			log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Failed to verify with recovery key")
			return false
		}
		log.Info().Msg("Verified bot device with existing recovery key")
	}
	return true
}

// Rooms whose m.room.encryption event the state store has marked for a resync.
const (
	resyncRoomsQuery        = `SELECT room_id FROM mx_room_state WHERE encryption='{"resync":true}'`
	unmarkResyncQuery       = `UPDATE mx_room_state SET encryption=NULL WHERE room_id=$1 AND encryption='{"resync":true}'`
	setInboundRotationQuery = `
		UPDATE crypto_megolm_inbound_session SET max_age=$1, max_messages=$2
		WHERE room_id=$3 AND max_age IS NULL AND max_messages IS NULL`
)

// resyncEncryptionInfo fetches the encryption event of rooms marked for a resync and gives their
// inbound Megolm sessions its rotation limits (Megolm's defaults where it sets none).
func (h *Helper) resyncEncryptionInfo(ctx context.Context) {
	log := zerolog.Ctx(ctx).With().Str("action", "resync encryption event").Logger()
	rows, err := h.store.DB.Query(ctx, resyncRoomsQuery)
	roomIDs, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
	if err != nil {
		log.Err(err).Msg("Failed to query rooms for resync")
		return
	}
	for _, roomID := range roomIDs {
		var content event.EncryptionEventContent
		if err = h.client.StateEvent(ctx, roomID, event.StateEncryption, "", &content); err != nil {
			log.Err(err).Stringer("room_id", roomID).Msg("Failed to get encryption event")
			if _, err = h.store.DB.Exec(ctx, unmarkResyncQuery, roomID); err != nil {
				log.Err(err).Stringer("room_id", roomID).Msg("Failed to unmark room for resync after failed sync")
			}
			continue
		}
		maxAge := content.RotationPeriodMillis
		if maxAge <= 0 {
			maxAge = (7 * 24 * time.Hour).Milliseconds()
		}
		maxMessages := content.RotationPeriodMessages
		if maxMessages <= 0 {
			maxMessages = 100
		}
		if _, err = h.store.DB.Exec(ctx, setInboundRotationQuery, maxAge, maxMessages, roomID); err != nil {
			log.Err(err).Stringer("room_id", roomID).Msg("Failed to update megolm session table")
		} else {
			log.Debug().Stringer("room_id", roomID).Int64("max_age_ms", maxAge).Int("max_messages", maxMessages).Msg("Resynced encryption event")
		}
	}
}

// stockAllowKeyShare is the stock helper's rule for key requests: key sharing allowed, the device
// not blacklisted and trusted at verification_levels.share, the room a portal, the user a bridge
// admin.
func (h *Helper) stockAllowKeyShare(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
	log := zerolog.Ctx(ctx)
	enc := h.conn.Config.Encryption
	if !enc.AllowKeySharing {
		return &crypto.KeyShareRejectNoResponse
	} else if device.Trust == id.TrustStateBlacklisted {
		return &crypto.KeyShareRejectBlacklisted
	} else if trust, _ := h.mach.ResolveTrustContext(ctx, device); trust < enc.VerificationLevels.Share {
		return &crypto.KeyShareRejectUnverified
	}
	portal, err := h.conn.Bridge.GetPortalByMXID(ctx, info.RoomID)
	if err != nil {
		log.Err(err).Msg("Failed to get portal to handle key request")
		return &crypto.KeyShareRejectNoResponse
	} else if portal == nil {
		log.Debug().Msg("Rejecting key request: room is not a portal")
		return &crypto.KeyShareRejection{Code: event.RoomKeyWithheldUnavailable, Reason: "Requested room is not a portal room"}
	}
	user, err := h.conn.Bridge.GetExistingUserByMXID(ctx, device.UserID)
	if err != nil {
		log.Err(err).Msg("Failed to get user to handle key request")
		return &crypto.KeyShareRejectNoResponse
	} else if user == nil {
		log.Debug().Msg("Couldn't find user to handle key request")
		return &crypto.KeyShareRejectNoResponse
	} else if !user.Permissions.Admin {
		log.Debug().Msg("Rejecting key request: user is not admin")
		return &crypto.KeyShareRejection{Code: event.RoomKeyWithheldUnauthorized, Reason: "Key sharing for non-admins is not yet implemented"}
	}
	log.Debug().Msg("Accepting key request")
	return nil
}

// loginBot creates or reuses the bot's device (MSC4190, or appservice login) and reports whether
// the device existed before.
func (h *Helper) loginBot(ctx context.Context) (existing bool, err error) {
	deviceID, err := h.store.FindDeviceID(ctx)
	if err != nil {
		return false, fmt.Errorf("failed to find existing device ID: %w", err)
	} else if deviceID != "" {
		h.log.Debug().Stringer("device_id", deviceID).Msg("Found existing device ID for bot in database")
	}
	existing = deviceID != ""
	// A client with the appservice token; logging in replaces it with the device's token.
	client := h.conn.AS.NewMautrixClient(h.conn.AS.BotMXID())
	name := fmt.Sprintf("%s bridge", h.conn.Bridge.Network.GetName().DisplayName)
	if h.conn.Config.Encryption.MSC4190 {
		h.log.Debug().Msg("Creating bot device with MSC4190")
		if err = client.CreateDeviceMSC4190(ctx, deviceID, name); err != nil {
			return existing, fmt.Errorf("failed to create device for bridge bot: %w", err)
		}
	} else {
		flows, err := client.GetLoginFlows(ctx)
		if err != nil {
			return existing, fmt.Errorf("failed to get supported login flows: %w", err)
		} else if !flows.HasFlow(mautrix.AuthTypeAppservice) {
			return existing, errors.New("homeserver does not support appservice login")
		}
		_, err = client.Login(ctx, &mautrix.ReqLogin{
			Type:                     mautrix.AuthTypeAppservice,
			Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(h.conn.AS.BotMXID())},
			DeviceID:                 deviceID,
			StoreCredentials:         true,
			InitialDeviceDisplayName: name,
		})
		if err != nil {
			return existing, fmt.Errorf("failed to log in as bridge bot: %w", err)
		}
	}
	h.store.DeviceID = client.DeviceID
	h.client = client
	return existing, nil
}

// verifyKeysAreOnServer checks that the existing bot device still has its keys on the server;
// when it does not, encryption is reset (a new device) and false is returned.
func (h *Helper) verifyKeysAreOnServer(ctx context.Context) (bool, error) {
	h.log.Debug().Msg("Making sure keys are still on server")
	resp, err := h.client.QueryKeys(ctx, &mautrix.ReqQueryKeys{
		DeviceKeys: map[id.UserID]mautrix.DeviceIDList{h.client.UserID: {h.client.DeviceID}},
	})
	if err != nil {
		h.log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Failed to query own keys to make sure device still exists")
		return false, fmt.Errorf("%w: failed to query own keys to make sure device still exists: %w", matrix.ExitError{ExitCode: 33}, err)
	}
	if device, ok := resp.DeviceKeys[h.client.UserID][h.client.DeviceID]; ok && len(device.Keys) > 0 {
		return true, nil
	}
	h.log.Warn().Msg("Existing device doesn't have keys on server, resetting crypto")
	return false, h.Reset(ctx, false)
}

// repairOTKsIfNeeded repairs the bot's one-time keys when bridgev2 asked for it.
func (h *Helper) repairOTKsIfNeeded(ctx context.Context) error {
	kv := h.conn.Bridge.DB.KV
	if kv.Get(ctx, otkRepairNeeded) != "true" {
		return nil
	}
	if err := h.mach.RepairOneTimeKeys(ctx); err != nil {
		return err
	}
	kv.Set(ctx, otkRepairNeeded, "false")
	return nil
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
			h.log.Info().Msg("Bridge bot to-device syncer stopped without error")
			return
		} else if errors.Is(err, mautrix.MUnknownToken) {
			h.log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Fatal error syncing: the bot's access token is no longer valid")
			os.Exit(51)
		}
		// unwedge: the stock helper exits with code 51 on any error; a database restart (the sync
		// token could not be saved) is no reason to. The same batch is fetched again, and
		// duplicates are dropped by their hash.
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
	h.log.Debug().Msg("Stopping end-to-bridge encryption")
	if h.client != nil {
		h.client.StopSync()
	}
	if h.cancelSync != nil {
		h.cancelSync()
	}
	if h.cancelPeriodicDeleteLoop != nil {
		h.cancelPeriodicDeleteLoop()
	}
	h.syncDone.Wait()
	if h.streams != nil {
		_ = h.streams.Close()
	}
	// unwedge: its own workers stop after the transport.
	h.stopUnwedge()
}

// Reset throws the bot's device and Olm state away and starts over, as the stock helper does
// when the device's keys vanished from the server.
func (h *Helper) Reset(ctx context.Context, startAfterReset bool) error {
	h.lock.Lock()
	defer h.lock.Unlock()
	h.log.Info().Msg("Resetting end-to-bridge encryption device")
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
		h.log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Error reinitializing end-to-bridge encryption")
		return matrix.ExitError{ExitCode: 50}
	}
	h.log.Info().Msg("End-to-bridge encryption successfully reset")
	if startAfterReset {
		go h.Start()
	}
	return nil
}

func (h *Helper) Client() *mautrix.Client { return h.client }

func (h *Helper) Encrypt(ctx context.Context, roomID id.RoomID, evtType event.Type, content *event.Content) error {
	h.lock.RLock()
	defer h.lock.RUnlock()
	encrypted, err := h.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
	if errors.Is(err, crypto.ErrSessionExpired) || errors.Is(err, crypto.ErrSessionNotShared) || errors.Is(err, crypto.ErrNoGroupSession) {
		h.log.Debug().Err(err).Stringer("room_id", roomID).Msg("Got error while encrypting event for room, sharing group session and trying again...")
		users, err := h.store.GetRoomJoinedOrInvitedMembers(ctx, roomID)
		if err != nil {
			return fmt.Errorf("failed to get room member list: %w", err)
		} else if err = h.mach.ShareGroupSession(ctx, roomID, users); err != nil {
			return fmt.Errorf("failed to share group session: %w", err)
		}
		encrypted, err = h.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
		if err != nil {
			return fmt.Errorf("failed to encrypt event after re-sharing group session: %w", err)
		}
	} else if err != nil {
		return err
	}
	content.Parsed, content.Raw = encrypted, nil
	return nil
}

// unwedge: Decrypt, WaitForSession and RequestSession (stock: decrypt, wait, send a key request)
// are in helper.go, which routes them to unwedge.Recovery (waits.go there does what stock does).

func (h *Helper) ResetSession(ctx context.Context, roomID id.RoomID) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	if err := h.mach.CryptoStore.RemoveOutboundGroupSession(ctx, roomID); err != nil {
		h.log.Debug().Err(err).Stringer("room_id", roomID).Msg("Error manually removing outbound group session in room")
	}
}

func (h *Helper) HandleMemberEvent(ctx context.Context, evt *event.Event) {
	h.lock.RLock()
	defer h.lock.RUnlock()
	h.mach.HandleMemberEvent(ctx, evt)
}

// ShareKeys uploads the device keys and tops up the one-time keys.
func (h *Helper) ShareKeys(ctx context.Context) error {
	return h.mach.ShareKeys(ctx, -1)
}

func (h *Helper) BeeperStreamPublisher() bridgev2.BeeperStreamPublisher {
	if h == nil || h.streams == nil {
		return nil
	}
	return h.streams
}

// syncer receives the bot device's /sync responses (encryption.appservice: false), as the stock
// cryptoSyncer does, but hands to-device events to the Unwedger.
type syncer struct {
	helper *Helper
}

// syncHandlingWarning is how long one sync response may take before the syncer goes on without
// waiting for it, with a warning.
const syncHandlingWarning = 30 * time.Second

func (s *syncer) ProcessResponse(ctx context.Context, resp *mautrix.RespSync, since string) error {
	log := s.helper.log
	done := make(chan struct{}, 1)
	go func() {
		defer func() {
			// A peer's event must never take the bridge down.
			if err := recover(); err != nil {
				log.Error().Interface("error", err).Str("since", since).Bytes(zerolog.ErrorStackFieldName, debug.Stack()).Msg("Processing sync response panicked")
			}
			done <- struct{}{}
		}()
		s.handle(ctx, resp, since)
	}()
	select {
	case <-done:
	case <-time.After(syncHandlingWarning):
		log.Warn().Str("since", since).Msg("Handling sync response is taking unusually long")
	}
	return nil
}

// handle is OlmMachine.ProcessSyncResponse with the Unwedger in the to-device path, then the
// beeper stream helper.
func (s *syncer) handle(ctx context.Context, resp *mautrix.RespSync, since string) {
	h := s.helper
	h.mach.HandleDeviceLists(ctx, &resp.DeviceLists, since)
	for _, evt := range resp.ToDevice.Events {
		evt.Type.Class = event.ToDeviceEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			h.log.Warn().Err(err).Str("event_type", evt.Type.Type).Stringer("sender", evt.Sender).Msg("Failed to parse to-device event")
			continue
		}
		h.unwedger.HandleToDevice(ctx, evt)
	}
	h.mach.HandleOTKCounts(ctx, &resp.DeviceOTKCount)
	h.mach.MarkOlmHashSavePoint(ctx)
	if h.streams != nil {
		h.streams.HandleSyncResponse(ctx, resp)
	}
}

func (s *syncer) OnFailedSync(_ *mautrix.RespSync, err error) (time.Duration, error) {
	if errors.Is(err, mautrix.MUnknownToken) {
		return 0, err
	}
	s.helper.log.Error().Err(err).Msg("Error syncing to-device events, retrying in 10 seconds")
	return 10 * time.Second, nil
}

func (s *syncer) GetFilterJSON(_ id.UserID) *mautrix.Filter {
	none := []event.Type{{Type: "*"}}
	return &mautrix.Filter{
		Presence:    &mautrix.FilterPart{NotTypes: none},
		AccountData: &mautrix.FilterPart{NotTypes: none},
		Room: &mautrix.RoomFilter{
			Ephemeral:   &mautrix.FilterPart{NotTypes: none},
			AccountData: &mautrix.FilterPart{NotTypes: none},
			State:       &mautrix.FilterPart{NotTypes: none},
			Timeline:    &mautrix.FilterPart{NotTypes: none},
		},
	}
}

// transactionListener is how the machine subscribes to appservice transactions
// (encryption.appservice: true): the same subscriptions, but encrypted to-device events go
// through the Unwedger.
type transactionListener struct {
	*appservice.EventProcessor
	unwedger *unwedge.Unwedger
}

func (tl *transactionListener) On(evtType event.Type, handler func(ctx context.Context, evt *event.Event)) {
	if evtType == event.ToDeviceEncrypted {
		handler = tl.unwedger.HandleToDevice
	}
	tl.EventProcessor.On(evtType, handler)
}
