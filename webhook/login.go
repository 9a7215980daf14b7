package webhook

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"maunium.net/go/mautrix/bridgev2"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
)

const flowID = "webhook"

// idPattern restricts remote IDs (accounts, chats, senders, message IDs) to characters that are
// safe in Matrix user ID localparts and URLs.
var idPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._=-]{0,63}$`)

func (c *Connector) GetLoginFlows() []bridgev2.LoginFlow {
	return []bridgev2.LoginFlow{{
		Name:        "Webhook",
		Description: "Connect a remote system that posts messages to the bridge's webhook API",
		ID:          flowID,
	}}
}

func (c *Connector) CreateLogin(ctx context.Context, user *bridgev2.User, flow string) (bridgev2.LoginProcess, error) {
	if flow != flowID {
		return nil, fmt.Errorf("unknown login flow %q", flow)
	}
	return &loginProcess{conn: c, user: user}, nil
}

type loginProcess struct {
	conn *Connector
	user *bridgev2.User
}

var _ bridgev2.LoginProcessUserInput = (*loginProcess)(nil)

func (lp *loginProcess) Start(ctx context.Context) (*bridgev2.LoginStep, error) {
	return &bridgev2.LoginStep{
		Type:         bridgev2.LoginStepTypeUserInput,
		StepID:       "io.unwedge.webhook.account",
		Instructions: "Name the remote account, and where Matrix messages should be delivered.",
		UserInputParams: &bridgev2.LoginUserInputParams{Fields: []bridgev2.LoginInputDataField{{
			Type:        bridgev2.LoginInputFieldTypeUsername,
			ID:          "account",
			Name:        "Account",
			Description: "Your user ID on the remote system (lowercase letters, digits and ._=-)",
			Pattern:     idPattern.String(),
		}, {
			Type:        bridgev2.LoginInputFieldTypeURL,
			ID:          "webhook_url",
			Name:        "Outgoing webhook URL",
			Description: "http(s) URL on a public internet address that receives your Matrix messages as JSON POSTs, or `none` to only keep them in the outbox",
		}}},
	}, nil
}

func (lp *loginProcess) Cancel() {}

func (lp *loginProcess) SubmitUserInput(ctx context.Context, input map[string]string) (*bridgev2.LoginStep, error) {
	account := strings.TrimSpace(input["account"])
	if !idPattern.MatchString(account) {
		return nil, fmt.Errorf("invalid account %q: use 1-64 lowercase letters, digits and ._=-", account)
	}
	webhookURL, err := lp.conn.checkWebhookURL(ctx, input["webhook_url"])
	if err != nil {
		return nil, err
	}
	token, err := newToken()
	if err != nil {
		return nil, err
	}
	login, err := lp.user.NewLogin(ctx, &bridgedb.UserLogin{
		ID:         networkid.UserLoginID(account),
		RemoteName: account,
		Metadata:   &LoginMetadata{TokenHash: hashToken(token), WebhookURL: webhookURL},
	}, nil)
	if err != nil {
		return nil, fmt.Errorf("failed to save login: %w", err)
	}
	go login.Client.Connect(login.Log.WithContext(lp.conn.br.BackgroundCtx))
	return &bridgev2.LoginStep{
		Type:   bridgev2.LoginStepTypeComplete,
		StepID: "io.unwedge.webhook.complete",
		Instructions: fmt.Sprintf("Logged in as %s. Remote systems authenticate to the webhook API with "+
			"`Authorization: Bearer %s` (shown only this once; log in again to get a new one).", account, token),
		CompleteParams: &bridgev2.LoginCompleteParams{UserLoginID: login.ID, UserLogin: login},
	}, nil
}

// TokenFromInstructions extracts the API token from the completed login step's instructions.
func TokenFromInstructions(instructions string) (string, bool) {
	_, rest, ok := strings.Cut(instructions, "Bearer ")
	if !ok {
		return "", false
	}
	token, _, ok := strings.Cut(rest, "`")
	if !ok || token == "" {
		return "", false
	}
	return token, true
}

// parseWebhookURL checks the syntax of a webhook URL; checkWebhookURL also checks its address.
func parseWebhookURL(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	if raw == "" || raw == "none" || raw == "-" {
		return "", nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("invalid webhook URL: %w", err)
	} else if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", errors.New("invalid webhook URL: must be an absolute http or https URL")
	}
	return u.String(), nil
}

func newToken() (string, error) {
	buf := make([]byte, 32)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("failed to generate token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(buf), nil
}
