package bridge

import (
	"context"
	"fmt"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// Audience decides with bridgev2's users and portals whose devices are healed.
type Audience struct {
	br    *bridgev2.Bridge
	rooms *sqlstatestore.SQLStateStore
	mode  unwedge.Scope
}

// NewAudience returns the audience of a scope (unwedge.scope); rooms is the bridge's Matrix state store.
func NewAudience(br *bridgev2.Bridge, rooms *sqlstatestore.SQLStateStore, mode unwedge.Scope) *Audience {
	return &Audience{br: br, rooms: rooms, mode: mode}
}

// sharesRoomQuery asks the bridge's Matrix state store (mautrix-go's sqlstatestore table
// mx_user_profile, which holds the members of every room the bot or a ghost is in) whether the
// user is joined to or invited into any of them. FindSharedRooms does not answer that: it lists
// only encrypted rooms, and also rooms the user has left.
const sharesRoomQuery = `
	SELECT EXISTS(SELECT 1 FROM mx_user_profile WHERE user_id = $1 AND membership IN ('join', 'invite'))`

// portalMemberQuery asks whether the user is joined to or invited into an encrypted portal room
// of this bridge: mx_user_profile (the state store) joined with bridgev2's portal table, which
// bridgev2 keeps in the same database (its Matrix connector opens the state store on the bridge's
// database). mautrix-go's FindSharedRooms is no substitute: it also lists rooms the user left or
// was banned from (security finding 19). Encrypted rooms only, as FindSharedRooms does and as the
// OlmMachine tracks devices: a user who shares only unencrypted portals with the bridge has no
// room key to send it, so a heal would only spend a one-time key. An encrypted room is known as
// such from its m.room.encryption event, which precedes its first encrypted message.
const portalMemberQuery = `
	SELECT EXISTS(
		SELECT 1 FROM mx_user_profile
		INNER JOIN portal ON portal.bridge_id = $2 AND portal.mxid = mx_user_profile.room_id
		INNER JOIN mx_room_state ON mx_room_state.room_id = mx_user_profile.room_id
		WHERE mx_user_profile.user_id = $1 AND mx_user_profile.membership IN ('join', 'invite')
			AND mx_room_state.encryption IS NOT NULL
	)`

func (s *Audience) InScope(ctx context.Context, userID id.UserID) (bool, error) {
	if s.br.IsGhostMXID(userID) || userID == s.br.Bot.GetMXID() {
		return false, nil
	}
	switch s.mode {
	case unwedge.ScopeRoomMembers:
		var shares bool
		if err := s.rooms.QueryRow(ctx, sharesRoomQuery, userID).Scan(&shares); err != nil {
			return false, fmt.Errorf("failed to find rooms shared with the bridge: %w", err)
		}
		return shares, nil
	case unwedge.ScopeEveryone:
		return true, nil
	case unwedge.ScopeLoggedIn:
		user, err := s.br.GetExistingUserByMXID(ctx, userID)
		if err != nil {
			return false, fmt.Errorf("failed to get user: %w", err)
		}
		return user != nil && len(user.GetUserLoginIDs()) > 0, nil
	case unwedge.ScopePortalMembers:
		var member bool
		if err := s.rooms.QueryRow(ctx, portalMemberQuery, userID, s.br.ID).Scan(&member); err != nil {
			return false, fmt.Errorf("failed to find portals shared with the bridge: %w", err)
		}
		return member, nil
	}
	return false, fmt.Errorf("unknown scope %q", s.mode)
}
