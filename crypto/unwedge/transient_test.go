package unwedge

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix"
)

// TestRefused: the failures a heal may retry a key claim after are those that prove the
// homeserver did nothing. Every failure here is transient; only some are refused. The errors are
// the client's own, from real requests.
func TestRefused(t *testing.T) {
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch path := strings.TrimPrefix(r.URL.Path, "/"); path {
		case "drop":
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				_ = conn.Close()
			}
		case "hang":
			select {
			case <-stop:
			case <-r.Context().Done():
			}
		default:
			code, _ := strconv.Atoi(path)
			http.Error(w, `{"errcode":"M_UNKNOWN","error":"failed"}`, code)
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(stop) })
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "http://" + closed.Addr().String()
	_ = closed.Close()

	cli, err := mautrix.NewClient(srv.URL, "", "")
	if err != nil {
		t.Fatal(err)
	}
	cli.Client = &http.Client{Timeout: 200 * time.Millisecond}
	cases := []struct {
		name    string
		url     string
		refused bool
	}{
		{"rate limited", srv.URL + "/429", true},
		{"service unavailable", srv.URL + "/503", true},
		{"connection refused", closedURL + "/claim", true},
		{"bad gateway", srv.URL + "/502", false},
		{"gateway timeout", srv.URL + "/504", false},
		{"internal server error", srv.URL + "/500", false},
		{"connection dropped", srv.URL + "/drop", false},
		{"timeout", srv.URL + "/hang", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := cli.MakeRequest(context.Background(), http.MethodPost, tc.url, struct{}{}, nil)
			if err == nil {
				t.Fatal("no error")
			}
			if !transient(err) {
				t.Errorf("%v is not transient", err)
			}
			if got := refused(err); got != tc.refused {
				t.Errorf("refused(%v) = %v, want %v", err, got, tc.refused)
			}
		})
	}
}
