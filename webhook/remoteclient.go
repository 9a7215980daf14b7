package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// RemoteClient is how a remote system uses the webhook API of one login. Tests, the demo and the
// wedge lab use it as the remote side of the bridge.
type RemoteClient struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// NewRemoteClient returns a client for the bridge at baseURL (its appservice address).
func NewRemoteClient(baseURL, token string) *RemoteClient {
	return &RemoteClient{BaseURL: baseURL, Token: token, HTTP: http.DefaultClient}
}

// HTTPError is a non-2xx answer of the webhook API.
type HTTPError struct {
	StatusCode int
	// RetryAfter is the answer's Retry-After header (1 s without one).
	RetryAfter time.Duration
	APIError
}

func (e *HTTPError) Error() string {
	return fmt.Sprintf("webhook API answered %d %s: %s", e.StatusCode, e.ErrCode, e.Err)
}

// CreateChat creates (or returns) the portal of a chat.
func (rc *RemoteClient) CreateChat(ctx context.Context, chatID, name string) (*CreateChatResponse, error) {
	var resp CreateChatResponse
	return &resp, rc.do(ctx, http.MethodPost, "/chats", &CreateChatRequest{ChatID: chatID, Name: name}, &resp)
}

// PostMessage posts a message from a remote sender into a chat.
func (rc *RemoteClient) PostMessage(ctx context.Context, msg *PostMessageRequest) (*PostMessageResponse, error) {
	var resp PostMessageResponse
	return &resp, rc.do(ctx, http.MethodPost, "/messages", msg, &resp)
}

// Outbox lists Matrix messages bridged to this login with an outbox ID above after.
func (rc *RemoteClient) Outbox(ctx context.Context, after int64, limit int) (*OutboxResponse, error) {
	var resp OutboxResponse
	q := url.Values{"after": {strconv.FormatInt(after, 10)}, "limit": {strconv.Itoa(limit)}}
	return &resp, rc.do(ctx, http.MethodGet, "/outbox?"+q.Encode(), nil, &resp)
}

// Whoami returns the login the token belongs to.
func (rc *RemoteClient) Whoami(ctx context.Context) (*WhoamiResponse, error) {
	var resp WhoamiResponse
	return &resp, rc.do(ctx, http.MethodGet, "/whoami", nil, &resp)
}

func (rc *RemoteClient) do(ctx context.Context, method, path string, body, into any) error {
	var data []byte
	if body != nil {
		var err error
		if data, err = json.Marshal(body); err != nil {
			return err
		}
	}
	for {
		err := rc.doOnce(ctx, method, path, data, into)
		var httpErr *HTTPError
		if !errors.As(err, &httpErr) || httpErr.ErrCode != ErrCodeNotReady {
			return err
		}
		// The bridge is starting and did nothing with the request: send it again.
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (while the bridge was starting: %w)", ctx.Err(), err)
		case <-time.After(httpErr.RetryAfter):
		}
	}
}

func (rc *RemoteClient) doOnce(ctx context.Context, method, path string, body []byte, into any) error {
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, rc.BaseURL+APIPrefix+path, reader)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+rc.Token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := rc.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode < 200 || resp.StatusCode >= 300 {
		httpErr := &HTTPError{StatusCode: resp.StatusCode, RetryAfter: retryAfter(resp.Header.Get("Retry-After"))}
		_ = json.Unmarshal(data, &httpErr.APIError)
		return httpErr
	}
	return json.Unmarshal(data, into)
}

// retryAfter reads a Retry-After header in seconds, between 100 ms and 10 s (1 s if absent).
func retryAfter(header string) time.Duration {
	secs, err := strconv.Atoi(header)
	if err != nil {
		return time.Second
	}
	return min(max(time.Duration(secs)*time.Second, 100*time.Millisecond), 10*time.Second)
}
