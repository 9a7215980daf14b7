package echo

import (
	"context"
	"time"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/bridgev2/simplevent"
	"maunium.net/go/mautrix/bridgev2/status"
	"maunium.net/go/mautrix/event"
)

// ghostID is the remote user who echoes.
const ghostID networkid.UserID = "echo"

// client is the bridgev2.NetworkAPI of one login; there is no remote connection.
type client struct {
	conn  *Connector
	login *bridgev2.UserLogin
}

var _ bridgev2.NetworkAPI = (*client)(nil)

func (cl *client) Connect(context.Context) {
	cl.login.BridgeState.Send(status.BridgeState{StateEvent: status.StateConnected})
}

func (cl *client) Disconnect() {}

func (cl *client) IsLoggedIn() bool { return true }

func (cl *client) LogoutRemote(context.Context) {}

func (cl *client) IsThisUser(_ context.Context, userID networkid.UserID) bool {
	return string(userID) == string(cl.login.ID)
}

func (cl *client) GetChatInfo(context.Context, *bridgev2.Portal) (*bridgev2.ChatInfo, error) {
	return chatInfo(), nil
}

// chatInfo is the portal: the logged-in user and the echo ghost.
func chatInfo() *bridgev2.ChatInfo {
	name := "Echo"
	return &bridgev2.ChatInfo{
		Name: &name,
		Members: &bridgev2.ChatMemberList{MemberMap: bridgev2.ChatMemberMap{}.
			Set(bridgev2.ChatMember{EventSender: bridgev2.EventSender{IsFromMe: true}, Membership: event.MembershipJoin}).
			Set(bridgev2.ChatMember{EventSender: bridgev2.EventSender{Sender: ghostID}, Membership: event.MembershipJoin}),
		},
	}
}

func (cl *client) GetUserInfo(context.Context, *bridgev2.Ghost) (*bridgev2.UserInfo, error) {
	name, isBot := "Echo", true
	return &bridgev2.UserInfo{Name: &name, IsBot: &isBot}, nil
}

func (cl *client) GetCapabilities(context.Context, *bridgev2.Portal) *event.RoomFeatures {
	return &event.RoomFeatures{ID: "io.unwedge.echo.text"}
}

// HandleMatrixMessage accepts a text message and queues its echo from the ghost. The echo is
// queued from another goroutine: this runs inside the portal's event loop.
func (cl *client) HandleMatrixMessage(_ context.Context, msg *bridgev2.MatrixMessage) (*bridgev2.MatrixMessageResponse, error) {
	switch msg.Content.MsgType {
	case event.MsgText, event.MsgNotice, event.MsgEmote:
	default:
		return nil, bridgev2.ErrUnsupportedMessageType
	}
	go cl.login.QueueRemoteEvent(&simplevent.Message[string]{
		EventMeta: simplevent.EventMeta{
			Type:      bridgev2.RemoteEventMessage,
			PortalKey: msg.Portal.PortalKey,
			Sender:    bridgev2.EventSender{Sender: ghostID},
			Timestamp: time.Now(),
		},
		ID:                 networkid.MessageID("echo-" + msg.Event.ID.String()),
		Data:               cl.conn.Config.Prefix + msg.Content.Body,
		ConvertMessageFunc: convertText,
	})
	return &bridgev2.MatrixMessageResponse{DB: &database.Message{
		ID:        networkid.MessageID("mx-" + msg.Event.ID.String()),
		SenderID:  networkid.UserID(cl.login.ID),
		Timestamp: time.UnixMilli(msg.Event.Timestamp),
	}}, nil
}

func convertText(_ context.Context, _ *bridgev2.Portal, _ bridgev2.MatrixAPI, text string) (*bridgev2.ConvertedMessage, error) {
	return &bridgev2.ConvertedMessage{Parts: []*bridgev2.ConvertedMessagePart{{
		Type:    event.EventMessage,
		Content: &event.MessageEventContent{MsgType: event.MsgText, Body: text},
	}}}, nil
}
