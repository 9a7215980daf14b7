package bridge

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	up "go.mau.fi/util/configupgrade"
	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// configLeaves lists the leaf keys of unwedge.Config by its yaml tags, nested blocks joined
// with dots: the options an admin can set.
func configLeaves(typ reflect.Type, prefix string) []string {
	var keys []string
	for field := range typ.Fields() {
		name, _, _ := strings.Cut(field.Tag.Get("yaml"), ",")
		if field.Type.Kind() == reflect.Struct {
			keys = append(keys, configLeaves(field.Type, prefix+name+".")...)
		} else {
			keys = append(keys, prefix+name)
		}
	}
	return keys
}

// copyRecorder is an upgrade helper that records which keys an upgrader copies.
type copyRecorder struct {
	up.Helper
	copied []string
}

func (r *copyRecorder) Copy(_ up.YAMLType, path ...string) {
	r.copied = append(r.copied, strings.Join(path, "."))
}

// TestUpgradeConfigCopiesEveryKey: the upgrader copies every option of unwedge.Config, so an
// admin's value is never replaced by the example's (security finding 20: it lost
// recovery.max_pending_per_room and recovery.max_pending). The count makes a new option a
// conscious change here.
func TestUpgradeConfigCopiesEveryKey(t *testing.T) {
	const leafKeys = 24
	want := configLeaves(reflect.TypeFor[unwedge.Config](), "unwedge.")
	if len(want) != leafKeys {
		t.Errorf("unwedge.Config has %d options, this test knows %d: check the example config, the admin guide and this count", len(want), leafKeys)
	}
	rec := &copyRecorder{}
	UpgradeConfig(rec, "unwedge")
	slices.Sort(want)
	slices.Sort(rec.copied)
	if !slices.Equal(rec.copied, want) {
		for _, key := range want {
			if !slices.Contains(rec.copied, key) {
				t.Errorf("the upgrader does not copy %s", key)
			}
		}
		t.Errorf("the upgrader copies %v, the config has %v", rec.copied, want)
	}
}

// TestUpgradeConfigRoundTrip: an admin's config keeps every unwedge value through the upgrade
// mxmain runs at each start, with the example config a wrapped bridge writes (-e).
func TestUpgradeConfigRoundTrip(t *testing.T) {
	changed := unwedge.Config{
		Enabled:           false,
		MinInterval:       90 * time.Minute,
		Scope:             unwedge.ScopePortalMembers,
		MaxHealsPerUser:   3,
		MaxHealsPerMinute: 50,
		MaxRetries:        2,
		MinBackoff:        2 * time.Second,
		MaxBackoff:        3 * time.Minute,
		Lease:             5 * time.Minute,
		HistoryRetention:  48 * time.Hour,
		Startup:           unwedge.StartupConfig{Enabled: false, Wait: 10 * time.Second},
		AppserviceInbox:   false,
		Recovery: unwedge.RecoveryConfig{
			Enabled:           false,
			Retention:         72 * time.Hour,
			KeyRequests:       4,
			MinBackoff:        time.Minute,
			MaxBackoff:        2 * time.Hour,
			MaxPendingPerUser: 100,
			MaxPendingPerRoom: 400,
			MaxPending:        900,
		},
		Metrics: unwedge.MetricsConfig{Enabled: true, Listen: "127.0.0.1:9999"},
	}
	// Limits above the defaults: losing max_pending_per_room and max_pending made Validate
	// refuse them, and the bridge did not start.
	raised := unwedge.DefaultConfig()
	raised.Recovery.MaxPendingPerUser, raised.Recovery.MaxPendingPerRoom, raised.Recovery.MaxPending = 8000, 16000, 64000

	defaults := reflect.ValueOf(unwedge.DefaultConfig())
	for _, leaf := range leafValues(reflect.ValueOf(changed)) {
		if leaf.value.Equal(fieldByPath(defaults, leaf.path)) {
			t.Fatalf("the changed config keeps %s at its default", strings.Join(leaf.path, "."))
		}
	}
	for _, tc := range []struct {
		name string
		want unwedge.Config
	}{
		{"every option changed", changed},
		{"raised pending limits", raised},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.yaml")
			m := &mxmain.BridgeMain{Connector: newFake(), ConfigPath: path, SaveConfig: true}
			Wrap(m)
			// A config without any key upgrades to the example config, which LoadConfig saves:
			// what -e writes.
			if err := os.WriteFile(path, []byte("{}\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			m.LoadConfig()
			example, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			// The admin sets every option of the example's unwedge block.
			var doc yaml.Node
			if err = yaml.Unmarshal(example, &doc); err != nil {
				t.Fatal(err)
			}
			block := mappingValue(mappingValue(&doc, "network"), configKey)
			if block == nil {
				t.Fatalf("the example config has no network.%s block:\n%s", configKey, example)
			}
			var set yaml.Node
			if err = set.Encode(tc.want); err != nil {
				t.Fatal(err)
			}
			replaced := replaceLeaves(t, block, &set, "")
			if replaced != len(leafValues(reflect.ValueOf(tc.want))) {
				t.Fatalf("the example's block has %d of the options", replaced)
			}
			admin, err := yaml.Marshal(&doc)
			if err != nil {
				t.Fatal(err)
			}
			if err = os.WriteFile(path, admin, 0o600); err != nil {
				t.Fatal(err)
			}

			m.LoadConfig()
			if err = m.Connector.(*wrapped).ValidateConfig(); err != nil {
				t.Fatalf("the upgraded config is refused: %v", err)
			}
			if got := m.Connector.(*wrapped).cfg; got != tc.want {
				for _, leaf := range leafValues(reflect.ValueOf(tc.want)) {
					if g := fieldByPath(reflect.ValueOf(got), leaf.path); !g.Equal(leaf.value) {
						t.Errorf("%s = %v after the upgrade, the admin set %v", strings.Join(leaf.path, "."), g, leaf.value)
					}
				}
			}
		})
	}
}

type leafValue struct {
	path  []string
	value reflect.Value
}

// leafValues are the non-struct fields of a config value, by their field names.
func leafValues(v reflect.Value) []leafValue {
	var out []leafValue
	for i := range v.NumField() {
		field := v.Type().Field(i)
		if field.Type.Kind() == reflect.Struct {
			for _, leaf := range leafValues(v.Field(i)) {
				out = append(out, leafValue{append([]string{field.Name}, leaf.path...), leaf.value})
			}
			continue
		}
		out = append(out, leafValue{[]string{field.Name}, v.Field(i)})
	}
	return out
}

func fieldByPath(v reflect.Value, path []string) reflect.Value {
	for _, name := range path {
		v = v.FieldByName(name)
	}
	return v
}

// replaceLeaves sets the scalar values of block to those of set, key by key, and returns how
// many it set; the comments of block stay.
func replaceLeaves(t *testing.T, block, set *yaml.Node, prefix string) int {
	t.Helper()
	n := 0
	for i := 0; i+1 < len(block.Content); i += 2 {
		key, value := block.Content[i].Value, block.Content[i+1]
		want := mappingValue(set, key)
		if want == nil {
			t.Fatalf("the example has %s%s, unwedge.Config does not", prefix, key)
		}
		if value.Kind == yaml.MappingNode {
			n += replaceLeaves(t, value, want, prefix+key+".")
			continue
		}
		value.Value, value.Tag, value.Style = want.Value, want.Tag, want.Style
		n++
	}
	return n
}

// TestConfigUpgradeKeys: each kind of option gets the YAML type its values are written as, and
// an option the upgrader cannot copy stops the bridge at start instead of being skipped.
func TestConfigUpgradeKeys(t *testing.T) {
	type mode string
	type nested struct {
		Wait time.Duration `yaml:"wait"`
	}
	cases := []struct {
		name string
		typ  reflect.Type
		want []upgradeKey // nil: panics
	}{
		{"supported kinds", reflect.TypeFor[struct {
			On     bool   `yaml:"on"`
			Count  int64  `yaml:"count"`
			Size   uint   `yaml:"size"`
			Mode   mode   `yaml:"mode"`
			Nested nested `yaml:"nested"`
			Hidden int    `yaml:"-"`
		}](), []upgradeKey{{[]string{"on"}, up.Bool}, {[]string{"count"}, up.Int}, {[]string{"size"}, up.Int},
			{[]string{"mode"}, up.Str}, {[]string{"nested", "wait"}, up.Str}}},
		{"float", reflect.TypeFor[struct {
			Ratio float64 `yaml:"ratio"`
		}](), nil},
		{"list", reflect.TypeFor[struct {
			Rooms []string `yaml:"rooms"`
		}](), nil},
		{"map", reflect.TypeFor[struct {
			Limits map[string]int `yaml:"limits"`
		}](), nil},
		{"pointer", reflect.TypeFor[struct {
			Wait *time.Duration `yaml:"wait"`
		}](), nil},
		{"untagged", reflect.TypeFor[struct{ Enabled bool }](), nil},
		{"inline", reflect.TypeFor[struct {
			Nested nested `yaml:",inline"`
		}](), nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if r := recover(); (r != nil) != (tc.want == nil) {
					t.Errorf("panic: %v, want one: %t", r, tc.want == nil)
				}
			}()
			if got := configUpgradeKeys(tc.typ, nil); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("keys = %v, want %v", got, tc.want)
			}
		})
	}
}
