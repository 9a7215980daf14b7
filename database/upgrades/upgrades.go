// Package upgrades holds the embedded SQL schema of the project's own tables. Each component has
// its own upgrade table and version table, so a bridge that installs only unwedge does not get
// the reference bridge's tables.
package upgrades

import (
	"embed"

	"go.mau.fi/util/dbutil"
)

//go:embed webhook/*.sql
var webhookFS embed.FS

//go:embed unwedge/*.sql
var unwedgeFS embed.FS

// Unwedge is the upgrade table of unwedge's tables (version table unwedge_version).
var Unwedge = dbutil.BuildUpgradeTable().WithFSPath(unwedgeFS, "unwedge").Finish()

// Webhook is the upgrade table of the webhook network's tables (version table webhook_version).
var Webhook = dbutil.BuildUpgradeTable().WithFSPath(webhookFS, "webhook").Finish()
