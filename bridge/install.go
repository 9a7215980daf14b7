package bridge

import (
	_ "embed"
	"fmt"
	"reflect"
	"strings"
	"time"

	up "go.mau.fi/util/configupgrade"
	"maunium.net/go/mautrix/bridgev2/commands"
	"maunium.net/go/mautrix/bridgev2/matrix/mxmain"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// ExampleConfig is the documented `unwedge:` block, for a bridge's example config.
//
//go:embed example-config.yaml
var ExampleConfig string

// UpgradeConfig copies the `unwedge:` block at prefix (for example "unwedge" under the network
// section) in a bridge's config upgrader, so old configs keep working and new keys get defaults.
func UpgradeConfig(helper up.Helper, prefix ...string) {
	for _, key := range upgradeKeys {
		helper.Copy(key.typ, append(append([]string{}, prefix...), key.path...)...)
	}
}

// upgradeKey is one option of the `unwedge:` block and the YAML type its value has.
type upgradeKey struct {
	path []string
	typ  up.YAMLType
}

// upgradeKeys are derived from unwedge.Config rather than listed by hand: a hand-kept list missed
// recovery.max_pending_per_room and recovery.max_pending, so an upgrade put the admin's limits
// back to the defaults (and raised ones then failed Validate, keeping the bridge from starting).
var upgradeKeys = configUpgradeKeys(reflect.TypeFor[unwedge.Config](), nil)

// configUpgradeKeys walks a config struct's yaml tags. A field of a type it cannot copy panics,
// at package initialization: a new option must never be skipped by the upgrader unnoticed.
func configUpgradeKeys(typ reflect.Type, parent []string) []upgradeKey {
	var keys []upgradeKey
	for field := range typ.Fields() {
		name, flags, _ := strings.Cut(field.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		path := append(append([]string{}, parent...), name)
		// yaml.v3 would read an untagged field under its lower-cased name and an inline one from
		// the parent block: the upgrader would copy neither where the example has it.
		if name == "" || !field.IsExported() || flags != "" && flags != "omitempty" {
			panic(fmt.Sprintf("bridge: config field %s.%s needs a plain yaml tag for the upgrader", typ, field.Name))
		}
		if field.Type == reflect.TypeFor[time.Duration]() {
			// yaml.v3 reads durations from strings such as "1h" only.
			keys = append(keys, upgradeKey{path, up.Str})
			continue
		}
		switch field.Type.Kind() {
		case reflect.Struct:
			keys = append(keys, configUpgradeKeys(field.Type, path)...)
		case reflect.Bool:
			keys = append(keys, upgradeKey{path, up.Bool})
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
			reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			keys = append(keys, upgradeKey{path, up.Int})
		case reflect.String:
			keys = append(keys, upgradeKey{path, up.Str})
		default:
			panic(fmt.Sprintf("bridge: the config upgrader cannot copy %s (%s, field %s.%s)", strings.Join(path, "."), field.Type, typ, field.Name))
		}
	}
	return keys
}

// Install puts unwedge into a bridge made with mxmain: call it from BridgeMain.PostInit, after
// the Matrix connector made its encryption helper and before it starts it. With unwedge disabled,
// or encryption not allowed, the bridge keeps mautrix-go's own helper untouched.
//
//	m.PostInit = func() { bridge.Install(m, &connector.Config.Unwedge) }
func Install(m *mxmain.BridgeMain, cfg *unwedge.Config) *Helper {
	if !cfg.Enabled || m.Matrix.Crypto == nil {
		return nil
	}
	helper := NewHelper(m.Matrix, *cfg)
	m.Matrix.Crypto = helper
	if proc, ok := m.Bridge.Commands.(*commands.Processor); ok {
		proc.AddHandlers(helper.CommandHandler())
	}
	m.Log.Info().Str("unwedge_version", Version).Str("scope", string(cfg.Scope)).Stringer("min_interval", cfg.MinInterval).Msg("Installed unwedge encryption helper")
	return helper
}
