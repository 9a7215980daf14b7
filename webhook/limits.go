package webhook

import (
	"context"
	"fmt"
	"sync"

	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/networkid"
)

// ErrCodeLimitExceeded is the errcode of the 403 answer to a request that would create a chat or
// a sender beyond the login's limit (network.max_chats_per_login, max_senders_per_login). Nothing
// was done. It is not a 429: sending the request again later does not help, only an admin
// raising the limit does, while the login's existing chats and senders keep working.
const ErrCodeLimitExceeded = "M_RESOURCE_LIMIT_EXCEEDED"

// limitError refuses a creation beyond a login's limit.
type limitError struct {
	what  string
	limit int
}

func (e *limitError) Error() string {
	return fmt.Sprintf("this login has reached its limit of %d %s", e.limit, e.what)
}

// loginLocks holds one mutex per login. A limit is checked and the creation it admits is made
// under the login's mutex, so concurrent requests of one login cannot both take the last place.
// Replicas sharing the database each have their own, so each may overshoot a limit by one.
type loginLocks struct {
	lock  sync.Mutex
	locks map[networkid.UserLoginID]*sync.Mutex
}

// acquire locks the login's mutex and returns its unlock.
func (l *loginLocks) acquire(loginID networkid.UserLoginID) func() {
	l.lock.Lock()
	if l.locks == nil {
		l.locks = make(map[networkid.UserLoginID]*sync.Mutex)
	}
	mu, ok := l.locks[loginID]
	if !ok {
		mu = &sync.Mutex{}
		l.locks[loginID] = mu
	}
	l.lock.Unlock()
	mu.Lock()
	return mu.Unlock
}

// chatPortal returns the portal of one of the login's chats. A chat the login does not have yet
// gets a portal only while it has fewer than max_chats_per_login; beyond, a *limitError.
func (c *Connector) chatPortal(ctx context.Context, login *bridgev2.UserLogin, chatID string) (*bridgev2.Portal, error) {
	key := portalKey(login, chatID)
	unlock := c.creating.acquire(login.ID)
	defer unlock()
	portal, err := c.br.GetExistingPortalByKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("failed to get portal: %w", err)
	} else if portal != nil {
		return portal, nil
	}
	chats, err := c.db.Usage.Portals(ctx, string(login.ID))
	if err != nil {
		return nil, fmt.Errorf("failed to count chats: %w", err)
	} else if chats >= c.Config.MaxChatsPerLogin {
		return nil, &limitError{what: "chats", limit: c.Config.MaxChatsPerLogin}
	}
	portal, err = c.br.GetPortalByKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("failed to create portal: %w", err)
	}
	return portal, nil
}

// senderGhost returns the ghost of one of the login's senders. A sender the login has not posted
// as yet gets a ghost only while it has fewer than max_senders_per_login; beyond, a *limitError.
func (c *Connector) senderGhost(ctx context.Context, login *bridgev2.UserLogin, sender string) (*bridgev2.Ghost, error) {
	ghostID := GhostID(login.ID, sender)
	unlock := c.creating.acquire(login.ID)
	defer unlock()
	ghost, err := c.br.GetExistingGhostByID(ctx, ghostID)
	if err != nil {
		return nil, fmt.Errorf("failed to get ghost: %w", err)
	} else if ghost != nil {
		return ghost, nil
	}
	senders, err := c.db.Usage.GhostsWithPrefix(ctx, ghostPrefix(login.ID))
	if err != nil {
		return nil, fmt.Errorf("failed to count senders: %w", err)
	} else if senders >= c.Config.MaxSendersPerLogin {
		return nil, &limitError{what: "senders", limit: c.Config.MaxSendersPerLogin}
	}
	ghost, err = c.br.GetGhostByID(ctx, ghostID)
	if err != nil {
		return nil, fmt.Errorf("failed to create ghost: %w", err)
	}
	return ghost, nil
}
