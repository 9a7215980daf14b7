package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestClientRestoredWholeStore: a client restores its whole crypto store from a backup (MSC1719's
// first example) after both Olm ratchets moved on four times, and follows Element X's rules: it
// answers no key request, and after a new Olm session it shares its current Megolm session again
// from its current index. Its first Olm message after the restore fails at the bridge, and with
// it the room key of the first message it sends; every message must be bridged all the same.
//
//   - bridge-spoke-last: the backup was taken right after the client decrypted an Olm message from
//     the bridge. The restored client starts a new chain from the bridge's ratchet key as it was
//     then; the bridge derives it from its current ratchet key: "bad mac".
//   - own-message-last: the backup was taken right after the client's own Olm message. The
//     restored client goes on with that chain at an index the bridge has consumed: "message key
//     not found".
//
// The lab's client-restored-reused-index scenarios measure the same; this test holds the bridge
// to losing nothing there.
func TestClientRestoredWholeStore(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		// ownLast: the client's own Olm message is the last one before the backup.
		ownLast bool
		// failure is what goolm's ratchet says of the restored client's first Olm message.
		failure string
	}{
		{"bridge-spoke-last", false, "decrypt from existing chain: the message couldn't be decrypted (bad mac)"},
		{"own-message-last", true, "decrypt: message key not found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			r := startRestore(t, ctx)
			backup := filepath.Join(t.TempDir(), "backup.db")

			if tc.ownLast {
				r.deviceSpeaks(t, ctx, "before the backup")
			} else {
				r.bridgeSpeaks(t, ctx)
			}
			if err := r.user.Snapshot(ctx, backup); err != nil {
				t.Fatal(err)
			}
			// Four rounds, each one Olm message each way. The client's first message after the
			// backup goes on the chain it was on (own-message-last: at the index the restored
			// client will use again). The bridge speaks last when the client's restored chain is
			// a new one: the bridge then holds a sending chain to derive it from.
			r.deviceSpeaks(t, ctx, "after the backup")
			for i := range 3 {
				r.bridgeSpeaks(t, ctx)
				r.deviceSpeaks(t, ctx, fmt.Sprintf("round %d", i+1))
			}
			r.bridgeSpeaks(t, ctx)
			if err := r.user.Restore(ctx, backup); err != nil {
				t.Fatal(err)
			}
			offset := logSize(r.bridge)

			// The restored client rotates its Megolm session, as a client does after a
			// restore or on its rotation period: the new key goes over Olm from the restored state.
			if err := r.user.RotateRoomKey(ctx, r.room); err != nil {
				t.Fatal(err)
			}
			var texts []string
			for i := range 3 {
				text := fmt.Sprintf("after the restore %d", i)
				if _, err := r.user.SendText(ctx, r.room, text); err != nil {
					t.Fatal(err)
				}
				texts = append(texts, text)
				time.Sleep(200 * time.Millisecond)
			}
			missing := r.waitBridged(ctx, 90*time.Second, texts)
			if !r.logged(offset, tc.failure) {
				t.Errorf("the bridge did not fail the restored client's Olm message with %q: the test no longer restores into a wedge", tc.failure)
			}
			if len(missing) > 0 {
				t.Errorf("not bridged after the restore: %q", missing)
			}
		})
	}
}

// restoreSetup is a bridge whose user is an admin (so that the test can make the bridge send an
// Olm message: discard-megolm-session), with a portal, and the user's client under Element X's rules.
type restoreSetup struct {
	*setup
	room id.RoomID
}

func startRestore(t *testing.T, ctx context.Context) *restoreSetup {
	t.Helper()
	env := testenv.Require(t)
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	username := testenv.UniqueName("alice")
	br, err := harness.StartBridge(ctx, harness.BridgeOptions{
		Binary: binary(t), Dir: t.TempDir(), HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: slot, DatabaseType: "postgres", DatabaseURI: env.NewDatabase(t),
		Admins: []id.UserID{id.NewUserID(username, env.Domain)},
	})
	if err != nil {
		t.Fatal(err)
	}
	stopOnCleanup(t, br)
	user, err := testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL, Username: username, Password: "correct horse battery",
		DataDir: t.TempDir(), Rules: testclient.RulesElementX,
		Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = user.Close() })
	remote, err := br.Login(ctx, user.UserID(), testenv.UniqueName("acct"), "")
	if err != nil {
		t.Fatal(err)
	}
	r := &restoreSetup{setup: &setup{env: env, slot: slot, bridge: br, user: user, remote: remote}}
	r.room = r.openPortal(t, ctx, "restore")
	r.roundTrip(t, ctx, "restore", r.room, "warm-up")
	return r
}

// bridgeSpeaks makes the bridge send the client one Olm message: discard-megolm-session drops the
// room's outbound Megolm session, and the bot's answer starts a new one, whose key goes to the
// client over Olm before the answer. The client reads the answer once it decrypted that message.
func (r *restoreSetup) bridgeSpeaks(t *testing.T, ctx context.Context) {
	t.Helper()
	seen := map[id.EventID]bool{}
	for _, evt := range r.user.Messages(r.room) {
		seen[evt.ID] = true
	}
	if _, err := r.user.SendText(ctx, r.room, "!wh discard-megolm-session"); err != nil {
		t.Fatal(err)
	}
	_, err := r.user.WaitForMessage(ctx, r.room, func(evt *event.Event) bool {
		return !seen[evt.ID] && evt.Sender == r.bridge.BotMXID && strings.Contains(evt.Content.AsMessage().Body, "Successfully reset")
	})
	if err != nil {
		t.Fatalf("the bot's answer to discard-megolm-session: %v", err)
	}
}

// deviceSpeaks makes the client send the bridge one Olm message: a new Megolm session, whose key
// goes over Olm before the message, and waits until the message is bridged.
func (r *restoreSetup) deviceSpeaks(t *testing.T, ctx context.Context, text string) {
	t.Helper()
	if err := r.user.RotateRoomKey(ctx, r.room); err != nil {
		t.Fatal(err)
	}
	if _, err := r.user.SendText(ctx, r.room, text); err != nil {
		t.Fatal(err)
	}
	r.waitOutbox(t, ctx, text, nil)
}

// waitBridged waits up to timeout until every text is in the outbox, and returns those that are not.
func (r *restoreSetup) waitBridged(ctx context.Context, timeout time.Duration, texts []string) []string {
	deadline := time.Now().Add(timeout)
	for {
		missing := slices.Clone(texts)
		if resp, err := r.remote.Outbox(ctx, 0, 500); err == nil {
			for _, msg := range resp.Messages {
				missing = slices.DeleteFunc(missing, func(text string) bool { return text == msg.Body })
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return missing
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// logged tells whether one line of the bridge's log after offset holds every substring.
func (r *restoreSetup) logged(offset int, substrs ...string) bool {
	data, err := os.ReadFile(r.bridge.LogPath)
	if err != nil || offset > len(data) {
		return false
	}
	return hasLine(data[offset:], substrs)
}
