package testclient

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// history is what the client has seen: its rooms and their messages, and the key requests it
// answered. Waiters are woken by closing the updated channel after every change.
type history struct {
	mu      sync.Mutex
	updated chan struct{}
	syncs   int
	rooms   map[id.RoomID]*roomHistory
	events  map[id.EventID]*eventRecord
	joining map[id.RoomID]bool
	// keyRequests are the room key requests from other devices, in the order they were decided.
	keyRequests []KeyRequest
	// keyCopies, olmSessions and sent are what the client saw of its key traffic (observe.go).
	keyCopies   []RoomKeyCopy
	olmSessions []NewOlmSession
	sent        map[id.EventID]SentEncryption
}

type roomHistory struct {
	joined  bool
	inviter id.UserID
	// messages are the m.room.message events (decrypted or plaintext), ordered by timestamp.
	messages []*event.Event
	// undecryptable are the encrypted events that failed to decrypt, in arrival order.
	undecryptable []*event.Event
}

type eventRecord struct {
	sessionID id.SessionID
	decrypted bool
	err       error
}

func newHistory() history {
	return history{
		updated: make(chan struct{}),
		rooms:   make(map[id.RoomID]*roomHistory),
		events:  make(map[id.EventID]*eventRecord),
		joining: make(map[id.RoomID]bool),
		sent:    make(map[id.EventID]SentEncryption),
	}
}

// notifyLocked wakes all waiters; h.mu must be held.
func (h *history) notifyLocked() {
	close(h.updated)
	h.updated = make(chan struct{})
}

func (h *history) notify() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.notifyLocked()
}

// waitFor waits until cond is true; cond is checked after every change.
func (h *history) waitFor(ctx context.Context, cond func() bool) error {
	for {
		h.mu.Lock()
		ch := h.updated
		h.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (h *history) roomLocked(roomID id.RoomID) *roomHistory {
	room, ok := h.rooms[roomID]
	if !ok {
		room = &roomHistory{}
		h.rooms[roomID] = room
	}
	return room
}

func (h *history) recordLocked(eventID id.EventID) *eventRecord {
	rec, ok := h.events[eventID]
	if !ok {
		rec = &eventRecord{}
		h.events[eventID] = rec
	}
	return rec
}

func (h *history) syncCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.syncs
}

// syncDone records the rooms of a fully processed sync response for the user.
func (h *history) syncDone(resp *mautrix.RespSync, self id.UserID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for roomID := range resp.Rooms.Join {
		h.roomLocked(roomID).joined = true
	}
	for roomID := range resp.Rooms.Leave {
		h.roomLocked(roomID).joined = false
	}
	for roomID, invite := range resp.Rooms.Invite {
		for _, evt := range invite.State.Events {
			if evt.Type == event.StateMember && evt.GetStateKey() == self.String() {
				if membership, _ := evt.Content.Raw["membership"].(string); membership == string(event.MembershipInvite) {
					h.roomLocked(roomID).inviter = evt.Sender
				}
			}
		}
	}
	h.syncs++
	h.notifyLocked()
}

// startJoin returns false if the room is already being joined.
func (h *history) startJoin(roomID id.RoomID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.joining[roomID] {
		return false
	}
	h.joining[roomID] = true
	return true
}

func (h *history) endJoin(roomID id.RoomID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.joining, roomID)
}

// noteEncrypted records an encrypted event's session; false means it is already decrypted.
func (h *history) noteEncrypted(evt *event.Event, sessionID id.SessionID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := h.recordLocked(evt.ID)
	rec.sessionID = sessionID
	return !rec.decrypted
}

// addDecrypted records a decrypted (or plaintext) event, moving it out of undecryptable.
func (h *history) addDecrypted(evt *event.Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := h.recordLocked(evt.ID)
	if rec.decrypted {
		return
	}
	rec.decrypted, rec.err = true, nil
	room := h.roomLocked(evt.RoomID)
	room.undecryptable = slices.DeleteFunc(room.undecryptable, func(e *event.Event) bool { return e.ID == evt.ID })
	if evt.Type == event.EventMessage {
		at := len(room.messages)
		for at > 0 && room.messages[at-1].Timestamp > evt.Timestamp {
			at--
		}
		room.messages = slices.Insert(room.messages, at, evt)
	}
	h.notifyLocked()
}

// addUndecryptable records a failed decryption of an encrypted event.
func (h *history) addUndecryptable(evt *event.Event, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := h.recordLocked(evt.ID)
	if rec.decrypted {
		return
	}
	rec.err = err
	room := h.roomLocked(evt.RoomID)
	if !slices.ContainsFunc(room.undecryptable, func(e *event.Event) bool { return e.ID == evt.ID }) {
		room.undecryptable = append(room.undecryptable, evt)
	}
	h.notifyLocked()
}

func (h *history) undecryptableInSession(roomID id.RoomID, sessionID id.SessionID) []*event.Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	var evts []*event.Event
	if room, ok := h.rooms[roomID]; ok {
		for _, evt := range room.undecryptable {
			if h.events[evt.ID].sessionID == sessionID {
				evts = append(evts, evt)
			}
		}
	}
	return evts
}

func (h *history) addKeyRequest(req KeyRequest) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.keyRequests = append(h.keyRequests, req)
	h.notifyLocked()
}

// KeyRequests returns the room key requests the client received from other devices and what its
// Rules made of them, in the order it decided. Requests from the client's own device, and
// cancellations, are not kept (mautrix-go ignores them).
func (c *Client) KeyRequests() []KeyRequest {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	return slices.Clone(c.hist.keyRequests)
}

// WaitForKeyRequest returns the first key request (see KeyRequests) that match accepts, waiting
// for one if there is none yet.
func (c *Client) WaitForKeyRequest(ctx context.Context, match func(KeyRequest) bool) (KeyRequest, error) {
	var found KeyRequest
	err := c.hist.waitFor(ctx, func() bool {
		for _, req := range c.KeyRequests() {
			if match(req) {
				found = req
				return true
			}
		}
		return false
	})
	if err != nil {
		return KeyRequest{}, fmt.Errorf("no matching key request reached %s (%d decided): %w", c.cli.UserID, len(c.KeyRequests()), err)
	}
	return found, nil
}

// Messages returns the room's m.room.message events that the client has decrypted (or received
// in plaintext), its own included, ordered by timestamp. An event decrypted late appears in its
// place when its key arrives.
func (c *Client) Messages(roomID id.RoomID) []*event.Event {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	if room, ok := c.hist.rooms[roomID]; ok {
		return slices.Clone(room.messages)
	}
	return nil
}

// Undecryptable returns the room's encrypted events (as received) that the client could not
// decrypt, in arrival order. An event leaves this list when it is decrypted later.
func (c *Client) Undecryptable(roomID id.RoomID) []*event.Event {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	if room, ok := c.hist.rooms[roomID]; ok {
		return slices.Clone(room.undecryptable)
	}
	return nil
}

// DecryptionError returns why the encrypted event failed to decrypt the last time it was tried,
// or nil if it was decrypted or never seen.
func (c *Client) DecryptionError(eventID id.EventID) error {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	if rec, ok := c.hist.events[eventID]; ok {
		return rec.err
	}
	return nil
}

// MegolmSessionID returns the Megolm session an encrypted event the client received was
// encrypted with, or "" if the client has not seen it (or it was not encrypted).
func (c *Client) MegolmSessionID(eventID id.EventID) id.SessionID {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	if rec, ok := c.hist.events[eventID]; ok {
		return rec.sessionID
	}
	return ""
}

// JoinedRooms returns the rooms the client is in according to its sync.
func (c *Client) JoinedRooms() []id.RoomID {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	var rooms []id.RoomID
	for roomID, room := range c.hist.rooms {
		if room.joined {
			rooms = append(rooms, roomID)
		}
	}
	return rooms
}

func (c *Client) inviter(roomID id.RoomID) id.UserID {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	if room, ok := c.hist.rooms[roomID]; ok {
		return room.inviter
	}
	return ""
}

func (c *Client) isJoined(roomID id.RoomID) bool {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	room, ok := c.hist.rooms[roomID]
	return ok && room.joined
}

// WaitForJoin waits until the client's sync shows it joined to the room (invites are accepted
// automatically). By then the client knows the room's state, including whether it is encrypted.
func (c *Client) WaitForJoin(ctx context.Context, roomID id.RoomID) error {
	err := c.hist.waitFor(ctx, func() bool { return c.isJoined(roomID) || c.SyncError() != nil })
	if err != nil {
		return fmt.Errorf("%s did not join %s: %w", c.cli.UserID, roomID, err)
	} else if err = c.SyncError(); err != nil {
		return fmt.Errorf("%s did not join %s: sync failed: %w", c.cli.UserID, roomID, err)
	}
	return nil
}

// WaitForJoinedRoom waits until the client is in a room that match accepts and returns it (any
// one if several match). match gets the room ID and the user who invited the client ("" if it
// was not invited, e.g. it created the room).
func (c *Client) WaitForJoinedRoom(ctx context.Context, match func(roomID id.RoomID, inviter id.UserID) bool) (id.RoomID, error) {
	var found id.RoomID
	err := c.hist.waitFor(ctx, func() bool {
		for _, roomID := range c.JoinedRooms() {
			if match(roomID, c.inviter(roomID)) {
				found = roomID
				return true
			}
		}
		return false
	})
	if err != nil {
		return "", fmt.Errorf("%s joined no matching room: %w", c.cli.UserID, err)
	}
	return found, nil
}

// WaitForMessage returns the first message in the room's history (see Messages) that match
// accepts, waiting for one if there is none yet.
func (c *Client) WaitForMessage(ctx context.Context, roomID id.RoomID, match func(*event.Event) bool) (*event.Event, error) {
	return c.waitForEvent(ctx, roomID, match, func(room *roomHistory) []*event.Event { return room.messages }, "message")
}

// WaitForUndecryptable returns the first undecryptable event of the room (see Undecryptable)
// that match accepts (nil matches any), waiting for one if there is none yet.
func (c *Client) WaitForUndecryptable(ctx context.Context, roomID id.RoomID, match func(*event.Event) bool) (*event.Event, error) {
	return c.waitForEvent(ctx, roomID, match, func(room *roomHistory) []*event.Event { return room.undecryptable }, "undecryptable event")
}

func (c *Client) waitForEvent(ctx context.Context, roomID id.RoomID, match func(*event.Event) bool, list func(*roomHistory) []*event.Event, what string) (*event.Event, error) {
	var found *event.Event
	err := c.hist.waitFor(ctx, func() bool {
		c.hist.mu.Lock()
		var evts []*event.Event
		if room, ok := c.hist.rooms[roomID]; ok {
			evts = slices.Clone(list(room))
		}
		c.hist.mu.Unlock()
		for _, evt := range evts {
			if match == nil || match(evt) {
				found = evt
				return true
			}
		}
		return false
	})
	if err != nil {
		return nil, fmt.Errorf("no matching %s for %s in %s (%d messages, %d undecryptable): %w",
			what, c.cli.UserID, roomID, len(c.Messages(roomID)), len(c.Undecryptable(roomID)), err)
	}
	return found, nil
}

// WaitForEvent waits until the encrypted or plaintext event with the ID has reached the room's
// history, decrypted or not. It returns the decrypted event (decrypted true) if the client could
// decrypt it, or else the encrypted event as received. An event that is not an m.room.message
// counts only while it is undecryptable.
func (c *Client) WaitForEvent(ctx context.Context, roomID id.RoomID, eventID id.EventID) (evt *event.Event, decrypted bool, err error) {
	err = c.hist.waitFor(ctx, func() bool {
		c.hist.mu.Lock()
		defer c.hist.mu.Unlock()
		room, ok := c.hist.rooms[roomID]
		if !ok {
			return false
		}
		for _, e := range room.messages {
			if e.ID == eventID {
				evt, decrypted = e, true
				return true
			}
		}
		for _, e := range room.undecryptable {
			if e.ID == eventID {
				evt = e
				return true
			}
		}
		return false
	})
	if err != nil {
		return nil, false, fmt.Errorf("event %s did not reach %s in %s: %w", eventID, c.cli.UserID, roomID, err)
	}
	return evt, decrypted, nil
}
