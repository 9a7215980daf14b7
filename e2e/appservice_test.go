package e2e

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/unwedge/unwedge/internal/testclient"
)

// TestAppserviceInbox: in appservice mode, a room key the client sends while the bridge is down
// still arrives. Synapse's catch-up transactions after the restart carry the room event but not
// the to-device message with its key; the bridge reads it from its device's inbox at startup,
// before it handles the event. The client follows Element X's rules and answers no key request,
// so without the inbox the message would never be bridged (unwedge.appservice_inbox: false: it
// waits until the test's deadline).
func TestAppserviceInbox(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s := start(t, ctx, true, "postgres", "")
	s.user, s.remote = newLogin(t, ctx, s.env, s.bridge, "", testclient.RulesElementX)
	room := s.openPortal(t, ctx, "inbox")
	if _, err := s.user.SendText(ctx, room, "before the restart"); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, "before the restart", nil)

	if err := s.bridge.Stop(); err != nil {
		t.Fatal(err)
	}
	// A new room key: it goes to the bridge's device in a transaction that fails.
	if err := s.user.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	const text = "sent while the bridge was down"
	sent := time.Now()
	if _, err := s.user.SendText(ctx, room, text); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // Synapse tries the transaction and fails
	if err := s.bridge.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, text, nil)
	t.Logf("bridged %s after it was sent", time.Since(sent).Round(time.Second))
	if handled := inboxHandled(t, s.bridge.LogPath); handled < 1 {
		t.Errorf("the bridge handled %d messages from its inbox at startup, want the room key", handled)
	}
}

// inboxHandled reads from the bridge's log how many to-device messages it handled from its inbox
// at its last startup.
func inboxHandled(t *testing.T, logPath string) int {
	t.Helper()
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	handled := -1
	for _, line := range strings.Split(string(data), "\n") {
		var entry struct {
			Message string `json:"message"`
			Handled int    `json:"handled"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Message == "Read the bot device's to-device inbox at startup" {
			handled = entry.Handled
		}
	}
	return handled
}
