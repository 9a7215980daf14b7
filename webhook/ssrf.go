package webhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"syscall"
	"time"
)

// Outgoing webhook URLs are chosen by users, so without limits the bridge would POST wherever a
// user asks: to its own loopback services, the private network it runs in, or a cloud metadata
// endpoint (169.254.169.254), and the errors would tell the user which ports are open. Unless
// network.delivery.allow_private_addresses is set, the bridge only connects to public internet
// addresses. The check runs on the address of every connection the delivery client makes (after
// DNS resolution, in the dialer), so a host that resolves to a public address at login and to a
// private one later (DNS rebinding) is refused too; login checks the URL as well, to tell the user
// early.

// errForbiddenAddress is the error a refused connection wraps.
var errForbiddenAddress = errors.New("not a public internet address")

// nonPublicPrefixes are special-purpose ranges (RFC 6890 and the IANA registries) that
// netip.Addr's predicates do not cover.
var nonPublicPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network"
	netip.MustParsePrefix("100.64.0.0/10"),   // carrier-grade NAT (RFC 6598)
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("192.0.2.0/24"),    // TEST-NET-1
	netip.MustParsePrefix("192.88.99.0/24"),  // 6to4 relay anycast
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"), // TEST-NET-2
	netip.MustParsePrefix("203.0.113.0/24"),  // TEST-NET-3
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, and 255.255.255.255
	netip.MustParsePrefix("::/96"),           // IPv4-compatible (deprecated), :: and ::1
	netip.MustParsePrefix("64:ff9b::/96"),    // NAT64: may reach any IPv4 address, private ones too
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local-use NAT64
	netip.MustParsePrefix("100::/64"),        // discard-only
	netip.MustParsePrefix("2001::/23"),       // IETF protocol assignments, Teredo among them
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("2002::/16"),       // 6to4: embeds any IPv4 address
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
}

// checkAddress returns nil for a public internet address and an error wrapping
// errForbiddenAddress for loopback, private (RFC 1918, fc00::/7), link-local (169.254/16, which
// holds cloud metadata endpoints, and fe80::/10), unspecified, multicast, broadcast and the other
// special-purpose ranges. IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
func checkAddress(ip netip.Addr) error {
	if !ip.IsValid() {
		return fmt.Errorf("invalid address: %w", errForbiddenAddress)
	}
	ip = ip.Unmap().WithZone("")
	switch {
	case ip.IsLoopback():
		return fmt.Errorf("%s is a loopback address: %w", ip, errForbiddenAddress)
	case ip.IsPrivate():
		return fmt.Errorf("%s is a private address: %w", ip, errForbiddenAddress)
	case ip.IsLinkLocalUnicast():
		return fmt.Errorf("%s is a link-local address: %w", ip, errForbiddenAddress)
	case ip.IsUnspecified():
		return fmt.Errorf("%s is the unspecified address: %w", ip, errForbiddenAddress)
	case ip.IsMulticast():
		return fmt.Errorf("%s is a multicast address: %w", ip, errForbiddenAddress)
	case !ip.IsGlobalUnicast():
		return fmt.Errorf("%s is not a global unicast address: %w", ip, errForbiddenAddress)
	}
	for _, prefix := range nonPublicPrefixes {
		if prefix.Contains(ip) {
			return fmt.Errorf("%s is in the special-purpose range %s: %w", ip, prefix, errForbiddenAddress)
		}
	}
	return nil
}

// dialControl is the net.Dialer Control function of the delivery client: it runs for every
// connection, with the resolved address, just before connecting.
func dialControl(network, address string, _ syscall.RawConn) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return fmt.Errorf("network %s: %w", network, errForbiddenAddress)
	}
	addrPort, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("unparsable address %q: %w", address, errForbiddenAddress)
	}
	return checkAddress(addrPort.Addr())
}

// newDeliveryClient is the HTTP client that POSTs to outgoing webhooks. It follows no redirects
// (a 3xx is a failed delivery) and uses no proxy from the environment (a proxy would connect to
// private addresses on the bridge's behalf); unless allowPrivate, its dialer refuses every
// connection to a non-public address.
func newDeliveryClient(timeout time.Duration, allowPrivate bool) *http.Client {
	dialer := &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}
	if !allowPrivate {
		dialer.Control = dialControl
	}
	transport := &http.Transport{
		Proxy:                 nil,
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	return &http.Client{
		Timeout:   timeout,
		Transport: transport,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// checkWebhookURL is the login-time check of an outgoing webhook URL: parseWebhookURL's syntax
// (absolute http or https), and unless private addresses are allowed, a host that resolves only
// to public addresses. Its errors are shown to the user; they do not say whether a host that is
// refused does not resolve or resolves to a non-public address.
func (c *Connector) checkWebhookURL(ctx context.Context, raw string) (string, error) {
	webhookURL, err := parseWebhookURL(raw)
	if err != nil || webhookURL == "" || c.Config.Delivery.AllowPrivateAddresses {
		return webhookURL, err
	}
	u, err := url.Parse(webhookURL)
	if err != nil {
		return "", fmt.Errorf("invalid webhook URL: %w", err)
	}
	host := u.Hostname()
	refused := fmt.Errorf("invalid webhook URL: %s does not resolve to a public internet address "+
		"(loopback, private, link-local and other non-public addresses are refused)", host)
	var addrs []netip.Addr
	if ip, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{ip}
	} else {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if addrs, err = net.DefaultResolver.LookupNetIP(ctx, "ip", host); err != nil || len(addrs) == 0 {
			return "", refused
		}
	}
	for _, ip := range addrs {
		if checkAddress(ip) != nil {
			return "", refused
		}
	}
	return webhookURL, nil
}
