package unwedge_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/rs/zerolog"
	_ "go.mau.fi/util/dbutil/litestream"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// FuzzHandleToDevice hands the Unwedger on a real machine arbitrary encrypted to-device contents
// claiming to come from a user in scope: it must never panic, and whatever arrives, the device
// gets at most one replacement session (one key claim) within the hour.
func FuzzHandleToDevice(f *testing.F) {
	fx := newFixture(f)
	fx.establish()
	fx.unwedger.OnDecision = nil
	fx.peerSends()
	real := fx.hs.Inbox(fx.bridge)[0]
	realJSON, _ := json.Marshal(real.Content.Parsed)
	f.Add(realJSON)
	f.Add([]byte(`{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"` + string(fx.peerKey()) + `","ciphertext":{"` + string(fx.bridgeKey()) + `":{"type":1,"body":"AwogAAAA"}}}`))
	f.Add([]byte(`{"algorithm":"m.olm.v1.curve25519-aes-sha2","sender_key":"` + string(fx.peerKey()) + `","ciphertext":{"` + string(fx.bridgeKey()) + `":{"type":0,"body":"` + randomBase64(300) + `"}}}`))
	f.Add([]byte(`{"algorithm":"m.megolm.v1.aes-sha2","sender_key":"x","session_id":"y","ciphertext":"z"}`))
	f.Add([]byte(`{"ciphertext":{"":{"type":-1,"body":null}}}`))
	f.Add([]byte(`[]`))
	claims := fx.hs.Claims()
	f.Fuzz(func(t *testing.T, content []byte) {
		var parsed event.EncryptedEventContent
		if json.Unmarshal(content, &parsed) != nil {
			return
		}
		evt := &event.Event{Sender: peerUser, Type: event.ToDeviceEncrypted, Content: event.Content{Parsed: &parsed, VeryRaw: content}}
		fx.unwedger.HandleToDevice(fx.ctx, evt)
		if n := fx.hs.Claims() - claims; n > 1 {
			t.Fatalf("%d key claims for one device within the hour", n)
		}
	})
}

// FuzzRecord hands recovery arbitrary room events: anything that is not a Megolm event is refused
// with an error, and what is kept comes back from the database as it went in.
func FuzzRecord(f *testing.F) {
	udb := cryptotest.UnwedgeDB(f, cryptotest.SQLite(f))
	cfg := unwedge.DefaultConfig().Recovery
	cfg.MaxPendingPerUser = 1 << 30
	rec := unwedge.NewRecovery(cfg, nil, udb.Pending, nil, func(id.UserID, id.SenderKey) bool { return false }, "fuzz", zerolog.Nop())
	f.Add([]byte(`{"algorithm":"m.megolm.v1.aes-sha2","sender_key":"key","device_id":"PHONE","session_id":"session","ciphertext":"AwgAEhAAAA"}`))
	f.Add([]byte(`{"algorithm":"m.megolm.v1.aes-sha2","session_id":"","ciphertext":""}`))
	f.Add([]byte(`{"algorithm":"m.olm.v1.curve25519-aes-sha2","ciphertext":{}}`))
	f.Add([]byte(`{"algorithm":"m.megolm.v1.aes-sha2","session_id":"s\u0000\ud800","ciphertext":"\u2603"}`))
	n := 0
	f.Fuzz(func(t *testing.T, content []byte) {
		var parsed event.EncryptedEventContent
		if json.Unmarshal(content, &parsed) != nil {
			return
		}
		n++
		evt := &event.Event{
			ID: id.EventID("$fuzz" + string(rune('a'+n%26)) + time.Now().Format("150405.000000000")), RoomID: "!room:example.org",
			Sender: "@alice:example.org", Type: event.EventEncrypted, Timestamp: time.Now().UnixMilli(),
			Content: event.Content{Parsed: &parsed},
		}
		if err := rec.Record(t.Context(), evt); err != nil {
			return
		}
		list, err := udb.Pending.List(t.Context(), "@alice:example.org", 1<<30)
		if err != nil {
			t.Fatalf("a recorded event breaks the table: %v", err)
		}
		for _, p := range list {
			if p.EventID == evt.ID && p.SessionID != parsed.SessionID {
				t.Fatalf("session %q came back as %q", parsed.SessionID, p.SessionID)
			}
		}
	})
}
