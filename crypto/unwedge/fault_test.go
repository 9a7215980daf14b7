//go:build unwedgefault

package unwedge_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// reachedPoints records the fault points an armed hook is called at.
type reachedPoints struct {
	lock   sync.Mutex
	points []string
}

func (r *reachedPoints) hook(_ context.Context, point string) {
	r.lock.Lock()
	r.points = append(r.points, point)
	r.lock.Unlock()
}

func (r *reachedPoints) get() []string {
	r.lock.Lock()
	defer r.lock.Unlock()
	return slices.Clone(r.points)
}

// TestFaultPoints: an armed Unwedger reaches the fault points of a heal in order, and an armed
// Recovery those of handing over an event whose key came late, whatever context its caller
// passes (Pass here).
func TestFaultPoints(t *testing.T) {
	t.Run("heal", func(t *testing.T) {
		f := newFixture(t)
		f.establish()
		f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
		f.restartBridge()
		var reached reachedPoints
		f.unwedger.ArmFaults(reached.hook)
		f.peerSends()
		f.deliverToBridge()
		f.decision()
		want := []string{unwedge.FaultHealGranted, unwedge.FaultSessionCreated}
		if got := reached.get(); !slices.Equal(got, want) {
			t.Errorf("reached %q, want %q", got, want)
		}
	})
	t.Run("recovery", func(t *testing.T) {
		f := newRecoveryFixture(t, nil)
		var reached reachedPoints
		f.rec.ArmFaults(reached.hook)
		f.undecryptable("late", f.clock)
		f.pass(unwedge.StockWait + time.Second)
		if reqs := f.keyRequests(); len(reqs) != 1 {
			t.Fatalf("%d key requests, want 1", len(reqs))
		}
		f.awaitForwardedKey()
		f.pass(time.Second)
		if got := f.sink.bodies(); !slices.Equal(got, []string{"late"}) {
			t.Fatalf("bridged %q, want late", got)
		}
		want := []string{unwedge.FaultKeyArrived, unwedge.FaultEventDelivered}
		if got := reached.get(); !slices.Equal(got, want) {
			t.Errorf("reached %q, want %q", got, want)
		}
	})
}
