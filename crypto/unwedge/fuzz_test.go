package unwedge_test

import (
	"bytes"
	"encoding/json"
	"sync"
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
	fx.quiet.Store(true)
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

// FuzzKeyAnswers hands heals arbitrary answers to their /keys/claim and /keys/query, as a hostile
// federated server relayed by the homeserver may shape them: a forced heal of one device, or a
// batch of two whose devices the bridge must fetch. Whatever the answers, no panic happens (not
// even one that unwedge recovers), no device gets more than one new session from a heal, and no
// session is stored under an identity key that is not one of the devices' own.
func FuzzKeyAnswers(f *testing.F) {
	fx := newFixtureOn(f, cryptotest.SQLite(f))
	fx.cfg.MinInterval, fx.cfg.MaxRetries = time.Millisecond, 1 // every heal is granted, and tried once
	fx.establish()
	bob := fx.newPeer("@bob:example.org", "LAPTOP")
	fx.hs.Exchange(bob, fx.bridge)
	h := fx.hostile()
	fx.quiet.Store(true)
	devices := []*id.Device{fx.bridge.Fetch(peerUser, peerDevice), fx.bridge.Fetch(bob.UserID, bob.DeviceID)}
	keys := map[id.IdentityKey]bool{fx.peerKey(): true, bob.IdentityKey(): true}

	// The seeds are the homeserver's real answers, and a few hostile shapes of them.
	var seen sync.Map
	record := func(suffix string) func([]byte) []byte {
		return func(answer []byte) []byte { seen.Store(suffix, answer); return answer }
	}
	h.set("/keys/claim", record("claim"))
	h.set("/keys/query", record("query"))
	fx.exec("DELETE FROM crypto_device WHERE user_id=$1", string(bob.UserID))
	fx.unwedger.HealBatch(fx.ctx, devices, unwedge.ClassSessionLost)
	claim, _ := seen.Load("claim")
	query, _ := seen.Load("query")
	f.Add(claim.([]byte), query.([]byte), false)
	f.Add(claim.([]byte), query.([]byte), true)
	extra := bytes.Replace(claim.([]byte), []byte(`"`+string(peerDevice)+`"`), []byte(`"EVIL"`), 1)
	f.Add(extra, query.([]byte), false)
	f.Add(extra, query.([]byte), true)
	f.Add([]byte(`{"one_time_keys":{"@alice:example.org":{"PHONE":null,"EVIL":{"signed_curve25519:A":{}}},"":[]}}`), []byte(`{"device_keys":{"@bob:example.org":{"LAPTOP":null},"@x:y":{"Z":{}}},"master_keys":[]}`), true)
	f.Add([]byte(`null`), []byte(`{"device_keys":7}`), true)

	f.Fuzz(func(t *testing.T, claim, query []byte, batch bool) {
		h.set("/keys/claim", func([]byte) []byte { return claim })
		h.set("/keys/query", func([]byte) []byte { return query })
		// The fixture's helpers fail through f, which a fuzz target may not use.
		sessions := func(key id.IdentityKey) (n int) {
			if err := fx.db.QueryRow(fx.ctx, "SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2", string(bridgeDevice), key).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		}
		before := map[id.IdentityKey]int{}
		for key := range keys {
			before[key] = sessions(key)
		}
		if batch {
			if _, err := fx.db.Exec(fx.ctx, "DELETE FROM crypto_device WHERE user_id=$1", string(bob.UserID)); err != nil {
				t.Fatal(err)
			}
			fx.unwedger.HealBatch(fx.ctx, devices, unwedge.ClassSessionLost)
		} else {
			fx.unwedger.Heal(fx.ctx, devices[0], unwedge.ClassForced, "@admin:example.org")
		}
		for site, n := range fx.unwedger.Panics() {
			if n > 0 {
				t.Fatalf("a panic in %s", site)
			}
		}
		for key := range keys {
			if n := sessions(key) - before[key]; n > 1 {
				t.Fatalf("%d new sessions with %s from one heal", n, key)
			}
		}
		rows, err := fx.db.Query(fx.ctx, "SELECT DISTINCT sender_key FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var key id.IdentityKey
			if err = rows.Scan(&key); err != nil {
				t.Fatal(err)
			}
			if !keys[key] {
				t.Fatalf("a session stored under %s, no device's identity key", key)
			}
		}
	})
}
