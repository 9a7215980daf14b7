// Package upgrades holds the embedded SQL schema of unwedge's tables (version table
// unwedge_version). The reference bridge's webhook tables are webhook/store's.
package upgrades

import (
	"embed"

	"go.mau.fi/util/dbutil"
)

//go:embed unwedge/*.sql
var unwedgeFS embed.FS

// Unwedge is the upgrade table of unwedge's tables (version table unwedge_version).
var Unwedge = dbutil.BuildUpgradeTable().WithFSPath(unwedgeFS, "unwedge").Finish()
