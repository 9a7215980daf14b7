// Command echobridge is a minimal bridgev2 bridge whose network connector (internal/echo) knows
// nothing about unwedge: the two lines marked below are all it takes to install unwedge.
package main

import (
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/bridge" // unwedge
	"github.com/unwedge/unwedge/internal/echo"
)

// Filled by -ldflags, as in cmd/bridge.
var (
	Tag       = "unknown"
	Commit    = "unknown"
	BuildTime = "unknown"
)

func main() {
	m := mxmain.BridgeMain{
		Name:        "unwedge-echo",
		Description: "A Matrix bridge that echoes messages, with unwedge installed by bridge.Wrap.",
		URL:         "https://github.com/unwedge/unwedge",
		Version:     "0.1.0",
		Connector:   &echo.Connector{},
	}
	m.InitVersion(Tag, Commit, BuildTime)
	bridge.Wrap(&m) // unwedge
	m.Run()
}
