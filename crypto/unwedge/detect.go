package unwedge

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"

	"maunium.net/go/mautrix/crypto"
	goolmcrypto "maunium.net/go/mautrix/crypto/goolm/crypto"
	"maunium.net/go/mautrix/crypto/goolm/message"
	"maunium.net/go/mautrix/crypto/goolm/session"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Class is what happened to one Olm to-device event.
type Class string

const (
	// ClassDecrypted: the event decrypted; nothing to heal.
	ClassDecrypted Class = "decrypted"

	// Wedges: the session with the sending device is broken and MSC1719 says to replace it.

	// ClassNoSession: a normal (non-prekey) message, and the bridge has no session with the
	// sender key at all (its session row was lost).
	ClassNoSession Class = "no_session"
	// ClassNoMatchingSession: a normal message that none of the sessions with the sender key can
	// decrypt (the bridge's ratchet went back in time, or the sender's did).
	ClassNoMatchingSession Class = "no_matching_session"
	// ClassPrekeyUnknownOTK: a prekey message for a new session whose one-time key the bridge no
	// longer has (expired, or the account was restored from a backup).
	ClassPrekeyUnknownOTK Class = "prekey_unknown_otk"
	// ClassBadMAC: a prekey message that belongs to a stored session, but does not decrypt with it.
	ClassBadMAC Class = "bad_mac"
	// ClassUnreadableSession: the stored sessions with the sender key cannot be loaded (corrupt pickle).
	ClassUnreadableSession Class = "unreadable_session"
	// ClassPeerRestored: the message decrypted, but on a receiving chain the sender had already
	// moved past: the sender's ratchet went back in time (its device was restored from a backup).
	// It cannot decrypt what the bridge sends on the current chain, so the session is replaced.
	ClassPeerRestored Class = "peer_restored"

	// Not wedges: never a reason to create a session.

	// ClassDuplicate: a replay of a message that was already decrypted.
	ClassDuplicate Class = "duplicate"
	// ClassUnknownDevice: the sender key is not a device of the claimed sender.
	ClassUnknownDevice Class = "unknown_device"
	// ClassMalformed: the content is not a well-formed Olm event (wrong type, bad base64, empty or
	// missing ciphertext, unknown message type).
	ClassMalformed Class = "malformed"
	// ClassNotForUs: the event carries no ciphertext for the bridge's identity key.
	ClassNotForUs Class = "not_for_us"
	// ClassUnsupportedAlgorithm: not m.olm.v1.curve25519-aes-sha2.
	ClassUnsupportedAlgorithm Class = "unsupported_algorithm"
	// ClassFailed: decryption failed in a way that is none of the above.
	ClassFailed Class = "failed"

	// ClassForced: no failure, an admin forced a heal (`unwedge heal`).
	ClassForced Class = "forced"
	// ClassRolledBack: no failure yet; at startup the bridge found that its crypto store went
	// back in time (restored from a backup or rolled back), so every session it held may be
	// behind its peer's side, and healed them before handling events.
	ClassRolledBack Class = "rolled_back"
	// ClassSessionLost: no failure yet; at startup the bridge found no readable Olm session with a
	// device it had shared room keys with (a lost or corrupt row), and healed it before handling
	// events.
	ClassSessionLost Class = "session_lost"
)

// Event reports whether the class is about an Olm event (a failure or a decrypted message), not a
// heal that the bridge or an admin started without one (forced, rolled_back, session_lost).
func (c Class) Event() bool {
	switch c {
	case ClassForced, ClassRolledBack, ClassSessionLost:
		return false
	}
	return true
}

// Wedged reports whether the class means the session must be replaced.
func (c Class) Wedged() bool {
	switch c {
	case ClassNoSession, ClassNoMatchingSession, ClassPrekeyUnknownOTK, ClassBadMAC, ClassUnreadableSession, ClassPeerRestored:
		return true
	}
	return false
}

// maxCiphertextLength bounds what is hashed and handed to Olm; a real Olm message is a few KiB.
const maxCiphertextLength = 256 * 1024

// olmMessage is the part of an Olm to-device event meant for the bridge.
type olmMessage struct {
	senderKey id.SenderKey
	msgType   id.OlmMsgType
	body      string
	hash      [32]byte
	// ratchet is the sender's ratchet key and message counter, when the message parses.
	ratchet ratchetPosition
}

// ratchetPosition is where in the sender's Olm ratchet a message was sent.
type ratchetPosition struct {
	key     goolmcrypto.Curve25519PublicKey
	counter uint32
	ok      bool
}

// readRatchetPosition reads the ratchet key and counter of an Olm message (inside the prekey
// wrapper for prekey messages).
func readRatchetPosition(msgType id.OlmMsgType, raw []byte) ratchetPosition {
	if msgType == id.OlmMsgTypePreKey {
		var pre message.PreKeyMessage
		if pre.Decode(raw) != nil {
			return ratchetPosition{}
		}
		raw = pre.Message
	}
	var msg message.Message
	if msg.Decode(raw) != nil || !msg.HasCounter || len(msg.RatchetKey) == 0 {
		return ratchetPosition{}
	}
	return ratchetPosition{key: msg.RatchetKey, counter: msg.Counter, ok: true}
}

// wentBack reports whether decrypting at pos moved an older receiving chain of sess forward: the
// sender sent on a chain it had already replaced, which only a sender restored to an earlier
// state does (a message merely delivered late is decrypted with a skipped key and leaves the
// chain where it was). Sessions that are not goolm's cannot be inspected and report false.
func wentBack(sess *crypto.OlmSession, pos ratchetPosition) bool {
	inner, ok := sess.Internal.(*session.OlmSession)
	if !pos.ok || !ok {
		return false
	}
	for i, chain := range inner.Ratchet.ReceiverChains {
		if bytes.Equal(chain.RKey, pos.key) {
			return i > 0 && chain.CKey.Index == pos.counter+1
		}
	}
	return false
}

// parseOlm checks an encrypted to-device event before the machine sees it. The machine would reject
// the same things, but only with a log line; classifying them here keeps them from ever looking
// like a wedge.
func parseOlm(evt *event.Event, ownKey id.IdentityKey) (*olmMessage, Class) {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok || content == nil {
		return nil, ClassMalformed
	}
	if content.Algorithm != id.AlgorithmOlmV1 {
		return nil, ClassUnsupportedAlgorithm
	}
	if content.SenderKey == "" || len(content.SenderKey) > 64 {
		return nil, ClassMalformed
	}
	own, ok := content.OlmCiphertext[ownKey]
	if !ok {
		return nil, ClassNotForUs
	}
	if own.Type != id.OlmMsgTypePreKey && own.Type != id.OlmMsgTypeMsg {
		return nil, ClassMalformed
	}
	if own.Body == "" || len(own.Body) > maxCiphertextLength {
		return nil, ClassMalformed
	}
	raw, err := base64.RawStdEncoding.DecodeString(own.Body)
	if err != nil {
		return nil, ClassMalformed
	}
	return &olmMessage{senderKey: content.SenderKey, msgType: own.Type, body: own.Body, hash: sha256.Sum256(raw), ratchet: readRatchetPosition(own.Type, raw)}, ""
}

// classifyFailure names a failed decryption from what the store saw during it, and for prekey
// messages from whether a stored session matches (checked here, after the machine gave up).
// Relies on crypto/decryptolm.go tryDecryptOlmCiphertext: GetOlmHash, GetSessions, then PutOlmHash on success (pinned in internal/upstream).
func classifyFailure(obs *observation, msg *olmMessage, sessions crypto.OlmSessionList) Class {
	switch {
	case obs.duplicate:
		return ClassDuplicate
	case obs.decrypted:
		return ClassDecrypted
	case !obs.sessionsRead:
		// The machine gave up before it looked at any session (a store error, a cancelled
		// context): nothing says the session is broken.
		return ClassFailed
	case obs.sessionsErr != nil:
		return ClassUnreadableSession
	case msg.msgType == id.OlmMsgTypeMsg && obs.sessionCount == 0:
		return ClassNoSession
	case msg.msgType == id.OlmMsgTypeMsg:
		return ClassNoMatchingSession
	}
	for _, sess := range sessions {
		if matches, err := sess.Internal.MatchesInboundSession(msg.body); err == nil && matches {
			return ClassBadMAC
		}
	}
	return ClassPrekeyUnknownOTK
}
