package testclient

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/util/ptr"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// CreateEncryptedRoom creates a private, Megolm-encrypted room, invites the users and waits until
// the client's sync shows the room.
func (c *Client) CreateEncryptedRoom(ctx context.Context, invite ...id.UserID) (id.RoomID, error) {
	resp, err := c.cli.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset: "private_chat",
		Invite: invite,
		InitialState: []*event.Event{{
			Type:     event.StateEncryption,
			StateKey: ptr.Ptr(""),
			Content:  event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}},
		}},
	})
	if err != nil {
		return "", fmt.Errorf("failed to create encrypted room: %w", err)
	}
	c.log.Debug().Stringer("room_id", resp.RoomID).Any("invited", invite).Msg("Created encrypted room")
	if err = c.WaitForJoin(ctx, resp.RoomID); err != nil {
		return "", err
	}
	return resp.RoomID, nil
}

// SendText sends a plain-text message, encrypted if the room is.
func (c *Client) SendText(ctx context.Context, roomID id.RoomID, text string) (id.EventID, error) {
	return c.SendMessage(ctx, roomID, &event.MessageEventContent{MsgType: event.MsgText, Body: text})
}

// SendMessage sends an m.room.message event, encrypted if the room is. In an encrypted room the
// current Megolm session is first shared with every device of the joined and invited members
// that does not have it yet (a new session after RotateRoomKey, a membership change or expiry).
func (c *Client) SendMessage(ctx context.Context, roomID id.RoomID, content *event.MessageEventContent) (id.EventID, error) {
	encrypted, err := c.IsEncrypted(ctx, roomID)
	if err != nil {
		return "", err
	}
	evtType, payload := event.EventMessage, any(content)
	var enc SentEncryption
	if encrypted {
		var ciphertext *event.EncryptedEventContent
		if ciphertext, enc.Index, err = c.encrypt(ctx, roomID, event.EventMessage, content); err != nil {
			return "", err
		}
		payload, evtType, enc.SessionID = ciphertext, event.EventEncrypted, ciphertext.SessionID
	}
	resp, err := c.cli.SendMessageEvent(ctx, roomID, evtType, payload)
	if err != nil {
		return "", fmt.Errorf("failed to send message to %s: %w", roomID, err)
	}
	if encrypted {
		c.hist.addSent(resp.EventID, enc)
	}
	c.log.Debug().
		Stringer("room_id", roomID).
		Stringer("event_id", resp.EventID).
		Bool("encrypted", encrypted).
		Msg("Sent message")
	return resp.EventID, nil
}

// IsEncrypted reports whether the room is encrypted. If the client's state does not say so yet
// (just joined, sync not caught up), it asks the homeserver for the room's m.room.encryption.
func (c *Client) IsEncrypted(ctx context.Context, roomID id.RoomID) (bool, error) {
	store := c.stateDB.store
	if encrypted, err := store.IsEncrypted(ctx, roomID); err != nil {
		return false, fmt.Errorf("failed to check if %s is encrypted: %w", roomID, err)
	} else if encrypted {
		return true, nil
	}
	var content event.EncryptionEventContent
	err := c.cli.StateEvent(ctx, roomID, event.StateEncryption, "", &content)
	if errors.Is(err, mautrix.MNotFound) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("failed to get encryption state of %s: %w", roomID, err)
	} else if content.Algorithm == "" {
		return false, nil
	}
	if err = store.SetEncryptionEvent(ctx, roomID, &content); err != nil {
		return false, fmt.Errorf("failed to store encryption state of %s: %w", roomID, err)
	}
	return true, nil
}

// encrypt shares the room's outbound Megolm session if needed and encrypts the content with it,
// and returns the message index it was encrypted at.
func (c *Client) encrypt(ctx context.Context, roomID id.RoomID, evtType event.Type, content any) (*event.EncryptedEventContent, uint32, error) {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return nil, 0, errClosed
	}
	// One message at a time per room: what the Element rules record about a share holds only
	// if nothing is encrypted between sharing and recording.
	defer c.sendLock.WithLock(roomID)()
	var err error
	for attempt := 1; attempt <= 2; attempt++ {
		if err = c.shareRoomKey(ctx, cs, roomID); err != nil {
			return nil, 0, err
		}
		// The room's send lock is held: nothing else encrypts with the session in between.
		var index uint32
		if sess, _ := cs.store.GetOutboundGroupSession(ctx, roomID); sess != nil {
			index = uint32(sess.Internal.MessageIndex())
		}
		var encrypted *event.EncryptedEventContent
		encrypted, err = cs.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
		if err == nil {
			return encrypted, index, nil
		} else if !errors.Is(err, crypto.ErrNoGroupSession) && !errors.Is(err, crypto.ErrSessionNotShared) &&
			!errors.Is(err, crypto.ErrSessionExpired) {
			break
		}
		// The session was discarded or expired between sharing and encrypting: share again.
	}
	return nil, 0, fmt.Errorf("failed to encrypt event for %s: %w", roomID, err)
}

// shareRoomKey shares the room's outbound Megolm session with all devices of the joined and
// invited members, creating a new session if there is none. The member list is refreshed from
// the homeserver first, so that members whose join the sync has not shown yet get the key too.
// Under the Element rules it records the index each device got, and shares a session that was
// already shared again with the devices that started a new Olm session since (reshareWedged).
func (c *Client) shareRoomKey(ctx context.Context, cs *cryptoState, roomID id.RoomID) error {
	sess, err := cs.store.GetOutboundGroupSession(ctx, roomID)
	if err != nil {
		return fmt.Errorf("failed to get outbound group session of %s: %w", roomID, err)
	} else if sess != nil && sess.Shared && !sess.Expired() {
		if c.rules.element() {
			return c.reshareWedged(ctx, cs, sess)
		}
		return nil
	}
	started := time.Now()
	if _, err = c.cli.Members(ctx, roomID); err != nil {
		return fmt.Errorf("failed to get members of %s: %w", roomID, err)
	}
	users, err := c.stateDB.store.GetRoomJoinedOrInvitedMembers(ctx, roomID)
	if err != nil {
		return fmt.Errorf("failed to get members of %s from the state store: %w", roomID, err)
	}
	if err = cs.mach.ShareGroupSession(ctx, roomID, users); err != nil {
		return fmt.Errorf("failed to share room key of %s: %w", roomID, err)
	}
	if sess, err = cs.store.GetOutboundGroupSession(ctx, roomID); err != nil {
		return fmt.Errorf("failed to get outbound group session of %s: %w", roomID, err)
	} else if sess == nil {
		return nil // discarded meanwhile; encrypt shares again
	}
	c.log.Debug().
		Stringer("room_id", roomID).
		Stringer("session_id", sess.ID()).
		Int("user_count", len(users)).
		Msg("Shared room key")
	recipients, err := c.recipients(ctx, cs, sess, users)
	if err != nil {
		return err
	}
	// The session was shared before it encrypted anything, and the caller holds the room's send
	// lock, so its current index is the shared one.
	index := uint32(sess.Internal.MessageIndex())
	copies := make([]RoomKeyCopy, len(recipients))
	for i, device := range recipients {
		copies[i] = RoomKeyCopy{
			Kind: RoomKeyShared, UserID: device.UserID, DeviceID: device.DeviceID, RoomID: roomID,
			SessionID: sess.ID(), Index: index, At: started,
		}
	}
	c.hist.addRoomKeyCopies(copies...)
	if c.rules.element() {
		return c.recordShares(ctx, cs, sess, recipients, index)
	}
	return nil
}

// SendWithheldText sends a text message encrypted with a new Megolm session whose key goes to
// nobody (as if it was lost on the way), and returns the event and session IDs. The room's next
// message starts another session, shared as usual. ForwardRoomKey hands the key out later.
func (c *Client) SendWithheldText(ctx context.Context, roomID id.RoomID, text string) (id.EventID, id.SessionID, error) {
	c.cryptoLock.RLock()
	cs := c.crypto.Load()
	if cs == nil {
		c.cryptoLock.RUnlock()
		return "", "", errClosed
	}
	ogs, err := crypto.NewOutboundGroupSession(roomID, nil, nil)
	if err != nil {
		c.cryptoLock.RUnlock()
		return "", "", err
	}
	ogs.Shared = true
	own := cs.mach.OwnIdentity()
	igs, err := crypto.NewInboundGroupSession(own.IdentityKey, own.SigningKey, roomID, ogs.Internal.Key(), 0, 0, nil, false)
	if err == nil {
		err = cs.store.PutGroupSession(ctx, igs)
	}
	if err == nil {
		err = cs.store.AddOutboundGroupSession(ctx, ogs)
	}
	var encrypted *event.EncryptedEventContent
	if err == nil {
		encrypted, err = cs.mach.EncryptMegolmEvent(ctx, roomID, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: text})
	}
	if err == nil {
		err = cs.store.RemoveOutboundGroupSession(ctx, roomID)
	}
	c.cryptoLock.RUnlock()
	if err != nil {
		return "", "", fmt.Errorf("failed to encrypt withheld message: %w", err)
	}
	resp, err := c.cli.SendMessageEvent(ctx, roomID, event.EventEncrypted, encrypted)
	if err != nil {
		return "", "", fmt.Errorf("failed to send message to %s: %w", roomID, err)
	}
	return resp.EventID, ogs.ID(), nil
}

// ForwardRoomKey sends one of the client's own Megolm sessions, from its first index, to a
// device as m.forwarded_room_key over Olm (as the sender's device answers a key request).
func (c *Client) ForwardRoomKey(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, to *id.Device) error {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return errClosed
	}
	igs, err := cs.store.GetGroupSession(ctx, roomID, sessionID)
	if err != nil || igs == nil {
		return fmt.Errorf("no room key %s to forward: %w", sessionID, err)
	}
	content, err := forwardedRoomKey(igs, igs.Internal.FirstKnownIndex())
	if err != nil {
		return err
	}
	c.hist.addRoomKeyCopies(RoomKeyCopy{
		Kind: RoomKeyForwarded, UserID: to.UserID, DeviceID: to.DeviceID, RoomID: roomID,
		SessionID: sessionID, Index: igs.Internal.FirstKnownIndex(), At: time.Now(),
	})
	return cs.mach.SendEncryptedToDevice(ctx, to, event.ToDeviceForwardedRoomKey, content)
}
