package unwedge

import (
	"os"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

func TestConfigValidate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Config)
		want   []string
	}{
		{"default", func(*Config) {}, nil},
		{"no interval", func(c *Config) { c.MinInterval = 0 }, []string{"unwedge.min_interval"}},
		{"unknown scope", func(c *Config) { c.Scope = "friends" }, []string{`unwedge.scope`, `"friends"`}},
		{"no heals per user", func(c *Config) { c.MaxHealsPerUser = 0 }, []string{"unwedge.max_heals_per_user"}},
		{"no heals per minute", func(c *Config) { c.MaxHealsPerMinute = 0 }, []string{"unwedge.max_heals_per_minute"}},
		{"no retries", func(c *Config) { c.MaxRetries = 0 }, []string{"unwedge.max_retries"}},
		{"backoff inverted", func(c *Config) { c.MaxBackoff = time.Millisecond }, []string{"unwedge.min_backoff"}},
		{"short lease", func(c *Config) { c.Lease = time.Second }, []string{"unwedge.lease"}},
		{"short retention", func(c *Config) { c.Recovery.Retention = 10 * time.Second }, []string{"unwedge.recovery.retention"}},
		{"no key requests", func(c *Config) { c.Recovery.KeyRequests = 0 }, []string{"unwedge.recovery.key_requests"}},
		{"request backoff inverted", func(c *Config) { c.Recovery.MaxBackoff = time.Second }, []string{"unwedge.recovery.min_backoff"}},
		{"no pending allowed", func(c *Config) { c.Recovery.MaxPendingPerUser = 0 }, []string{"unwedge.recovery.max_pending_per_user"}},
		{"recovery off skips its checks", func(c *Config) { c.Recovery = RecoveryConfig{} }, nil},
		{"metrics without address", func(c *Config) { c.Metrics = MetricsConfig{Enabled: true} }, []string{"unwedge.metrics.listen"}},
		{"several at once", func(c *Config) { c.MinInterval, c.MaxRetries = 0, 0 }, []string{"unwedge.min_interval", "unwedge.max_retries"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tc.mutate(&cfg)
			err := cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %s", err, want)
				}
			}
		})
	}
}

func TestExampleConfigMatchesDefaults(t *testing.T) {
	var doc struct {
		Unwedge Config `yaml:"unwedge"`
	}
	data, err := os.ReadFile("../../bridge/example-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err = yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Unwedge != DefaultConfig() {
		t.Errorf("example config %+v differs from DefaultConfig %+v", doc.Unwedge, DefaultConfig())
	}
}

func TestBackoff(t *testing.T) {
	cfg := Config{MinBackoff: time.Second, MaxBackoff: 5 * time.Second}
	for attempt, want := range []time.Duration{time.Second, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second} {
		if got := cfg.backoff(attempt); got != want {
			t.Errorf("backoff(%d) = %s, want %s", attempt, got, want)
		}
	}
}
