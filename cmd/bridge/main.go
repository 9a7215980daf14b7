// Command bridge is the reference bridge: a bridgev2 bridge for the webhook network, with
// end-to-bridge encryption. Build it with ./build.sh (which sets -tags goolm).
package main

import (
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/bridge"
	"github.com/unwedge/unwedge/webhook"
)

// Filled by build.sh's -ldflags.
var (
	Tag       = "unknown"
	Commit    = "unknown"
	BuildTime = "unknown"
)

func main() {
	connector := &webhook.Connector{}
	m := mxmain.BridgeMain{
		Name:        "unwedge-webhook",
		Description: "A Matrix-webhook bridge with self-healing end-to-bridge encryption.",
		URL:         "https://github.com/unwedge/unwedge",
		Version:     "0.1.0",
		Connector:   connector,
	}
	m.PostInit = func() {
		bridge.Install(&m, &connector.Config.Unwedge)
	}
	m.InitVersion(Tag, Commit, BuildTime)
	m.Run()
}
