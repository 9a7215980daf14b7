package webhook

import (
	"os"
	"strings"
	"testing"
	"time"

	up "go.mau.fi/util/configupgrade"
	"gopkg.in/yaml.v3"
)

func TestExampleConfigIsValid(t *testing.T) {
	var cfg Config
	if err := yaml.Unmarshal([]byte(ExampleConfig), &cfg); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("example config invalid: %v", err)
	}
	if cfg.MaxChatsPerLogin != 1000 || cfg.MaxSendersPerLogin != 1000 {
		t.Errorf("creation limits %d chats, %d senders, want 1000 and 1000", cfg.MaxChatsPerLogin, cfg.MaxSendersPerLogin)
	}
	if cfg.Delivery.Timeout != 10*time.Second || cfg.Delivery.MaxBackoff != 5*time.Minute {
		t.Errorf("durations not parsed: %+v", cfg.Delivery)
	}
	if cfg.Delivery.AllowPrivateAddresses || !strings.Contains(networkExample, "\n    allow_private_addresses: false\n") {
		t.Error("the example config does not document delivery.allow_private_addresses: false")
	}
}

// TestRootExampleConfigHasNetworkBlock: the repository's example-config.yaml holds the webhook
// network's options as embedded (indented under network:).
func TestRootExampleConfigHasNetworkBlock(t *testing.T) {
	full, err := os.ReadFile("../example-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var indented strings.Builder
	for _, line := range strings.Split(strings.TrimRight(networkExample, "\n"), "\n") {
		if line != "" {
			line = "    " + line
		}
		indented.WriteString(line + "\n")
	}
	if !strings.Contains(string(full), "\nnetwork:\n"+indented.String()) {
		t.Error("example-config.yaml does not hold webhook/example-config.yaml under network: (run scripts/gen-example-config.sh)")
	}
}

// TestConfigUpgrade: a config from before the creation limits gets the example's; set ones are kept.
func TestConfigUpgrade(t *testing.T) {
	cases := []struct {
		name, config   string
		chats, senders int
	}{
		{"before the limits", "max_body_bytes: 2048\nmax_text_bytes: 1024\n", 1000, 1000},
		{"limits set", "max_chats_per_login: 5\nmax_senders_per_login: 7\n", 5, 7},
	}
	example, _, upgrader := (&Connector{}).GetConfig()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := up.DoBytes([]byte(tc.config), up.MergeUpgraders(example, upgrader))
			if err != nil {
				t.Fatal(err)
			}
			var cfg Config
			if err = yaml.Unmarshal(out, &cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.MaxChatsPerLogin != tc.chats || cfg.MaxSendersPerLogin != tc.senders || cfg.Validate() != nil {
				t.Errorf("upgraded to %d chats, %d senders (%v), want %d and %d", cfg.MaxChatsPerLogin, cfg.MaxSendersPerLogin, cfg.Validate(), tc.chats, tc.senders)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	valid := func() Config {
		return Config{MaxBodyBytes: 65536, MaxTextBytes: 16384, MaxChatsPerLogin: 10, MaxSendersPerLogin: 10, Delivery: DeliveryConfig{
			Timeout: time.Second, MaxAttempts: 3, MinBackoff: time.Second, MaxBackoff: time.Minute}}
	}
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"valid", func(*Config) {}, ""},
		{"tiny body", func(c *Config) { c.MaxBodyBytes = 10 }, "max_body_bytes"},
		{"text above body", func(c *Config) { c.MaxTextBytes = 70000 }, "max_text_bytes"},
		{"no chats", func(c *Config) { c.MaxChatsPerLogin = 0 }, "max_chats_per_login"},
		{"no senders", func(c *Config) { c.MaxSendersPerLogin = 0 }, "max_senders_per_login"},
		{"no timeout", func(c *Config) { c.Delivery.Timeout = 0 }, "timeout"},
		{"no attempts", func(c *Config) { c.Delivery.MaxAttempts = 0 }, "max_attempts"},
		{"backoff inverted", func(c *Config) { c.Delivery.MaxBackoff = time.Millisecond }, "min_backoff"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid()
			tc.mutate(&cfg)
			err := cfg.Validate()
			if tc.want == "" && err != nil {
				t.Fatalf("unexpected error: %v", err)
			} else if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("error %v, want one about %s", err, tc.want)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	d := DeliveryConfig{MinBackoff: time.Second, MaxBackoff: 10 * time.Second}
	want := []time.Duration{time.Second, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second}
	for attempts, w := range want {
		if got := d.backoff(attempts); got != w {
			t.Errorf("backoff(%d) = %s, want %s", attempts, got, w)
		}
	}
	if got := d.backoff(1000); got != 10*time.Second {
		t.Errorf("backoff(1000) = %s", got)
	}
}

func TestTokenFromInstructions(t *testing.T) {
	cases := []struct {
		in, token string
		ok        bool
	}{
		{"Logged in as a. Use `Authorization: Bearer abc_DEF-123` (shown once).", "abc_DEF-123", true},
		{"no token here", "", false},
		{"`Authorization: Bearer ` empty", "", false},
		{"Bearer unterminated", "", false},
	}
	for _, tc := range cases {
		token, ok := TokenFromInstructions(tc.in)
		if token != tc.token || ok != tc.ok {
			t.Errorf("TokenFromInstructions(%q) = %q %t, want %q %t", tc.in, token, ok, tc.token, tc.ok)
		}
	}
}

func TestParseWebhookURL(t *testing.T) {
	cases := []struct {
		in, want string
		err      bool
	}{
		{"", "", false},
		{"none", "", false},
		{" - ", "", false},
		{"https://example.org/hook?x=1", "https://example.org/hook?x=1", false},
		{"http://127.0.0.1:9000/", "http://127.0.0.1:9000/", false},
		{"ftp://example.org/", "", true},
		{"/relative", "", true},
		{"http://", "", true},
		{"http://a b/", "", true},
	}
	for _, tc := range cases {
		got, err := parseWebhookURL(tc.in)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("parseWebhookURL(%q) = %q, %v", tc.in, got, err)
		}
	}
}

func TestValidateMessage(t *testing.T) {
	ok := PostMessageRequest{ChatID: "general", Sender: "bob", Text: "hi"}
	cases := []struct {
		name   string
		mutate func(*PostMessageRequest)
		want   string
	}{
		{"valid", func(*PostMessageRequest) {}, ""},
		{"valid with id and name", func(r *PostMessageRequest) { r.ID = "m-1"; r.SenderName = "Bob 🙂" }, ""},
		{"empty chat", func(r *PostMessageRequest) { r.ChatID = "" }, "chat_id"},
		{"uppercase chat", func(r *PostMessageRequest) { r.ChatID = "General" }, "chat_id"},
		{"long chat", func(r *PostMessageRequest) { r.ChatID = strings.Repeat("a", 65) }, "chat_id"},
		{"bad sender", func(r *PostMessageRequest) { r.Sender = "@bob:example.org" }, "sender"},
		{"bad id", func(r *PostMessageRequest) { r.ID = "../x" }, "id"},
		{"no text", func(r *PostMessageRequest) { r.Text = "" }, "text is required"},
		{"long text", func(r *PostMessageRequest) { r.Text = strings.Repeat("a", 101) }, "longer"},
		{"invalid utf8", func(r *PostMessageRequest) { r.Text = "\xff" }, "UTF-8"},
		{"long name", func(r *PostMessageRequest) { r.SenderName = strings.Repeat("a", 256) }, "sender_name"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := ok
			tc.mutate(&req)
			got := validateMessage(&req, 100)
			if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
				t.Errorf("validateMessage = %q, want %q", got, tc.want)
			}
		})
	}
}
