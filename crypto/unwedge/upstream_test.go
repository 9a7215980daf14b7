package unwedge_test

// Tests of what unwedge assumes about mautrix-go v0.33.0's Megolm sessions, which v0.33 keys by
// room and session ID "to avoid cross-room session confusion" (crypto_megolm_inbound_session's
// key is (account_id, room_id, session_id); v0.32 kept one row per session ID and moved it to the
// room of the last copy stored). The mautrix-go files are pinned in internal/upstream.

import (
	"context"
	"errors"
	"testing"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	roomA = id.RoomID("!a:example.org")
	roomB = id.RoomID("!b:example.org")
)

// device returns the record that from's machine holds of the device.
func (f *fixture) device(from *crypto.OlmMachine, userID id.UserID, deviceID id.DeviceID) *id.Device {
	f.t.Helper()
	dev, err := from.CryptoStore.GetDevice(f.ctx, userID, deviceID)
	if err != nil || dev == nil {
		f.t.Fatalf("no device %s of %s: %v", deviceID, userID, err)
	}
	return dev
}

// TestOwnSessionKeepsItsRoom: AnswerOwnSession answers from the bridge's own copy of its Megolm
// session, found by the request's room and session ID, and forwards it with that copy's room. A
// member who got the session in room A and forwards it back to the bridge as room B's (mautrix-go
// stores forwarded keys unrequested) must not move the bridge's copy out of room A: under v0.32's
// one row per session ID it did, and a device asking for room A's key was then not answered.
func TestOwnSessionKeepsItsRoom(t *testing.T) {
	f := newFixture(t)
	f.establish()
	if err := f.bridge.Mach.StateStore.(mautrix.StateStore).SetMembership(f.ctx, roomA, peerUser, event.MembershipJoin); err != nil {
		t.Fatal(err)
	}
	if err := f.bridge.Mach.ShareGroupSession(f.ctx, roomA, []id.UserID{peerUser}); err != nil {
		t.Fatal(err)
	}
	f.hs.Receive(f.peer)
	out, err := f.bridge.Mach.CryptoStore.GetOutboundGroupSession(f.ctx, roomA)
	if err != nil || out == nil {
		t.Fatalf("no outbound session: %v", err)
	}
	sessionID := out.ID()
	got, err := f.peer.Mach.CryptoStore.GetGroupSession(f.ctx, roomA, sessionID)
	if err != nil || got == nil {
		t.Fatalf("the peer did not get room A's session: %v", err)
	}

	// The peer forwards the session to the bridge as room B's.
	key, err := got.Internal.Export(got.Internal.FirstKnownIndex())
	if err != nil {
		t.Fatal(err)
	}
	forward := &event.ForwardedRoomKeyEventContent{
		RoomKeyEventContent: event.RoomKeyEventContent{Algorithm: id.AlgorithmMegolmV1, RoomID: roomB, SessionID: sessionID, SessionKey: string(key)},
		SenderKey:           f.bridgeKey(),
		SenderClaimedKey:    f.bridge.Mach.OwnIdentity().SigningKey,
	}
	if err = f.peer.Mach.SendEncryptedToDevice(f.ctx, f.device(f.peer.Mach, bridgeUser, bridgeDevice), event.ToDeviceForwardedRoomKey, event.Content{Parsed: forward}); err != nil {
		t.Fatal(err)
	}
	f.deliverToBridge()
	if copyB, err := f.bridge.Mach.CryptoStore.GetGroupSession(f.ctx, roomB, sessionID); err != nil || copyB == nil {
		t.Fatalf("the bridge did not store the forwarded copy under room B (%v): the test no longer sets up what it means to", err)
	}
	own, err := f.bridge.Mach.CryptoStore.GetGroupSession(f.ctx, roomA, sessionID)
	if err != nil || own == nil || own.RoomID != roomA {
		t.Fatalf("the bridge's own copy of room A's session is gone from room A after a forward as room B's: %+v, %v", own, err)
	}

	// The peer lost room A's key and asks for it: it gets room A's key back.
	f.exec("DELETE FROM crypto_megolm_inbound_session WHERE account_id=$1 AND session_id=$2", string(peerDevice), sessionID)
	handled, err := unwedge.AnswerOwnSession(f.ctx, f.bridge.Mach, f.udb.Shared, f.device(f.bridge.Mach, peerUser, peerDevice),
		event.RequestedKeyInfo{Algorithm: id.AlgorithmMegolmV1, RoomID: roomA, SessionID: sessionID})
	if err != nil || !handled {
		t.Fatalf("AnswerOwnSession(room A) = %v, %v", handled, err)
	}
	f.hs.Receive(f.peer)
	if back, err := f.peer.Mach.CryptoStore.GetGroupSession(f.ctx, roomA, sessionID); err != nil || back == nil {
		t.Fatalf("the peer did not get room A's key back: %v", err)
	}
}

// TestRoomKeyForAnotherRoom: a room key is the session of the room it names. An event of room A
// whose session the bridge got only as room B's does not decrypt, and fails as a missing session
// (ErrNoSessionFound, which bridge.Helper.Decrypt hands to recovery to keep), not as some other
// error; SessionReceived names room B, so recovery does not retry room A's events for it. Once
// the key arrives as room A's, SessionReceived names room A and the event decrypts.
func TestRoomKeyForAnotherRoom(t *testing.T) {
	f := newFixture(t)
	f.establish()
	received := make(chan id.RoomID, 4)
	f.bridge.Mach.SessionReceived = func(_ context.Context, roomID id.RoomID, _ id.SessionID, _ uint32) { received <- roomID }

	// The peer encrypts a message in room A with a session shared with nobody yet.
	if err := f.peer.Mach.ShareGroupSession(f.ctx, roomA, nil); err != nil {
		t.Fatal(err)
	}
	out, err := f.peer.Mach.CryptoStore.GetOutboundGroupSession(f.ctx, roomA)
	if err != nil || out == nil {
		t.Fatalf("no outbound session at the peer: %v", err)
	}
	share := out.ShareContent() // from index 0, before the message
	content, err := f.peer.Mach.EncryptMegolmEvent(f.ctx, roomA, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hi"})
	if err != nil {
		t.Fatal(err)
	}
	evt := &event.Event{ID: "$a1", RoomID: roomA, Sender: peerUser, Type: event.EventEncrypted, Content: event.Content{Parsed: content}}
	sendKey := func(room id.RoomID) {
		t.Helper()
		key := *share.AsRoomKey()
		key.RoomID = room
		if err := f.peer.Mach.SendEncryptedToDevice(f.ctx, f.device(f.peer.Mach, bridgeUser, bridgeDevice), event.ToDeviceRoomKey, event.Content{Parsed: &key}); err != nil {
			t.Fatal(err)
		}
		f.deliverToBridge()
		select {
		case got := <-received:
			if got != room {
				t.Fatalf("SessionReceived named %s for a key of %s", got, room)
			}
		default:
			t.Fatalf("SessionReceived was not called for the key of %s", room)
		}
	}

	sendKey(roomB)
	if _, err = f.bridge.Mach.DecryptMegolmEvent(f.ctx, evt); !errors.Is(err, crypto.ErrNoSessionFound) {
		t.Fatalf("room A's event with the session known only as room B's: %v, want ErrNoSessionFound", err)
	}
	sendKey(roomA)
	if _, err = f.bridge.Mach.DecryptMegolmEvent(f.ctx, evt); err != nil {
		t.Fatalf("room A's event with room A's key: %v", err)
	}
}
