package webhook

import (
	"context"
	"fmt"
	"time"

	"maunium.net/go/mautrix/bridgev2"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/bridgev2/status"
	"maunium.net/go/mautrix/event"

	"github.com/unwedge/unwedge/webhook/store"
)

// client is the bridgev2.NetworkAPI of one webhook login. The remote side talks to the bridge, not
// the other way round, so there is no connection to keep.
type client struct {
	conn  *Connector
	login *bridgev2.UserLogin
}

var _ bridgev2.NetworkAPI = (*client)(nil)

func (cl *client) Connect(ctx context.Context) {
	cl.login.BridgeState.Send(status.BridgeState{StateEvent: status.StateConnected})
}

func (cl *client) Disconnect() {}

func (cl *client) IsLoggedIn() bool { return true }

func (cl *client) LogoutRemote(ctx context.Context) {
	cl.conn.forgetToken(cl.login.Metadata.(*LoginMetadata).TokenHash)
}

func (cl *client) IsThisUser(ctx context.Context, userID networkid.UserID) bool {
	return userID == selfID(cl.login.ID)
}

func (cl *client) GetChatInfo(ctx context.Context, portal *bridgev2.Portal) (*bridgev2.ChatInfo, error) {
	return chatInfo(portal.Metadata.(*PortalMetadata).Name), nil
}

// chatInfo describes a webhook chat: the logged-in user is a member, ghosts join as they post.
func chatInfo(name string) *bridgev2.ChatInfo {
	roomType := bridgedb.RoomTypeDefault
	return &bridgev2.ChatInfo{
		Name: &name,
		Type: &roomType,
		Members: &bridgev2.ChatMemberList{
			MemberMap: bridgev2.ChatMemberMap{}.Set(bridgev2.ChatMember{
				EventSender: bridgev2.EventSender{IsFromMe: true},
				Membership:  event.MembershipJoin,
			}),
		},
	}
}

// GetUserInfo returns nothing new: ghost names come with each posted message (see the API). The
// sender is in the ghost's ID, but naming the ghost after it here would undo a sender_name.
func (cl *client) GetUserInfo(ctx context.Context, ghost *bridgev2.Ghost) (*bridgev2.UserInfo, error) {
	return nil, nil
}

func (cl *client) GetCapabilities(ctx context.Context, portal *bridgev2.Portal) *event.RoomFeatures {
	return &event.RoomFeatures{ID: "io.unwedge.webhook.text", MaxTextLength: cl.conn.Config.MaxTextBytes}
}

// HandleMatrixMessage stores the message in the outbox; the deliverer posts it to the webhook.
// Once it is in the outbox it is bridged: delivery is retried until it succeeds or is given up
// with a notice to the sender.
func (cl *client) HandleMatrixMessage(ctx context.Context, msg *bridgev2.MatrixMessage) (*bridgev2.MatrixMessageResponse, error) {
	switch msg.Content.MsgType {
	case event.MsgText, event.MsgNotice, event.MsgEmote:
	default:
		return nil, bridgev2.ErrUnsupportedMessageType
	}
	if len(msg.Content.Body) > cl.conn.Config.MaxTextBytes {
		return nil, fmt.Errorf("%w: text longer than %d bytes", bridgev2.ErrUnsupportedMessageType, cl.conn.Config.MaxTextBytes)
	}
	meta := cl.login.Metadata.(*LoginMetadata)
	status := store.OutboxPending
	if meta.WebhookURL == "" {
		status = store.OutboxStored
	}
	stored, err := cl.conn.db.Outbox.Insert(ctx, &store.OutboxMessage{
		LoginID:    string(cl.login.ID),
		ChatID:     string(msg.Portal.ID),
		EventID:    string(msg.Event.ID),
		SenderMXID: string(msg.Event.Sender),
		Body:       msg.Content.Body,
		Timestamp:  msg.Event.Timestamp,
		Status:     status,
	})
	if err != nil {
		return nil, fmt.Errorf("failed to store message in outbox: %w", err)
	}
	if stored.Status == store.OutboxPending {
		cl.conn.delivery.wake()
	}
	return &bridgev2.MatrixMessageResponse{DB: &bridgedb.Message{
		ID:        outboxMessageID(stored.ID),
		SenderID:  selfID(cl.login.ID),
		Timestamp: time.UnixMilli(stored.Timestamp),
	}}, nil
}

func outboxMessageID(id int64) networkid.MessageID {
	return networkid.MessageID(fmt.Sprintf("out-%d", id))
}
