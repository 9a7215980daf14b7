package unwedge_test

import (
	"testing"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestOlmHistory: a client restored from a backup sends from the Olm state it had then. The
// bridge, which has moved on, fails to decrypt that message (bad MAC on a new chain against its
// old ratchet key, or a message key it consumed already), and would lose the room key it carries;
// an earlier state from the Olm history decrypts it, the room key is imported, and the device is
// healed all the same. A byte-identical replay of that message is never decrypted again, even
// after the crypto store forgot its hash. Without the history the room key is lost.
func TestOlmHistory(t *testing.T) {
	for _, tc := range []struct {
		name string
		// lastWasOwn: the client's last event before its backup was its own message (it goes on
		// with a chain index the bridge consumed); otherwise a reply from the bridge (it starts a
		// new chain against the bridge's ratchet key of then).
		lastWasOwn bool
		history    bool
	}{
		{"after a reply from the bridge", false, true},
		{"after its own message", true, true},
		{"after a reply from the bridge, no history", false, false},
		{"after its own message, no history", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			if tc.history {
				f.bridge.Store.History = unwedge.NewHistory(f.udb.History, string(bridgeDevice), []byte(cryptotest.PickleKey), time.Hour)
				f.restartBridge()
			}
			f.establish()
			for range 2 {
				f.hs.Exchange(f.peer, f.bridge)
				f.hs.Exchange(f.bridge, f.peer)
			}
			if tc.lastWasOwn {
				f.hs.Exchange(f.peer, f.bridge)
			}
			f.noDecision()
			backup := f.backupSessions(f.peer)
			// The client talks on, and the bridge answers: both ratchets move, four times.
			for range 4 {
				f.hs.Exchange(f.peer, f.bridge)
				f.hs.Exchange(f.bridge, f.peer)
			}
			f.noDecision()

			// The client comes back from its backup and shares a room key.
			f.restoreSessions(f.peer, backup)
			f.peer.Restart()
			ogs, err := crypto.NewOutboundGroupSession(testRoom, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err = f.peer.Mach.SendEncryptedToDevice(f.ctx, f.peer.Fetch(bridgeUser, bridgeDevice), event.ToDeviceRoomKey, ogs.ShareContent()); err != nil {
				t.Fatal(err)
			}
			sent := f.hs.Inbox(f.bridge)
			if len(sent) != 1 {
				t.Fatalf("%d events for the bridge, want the room key", len(sent))
			}
			f.bridge.Handle(sent[0])

			// Either way the device is healed: its state went back.
			if d := f.decision(); d.Action != unwedge.ActionHealed {
				t.Fatalf("decision on the restored client's message: %+v, want healed", d)
			}
			imported := f.hasGroupSession(ogs.ID())
			if imported != tc.history {
				t.Fatalf("room key imported: %v, want %v", imported, tc.history)
			}
			counts := f.unwedger.HistoryCounts()
			if tc.history && counts[unwedge.HistoryRecovered] != 1 {
				t.Errorf("history outcomes %v, want one %s", counts, unwedge.HistoryRecovered)
			}
			if !tc.history {
				return
			}

			// The same bytes again, after the crypto store forgot their hash (mautrix-go deletes
			// them after minutes) and the room key was lost: never decrypted from the history.
			if err = f.bridge.Mach.CryptoStore.DeleteOldOlmHashes(f.ctx, time.Now().Add(time.Second)); err != nil {
				t.Fatal(err)
			}
			if n := f.count("SELECT COUNT(*) FROM crypto_olm_message_hash WHERE account_id=$1", string(bridgeDevice)); n != 0 {
				t.Fatalf("%d Olm message hashes left in the crypto store", n)
			}
			f.exec("DELETE FROM crypto_megolm_inbound_session WHERE account_id=$1", string(bridgeDevice))
			f.restartBridge()
			f.bridge.Handle(sent[0])
			if f.hasGroupSession(ogs.ID()) {
				t.Error("a replay of the message was decrypted again from the history")
			}
			if n := f.unwedger.HistoryCounts()[unwedge.HistoryReplay]; n != 1 {
				t.Errorf("history outcomes %v, want one %s", f.unwedger.HistoryCounts(), unwedge.HistoryReplay)
			}
		})
	}
}

// hasGroupSession reports whether the bridge holds the Megolm session of testRoom.
func (f *fixture) hasGroupSession(sessionID id.SessionID) bool {
	f.t.Helper()
	igs, err := f.bridge.Mach.CryptoStore.GetGroupSession(f.ctx, testRoom, sessionID)
	if err != nil {
		f.t.Fatal(err)
	}
	return igs != nil
}

// count runs a COUNT query on the fixture's database.
func (f *fixture) count(query string, args ...any) int {
	f.t.Helper()
	var n int
	if err := f.db.QueryRow(f.ctx, query, args...).Scan(&n); err != nil {
		f.t.Fatal(err)
	}
	return n
}
