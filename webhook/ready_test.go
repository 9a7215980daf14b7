package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// TestAPINotReady checks that the API, which bridgev2 serves before the connector started,
// answers every endpoint with a 503 the client can retry, and does nothing else.
func TestAPINotReady(t *testing.T) {
	c := &Connector{}
	router := http.NewServeMux()
	c.registerAPI(router)
	cases := []struct{ method, path string }{
		{http.MethodPost, APIPrefix + "/chats"},
		{http.MethodPost, APIPrefix + "/messages"},
		{http.MethodGet, APIPrefix + "/outbox"},
		{http.MethodGet, APIPrefix + "/whoami"},
	}
	for _, tc := range cases {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(tc.method, tc.path, nil)
		r.Header.Set("Authorization", "Bearer some-token")
		router.ServeHTTP(w, r)
		var apiErr APIError
		_ = json.Unmarshal(w.Body.Bytes(), &apiErr)
		if w.Code != http.StatusServiceUnavailable || apiErr.ErrCode != ErrCodeNotReady || w.Header().Get("Retry-After") != "1" {
			t.Errorf("%s %s while starting: %d %+v Retry-After %q, want 503 %s Retry-After 1",
				tc.method, tc.path, w.Code, apiErr, w.Header().Get("Retry-After"), ErrCodeNotReady)
		}
	}
}

// TestRemoteClientRetriesNotReady checks that the client sends a request again while the bridge
// answers "not ready", keeps the body, and gives up with the context.
func TestRemoteClientRetriesNotReady(t *testing.T) {
	var calls atomic.Int32
	var notReadyFor atomic.Int32
	notReadyFor.Store(2)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		var req PostMessageRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Text != "hello" {
			writeError(w, http.StatusBadRequest, "M_BAD_JSON", "lost the body")
			return
		}
		if n <= notReadyFor.Load() {
			w.Header().Set("Retry-After", "0")
			writeError(w, http.StatusServiceUnavailable, ErrCodeNotReady, "the bridge is starting")
			return
		}
		writeJSON(w, http.StatusOK, &PostMessageResponse{MessageID: "m1"})
	}))
	defer server.Close()
	rc := NewRemoteClient(server.URL, "token")
	ctx := context.Background()
	resp, err := rc.PostMessage(ctx, &PostMessageRequest{ChatID: "general", Sender: "bob", Text: "hello"})
	if err != nil || resp.MessageID != "m1" || calls.Load() != 3 {
		t.Fatalf("PostMessage = %+v, %v after %d calls; want m1 after 3", resp, err, calls.Load())
	}

	calls.Store(0)
	notReadyFor.Store(1 << 30)
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	_, err = rc.PostMessage(ctx, &PostMessageRequest{ChatID: "general", Sender: "bob", Text: "hello"})
	var httpErr *HTTPError
	if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &httpErr) || httpErr.ErrCode != ErrCodeNotReady {
		t.Errorf("PostMessage to a bridge that stays not ready: %v, want the deadline and %s", err, ErrCodeNotReady)
	}
}
