package lab

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestLabAdmin runs a wedge scenario and checks that what an admin sees, the metrics endpoint and
// the `unwedge` command's answers, matches what happened according to the bridge's own log and
// the lab's measurement; then an admin forces a heal and sees it counted and recorded. The
// command answers only in the user's management room.
func TestLabAdmin(t *testing.T) {
	t.Parallel()
	env, ctx, cfg := setupLab(t, 10*time.Minute)
	// The heals at startup are off: with them the bridge replaces the one-time keys its account
	// lost before the device claims one, and nothing wedges; this test reads what an admin sees
	// of a reactive heal (as TestLabAppservice measures it).
	cfg.BridgeConfig = map[string]any{"network.unwedge.startup.enabled": false}
	sc, _ := ScenarioByName("expired-one-time-key")
	inspected := false
	cfg.Inspect = func(ctx context.Context, w *World, res *Result) error {
		inspected = true
		metrics, err := w.Metrics(ctx)
		if err != nil {
			return err
		}
		// The counters start with the bridge process: compare with its log since its last start.
		failures, err := w.failuresSinceLastStart()
		if err != nil {
			return err
		}
		var failureMetric float64
		for series, value := range metrics {
			if strings.HasPrefix(series, "unwedge_olm_failures_total{") {
				failureMetric += value
			}
		}
		checks := []struct {
			what      string
			got, want float64
		}{
			{"Olm failures (log: Failed to decrypt to-device event)", failureMetric, float64(failures)},
			{"heals succeeded (lab: replacement sessions)", metrics[`unwedge_heals_total{result="succeeded"}`], float64(res.ReplacementSessions)},
			{"heals attempted", metrics[`unwedge_heals_total{result="attempted"}`], float64(res.ReplacementSessions)},
			{"heal durations observed", metrics["unwedge_heal_duration_seconds_count"], float64(res.ReplacementSessions)},
		}
		for _, c := range checks {
			if c.got != c.want {
				t.Errorf("%s: metric %v, want %v", c.what, c.got, c.want)
			}
		}
		// `unwedge` answers only in the user's management room; in the portal it says so and
		// names no device.
		device := string(w.Wedged().DeviceID())
		inPortal, err := w.Command(ctx, "unwedge status", "management room")
		if err != nil {
			return err
		} else if strings.Contains(inPortal, device) {
			t.Errorf("`unwedge status` in the portal names the device:\n%s", inPortal)
		}
		mgmt, err := w.ManagementRoom(ctx)
		if err != nil {
			return err
		}
		command := func(command, want string) (string, error) { return w.CommandIn(ctx, mgmt, command, want) }

		// The pending gauge and the pending command read the same table: they must agree. (Not
		// necessarily zero: an event the bridge was waiting for when the lab restarted it stays
		// there until its hand-over time, then it is bridged.)
		pendingAll, err := command("unwedge pending all", "waiting for their keys")
		if err != nil {
			return err
		}
		if listed := strings.Count(pendingAll, "\n* `$"); float64(listed) != metrics["unwedge_pending_events"] {
			t.Errorf("pending gauge %v, but `unwedge pending all` lists %d:\n%s", metrics["unwedge_pending_events"], listed, pendingAll)
		}
		events := func(result string) float64 {
			return metrics[fmt.Sprintf("unwedge_undecryptable_events_total{result=%q}", result)]
		}
		if events("recorded") < 1 || events("recorded") < events("decrypted_by_bridge")+events("recovered") {
			t.Errorf("undecryptable events: recorded %v, decrypted by bridgev2 %v, recovered %v", events("recorded"), events("decrypted_by_bridge"), events("recovered"))
		}
		if metrics[`unwedge_olm_failures_total{class="prekey_unknown_otk"}`] < 1 {
			t.Errorf("no prekey_unknown_otk failure in the metrics: %v", metrics)
		}

		status, err := command("unwedge status", "unwedge status of")
		if err != nil {
			return err
		}
		for _, want := range []string{device, "last replacement session: healed (prekey_unknown_otk)", "Messages waiting for their keys: "} {
			if !strings.Contains(status, want) {
				t.Errorf("status answer lacks %q:\n%s", want, status)
			}
		}

		// Within the hour a heal is limited, unless an admin forces it: then it happens, is
		// counted and says who forced it; forced again at once, it is refused.
		user := w.Wedged().UserID()
		if _, err = command(fmt.Sprintf("unwedge heal %s %s", user, device), "Not healed"); err != nil {
			return err
		}
		if _, err = command(fmt.Sprintf("unwedge heal --force %s %s", user, device), "Created a new Olm session"); err != nil {
			return err
		}
		if _, err = command(fmt.Sprintf("unwedge heal --force %s %s", user, device), "at most one forced heal per"); err != nil {
			return err
		}
		if metrics, err = w.Metrics(ctx); err != nil {
			return err
		}
		if got := metrics[`unwedge_heals_total{result="succeeded"}`]; got != float64(res.ReplacementSessions+1) {
			t.Errorf("after a forced heal %v heals succeeded, want %d", got, res.ReplacementSessions+1)
		}
		if got := metrics[fmt.Sprintf(`unwedge_olm_failures_total{class=%q}`, unwedge.ClassForced)]; got != 0 {
			t.Errorf("a forced heal counted as an Olm failure")
		}
		status, err = command("unwedge status "+string(user), "unwedge status of")
		if err != nil {
			return err
		}
		if want := "healed (forced)"; !strings.Contains(status, want) || !strings.Contains(status, "forced by "+string(user)) {
			t.Errorf("status after the forced heal lacks %q and who forced it:\n%s", want, status)
		}
		return nil
	}
	report := Run(ctx, env, cfg, []*Scenario{sc}, []Mode{ModeUnwedge})
	for _, res := range report.Scenarios {
		if res.Error != "" {
			t.Fatalf("%s: %s", res.Name, res.Error)
		}
		t.Logf("%+v", *res)
	}
	if !inspected {
		t.Fatal("the scenario did not reach the inspection")
	}
}
