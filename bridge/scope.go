package bridge

import (
	"context"
	"fmt"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// Scope decides with bridgev2's users and portals whose devices are healed.
type Scope struct {
	br    *bridgev2.Bridge
	rooms *sqlstatestore.SQLStateStore
	mode  unwedge.ScopeMode
}

// NewScope returns the scope for a mode; rooms is the bridge's Matrix state store.
func NewScope(br *bridgev2.Bridge, rooms *sqlstatestore.SQLStateStore, mode unwedge.ScopeMode) *Scope {
	return &Scope{br: br, rooms: rooms, mode: mode}
}

// sharesRoomQuery asks the bridge's Matrix state store (mautrix-go's sqlstatestore table
// mx_user_profile, which holds the members of every room the bot or a ghost is in) whether the
// user is joined to or invited into any of them. FindSharedRooms does not answer that: it lists
// only encrypted rooms, and also rooms the user has left.
const sharesRoomQuery = `
	SELECT EXISTS(SELECT 1 FROM mx_user_profile WHERE user_id = $1 AND membership IN ('join', 'invite'))`

func (s *Scope) InScope(ctx context.Context, userID id.UserID) (bool, error) {
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
		rooms, err := s.rooms.FindSharedRooms(ctx, userID)
		if err != nil {
			return false, fmt.Errorf("failed to find shared rooms: %w", err)
		}
		for _, roomID := range rooms {
			if portal, err := s.br.GetPortalByMXID(ctx, roomID); err == nil && portal != nil {
				return true, nil
			}
		}
		return false, nil
	}
	return false, fmt.Errorf("unknown scope %q", s.mode)
}
