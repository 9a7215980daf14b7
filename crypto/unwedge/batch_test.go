package unwedge_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// batchFixture is the fixture's bridge with many peers, each of which had a session with the
// bridge that the bridge lost (its session rows deleted, restarted), as after a restore: the
// bridge heals them all at once with HealBatch.
type batchFixture struct {
	*fixture
	peers   []*cryptotest.Device
	stores  []*peerStore
	devices []*id.Device // the peers as the bridge knows them

	lock    sync.Mutex
	decided []unwedge.Decision // every decision the Unwedger logged (OnDecision)
}

// peerStore counts what a peer decrypted and records the Olm sessions it stored.
type peerStore struct {
	crypto.Store
	decrypted atomic.Int64
	lock      sync.Mutex
	sessions  []id.SessionID
}

// PutOlmHash is called once an Olm message decrypted (mautrix-go stores its hash against replays).
func (s *peerStore) PutOlmHash(ctx context.Context, hash [32]byte, at time.Time) error {
	s.decrypted.Add(1)
	return s.Store.PutOlmHash(ctx, hash, at)
}

func (s *peerStore) AddSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	s.lock.Lock()
	s.sessions = append(s.sessions, sess.ID())
	s.lock.Unlock()
	return s.Store.AddSession(ctx, key, sess)
}

func (s *peerStore) has(sessionID id.SessionID) bool {
	s.lock.Lock()
	defer s.lock.Unlock()
	return slices.Contains(s.sessions, sessionID)
}

func newBatchFixture(t *testing.T, peers int) *batchFixture {
	b := &batchFixture{fixture: newFixture(t)}
	b.observe = b.record
	for i := range peers {
		store := &peerStore{}
		// On SQL stores in the bridge's database, as newPeer's (each its own account): the
		// memory store's choice of the latest session is not mautrix-go's SQL store's.
		userID, deviceID := id.UserID(fmt.Sprintf("@user%d:example.org", i)), id.DeviceID(fmt.Sprintf("PHONE%d", i))
		peer := b.hs.NewDevice(userID, deviceID, cryptotest.Store{DB: b.db, Wrap: func(inner crypto.Store) crypto.Store {
			store.Store = inner
			return store
		}})
		// The bridge opens the session and the peer learns it.
		b.bridge.SendDummy(peer)
		b.hs.Receive(peer)
		b.peers, b.stores = append(b.peers, peer), append(b.stores, store)
	}
	b.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	b.restart()
	for _, peer := range b.peers {
		b.devices = append(b.devices, b.bridge.Fetch(peer.UserID, peer.DeviceID))
	}
	return b
}

// restart restarts the bridge, and records the new Unwedger's decisions.
func (b *batchFixture) restart() {
	b.restartBridge()
	// The machine fetches its own cross-signing keys once per start, at its first encryption:
	// fetched here, so that the homeserver's counts are the batch's.
	if _, err := b.bridge.Mach.GetOwnCrossSigningPublicKeys(b.ctx); err != nil {
		b.t.Fatal(err)
	}
}

// record keeps a decision of the Unwedger.
func (b *batchFixture) record(d unwedge.Decision) {
	b.lock.Lock()
	b.decided = append(b.decided, d)
	b.lock.Unlock()
}

func (b *batchFixture) decisions() []unwedge.Decision {
	b.lock.Lock()
	defer b.lock.Unlock()
	return slices.Clone(b.decided)
}

// lastHeal is the ledger's newest heal of peer i.
func (b *batchFixture) lastHeal(i int) *unwedge.HealRecord {
	b.t.Helper()
	heals, err := b.ledger.Heals(b.ctx, b.peers[i].UserID, b.peers[i].DeviceID, 1)
	if err != nil || len(heals) != 1 {
		b.t.Fatalf("heals of peer %d: %+v, %v", i, heals, err)
	}
	return heals[0]
}

// healedBothWays checks that peer i decrypts the m.dummy waiting for it, over the session the
// ledger recorded, and a later message of the bridge over the same session, and that the bridge
// decrypts the peer's answer (no decision: no wedge).
func (b *batchFixture) healedBothWays(i int) {
	b.t.Helper()
	peer, store := b.peers[i], b.stores[i]
	session := b.lastHeal(i).SessionID
	before := store.decrypted.Load()
	if got := b.hs.Receive(peer); len(got) != 1 {
		b.t.Fatalf("peer %d received %d events, want its m.dummy", i, len(got))
	}
	if n := store.decrypted.Load() - before; n != 1 || !store.has(session) {
		b.t.Fatalf("peer %d decrypted %d of 1 m.dummy; has the recorded session %s: %v", i, n, session, store.has(session))
	}
	b.bridge.SendDummy(peer)
	b.hs.Receive(peer)
	if n := store.decrypted.Load() - before; n != 2 {
		b.t.Fatalf("peer %d did not decrypt the bridge's next message over the new session", i)
	}
	decided := len(b.decisions())
	peer.SendDummy(b.bridge)
	b.hs.Receive(b.bridge)
	if got := b.decisions(); len(got) != decided {
		b.t.Fatalf("the bridge could not decrypt peer %d's answer: %+v", i, got[decided:])
	}
}

// counts is what a batch cost the homeserver: key claim requests and the keys they asked for,
// sendToDevice requests with encrypted events, and device key queries.
type counts struct{ claims, keys, sends, queries int64 }

func (b *batchFixture) counts() counts {
	return counts{b.hs.Claims(), b.hs.ClaimedKeys(), b.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type), b.hs.Queries()}
}

func (c counts) minus(o counts) counts {
	return counts{c.claims - o.claims, c.keys - o.keys, c.sends - o.sends, c.queries - o.queries}
}

// TestHealBatch heals many devices at once as the bridge does at startup after a restore: one key
// claim and one send per batch of unwedge.BatchDevices, one key per device, each device decided
// on its own (limited, failed) without failing its batch, and every healed peer decrypting over
// its new session.
func TestHealBatch(t *testing.T) {
	lost := func(w http.ResponseWriter) { http.Error(w, "upstream timed out", http.StatusGatewayTimeout) }
	cases := []struct {
		name  string
		peers int
		// before runs before the batch; it returns the devices not to heal (limited or failing).
		before func(b *batchFixture) (limited, failing []int)
		// want is the homeserver's count of requests and keys, and the decisions by action.
		want    counts
		actions map[unwedge.Action]int
		// after checks more; nil: every device that was not limited or failing healed both ways.
		after func(t *testing.T, b *batchFixture)
	}{{
		name:    "three batches",
		peers:   2*unwedge.BatchDevices + 20,
		want:    counts{claims: 3, keys: 2*unwedge.BatchDevices + 20, sends: 3},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 2*unwedge.BatchDevices + 20},
	}, {
		name:  "devices healed within the interval are limited",
		peers: unwedge.BatchDevices + 10,
		before: func(b *batchFixture) ([]int, []int) {
			var limited []int
			for i := 0; i < len(b.devices); i += 3 {
				if d := b.unwedger.Heal(b.ctx, b.devices[i], unwedge.ClassSessionLost, ""); d.Action != unwedge.ActionHealed {
					b.t.Fatalf("heal of peer %d: %+v", i, d)
				}
				b.hs.Inbox(b.peers[i]) // its m.dummy is no part of the batch
				limited = append(limited, i)
			}
			return limited, nil
		},
		// 60 devices in batches of 50 and 10; 20 are limited.
		want:    counts{claims: 2, keys: 40, sends: 2},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 40, unwedge.ActionLimited: 20},
	}, {
		name:  "a device without one-time keys fails alone",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			b.hs.ClaimAllKeys(b.peers[7])
			return nil, []int{7}
		},
		want:    counts{claims: 1, keys: 20, sends: 1},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 19, unwedge.ActionFailed: 1},
		after: func(t *testing.T, b *batchFixture) {
			if h := b.lastHeal(7); h.Outcome != unwedge.HealFailedPermanent || h.SessionID != "" {
				t.Errorf("heal of the device without keys: %+v, want failed_permanent without a session", h)
			}
			if got := b.hs.Inbox(b.peers[7]); len(got) != 0 {
				t.Errorf("the device without keys got %d events", len(got))
			}
		},
	}, {
		name:  "devices missing from the crypto store are fetched in one query",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			for _, peer := range b.peers[:10] {
				b.exec("DELETE FROM crypto_device WHERE user_id=$1", string(peer.UserID))
			}
			return nil, nil
		},
		want:    counts{claims: 1, keys: 20, sends: 1, queries: 1},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 20},
	}, {
		name:  "a device with another identity key fails alone",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			changed := *b.devices[3]
			changed.IdentityKey = id.IdentityKey(strings.Repeat("A", 43))
			b.devices[3] = &changed
			return nil, []int{3}
		},
		want:    counts{claims: 1, keys: 19, sends: 1},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 19, unwedge.ActionFailed: 1},
		after: func(t *testing.T, b *batchFixture) {
			heals, err := b.ledger.Heals(b.ctx, b.peers[3].UserID, b.peers[3].DeviceID, 1)
			if err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealFailedPermanent || heals[0].Device.IdentityKey != b.devices[3].IdentityKey {
				t.Errorf("heals of the changed device: %+v, %v; want failed_permanent", heals, err)
			}
			if got := b.hs.Inbox(b.peers[3]); len(got) != 0 {
				t.Errorf("the device with another key got %d events", len(got))
			}
		},
	}, {
		// The machine looks every device of a batch up again before its claim, and one failure
		// fails its call for the whole batch: the batch is tried again in halves at once, and
		// only the device whose lookup fails is left, failed_transient (no min_interval).
		name:  "a crypto store error looking up one device fails it alone",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			b.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store {
				return &lookupFlakyStore{Store: inner, user: b.peers[13].UserID}
			}
			b.restart()
			return nil, []int{13}
		},
		want:    counts{claims: 5, keys: 19, sends: 5},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 19, unwedge.ActionFailed: 1},
		after: func(t *testing.T, b *batchFixture) {
			if h := b.lastHeal(13); h.Outcome != unwedge.HealFailedTransient || !strings.Contains(h.Error, "database is down") {
				t.Errorf("heal of the device whose lookup failed: %+v, want failed_transient with the store's error", h)
			}
			for i := range b.peers {
				if i != 13 {
					b.healedBothWays(i)
				}
			}
		},
	}, {
		name:  "the crypto store fails to keep one session",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			// The machine only logs the failure, and the session cannot be stored when the machine
			// reads it back either (which fails the machine's call for the whole batch): the batch
			// keeps the session and stores it on its next attempt, with no second claim.
			fail := &atomic.Int32{}
			key := b.devices[4].IdentityKey
			b.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store { return &keyFlakyStore{Store: inner, key: key, fail: fail} }
			b.restart()
			fail.Store(2)
			return nil, nil
		},
		want:    counts{claims: 1, keys: 20, sends: 1},
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 20},
		after: func(t *testing.T, b *batchFixture) {
			for i := range b.peers {
				if h := b.lastHeal(i); h.Outcome != unwedge.HealHealed || h.Attempts != 2 {
					t.Fatalf("heal of peer %d: %+v, want healed on the second attempt", i, h)
				}
			}
			b.restart()
			for i := range b.peers {
				b.healedBothWays(i)
			}
		},
	}, {
		name:  "a refused claim is repeated",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			b.hs.FailClaims(1)
			return nil, nil
		},
		want:    counts{claims: 2, keys: 40, sends: 1}, // the refused claim asked for 20 keys too, and got none
		actions: map[unwedge.Action]int{unwedge.ActionHealed: 20},
	}, {
		name:  "a lost claim answer is not repeated",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			b.hs.LoseClaims(1, lost)
			return nil, seq(20)
		},
		want:    counts{claims: 1, keys: 20, sends: 0},
		actions: map[unwedge.Action]int{unwedge.ActionFailed: 20},
		after: func(t *testing.T, b *batchFixture) {
			for i := range b.peers {
				if h := b.lastHeal(i); h.Outcome != unwedge.HealFailedTransient || h.Attempts != 1 {
					t.Fatalf("heal of peer %d: %+v, want failed_transient after 1 attempt", i, h)
				}
			}
		},
	}, {
		name:  "the homeserver refuses sends for longer than the retries",
		peers: 20,
		before: func(b *batchFixture) ([]int, []int) {
			b.hs.FailSends(b.bridge, 1000)
			return nil, seq(20)
		},
		want:    counts{claims: 1, keys: 20, sends: 6}, // one per attempt: unwedge.DefaultConfig's max_retries
		actions: map[unwedge.Action]int{unwedge.ActionDeferred: 20},
		after: func(t *testing.T, b *batchFixture) {
			sessions := map[int]id.SessionID{}
			for i := range b.peers {
				h := b.lastHeal(i)
				if h.Outcome != unwedge.HealInProgress || h.SessionID == "" {
					t.Fatalf("heal of peer %d: %+v, want in progress with its session", i, h)
				}
				sessions[i] = h.SessionID
			}
			before := b.counts()
			b.hs.FailSends(b.bridge, 0)
			decided := len(b.decisions())
			b.unwedger.ResumeHeals(b.ctx)
			resumed := b.decisions()[decided:]
			if len(resumed) != len(b.peers) {
				t.Fatalf("ResumeHeals made %d decisions, want %d", len(resumed), len(b.peers))
			}
			for _, d := range resumed {
				if d.Action != unwedge.ActionHealed || !d.Resumed {
					t.Fatalf("resumed: %+v, want healed", d)
				}
			}
			if c := b.counts().minus(before); c.claims != 0 || c.keys != 0 {
				t.Errorf("ResumeHeals claimed %d keys in %d requests, want none", c.keys, c.claims)
			}
			for i := range b.peers {
				if h := b.lastHeal(i); h.Outcome != unwedge.HealHealed || h.SessionID != sessions[i] {
					t.Fatalf("heal of peer %d after ResumeHeals: %+v, want healed over %s", i, h, sessions[i])
				}
				b.healedBothWays(i)
			}
		},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newBatchFixture(t, tc.peers)
			var limited, failing []int
			if tc.before != nil {
				limited, failing = tc.before(b)
			}
			keys := make([]int, len(b.peers))
			for i, peer := range b.peers {
				keys[i] = b.hs.OneTimeKeys(peer)
			}
			decided, before := len(b.decisions()), b.counts()

			got := b.unwedger.HealBatch(b.ctx, b.devices, unwedge.ClassRolledBack)

			if c := b.counts().minus(before); c != tc.want {
				t.Errorf("cost %+v, want %+v", c, tc.want)
			}
			actions := map[unwedge.Action]int{}
			for i, d := range got {
				actions[d.Action]++
				if d.UserID != b.peers[i].UserID || d.DeviceID != b.peers[i].DeviceID || d.Key != b.devices[i].IdentityKey || d.Class != unwedge.ClassRolledBack {
					t.Fatalf("decision %d is %+v, not of its device", i, d)
				}
				want := unwedge.ActionHealed
				if slices.Contains(limited, i) {
					want = unwedge.ActionLimited
				}
				if d.Action != want && !slices.Contains(failing, i) {
					t.Errorf("peer %d: %+v, want %s", i, d, want)
				}
				// One key per device that was healed or may have been, none for a limited one.
				spent, wantSpent := keys[i]-b.hs.OneTimeKeys(b.peers[i]), min(keys[i], 1)
				if d.Action == unwedge.ActionLimited {
					wantSpent = 0
				}
				if spent != wantSpent && !(slices.Contains(failing, i) && spent < wantSpent) {
					t.Errorf("peer %d (%s) lost %d one-time keys, want %d", i, d.Action, spent, wantSpent)
				}
			}
			if !maps.Equal(actions, tc.actions) {
				t.Errorf("decisions %v, want %v", actions, tc.actions)
			}
			// Each decision was logged once, and they are the ones returned.
			if logged := b.decisions()[decided:]; len(logged) != len(got) {
				t.Errorf("%d decisions logged for %d devices", len(logged), len(got))
			}
			for _, peer := range b.peers {
				if b.unwedger.Healing(peer.UserID, peer.IdentityKey()) {
					t.Errorf("%s is still healing after the batch", peer.UserID)
				}
			}
			if tc.after != nil {
				tc.after(t, b)
				return
			}
			// The sessions are in the database, not only in memory: they work after a restart.
			b.restart()
			for i, d := range got {
				if d.Action == unwedge.ActionHealed {
					b.healedBothWays(i)
				}
			}
		})
	}
}

// TestHealBatchDuplicates: a device listed twice is healed once; the second entry is limited.
func TestHealBatchDuplicates(t *testing.T) {
	b := newBatchFixture(t, 3)
	before := b.counts()
	got := b.unwedger.HealBatch(b.ctx, append(slices.Clone(b.devices), b.devices[1]), unwedge.ClassSessionLost)
	want := []unwedge.Action{unwedge.ActionHealed, unwedge.ActionHealed, unwedge.ActionHealed, unwedge.ActionLimited}
	for i, d := range got {
		if d.Action != want[i] {
			t.Errorf("decision %d: %+v, want %s", i, d, want[i])
		}
	}
	if c := b.counts().minus(before); c != (counts{claims: 1, keys: 3, sends: 1}) {
		t.Errorf("cost %+v, want one claim of 3 keys and one send", c)
	}
	for i := range b.peers {
		b.healedBothWays(i)
	}
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// keyFlakyStore fails AddSession for one device's sessions while fail is above zero.
type keyFlakyStore struct {
	crypto.Store
	key  id.SenderKey
	fail *atomic.Int32
}

func (s *keyFlakyStore) AddSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	if key == s.key && s.fail.Add(-1) >= 0 {
		return errors.New("database is down")
	}
	return s.Store.AddSession(ctx, key, sess)
}

// lookupFlakyStore answers the first lookup of one user's device and fails every later one, as a
// database that goes away between the batch's own check and the machine's.
type lookupFlakyStore struct {
	crypto.Store
	user  id.UserID
	calls atomic.Int32
}

func (s *lookupFlakyStore) GetDevice(ctx context.Context, userID id.UserID, deviceID id.DeviceID) (*id.Device, error) {
	if userID == s.user && s.calls.Add(1) > 1 {
		return nil, errors.New("database is down")
	}
	return s.Store.GetDevice(ctx, userID, deviceID)
}
