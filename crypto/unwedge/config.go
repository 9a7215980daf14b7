package unwedge

import (
	"errors"
	"fmt"
	"time"

	"github.com/unwedge/unwedge/internal/backoff"
)

// Scope says whose devices are healed.
type Scope string

const (
	// ScopeRoomMembers heals devices of every Matrix user who shares a room with the bridge: its
	// bot (a management room, including users who have not logged in yet) or a portal (relay
	// users too). The default: nobody who talks to the bridge is left without healing.
	ScopeRoomMembers Scope = "room_members"
	// ScopeLoggedIn heals devices of Matrix users that are logged in to the bridge (have a user login).
	ScopeLoggedIn Scope = "logged_in"
	// ScopePortalMembers heals devices of users joined to or invited into an encrypted portal room
	// of the bridge: not those who left it or were banned.
	ScopePortalMembers Scope = "portal_members"
	// ScopeEveryone heals any device that sends the bridge an undecryptable Olm message.
	ScopeEveryone Scope = "everyone"
)

// Config is the `unwedge:` block of the bridge config.
type Config struct {
	Enabled bool `yaml:"enabled"`
	// MinInterval is MSC1719's limit: at most one new session per device per interval (1 hour).
	MinInterval time.Duration `yaml:"min_interval"`
	// Scope says whose devices unwedge heals. Devices of users outside it are left to mautrix-go's
	// own unwedging, as with the stock bridge.
	Scope Scope `yaml:"scope"`
	// MaxHealsPerUser bounds the heals started for one user's devices within MinInterval, so a
	// user with many devices (or many fake ones) cannot make the bridge claim a key for each.
	// Heals an admin forces do not count and are not refused.
	MaxHealsPerUser int `yaml:"max_heals_per_user"`
	// MaxHealsPerMinute bounds the heals of all users' devices started within a minute, across
	// replicas (forced heals count, but are not refused): each heal claims at most one one-time
	// key, so this bounds the claims the bridge makes, whatever many users wedge.
	MaxHealsPerMinute int `yaml:"max_heals_per_minute"`
	// MaxRetries bounds attempts of one heal on transient failures (homeserver unreachable,
	// 5xx, timeouts); the backoff doubles from MinBackoff up to MaxBackoff.
	MaxRetries int           `yaml:"max_retries"`
	MinBackoff time.Duration `yaml:"min_backoff"`
	MaxBackoff time.Duration `yaml:"max_backoff"`
	// Lease is how long a heal (or recovery's hand-over of an event) holds a device (or event)
	// against other goroutines and replicas; a process that dies mid-heal frees it after this.
	// Heals left behind are resumed every half lease.
	Lease time.Duration `yaml:"lease"`
	// HistoryRetention is how long heal records are kept.
	HistoryRetention time.Duration `yaml:"history_retention"`
	// OlmHistory is how long earlier states of the bridge's Olm sessions are kept, to decrypt
	// what a client restored from a backup sends (history.go); 0 keeps none.
	OlmHistory time.Duration `yaml:"olm_history"`
	// Startup heals at startup what the bridge can know is broken, before it handles events.
	Startup StartupConfig `yaml:"startup"`
	// AppserviceInbox, in appservice mode (encryption.appservice), reads the bot device's
	// to-device inbox at startup and every 30 seconds: the homeserver does not send the to-device
	// messages of a failed transaction again (Synapse), and room keys would be lost with them.
	AppserviceInbox bool `yaml:"appservice_inbox"`
	// Recovery keeps undecryptable events until their keys arrive.
	Recovery RecoveryConfig `yaml:"recovery"`
	// Metrics serves unwedge's metrics in the Prometheus text format.
	Metrics MetricsConfig `yaml:"metrics"`
}

// MetricsConfig is the `unwedge.metrics:` block.
type MetricsConfig struct {
	Enabled bool `yaml:"enabled"`
	// Listen is the address of the metrics listener (host:port); it serves /metrics.
	Listen string `yaml:"listen"`
}

// StartupConfig is the `unwedge.startup:` block: heals before the first event, for clients that
// never send a lost room key again (Element X), or only their current one (Element Web).
type StartupConfig struct {
	// Enabled: the bridge keeps a generation of its crypto store, in its database and in the
	// bot's account data, and at startup heals every Olm session when the store went back in time
	// (restored from a backup), and sessions lost or unreadable with devices it shared room keys
	// with.
	Enabled bool `yaml:"enabled"`
	// Wait is how long events wait at startup for the first heals (the most recently used
	// devices); the check and the heals still running then go on while events are handled. At
	// most MaxStartupWait: a longer value is capped (with a warning at startup).
	Wait time.Duration `yaml:"wait"`
}

// MaxStartupWait is the longest events wait at startup, whatever startup.wait says: a bridge
// with 10^6 Olm sessions takes minutes to check and heal them, and bridgev2 handles no event
// meanwhile. The stock helper makes events wait for nothing of the kind.
const MaxStartupWait = 5 * time.Second

// RecoveryConfig is the `unwedge.recovery:` block: what happens to room events the bridge could
// not decrypt for lack of their Megolm session, after bridgev2's own wait gave up on them.
type RecoveryConfig struct {
	Enabled bool `yaml:"enabled"`
	// Retention is how long an event waits for its key; then it is given up with a notice.
	Retention time.Duration `yaml:"retention"`
	// KeyRequests bounds the m.room_key_request messages sent per Megolm session; the wait
	// between them doubles from MinBackoff up to MaxBackoff.
	KeyRequests int           `yaml:"key_requests"`
	MinBackoff  time.Duration `yaml:"min_backoff"`
	MaxBackoff  time.Duration `yaml:"max_backoff"`
	// MaxPendingPerUser, MaxPendingPerRoom and MaxPending bound the events kept for one sender,
	// in one room and in total; more are not kept (stock behaviour).
	MaxPendingPerUser int `yaml:"max_pending_per_user"`
	MaxPendingPerRoom int `yaml:"max_pending_per_room"`
	MaxPending        int `yaml:"max_pending"`
}

func (r *RecoveryConfig) limits() PendingLimits {
	return PendingLimits{PerSender: r.MaxPendingPerUser, PerRoom: r.MaxPendingPerRoom, Total: r.MaxPending}
}

// DefaultConfig is the configuration example-config.yaml documents.
func DefaultConfig() Config {
	return Config{
		Enabled:           true,
		MinInterval:       time.Hour,
		Scope:             ScopeRoomMembers,
		MaxHealsPerUser:   10,
		MaxHealsPerMinute: 1200,
		MaxRetries:        6,
		MinBackoff:        time.Second,
		MaxBackoff:        time.Minute,
		Lease:             2 * time.Minute,
		HistoryRetention:  30 * 24 * time.Hour,
		OlmHistory:        7 * 24 * time.Hour,
		Startup:           StartupConfig{Enabled: true, Wait: MaxStartupWait},
		AppserviceInbox:   true,
		Recovery: RecoveryConfig{
			Enabled:           true,
			Retention:         7 * 24 * time.Hour,
			KeyRequests:       8,
			MinBackoff:        30 * time.Second,
			MaxBackoff:        time.Hour,
			MaxPendingPerUser: 1000,
			MaxPendingPerRoom: 5000,
			MaxPending:        20000,
		},
		Metrics: MetricsConfig{Enabled: false, Listen: "127.0.0.1:8001"},
	}
}

// Validate reports every invalid option at once, naming the config keys.
func (c *Config) Validate() error {
	var errs []error
	if c.MinInterval <= 0 {
		errs = append(errs, errors.New("unwedge.min_interval must be positive (MSC1719 uses 1h)"))
	}
	switch c.Scope {
	case ScopeRoomMembers, ScopeLoggedIn, ScopePortalMembers, ScopeEveryone:
	default:
		errs = append(errs, fmt.Errorf("unwedge.scope must be room_members, logged_in, portal_members or everyone, not %q", c.Scope))
	}
	if c.MaxHealsPerUser < 1 {
		errs = append(errs, errors.New("unwedge.max_heals_per_user must be at least 1"))
	}
	if c.MaxHealsPerMinute < 1 {
		errs = append(errs, errors.New("unwedge.max_heals_per_minute must be at least 1"))
	}
	if c.MaxRetries < 1 {
		errs = append(errs, errors.New("unwedge.max_retries must be at least 1"))
	}
	if c.MinBackoff <= 0 || c.MaxBackoff < c.MinBackoff {
		errs = append(errs, errors.New("unwedge.min_backoff must be positive and not above unwedge.max_backoff"))
	}
	if c.Lease < 10*time.Second {
		errs = append(errs, errors.New("unwedge.lease must be at least 10s"))
	}
	if c.HistoryRetention < c.MinInterval {
		errs = append(errs, errors.New("unwedge.history_retention must not be shorter than unwedge.min_interval"))
	}
	if c.OlmHistory != 0 && c.OlmHistory < time.Hour {
		errs = append(errs, errors.New("unwedge.olm_history must be 0 (keep none) or at least 1h"))
	}
	if c.Startup.Enabled && c.Startup.Wait < 0 {
		errs = append(errs, errors.New("unwedge.startup.wait must not be negative"))
	}
	if c.Metrics.Enabled && c.Metrics.Listen == "" {
		errs = append(errs, errors.New("unwedge.metrics.listen must be set when metrics are enabled"))
	}
	if r := c.Recovery; r.Enabled {
		if r.Retention < MinRetention {
			errs = append(errs, fmt.Errorf("unwedge.recovery.retention must be at least %s (bridgev2 itself waits %s)", MinRetention, bridgeWait))
		}
		if r.KeyRequests < 1 {
			errs = append(errs, errors.New("unwedge.recovery.key_requests must be at least 1"))
		}
		if r.MinBackoff <= 0 || r.MaxBackoff < r.MinBackoff {
			errs = append(errs, errors.New("unwedge.recovery.min_backoff must be positive and not above unwedge.recovery.max_backoff"))
		}
		if r.MaxPendingPerUser < 1 || r.MaxPendingPerRoom < r.MaxPendingPerUser || r.MaxPending < r.MaxPendingPerRoom {
			errs = append(errs, errors.New("unwedge.recovery.max_pending_per_user must be at least 1, max_pending_per_room at least max_pending_per_user, and max_pending at least max_pending_per_room"))
		}
	}
	return errors.Join(errs...)
}

func (r *RecoveryConfig) backoff(requests int) time.Duration {
	return backoff.Exponential(r.MinBackoff, r.MaxBackoff, requests)
}

func (c *Config) backoff(attempts int) time.Duration {
	return backoff.Exponential(c.MinBackoff, c.MaxBackoff, attempts)
}
