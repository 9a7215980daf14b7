// Package database holds the project's own tables and their queries, on Postgres (the production
// database, through lib/pq) and SQLite. Each component has its own version table inside the
// bridge's database, so it upgrades independently of bridgev2's tables.
package database

import (
	"context"
	"fmt"

	"go.mau.fi/util/dbutil"

	"github.com/unwedge/unwedge/database/upgrades"
)

// WebhookDB holds the reference bridge's webhook network tables, and the counts of what its
// logins created in bridgev2's tables.
type WebhookDB struct {
	*dbutil.Database
	Outbox *OutboxQuery
	Usage  *UsageQuery
}

// NewWebhookDB wraps the bridge's database; call Upgrade before use.
func NewWebhookDB(bridgeID string, parent *dbutil.Database, log dbutil.DatabaseLogger) *WebhookDB {
	db := parent.Child("webhook_version", upgrades.Webhook, log)
	return &WebhookDB{Database: db, Outbox: &OutboxQuery{BridgeID: bridgeID, db: db}, Usage: &UsageQuery{BridgeID: bridgeID, db: db}}
}

// Upgrade creates or upgrades the webhook tables.
func (db *WebhookDB) Upgrade(ctx context.Context) error {
	if err := db.Database.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade webhook tables: %w", err)
	}
	return nil
}

// UnwedgeDB holds unwedge's tables: the heal ledger, the events waiting for their keys, and the
// index each device got the bridge's Megolm sessions at.
type UnwedgeDB struct {
	*dbutil.Database
	Ledger  *LedgerQuery
	Pending *PendingQuery
	Shared  *SharedQuery
}

// NewUnwedgeDB wraps the bridge's database; call Upgrade before use.
func NewUnwedgeDB(bridgeID string, parent *dbutil.Database, log dbutil.DatabaseLogger) *UnwedgeDB {
	db := parent.Child("unwedge_version", upgrades.Unwedge, log)
	return &UnwedgeDB{Database: db, Ledger: &LedgerQuery{BridgeID: bridgeID, db: db}, Pending: &PendingQuery{BridgeID: bridgeID, db: db},
		Shared: &SharedQuery{BridgeID: bridgeID, db: db}}
}

// Upgrade creates or upgrades unwedge's tables.
func (db *UnwedgeDB) Upgrade(ctx context.Context) error {
	if err := db.Database.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade unwedge tables: %w", err)
	}
	return nil
}
