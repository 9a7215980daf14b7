package database

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

const (
	// The first share wins: a session's index only grows, so later shares are never lower.
	recordSharedQuery = `
		INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at)
		VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (bridge_id, session_id, identity_key) DO NOTHING`
	firstSharedQuery = `
		SELECT first_index FROM unwedge_megolm_shared WHERE bridge_id = $1 AND session_id = $2 AND identity_key = $3`
	pruneSharedQuery = `DELETE FROM unwedge_megolm_shared WHERE bridge_id = $1 AND shared_at < $2`
	sharedKeysQuery  = `
		SELECT identity_key FROM unwedge_megolm_shared WHERE bridge_id = $1 AND shared_at >= $2
		GROUP BY identity_key ORDER BY MAX(shared_at) DESC LIMIT $3`
)

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
