package database

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	// The first share wins: a session's index only grows, so later shares are never lower.
	recordSharedQuery = `
		INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at)
		VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (bridge_id, session_id, identity_key) DO NOTHING`
	firstSharedQuery = `
		SELECT first_index FROM unwedge_megolm_shared WHERE bridge_id = $1 AND session_id = $2 AND identity_key = $3`
	// mautrix-go's record of who got each of the bridge's Megolm sessions
	// (crypto_megolm_outbound_session_shared, v0.32.0 schema: no time, no account) would grow by
	// devices x sessions forever. The bridge reads it only for a room's current session
	// (ReshareOwnSessions), so it is pruned with ours, before ours, for the sessions whose every
	// share we recorded is older than the retention. Sessions we never recorded (shared before
	// unwedge ran, or records pruned earlier) keep their rows: we cannot tell their age. Session
	// IDs are unique, so another account's rows in the same table are never touched.
	// Relies on crypto/sql_store_upgrade/00-latest-revision.sql's crypto_megolm_outbound_session_shared (pinned in internal/upstream).
	pruneMautrixSharedQuery = `
		DELETE FROM crypto_megolm_outbound_session_shared
		WHERE session_id IN (
			SELECT session_id FROM unwedge_megolm_shared WHERE bridge_id = $1
			GROUP BY session_id HAVING MAX(shared_at) < $2
		) AND NOT EXISTS (
			SELECT 1 FROM crypto_megolm_outbound_session ogs
			WHERE ogs.session_id = crypto_megolm_outbound_session_shared.session_id
		)`
	// A room's current session keeps both records whatever their age: ReshareOwnSessions sends it
	// again only to devices in mautrix-go's, and AnswerOwnSession answers from the index in ours
	// (without it the stock rule answers an admin's device from the session's first index).
	// Deleting ours alone would also leave mautrix-go's rows with nothing to date them once the
	// session expires.
	pruneSharedQuery = `
		DELETE FROM unwedge_megolm_shared WHERE bridge_id = $1 AND shared_at < $2 AND NOT EXISTS (
			SELECT 1 FROM crypto_megolm_outbound_session ogs
			WHERE ogs.session_id = unwedge_megolm_shared.session_id
		)`
	sharedKeysQuery = `
		SELECT identity_key FROM unwedge_megolm_shared WHERE bridge_id = $1 AND shared_at >= $2
		GROUP BY identity_key ORDER BY MAX(shared_at) DESC LIMIT $3`
	// The devices shared with since $2 that have no Olm session row (crypto_olm_session of
	// account $3), the latest shared first, a page after the cursor ($4, $5). The database does the
	// anti-join so that the bridge holds one page, whatever the number of sessions and shares.
	// The cast lets Postgres use crypto_olm_session_sender_key_idx (sender_key is CHAR(43)).
	// Relies on crypto/sql_store_upgrade/00-latest-revision.sql's crypto_olm_session (pinned in internal/upstream).
	lostKeysQuery = `
		SELECT identity_key, MAX(shared_at) FROM unwedge_megolm_shared s
		WHERE bridge_id = $1 AND shared_at >= $2 AND NOT EXISTS (
			SELECT 1 FROM crypto_olm_session o
			WHERE o.account_id = $3 AND o.sender_key = CAST(s.identity_key AS CHAR(43))
		)
		GROUP BY identity_key HAVING (MAX(shared_at), identity_key) < ($4, $5)
		ORDER BY MAX(shared_at) DESC, identity_key DESC LIMIT $6`
)

var _ unwedge.SharedPeers = (*SharedQuery)(nil)

// SharedQuery records at which index the bridge first shared each of its own Megolm sessions
// with a device (by identity key).
type SharedQuery struct {
	BridgeID string
	db       *dbutil.Database
}

// RecordShared notes that the device got the session from index on (kept if it had it already).
func (sq *SharedQuery) RecordShared(ctx context.Context, sessionID id.SessionID, key id.IdentityKey, index uint32) error {
	if _, err := sq.db.Exec(ctx, recordSharedQuery, sq.BridgeID, sessionID, key, int64(index), time.Now().UnixMilli()); err != nil {
		return fmt.Errorf("failed to record the index a Megolm session was shared at: %w", err)
	}
	return nil
}

// FirstShared returns the index from which the device got the session, and false when the bridge
// never shared it with that device (or the record was pruned).
func (sq *SharedQuery) FirstShared(ctx context.Context, sessionID id.SessionID, key id.IdentityKey) (uint32, bool, error) {
	var index int64
	err := sq.db.QueryRow(ctx, firstSharedQuery, sq.BridgeID, sessionID, key).Scan(&index)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, nil
	} else if err != nil {
		return 0, false, fmt.Errorf("failed to read the index a Megolm session was shared at: %w", err)
	}
	return uint32(index), true, nil
}

// pruneShared deletes the records of shares older than before, ours and mautrix-go's, in one
// transaction so that a failure cannot leave mautrix-go's rows without ours to date them.
func pruneShared(ctx context.Context, db *dbutil.Database, bridgeID string, before time.Time) error {
	return db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := db.Exec(ctx, pruneMautrixSharedQuery, bridgeID, before.UnixMilli()); err != nil {
			return fmt.Errorf("failed to prune the crypto store's records of shared Megolm sessions: %w", err)
		}
		if _, err := db.Exec(ctx, pruneSharedQuery, bridgeID, before.UnixMilli()); err != nil {
			return fmt.Errorf("failed to prune shared Megolm session records: %w", err)
		}
		return nil
	})
}

// SharedKeys lists the identity keys of the devices the bridge shared one of its Megolm sessions
// with since a time, the latest first, at most limit.
func (sq *SharedQuery) SharedKeys(ctx context.Context, since time.Time, limit int) ([]id.IdentityKey, error) {
	rows, err := sq.db.Query(ctx, sharedKeysQuery, sq.BridgeID, since.UnixMilli(), limit)
	keys, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.IdentityKey], err).AsList()
	if err != nil {
		return nil, fmt.Errorf("failed to list the devices the bridge shared room keys with: %w", err)
	}
	return keys, nil
}

// LostKeys returns a page of at most limit identity keys of devices the bridge shared one of its
// Megolm sessions with since a time and holds no Olm session with (in the crypto store's account
// accountID), the latest shared first, after the cursor, and the cursor of the next page; no keys:
// the end.
func (sq *SharedQuery) LostKeys(ctx context.Context, accountID string, since time.Time, after unwedge.SharedCursor, limit int) ([]id.IdentityKey, unwedge.SharedCursor, error) {
	if after == (unwedge.SharedCursor{}) {
		after.SharedAt = math.MaxInt64
	}
	rows, err := sq.db.Query(ctx, lostKeysQuery, sq.BridgeID, since.UnixMilli(), accountID, after.SharedAt, after.Key, limit)
	if err != nil {
		return nil, after, fmt.Errorf("failed to list the devices the bridge shared room keys with and holds no Olm session with: %w", err)
	}
	defer rows.Close()
	keys := make([]id.IdentityKey, 0, limit)
	for rows.Next() {
		if err = rows.Scan(&after.Key, &after.SharedAt); err != nil {
			return nil, after, fmt.Errorf("failed to list the devices the bridge shared room keys with and holds no Olm session with: %w", err)
		}
		keys = append(keys, after.Key)
	}
	if err = rows.Err(); err != nil {
		return nil, after, fmt.Errorf("failed to list the devices the bridge shared room keys with and holds no Olm session with: %w", err)
	}
	return keys, after, nil
}
