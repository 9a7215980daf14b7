package bridge

import (
	_ "embed"

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
	path := func(keys ...string) []string { return append(append([]string{}, prefix...), keys...) }
	helper.Copy(up.Bool, path("enabled")...)
	helper.Copy(up.Str, path("min_interval")...)
	helper.Copy(up.Str, path("scope")...)
	helper.Copy(up.Int, path("max_heals_per_user")...)
	helper.Copy(up.Int, path("max_heals_per_minute")...)
	helper.Copy(up.Int, path("max_retries")...)
	helper.Copy(up.Str, path("min_backoff")...)
	helper.Copy(up.Str, path("max_backoff")...)
	helper.Copy(up.Str, path("lease")...)
	helper.Copy(up.Str, path("history_retention")...)
	helper.Copy(up.Bool, path("startup", "enabled")...)
	helper.Copy(up.Str, path("startup", "wait")...)
	helper.Copy(up.Bool, path("appservice_inbox")...)
	helper.Copy(up.Bool, path("recovery", "enabled")...)
	helper.Copy(up.Str, path("recovery", "retention")...)
	helper.Copy(up.Int, path("recovery", "key_requests")...)
	helper.Copy(up.Str, path("recovery", "min_backoff")...)
	helper.Copy(up.Str, path("recovery", "max_backoff")...)
	helper.Copy(up.Int, path("recovery", "max_pending_per_user")...)
	helper.Copy(up.Bool, path("metrics", "enabled")...)
	helper.Copy(up.Str, path("metrics", "listen")...)
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
