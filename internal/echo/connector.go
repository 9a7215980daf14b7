// Package echo is the smallest bridgev2 network that shows whether a Matrix message was bridged:
// each login gets one portal room, and every text message a Matrix user sends there comes back
// from the network's "Echo" ghost, with a configurable prefix. It imports nothing from unwedge:
// it is the stand-in for any third-party connector that cmd/echobridge wraps with bridge.Wrap.
package echo

import (
	"context"
	"errors"

	up "go.mau.fi/util/configupgrade"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
)

// Config is the network section of the bridge config.
type Config struct {
	// Prefix is put before each echoed message.
	Prefix string `yaml:"prefix"`
}

const exampleConfig = `# Put before each echoed message.
prefix: "echo: "
`

// Connector implements bridgev2.NetworkConnector for the echo network.
type Connector struct {
	Config Config
	br     *bridgev2.Bridge
}

var (
	_ bridgev2.NetworkConnector        = (*Connector)(nil)
	_ bridgev2.ConfigValidatingNetwork = (*Connector)(nil)
)

func (c *Connector) Init(br *bridgev2.Bridge) { c.br = br }

func (c *Connector) Start(context.Context) error { return nil }

func (c *Connector) GetName() bridgev2.BridgeName {
	return bridgev2.BridgeName{
		DisplayName:          "Echo",
		NetworkURL:           "https://github.com/unwedge/unwedge",
		NetworkID:            "echo",
		BeeperBridgeType:     "github.com/unwedge/unwedge/echo",
		DefaultPort:          29401,
		DefaultCommandPrefix: "!echo",
	}
}

func (c *Connector) GetDBMetaTypes() database.MetaTypes { return database.MetaTypes{} }

func (c *Connector) GetCapabilities() *bridgev2.NetworkGeneralCapabilities {
	return &bridgev2.NetworkGeneralCapabilities{}
}

func (c *Connector) GetConfig() (string, any, up.Upgrader) {
	return exampleConfig, &c.Config, up.SimpleUpgrader(func(helper up.Helper) {
		helper.Copy(up.Str, "prefix")
	})
}

func (c *Connector) ValidateConfig() error {
	if c.Config.Prefix == "" {
		return errors.New("network.prefix must not be empty")
	}
	return nil
}

func (c *Connector) GetBridgeInfoVersion() (info, capabilities int) { return 1, 1 }

func (c *Connector) LoadUserLogin(_ context.Context, login *bridgev2.UserLogin) error {
	login.Client = &client{conn: c, login: login}
	return nil
}

// portalKey is the one portal of a login.
func portalKey(login *bridgev2.UserLogin) networkid.PortalKey {
	return networkid.PortalKey{ID: networkid.PortalID("echo-" + string(login.ID)), Receiver: login.ID}
}
