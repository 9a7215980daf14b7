//go:build unwedgefault

package unwedge_test

import (
	"context"
	"slices"
	"testing"

	"maunium.net/go/mautrix/event"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestHealBatchOrder: in a batch, every device is healing (Healing) from its grant until its
// heal ends, and each replacement session is in the ledger before any m.dummy goes out.
func TestHealBatchOrder(t *testing.T) {
	const peers = 5
	b := newBatchFixture(t, peers)
	sends := b.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type)
	type seen struct {
		point    string
		healing  int
		recorded int
		sent     bool
	}
	var reached []seen
	b.unwedger.ArmFaults(func(_ context.Context, point string) {
		s := seen{point: point, sent: b.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type) != sends}
		for i, peer := range b.peers {
			if b.unwedger.Healing(peer.UserID, peer.IdentityKey()) {
				s.healing++
			}
			heals, err := b.ledger.Heals(b.ctx, peer.UserID, peer.DeviceID, 1)
			if err != nil {
				t.Errorf("heals of peer %d: %v", i, err)
			} else if len(heals) == 1 && heals[0].SessionID != "" {
				s.recorded++
			}
		}
		reached = append(reached, s)
	})
	got := b.unwedger.HealBatch(b.ctx, b.devices, unwedge.ClassRolledBack)
	if i := slices.IndexFunc(got, func(d unwedge.Decision) bool { return d.Action != unwedge.ActionHealed }); i >= 0 {
		t.Fatalf("decision %d: %+v, want healed", i, got[i])
	}
	var want []seen
	for i := range peers {
		want = append(want, seen{point: unwedge.FaultHealGranted, healing: i + 1})
	}
	for i := range peers {
		want = append(want, seen{point: unwedge.FaultSessionCreated, healing: peers, recorded: i + 1})
	}
	if !slices.Equal(reached, want) {
		t.Errorf("fault points reached %+v, want %+v", reached, want)
	}
	for i := range b.peers {
		b.healedBothWays(i)
	}
}
