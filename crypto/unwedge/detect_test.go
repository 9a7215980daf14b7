package unwedge

import (
	"encoding/json"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

const ownKey = id.IdentityKey("ownkeyownkeyownkeyownkeyownkeyownkeyownkey0")

func TestParseOlm(t *testing.T) {
	cases := []struct {
		name    string
		content string
		class   Class
	}{
		{"prekey", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":0,"body":"AAAA"}}}`, ""},
		{"normal", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":1,"body":"AAAA"}}}`, ""},
		{"megolm", `{"algorithm":"m.megolm.v1.aes-sha2","sender_key":"abc","session_id":"x","ciphertext":"AAAA"}`, ClassUnsupportedAlgorithm},
		{"other recipient", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"someone":{"type":0,"body":"AAAA"}}}`, ClassNotForUs},
		{"bad base64", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":0,"body":"!!"}}}`, ClassMalformed},
		{"padded base64", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":0,"body":"AA=="}}}`, ClassMalformed},
		{"type 2", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":2,"body":"AAAA"}}}`, ClassMalformed},
		{"no sender key", `{"algorithm":"m.olm.v1.curve25519-aes-sha2","ciphertext":{"` + string(ownKey) + `":{"type":0,"body":"AAAA"}}}`, ClassMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			evt := parseEvent(t, tc.content)
			msg, class := parseOlm(evt, ownKey)
			if class != tc.class || (tc.class == "") != (msg != nil) {
				t.Fatalf("parseOlm = %+v, %q; want class %q", msg, class, tc.class)
			}
		})
	}
}

func parseEvent(t testing.TB, content string) *event.Event {
	evt := &event.Event{Type: event.ToDeviceEncrypted}
	evt.Type.Class = event.ToDeviceEventType
	if err := json.Unmarshal([]byte(content), &evt.Content); err != nil {
		return evt
	}
	if err := evt.Content.ParseRaw(evt.Type); err != nil {
		evt.Content.Parsed = nil
	}
	return evt
}

// FuzzParseOlm: whatever a peer puts in an encrypted to-device event, classifying it does not
// panic, and only well-formed Olm messages for the bridge get through.
func FuzzParseOlm(f *testing.F) {
	f.Add(`{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"abc","ciphertext":{"` + string(ownKey) + `":{"type":0,"body":"AAAA"}}}`)
	f.Add(`{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"","ciphertext":{}}`)
	f.Add(`{"algorithm":5,"ciphertext":"x"}`)
	f.Add(`null`)
	f.Add(`{"ciphertext":{"` + string(ownKey) + `":{"type":1,"body":""}}}`)
	f.Fuzz(func(t *testing.T, content string) {
		evt := parseEvent(t, content)
		msg, class := parseOlm(evt, ownKey)
		if msg == nil && class == "" {
			t.Fatal("no message and no class")
		}
		if msg != nil && (msg.body == "" || msg.senderKey == "" || (msg.msgType != id.OlmMsgTypePreKey && msg.msgType != id.OlmMsgTypeMsg)) {
			t.Fatalf("malformed message passed: %+v", msg)
		}
	})
}
