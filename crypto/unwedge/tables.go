package unwedge

import (
	"context"
	"fmt"
	"strings"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/id"
)

// CryptoTables reads and repairs mautrix-go's SQL crypto store (crypto_olm_session, crypto_device,
// crypto_megolm_outbound_session) where its Store interface cannot: which devices the bridge holds
// Olm sessions with, which of those rows cannot be read, and the devices with given identity keys.
// It implements Tables.
// Relies on crypto/sql_store_upgrade/00-latest-revision.sql's tables (pinned in internal/upstream).
type CryptoTables struct {
	DB        *dbutil.Database
	AccountID string
	PickleKey []byte
}

var (
	_ Repairer = (*CryptoTables)(nil)
	_ Tables   = (*CryptoTables)(nil)
)

// DeleteUnreadableSessions deletes the stored sessions with the key that cannot be unpickled.
// One corrupt row makes the store's GetSessions fail for the whole sender key, which hides every
// other session with the device, the replacement included.
func (r *CryptoTables) DeleteUnreadableSessions(ctx context.Context, key id.SenderKey) (int, error) {
	rows, err := r.DB.Query(ctx, "SELECT session_id, session FROM crypto_olm_session WHERE sender_key=$1 AND account_id=$2", key, r.AccountID)
	if err != nil {
		return 0, fmt.Errorf("failed to read sessions: %w", err)
	}
	var unreadable []id.SessionID
	for rows.Next() {
		var sessionID id.SessionID
		var pickled []byte
		if err = rows.Scan(&sessionID, &pickled); err != nil {
			_ = rows.Close()
			return 0, err
		}
		if !r.readable(pickled) {
			unreadable = append(unreadable, sessionID)
		}
	}
	if err = rows.Close(); err != nil {
		return 0, err
	}
	for _, sessionID := range unreadable {
		if _, err = r.DB.Exec(ctx, "DELETE FROM crypto_olm_session WHERE session_id=$1 AND account_id=$2", sessionID, r.AccountID); err != nil {
			return 0, fmt.Errorf("failed to delete session %s: %w", sessionID, err)
		}
	}
	return len(unreadable), nil
}

func (r *CryptoTables) readable(pickled []byte) bool {
	return olm.NewBlankSession().Unpickle(pickled, r.PickleKey) == nil
}

// OlmPeers lists the identity keys the bridge holds Olm sessions with: those whose sessions all
// load, and those with a session row that cannot be read.
func (r *CryptoTables) OlmPeers(ctx context.Context) (readable, unreadable []id.SenderKey, err error) {
	rows, err := r.DB.Query(ctx, "SELECT sender_key, session FROM crypto_olm_session WHERE account_id=$1", r.AccountID)
	if err != nil {
		return nil, nil, fmt.Errorf("failed to read Olm sessions: %w", err)
	}
	defer rows.Close()
	broken := map[id.SenderKey]bool{}
	var order []id.SenderKey
	for rows.Next() {
		var key id.SenderKey
		var pickled []byte
		if err = rows.Scan(&key, &pickled); err != nil {
			return nil, nil, fmt.Errorf("failed to read Olm sessions: %w", err)
		}
		if _, seen := broken[key]; !seen {
			order = append(order, key)
		}
		broken[key] = broken[key] || !r.readable(pickled)
	}
	if err = rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("failed to read Olm sessions: %w", err)
	}
	for _, key := range order {
		if broken[key] {
			unreadable = append(unreadable, key)
		} else {
			readable = append(readable, key)
		}
	}
	return readable, unreadable, nil
}

// devicesChunk bounds the identity keys of one query.
const devicesChunk = 500

// DevicesByKey returns the devices the store knows (and has not seen deleted) with the identity
// keys; keys of no known device are left out.
func (r *CryptoTables) DevicesByKey(ctx context.Context, keys []id.IdentityKey) ([]*id.Device, error) {
	var devices []*id.Device
	for start := 0; start < len(keys); start += devicesChunk {
		chunk := keys[start:min(start+devicesChunk, len(keys))]
		args := make([]any, len(chunk))
		marks := make([]string, len(chunk))
		for i, key := range chunk {
			args[i], marks[i] = key, fmt.Sprintf("$%d", i+1)
		}
		rows, err := r.DB.Query(ctx, "SELECT user_id, device_id, identity_key, signing_key, trust, name FROM crypto_device WHERE deleted=false AND identity_key IN ("+strings.Join(marks, ",")+")", args...)
		if err != nil {
			return nil, fmt.Errorf("failed to look up devices by identity key: %w", err)
		}
		for rows.Next() {
			var dev id.Device
			if err = rows.Scan(&dev.UserID, &dev.DeviceID, &dev.IdentityKey, &dev.SigningKey, &dev.Trust, &dev.Name); err != nil {
				_ = rows.Close()
				return nil, fmt.Errorf("failed to look up devices by identity key: %w", err)
			}
			devices = append(devices, &dev)
		}
		if err = rows.Close(); err != nil {
			return nil, fmt.Errorf("failed to look up devices by identity key: %w", err)
		}
	}
	return devices, nil
}

// DiscardOutboundSessions deletes the bridge's outbound Megolm sessions, so that its next message
// in each room starts a new one.
func (r *CryptoTables) DiscardOutboundSessions(ctx context.Context) (int64, error) {
	res, err := r.DB.Exec(ctx, "DELETE FROM crypto_megolm_outbound_session WHERE account_id=$1", r.AccountID)
	if err != nil {
		return 0, fmt.Errorf("failed to discard outbound Megolm sessions: %w", err)
	}
	return res.RowsAffected()
}
