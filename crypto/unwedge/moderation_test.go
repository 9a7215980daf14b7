package unwedge_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// droppingSink drops the events whose bodies it is given, as the bridge's sink does with events
// the room's rules no longer let through, and delivers the others.
type droppingSink struct {
	*recordingSink
	drop []string
}

func (s *droppingSink) Deliver(ctx context.Context, original, decrypted *event.Event, requests int) error {
	if slices.Contains(s.drop, decrypted.Content.AsMessage().Body) {
		return &unwedge.DroppedError{Reason: "the sender's membership is ban"}
	}
	return s.recordingSink.Deliver(ctx, original, decrypted, requests)
}

// TestRecoveryDropped: an event the sink drops when its key comes is not bridged, its row is
// deleted at once (not released to be tried again), it is counted as dropped and not as
// recovered, and the key request is still cancelled.
func TestRecoveryDropped(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	f.startRecovery(f.cfg.Recovery, &droppingSink{recordingSink: f.sink, drop: []string{"banned"}})
	t0 := f.clock
	f.undecryptable("kept", t0.Add(-time.Second))
	f.undecryptable("banned", t0)
	f.pass(unwedge.StockWait + time.Second)
	reqs := f.keyRequests()
	if len(reqs) != 1 {
		t.Fatalf("%d key requests, want 1", len(reqs))
	}
	f.awaitForwardedKey()
	f.pass(time.Second)
	if got := f.sink.bodies(); strings.Join(got, ",") != "kept" {
		t.Fatalf("bridged %v, want kept only", got)
	}
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d events still pending, want 0", n)
	}
	counts := f.rec.Counts()
	if counts[unwedge.CountRecovered] != 1 || counts[unwedge.CountDropped] != 1 || counts[unwedge.CountRequestsFilled] != 1 {
		t.Fatalf("counts = %v, want 1 recovered, 1 dropped, 1 request filled", counts)
	}
	if cancels := f.keyRequests(); len(cancels) != 1 || cancels[0].Action != event.KeyRequestActionCancel {
		t.Fatalf("after the key arrived the peer got %+v, want a cancellation", cancels)
	}
}

// TestRecoveryRedacted: a redaction by the event's sender or by a moderator drops a pending event
// at once; anyone else's, or one in another room, does not.
func TestRecoveryRedacted(t *testing.T) {
	f := newRecoveryFixture(t, nil)
	own := f.undecryptable("own", f.clock)
	moderated := f.undecryptable("moderated", f.clock)
	const stranger, moderator = id.UserID("@mallory:example.org"), id.UserID("@mod:example.org")
	if f.rec.Redacted(f.ctx, testRoom, own.ID, "$r1", stranger, false) {
		t.Error("a stranger's redaction dropped the event")
	}
	if f.rec.Redacted(f.ctx, "!other:example.org", own.ID, "$r2", peerUser, false) {
		t.Error("a redaction in another room dropped the event")
	}
	if !f.rec.Redacted(f.ctx, testRoom, own.ID, "$r3", peerUser, false) {
		t.Error("the sender's redaction did not drop the event")
	}
	if !f.rec.Redacted(f.ctx, testRoom, moderated.ID, "$r4", moderator, true) {
		t.Error("a moderator's redaction did not drop the event")
	}
	if n := f.pendingCount(); n != 0 {
		t.Fatalf("%d events still pending, want 0", n)
	}
	if counts := f.rec.Counts(); counts[unwedge.CountDropped] != 2 {
		t.Fatalf("counts = %v, want 2 dropped", counts)
	}
	// Nothing is requested or bridged for them afterwards.
	f.pass(unwedge.StockWait + time.Second)
	if reqs := f.keyRequests(); len(reqs) != 0 {
		t.Fatalf("%d key requests for dropped events", len(reqs))
	}
}
