package unwedge_test

import (
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// keeper is the fixture's generation keeper: the bridge's database and the bot's account data on
// the kit's homeserver.
func (f *fixture) keeper() *unwedge.GenerationKeeper {
	return unwedge.NewGenerationKeeper(f.udb.Generation, &unwedge.AccountDataMirror{Client: f.bridge.Client}, f.bridge.Wrapped, f.bridgeKey(), f.bridge.Log)
}

// healAtStartup runs the startup heals as the bridge does, on a freshly loaded bridge.
func (f *fixture) healAtStartup() *unwedge.StartupReport {
	f.t.Helper()
	f.restartBridge()
	run := f.unwedger.StartHealAtStartup(f.ctx, f.keeper(), f.udb.Shared, nil)
	select {
	case <-run.Done():
	case <-time.After(10 * time.Second):
		f.t.Fatal("the check and heals at startup did not end within 10s")
	}
	return run.Report()
}

// mirrored is the generation in the bot's account data.
func (f *fixture) mirrored() (unwedge.Generation, bool) {
	f.t.Helper()
	gen, ok, err := (&unwedge.AccountDataMirror{Client: f.bridge.Client}).Get(f.ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	return gen, ok
}

// TestGenerationCheck: the startup check says the crypto store went back in time exactly when the
// database's generation is behind the homeserver's for the same bot device (or gone while the
// homeserver has one), and both hold one generation more afterwards.
func TestGenerationCheck(t *testing.T) {
	for _, tc := range []struct {
		name           string
		local, remote  int64 // 0: none stored
		remoteOtherKey bool
		rolledBack     bool
	}{
		{name: "first start", rolledBack: false},
		{name: "equal", local: 5, remote: 5, rolledBack: false},
		{name: "database ahead (the homeserver missed a write)", local: 7, remote: 5, rolledBack: false},
		{name: "database behind", local: 3, remote: 5, rolledBack: true},
		{name: "database has none", remote: 5, rolledBack: true},
		{name: "homeserver has none", local: 5, rolledBack: false},
		{name: "homeserver has another device's", local: 3, remote: 5, remoteOtherKey: true, rolledBack: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			if tc.local > 0 {
				f.exec("INSERT INTO unwedge_generation (bridge_id, identity_key, generation) VALUES ($1, $2, $3)", f.udb.Generation.BridgeID, f.bridgeKey(), tc.local)
			}
			if tc.remote > 0 {
				key := f.bridgeKey()
				if tc.remoteOtherKey {
					key = f.peerKey()
				}
				if err := f.bridge.Client.SetAccountData(f.ctx, unwedge.GenerationEventType, unwedge.Generation{IdentityKey: key, Value: tc.remote}); err != nil {
					t.Fatal(err)
				}
			}
			check, err := f.keeper().Check(f.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if check.RolledBack != tc.rolledBack {
				t.Errorf("rolled back = %v (%s), want %v", check.RolledBack, check, tc.rolledBack)
			}
			local, ok, err := f.udb.Generation.Current(f.ctx)
			remote, _ := f.mirrored()
			switch {
			case err != nil || !ok:
				t.Errorf("no generation in the database after the check: %v", err)
			case local != remote || local.IdentityKey != f.bridgeKey():
				t.Errorf("after the check the database has %+v and the homeserver %+v, want the same, for the bot's key", local, remote)
			case local.Value != tc.local+1:
				t.Errorf("generation %d after the check, want %d", local.Value, tc.local+1)
			}
		})
	}
}

// TestGenerationFollowsWrites: the generation moves on only when the crypto store changed, so an
// idle bridge writes nothing to the homeserver, and a backup taken before a change is behind.
func TestGenerationFollowsWrites(t *testing.T) {
	f := newFixture(t)
	keeper := f.keeper()
	if _, err := keeper.Check(f.ctx); err != nil {
		t.Fatal(err)
	}
	keeper.Stop(f.ctx) // nothing written since the check
	if gen, _ := f.mirrored(); gen.Value != 1 {
		t.Fatalf("generation %d after a stop without changes, want 1", gen.Value)
	}
	f.establish() // the bridge's sessions change
	keeper.Stop(f.ctx)
	if gen, _ := f.mirrored(); gen.Value != 2 {
		t.Fatalf("generation %d after a stop with changes, want 2", gen.Value)
	}
}

// TestHealAtStartup: before handling events, the bridge heals what it can know is broken, with
// the class that says why, and nothing else; each healed device gets m.dummy over a new session
// and its next message decrypts at the bridge.
func TestHealAtStartup(t *testing.T) {
	room := id.RoomID("!portal:example.org")
	for _, tc := range []struct {
		name string
		// breakIt runs with the bridge's state after the first start and some traffic.
		breakIt    func(f *fixture, backup []sessionRow)
		outOfScope bool
		class      unwedge.Class // of every heal
		healed     []id.DeviceID // the devices healed, in no order
		rolledBack bool
		lost       int
		unreadable int
	}{
		{name: "nothing broken", breakIt: func(*fixture, []sessionRow) {}},
		{
			name: "restored from a backup",
			breakIt: func(f *fixture, backup []sessionRow) {
				f.restoreSessions(f.bridge, backup)
				f.exec("UPDATE unwedge_generation SET generation = 1")
			},
			// Every device the bridge held a session with: the bystander's is behind too.
			class: unwedge.ClassRolledBack, healed: []id.DeviceID{peerDevice, "LAPTOP"}, rolledBack: true,
		},
		{
			name: "session row lost",
			breakIt: func(f *fixture, _ []sessionRow) {
				f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			},
			class: unwedge.ClassSessionLost, healed: []id.DeviceID{peerDevice}, lost: 1,
		},
		{
			name: "session row corrupt",
			breakIt: func(f *fixture, _ []sessionRow) {
				f.exec("UPDATE crypto_olm_session SET session=$1 WHERE account_id=$2 AND sender_key=$3", []byte("not a pickle"), string(bridgeDevice), f.peerKey())
			},
			class: unwedge.ClassSessionLost, healed: []id.DeviceID{peerDevice}, unreadable: 1,
		},
		{
			name: "out of scope",
			breakIt: func(f *fixture, _ []sessionRow) {
				f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			},
			outOfScope: true, lost: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			// A bystander the bridge has a session with but never shared a room key with: a lost
			// row of its is no loss the bridge can know of.
			bystander := f.newPeer("@bob:example.org", "LAPTOP")
			f.hs.Exchange(bystander, f.bridge)
			f.noDecision()
			f.establish()
			if r := f.healAtStartup(); r.RolledBack() || r.Heals != 0 {
				t.Fatalf("first start: rolled back %v, %d heals", r.RolledBack(), r.Heals)
			}
			backup := f.backupSessions(f.bridge)
			if err := f.bridge.Mach.StateStore.(mautrix.StateStore).SetMembership(f.ctx, room, peerUser, event.MembershipJoin); err != nil {
				t.Fatal(err)
			}
			if err := f.bridge.Mach.ShareGroupSession(f.ctx, room, []id.UserID{peerUser}); err != nil {
				t.Fatal(err)
			}
			f.deliverToPeer()
			f.hs.Exchange(f.peer, f.bridge) // traffic after the backup moves the ratchets on
			f.noDecision()
			f.unwedger.Stop()
			keeper := f.keeper()
			keeper.Stop(f.ctx) // the bridge stops: the generation follows the traffic
			tc.breakIt(f, backup)
			f.scope.allowed.Store(!tc.outOfScope)

			r := f.healAtStartup()
			if r.GenerationErr != nil {
				t.Fatal(r.GenerationErr)
			}
			if r.RolledBack() != tc.rolledBack || r.Lost != tc.lost || r.Unreadable != tc.unreadable || !r.Finished {
				t.Errorf("rolled back %v, lost %d, unreadable %d, finished %v; want %v, %d, %d, true",
					r.RolledBack(), r.Lost, r.Unreadable, r.Finished, tc.rolledBack, tc.lost, tc.unreadable)
			}
			if tc.rolledBack && r.OutboundDiscarded != 1 {
				t.Errorf("%d outbound Megolm sessions discarded after the rollback, want 1", r.OutboundDiscarded)
			}
			if r.Heals != len(tc.healed) || r.Outcomes[unwedge.ActionHealed] != len(tc.healed) {
				t.Errorf("%d heals, outcomes %v; want %d healed", r.Heals, r.Outcomes, len(tc.healed))
			}
			var healed []id.DeviceID
			for range tc.healed {
				d := f.decision()
				if d.Action != unwedge.ActionHealed || d.Class != tc.class {
					t.Errorf("decision %+v, want healed %s", d, tc.class)
				}
				healed = append(healed, d.DeviceID)
			}
			f.noDecision()
			if !sameDevices(healed, tc.healed) {
				t.Fatalf("healed %v, want %v", healed, tc.healed)
			}
			if len(tc.healed) > 0 {
				f.healedBothWays()
			}
			if len(tc.healed) > 1 {
				f.hs.Receive(bystander)
				f.hs.Exchange(bystander, f.bridge)
				f.noDecision()
			}
		})
	}
}

// TestStartupReplacesLostOneTimeKeys: when the homeserver holds more of the bot's one-time keys
// than its account has published (the account lost some), they are replaced at startup, and a
// device that opens a session afterwards claims a key the bridge has.
func TestStartupReplacesLostOneTimeKeys(t *testing.T) {
	f := newFixture(t)
	if r := f.healAtStartup(); r.KeysReplaced || r.KeysOnServer == 0 || r.KeysOnServer > r.KeysPublished {
		t.Fatalf("first start: %d keys on the homeserver, %d published, replaced %v; want some, no more than published, not replaced",
			r.KeysOnServer, r.KeysPublished, r.KeysReplaced)
	}
	f.forgetOneTimeKeys()
	r := f.healAtStartup()
	if !r.KeysReplaced || r.KeysPublished != 0 || r.KeysOnServer == 0 {
		t.Fatalf("%d keys on the homeserver, %d published, replaced %v; want the homeserver's replaced", r.KeysOnServer, r.KeysPublished, r.KeysReplaced)
	}
	f.peerSends() // a new session, with a key claimed after the startup
	f.deliverToBridge()
	f.noDecision()
	if n := f.sessions(f.bridge, f.peerKey()); n != 1 {
		t.Errorf("the bridge has %d sessions with the peer, want the one the peer opened", n)
	}
}

// sameDevices reports whether two lists hold the same devices, in any order.
func sameDevices(a, b []id.DeviceID) bool {
	return len(a) == len(b) && len(a) == len(union(a, b))
}

func union(lists ...[]id.DeviceID) map[id.DeviceID]bool {
	set := map[id.DeviceID]bool{}
	for _, list := range lists {
		for _, dev := range list {
			set[dev] = true
		}
	}
	return set
}

// TestHandleCopy: a copy of an Olm message the bridge decrypted before (in appservice mode, read
// again from its device's inbox after a restart) is ignored without the machine, which would log
// it as a failed decryption; a message it never had is handled.
func TestHandleCopy(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.peerSends()
	evt := f.hs.Inbox(f.bridge)[0]
	f.unwedger.HandleToDevice(f.ctx, evt)
	f.noDecision()
	var logs lockedBuffer
	f.bridge.Log = zerolog.New(&logs).Level(zerolog.DebugLevel)
	f.restartBridge() // the Unwedger's memory of handled messages is gone; the store's is not
	f.unwedger.HandleCopy(f.ctx, evt)
	if d := f.decision(); d.Class != unwedge.ClassDuplicate || d.Action != unwedge.ActionIgnored {
		t.Errorf("decision %+v, want an ignored duplicate", d)
	}
	if strings.Contains(logs.String(), "duplicate olm message") {
		t.Errorf("the machine was handed the copy: %s", logs.String())
	}
	f.peerSends()
	f.unwedger.HandleCopy(f.ctx, f.hs.Inbox(f.bridge)[0])
	f.noDecision() // decrypted
}
