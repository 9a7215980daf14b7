package database

import (
	"context"
	"encoding/hex"
	"fmt"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	keepOlmStateQuery = `
		INSERT INTO unwedge_olm_history (bridge_id, sender_key, session_id, taken_at, pickle) VALUES ($1, $2, $3, $4, $5)`
	olmStatesQuery = `
		SELECT session_id, taken_at, pickle FROM unwedge_olm_history
		WHERE bridge_id = $1 AND sender_key = $2 AND taken_at >= $3 ORDER BY taken_at DESC LIMIT $4`
	// mautrix-go's hashes of the account's decrypted Olm messages from before $3, kept before it
	// deletes them (its message_hash is the SHA-256 of the ciphertext, as unwedge's).
	keepHashesQuery = `
		INSERT INTO unwedge_olm_seen (bridge_id, hash, seen_at)
		SELECT $1, %s, received_at FROM crypto_olm_message_hash WHERE account_id = $2 AND received_at < $3
		ON CONFLICT (bridge_id, hash) DO NOTHING`
	seenQuery              = `SELECT COUNT(*) FROM unwedge_olm_seen WHERE bridge_id = $1 AND hash = $2 AND seen_at >= $3`
	pruneOlmHistoryQuery   = `DELETE FROM unwedge_olm_history WHERE bridge_id = $1 AND taken_at < $2`
	pruneOlmSeenQuery      = `DELETE FROM unwedge_olm_seen WHERE bridge_id = $1 AND seen_at < $2`
	olmHistorySizeQuery    = `SELECT COUNT(*), COUNT(DISTINCT session_id), COALESCE(SUM(LENGTH(pickle)), 0) FROM unwedge_olm_history WHERE bridge_id = $1`
	olmHistorySessionQuery = `SELECT COUNT(*) FROM unwedge_olm_history WHERE bridge_id = $1 AND session_id = $2`
)

// OlmHistoryQuery keeps earlier states of the bridge's Olm sessions and the hashes of the Olm
// messages it decrypted (unwedge.OlmHistory).
type OlmHistoryQuery struct {
	BridgeID string
	db       *dbutil.Database
}

var _ unwedge.OlmHistory = (*OlmHistoryQuery)(nil)

// KeepState stores a pickled state of the session with key, taken at at.
func (hq *OlmHistoryQuery) KeepState(ctx context.Context, key id.SenderKey, sessionID id.SessionID, pickle []byte, at time.Time) error {
	if _, err := hq.db.Exec(ctx, keepOlmStateQuery, hq.BridgeID, key, sessionID, at.UnixMilli(), string(pickle)); err != nil {
		return fmt.Errorf("failed to keep a state of Olm session %s: %w", sessionID, err)
	}
	return nil
}

// States returns at most limit states of the sessions with key taken at or after since, the
// newest first.
func (hq *OlmHistoryQuery) States(ctx context.Context, key id.SenderKey, since time.Time, limit int) ([]unwedge.OlmState, error) {
	rows, err := hq.db.Query(ctx, olmStatesQuery, hq.BridgeID, key, since.UnixMilli(), limit)
	if err != nil {
		return nil, fmt.Errorf("failed to read the Olm history of %s: %w", key, err)
	}
	var states []unwedge.OlmState
	err = scanBatch(rows, func(row dbutil.Scannable) error {
		var st unwedge.OlmState
		var takenAt int64
		var pickle string
		if err := row.Scan(&st.SessionID, &takenAt, &pickle); err != nil {
			return err
		}
		st.TakenAt, st.Pickle = time.UnixMilli(takenAt), []byte(pickle)
		states = append(states, st)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("failed to read the Olm history of %s: %w", key, err)
	}
	return states, nil
}

// KeepHashes copies the hashes of the Olm messages that mautrix-go's crypto store (account
// accountID) recorded before before into the history, as the store is about to delete them.
func (hq *OlmHistoryQuery) KeepHashes(ctx context.Context, accountID string, before time.Time) (int64, error) {
	hexHash := "lower(hex(message_hash))"
	if hq.db.Dialect == dbutil.Postgres {
		hexHash = "encode(message_hash, 'hex')"
	}
	res, err := hq.db.Exec(ctx, fmt.Sprintf(keepHashesQuery, hexHash), hq.BridgeID, accountID, before.UnixMilli())
	if err != nil {
		return 0, fmt.Errorf("failed to keep the hashes of decrypted Olm messages: %w", err)
	}
	n, _ := res.RowsAffected()
	return n, nil
}

// Seen reports whether the bridge decrypted the Olm message with the hash at or after since.
func (hq *OlmHistoryQuery) Seen(ctx context.Context, hash [32]byte, since time.Time) (seen bool, err error) {
	var n int
	if err = hq.db.QueryRow(ctx, seenQuery, hq.BridgeID, hex.EncodeToString(hash[:]), since.UnixMilli()).Scan(&n); err != nil {
		return false, fmt.Errorf("failed to look up a decrypted Olm message: %w", err)
	}
	return n > 0, nil
}

// Prune deletes the states and hashes from before before.
func (hq *OlmHistoryQuery) Prune(ctx context.Context, before time.Time) (states, hashes int64, err error) {
	res, err := hq.db.Exec(ctx, pruneOlmHistoryQuery, hq.BridgeID, before.UnixMilli())
	if err != nil {
		return 0, 0, fmt.Errorf("failed to prune the Olm history: %w", err)
	}
	states, _ = res.RowsAffected()
	if res, err = hq.db.Exec(ctx, pruneOlmSeenQuery, hq.BridgeID, before.UnixMilli()); err != nil {
		return states, 0, fmt.Errorf("failed to prune the decrypted Olm messages: %w", err)
	}
	hashes, _ = res.RowsAffected()
	return states, hashes, nil
}

// Size returns how many states the history holds, of how many sessions, and their pickles'
// bytes (for measurements and the admin's status).
func (hq *OlmHistoryQuery) Size(ctx context.Context) (states, sessions, bytes int64, err error) {
	err = hq.db.QueryRow(ctx, olmHistorySizeQuery, hq.BridgeID).Scan(&states, &sessions, &bytes)
	return
}

// SessionStates counts the states kept of one session.
func (hq *OlmHistoryQuery) SessionStates(ctx context.Context, sessionID id.SessionID) (n int, err error) {
	err = hq.db.QueryRow(ctx, olmHistorySessionQuery, hq.BridgeID, sessionID).Scan(&n)
	return
}
