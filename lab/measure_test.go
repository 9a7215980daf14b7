package lab

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/testclient"
)

func TestWedgedLatencies(t *testing.T) {
	sent := time.Date(2026, 11, 30, 7, 0, 0, 0, time.UTC)
	after := func(ms int) time.Time { return sent.Add(time.Duration(ms) * time.Millisecond) }
	sendTimes := map[string]time.Time{"wedged-0": sent, "wedged-1": sent, "wedged-2": sent, "wedged-3": sent, "after-0": sent}
	cases := []struct {
		name         string
		bridged      map[string]time.Time
		p50, longest int64
	}{
		{"none bridged", map[string]time.Time{}, -1, -1},
		{"only after the wedge", map[string]time.Time{"after-0": after(9000)}, -1, -1},
		{"one", map[string]time.Time{"wedged-1": after(250)}, 250, 250},
		{"odd count", map[string]time.Time{"wedged-0": after(300), "wedged-1": after(100), "wedged-2": after(200)}, 200, 300},
		{"even count: the lower middle", map[string]time.Time{
			"wedged-0": after(400), "wedged-1": after(100), "wedged-2": after(300), "wedged-3": after(200), "after-0": after(5000),
		}, 200, 400},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if p50, longest := wedgedLatencies(tc.bridged, sendTimes); p50 != tc.p50 || longest != tc.longest {
				t.Errorf("wedgedLatencies = %d, %d; want %d, %d", p50, longest, tc.p50, tc.longest)
			}
		})
	}
}

func TestSynapseHoldsDown(t *testing.T) {
	const (
		before     = "2026-11-30 07:15:10,000 - synapse.appservice.scheduler - 439 - INFO - as-sender-1 - Starting recoverer for AS ID unwedge-2\n"
		started    = "2026-11-30 07:15:12,971 - synapse.appservice.scheduler - 439 - INFO - as-sender-5802 - Starting recoverer for AS ID unwedge-2\n"
		other      = "2026-11-30 07:15:13,000 - synapse.appservice.scheduler - 439 - INFO - as-sender-5803 - Starting recoverer for AS ID unwedge-22\n"
		scheduling = "2026-11-30 07:15:14,162 - synapse.appservice.scheduler - 509 - INFO - as-recoverer-265 - Scheduling retries on unwedge-2 in 2.000000s\n"
		recovered  = "2026-11-30 07:15:16,162 - synapse.appservice.scheduler - 417 - INFO - retry-90 - Successfully recovered application service AS ID unwedge-2\n"
	)
	cases := []struct {
		name string
		// head is in the log before the offset, tail after it.
		head, tail string
		down       bool
	}{
		{"no transaction failed", "", scheduling, false},
		{"a recoverer runs", "", started + scheduling, true},
		{"recovered since", "", started + scheduling + recovered, false},
		{"another appservice", "", other, false},
		{"before the offset", before, "", false},
		{"started again after recovering", "", started + recovered + started, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "synapse.log")
			if err := os.WriteFile(path, []byte(tc.head+tc.tail), 0o600); err != nil {
				t.Fatal(err)
			}
			down, err := synapseHoldsDown(path, int64(len(tc.head)), "unwedge-2")
			if err != nil || down != tc.down {
				t.Errorf("synapseHoldsDown = %t, %v; want %t", down, err, tc.down)
			}
		})
	}
	if _, err := synapseHoldsDown(filepath.Join(t.TempDir(), "missing.log"), 0, "unwedge-2"); err == nil || !strings.Contains(err.Error(), "missing.log") {
		t.Errorf("a missing log: err = %v", err)
	}
}

func TestSentInWindow(t *testing.T) {
	wedged := time.Date(2026, 12, 6, 7, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return wedged.Add(time.Duration(ms) * time.Millisecond) }
	sendTimes := map[string]time.Time{"wedged-0": at(50), "wedged-1": at(150), "wedged-2": at(250), "after-0": at(5000)}
	cases := []struct {
		name     string
		healedAt time.Time
		want     int
	}{
		{"no heal: every message", time.Time{}, 4},
		{"healed before the first", at(10), 0},
		{"healed between", at(200), 2},
		{"a message sent as the heal arrived is after it", at(150), 1},
		{"healed after the last", at(6000), 4},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := sentInWindow(sendTimes, wedged, tc.healedAt); got != tc.want {
				t.Errorf("sentInWindow = %d, want %d", got, tc.want)
			}
		})
	}
	if got := sentInWindow(map[string]time.Time{"before": at(-1)}, wedged, time.Time{}); got != 0 {
		t.Errorf("a message sent before the wedge counted: %d", got)
	}
}

func TestWindowMS(t *testing.T) {
	start := time.Date(2026, 12, 6, 7, 0, 0, 0, time.UTC)
	entry := func(msg string, ms int) logEntry {
		return logEntry{"message": msg, "time": start.Add(time.Duration(ms) * time.Millisecond).Format(time.RFC3339Nano)}
	}
	healed := start.Add(160 * time.Millisecond)
	cases := []struct {
		name     string
		entries  []logEntry
		healedAt time.Time
		want     int64
	}{
		{"no heal", []logEntry{entry(bridgeStarted, 0)}, time.Time{}, -1},
		{"no start", []logEntry{entry("Failed to decrypt to-device event", 100)}, healed, -1},
		{"from the start", []logEntry{entry("Stopping bridge", -500), entry(bridgeStarted, 0), entry("Failed to decrypt to-device event", 100)}, healed, 160},
		{"the first start counts", []logEntry{entry(bridgeStarted, 0), entry(bridgeStarted, 100)}, healed, 160},
		{"healed before the bridge started again", []logEntry{entry(bridgeStarted, 200)}, healed, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := windowMS(tc.entries, tc.healedAt); got != tc.want {
				t.Errorf("windowMS = %d, want %d", got, tc.want)
			}
		})
	}
}

// TestResultJSONKeys: other checks read the lab's JSON, so a result keeps every key it had
// (added ones are listed here too, so that none is renamed later either).
func TestResultJSONKeys(t *testing.T) {
	keys := []string{
		"name", "mode", "rules", "sent", "bridged", "lost", "remote_sent", "remote_decrypted", "remote_lost",
		"healed", "replacement_sessions", "time_to_first_bridged_ms", "olm_failures", "failure_to_first_bridged_ms",
		"bridged_wedged", "bridged_after", "remote_healed", "other_devices_remote_lost", "settled", "waited_ms",
		"wedged_bridged_p50_ms", "wedged_bridged_max_ms", "lost_before_heal", "sent_while_down", "duration_ms",
		"sent_in_window", "window_ms", "olm_history_states", "olm_history_sessions", "olm_history_bytes",
		"key_to_bridged_p50_ms", "key_to_bridged_max_ms",
	}
	data, err := json.Marshal(&Result{})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err = json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	for _, key := range keys {
		if _, ok := got[key]; !ok {
			t.Errorf("a result has no %q", key)
		}
	}
}

// TestScenarioNames: each scenario is found by its name, which --scenario and -run take.
func TestScenarioNames(t *testing.T) {
	for _, sc := range Scenarios {
		if found, ok := ScenarioByName(sc.Name); !ok || found != sc {
			t.Errorf("ScenarioByName(%q) finds another scenario or none: names must be unique", sc.Name)
		}
	}
}

// TestKeyToBridged: from the key's arrival (or the sending, if later) to bridged, over the
// bridged messages whose key arrival the log shows.
func TestKeyToBridged(t *testing.T) {
	start := time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
	received := func(session string, first float64, ms int) logEntry {
		return logEntry{"message": sessionReceived, "session_id": session, "first_known_index": first, "time": at(ms).Format(time.RFC3339Nano)}
	}
	sent := map[id.EventID]string{"$a": "wedged-0", "$b": "wedged-1", "$c": "after-0"}
	sentAt := map[id.EventID]time.Time{"$a": at(0), "$b": at(100), "$c": at(20000)}
	encryption := func(evtID id.EventID) (testclient.SentEncryption, bool) {
		enc, ok := map[id.EventID]testclient.SentEncryption{
			"$a": {SessionID: "s1", Index: 0}, "$b": {SessionID: "s1", Index: 1}, "$c": {SessionID: "s2", Index: 0},
		}[evtID]
		return enc, ok
	}
	cases := []struct {
		name         string
		entries      []logEntry
		bridged      map[string]time.Time
		p50, longest int64
	}{
		{"no arrival logged (stock)", nil, map[string]time.Time{"wedged-0": at(500)}, -1, -1},
		{"nothing bridged", []logEntry{received("s1", 0, 50)}, map[string]time.Time{}, -1, -1},
		{"key after the sending", []logEntry{received("s1", 0, 36000)},
			map[string]time.Time{"wedged-0": at(36400), "wedged-1": at(36900)}, 400, 900},
		{"key before the sending counts from the sending", []logEntry{received("s2", 0, 0)},
			map[string]time.Time{"after-0": at(20300)}, 300, 300},
		{"a copy from a later index does not hold an earlier message", []logEntry{received("s1", 1, 1000), received("s1", 0, 9000)},
			map[string]time.Time{"wedged-0": at(9200), "wedged-1": at(1500)}, 200, 500},
		{"another session's key is not the message's", []logEntry{received("s2", 0, 10)},
			map[string]time.Time{"wedged-0": at(700)}, -1, -1},
		{"a line without an index is skipped", []logEntry{{"message": sessionReceived, "session_id": "s1", "time": at(5).Format(time.RFC3339Nano)}},
			map[string]time.Time{"wedged-0": at(700)}, -1, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p50, longest := keyToBridged(tc.entries, tc.bridged, sent, sentAt, encryption)
			if p50 != tc.p50 || longest != tc.longest {
				t.Errorf("key to bridged p50/max = %d/%d ms, want %d/%d", p50, longest, tc.p50, tc.longest)
			}
		})
	}
}
