package bridge

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	up "go.mau.fi/util/configupgrade"
	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/bridgeconfig"
	"maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// fakeConnector is a network connector that knows nothing of unwedge, with a config of its own
// and one optional interface besides config validation.
type fakeConnector struct {
	Config struct {
		Greeting string `yaml:"greeting"`
	}
	example     string
	validateErr error
	validated   bool
	initWith    *bridgev2.Bridge
}

func (f *fakeConnector) Init(br *bridgev2.Bridge)    { f.initWith = br }
func (f *fakeConnector) Start(context.Context) error { return nil }
func (f *fakeConnector) Stop()                       {}
func (f *fakeConnector) GetName() bridgev2.BridgeName {
	return bridgev2.BridgeName{DisplayName: "Fake"}
}
func (f *fakeConnector) GetDBMetaTypes() database.MetaTypes { return database.MetaTypes{} }
func (f *fakeConnector) GetCapabilities() *bridgev2.NetworkGeneralCapabilities {
	return &bridgev2.NetworkGeneralCapabilities{}
}
func (f *fakeConnector) GetBridgeInfoVersion() (int, int) { return 1, 1 }
func (f *fakeConnector) LoadUserLogin(context.Context, *bridgev2.UserLogin) error {
	return nil
}
func (f *fakeConnector) GetLoginFlows() []bridgev2.LoginFlow { return nil }
func (f *fakeConnector) CreateLogin(context.Context, *bridgev2.User, string) (bridgev2.LoginProcess, error) {
	return nil, errors.New("no logins")
}
func (f *fakeConnector) GetConfig() (string, any, up.Upgrader) {
	return f.example, &f.Config, up.SimpleUpgrader(func(helper up.Helper) { helper.Copy(up.Str, "greeting") })
}
func (f *fakeConnector) ValidateConfig() error {
	f.validated = true
	return f.validateErr
}

func newFake() *fakeConnector {
	return &fakeConnector{example: "# A greeting.\ngreeting: hello\n"}
}

// upgradeNetwork upgrades a config's network section as mxmain's LoadConfig does: the example's
// network section is the base, the connector's upgrader copies under the "network" prefix.
func upgradeNetwork(t *testing.T, conn bridgev2.NetworkConnector, config string) *yaml.Node {
	t.Helper()
	example, _, upgrader := conn.GetConfig()
	var base strings.Builder
	base.WriteString("network:\n")
	for line := range strings.SplitSeq(example, "\n") {
		base.WriteString("    " + line + "\n")
	}
	merged := up.MergeUpgraders(base.String(), &up.ProxyUpgrader{Target: upgrader, Prefix: []string{"network"}})
	out, err := up.DoBytes([]byte(config), merged)
	if err != nil {
		t.Fatalf("upgrade failed: %v\n%s", err, base.String())
	}
	var cfg bridgeconfig.Config
	if err = yaml.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg.Network
}

func TestWrapConfig(t *testing.T) {
	fake := newFake()
	m := &mxmain.BridgeMain{Connector: fake}
	Wrap(m)
	example, data, _ := m.Connector.GetConfig()
	if data != &fake.Config {
		t.Error("the wrapper changed the connector's config data pointer")
	}
	if !strings.HasPrefix(example, fake.example) || !strings.HasSuffix(example, ExampleConfig) {
		t.Errorf("example is not the connector's followed by unwedge's:\n%s", example)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(example), &doc); err != nil || mappingValue(&doc, "unwedge") == nil || mappingValue(&doc, "greeting") == nil {
		t.Fatalf("example has no greeting and unwedge keys (%v):\n%s", err, example)
	}

	// An old config: the user's values (the connector's and unwedge's) are kept, missing keys come
	// from the example.
	network := upgradeNetwork(t, m.Connector, "network:\n    greeting: hi\n    unwedge:\n        min_interval: 2h\n        scope: logged_in\n")
	if err := network.Decode(&fake.Config); err != nil || fake.Config.Greeting != "hi" {
		t.Errorf("connector's value lost: %q (%v)", fake.Config.Greeting, err)
	}
	cfg, err := decodeConfig(network)
	if err != nil {
		t.Fatal(err)
	}
	want := unwedge.DefaultConfig()
	want.MinInterval, want.Scope = 2*time.Hour, unwedge.ScopeLoggedIn
	if cfg != want {
		t.Errorf("unwedge config = %+v, want %+v", cfg, want)
	}
	if mappingValue(mappingValue(network, "unwedge"), "max_retries") == nil {
		t.Error("the upgrade did not add unwedge.max_retries")
	}
}

func TestWrapValidateConfig(t *testing.T) {
	cases := []struct {
		name, network string
		fakeErr       error
		wantErr       string
		wantEnabled   bool
	}{
		{"defaults without a block", "greeting: hi\n", nil, "", true},
		{"bad unwedge option", "unwedge:\n    min_interval: 0s\n", nil, "unwedge.min_interval must be positive", true},
		{"bad option, unwedge disabled", "unwedge:\n    enabled: false\n    min_interval: 0s\n", nil, "", false},
		{"not YAML for unwedge", "unwedge:\n    min_interval: [1]\n", nil, "failed to parse network.unwedge", true},
		{"connector's own error", "greeting: hi\n", errors.New("greeting is rude"), "greeting is rude", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFake()
			fake.validateErr = tc.fakeErr
			m := &mxmain.BridgeMain{Connector: fake, Config: &bridgeconfig.Config{}}
			if err := yaml.Unmarshal([]byte(tc.network), &m.Config.Network); err != nil {
				t.Fatal(err)
			}
			Wrap(m)
			validator, ok := m.Connector.(bridgev2.ConfigValidatingNetwork)
			if !ok {
				t.Fatal("the wrapper does not validate config")
			}
			err := validator.ValidateConfig()
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("ValidateConfig() = %v, want %q", err, tc.wantErr)
			}
			if err == nil && !fake.validated {
				t.Error("the connector's ValidateConfig was not called")
			}
			if w := m.Connector.(*wrapped); err == nil && w.cfg.Enabled != tc.wantEnabled {
				t.Errorf("enabled = %t, want %t", w.cfg.Enabled, tc.wantEnabled)
			}
		})
	}
}

// TestWrapInit: from Init on, the bridge and mxmain hold the connector itself, so bridgev2's
// type assertions (StoppableNetwork here) see it; PostInit runs the bridge's own first.
func TestWrapInit(t *testing.T) {
	fake := newFake()
	var ownPostInit bool
	m := &mxmain.BridgeMain{Connector: fake, PostInit: func() { ownPostInit = true }, Config: &bridgeconfig.Config{}}
	if err := yaml.Unmarshal([]byte("unwedge:\n    enabled: false\n"), &m.Config.Network); err != nil {
		t.Fatal(err)
	}
	Wrap(m)
	Wrap(m) // a second call changes nothing
	w, ok := m.Connector.(*wrapped)
	if !ok || w.NetworkConnector != fake {
		t.Fatalf("connector = %T, want the wrapper around the fake", m.Connector)
	}
	br := &bridgev2.Bridge{Network: m.Connector}
	br.Network.Init(br)
	if br.Network != fake || m.Connector != fake || fake.initWith != br {
		t.Errorf("after Init: br.Network %T, m.Connector %T, connector initialized: %t", br.Network, m.Connector, fake.initWith == br)
	}
	if _, ok := br.Network.(bridgev2.StoppableNetwork); !ok {
		t.Error("the connector's optional interfaces are hidden after Init")
	}
	if err := w.ValidateConfig(); err != nil {
		t.Fatal(err)
	}
	m.PostInit() // unwedge disabled: Install leaves the bridge alone
	if !ownPostInit {
		t.Error("the bridge's own PostInit did not run")
	}
}

func TestWrapRefusesUnwedgeConnector(t *testing.T) {
	fake := newFake()
	fake.example += ExampleConfig
	defer func() {
		if recover() == nil {
			t.Error("Wrap accepted a connector that has an unwedge block of its own")
		}
	}()
	Wrap(&mxmain.BridgeMain{Connector: fake})
}
