// Package lab is the wedge lab: it drives the real local stack (Postgres, Synapse, the reference
// bridge, E2EE test clients) through each way an Olm session between a user's device and the
// bridge's device breaks, while the user keeps chatting in an encrypted portal (or, with no login,
// sends commands to the bridge bot in their management room), and measures what reaches the other
// side in both directions.
package lab

import (
	"context"
	"time"

	"github.com/unwedge/unwedge/internal/testclient"
)

// Mode is how the bridge handles wedged sessions.
type Mode string

const (
	// ModeStock is mautrix-go's own behaviour: the bridge binary without unwedge installed.
	ModeStock Mode = "stock"
	// ModeUnwedge is the bridge with the unwedge middleware.
	ModeUnwedge Mode = "unwedge"
)

// Available reports whether the mode can run in this build.
func (m Mode) Available() bool {
	return m == ModeStock || m == ModeUnwedge
}

// Config sets the size and timing of a lab run.
type Config struct {
	// K messages are sent in each direction while wedged, and K more after.
	K int
	// Deadline is the longest the lab waits after the last message for messages still on their
	// way (stock bridgev2 gives up on an undecryptable event after about 25 s; unwedge's recovery
	// takes over 30 s after the bridge first saw it, and a bridge tries the events of a room one
	// at a time). The wait ends earlier once every message is accounted for (Result.Settled).
	Deadline time.Duration
	// HealWindow separates the wedged phase from the after phase.
	HealWindow time.Duration
	// Parallel scenarios run at once (each takes one bridge slot).
	Parallel int
	// Appservice runs the bridge's encryption in appservice mode (to-device events in
	// transactions, MSC2409/MSC3202) instead of the bot device's /sync.
	Appservice bool
	// BridgeConfig sets options of the bridge's config in unwedge mode (dotted paths, as
	// harness.BridgeOptions.Config), for example to measure reactive healing alone.
	BridgeConfig map[string]any
	// Rules are the key-sharing rules of the user's devices (docs/testclient-rules.md): every
	// scenario runs under each, in this order. Empty means DefaultRules.
	Rules []testclient.Rules
	// Binary is the built reference bridge; WorkDir holds each run's bridge and client files.
	Binary  string
	WorkDir string
	// Inspect, if set, runs at the end of each scenario, before its world is torn down (tests
	// use it to read the bridge's metrics and command replies).
	Inspect func(ctx context.Context, w *World, res *Result) error
}

// DefaultRules is the rule set the lab runs under when Config.Rules is empty: mautrix-go's own
// (testclient.RulesMautrix), the only one the lab had before it ran under Element's rules, so
// that a run without rules measures what it always did.
var DefaultRules = []testclient.Rules{testclient.RulesMautrix}

// AllRules are every rule set the test client has: mautrix-go's, Element Web's and Element X's.
var AllRules = []testclient.Rules{testclient.RulesMautrix, testclient.RulesElementWeb, testclient.RulesElementX}

// QuickConfig is a small run for tests and --quick.
func QuickConfig() Config {
	return Config{K: 3, Deadline: 45 * time.Second, HealWindow: 4 * time.Second, Parallel: 2}
}

// FullConfig is the default run.
func FullConfig() Config {
	return Config{K: 10, Deadline: 45 * time.Second, HealWindow: 5 * time.Second, Parallel: 2}
}

// Result is one scenario under one rule set in one mode. Its JSON keys are read by other checks:
// keep them stable and add new keys rather than renaming.
type Result struct {
	Name string `json:"name"`
	Mode Mode   `json:"mode"`
	// Rules are the key-sharing rules the user's devices followed.
	Rules testclient.Rules `json:"rules"`
	// Matrix -> remote: messages the wedged device sent, and how many reached the webhook. In a
	// management room (Scenario.Management): commands sent, and how many the bot handled.
	Sent    int `json:"sent"`
	Bridged int `json:"bridged"`
	Lost    int `json:"lost"`
	// Remote -> Matrix: messages posted on the webhook side, and how many the wedged device
	// decrypted. In a management room: the bot's answers (one per handled command), and how many
	// the device decrypted.
	RemoteSent      int `json:"remote_sent"`
	RemoteDecrypted int `json:"remote_decrypted"`
	RemoteLost      int `json:"remote_lost"`
	// Healed: every message the device sent after the wedge was bridged, with no human action.
	Healed bool `json:"healed"`
	// ReplacementSessions the bridge created with the wedged device after the wedge.
	ReplacementSessions int `json:"replacement_sessions"`
	// TimeToFirstBridgedMS is from the first message sent while wedged to the first message after
	// it that reached the webhook; -1 when none did.
	TimeToFirstBridgedMS int64 `json:"time_to_first_bridged_ms"`

	// OlmFailures counts to-device events the bridge could not decrypt after the wedge (an Olm
	// message it had decrypted already and was handed again is not one).
	OlmFailures int `json:"olm_failures"`
	// FailureToFirstBridgedMS is from the bridge's first Olm failure after the wedge to the first
	// message that reached the webhook after it: the heal as the bridge sees it, without the
	// device's own time to send. -1 without a failure or without a message after it.
	FailureToFirstBridgedMS int64 `json:"failure_to_first_bridged_ms"`
	// BridgedWedged and BridgedAfter split Bridged by phase.
	BridgedWedged int `json:"bridged_wedged"`
	BridgedAfter  int `json:"bridged_after"`
	// RemoteHealed: every remote message posted after the wedge was decrypted by the device.
	RemoteHealed bool `json:"remote_healed"`
	// OtherDevicesRemoteLost counts remote messages the user's healthy devices could not decrypt
	// (many-devices only).
	OtherDevicesRemoteLost int `json:"other_devices_remote_lost"`
	// Settled: the wait after the last message ended because every message of both phases was
	// accounted for: it arrived, or (stock mode) it can no longer arrive, as bridgev2 gave up on
	// it. False when Config.Deadline ended the wait: then lost means not arrived by then.
	Settled bool `json:"settled"`
	// WaitedMS is how long the lab waited after the last message.
	WaitedMS int64 `json:"waited_ms"`
	// WedgedBridgedP50MS and WedgedBridgedMaxMS are the median (the lower middle one of an even
	// count) and the longest time from sent to bridged of the wedged phase's messages that were
	// bridged; -1 when none was.
	WedgedBridgedP50MS int64 `json:"wedged_bridged_p50_ms"`
	WedgedBridgedMaxMS int64 `json:"wedged_bridged_max_ms"`
	// KeyToBridgedP50MS and KeyToBridgedMaxMS are the median (the lower middle one of an even
	// count) and the longest time from the moment the bridge held a bridged message's room key
	// (from the message's index or earlier; or, for a key it held before the message was sent,
	// from the sending) to the remote side having the message, over the messages of both phases;
	// Element Web's grace period is 4000 ms. The key's arrival is read from the bridge's log
	// (Recovery's "Megolm session received"), so a stock bridge, which writes no such line, has
	// -1 and -1, as has a result with no bridged message.
	KeyToBridgedP50MS int64 `json:"key_to_bridged_p50_ms"`
	KeyToBridgedMaxMS int64 `json:"key_to_bridged_max_ms"`
	// LostBeforeHeal counts the lost messages (Matrix -> remote, both phases) that were lost
	// before the bridge could heal: the bridge never got their room key, and no copy of it that
	// could decrypt them left the device after the device got the bridge's replacement Olm
	// session (or the bridge made none). Every copy went over the broken Olm session, or to a
	// bridge that was down, and nobody sent it again (see lostBeforeHeal and docs/baseline.md).
	// Lost minus LostBeforeHeal is what the bridge lost although a key came after the heal.
	LostBeforeHeal int `json:"lost_before_heal"`
	// SentInWindow counts the device's messages (Matrix -> remote, both phases) sent in the
	// window between the wedge and the heal as the device sees it: after the wedge, and before
	// the device received the bridge's replacement Olm session (the first Olm session the
	// bridge's device started with it since the wedge, when the device decrypted its pre-key
	// message; the moment lostBeforeHeal also uses). Every message if no replacement came. A
	// room key the device sends in the window can go only over the broken session; after it,
	// the device re-shares or sends keys over the new one. When the bridge's crypto state went
	// back to a backup, the message keys of the broken session were random and made after the
	// backup: no bridge can decrypt what went over it, so a message in the window is lost
	// unless its key is sent again (docs/baseline.md, "The window after a bridge restore").
	SentInWindow int `json:"sent_in_window"`
	// OlmHistoryStates, OlmHistorySessions and OlmHistoryBytes are what the bridge's Olm history
	// (unwedge.olm_history) holds at the scenario's end: states, of how many Olm sessions, and
	// the bytes of their pickles (unwedge mode only; 0 in stock mode).
	OlmHistoryStates   int   `json:"olm_history_states"`
	OlmHistorySessions int   `json:"olm_history_sessions"`
	OlmHistoryBytes    int64 `json:"olm_history_bytes"`
	// WindowMS is the window's length as the bridge makes it: from the first start of the
	// bridge process after the wedge (its "Starting bridge" log line; every scenario restarts
	// the bridge after its wedge) to the device's receipt of the replacement session. -1 when no
	// replacement came.
	WindowMS int64 `json:"window_ms"`
	// SentWhileDown counts the device's messages sent while the lab had the bridge stopped.
	SentWhileDown int `json:"sent_while_down"`
	// DurationMS is the scenario's wall time.
	DurationMS int64 `json:"duration_ms"`
	// Error is set when the scenario could not run to the end.
	Error string `json:"error,omitempty"`
}

// Report is the lab's JSON output.
type Report struct {
	Scenarios []*Result `json:"scenarios"`
	// UnavailableModes were asked for but cannot run in this build.
	UnavailableModes []Mode `json:"unavailable_modes,omitempty"`
	K                int    `json:"k"`
	// Rules are the rule sets every scenario ran under.
	Rules []testclient.Rules `json:"rules"`
	// BridgeConfig is Config.BridgeConfig: options the unwedge-mode bridge ran with.
	BridgeConfig map[string]any `json:"bridge_config,omitempty"`
	// Transport is how the bridge received to-device events: "sync" or "appservice".
	Transport string `json:"transport"`
}
