package store

import (
	"context"
	"strings"

	"go.mau.fi/util/dbutil"
)

// The webhook network's creation limits count rows of bridgev2's own tables, which it only reads:
// a login's portals have it as receiver, and its ghosts have IDs that start with its namespace.
// Counting the rows themselves needs no table of ours, survives restarts and follows deletions.
// Both counts scan the bridge's rows (LIKE cannot use the ghost key under a non-C collation), and
// run only when a login creates a chat or posts as a sender it had not had before.
const (
	countReceiverPortalsQuery = `SELECT COUNT(*) FROM portal WHERE bridge_id = $1 AND receiver = $2`
	countGhostsByPrefixQuery  = `SELECT COUNT(*) FROM ghost WHERE bridge_id = $1 AND id LIKE $2 ESCAPE '\'`
)

// UsageQuery counts what a webhook login has created in bridgev2's portal and ghost tables.
type UsageQuery struct {
	BridgeID string
	db       *dbutil.Database
}

// Portals counts the portals whose receiver is the login.
func (uq *UsageQuery) Portals(ctx context.Context, loginID string) (n int, err error) {
	err = uq.db.QueryRow(ctx, countReceiverPortalsQuery, uq.BridgeID, loginID).Scan(&n)
	return
}

// GhostsWithPrefix counts the ghosts whose ID starts with prefix.
func (uq *UsageQuery) GhostsWithPrefix(ctx context.Context, prefix string) (n int, err error) {
	err = uq.db.QueryRow(ctx, countGhostsByPrefixQuery, uq.BridgeID, likePrefix(prefix)).Scan(&n)
	return
}

// likePrefix is a LIKE pattern (with ESCAPE '\') matching the strings that start with prefix.
func likePrefix(prefix string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(prefix) + "%"
}
