package e2e

import (
	"context"
	"database/sql"
	"os"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// gateKeyShares is gateKeyShare for several sessions: the user's device ignores every key request
// until allow is called, and then answers the requests for the allowed sessions only.
func (s *setup) gateKeyShares() (allow func(...id.SessionID)) {
	var lock sync.Mutex
	allowed := map[id.SessionID]bool{}
	s.user.Machine().AllowKeyShare = func(_ context.Context, _ *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
		lock.Lock()
		defer lock.Unlock()
		if allowed[info.SessionID] {
			return nil
		}
		return &crypto.KeyShareRejectNoResponse
	}
	return func(sessions ...id.SessionID) {
		lock.Lock()
		defer lock.Unlock()
		for _, session := range sessions {
			allowed[session] = true
		}
	}
}

// droppedLine is what recovery logs for an event it does not bridge although its key came.
const droppedLine = "Dropped undecryptable event: it will not be bridged"

// TestModeration: a message that waits for its key is bridged late only if the room's rules
// still let it through when the key comes. Three messages are sent whose keys the sender's device
// withholds, on one bridge: a control in one portal, one that its sender redacts at once (the
// pending row goes with the redaction), and one in another portal from which the sender is then
// kicked by the portal's admin (the bridge bot). After bridgev2's own wait the device answers the
// bridge's key requests for all three: the control is bridged, the other two are not, and
// nothing is left pending.
func TestModeration(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s := start(t, ctx, false, "postgres", "")
	db, err := sql.Open("postgres", s.bridge.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	room := s.openPortal(t, ctx, "moderation")
	kickRoom := s.openPortal(t, ctx, "moderation-kick")
	allowKeyShares := s.gateKeyShares()

	const controlText, redactedText, kickedText = "control: bridged late", "redacted before its key came", "sent before the sender was kicked"
	sent := time.Now()
	controlID, controlSession, err := s.user.SendWithheldText(ctx, room, controlText)
	if err != nil {
		t.Fatal(err)
	}
	redactedID, redactedSession, err := s.user.SendWithheldText(ctx, room, redactedText)
	if err != nil {
		t.Fatal(err)
	}
	kickedID, kickedSession, err := s.user.SendWithheldText(ctx, kickRoom, kickedText)
	if err != nil {
		t.Fatal(err)
	}
	for _, evt := range []id.EventID{controlID, redactedID, kickedID} {
		waitPendingRow(t, ctx, db, evt, true, time.Minute)
	}

	t.Run("redacted", func(t *testing.T) {
		if _, err := s.user.Mautrix().RedactEvent(ctx, room, redactedID); err != nil {
			t.Fatal(err)
		}
		// The row goes with the redaction, long before the key could come (the hand-over to
		// recovery is unwedge.StockWait after the message). It takes about 3 s: the redaction
		// waits behind the undecryptable message in the bridge's event handling.
		waitPendingRow(t, ctx, db, redactedID, false, 15*time.Second)
		if waited := time.Since(sent); waited >= unwedge.StockWait {
			t.Fatalf("the row went %s after the message, not before the hand-over", waited)
		}
	})

	t.Run("kicked", func(t *testing.T) {
		bot, err := mautrix.NewClient(s.env.HomeserverURL, s.bridge.BotMXID, s.slot.ASToken)
		if err != nil {
			t.Fatal(err)
		}
		bot.SetAppServiceUserID = true
		if _, err = bot.KickUser(ctx, kickRoom, &mautrix.ReqKickUser{UserID: s.user.UserID(), Reason: "moderation test"}); err != nil {
			t.Fatal(err)
		}
		waitMembership(t, ctx, db, kickRoom, s.user.UserID(), event.MembershipLeave)
		// The bridge's state store may be behind the homeserver (a kick still queued behind
		// other events, or made while the bridge was down): here it still says joined. The key
		// must not outrun the kick.
		if _, err = db.ExecContext(ctx, "UPDATE mx_user_profile SET membership = 'join' WHERE room_id = $1 AND user_id = $2", kickRoom, s.user.UserID()); err != nil {
			t.Fatal(err)
		}
	})

	// Before the hand-over (30 s after the messages) the device agrees to share all three keys:
	// recovery's first key requests get them.
	allowKeyShares(controlSession, redactedSession, kickedSession)
	msg := s.waitOutbox(t, ctx, controlText, nil)
	if msg.EventID != controlID.String() {
		t.Errorf("bridged event %s, want %s", msg.EventID, controlID)
	}
	bridged := time.Now()
	t.Logf("control bridged %s after it was sent", bridged.Sub(sent).Round(time.Second))
	// The kicked sender's key came too (the same or the next pass of key requests, 5 s apart):
	// its row is deleted.
	waitPendingRow(t, ctx, db, kickedID, false, time.Minute)
	t.Logf("kicked sender's message handled %s after the control was bridged", time.Since(bridged).Round(100*time.Millisecond))

	// Nothing more arrives: a late-decrypted event reaches the outbox before its row is deleted
	// (the sink waits for bridgev2 to record it), and the control took under a second from its
	// key to the outbox, so 5 s after the row went is ample.
	sleepUntil(ctx, time.Now().Add(5*time.Second))
	for _, text := range []string{kickedText, redactedText} {
		if s.inOutbox(t, ctx, text) {
			t.Errorf("%q was bridged", text)
		}
	}
	if data, err := os.ReadFile(s.bridge.LogPath); err != nil || !hasLine(data, []string{droppedLine, kickedID.String(), "membership is leave"}) {
		t.Errorf("the bridge did not log the drop of %s with its reason (%v)", kickedID, err)
	}
	var pending int
	if err = db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending").Scan(&pending); err != nil || pending != 0 {
		t.Errorf("%d pending rows left (%v), want 0", pending, err)
	}
}

// waitPendingRow waits until the event is recorded as pending (present) or no longer is.
func waitPendingRow(t *testing.T, ctx context.Context, db *sql.DB, eventID id.EventID, present bool, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		var n int
		if err := db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending WHERE event_id = $1", eventID).Scan(&n); err != nil {
			t.Fatal(err)
		} else if (n > 0) == present {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("event %s pending = %t never came: %v", eventID, present, ctx.Err())
		case <-deadline:
			t.Fatalf("event %s pending = %t did not come within %s", eventID, present, timeout)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
