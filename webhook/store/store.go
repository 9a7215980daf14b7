// Package store holds the reference bridge's webhook network tables (the outbox of messages to
// deliver) and its counts of what each login created in bridgev2's tables, on Postgres and
// SQLite. The tables have their own version table, webhook_version, so they upgrade apart from
// bridgev2's and unwedge's.
package store

import (
	"context"
	"embed"
	"fmt"

	"go.mau.fi/util/dbutil"
)

//go:embed upgrades/*.sql
var upgradesFS embed.FS

// upgrades is the upgrade table of the webhook network's tables.
var upgrades = dbutil.BuildUpgradeTable().WithFSPath(upgradesFS, "upgrades").Finish()

// DB holds the webhook network's tables.
type DB struct {
	*dbutil.Database
	Outbox *OutboxQuery
	Usage  *UsageQuery
}

// New wraps the bridge's database; call Upgrade before use.
func New(bridgeID string, parent *dbutil.Database, log dbutil.DatabaseLogger) *DB {
	db := parent.Child("webhook_version", upgrades, log)
	return &DB{Database: db, Outbox: &OutboxQuery{BridgeID: bridgeID, db: db}, Usage: &UsageQuery{BridgeID: bridgeID, db: db}}
}

// Upgrade creates or upgrades the webhook tables.
func (db *DB) Upgrade(ctx context.Context) error {
	if err := db.Database.Upgrade(ctx); err != nil {
		return fmt.Errorf("failed to upgrade webhook tables: %w", err)
	}
	return nil
}
