package webhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unwedge/unwedge/webhook/store"
)

// TestCheckAddress: only public internet addresses pass. Nothing is dialed.
func TestCheckAddress(t *testing.T) {
	refused := []string{
		"127.0.0.1", "127.1.2.3", // loopback
		"10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.0.1", "192.168.255.1", // RFC 1918
		"169.254.169.254", "169.254.0.1", // link-local, cloud metadata
		"0.0.0.0", "0.1.2.3", // unspecified, "this network"
		"100.64.0.1",                   // carrier-grade NAT
		"224.0.0.1", "239.255.255.250", // multicast
		"255.255.255.255", "240.0.0.1", // broadcast, reserved
		"192.0.2.1", "198.18.0.1", // documentation, benchmarking
		"::1", "::", // loopback, unspecified
		"fc00::1", "fd12:3456::1", // unique local (fc00::/7)
		"fe80::1", "fe80::1%eth0", // link-local
		"ff02::1", "ff05::2", // multicast
		"::ffff:127.0.0.1", "::ffff:10.0.0.1", // IPv4-mapped
		"::ffff:169.254.169.254",
		"::127.0.0.1",         // IPv4-compatible
		"64:ff9b::a9fe:a9fe",  // NAT64 of 169.254.169.254
		"2002:7f00:1::1",      // 6to4 of 127.0.0.1
		"2001:db8::1",         // documentation
		"fec0::1",             // site-local
		"2001:0:4136:e378::1", // Teredo
	}
	allowed := []string{"8.8.8.8", "1.1.1.1", "93.184.216.34", "11.0.0.1", "172.32.0.1", "192.169.0.1",
		"169.255.0.1", "2606:4700:4700::1111", "2a00:1450:4001::1"}
	for _, s := range refused {
		if err := checkAddress(netip.MustParseAddr(s)); !errors.Is(err, errForbiddenAddress) {
			t.Errorf("checkAddress(%s) = %v, want it refused", s, err)
		}
	}
	for _, s := range allowed {
		if err := checkAddress(netip.MustParseAddr(s)); err != nil {
			t.Errorf("checkAddress(%s) = %v, want it allowed", s, err)
		}
	}
	if checkAddress(netip.Addr{}) == nil {
		t.Error("the zero address is allowed")
	}
}

// TestDialControl: the dialer's Control function, given resolved addresses as the dialer passes
// them, refuses the non-public ones. It is called directly: nothing is dialed.
func TestDialControl(t *testing.T) {
	cases := []struct {
		network, address string
		ok               bool
	}{
		{"tcp4", "127.0.0.1:80", false},
		{"tcp4", "10.1.2.3:443", false},
		{"tcp4", "192.168.1.1:8080", false},
		{"tcp4", "172.16.5.4:22", false},
		{"tcp4", "169.254.169.254:80", false},
		{"tcp6", "[::1]:80", false},
		{"tcp6", "[fc00::1]:80", false},
		{"tcp6", "[fe80::1%eth0]:80", false},
		{"tcp6", "[::ffff:127.0.0.1]:80", false},
		{"tcp4", "0.0.0.0:80", false},
		{"tcp4", "not-an-address:80", false},
		{"udp4", "8.8.8.8:53", false},
		{"tcp4", "93.184.216.34:443", true},
		{"tcp6", "[2606:4700:4700::1111]:443", true},
	}
	for _, tc := range cases {
		err := dialControl(tc.network, tc.address, nil)
		if tc.ok && err != nil {
			t.Errorf("dialControl(%s, %s) = %v, want allowed", tc.network, tc.address, err)
		} else if !tc.ok && !errors.Is(err, errForbiddenAddress) {
			t.Errorf("dialControl(%s, %s) = %v, want refused", tc.network, tc.address, err)
		}
	}
}

// countingServer is an httptest server on 127.0.0.1 that counts its requests.
func countingServer(t *testing.T, handler http.HandlerFunc) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		if handler != nil {
			handler(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func postTo(client *http.Client, target string) error {
	req, err := http.NewRequest(http.MethodPost, target, strings.NewReader("{}"))
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err == nil {
		_ = resp.Body.Close()
	}
	return err
}

// TestDeliveryClientRefusesPrivateAddresses: the delivery client refuses a webhook on loopback
// at dial time, by IP and by a name that resolves to loopback, unless allow_private_addresses;
// with it, it reaches the same server. Only loopback is dialed.
func TestDeliveryClientRefusesPrivateAddresses(t *testing.T) {
	srv, requests := countingServer(t, nil)
	u, _ := url.Parse(srv.URL)
	port := u.Port()
	targets := []string{
		srv.URL,                                   // 127.0.0.1
		"http://localhost:" + port + "/hook",      // a name that resolves to loopback
		"http://[::1]:" + port + "/hook",          // refused before connecting
		"http://127.0.0.2:" + port + "/hook",      // the rest of 127/8
		"http://0.0.0.0:" + port + "/hook",        // unspecified: Linux connects it to loopback
		"http://[::ffff:127.0.0.1]:" + port + "/", // IPv4-mapped
	}
	strict := newDeliveryClient(5*time.Second, false)
	for _, target := range targets {
		if err := postTo(strict, target); !errors.Is(err, errForbiddenAddress) {
			t.Errorf("POST %s with private addresses refused = %v, want a refused address", target, err)
		}
	}
	if n := requests.Load(); n != 0 {
		t.Fatalf("the loopback server got %d requests through the strict client", n)
	}
	if err := postTo(newDeliveryClient(5*time.Second, true), srv.URL); err != nil || requests.Load() != 1 {
		t.Errorf("POST %s with private addresses allowed = %v, %d requests; want it delivered", srv.URL, err, requests.Load())
	}
}

// TestDeliveryNoRedirects: a 302 to another server is not followed; it is a permanent delivery
// failure whose text says so.
func TestDeliveryNoRedirects(t *testing.T) {
	target, targetRequests := countingServer(t, nil)
	for _, code := range []int{http.StatusFound, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		redirector, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, target.URL+"/elsewhere", code)
		})
		d := &deliverer{http: newDeliveryClient(5*time.Second, true)}
		derr := d.post(context.Background(), redirector.URL, &store.OutboxMessage{ID: 1, ChatID: "c", Body: "hi"})
		if derr == nil || !derr.permanent || !strings.Contains(derr.public, fmt.Sprintf("(HTTP %d)", code)) ||
			!strings.Contains(derr.public, "redirects are not followed") {
			t.Errorf("%d redirect: %+v, want a permanent failure that names no redirect target", code, derr)
		}
		if derr != nil && strings.Contains(derr.public, target.URL) {
			t.Errorf("%d redirect: public text %q names the target", code, derr.public)
		}
	}
	if n := targetRequests.Load(); n != 0 {
		t.Errorf("the redirect target got %d requests", n)
	}
}

// TestDeliveryErrorText: what the user sees (outbox last_error, room notice) holds the HTTP
// status or a generic "could not be reached", never addresses, ports or dial errors; the bridge
// log gets the detail.
func TestDeliveryErrorText(t *testing.T) {
	srv500, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "internal detail from 10.0.0.5", http.StatusInternalServerError)
	})
	srv403, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusForbidden) })
	// A port on loopback nothing listens on: the dial error is "connection refused".
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	_ = ln.Close()
	_, closedPort, _ := net.SplitHostPort(closedAddr)
	_, port500, _ := net.SplitHostPort(strings.TrimPrefix(srv500.URL, "http://"))

	cases := []struct {
		name         string
		allowPrivate bool
		url          string
		public       string
		permanent    bool
		detail       string
	}{
		{"500", true, srv500.URL, "delivery failed (HTTP 500)", false, "500"},
		{"403", true, srv403.URL, "delivery failed (HTTP 403)", true, "403"},
		{"closed port", true, "http://" + closedAddr + "/", errUnreachable, false, "refused"},
		{"refused address", false, srv500.URL, errUnreachable, false, "loopback"},
		{"refused name", false, "http://localhost:" + port500 + "/", errUnreachable, false, "loopback"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := &deliverer{http: newDeliveryClient(5*time.Second, tc.allowPrivate)}
			derr := d.post(context.Background(), tc.url, &store.OutboxMessage{ID: 1, ChatID: "c", Body: "hi"})
			if derr == nil {
				t.Fatal("delivered")
			}
			if derr.public != tc.public || derr.permanent != tc.permanent {
				t.Errorf("public %q permanent %t, want %q %t", derr.public, derr.permanent, tc.public, tc.permanent)
			}
			for _, leak := range []string{"127.0.0.1", "localhost", "10.0.0.5", closedPort, port500, "dial", "refused", "connect", "tcp", "loopback"} {
				if strings.Contains(derr.public, leak) {
					t.Errorf("public text %q contains %q", derr.public, leak)
				}
			}
			if !strings.Contains(derr.Error(), tc.detail) {
				t.Errorf("log detail %q does not contain %q", derr.Error(), tc.detail)
			}
		})
	}
}

// TestLoginRefusesPrivateWebhookURL: login refuses a webhook URL on a non-public address with a
// message that says why, unless allow_private_addresses; the scheme must be http or https.
// Only literal addresses and "localhost" are used, so no DNS query leaves the machine.
func TestLoginRefusesPrivateWebhookURL(t *testing.T) {
	ctx := context.Background()
	strict := &Connector{}
	refused := []string{
		"http://127.0.0.1:9000/", "http://localhost:9000/hook", "https://10.1.2.3/", "http://192.168.1.1/",
		"http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]:80/",
		"http://[fc00::1]/", "http://[fe80::1%25eth0]/", "http://0.0.0.0:80/", "http://[::ffff:127.0.0.1]/",
	}
	for _, raw := range refused {
		lp := &loginProcess{conn: strict}
		_, err := lp.SubmitUserInput(ctx, map[string]string{"account": "alice", "webhook_url": raw})
		if err == nil || !strings.Contains(err.Error(), "public internet address") {
			t.Errorf("login with %s: %v, want it refused as not public", raw, err)
		}
	}
	for _, raw := range []string{"ftp://93.184.216.34/", "file:///etc/passwd", "gopher://127.0.0.1:25/"} {
		lp := &loginProcess{conn: strict}
		_, err := lp.SubmitUserInput(ctx, map[string]string{"account": "alice", "webhook_url": raw})
		if err == nil || !strings.Contains(err.Error(), "http or https") {
			t.Errorf("login with %s: %v, want the scheme refused", raw, err)
		}
	}
	for _, raw := range []string{"https://93.184.216.34/hook", "http://[2606:4700:4700::1111]:8080/", "none", ""} {
		if _, err := strict.checkWebhookURL(ctx, raw); err != nil {
			t.Errorf("checkWebhookURL(%s) = %v, want it accepted", raw, err)
		}
	}
	lax := &Connector{Config: Config{Delivery: DeliveryConfig{AllowPrivateAddresses: true}}}
	for _, raw := range refused {
		if got, err := lax.checkWebhookURL(ctx, raw); err != nil || got == "" {
			t.Errorf("checkWebhookURL(%s) with private addresses allowed = %q, %v", raw, got, err)
		}
	}
}
