package lab

import (
	"context"
	"testing"
	"time"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestStockWedges runs every scenario against the stock bridge and checks that the lab really
// breaks the session (the bridge fails to decrypt Olm messages, or the device fails to decrypt
// the bridge's), and that it can see what is lost: a lab that never sees a loss proves nothing.
func TestStockWedges(t *testing.T) {
	env := testenv.Require(t)
	if testing.Short() {
		t.Skip("the wedge lab takes minutes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cfg := QuickConfig()
	cfg.WorkDir = t.TempDir()
	var err error
	if cfg.Binary, err = harness.BuildBridge(ctx, cfg.WorkDir); err != nil {
		t.Fatal(err)
	}
	report := Run(ctx, env, cfg, Scenarios, []Mode{ModeStock, ModeUnwedge})
	if len(report.UnavailableModes) != 1 || report.UnavailableModes[0] != ModeUnwedge {
		t.Errorf("unavailable modes = %v, want [unwedge] until the middleware exists", report.UnavailableModes)
	}
	lostSomewhere := false
	for _, res := range report.Scenarios {
		t.Run(res.Name, func(t *testing.T) {
			if res.Error != "" {
				t.Fatalf("scenario failed to run: %s", res.Error)
			}
			t.Logf("%+v", *res)
			if res.Sent != 2*cfg.K || res.RemoteSent != 2*cfg.K || res.Bridged+res.Lost != res.Sent ||
				res.RemoteDecrypted+res.RemoteLost != res.RemoteSent {
				t.Errorf("inconsistent counts: %+v", *res)
			}
			if res.OlmFailures == 0 && res.RemoteLost == 0 {
				t.Errorf("no wedge: the bridge decrypted every Olm message and the device every room key")
			}
		})
		lostSomewhere = lostSomewhere || res.Lost > 0
	}
	if !lostSomewhere {
		t.Error("stock mautrix-go lost no Matrix message in any scenario: the lab does not see losses")
	}
}
