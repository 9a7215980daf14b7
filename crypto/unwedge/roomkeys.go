package unwedge

import (
	"context"
	"errors"
	"fmt"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// AnswerOwnSession answers a device's request (m.room_key_request) for one of the bridge's own
// Megolm sessions that the bridge had shared with that device, such as a key lost with a wedged
// Olm session: it forwards the session from the index the device first got it at, never from an
// earlier one, so the device gets back only what it had (the rule matrix-rust-sdk's
// should_share_key follows for other users' devices). handled is false when the session is not
// the bridge's own or was never shared with the device (as far as shared, the record the
// machine's Store keeps, knows): then this says nothing, and the caller's own rule decides.
// Whoever calls it checks first that the device may still have the room's keys (its user is in
// the room, it is not blacklisted).
// Relies on crypto/keysharing.go HandleRoomKeyRequest asking AllowKeyShare before GetGroupSession (pinned in internal/upstream).
func AnswerOwnSession(ctx context.Context, mach *crypto.OlmMachine, shared SharedIndex, device *id.Device, info event.RequestedKeyInfo) (handled bool, err error) {
	if shared == nil {
		return false, nil
	}
	igs, err := mach.CryptoStore.GetGroupSession(ctx, info.RoomID, info.SessionID)
	if err != nil {
		return false, fmt.Errorf("failed to get requested Megolm session: %w", err)
	} else if igs == nil || igs.SenderKey != mach.OwnIdentity().IdentityKey {
		return false, nil
	}
	index, ok, err := shared.FirstShared(ctx, info.SessionID, device.IdentityKey)
	if err != nil || !ok {
		return false, err
	}
	// A key cannot be exported from before the session's first known index (keys deleted on
	// decrypt, for example): the device then gets less than it had, never more.
	index = max(index, igs.Internal.FirstKnownIndex())
	key, err := igs.Internal.Export(index)
	if err != nil {
		return true, fmt.Errorf("failed to export Megolm session at index %d: %w", index, err)
	}
	forward := &event.ForwardedRoomKeyEventContent{
		RoomKeyEventContent: event.RoomKeyEventContent{
			Algorithm:     id.AlgorithmMegolmV1,
			RoomID:        igs.RoomID,
			SessionID:     igs.ID(),
			SessionKey:    string(key),
			SharedHistory: igs.SharedHistory,
		},
		SenderKey:          igs.SenderKey,
		SenderClaimedKey:   igs.SigningKey,
		ForwardingKeyChain: igs.ForwardingChains,
	}
	if err = mach.SendEncryptedToDevice(ctx, device, event.ToDeviceForwardedRoomKey, event.Content{Parsed: forward}); err != nil {
		return true, fmt.Errorf("failed to forward Megolm session: %w", err)
	}
	return true, nil
}

// MembershipCheck reports whether a user is joined to or invited into a room, as the bridge's
// Matrix state store knows it: the users a room's Megolm session is shared with.
type MembershipCheck func(ctx context.Context, roomID id.RoomID, userID id.UserID) bool

// ReshareOwnSessions sends a device the bridge's current outbound Megolm sessions of rooms again,
// over the Olm session in use now, after it replaced one the device could not read (the bridge
// healed it, or the device opened a new one). A session goes out only if the bridge had shared it
// with this device (by user and identity key), at its current index, so nobody gets a key they did
// not have; and only to a device that sharing would reach today, with the checks the machine's
// ShareGroupSession applies: not blacklisted, trusted at least at the machine's SendKeysMinTrust,
// and its user still a member of the room. It returns how many sessions it sent; errors of single
// rooms are joined, the other rooms still go out.
// Relies on crypto/encryptmegolm.go ShareGroupSession's checks and MarkOutboundGroupSessionShared (pinned in internal/upstream).
func ReshareOwnSessions(ctx context.Context, mach *crypto.OlmMachine, device *id.Device, rooms []id.RoomID, member MembershipCheck) (int, error) {
	if device.Trust == id.TrustStateBlacklisted {
		return 0, nil
	} else if trust, _ := mach.ResolveTrustContext(ctx, device); trust < mach.SendKeysMinTrust {
		return 0, nil
	}
	sent := 0
	var errs []error
	for _, roomID := range rooms {
		sess, err := mach.CryptoStore.GetOutboundGroupSession(ctx, roomID)
		if err != nil {
			errs = append(errs, fmt.Errorf("failed to get outbound Megolm session of %s: %w", roomID, err))
			continue
		} else if sess == nil || !sess.Shared || sess.Expired() || !member(ctx, roomID, device.UserID) {
			continue
		}
		if shared, err := mach.CryptoStore.IsOutboundGroupSessionShared(ctx, device.UserID, device.IdentityKey, sess.ID()); err != nil {
			errs = append(errs, fmt.Errorf("failed to check whether session %s was shared: %w", sess.ID(), err))
			continue
		} else if !shared {
			continue
		}
		if err = mach.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, sess.ShareContent()); err != nil {
			errs = append(errs, fmt.Errorf("failed to share room key of %s again: %w", roomID, err))
			continue
		}
		sent++
	}
	return sent, errors.Join(errs...)
}
