package webhook

import "maunium.net/go/mautrix/bridgev2/networkid"

// Every login has its own namespace of remote users: the sender "bob" that login "acme" posts as
// is the ghost "acme:bob", and another login's "bob" is another ghost. A token therefore reaches
// only its own login's ghosts; with one ID per sender, any token holder could post as, and
// rename, the senders of every other login.
//
// The separator is not allowed by idPattern, so a ghost ID names exactly one login and sender.
const ghostSeparator = ":"

// GhostID is the remote user ID of a sender that a login posts as.
func GhostID(loginID networkid.UserLoginID, sender string) networkid.UserID {
	return networkid.UserID(string(loginID) + ghostSeparator + sender)
}

// ghostPrefix starts the ID of every ghost of a login, and of no other login's ghost.
func ghostPrefix(loginID networkid.UserLoginID) string {
	return string(loginID) + ghostSeparator
}

// selfID is the login's own remote user ID: its account, in its own namespace.
func selfID(loginID networkid.UserLoginID) networkid.UserID {
	return GhostID(loginID, string(loginID))
}
