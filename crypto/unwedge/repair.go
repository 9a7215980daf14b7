package unwedge

import (
	"context"
	"fmt"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/id"
)

// SQLRepairer deletes unreadable rows from mautrix-go's SQL crypto store (crypto_olm_session).
// One corrupt row makes the store's GetSessions fail for the whole sender key, which hides every
// other session with the device, the replacement included.
type SQLRepairer struct {
	DB        *dbutil.Database
	AccountID string
	PickleKey []byte
}

func (r *SQLRepairer) DeleteUnreadableSessions(ctx context.Context, key id.SenderKey) (int, error) {
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
		if err = olm.NewBlankSession().Unpickle(pickled, r.PickleKey); err != nil {
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
