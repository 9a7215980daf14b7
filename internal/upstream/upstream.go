// Package upstream names the mautrix-go release unwedge is built against, and each file of it
// whose unexported behaviour unwedge relies on: the order in which it calls the crypto store and
// its callbacks, what it leaves unchecked, the waits it makes, the tables it keeps. None of that
// is API; a release may change it without a word in its changelog. TestPinned fails when go.mod
// moves to another release or one of these files changes, and names what to read again.
//
// Only tests import this package: the product binary does not carry the table.
package upstream

import (
	"fmt"
	"os/exec"
	"strings"
)

// Module is mautrix-go's module path.
const Module = "maunium.net/go/mautrix"

// Version is the mautrix-go release whose files Files pins: go.mod requires it.
const Version = "v0.33.0"

// File is one file of mautrix-go that unwedge relies on.
type File struct {
	// Path is the file's path in the module.
	Path string
	// SHA256 is the hex SHA-256 of the file in Version.
	SHA256 string
	// Users names unwedge's code that relies on the file.
	Users string
	// Relies says what that code relies on: which calls, in which order. It is what to check
	// again when the file changes.
	Relies string
}

// Files is every mautrix-go file unwedge relies on beyond its API.
var Files = []File{{
	Path:   "bridgev2/matrix/crypto.go",
	SHA256: "e6f7ec103a8ac33755f76a774fbdfd5fdf04c87f5cd56c67d4af68265dc47eca",
	Users:  "bridge/stock.go (the whole file mirrors it), the parity table in docs/admin-guide.md",
	Relies: "CryptoHelper.Init and its helpers, option by option and in order: stock.go writes them again on a machine unwedge can reach",
}, {
	Path:   "bridgev2/matrix/matrix.go",
	SHA256: "155fba0aa6e485cdac3e620697ceb4e823c3758477218ba9f0e189d14d082acf",
	Users:  "crypto/unwedge/waits.go (liveTTL), recovery.go (StockWait, bridgeWait)",
	Relies: "handleEncryptedEvent: Crypto.Decrypt, on NoSessionFound WaitForSession 3 s (initialSessionWaitTimeout), then " +
		"waitLongerForSession: RequestSession, WaitForSession 22 s (extendedSessionWaitTimeout), Decrypt again; only live events wait",
}, {
	Path:   "crypto/decryptolm.go",
	SHA256: "846d4783236e4ed57343ec37ae13215ccceb2abb79d80abcb13b05062476045a",
	Users:  "crypto/unwedge/store.go (the observation: GetOlmHash, GetSessions, PutOlmHash, UpdateSession, AddSession), detect.go (classifyFailure), unwedge.go (HandleToDevice, needsUnwedge, leaveToStock)",
	Relies: "tryDecryptOlmCiphertext under olmLock, with HandleToDevice's context throughout: GetOlmHash (non-zero: ErrDuplicateMessage, nothing else) -> " +
		"GetSessions (before any decryption; an error stops) -> per session MatchesInboundSession (prekey) and Decrypt -> on success PutOlmHash then UpdateSession (the advanced session); " +
		"no session decrypts a normal message: nothing written; prekey: NewInboundSessionFrom, Decrypt, PutOlmHash then AddSession; " +
		"PutOlmHash only after a decryption succeeded; NeedsUnwedgeCallback(ctx, sender, senderKey) deferred on the failures, with that same context; UnwedgeDevice when the callback is nil",
}, {
	Path:   "crypto/encryptolm.go",
	SHA256: "17df984ee5160595be7f1bbd6a714a24ccbdc9ce4fda74f75ff3eddcdaf1156c",
	Users:  "crypto/unwedge/store.go (HasSession, AddSession, GetLatestSession in a heal), heal.go, batch.go (EncryptToDevices), answers.go (claim answers)",
	Relies: "EncryptToDevices and SendEncryptedToDevice (machine.go) call createOutboundSessions first: shouldCreateNewSession -> HasSession per device (false: claim a key), " +
		"one ClaimKeys for all, then per claimed key NewOutboundSession and AddSession (its error only logged, the session dropped); " +
		"then under olmLock GetLatestSession per device (nil: skipped by EncryptToDevices) -> encryptOlmEvent -> UpdateSession; " +
		"createOutboundSessions dereferences input[user][device] for every device in the claim answer, and resp without a nil check",
}, {
	Path:   "crypto/machine.go",
	SHA256: "79d623d1f3bb73f2199d811ec2252ad79e50a13473ac60e6e969b8ddafc95ba2",
	Users:  "crypto/unwedge/unwedge.go (HandleToDevice), heal.go and roomkeys.go (SendEncryptedToDevice), bridge/helper.go (SessionReceived)",
	Relies: "HandleToDeviceEvent handles an encrypted event synchronously with the caller's context (HandleEncryptedEvent), key requests in a goroutine; " +
		"SendEncryptedToDevice: createOutboundSessions, then GetLatestSession (nil or error: no message sent) and one SendToDevice; " +
		"StoreGroupSession calls SessionReceived(room, session) after the session is stored, keyed by room (v0.33)",
}, {
	Path:   "crypto/encryptmegolm.go",
	SHA256: "d86124f0e8d5fbd4075d759d6cd4d32134ed90773e3df45ca7a02bfc5d6c39c2",
	Users:  "crypto/unwedge/store.go (keepOutbound, MarkOutboundGroupSessionShared, sharedIndex), roomkeys.go (ReshareOwnSessions)",
	Relies: "ShareGroupSession: GetOutboundGroupSession(room), or a new session then AddOutboundGroupSession, before any share; " +
		"per device encryptOlmEvent(session.ShareContent()) and MarkOutboundGroupSessionShared(user, key, session ID) unless DisableSharedGroupSessionTracking; " +
		"the session is marked Shared and stored again with AddOutboundGroupSession; devices filtered by blacklist and SendKeysMinTrust",
}, {
	Path:   "crypto/sessions.go",
	SHA256: "678a9c4f1bb76cf4cf56bedb49f0d74acfa0be686e03b45594c9f33ee5f4ba41",
	Users:  "crypto/unwedge/store.go (sharedIndex)",
	Relies: "OutboundGroupSession.ShareContent computes the room key once per loaded session and caches it: a share hands out the index of the first ShareContent call",
}, {
	Path:   "crypto/keysharing.go",
	SHA256: "d5e862e85d3e862d1d9e0a8d74a504d236f205dea08bd1b4147e56aab6cf0dda",
	Users:  "bridge/helper.go (allowKeyShare), crypto/unwedge/roomkeys.go (AnswerOwnSession)",
	Relies: "HandleRoomKeyRequest: GetOrFetchDevice -> AllowKeyShare (a rejection, KeyShareRejectNoResponse included, ends it with no answer) -> " +
		"GetGroupSession(request's room, session) -> forward from the first known index; importForwardedRoomKey stores under the forward's room_id",
}, {
	Path:   "crypto/decryptmegolm.go",
	SHA256: "c995896518cb235be3c341bfd9b09b3c7ccbcfb1a9eecd06c9ae2f39406f1015",
	Users:  "bridge/helper.go (Decrypt), crypto/unwedge/recovery.go (retrying pending events)",
	Relies: "DecryptMegolmEvent looks the session up by the event's room and session ID (ErrNoSessionFound when missing) and refuses a payload whose room_id is not the event's room",
}, {
	Path:   "crypto/sql_store.go",
	SHA256: "f3956c8294d8fc4ff656ac20d1e57ecbf427b69ab5ed2858cfbb25968ae6a893",
	Users:  "crypto/unwedge/store.go (storeReplacement, adopt, peekSessions), tables.go (InsertSession, PeekSessions)",
	Relies: "SQLCryptoStore's olmSessionCache: AddSession caches the session it inserts; GetSessions and GetLatestSession read the rows, then return the cached object " +
		"for a session ID already cached, else unpickle and cache it; UpdateSession writes by session_id and leaves the cache alone; nothing evicts; " +
		"the INSERT of AddSession and the SELECT of GetSessions, which tables.go writes again; DB, AccountID and PickleKey are exported",
}, {
	Path:   "crypto/sql_store_upgrade/00-latest-revision.sql",
	SHA256: "009672d1cdce40420c9bc14cc8db427e5f7774f09e79e22cc86d88d7be3623a4",
	Users:  "crypto/unwedge/tables.go (CryptoTables), database/shared.go (pruneShared), bridge/sink.go and stock.go, lab/scenarios.go",
	Relies: "the tables unwedge reads and writes directly: crypto_account, crypto_olm_session (session_id, sender_key, session, account_id), crypto_device, " +
		"crypto_megolm_outbound_session (account_id, session_id), crypto_megolm_outbound_session_shared (session_id, no account), " +
		"crypto_megolm_inbound_session (max_age, max_messages; keyed by account_id, room_id, session_id since v0.33)",
}}

// Lookup returns the pinned file at path; it panics when there is none (a mistake in a test).
func Lookup(path string) File {
	for _, f := range Files {
		if f.Path == path {
			return f
		}
	}
	panic(fmt.Sprintf("upstream: %s is not pinned", path))
}

// Locate returns the mautrix-go version that go.mod requires and the directory of its source
// in the module cache, as `go list -m` reports them.
func Locate() (version, dir string, err error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}\t{{.Dir}}", Module).Output()
	if err != nil {
		return "", "", fmt.Errorf("go list -m %s: %w", Module, err)
	}
	version, dir, _ = strings.Cut(strings.TrimSpace(string(out)), "\t")
	if dir == "" {
		return version, "", fmt.Errorf("%s %s is not in the module cache (go mod download)", Module, version)
	}
	return version, dir, nil
}
