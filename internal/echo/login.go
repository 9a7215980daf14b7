package echo

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
)

// FlowID is the echo network's only login flow.
const FlowID = "echo"

var namePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._=-]{0,63}$`)

func (c *Connector) GetLoginFlows() []bridgev2.LoginFlow {
	return []bridgev2.LoginFlow{{Name: "Echo", Description: "Get a room that echoes your messages", ID: FlowID}}
}

func (c *Connector) CreateLogin(_ context.Context, user *bridgev2.User, flow string) (bridgev2.LoginProcess, error) {
	if flow != FlowID {
		return nil, fmt.Errorf("unknown login flow %q", flow)
	}
	return &login{conn: c, user: user}, nil
}

// login asks for a name and creates the login's portal room before it completes, so the room
// exists (and the user is invited) when the login step returns.
type login struct {
	conn *Connector
	user *bridgev2.User
}

var _ bridgev2.LoginProcessUserInput = (*login)(nil)

func (l *login) Start(context.Context) (*bridgev2.LoginStep, error) {
	return &bridgev2.LoginStep{
		Type:         bridgev2.LoginStepTypeUserInput,
		StepID:       "io.unwedge.echo.name",
		Instructions: "Name your echo account.",
		UserInputParams: &bridgev2.LoginUserInputParams{Fields: []bridgev2.LoginInputDataField{{
			Type: bridgev2.LoginInputFieldTypeUsername, ID: "name", Name: "Name", Pattern: namePattern.String(),
		}}},
	}, nil
}

func (l *login) Cancel() {}

func (l *login) SubmitUserInput(ctx context.Context, input map[string]string) (*bridgev2.LoginStep, error) {
	name := strings.TrimSpace(input["name"])
	if !namePattern.MatchString(name) {
		return nil, fmt.Errorf("invalid name %q", name)
	}
	ul, err := l.user.NewLogin(ctx, &database.UserLogin{ID: networkid.UserLoginID(name), RemoteName: name}, nil)
	if err != nil {
		return nil, fmt.Errorf("failed to save login: %w", err)
	}
	portal, err := l.conn.br.GetPortalByKey(ctx, portalKey(ul))
	if err != nil {
		return nil, fmt.Errorf("failed to get portal: %w", err)
	}
	if portal.MXID == "" {
		if err = portal.CreateMatrixRoom(ctx, ul, chatInfo()); err != nil {
			return nil, fmt.Errorf("failed to create portal room: %w", err)
		}
	}
	go ul.Client.Connect(ul.Log.WithContext(l.conn.br.BackgroundCtx))
	return &bridgev2.LoginStep{
		Type:           bridgev2.LoginStepTypeComplete,
		StepID:         "io.unwedge.echo.complete",
		Instructions:   fmt.Sprintf("Logged in as %s; your echo room is %s", name, portal.MXID),
		CompleteParams: &bridgev2.LoginCompleteParams{UserLoginID: ul.ID, UserLogin: ul},
	}, nil
}
