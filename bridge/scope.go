package bridge

import (
	"context"
	"fmt"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// Scope decides with bridgev2's users and portals whose devices are healed.
type Scope struct {
	br    *bridgev2.Bridge
	rooms sharedRoomFinder
	mode  unwedge.ScopeMode
}

type sharedRoomFinder interface {
	FindSharedRooms(ctx context.Context, userID id.UserID) ([]id.RoomID, error)
}

// NewScope returns the scope for a mode; rooms is the bridge's Matrix state store.
func NewScope(br *bridgev2.Bridge, rooms sharedRoomFinder, mode unwedge.ScopeMode) *Scope {
	return &Scope{br: br, rooms: rooms, mode: mode}
}

func (s *Scope) InScope(ctx context.Context, userID id.UserID) (bool, error) {
	if s.br.IsGhostMXID(userID) || userID == s.br.Bot.GetMXID() {
		return false, nil
	}
	switch s.mode {
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
