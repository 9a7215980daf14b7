package unwedge_test

import (
	"context"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestAnswerOwnSession: the bridge records at which index each device got its Megolm session, and
// a device that asks for the session again gets it from that index, never from an earlier one
// (Element's rule); a device it never shared the session with is not answered.
func TestAnswerOwnSession(t *testing.T) {
	f := newFixture(t)
	f.establish()
	const room = id.RoomID("!portal:example.org")
	// The bridge answers key requests with AnswerOwnSession alone, as bridge.Helper does for
	// devices whose user is in the room. The machine handles each request in a goroutine of its
	// own; decided says when one was.
	answered := 0
	decided := make(chan bool, 4)
	answerOwn := func(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
		handled, err := unwedge.AnswerOwnSession(ctx, f.bridge.Mach, f.udb.Shared, device, info)
		if err != nil {
			t.Errorf("AnswerOwnSession: %v", err)
		}
		defer func() { decided <- handled }()
		if handled {
			return &crypto.KeyShareRejectNoResponse
		}
		return &crypto.KeyShareRejection{Code: event.RoomKeyWithheldUnauthorized, Reason: "not shared with this device"}
	}
	shareWith := func(users ...id.UserID) id.SessionID {
		t.Helper()
		// The users are in the room, as in a bridge: fetching their devices while sharing then
		// invalidates the room's session, as mautrix-go does on a device change, while it is
		// being shared.
		for _, user := range users {
			if err := f.bridge.Mach.StateStore.(mautrix.StateStore).SetMembership(f.ctx, room, user, event.MembershipJoin); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.bridge.Mach.ShareGroupSession(f.ctx, room, users); err != nil {
			t.Fatal(err)
		}
		sess, err := f.bridge.Mach.CryptoStore.GetOutboundGroupSession(f.ctx, room)
		if err != nil || sess == nil {
			t.Fatalf("no outbound session after sharing: %v", err)
		}
		return sess.ID()
	}
	encrypt := func(n int) {
		for range n {
			if _, err := f.bridge.Mach.EncryptMegolmEvent(f.ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hi"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	firstIndex := func(p *cryptotest.Device, sessionID id.SessionID) (uint32, bool) {
		t.Helper()
		igs, err := p.Mach.CryptoStore.GetGroupSession(f.ctx, room, sessionID)
		if err != nil {
			t.Fatal(err)
		}
		if igs == nil {
			return 0, false
		}
		return igs.Internal.FirstKnownIndex(), true
	}
	// request makes the device forget the session and ask the bridge for it.
	request := func(p *cryptotest.Device, sessionID id.SessionID) {
		t.Helper()
		f.exec("DELETE FROM crypto_megolm_inbound_session WHERE account_id=$1 AND session_id=$2", string(p.DeviceID), sessionID)
		if err := p.Mach.SendRoomKeyRequest(f.ctx, room, f.bridgeKey(), sessionID, "", map[id.UserID][]id.DeviceID{bridgeUser: {bridgeDevice}}); err != nil {
			t.Fatal(err)
		}
		f.deliverToBridge()
		select {
		case handled := <-decided:
			if handled {
				answered++
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the bridge did not decide on the key request")
		}
		f.hs.Receive(p)
	}

	// The phone gets the session from index 0, and two messages move it on. mautrix-go shares a
	// session once, when it is made; a later share (forced here by marking the stored session
	// unshared after a restart) hands out the session's current index: the user's new laptop
	// gets it from index 2.
	sessionID := shareWith(peerUser)
	f.hs.Receive(f.peer)
	encrypt(2)
	f.restartBridge()
	f.bridge.Mach.AllowKeyShare = answerOwn
	laptop := f.newPeer(peerUser, "LAPTOP")
	f.bridge.Fetch(peerUser, "LAPTOP")
	laptop.Fetch(bridgeUser, bridgeDevice)
	stored, err := f.bridge.Mach.CryptoStore.GetOutboundGroupSession(f.ctx, room)
	if err != nil {
		t.Fatal(err)
	}
	stored.Shared = false
	if err = f.bridge.Mach.CryptoStore.AddOutboundGroupSession(f.ctx, stored); err != nil {
		t.Fatal(err)
	}
	if again := shareWith(peerUser); again != sessionID {
		t.Fatalf("the bridge rotated its session (%s, then %s)", sessionID, again)
	}
	f.hs.Receive(f.peer)
	f.hs.Receive(laptop)
	for _, tc := range []struct {
		device *cryptotest.Device
		want   uint32
	}{{f.peer, 0}, {laptop, 2}} {
		if got, ok := firstIndex(tc.device, sessionID); !ok || got != tc.want {
			t.Fatalf("%s got the session from index %d (%v), want %d", tc.device.DeviceID, got, ok, tc.want)
		}
		request(tc.device, sessionID)
		if got, ok := firstIndex(tc.device, sessionID); !ok || got != tc.want {
			t.Errorf("%s got the session again from index %d (%v), want %d, what it had", tc.device.DeviceID, got, ok, tc.want)
		}
	}
	if answered != 2 {
		t.Errorf("AnswerOwnSession answered %d requests, want 2", answered)
	}

	// A device the bridge never shared the session with gets nothing from this rule.
	tablet := f.newPeer(peerUser, "TABLET")
	f.bridge.Fetch(peerUser, "TABLET")
	tablet.Fetch(bridgeUser, bridgeDevice)
	tablet.SendDummy(f.bridge)
	f.deliverToBridge() // an Olm session, so the bridge could answer if it wanted to
	request(tablet, sessionID)
	if _, ok := firstIndex(tablet, sessionID); ok || answered != 2 {
		t.Errorf("a device the session was never shared with got it (answered %d)", answered)
	}
}

// TestReshareOwnSessions: after a new Olm session, the bridge sends a device its current room
// keys again only with the checks sharing applies: the session was shared with that device, the
// device is not blacklisted and is trusted enough, and its user is still a member of the room.
func TestReshareOwnSessions(t *testing.T) {
	f := newFixture(t)
	f.establish()
	const room = id.RoomID("!portal:example.org")
	states := f.bridge.Mach.StateStore.(mautrix.StateStore)
	if err := states.SetMembership(f.ctx, room, peerUser, event.MembershipJoin); err != nil {
		t.Fatal(err)
	}
	if err := f.bridge.Mach.ShareGroupSession(f.ctx, room, []id.UserID{peerUser}); err != nil {
		t.Fatal(err)
	}
	f.deliverToPeer()
	member := func(ctx context.Context, roomID id.RoomID, userID id.UserID) bool {
		return states.IsInvited(ctx, roomID, userID)
	}
	laptop := f.newPeer(peerUser, "LAPTOP")
	for _, tc := range []struct {
		name   string
		device func() *id.Device
		before func()
		after  func()
		want   int
	}{
		{"device that had the session", func() *id.Device { return f.bridge.Fetch(peerUser, peerDevice) }, nil, nil, 1},
		{"device the session was never shared with", func() *id.Device { return f.bridge.Fetch(peerUser, "LAPTOP") }, nil, nil, 0},
		{"user left the room", func() *id.Device { return f.bridge.Fetch(peerUser, peerDevice) },
			func() { _ = states.SetMembership(f.ctx, room, peerUser, event.MembershipLeave) },
			func() { _ = states.SetMembership(f.ctx, room, peerUser, event.MembershipJoin) }, 0},
		{"device below the minimum send trust", func() *id.Device { return f.bridge.Fetch(peerUser, peerDevice) },
			func() { f.bridge.Mach.SendKeysMinTrust = id.TrustStateCrossSignedVerified },
			func() { f.bridge.Mach.SendKeysMinTrust = id.TrustStateUnset }, 0},
		{"blacklisted device", func() *id.Device {
			d := *f.bridge.Fetch(peerUser, peerDevice)
			d.Trust = id.TrustStateBlacklisted
			return &d
		}, nil, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before()
			}
			if tc.after != nil {
				defer tc.after()
			}
			device := tc.device()
			sent, err := unwedge.ReshareOwnSessions(f.ctx, f.bridge.Mach, device, []id.RoomID{room}, member)
			if err != nil || sent != tc.want {
				t.Errorf("sent %d (%v), want %d", sent, err, tc.want)
			}
			inbox := f.hs.Inbox(f.peer)
			if device.DeviceID == "LAPTOP" {
				inbox = f.hs.Inbox(laptop)
			}
			if len(inbox) != tc.want {
				t.Errorf("%d to-device events reached the device, want %d", len(inbox), tc.want)
			}
		})
	}
}
