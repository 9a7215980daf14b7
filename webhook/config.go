package webhook

import (
	_ "embed"
	"errors"
	"fmt"
	"time"

	up "go.mau.fi/util/configupgrade"

	unwedgebridge "github.com/unwedge/unwedge/bridge"
	"github.com/unwedge/unwedge/crypto/unwedge"

	"github.com/unwedge/unwedge/internal/backoff"
)

//go:embed example-config.yaml
var networkExample string

// ExampleConfig is the `network:` section of the example config: the webhook network's options
// and the `unwedge:` block.
var ExampleConfig = networkExample + unwedgebridge.ExampleConfig

// Config is the `network:` section of the bridge config.
type Config struct {
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	MaxTextBytes int   `yaml:"max_text_bytes"`
	// MaxChatsPerLogin and MaxSendersPerLogin bound the portals and ghosts one login's token can
	// make the bridge create.
	MaxChatsPerLogin   int            `yaml:"max_chats_per_login"`
	MaxSendersPerLogin int            `yaml:"max_senders_per_login"`
	Delivery           DeliveryConfig `yaml:"delivery"`
	Unwedge            unwedge.Config `yaml:"unwedge"`
}

// DeliveryConfig controls delivery of Matrix messages to outgoing webhooks.
type DeliveryConfig struct {
	Timeout     time.Duration `yaml:"timeout"`
	MaxAttempts int           `yaml:"max_attempts"`
	MinBackoff  time.Duration `yaml:"min_backoff"`
	MaxBackoff  time.Duration `yaml:"max_backoff"`
	// AllowPrivateAddresses lets webhook URLs point at loopback, private, link-local and other
	// non-public addresses. Off, the bridge connects only to public internet addresses.
	AllowPrivateAddresses bool `yaml:"allow_private_addresses"`
}

func upgradeConfig(helper up.Helper) {
	helper.Copy(up.Int, "max_body_bytes")
	helper.Copy(up.Int, "max_text_bytes")
	helper.Copy(up.Int, "max_chats_per_login")
	helper.Copy(up.Int, "max_senders_per_login")
	helper.Copy(up.Str, "delivery", "timeout")
	helper.Copy(up.Int, "delivery", "max_attempts")
	helper.Copy(up.Str, "delivery", "min_backoff")
	helper.Copy(up.Str, "delivery", "max_backoff")
	helper.Copy(up.Bool, "delivery", "allow_private_addresses")
	unwedgebridge.UpgradeConfig(helper, "unwedge")
}

// Validate reports the first invalid option.
func (c *Config) Validate() error {
	switch {
	case c.MaxBodyBytes < 1024:
		return errors.New("network.max_body_bytes must be at least 1024")
	case c.MaxTextBytes < 1 || int64(c.MaxTextBytes) > c.MaxBodyBytes:
		return errors.New("network.max_text_bytes must be between 1 and max_body_bytes")
	case c.MaxChatsPerLogin < 1:
		return errors.New("network.max_chats_per_login must be at least 1")
	case c.MaxSendersPerLogin < 1:
		return errors.New("network.max_senders_per_login must be at least 1")
	case c.Delivery.Timeout <= 0:
		return errors.New("network.delivery.timeout must be positive")
	case c.Delivery.MaxAttempts < 1:
		return errors.New("network.delivery.max_attempts must be at least 1")
	case c.Delivery.MinBackoff <= 0 || c.Delivery.MaxBackoff < c.Delivery.MinBackoff:
		return errors.New("network.delivery.min_backoff must be positive and not above max_backoff")
	case c.Unwedge.Enabled:
		if err := c.Unwedge.Validate(); err != nil {
			return fmt.Errorf("network.%w", err)
		}
	}
	return nil
}

// backoff is the wait after the given number of failed attempts.
func (d *DeliveryConfig) backoff(attempts int) time.Duration {
	return backoff.Exponential(d.MinBackoff, d.MaxBackoff, attempts)
}
