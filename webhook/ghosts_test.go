package webhook_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/webhook"
)

const (
	alice   id.UserID = "@alice:" + fakeDomain
	mallory id.UserID = "@mallory:" + fakeDomain
)

// post posts text into a chat as a sender and fails the test on an error.
func post(t *testing.T, rc *webhook.RemoteClient, chatID, sender, name, text string) {
	t.Helper()
	_, err := rc.PostMessage(context.Background(), &webhook.PostMessageRequest{ChatID: chatID, Sender: sender, SenderName: name, Text: text})
	if err != nil {
		t.Fatalf("post %q as %s: %v", text, sender, err)
	}
}

// createChat creates a chat and fails the test on an error.
func createChat(t *testing.T, rc *webhook.RemoteClient, chatID string) *webhook.CreateChatResponse {
	t.Helper()
	resp, err := rc.CreateChat(context.Background(), chatID, "")
	if err != nil {
		t.Fatalf("create chat %s: %v", chatID, err)
	}
	return resp
}

// wantHTTPError checks that err is an API answer with the status and errcode.
func wantHTTPError(t *testing.T, what string, err error, status int, errCode string) {
	t.Helper()
	var httpErr *webhook.HTTPError
	if !errors.As(err, &httpErr) || httpErr.StatusCode != status || httpErr.ErrCode != errCode {
		t.Errorf("%s: %v, want %d %s", what, err, status, errCode)
	}
}

// senderOf returns who sent the message with the text, or "" when none was sent.
func senderOf(tb *testBridge, text string) id.UserID {
	for _, msg := range tb.matrix.sent() {
		if msg.body == text {
			return msg.sender
		}
	}
	return ""
}

// TestGhostsPerLogin: two logins that name the same sender get two ghosts, so one token holder
// can neither post as nor rename a sender of another login. Their chats are two portals too.
func TestGhostsPerLogin(t *testing.T) {
	forEachDatabase(t, func(t *testing.T, dialect, uri string) {
		tb := startBridge(t, dialect, uri, testConfig(10, 10))
		acme := tb.login(t, alice, "acme")
		evil := tb.login(t, mallory, "evil")
		acmeChat, evilChat := createChat(t, acme, "general"), createChat(t, evil, "general")
		if acmeChat.RoomID == evilChat.RoomID || !evilChat.Created {
			t.Errorf("the logins' chats named general: %+v and %+v, want two new rooms", acmeChat, evilChat)
		}

		post(t, acme, "general", "bob", "Bob", "from acme's bob")
		post(t, evil, "general", "bob", "Mallory", "from evil's bob")
		acmeBob, evilBob := senderOf(tb, "from acme's bob"), senderOf(tb, "from evil's bob")
		if acmeBob == "" || evilBob == "" {
			t.Fatalf("messages sent by %q and %q", acmeBob, evilBob)
		} else if acmeBob == evilBob {
			t.Errorf("both logins' bob is %s, want two different ghosts", acmeBob)
		}
		if name := tb.matrix.displayName(acmeBob); name != "Bob" {
			t.Errorf("acme's bob is named %q after evil posted as its bob, want Bob", name)
		}
		if name := tb.matrix.displayName(evilBob); name != "Mallory" {
			t.Errorf("evil's bob is named %q, want Mallory", name)
		}
		if want := tb.matrix.FormatGhostMXID(webhook.GhostID("acme", "bob")); acmeBob != want {
			t.Errorf("acme's bob is %s, want %s", acmeBob, want)
		}

		// A sender cannot name another login's ghost ID either.
		_, err := evil.PostMessage(context.Background(), &webhook.PostMessageRequest{ChatID: "general", Sender: "acme:bob", Text: "as acme's bob"})
		wantHTTPError(t, "post as acme:bob", err, http.StatusBadRequest, "M_INVALID_PARAM")
		if sender := senderOf(tb, "as acme's bob"); sender != "" {
			t.Errorf("refused message sent by %s", sender)
		}

		// The sender's Matrix user ID holds the login's too; one that would be too long is refused.
		long := "a" + strings.Repeat("_", 63)
		longLogin := tb.login(t, alice, long)
		createChat(t, longLogin, "general")
		_, err = longLogin.PostMessage(context.Background(), &webhook.PostMessageRequest{ChatID: "general", Sender: long, Text: "too long"})
		wantHTTPError(t, "post with a too long ghost user ID", err, http.StatusBadRequest, "M_INVALID_PARAM")
	})
}

// TestCreationLimits: a login creates at most max_chats_per_login chats and posts as at most
// max_senders_per_login senders, also with concurrent requests and after a restart; beyond, the
// API answers 403 M_RESOURCE_LIMIT_EXCEEDED and does nothing. Other logins and existing chats and
// senders are not affected.
func TestCreationLimits(t *testing.T) {
	const chats, senders = 3, 2
	ctx := context.Background()
	forEachDatabase(t, func(t *testing.T, dialect, uri string) {
		tb := startBridge(t, dialect, uri, testConfig(chats, senders))
		// "a_c" and "abc": a LIKE pattern with an unescaped _ would count abc's ghosts as a_c's.
		abc := tb.login(t, alice, "abc")
		other := tb.login(t, mallory, "a_c")

		// Concurrent creations of one login: exactly the limit succeed.
		var wg sync.WaitGroup
		errs := make([]error, 2*chats)
		for i := range errs {
			wg.Go(func() {
				_, errs[i] = abc.CreateChat(ctx, fmt.Sprintf("chat%d", i), "")
			})
		}
		wg.Wait()
		var created []string
		for i, err := range errs {
			if err == nil {
				created = append(created, fmt.Sprintf("chat%d", i))
			} else {
				wantHTTPError(t, "create chat beyond the limit", err, http.StatusForbidden, webhook.ErrCodeLimitExceeded)
			}
		}
		if len(created) != chats {
			t.Fatalf("%d of %d concurrent chats created, want %d", len(created), len(errs), chats)
		}
		chatID := created[0]
		if resp := createChat(t, abc, chatID); resp.Created {
			t.Errorf("existing chat %s created again", chatID)
		}
		createChat(t, other, "chat-of-another-login")

		post(t, abc, chatID, "s1", "", "one")
		post(t, abc, chatID, "s2", "", "two")
		_, err := abc.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: chatID, Sender: "s3", SenderName: "S3", Text: "three"})
		wantHTTPError(t, "post as a new sender beyond the limit", err, http.StatusForbidden, webhook.ErrCodeLimitExceeded)
		s3 := tb.matrix.FormatGhostMXID(webhook.GhostID("abc", "s3"))
		if sender := senderOf(tb, "three"); sender != "" || tb.matrix.displayName(s3) != "" {
			t.Errorf("refused post: sent by %q, ghost named %q", sender, tb.matrix.displayName(s3))
		}
		if ghost, err := tb.br.GetExistingGhostByID(ctx, webhook.GhostID("abc", "s3")); err != nil || ghost != nil {
			t.Errorf("refused sender has a ghost: %v, %v", ghost, err)
		}
		post(t, abc, chatID, "s1", "", "one again")
		post(t, other, "chat-of-another-login", "s3", "", "another login's s3")

		// The counts are the database's: a restart does not reset them.
		tb.stop()
		tb = startBridge(t, dialect, uri, testConfig(chats, senders))
		abc = webhook.NewRemoteClient(tb.api.URL, abc.Token)
		_, err = abc.CreateChat(ctx, "after-restart", "")
		wantHTTPError(t, "create chat beyond the limit after a restart", err, http.StatusForbidden, webhook.ErrCodeLimitExceeded)
		_, err = abc.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: chatID, Sender: "s4", Text: "four"})
		wantHTTPError(t, "post as a new sender beyond the limit after a restart", err, http.StatusForbidden, webhook.ErrCodeLimitExceeded)
		post(t, abc, chatID, "s2", "", "two again")
	})
}

// TestGhostID: every login and sender pair has its own ghost ID.
func TestGhostID(t *testing.T) {
	pairs := []struct {
		login  networkid.UserLoginID
		sender string
	}{
		{"acme", "bob"}, {"evil", "bob"}, {"acme", "bobby"}, {"acme.b", "ob"}, {"acme", "b.ob"},
		{"a_c", "x"}, {"a", "c_x"}, {"a=3a", "b"}, {"a", "3ab"}, {"bob", "acme"},
	}
	seen := make(map[networkid.UserID]int)
	for i, p := range pairs {
		ghostID := webhook.GhostID(p.login, p.sender)
		if j, ok := seen[ghostID]; ok {
			t.Errorf("%+v and %+v have the same ghost ID %q", pairs[j], p, ghostID)
		}
		seen[ghostID] = i
		if !strings.HasPrefix(string(ghostID), string(p.login)+":") {
			t.Errorf("ghost ID %q of %+v does not start with the login", ghostID, p)
		}
	}
}
