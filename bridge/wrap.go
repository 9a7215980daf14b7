package bridge

import (
	"fmt"
	"os"
	"strings"

	"github.com/rs/zerolog"
	up "go.mau.fi/util/configupgrade"
	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// configKey is where the unwedge block lives in the bridge config's network section.
const configKey = "unwedge"

// Wrap installs unwedge into a bridge made with mxmain without any change to its network
// connector: call it in main.go after the BridgeMain literal (and after setting PostInit, if the
// bridge has one), just before m.Run().
//
//	bridge.Wrap(&m)
//	m.Run()
//
// The connector's config gets the documented `unwedge:` block (network.unwedge, as with the
// embedding API: ExampleConfig, UpgradeConfig, Install), which mxmain writes into new configs
// with -e and adds to existing ones on start. A bad unwedge option stops the bridge at start like
// any config error. The connector is wrapped only until bridgev2 initializes it; from then on
// the bridge holds its own connector again, so every optional interface bridgev2 looks for at
// runtime is the connector's. With `unwedge.enabled: false` the bridge runs as without Wrap.
//
// Wrap panics when the connector's example config already has an unwedge block: that connector
// installs unwedge itself (Install) and must not be wrapped too.
func Wrap(m *mxmain.BridgeMain) {
	if m.Connector == nil {
		panic("bridge.Wrap: BridgeMain.Connector is not set")
	}
	if _, ok := m.Connector.(*wrapped); ok {
		return
	}
	example, _, _ := m.Connector.GetConfig()
	if hasTopLevelKey(example, configKey) {
		panic("bridge.Wrap: the network connector's config already has an unwedge block; use bridge.Install instead of Wrap")
	}
	w := &wrapped{NetworkConnector: m.Connector, main: m}
	m.Connector = w
	postInit := m.PostInit
	m.PostInit = func() {
		if postInit != nil {
			postInit()
		}
		w.install()
	}
}

// wrapped stands in for the bridge's network connector from Wrap until bridgev2 calls Init. It
// adds unwedge's block to the connector's config and validates it; everything else is the
// connector's. It deliberately implements no optional interface besides
// bridgev2.ConfigValidatingNetwork: mxmain asserts only that one on the connector before Init
// (validateConfig), and bridgev2.NewBridge asserts none before it calls Network.Init.
type wrapped struct {
	bridgev2.NetworkConnector
	main *mxmain.BridgeMain

	cfg     unwedge.Config
	decoded bool
}

var _ bridgev2.ConfigValidatingNetwork = (*wrapped)(nil)

// GetConfig is the connector's config with the unwedge block. The data pointer is the
// connector's own, so mxmain decodes the network section (which has one key more, ignored) and
// applies env overrides into the connector's struct as before.
func (w *wrapped) GetConfig() (string, any, up.Upgrader) {
	example, data, upgrader := w.NetworkConnector.GetConfig()
	if upgrader == nil {
		upgrader = up.NoopUpgrader
	}
	return withUnwedgeExample(example), data, up.MergeUpgraders("", upgrader, &upgradeUnwedge{spaced: strings.TrimSpace(example) != ""})
}

// withUnwedgeExample appends the unwedge block to a network example; mxmain indents the whole
// example into the network section.
func withUnwedgeExample(example string) string {
	if strings.TrimSpace(example) == "" {
		return ExampleConfig
	}
	return strings.TrimRight(example, "\n") + "\n\n" + ExampleConfig
}

// upgradeUnwedge copies the unwedge block of an existing config into the upgraded one, where the
// example's block supplies the keys the config lacks.
type upgradeUnwedge struct{ spaced bool }

func (u *upgradeUnwedge) DoUpgrade(helper up.Helper) { UpgradeConfig(helper, configKey) }

// SpacedBlocks keeps the blank line between the connector's options and the unwedge block.
func (u *upgradeUnwedge) SpacedBlocks() [][]string {
	if !u.spaced {
		return nil
	}
	return [][]string{{configKey}}
}

// ValidateConfig decodes and checks the unwedge block, then runs the connector's own check.
// mxmain calls it in Init, after the config was upgraded, so the block is always there; a
// config without one (or with keys missing) gets unwedge's defaults.
func (w *wrapped) ValidateConfig() error {
	if err := w.decode(); err != nil {
		return err
	}
	if validator, ok := w.NetworkConnector.(bridgev2.ConfigValidatingNetwork); ok {
		return validator.ValidateConfig()
	}
	return nil
}

func (w *wrapped) decode() error {
	if w.decoded {
		return nil
	}
	if w.main.Config == nil {
		return fmt.Errorf("the bridge config is not loaded yet")
	}
	cfg, err := decodeConfig(&w.main.Config.Network)
	if err != nil {
		return err
	}
	w.cfg, w.decoded = cfg, true
	return nil
}

// decodeConfig reads network.unwedge from the network section over unwedge's defaults. Its
// options are checked only when unwedge is enabled: a disabled unwedge must not keep a bridge
// from starting.
func decodeConfig(network *yaml.Node) (unwedge.Config, error) {
	cfg := unwedge.DefaultConfig()
	if node := mappingValue(network, configKey); node != nil {
		if err := node.Decode(&cfg); err != nil {
			return cfg, fmt.Errorf("failed to parse network.%s: %w", configKey, err)
		}
	}
	if cfg.Enabled {
		if err := cfg.Validate(); err != nil {
			return cfg, fmt.Errorf("invalid network.%s config: %w", configKey, err)
		}
	}
	return cfg, nil
}

// Init hands the bridge its own connector back before initializing it: bridgev2 and the Matrix
// connector type-assert br.Network (StoppableNetwork, MaxFileSizeingNetwork, ...) from here on,
// and must see the connector itself, not the wrapper.
func (w *wrapped) Init(br *bridgev2.Bridge) {
	br.Network = w.NetworkConnector
	w.main.Connector = w.NetworkConnector
	w.NetworkConnector.Init(br)
}

// install puts unwedge's helper in after the bridge's own PostInit. The config was decoded by
// ValidateConfig; a failure here means mxmain skipped it, and is a config error as there.
func (w *wrapped) install() {
	if err := w.decode(); err != nil {
		w.main.Log.WithLevel(zerolog.FatalLevel).Err(err).Msg("Configuration error")
		os.Exit(11)
	}
	Install(w.main, &w.cfg)
}

// mappingValue is the value of key in a YAML mapping (or a document holding one), or nil.
func mappingValue(node *yaml.Node, key string) *yaml.Node {
	if node.Kind == yaml.DocumentNode && len(node.Content) == 1 {
		node = node.Content[0]
	}
	if node.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(node.Content); i += 2 {
		if node.Content[i].Value == key {
			return node.Content[i+1]
		}
	}
	return nil
}

// hasTopLevelKey reports whether a YAML example has key at its top level.
func hasTopLevelKey(example, key string) bool {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(example), &doc); err != nil {
		return false
	}
	return mappingValue(&doc, key) != nil
}
