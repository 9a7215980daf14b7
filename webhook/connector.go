// Package webhook is the reference bridge's network: remote systems POST messages to the bridge's
// HTTP API and they appear in Matrix portal rooms, sent by one ghost per remote sender; messages
// that Matrix users send in a portal go to the login's outgoing webhook URL and into an outbox that
// the API can read back. It is small, but it goes through bridgev2's normal logins, portals, ghosts
// and message IDs, so it shows whether an encrypted Matrix message "was bridged".
package webhook

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"

	"go.mau.fi/util/configupgrade"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/bridgev2"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"

	"github.com/unwedge/unwedge/webhook/store"
)

// Connector implements bridgev2.NetworkConnector for the webhook network.
type Connector struct {
	Config Config

	br       *bridgev2.Bridge
	db       *store.DB
	delivery *deliverer

	tokensLock sync.RWMutex
	tokens     map[string]networkid.UserLoginID // sha256(token) -> login

	// creating serialises each login's creation of chats and ghosts with its limit checks.
	creating loginLocks

	// router is the appservice HTTP server's, where Init registers the API; bridgev2 starts
	// serving it before the network connector starts, so the API answers "not ready" until
	// Start has finished (started).
	router  *http.ServeMux
	started atomic.Bool
}

var (
	_ bridgev2.NetworkConnector        = (*Connector)(nil)
	_ bridgev2.StoppableNetwork        = (*Connector)(nil)
	_ bridgev2.ConfigValidatingNetwork = (*Connector)(nil)
)

// LoginMetadata is stored with each user login.
type LoginMetadata struct {
	// TokenHash is the hex SHA-256 of the login's API token; the token itself is not stored.
	TokenHash  string `json:"token_hash"`
	WebhookURL string `json:"webhook_url,omitempty"`
}

// PortalMetadata is stored with each portal.
type PortalMetadata struct {
	Name string `json:"name,omitempty"`
}

func (c *Connector) Init(br *bridgev2.Bridge) {
	c.br = br
	c.tokens = make(map[string]networkid.UserLoginID)
	c.db = store.New(string(br.ID), br.DB.Database,
		dbutil.ZeroLogger(br.Log.With().Str("db_section", "webhook").Logger()))
	c.delivery = newDeliverer(c)
	if server, ok := br.Matrix.(bridgev2.MatrixConnectorWithServer); ok {
		c.router = server.GetRouter()
	}
	if c.router != nil {
		c.registerAPI(c.router)
	}
}

func (c *Connector) Start(ctx context.Context) error {
	if err := c.db.Upgrade(ctx); err != nil {
		return bridgev2.DBUpgradeError{Err: err, Section: "webhook"}
	}
	if c.router == nil {
		return fmt.Errorf("the webhook API needs the appservice HTTP server: set appservice.public_address")
	}
	// bridgev2 loads the logins (LoadUserLogin) only after the connectors started: without
	// this, a valid token would be "unknown" for that moment.
	if err := c.indexTokens(ctx); err != nil {
		return err
	}
	c.delivery.start(c.br.BackgroundCtx)
	c.started.Store(true)
	return nil
}

// indexTokens fills the token index from the stored logins.
func (c *Connector) indexTokens(ctx context.Context) error {
	userIDs, err := c.br.DB.UserLogin.GetAllUserIDsWithLogins(ctx)
	if err != nil {
		return fmt.Errorf("failed to list users with logins: %w", err)
	}
	for _, userID := range userIDs {
		logins, err := c.br.DB.UserLogin.GetAllForUser(ctx, userID)
		if err != nil {
			return fmt.Errorf("failed to list logins of %s: %w", userID, err)
		}
		c.tokensLock.Lock()
		for _, login := range logins {
			if meta, ok := login.Metadata.(*LoginMetadata); ok && meta.TokenHash != "" {
				c.tokens[meta.TokenHash] = login.ID
			}
		}
		c.tokensLock.Unlock()
	}
	return nil
}

func (c *Connector) Stop() {
	c.delivery.stop()
}

func (c *Connector) ValidateConfig() error {
	return c.Config.Validate()
}

func (c *Connector) GetName() bridgev2.BridgeName {
	return bridgev2.BridgeName{
		DisplayName:          "Webhook",
		NetworkURL:           "https://github.com/unwedge/unwedge",
		NetworkID:            "webhook",
		BeeperBridgeType:     "github.com/unwedge/unwedge",
		DefaultPort:          29400,
		DefaultCommandPrefix: "!wh",
	}
}

func (c *Connector) GetDBMetaTypes() bridgedb.MetaTypes {
	return bridgedb.MetaTypes{
		Portal:    func() any { return &PortalMetadata{} },
		UserLogin: func() any { return &LoginMetadata{} },
	}
}

func (c *Connector) GetCapabilities() *bridgev2.NetworkGeneralCapabilities {
	return &bridgev2.NetworkGeneralCapabilities{}
}

func (c *Connector) GetConfig() (string, any, configupgrade.Upgrader) {
	return ExampleConfig, &c.Config, configupgrade.SimpleUpgrader(upgradeConfig)
}

func (c *Connector) GetBridgeInfoVersion() (info, capabilities int) {
	return 1, 1
}

func (c *Connector) LoadUserLogin(ctx context.Context, login *bridgev2.UserLogin) error {
	meta := login.Metadata.(*LoginMetadata)
	c.tokensLock.Lock()
	c.tokens[meta.TokenHash] = login.ID
	c.tokensLock.Unlock()
	login.Client = &client{conn: c, login: login}
	return nil
}

func hashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// loginByToken returns the login that owns an API token, or nil.
func (c *Connector) loginByToken(ctx context.Context, token string) (*bridgev2.UserLogin, error) {
	hash := hashToken(token)
	c.tokensLock.RLock()
	loginID, ok := c.tokens[hash]
	c.tokensLock.RUnlock()
	if !ok {
		return nil, nil
	}
	login, err := c.br.GetExistingUserLoginByID(ctx, loginID)
	if err != nil {
		return nil, fmt.Errorf("failed to get user login: %w", err)
	}
	// The index is not pruned on re-login or deletion: the stored hash is the authority.
	if login == nil || login.Metadata.(*LoginMetadata).TokenHash != hash {
		c.forgetToken(hash)
		return nil, nil
	}
	return login, nil
}

func (c *Connector) forgetToken(hash string) {
	c.tokensLock.Lock()
	delete(c.tokens, hash)
	c.tokensLock.Unlock()
}

func portalKey(login *bridgev2.UserLogin, chatID string) networkid.PortalKey {
	return networkid.PortalKey{ID: networkid.PortalID(chatID), Receiver: login.ID}
}

func bridgeLoginID(id string) networkid.UserLoginID { return networkid.UserLoginID(id) }
