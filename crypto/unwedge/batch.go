package unwedge

import (
	"context"
	"sync"

	"maunium.net/go/mautrix/id"
)

// batchWorkers bounds the heals HealBatch runs at once.
const batchWorkers = 8

// HealBatch heals many devices that no Olm event named (class rolled_back or session_lost, found
// at startup): each as Heal does, the ledger deciding per device, with at most batchWorkers at
// once. The caller has checked the scope; the per-user and per-minute caps, which bound what
// peers can make the bridge do, do not apply to heals the bridge starts on its own. It returns
// one decision per device, in the order given, once all are done.
func (u *Unwedger) HealBatch(ctx context.Context, devices []*id.Device, class Class) []Decision {
	decisions := make([]Decision, len(devices))
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(batchWorkers, len(devices)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				decisions[i] = u.Heal(ctx, devices[i], class, "")
			}
		}()
	}
	for i := range devices {
		next <- i
	}
	close(next)
	wg.Wait()
	return decisions
}
