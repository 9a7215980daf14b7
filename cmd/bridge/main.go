// Command bridge is the reference bridge: a bridgev2 bridge for the webhook network, with
// end-to-bridge encryption. Build it with ./build.sh (which sets -tags goolm).
package main

import (
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/webhook"
)

// Filled by build.sh's -ldflags.
var (
	Tag       = "unknown"
	Commit    = "unknown"
	BuildTime = "unknown"
)

func main() {
	m := mxmain.BridgeMain{
		Name:        "unwedge-webhook",
		Description: "A Matrix-webhook bridge with self-healing end-to-bridge encryption.",
		URL:         "https://github.com/unwedge/unwedge",
		Version:     "0.1.0",
		Connector:   &webhook.Connector{},
	}
	m.InitVersion(Tag, Commit, BuildTime)
	m.Run()
}
