package testclient

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// schemaFS holds the client's own tables in its crypto database (version table
// testclient_version), so that Snapshot and Restore copy and roll them back with the Olm and
// Megolm state they describe.
//
//go:embed schema/*.sql
var schemaFS embed.FS

const (
	recordShareQuery = `
		INSERT INTO testclient_megolm_share (room_id, session_id, user_id, device_id, identity_key, message_index, wedging_index)
		VALUES ($1, $2, $3, $4, $5, $6, COALESCE((SELECT wedging_index FROM testclient_olm_wedging WHERE identity_key = $5), 0))
		ON CONFLICT (session_id, user_id, device_id) DO UPDATE
			SET identity_key = excluded.identity_key, message_index = excluded.message_index, wedging_index = excluded.wedging_index`
	pruneSharesQuery = `DELETE FROM testclient_megolm_share WHERE room_id = $1 AND session_id <> $2`
	getShareQuery    = `
		SELECT identity_key, message_index FROM testclient_megolm_share WHERE session_id = $1 AND user_id = $2 AND device_id = $3`
	wedgedSharesQuery = `
		SELECT s.user_id, s.device_id, s.identity_key, w.wedging_index
		FROM testclient_megolm_share s JOIN testclient_olm_wedging w ON w.identity_key = s.identity_key
		WHERE s.session_id = $1 AND s.wedging_index < w.wedging_index`
	resharedQuery = `
		UPDATE testclient_megolm_share SET message_index = $4, wedging_index = $5
		WHERE session_id = $1 AND user_id = $2 AND device_id = $3`
	raiseWedgingQuery = `
		INSERT INTO testclient_olm_wedging (identity_key, wedging_index) VALUES ($1, 1)
		ON CONFLICT (identity_key) DO UPDATE SET wedging_index = testclient_olm_wedging.wedging_index + 1`
)

// shareLog keeps what matrix-rust-sdk records and mautrix-go does not: the index at which each
// device got the client's current outbound Megolm session of a room, and how many new Olm sessions
// each device started with the client (its Olm wedging index).
type shareLog struct {
	db *dbutil.Database
}

// shareRecord is a device's share of an outbound session: its identity key and the first index it got.
type shareRecord struct {
	identityKey id.IdentityKey
	index       uint32
}

// wedgedShare is a device that started a new Olm session with the client since it got the session.
type wedgedShare struct {
	userID       id.UserID
	deviceID     id.DeviceID
	identityKey  id.IdentityKey
	wedgingIndex int64
}

func openShareLog(ctx context.Context, cryptoDB *dbutil.Database, log zerolog.Logger) (*shareLog, error) {
	schema := dbutil.BuildUpgradeTable().WithFSPath(schemaFS, "schema").Finish()
	db := cryptoDB.Child("testclient_version", schema, dbutil.ZeroLogger(dbLog(log, "testclient")))
	if err := db.Upgrade(ctx); err != nil {
		return nil, fmt.Errorf("failed to upgrade the test client's tables: %w", err)
	}
	return &shareLog{db: db}, nil
}

// record notes that the device got the room's outbound session from index on, along with the
// device's Olm wedging index now.
func (l *shareLog) record(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, device *id.Device, index uint32) error {
	_, err := l.db.Exec(ctx, recordShareQuery, roomID, sessionID, device.UserID, device.DeviceID, device.IdentityKey, int64(index))
	if err != nil {
		return fmt.Errorf("failed to record the share of %s with %s: %w", sessionID, device.DeviceID, err)
	}
	return nil
}

// forgetEarlier drops the records of the room's outbound sessions other than sessionID: the
// Element rules look at the current session only.
func (l *shareLog) forgetEarlier(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) error {
	if _, err := l.db.Exec(ctx, pruneSharesQuery, roomID, sessionID); err != nil {
		return fmt.Errorf("failed to forget earlier shares in %s: %w", roomID, err)
	}
	return nil
}

// get returns the share of the session with the device, or nil if it never got it.
func (l *shareLog) get(ctx context.Context, sessionID id.SessionID, userID id.UserID, deviceID id.DeviceID) (*shareRecord, error) {
	var rec shareRecord
	var index int64
	err := l.db.QueryRow(ctx, getShareQuery, sessionID, userID, deviceID).Scan(&rec.identityKey, &index)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("failed to read the share of %s with %s: %w", sessionID, deviceID, err)
	}
	rec.index = uint32(index)
	return &rec, nil
}

// wedged returns the devices that got the session and started a new Olm session with the client
// since then.
func (l *shareLog) wedged(ctx context.Context, sessionID id.SessionID) ([]wedgedShare, error) {
	rows, err := l.db.Query(ctx, wedgedSharesQuery, sessionID)
	shares, err := dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (w wedgedShare, err error) {
		err = row.Scan(&w.userID, &w.deviceID, &w.identityKey, &w.wedgingIndex)
		return
	}, err).AsList()
	if err != nil {
		return nil, fmt.Errorf("failed to read the devices to share %s with again: %w", sessionID, err)
	}
	return shares, nil
}

// reshared notes that the device got the session again, from index on.
func (l *shareLog) reshared(ctx context.Context, sessionID id.SessionID, w wedgedShare, index uint32) error {
	if _, err := l.db.Exec(ctx, resharedQuery, sessionID, w.userID, w.deviceID, int64(index), w.wedgingIndex); err != nil {
		return fmt.Errorf("failed to record the new share of %s with %s: %w", sessionID, w.deviceID, err)
	}
	return nil
}

// raiseWedging notes that the device with the identity key started a new Olm session.
func (l *shareLog) raiseWedging(ctx context.Context, key id.IdentityKey) error {
	if _, err := l.db.Exec(ctx, raiseWedgingQuery, key); err != nil {
		return fmt.Errorf("failed to raise the Olm wedging index of %s: %w", key, err)
	}
	return nil
}

// olmWatch is the crypto store of the client's OlmMachine: it notes every Olm session another
// device starts with the client (NewOlmSessions), and under the Element rules raises that
// device's Olm wedging index. matrix-rust-sdk raises it whenever a pre-key message from the device
// creates a new Olm session (Account::decrypt_olm_message in src/olm/account.rs); mautrix-go has
// no hook for that moment, but it stores the new session through AddSession right after
// decrypting the message (v0.32.0, OlmMachine.tryDecryptOlmCiphertext).
// TestReshareAfterNewOlmSession fails if that changes.
type olmWatch struct {
	*crypto.SQLCryptoStore
	// shares is nil under RulesMautrix, which keeps no wedging index.
	shares *shareLog
	hist   *history
}

// AddSession stores an Olm session. mautrix-go calls it for a session it created itself with a
// claimed one-time key (which has received nothing yet) and for one a pre-key message created
// (which has just decrypted that message). The wedging index is raised first, so that a stored
// session implies its raise (matrix-rust-sdk saves both in one change set).
func (w *olmWatch) AddSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	if sess.Internal.HasReceivedMessage() {
		w.hist.addNewOlmSession(NewOlmSession{SenderKey: key, At: time.Now()})
		if w.shares != nil {
			if err := w.shares.raiseWedging(ctx, key); err != nil {
				zerolog.Ctx(ctx).Err(err).Stringer("sender_key", key).Msg("Failed to note a new Olm session")
			}
		}
	}
	return w.SQLCryptoStore.AddSession(ctx, key, sess)
}

// recipients returns the devices that mautrix-go's ShareGroupSession just sent the room's
// outbound session to, over Olm. mautrix-go also counts as recipients the devices it found no Olm
// session for, and sends them m.room_key.withheld (m.no_olm) instead of the key; matrix-rust-sdk
// records those as withheld, not shared, and they got no copy.
func (c *Client) recipients(ctx context.Context, cs *cryptoState, sess *crypto.OutboundGroupSession, users []id.UserID) ([]*id.Device, error) {
	var out []*id.Device
	for _, userID := range users {
		devices, err := cs.store.GetDevices(ctx, userID)
		if err != nil {
			return nil, fmt.Errorf("failed to get devices of %s: %w", userID, err)
		}
		for _, device := range devices {
			if userID == c.cli.UserID && device.DeviceID == c.cli.DeviceID {
				continue
			}
			shared, err := cs.store.IsOutboundGroupSessionShared(ctx, userID, device.IdentityKey, sess.ID())
			if err != nil {
				return nil, fmt.Errorf("failed to check if %s got %s: %w", device.DeviceID, sess.ID(), err)
			}
			if shared && cs.store.HasSession(ctx, device.IdentityKey) {
				out = append(out, device)
			}
		}
	}
	return out, nil
}

// recordShares notes the index at which the room's outbound session was just shared with each
// recipient (matrix-rust-sdk records it in DeviceData::maybe_encrypt_room_key).
func (c *Client) recordShares(ctx context.Context, cs *cryptoState, sess *crypto.OutboundGroupSession, recipients []*id.Device, index uint32) error {
	for _, device := range recipients {
		if err := cs.shares.record(ctx, sess.RoomID, sess.ID(), device, index); err != nil {
			return err
		}
	}
	return cs.shares.forgetEarlier(ctx, sess.RoomID, sess.ID())
}

// reshareWedged shares the room's current outbound session again with the devices that started
// a new Olm session with the client since they got it, before the client's next message in the
// room. This is matrix-rust-sdk's answer to a wedged Olm session (PR #3604):
// GroupSessionManager::share_room_key (src/session_manager/group_sessions/mod.rs) picks every
// recipient whose olm_wedging_index is higher than the one recorded with its share, and
// DeviceData::maybe_encrypt_room_key sends the session key as it is now
// (OutboundGroupSession::as_content) and records the new index. Messages before that index, and
// sessions rotated away before, are not sent again.
func (c *Client) reshareWedged(ctx context.Context, cs *cryptoState, sess *crypto.OutboundGroupSession) error {
	wedged, err := cs.shares.wedged(ctx, sess.ID())
	if err != nil || len(wedged) == 0 {
		return err
	}
	index := uint32(sess.Internal.MessageIndex())
	content := sess.ShareContent()
	for _, w := range wedged {
		device, err := cs.store.GetDevice(ctx, w.userID, w.deviceID)
		if err != nil {
			return fmt.Errorf("failed to get device %s of %s: %w", w.deviceID, w.userID, err)
		} else if device == nil || device.IdentityKey != w.identityKey {
			continue // gone or replaced: no longer the device that got the session
		}
		started := time.Now()
		if err = cs.mach.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, content); err != nil {
			return fmt.Errorf("failed to share %s again with %s: %w", sess.ID(), w.deviceID, err)
		}
		c.hist.addRoomKeyCopies(RoomKeyCopy{
			Kind: RoomKeyReshared, UserID: w.userID, DeviceID: w.deviceID, RoomID: sess.RoomID,
			SessionID: sess.ID(), Index: index, At: started,
		})
		if err = cs.shares.reshared(ctx, sess.ID(), w, index); err != nil {
			return err
		}
		c.log.Debug().
			Stringer("room_id", sess.RoomID).
			Stringer("session_id", sess.ID()).
			Stringer("target_user_id", w.userID).
			Stringer("target_device_id", w.deviceID).
			Uint32("index", index).
			Msg("Shared room key again after a new Olm session")
	}
	return nil
}
