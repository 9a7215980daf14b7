package testclient

import (
	"slices"
	"time"

	"maunium.net/go/mautrix/id"
)

// What the client saw of its own key traffic, for measurements such as the wedge lab's "lost
// before the heal": which copies of its room keys went to which device and when, which Megolm
// session and index each message it sent used, and when other devices started new Olm sessions
// with it. Kept in memory with the history (not in the crypto database): Restore rolls back the
// crypto state, not what was sent.

// RoomKeyCopyKind says why the client sent a copy of one of its room keys.
type RoomKeyCopyKind string

const (
	// RoomKeyShared: the room's outbound session went to every member's device before the
	// client's first message in it (m.room_key).
	RoomKeyShared RoomKeyCopyKind = "shared"
	// RoomKeyReshared: the Element rules shared the current outbound session again with a device
	// that started a new Olm session (m.room_key, from the current index).
	RoomKeyReshared RoomKeyCopyKind = "reshared"
	// RoomKeyForwarded: an answer to a key request, or ForwardRoomKey (m.forwarded_room_key).
	RoomKeyForwarded RoomKeyCopyKind = "forwarded"
)

// RoomKeyCopy is one copy of a Megolm session key the client sent to another device over Olm.
type RoomKeyCopy struct {
	Kind      RoomKeyCopyKind
	UserID    id.UserID
	DeviceID  id.DeviceID
	RoomID    id.RoomID
	SessionID id.SessionID
	// Index is the first message index the copy decrypts.
	Index uint32
	// At is when the client began to send it, before it picked the Olm session to encrypt it
	// with: a copy begun after the device got a new Olm session from the recipient goes over
	// that session or a newer one (mautrix-go encrypts with the session that decrypted last).
	At time.Time
}

// NewOlmSession is an Olm session another device started with the client: a pre-key message
// from it created the session and was decrypted.
type NewOlmSession struct {
	SenderKey id.SenderKey
	At        time.Time
}

// SentEncryption is how a message the client sent was encrypted.
type SentEncryption struct {
	SessionID id.SessionID
	Index     uint32
}

func (h *history) addRoomKeyCopies(copies ...RoomKeyCopy) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.keyCopies = append(h.keyCopies, copies...)
	h.notifyLocked()
}

func (h *history) addNewOlmSession(s NewOlmSession) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.olmSessions = append(h.olmSessions, s)
	h.notifyLocked()
}

func (h *history) addSent(eventID id.EventID, enc SentEncryption) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sent[eventID] = enc
}

// RoomKeysSent returns the copies of its room keys the client sent to other devices, in the
// order it began to send them. Copies that went to devices the client had no Olm session with
// (mautrix-go sends those m.room_key.withheld) are not among them.
func (c *Client) RoomKeysSent() []RoomKeyCopy {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	return slices.Clone(c.hist.keyCopies)
}

// NewOlmSessions returns the Olm sessions other devices started with the client, in the order
// they were created.
func (c *Client) NewOlmSessions() []NewOlmSession {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	return slices.Clone(c.hist.olmSessions)
}

// Sent returns the Megolm session and message index of an encrypted message the client sent,
// and false for an event it did not send encrypted (SendWithheldText's are not recorded).
func (c *Client) Sent(eventID id.EventID) (SentEncryption, bool) {
	c.hist.mu.Lock()
	defer c.hist.mu.Unlock()
	enc, ok := c.hist.sent[eventID]
	return enc, ok
}
