package unwedge

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
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

// Account is the crypto store's account the sessions belong to.
func (r *CryptoTables) Account() string { return r.AccountID }

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

// The startup check reads crypto_olm_session a page at a time, with a cursor on the order's
// columns (not OFFSET, which would skip rows while heals add sessions), so that its memory is one
// page whatever the number of sessions.
const (
	// recentPeersQuery: the devices with a session older than the check, the most recently used
	// first. A session used since the check began has moved above the cursor: the catch-up pass
	// (usedSincePeersQuery) finds it. %s is GREATEST (Postgres) or MAX (SQLite).
	recentPeersQuery = `
		SELECT sender_key, MAX(%[1]s(last_encrypted, last_decrypted)) AS used
		FROM crypto_olm_session WHERE account_id=$1 AND created_at < $2
		GROUP BY sender_key
		HAVING (MAX(%[1]s(last_encrypted, last_decrypted)), sender_key) < ($3, $4)
		ORDER BY used DESC, sender_key DESC LIMIT $5`
	// usedSincePeersQuery: the devices whose session older than the check was used after it began
	// and that have no session newer than it (a heal's, or one the device opened).
	usedSincePeersQuery = `
		SELECT sender_key FROM crypto_olm_session o
		WHERE account_id=$1 AND created_at < $2 AND sender_key > $3 AND NOT EXISTS (
			SELECT 1 FROM crypto_olm_session n WHERE n.account_id=$1 AND n.sender_key=o.sender_key AND n.created_at >= $2
		)
		GROUP BY sender_key HAVING MAX(%[1]s(last_encrypted, last_decrypted)) >= $2
		ORDER BY sender_key LIMIT $4`
	// sessionsPageQuery: the sessions in the order of their sender key, so that one device's rows
	// come together and telling whether any of them is unreadable needs only the current key.
	sessionsPageQuery = `
		SELECT sender_key, session_id, session FROM crypto_olm_session
		WHERE account_id=$1 AND (sender_key, session_id) > ($2, $3)
		ORDER BY sender_key, session_id LIMIT $4`
)

// greatest is the dialect's function for the larger of two values.
func (r *CryptoTables) greatest() string {
	if r.DB.Dialect == dbutil.Postgres {
		return "GREATEST"
	}
	return "MAX"
}

// RecentCursor is where a page of RecentPeers ended; the zero value starts at the first page.
type RecentCursor struct {
	// used is the page's last device's latest use, as the driver returned it (the dialects
	// return the aggregate as different types; it only goes back into the next query).
	used any
	key  id.SenderKey
}

// RecentPeers returns a page of at most limit identity keys the bridge held Olm sessions with
// before since (the check's start), the device that sent or received over one most recently
// first, and the cursor of the next page; no keys: the end.
func (r *CryptoTables) RecentPeers(ctx context.Context, since time.Time, after RecentCursor, limit int) ([]id.SenderKey, RecentCursor, error) {
	if after.used == nil {
		after.used = since
	}
	rows, err := r.DB.Query(ctx, fmt.Sprintf(recentPeersQuery, r.greatest()), r.AccountID, since, after.used, after.key, limit)
	if err != nil {
		return nil, after, fmt.Errorf("failed to list the Olm peers by recency: %w", err)
	}
	defer rows.Close()
	keys := make([]id.SenderKey, 0, limit)
	for rows.Next() {
		if err = rows.Scan(&after.key, &after.used); err != nil {
			return nil, after, fmt.Errorf("failed to list the Olm peers by recency: %w", err)
		}
		keys = append(keys, after.key)
	}
	if err = rows.Err(); err != nil {
		return nil, after, fmt.Errorf("failed to list the Olm peers by recency: %w", err)
	}
	return keys, after, nil
}

// UsedSincePeers returns a page of at most limit identity keys, after the key after, of devices
// whose session older than since was used since and that have no session newer than since: the
// devices RecentPeers passed over because they moved during the check.
func (r *CryptoTables) UsedSincePeers(ctx context.Context, since time.Time, after id.SenderKey, limit int) ([]id.SenderKey, error) {
	rows, err := r.DB.Query(ctx, fmt.Sprintf(usedSincePeersQuery, r.greatest()), r.AccountID, since, after, limit)
	keys, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.SenderKey], err).AsList()
	if err != nil {
		return nil, fmt.Errorf("failed to list the Olm peers used during the startup check: %w", err)
	}
	return keys, nil
}

// SessionsCursor is where a page of UnreadablePeers ended; the zero value starts at the first.
type SessionsCursor struct {
	key     id.SenderKey
	session id.SessionID
	// broken says whether a session of key seen so far cannot be read; the key's other sessions
	// may be on the next page.
	broken bool
}

// UnreadablePeers reads a page of at most limit stored Olm sessions in the order of their sender
// key and returns the identity keys that have a session that cannot be unpickled, each once, the
// rows read, and the cursor of the next page. A key whose rows go on past the page is returned
// with the page that reads its last row; rows 0: the end.
func (r *CryptoTables) UnreadablePeers(ctx context.Context, after SessionsCursor, limit int) (unreadable []id.SenderKey, rows int, next SessionsCursor, err error) {
	res, err := r.DB.Query(ctx, sessionsPageQuery, r.AccountID, after.key, after.session, limit)
	if err != nil {
		return nil, 0, after, fmt.Errorf("failed to read Olm sessions: %w", err)
	}
	defer res.Close()
	next = after
	for res.Next() {
		var key id.SenderKey
		var sessionID id.SessionID
		var pickled []byte
		if err = res.Scan(&key, &sessionID, &pickled); err != nil {
			return nil, rows, after, fmt.Errorf("failed to read Olm sessions: %w", err)
		}
		rows++
		if key != next.key {
			if next.broken {
				unreadable = append(unreadable, next.key)
			}
			next.broken = false
		}
		next.key, next.session = key, sessionID
		next.broken = next.broken || !r.readable(pickled)
	}
	if err = res.Err(); err != nil {
		return nil, rows, after, fmt.Errorf("failed to read Olm sessions: %w", err)
	}
	if rows < limit && next.broken {
		// The last page: its last key has no more rows.
		unreadable = append(unreadable, next.key)
		next.broken = false
	}
	return unreadable, rows, next, nil
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

// InsertSession writes a new Olm session with the key to crypto_olm_session as the SQL store's
// AddSession does, but not to the store's session cache (Store.storeReplacement).
func (r *CryptoTables) InsertSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	pickled, err := sess.Internal.Pickle(r.PickleKey)
	if err != nil {
		return fmt.Errorf("failed to pickle Olm session %s: %w", sess.ID(), err)
	}
	_, err = r.DB.Exec(ctx, "INSERT INTO crypto_olm_session (session_id, sender_key, session, created_at, last_encrypted, last_decrypted, account_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
		sess.ID(), key, pickled, sess.CreationTime, sess.LastEncryptedTime, sess.LastDecryptedTime, r.AccountID)
	if err != nil {
		return fmt.Errorf("failed to store Olm session %s: %w", sess.ID(), err)
	}
	return nil
}

// PeekSessions reads the Olm sessions with the key, the latest decrypted first, as the SQL store's
// GetSessions does, but as copies the store's session cache does not get: for reading only.
func (r *CryptoTables) PeekSessions(ctx context.Context, key id.SenderKey) (crypto.OlmSessionList, error) {
	rows, err := r.DB.Query(ctx, "SELECT session, created_at, last_encrypted, last_decrypted FROM crypto_olm_session WHERE sender_key=$1 AND account_id=$2 ORDER BY last_decrypted DESC", key, r.AccountID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var list crypto.OlmSessionList
	for rows.Next() {
		sess := &crypto.OlmSession{Internal: olm.NewBlankSession()}
		var pickled []byte
		if err = rows.Scan(&pickled, &sess.CreationTime, &sess.LastEncryptedTime, &sess.LastDecryptedTime); err != nil {
			return nil, err
		}
		if err = sess.Internal.Unpickle(pickled, r.PickleKey); err != nil {
			return nil, err
		}
		list = append(list, sess)
	}
	return list, rows.Err()
}
