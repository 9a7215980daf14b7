package testclient

import (
	"context"
	"encoding"
	"errors"
	"fmt"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Rules says whose key-sharing behaviour the client follows: which room key requests
// (m.room_key_request) it answers and from which index, and whether it shares its current
// Megolm session again with a device that started a new Olm session with it.
//
// The Element rules follow matrix-rust-sdk's crypto crate (crates/matrix-sdk-crypto, read at
// commit 64b12e0b of github.com/matrix-org/matrix-rust-sdk), which Element X and Element Web
// both use. The comments name the functions followed.
type Rules string

const (
	// RulesMautrix is mautrix-go's OlmMachine unchanged (crypto/keysharing.go,
	// defaultAllowKeyShare): it answers another user's device for any of its own Megolm sessions
	// it ever shared with that device, rotated or not, and its own user's trusted devices for any
	// session; it always forwards from the first index it knows, and tells refused devices why
	// with m.room_key.withheld. It never shares a session with a device a second time.
	RulesMautrix Rules = "mautrix"
	// RulesElementWeb is matrix-rust-sdk with the automatic-room-key-forwarding feature, as in
	// Element Web's WebAssembly build. It answers a key request (GossipMachine::should_share_key
	// in src/gossiping/machine.rs) from its own user's verified devices for any session, from
	// the first index it knows; from any other device only for the room's current outbound
	// session, only if it shared that session with the device, and from the index it shared it
	// at. Refusals are not answered at all. It shares the current session again after a new Olm
	// session, like RulesElementX.
	RulesElementWeb Rules = "element-web"
	// RulesElementX is matrix-rust-sdk as Element X builds it (bindings/matrix-sdk-ffi depends on
	// matrix-sdk without default features, so without automatic-room-key-forwarding): it never
	// answers a key request (GossipMachine::handle_key_request is compiled out). After a device
	// started a new Olm session with it, its next message in a room shares the room's current
	// session with that device again, from the current index (see Client.reshareWedged).
	RulesElementX Rules = "element-x"
)

// ErrUnknownRules is returned by ParseRules for a name that is not one of the Rules.
var ErrUnknownRules = errors.New("unknown key-sharing rules")

var (
	_ encoding.TextMarshaler   = RulesMautrix
	_ encoding.TextUnmarshaler = (*Rules)(nil)
)

// ParseRules returns the Rules with the name ("mautrix", "element-web" or "element-x").
func ParseRules(name string) (Rules, error) {
	switch r := Rules(name); r {
	case RulesMautrix, RulesElementWeb, RulesElementX:
		return r, nil
	}
	return "", fmt.Errorf("%w %q: want %s, %s or %s", ErrUnknownRules, name, RulesMautrix, RulesElementWeb, RulesElementX)
}

func (r Rules) String() string { return string(r) }

// MarshalText and UnmarshalText let Rules be a flag (flag.TextVar) or a config value.
func (r Rules) MarshalText() ([]byte, error) { return []byte(r), nil }

func (r *Rules) UnmarshalText(text []byte) error {
	parsed, err := ParseRules(string(text))
	if err != nil {
		return err
	}
	*r = parsed
	return nil
}

// element reports whether the rules are matrix-rust-sdk's: they keep, per outbound session and
// device, the index the session was shared at and the device's Olm wedging index then.
func (r Rules) element() bool { return r == RulesElementWeb || r == RulesElementX }

// KeyShareDecision is what the client made of a room key request from another device.
type KeyShareDecision string

const (
	// KeyShareAccepted: the key went out as m.forwarded_room_key, from KeyRequest.Index. With
	// RulesMautrix the machine sends it right after the decision is recorded.
	KeyShareAccepted KeyShareDecision = "accepted"
	// KeyShareRejected: mautrix-go's rule refused (RulesMautrix).
	KeyShareRejected KeyShareDecision = "rejected"
	// KeyShareUnknownSession: the client does not hold the session (matrix-rust-sdk:
	// GossipMachine::handle_supported_key_request finds no inbound group session).
	KeyShareUnknownSession KeyShareDecision = "unknown-session"
	// KeyShareForwardingDisabled: the client never answers (RulesElementX; matrix-rust-sdk
	// without automatic-room-key-forwarding).
	KeyShareForwardingDisabled KeyShareDecision = "forwarding-disabled"
	// The next four are matrix-rust-sdk's KeyForwardDecision (src/gossiping/mod.rs).

	// KeyShareMissingOutboundSession: another user's device asked for a session that is not the
	// room's current outbound session (rotated away, or not the client's own).
	KeyShareMissingOutboundSession KeyShareDecision = "missing-outbound-session"
	// KeyShareOutboundSessionNotShared: the current session was never shared with the device.
	KeyShareOutboundSessionNotShared KeyShareDecision = "outbound-session-not-shared"
	// KeyShareUntrustedDevice: an unverified device of the client's own user asked for a session
	// that is not the current one shared with it.
	KeyShareUntrustedDevice KeyShareDecision = "untrusted-device"
	// KeyShareChangedSenderKey: the session went to a device with this ID but another identity key.
	KeyShareChangedSenderKey KeyShareDecision = "changed-sender-key"
	// KeyShareError: the client could not decide (see KeyRequest.Err).
	KeyShareError KeyShareDecision = "error"
)

// KeyRequest is a room key request the client received from another device, and its answer.
type KeyRequest struct {
	From      id.UserID
	Device    id.DeviceID
	RoomID    id.RoomID
	SessionID id.SessionID
	Decision  KeyShareDecision
	// Index is the first message index of the key that went out (KeyShareAccepted only).
	Index uint32
	// Err is why the client could not decide, or could not send an accepted key.
	Err error
}

// keyRequestFacts is what an Element rule looks at to decide on a key request.
type keyRequestFacts struct {
	// session is the requested inbound Megolm session, nil if the client does not hold it.
	session *crypto.InboundGroupSession
	// ownUser: the requester is a device of the client's own user; verified: one it verified.
	ownUser, verified bool
	// current: the requested session is the room's current outbound session.
	current bool
	// shared is the record of sharing the current session with the requesting device (with its
	// device ID), nil if it never got it.
	shared *shareRecord
	// identityKey is the requesting device's identity key.
	identityKey id.IdentityKey
}

// decide applies an Element rule. RulesElementX answers nothing (GossipMachine::handle_key_request
// needs automatic-room-key-forwarding); RulesElementWeb needs the inbound session
// (handle_supported_key_request) and then decides as GossipMachine::should_share_key: the own
// user's verified devices get the whole session; any device the room's current outbound session
// was shared with gets it from the index it was shared at (ShareState::Shared's message_index);
// all others get nothing.
func (r Rules) decide(f keyRequestFacts) (KeyShareDecision, uint32) {
	switch {
	case r != RulesElementWeb:
		return KeyShareForwardingDisabled, 0
	case f.session == nil:
		return KeyShareUnknownSession, 0
	case f.ownUser && f.verified:
		return KeyShareAccepted, f.session.Internal.FirstKnownIndex()
	case f.current && f.shared == nil:
		return KeyShareOutboundSessionNotShared, 0
	case f.current && f.shared.identityKey != f.identityKey:
		return KeyShareChangedSenderKey, 0
	case f.current:
		return KeyShareAccepted, f.shared.index
	case f.ownUser:
		return KeyShareUntrustedDevice, 0
	default:
		return KeyShareMissingOutboundSession, 0
	}
}

// allowKeyShare returns the OlmMachine's AllowKeyShare hook for the client's rules. With
// RulesMautrix it asks stock (the machine's own hook) and lets the machine answer. The Element
// rules answer by themselves and tell the machine to do nothing, because mautrix-go's
// HandleRoomKeyRequest (v0.32.0) always forwards from the first known index, and matrix-rust-sdk
// sends no m.room_key.withheld for a request it refuses (GossipMachine::answer_room_key_request
// only logs).
// Every decision goes into the client's history (KeyRequests).
func (c *Client) allowKeyShare(cs *cryptoState, stock func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection) func(context.Context, *id.Device, event.RequestedKeyInfo) *crypto.KeyShareRejection {
	return func(ctx context.Context, device *id.Device, info event.RequestedKeyInfo) *crypto.KeyShareRejection {
		req := KeyRequest{From: device.UserID, Device: device.DeviceID, RoomID: info.RoomID, SessionID: info.SessionID}
		rejection := &crypto.KeyShareRejectNoResponse
		if c.rules == RulesMautrix {
			rejection = stock(ctx, device, info)
			req.Decision, req.Index, req.Err = stockDecision(ctx, cs, rejection, info)
			if req.Decision == KeyShareAccepted {
				// The machine forwards the key once the hook returns.
				c.hist.addRoomKeyCopies(RoomKeyCopy{
					Kind: RoomKeyForwarded, UserID: device.UserID, DeviceID: device.DeviceID, RoomID: info.RoomID,
					SessionID: info.SessionID, Index: req.Index, At: time.Now(),
				})
			}
		} else {
			req.Decision, req.Index, req.Err = c.answerKeyRequest(ctx, cs, device, info)
		}
		c.log.Debug().
			Stringer("requester_user_id", device.UserID).
			Stringer("requester_device_id", device.DeviceID).
			Stringer("room_id", info.RoomID).
			Stringer("session_id", info.SessionID).
			Str("decision", string(req.Decision)).
			Uint32("index", req.Index).
			AnErr("error", req.Err).
			Msg("Decided on room key request")
		c.hist.addKeyRequest(req)
		return rejection
	}
}

// stockDecision describes what mautrix-go's HandleRoomKeyRequest does after its hook decided.
func stockDecision(ctx context.Context, cs *cryptoState, rejection *crypto.KeyShareRejection, info event.RequestedKeyInfo) (KeyShareDecision, uint32, error) {
	if rejection != nil {
		return KeyShareRejected, 0, nil
	}
	igs, err := cs.store.GetGroupSession(ctx, info.RoomID, info.SessionID)
	if errors.Is(err, crypto.ErrGroupSessionWithheld) || (err == nil && igs == nil) {
		return KeyShareUnknownSession, 0, nil
	} else if err != nil {
		return KeyShareError, 0, fmt.Errorf("failed to get inbound group session %s: %w", info.SessionID, err)
	}
	return KeyShareAccepted, igs.Internal.FirstKnownIndex(), nil
}

// answerKeyRequest decides on a key request by an Element rule and sends an accepted key.
// RulesElementX decides without looking at anything.
func (c *Client) answerKeyRequest(ctx context.Context, cs *cryptoState, device *id.Device, info event.RequestedKeyInfo) (KeyShareDecision, uint32, error) {
	var facts keyRequestFacts
	if c.rules == RulesElementWeb {
		var err error
		if facts, err = c.keyRequestFacts(ctx, cs, device, info); err != nil {
			return KeyShareError, 0, err
		}
	}
	decision, index := c.rules.decide(facts)
	if decision != KeyShareAccepted {
		return decision, 0, nil
	}
	content, err := forwardedRoomKey(facts.session, index)
	if err == nil {
		c.hist.addRoomKeyCopies(RoomKeyCopy{
			Kind: RoomKeyForwarded, UserID: device.UserID, DeviceID: device.DeviceID, RoomID: info.RoomID,
			SessionID: info.SessionID, Index: index, At: time.Now(),
		})
		err = cs.mach.SendEncryptedToDevice(ctx, device, event.ToDeviceForwardedRoomKey, content)
	}
	if err != nil {
		return decision, index, fmt.Errorf("failed to forward room key %s: %w", info.SessionID, err)
	}
	return decision, index, nil
}

func (c *Client) keyRequestFacts(ctx context.Context, cs *cryptoState, device *id.Device, info event.RequestedKeyInfo) (keyRequestFacts, error) {
	facts := keyRequestFacts{ownUser: device.UserID == c.cli.UserID, identityKey: device.IdentityKey}
	igs, err := cs.store.GetGroupSession(ctx, info.RoomID, info.SessionID)
	if err != nil && !errors.Is(err, crypto.ErrGroupSessionWithheld) {
		return facts, fmt.Errorf("failed to get inbound group session %s: %w", info.SessionID, err)
	}
	facts.session = igs
	if facts.ownUser {
		// matrix-rust-sdk's Device::is_verified: locally trusted, or cross-signed by the own
		// identity that the user verified.
		trust, err := cs.mach.ResolveTrustContext(ctx, device)
		if err != nil {
			return facts, fmt.Errorf("failed to resolve trust of device %s: %w", device.DeviceID, err)
		}
		facts.verified = trust >= id.TrustStateCrossSignedVerified
	}
	out, err := cs.store.GetOutboundGroupSession(ctx, info.RoomID)
	if err != nil {
		return facts, fmt.Errorf("failed to get outbound group session of %s: %w", info.RoomID, err)
	}
	facts.current = out != nil && out.ID() == info.SessionID
	if facts.current {
		if facts.shared, err = cs.shares.get(ctx, info.SessionID, device.UserID, device.DeviceID); err != nil {
			return facts, err
		}
	}
	return facts, nil
}

// forwardedRoomKey is an m.forwarded_room_key with the session exported at index.
func forwardedRoomKey(igs *crypto.InboundGroupSession, index uint32) (event.Content, error) {
	exported, err := igs.Internal.Export(index)
	if err != nil {
		return event.Content{}, fmt.Errorf("failed to export room key %s at index %d: %w", igs.ID(), index, err)
	}
	return event.Content{Parsed: &event.ForwardedRoomKeyEventContent{
		RoomKeyEventContent: event.RoomKeyEventContent{
			Algorithm:     id.AlgorithmMegolmV1,
			RoomID:        igs.RoomID,
			SessionID:     igs.ID(),
			SessionKey:    string(exported),
			SharedHistory: igs.SharedHistory,
		},
		SenderKey:          igs.SenderKey,
		SenderClaimedKey:   igs.SigningKey,
		ForwardingKeyChain: igs.ForwardingChains,
	}}, nil
}
