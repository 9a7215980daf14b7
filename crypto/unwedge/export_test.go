package unwedge

import (
	"context"
	"time"
)

// SetClock replaces a Recovery's clock (tests move time past the hand-over and the retention);
// the Recovery's process started at the clock's now.
func SetClock(r *Recovery, now func() time.Time) { r.now, r.started = now, now() }

// Pass runs one recovery round synchronously, as the loop does.
func Pass(ctx context.Context, r *Recovery, sweep bool) { r.pass(ctx, sweep) }

// ErrCryptoStore marks a heal's failure to store its new session.
var ErrCryptoStore = errCryptoStore
