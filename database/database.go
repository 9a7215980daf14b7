// Package database holds unwedge's tables and their queries, on Postgres (the production
// database, through lib/pq) and SQLite: the heal ledger (unwedge_device, unwedge_heal), the
// events waiting for their keys (unwedge_pending, and unwedge_pending_lock, which keeps their
// caps one writer at a time), the index each device got the bridge's Megolm sessions at
// (unwedge_megolm_shared), the crypto store's generation (unwedge_generation) and the Olm history
// (unwedge_olm_history, unwedge_olm_seen). It implements crypto/unwedge's Ledger, PendingStore,
// SharedIndex, SharedPeers, Generations and OlmHistory. The tables
// have their own version table, unwedge_version, so they upgrade independently of bridgev2's
// tables.
package database

import (
	"context"
	"fmt"

	"go.mau.fi/util/dbutil"

	"github.com/unwedge/unwedge/database/upgrades"
)

// UnwedgeDB holds unwedge's tables: the heal ledger, the events waiting for their keys, and the
// index each device got the bridge's Megolm sessions at.
type UnwedgeDB struct {
	*dbutil.Database
	Ledger  *LedgerQuery
	Pending *PendingQuery
	Shared  *SharedQuery
	// Generation is the crypto store's generation (unwedge.Generations).
	Generation *GenerationQuery
	// History is the Olm history (unwedge.OlmHistory).
	History *OlmHistoryQuery
}

// NewUnwedgeDB wraps the bridge's database; call Upgrade before use.
func NewUnwedgeDB(bridgeID string, parent *dbutil.Database, log dbutil.DatabaseLogger) *UnwedgeDB {
	db := parent.Child("unwedge_version", upgrades.Unwedge, log)
	return &UnwedgeDB{Database: db, Ledger: &LedgerQuery{BridgeID: bridgeID, db: db}, Pending: &PendingQuery{BridgeID: bridgeID, db: db},
		Shared: &SharedQuery{BridgeID: bridgeID, db: db}, Generation: &GenerationQuery{BridgeID: bridgeID, db: db},
		History: &OlmHistoryQuery{BridgeID: bridgeID, db: db}}
}

// Upgrade creates or upgrades unwedge's tables.
func (db *UnwedgeDB) Upgrade(ctx context.Context) error {
	if err := db.Database.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade unwedge tables: %w", err)
	}
	return nil
}
