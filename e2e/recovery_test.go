package e2e

import (
	"context"
	"database/sql"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// gateKeyShare makes the user's device ignore every key request until allow is called with a
// session, and then answer the requests for that session only.
func (s *setup) gateKeyShare() (allow func(id.SessionID)) {
	var allowed atomic.Pointer[id.SessionID]
	s.user.Machine().AllowKeyShare = func(_ context.Context, _ *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
		if session := allowed.Load(); session != nil && *session == info.SessionID {
			return nil
		}
		return &crypto.KeyShareRejectNoResponse
	}
	return func(session id.SessionID) { allowed.Store(&session) }
}

// TestRecoveryAfterStockGiveUp: two messages whose room keys never reached the bridge. bridgev2
// gives up on both after about 25 s and tells the user so. The sender's device then answers the
// bridge's key request for the first: it is bridged after all and the notice about it is
// redacted. The second's key never comes: after the retention the user is told it will not be
// bridged, and nothing is left in the database.
func TestRecoveryAfterStockGiveUp(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	s := start(t, ctx, false, "postgres", "", map[string]any{"network.unwedge.recovery.retention": "1m"})
	room := s.openPortal(t, ctx, "recovery")

	const lateText, neverText = "key comes late", "key never comes"
	// The user's device answers key requests for the first session only, once it is allowed to.
	allowKeyShare := s.gateKeyShare()
	sent := time.Now()
	lateID, sessionID, err := s.user.SendWithheldText(ctx, room, lateText)
	if err != nil {
		t.Fatal(err)
	}
	neverID, _, err := s.user.SendWithheldText(ctx, room, neverText)
	if err != nil {
		t.Fatal(err)
	}

	// bridgev2's own wait: a notice about each message, and neither is bridged.
	lateNotice := s.waitForNotice(t, ctx, room, lateID, "")
	s.waitForNotice(t, ctx, room, neverID, "")
	sleepUntil(ctx, sent.Add(27*time.Second))
	if s.inOutbox(t, ctx, lateText) || s.inOutbox(t, ctx, neverText) {
		t.Fatal("a message without its key was bridged")
	}

	// Only now does the device agree to share the key: the bridge's request after the
	// hand-over gets it.
	allowKeyShare(sessionID)
	msg := s.waitOutbox(t, ctx, lateText, nil)
	if msg.EventID != lateID.String() {
		t.Errorf("bridged event %s, want %s", msg.EventID, lateID)
	}
	t.Logf("late message bridged %s after it was sent", time.Since(sent).Round(time.Second))
	s.waitForRedaction(t, ctx, room, lateNotice.ID)

	// The other one is given up after the retention, with a notice that says why.
	gaveUp := s.waitForNotice(t, ctx, room, neverID, unwedge.ErrGaveUp.Error())
	t.Logf("gave up %s after it was sent: %q", time.Since(sent).Round(time.Second), gaveUp.Content.AsMessage().Body)
	if s.inOutbox(t, ctx, neverText) {
		t.Error("the message whose key never came was bridged")
	}
	db, err := sql.Open("postgres", s.bridge.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var pending int
	if err = db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending").Scan(&pending); err != nil || pending != 0 {
		t.Errorf("%d pending rows left (%v), want 0", pending, err)
	}
}

// waitForNotice waits for the bridge bot's notice replying to an event, whose text contains
// substr.
func (s *setup) waitForNotice(t *testing.T, ctx context.Context, room id.RoomID, about id.EventID, substr string) *event.Event {
	t.Helper()
	evt, err := s.user.WaitForMessage(ctx, room, func(evt *event.Event) bool {
		msg := evt.Content.AsMessage()
		return evt.Sender == s.bridge.BotMXID && msg.MsgType == event.MsgNotice && msg.RelatesTo.GetReplyTo() == about &&
			strings.Contains(msg.Body, substr)
	})
	if err != nil {
		t.Fatalf("no notice about %s containing %q: %v", about, substr, err)
	}
	return evt
}

// waitForRedaction waits until the homeserver serves an event redacted.
func (s *setup) waitForRedaction(t *testing.T, ctx context.Context, room id.RoomID, eventID id.EventID) {
	t.Helper()
	for {
		evt, err := s.user.Mautrix().GetEvent(ctx, room, eventID)
		if err == nil && len(evt.Content.VeryRaw) <= 2 && evt.Unsigned.RedactedBecause != nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("notice %s was not redacted: %+v, %v", eventID, evt, err)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (s *setup) inOutbox(t *testing.T, ctx context.Context, text string) bool {
	t.Helper()
	resp, err := s.remote.Outbox(ctx, 0, 500)
	if err != nil {
		t.Fatal(err)
	}
	for _, msg := range resp.Messages {
		if msg.Body == text {
			return true
		}
	}
	return false
}

func sleepUntil(ctx context.Context, at time.Time) {
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(at)):
	}
}
