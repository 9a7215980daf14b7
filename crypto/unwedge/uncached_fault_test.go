//go:build unwedgefault

package unwedge_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestHealAdoptsLoadedSession: a heal's replacement session is in the table but not the SQL
// store's cache, and the machine loads it while the heal runs (here it sends the peer a message
// between the heal's claim and its m.dummy). The heal then encrypts m.dummy over the machine's
// object of the session, not its own: over its own, it would use the message index the machine
// just used, and the peer could not decrypt the second of the two.
func TestHealAdoptsLoadedSession(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	var sent atomic.Bool
	f.unwedger.ArmFaults(func(_ context.Context, point string) {
		if point == unwedge.FaultSessionCreated && sent.CompareAndSwap(false, true) {
			f.bridgeSends() // over the replacement session: the machine loads it from the table
		}
	})
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("decision %+v, want healed", d)
	}
	if !sent.Load() {
		t.Fatal("the fault point was not reached")
	}
	f.peerDecryptsAll(2)
	f.hs.Exchange(f.peer, f.bridge)
	f.noDecision()
}
