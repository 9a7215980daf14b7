package lab

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestLab runs every scenario against the stock bridge and the bridge with unwedge, both modes of
// a scenario side by side (`-run TestLab/NAME` runs one). Scenarios are independent (each world
// has its own bridge, database and user), so they run in parallel subtests, as many at once as
// -parallel allows. In stock mode it checks that the lab really breaks the session (the bridge
// fails to decrypt Olm messages, or the device fails to decrypt the bridge's) and that it sees
// what is lost: a lab that never sees a loss proves nothing. In unwedge mode every scenario must
// heal with no human action, with at most one replacement session for the device whose session
// wedged (checkReplacements), and lose nothing in either direction.
func TestLab(t *testing.T) {
	t.Parallel()
	env, ctx, cfg := setupLab(t, 20*time.Minute)
	var lock sync.Mutex
	ran, stockLost := 0, false
	// Cleanups run once every subtest, parallel ones included, has finished.
	t.Cleanup(func() {
		if ran == len(Scenarios) && !stockLost {
			t.Error("stock mautrix-go lost no Matrix message in any scenario: the lab does not see losses")
		}
	})
	for _, sc := range Scenarios {
		t.Run(sc.Name, func(t *testing.T) {
			t.Parallel()
			report := Run(ctx, env, cfg, []*Scenario{sc}, []Mode{ModeStock, ModeUnwedge})
			if len(report.UnavailableModes) != 0 {
				t.Errorf("unavailable modes = %v", report.UnavailableModes)
			}
			for _, res := range report.Scenarios {
				t.Run(string(res.Mode), func(t *testing.T) { checkResult(t, cfg, sc, res) })
				lock.Lock()
				stockLost = stockLost || (res.Mode == ModeStock && res.Lost > 0)
				lock.Unlock()
			}
			lock.Lock()
			ran++
			lock.Unlock()
		})
	}
}

func checkResult(t *testing.T, cfg Config, sc *Scenario, res *Result) {
	if res.Error != "" {
		t.Fatalf("scenario failed to run: %s", res.Error)
	}
	t.Logf("%+v", *res)
	checkCounts(t, cfg, sc, res)
	switch res.Mode {
	case ModeStock:
		switch {
		case sc.Wedge == nil && res.SentWhileDown == 0:
			t.Errorf("the device sent nothing while the bridge was stopped")
		case sc.Wedge != nil && res.OlmFailures == 0 && res.RemoteLost == 0:
			t.Errorf("no wedge: the bridge decrypted every Olm message and the device every room key")
		}
	case ModeUnwedge:
		checkHealed(t, sc, res)
	}
}

// checkCounts checks that a result's counts agree with each other.
func checkCounts(t *testing.T, cfg Config, sc *Scenario, res *Result) {
	t.Helper()
	// The remote side posts 2K messages; in a management room it is the bot, which answers each
	// command it handled.
	remoteSent := 2 * cfg.K
	if sc.Management {
		remoteSent = res.Bridged
	}
	if res.Sent != 2*cfg.K || res.RemoteSent != remoteSent || res.Bridged+res.Lost != res.Sent ||
		res.RemoteDecrypted+res.RemoteLost != res.RemoteSent || res.RemoteLost < 0 ||
		res.LostBeforeHeal < 0 || res.LostBeforeHeal > res.Lost || res.SentWhileDown > res.Sent {
		t.Errorf("inconsistent counts: %+v", *res)
	}
	switch {
	case res.BridgedWedged == 0 && (res.WedgedBridgedP50MS != -1 || res.WedgedBridgedMaxMS != -1):
		t.Errorf("no wedged message bridged, but wedged p50/max = %d/%d ms, want -1/-1", res.WedgedBridgedP50MS, res.WedgedBridgedMaxMS)
	case res.BridgedWedged > 0 && (res.WedgedBridgedP50MS < 0 || res.WedgedBridgedMaxMS < res.WedgedBridgedP50MS):
		t.Errorf("wedged p50/max = %d/%d ms for %d bridged", res.WedgedBridgedP50MS, res.WedgedBridgedMaxMS, res.BridgedWedged)
	}
}

// checkHealed checks that unwedge healed with no human action and lost nothing in either
// direction, with at most one replacement session for the device (checkReplacements). That
// holds under the mautrix rules; under Element's, a message whose key went only over the broken
// session is lost by construction unless the bridge healed before the user spoke, so there the
// result is only logged.
func checkHealed(t *testing.T, sc *Scenario, res *Result) {
	t.Helper()
	if res.Rules != testclient.RulesMautrix {
		return
	}
	if !res.Healed || res.Lost != 0 || res.RemoteLost != 0 {
		t.Errorf("not healed: %d of %d Matrix messages and %d of %d remote messages lost", res.Lost, res.Sent, res.RemoteLost, res.RemoteSent)
	}
	if sc.Wedge == nil && res.SentWhileDown == 0 {
		t.Errorf("the device sent nothing while the bridge was stopped")
	}
	// A message whose key the bridge holds waits for no hand-over (recovery.StockWait, 30 s):
	// Element Web's grace period is 4 s; the bound here leaves room for a loaded test machine.
	if res.KeyToBridgedMaxMS < 0 || res.KeyToBridgedMaxMS > keyToBridgedBound.Milliseconds() {
		t.Errorf("key to bridged: max %d ms (p50 %d ms), want 0 to %s", res.KeyToBridgedMaxMS, res.KeyToBridgedP50MS, keyToBridgedBound)
	}
	checkReplacements(t, res)
}

// keyToBridgedBound is the longest a message may take in the tests from the bridge holding its
// key to the remote side having it: Element Web's 4 s grace period, doubled for a machine that
// runs three test lanes at once.
const keyToBridgedBound = 8 * time.Second

// checkReplacements: every scenario breaks one device's session, on the bridge's side or the
// device's, so unwedge makes at most one replacement session, and exactly one once an Olm message
// failed. None is needed when the bridge prevented the wedge at startup: in expired-one-time-key it
// replaced the one-time keys its account had lost before the device claimed one.
func checkReplacements(t *testing.T, res *Result) {
	t.Helper()
	if res.ReplacementSessions > 1 || (res.OlmFailures > 0 && res.ReplacementSessions != 1) {
		t.Errorf("%d replacement sessions after %d Olm failures, want at most 1, and 1 after a failure", res.ReplacementSessions, res.OlmFailures)
	}
}

// TestLabAppservice: unwedge heals after an Olm failure in the appservice transport too (to-device
// events in transactions, MSC2409/MSC3202), where the machine's listeners are registered through
// unwedge. The heals at startup are off: they would heal these wedges before any failure (TestLab
// shows that), and this test is about the reactive path. (TestLabRules runs restart-while-sending
// in this transport.)
func TestLabAppservice(t *testing.T) {
	t.Parallel()
	env, ctx, cfg := setupLab(t, 10*time.Minute)
	cfg.Appservice = true
	cfg.BridgeConfig = map[string]any{"network.unwedge.startup.enabled": false}
	var scenarios []*Scenario
	for _, name := range []string{"expired-one-time-key", "corrupt-session"} {
		sc, _ := ScenarioByName(name)
		scenarios = append(scenarios, sc)
	}
	report := Run(ctx, env, cfg, scenarios, []Mode{ModeUnwedge})
	if report.Transport != "appservice" {
		t.Errorf("transport = %s", report.Transport)
	}
	for _, res := range report.Scenarios {
		t.Run(res.Name, func(t *testing.T) {
			if res.Error != "" {
				t.Fatalf("scenario failed to run: %s", res.Error)
			}
			t.Logf("%+v", *res)
			sc, _ := ScenarioByName(res.Name)
			checkCounts(t, cfg, sc, res)
			checkHealed(t, sc, res)
			if res.OlmFailures == 0 || res.ReplacementSessions != 1 {
				t.Errorf("want one replacement session after Olm failures: %+v", *res)
			}
		})
	}
}

// setupLab returns the stack, a context bounded by timeout, and a quick config with the bridge
// (built once per test process) and the test's temporary directory.
func setupLab(t *testing.T, timeout time.Duration) (*testenv.Env, context.Context, Config) {
	env := testenv.Require(t)
	if testing.Short() {
		t.Skip("the wedge lab takes minutes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	cfg := QuickConfig()
	cfg.WorkDir = t.TempDir()
	var err error
	if cfg.Binary, err = bridgeBinary(ctx); err != nil {
		t.Fatal(err)
	}
	return env, ctx, cfg
}

// bridge is the reference bridge, built once for the tests of this process (they run side by
// side) into a directory TestMain removes.
var bridge struct {
	once     sync.Once
	dir, bin string
	err      error
}

func bridgeBinary(ctx context.Context) (string, error) {
	bridge.once.Do(func() {
		if bridge.dir, bridge.err = os.MkdirTemp("", "unwedge-lab-"); bridge.err == nil {
			bridge.bin, bridge.err = harness.BuildBridge(ctx, bridge.dir)
		}
	})
	return bridge.bin, bridge.err
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bridge.dir != "" {
		_ = os.RemoveAll(bridge.dir)
	}
	os.Exit(code)
}

// TestLabRules runs restart-while-sending in appservice mode under Element's rules, with
// unwedge. The room key the device sent while the bridge was down is not in Synapse's catch-up
// transactions (they drop to-device messages); it waits in the bot device's inbox, which unwedge
// reads at startup. What else the bridge gets depends on the client's rules:
//   - element-web answers the bridge's key request: the session is its current one and it shared
//     it with the bridge's device, from index 0. Nothing may be lost.
//   - element-x never answers key requests. Whatever is lost must be lost before the heal
//     (lost_before_heal): a key that went to the bridge only while it was down, or only over a
//     broken Olm session, and that the bridge does not hold. A message lost although the bridge
//     holds its key, or although the device sent its key again after a heal, is the bridge's loss.
func TestLabRules(t *testing.T) {
	t.Parallel()
	env, ctx, cfg := setupLab(t, 10*time.Minute)
	cfg.Appservice = true
	cfg.Rules = []testclient.Rules{testclient.RulesElementWeb, testclient.RulesElementX}
	sc, _ := ScenarioByName("restart-while-sending")
	checks := map[testclient.Rules]func(t *testing.T, res *Result){
		testclient.RulesElementWeb: func(t *testing.T, res *Result) {
			if res.Lost != 0 || res.RemoteLost != 0 {
				t.Errorf("lost %d Matrix and %d remote messages, want 0: element-web answers for its current session", res.Lost, res.RemoteLost)
			}
		},
		testclient.RulesElementX: func(t *testing.T, res *Result) {
			if res.Lost != res.LostBeforeHeal {
				t.Errorf("lost %d, of which %d before the heal: the bridge lost messages whose key it got or was sent again", res.Lost, res.LostBeforeHeal)
			}
			if res.RemoteLost != 0 {
				t.Errorf("the device could not decrypt %d remote messages", res.RemoteLost)
			}
		},
	}
	report := Run(ctx, env, cfg, []*Scenario{sc}, []Mode{ModeUnwedge})
	if len(report.Scenarios) != len(checks) {
		t.Fatalf("%d results, want one per rule set", len(report.Scenarios))
	}
	for _, res := range report.Scenarios {
		t.Run(string(res.Rules), func(t *testing.T) {
			if res.Error != "" {
				t.Fatalf("scenario failed to run: %s", res.Error)
			}
			t.Logf("%+v", *res)
			checkCounts(t, cfg, sc, res)
			if res.SentWhileDown == 0 {
				t.Errorf("the device sent nothing while the bridge was stopped")
			}
			checks[res.Rules](t, res)
		})
	}
}
