package cryptotest_test

import (
	"context"
	"net/http"
	"slices"
	"testing"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestRestart: a device restarted on its store keeps its sessions, whatever the store; a restart
// stops its Unwedger.
func TestRestart(t *testing.T) {
	for _, tc := range []struct {
		name    string
		store   func(t *testing.T) cryptotest.Store
		unwedge bool
	}{
		{"memory", func(*testing.T) cryptotest.Store { return cryptotest.Store{} }, false},
		{"SQL", func(t *testing.T) cryptotest.Store { return cryptotest.Store{DB: cryptotest.Database(t)} }, false},
		{"SQL under unwedge's store", func(t *testing.T) cryptotest.Store {
			db := cryptotest.Database(t)
			return cryptotest.Store{DB: db, Shared: cryptotest.UnwedgeDB(t, db).Shared}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs := cryptotest.NewHomeserver(t)
			bridge := hs.NewDevice("@bridge:example.org", "BRIDGE", tc.store(t))
			peer := hs.NewDevice("@alice:example.org", "PHONE", cryptotest.Store{})
			if got := hs.Exchange(peer, bridge); len(got) != 1 {
				t.Fatalf("the bridge received %d events, want 1", len(got))
			}
			before := hs.Claims()
			bridge.Restart()
			if tc.unwedge {
				bridge.Unwedge(cryptotest.Unwedging{Config: cryptotest.Config(), Ledger: cryptotest.UnwedgeDB(t, bridge.Store.DB).Ledger})
			}
			// A session the restarted bridge had lost would make it (or its Unwedger) claim a key.
			hs.Exchange(peer, bridge)
			hs.Exchange(bridge, peer)
			if n := hs.Claims() - before; n != 0 {
				t.Errorf("%d key claims after the restart, want 0: a session was lost", n)
			}
			bridge.Restart()
			if bridge.Unwedger != nil {
				t.Error("a restart kept the Unwedger of the machine before it")
			}
		})
	}
}

// TestFaults: each injected failure hits the next requests it is set for, and no others; the
// homeserver counts the requests either way.
func TestFaults(t *testing.T) {
	lost := func(w http.ResponseWriter) { http.Error(w, "upstream timed out", http.StatusGatewayTimeout) }
	for _, tc := range []struct {
		name   string
		inject func(hs *cryptotest.Homeserver, from *cryptotest.Device)
		// do makes one request of the kind, and says whether it failed.
		do func(ctx context.Context, hs *cryptotest.Homeserver, from, to *cryptotest.Device) error
		// spent is how many of the target's one-time keys one failed request uses up.
		spent int
		// count is the homeserver's count of such requests, and counted its count of the three.
		count   func(hs *cryptotest.Homeserver) int64
		counted int64
	}{
		{"claims fail", func(hs *cryptotest.Homeserver, _ *cryptotest.Device) { hs.FailClaims(1) }, claim, 0, claims, 3},
		{"claims lost", func(hs *cryptotest.Homeserver, _ *cryptotest.Device) { hs.LoseClaims(1, lost) }, claim, 1, claims, 3},
		{"queries fail", func(hs *cryptotest.Homeserver, _ *cryptotest.Device) { hs.FailQueries(1) }, query, 0, queries, 3},
		// A send that failed delivered no message.
		{"sends fail", func(hs *cryptotest.Homeserver, from *cryptotest.Device) { hs.FailSends(from, 1) }, send, 0, dummies, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs := cryptotest.NewHomeserver(t)
			from := hs.NewDevice("@bridge:example.org", "BRIDGE", cryptotest.Store{})
			to := hs.NewDevice("@alice:example.org", "PHONE", cryptotest.Store{})
			other := hs.NewDevice("@bob:example.org", "TABLET", cryptotest.Store{})
			ctx := t.Context()
			count, keys := tc.count(hs), hs.OneTimeKeys(to)
			tc.inject(hs, from)
			if err := tc.do(ctx, hs, from, to); err == nil {
				t.Fatal("the request went through")
			}
			if n := keys - hs.OneTimeKeys(to); n != tc.spent {
				t.Errorf("the failed request spent %d one-time keys, want %d", n, tc.spent)
			}
			if err := tc.do(ctx, hs, other, to); err != nil {
				t.Errorf("the next request, of another device: %v", err)
			}
			if err := tc.do(ctx, hs, from, to); err != nil {
				t.Errorf("the request after the failures: %v", err)
			}
			if n := tc.count(hs) - count; n != tc.counted {
				t.Errorf("%d counted for 3 requests, want %d", n, tc.counted)
			}
		})
	}
}

func claims(hs *cryptotest.Homeserver) int64  { return hs.Claims() }
func queries(hs *cryptotest.Homeserver) int64 { return hs.Queries() }
func dummies(hs *cryptotest.Homeserver) int64 { return hs.ToDevice(event.ToDeviceDummy.Type) }

func claim(ctx context.Context, _ *cryptotest.Homeserver, from, to *cryptotest.Device) error {
	_, err := from.Client.ClaimKeys(ctx, &mautrix.ReqClaimKeys{
		OneTimeKeys: mautrix.OneTimeKeysRequest{to.UserID: {to.DeviceID: id.KeyAlgorithmSignedCurve25519}},
	})
	return err
}

func query(ctx context.Context, _ *cryptotest.Homeserver, from, to *cryptotest.Device) error {
	_, err := from.Client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: mautrix.DeviceKeysRequest{to.UserID: nil}})
	return err
}

func send(ctx context.Context, _ *cryptotest.Homeserver, from, to *cryptotest.Device) error {
	_, err := from.Client.SendToDevice(ctx, event.ToDeviceDummy, &mautrix.ReqSendToDevice{
		Messages: map[id.UserID]map[id.DeviceID]*event.Content{to.UserID: {to.DeviceID: {Raw: map[string]any{}}}},
	})
	return err
}

// TestCounts: the homeserver counts to-device messages by type and records key requests.
func TestCounts(t *testing.T) {
	hs := cryptotest.NewHomeserver(t)
	bridge := hs.NewDevice("@bridge:example.org", "BRIDGE", cryptotest.Store{})
	peer := hs.NewDevice("@alice:example.org", "PHONE", cryptotest.Store{})
	hs.Exchange(peer, bridge)
	const room, session = id.RoomID("!room:example.org"), id.SessionID("session")
	if err := bridge.Mach.SendRoomKeyRequest(t.Context(), room, peer.IdentityKey(), session, "", map[id.UserID][]id.DeviceID{peer.UserID: {peer.DeviceID}}); err != nil {
		t.Fatal(err)
	}
	want := []cryptotest.KeyRequest{{To: peer.UserID, Device: peer.DeviceID, SessionID: session}}
	if got := hs.KeyRequests(); !slices.Equal(got, want) {
		t.Errorf("key requests %+v, want %+v", got, want)
	}
	if n := hs.ToDevice(event.ToDeviceEncrypted.Type); n != 1 {
		t.Errorf("%d encrypted to-device messages counted, want 1", n)
	}
	// Requests are counted apart from messages, by type: the exchange's, and the key request's.
	if n := hs.ToDeviceRequests(event.ToDeviceEncrypted.Type); n != 1 {
		t.Errorf("%d encrypted to-device requests counted, want 1", n)
	}
	if n := hs.ToDeviceRequests(event.ToDeviceRoomKeyRequest.Type); n != 1 {
		t.Errorf("%d key request to-device requests counted, want 1", n)
	}
	if n := hs.ClaimedKeys(); n != 1 {
		t.Errorf("%d one-time keys claimed, want the 1 of the peer's session", n)
	}
	hs.ClaimAllKeys(bridge)
	if n := hs.OneTimeKeys(bridge); n != 0 {
		t.Errorf("%d one-time keys left after claiming them all", n)
	}
}

// TestDatabase: the database is the stack's Postgres when it runs, and SQLite otherwise.
func TestDatabase(t *testing.T) {
	_, stack := cryptotest.Databases(t)[testenv.Postgres]
	db := cryptotest.Database(t)
	if postgres := db.Dialect == dbutil.Postgres; postgres != stack {
		t.Errorf("database is %s with the stack running: %v", db.Dialect, stack)
	}
	if err := db.RawDB.PingContext(t.Context()); err != nil {
		t.Error(err)
	}
}
