package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"

	"github.com/unwedge/unwedge/webhook"
	"github.com/unwedge/unwedge/webhook/store"
)

// flakyWebhook answers 503 to the first failures posts, then 200, and records what it got.
type flakyWebhook struct {
	mu       sync.Mutex
	failures int
	got      []webhook.OutgoingMessage
}

func (f *flakyWebhook) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failures > 0 {
		f.failures--
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	var msg webhook.OutgoingMessage
	if err := json.NewDecoder(r.Body).Decode(&msg); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	f.got = append(f.got, msg)
	w.WriteHeader(http.StatusNoContent)
}

func TestWebhookDeliveryRetries(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	hook := &flakyWebhook{failures: 2}
	srv := httptest.NewServer(hook)
	defer srv.Close()
	s := startShared(t, ctx, srv.URL)
	room := s.openPortal(t, ctx, "ops")

	const text = "deploy finished"
	evtID, err := s.user.SendText(ctx, room, text)
	if err != nil {
		t.Fatal(err)
	}
	msg := s.waitOutbox(t, ctx, text, func(m *store.OutboxMessage) bool { return m.Status == store.OutboxDelivered })
	if msg.Attempts != 3 {
		t.Errorf("delivered after %d attempts, want 3 (two 503s, then 204)", msg.Attempts)
	}
	hook.mu.Lock()
	defer hook.mu.Unlock()
	if len(hook.got) != 1 || hook.got[0].EventID != evtID || hook.got[0].Text != text || hook.got[0].ChatID != "ops" {
		t.Errorf("webhook received %+v, want one post of %s", hook.got, evtID)
	}
}

func TestWebhookAPIRejectsBadInput(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := startShared(t, ctx, "")
	room := s.openPortal(t, ctx, "general")

	post := func(token, contentType, body string) (int, string) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.bridge.URL+webhook.APIPrefix+"/messages", strings.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		req.Header.Set("Content-Type", contentType)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var apiErr webhook.APIError
		_ = json.NewDecoder(resp.Body).Decode(&apiErr)
		return resp.StatusCode, apiErr.ErrCode
	}
	valid := `{"chat_id":"general","sender":"bob","text":"hi"}`
	cases := []struct {
		name, token, contentType, body string
		status                         int
		errcode                        string
	}{
		{"no token", "", "application/json", valid, 401, "M_MISSING_TOKEN"},
		{"wrong token", "not-a-token", "application/json", valid, 401, "M_UNKNOWN_TOKEN"},
		{"bad json", s.remote.Token, "application/json", `{"chat_id":`, 400, "M_BAD_JSON"},
		{"unknown field", s.remote.Token, "application/json", `{"chat_id":"general","sender":"bob","text":"hi","x":1}`, 400, "M_BAD_JSON"},
		{"trailing data", s.remote.Token, "application/json", valid + `{}`, 400, "M_BAD_JSON"},
		{"not json", s.remote.Token, "text/plain", valid, 415, "M_BAD_JSON"},
		{"missing text", s.remote.Token, "application/json", `{"chat_id":"general","sender":"bob"}`, 400, "M_INVALID_PARAM"},
		{"missing sender", s.remote.Token, "application/json", `{"chat_id":"general","text":"hi"}`, 400, "M_INVALID_PARAM"},
		{"bad sender", s.remote.Token, "application/json", `{"chat_id":"general","sender":"Bob Smith","text":"hi"}`, 400, "M_INVALID_PARAM"},
		{"huge text", s.remote.Token, "application/json", `{"chat_id":"general","sender":"bob","text":"` + strings.Repeat("a", 20000) + `"}`, 400, "M_INVALID_PARAM"},
		{"huge body", s.remote.Token, "application/json", `{"chat_id":"general","sender":"bob","text":"` + strings.Repeat("a", 70000) + `"}`, 413, "M_TOO_LARGE"},
		{"unknown portal", s.remote.Token, "application/json", `{"chat_id":"nowhere","sender":"bob","text":"hi"}`, 404, "M_NOT_FOUND"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, code := post(tc.token, tc.contentType, tc.body)
			if status != tc.status || code != tc.errcode {
				t.Errorf("got %d %s, want %d %s", status, code, tc.status, tc.errcode)
			}
		})
	}

	// Nothing changed: a valid message after all of that is the only one the user sees.
	if _, err := s.remote.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: "general", Sender: "bob", Text: "the only one"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.user.WaitForMessage(ctx, room, bodyIs("the only one")); err != nil {
		t.Fatal(err)
	}
	for _, evt := range s.user.Messages(room) {
		if body := evt.Content.AsMessage().Body; body != "the only one" {
			t.Errorf("unexpected message in portal: %q", body)
		}
	}
	var notFound *webhook.HTTPError
	if _, err := s.remote.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: "nowhere", Sender: "bob", Text: "x"}); !errors.As(err, &notFound) || notFound.StatusCode != 404 {
		t.Errorf("post to unknown chat: %v", err)
	}
	if _, err := s.remote.CreateChat(ctx, "Bad Chat", ""); !errors.As(err, &notFound) || notFound.StatusCode != 400 {
		t.Errorf("create chat with bad id: %v", err)
	}
}

func TestWebhookDeliveryGivesUpWithNotice(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// A 4xx other than 408/429 is permanent: no retries, the sender is told.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusForbidden)
	}))
	defer srv.Close()
	s := startShared(t, ctx, srv.URL)
	room := s.openPortal(t, ctx, "ops")

	const text = "this one bounces"
	if _, err := s.user.SendText(ctx, room, text); err != nil {
		t.Fatal(err)
	}
	msg := s.waitOutbox(t, ctx, text, func(m *store.OutboxMessage) bool { return m.Status == store.OutboxFailed })
	if msg.Attempts != 1 || !strings.Contains(msg.LastError, "403") {
		t.Errorf("failed message = %+v, want one attempt with the 403", msg)
	}
	notice, err := s.user.WaitForMessage(ctx, room, func(evt *event.Event) bool {
		return evt.Sender == s.bridge.BotMXID && strings.Contains(evt.Content.AsMessage().Body, "not delivered")
	})
	if err != nil {
		t.Fatal(err)
	}
	if notice.Content.AsMessage().MsgType != event.MsgNotice {
		t.Errorf("failure report is %s, want m.notice", notice.Content.AsMessage().MsgType)
	}
}
