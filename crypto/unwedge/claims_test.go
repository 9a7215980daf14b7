package unwedge_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// flakyStore fails AddSession while fail is above zero, as a database that is down does: before
// writing the row, or after writing it (a connection that broke after the commit).
type flakyStore struct {
	crypto.Store
	fail       *atomic.Int32
	afterWrite bool
	// update: UpdateSession fails instead of AddSession.
	update bool
}

func (s *flakyStore) UpdateSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	if !s.update || s.fail.Load() <= 0 {
		return s.Store.UpdateSession(ctx, key, sess)
	}
	s.fail.Add(-1)
	return errors.New("database is down")
}

func (s *flakyStore) AddSession(ctx context.Context, key id.SenderKey, sess *crypto.OlmSession) error {
	if s.update || s.fail.Load() <= 0 {
		return s.Store.AddSession(ctx, key, sess)
	}
	s.fail.Add(-1)
	if s.afterWrite {
		if err := s.Store.AddSession(ctx, key, sess); err != nil {
			return err
		}
	}
	return errors.New("database is down")
}

// TestHealStoreFailure: the claim gives a key and the session is made, but the crypto store fails
// to keep it. The heal keeps the session and stores it on its next attempt instead of claiming
// another key: one key for the heal, and the session survives a restart. A store that stays down
// for the whole heal still costs one key, and the ledger gives the device no second one within
// the interval.
func TestHealStoreFailure(t *testing.T) {
	cases := []struct {
		name       string
		failures   int32
		afterWrite bool
		healed     bool
	}{
		{name: "store fails once before writing", failures: 1, healed: true},
		{name: "store writes and reports a failure", failures: 1, afterWrite: true, healed: true},
		{name: "store fails three times", failures: 3, healed: true},
		{name: "store down for the whole heal", failures: 1000},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.establish()
			fail := &atomic.Int32{}
			f.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store {
				return &flakyStore{Store: inner, fail: fail, afterWrite: tc.afterWrite}
			}
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			f.restartBridge()
			keys := f.hs.OneTimeKeys(f.peer)
			fail.Store(tc.failures)
			f.peerSends()
			f.deliverToBridge()
			d := f.decision()
			if n := keys - f.hs.OneTimeKeys(f.peer); n != 1 {
				t.Errorf("the heal claimed %d one-time keys, want 1", n)
			}
			heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 5)
			if err != nil || len(heals) != 1 || heals[0].SessionID == "" {
				t.Fatalf("heals = %+v, %v; want one with its session recorded", heals, err)
			}
			if !tc.healed {
				if d.Action != unwedge.ActionFailed || !errors.Is(d.Err, unwedge.ErrCryptoStore) || heals[0].Outcome != unwedge.HealFailedTransient {
					t.Fatalf("decision = %+v, heal %+v; want failed for the crypto store", d, heals[0])
				}
				f.peerSends()
				f.deliverToBridge()
				if d := f.decision(); d.Action != unwedge.ActionLimited || f.hs.OneTimeKeys(f.peer) != keys-1 {
					t.Errorf("next wedge: %+v, %d more keys claimed; want limited, none", d, keys-1-f.hs.OneTimeKeys(f.peer))
				}
				return
			}
			if d.Action != unwedge.ActionHealed || heals[0].Outcome != unwedge.HealHealed {
				t.Fatalf("decision = %+v, heal %+v; want healed", d, heals[0])
			}
			stored, err := f.bridge.SQL.GetSessions(f.ctx, f.peerKey())
			if err != nil || len(stored) != 1 || stored[0].ID() != heals[0].SessionID {
				t.Fatalf("stored sessions %v (%v), want only the recorded %s", stored, err, heals[0].SessionID)
			}
			// The session is in the database, not only in memory: it works after a restart.
			f.restartBridge()
			f.healedBothWays()
		})
	}
}

// TestHealDiscardedOnStop: the bridge stops while a heal waits to store its session again (the
// crypto store is down). No peer can know that session, so the ledger forgets it: the next process
// heals the device at its next wedge instead of refusing it for min_interval (seen in the wedge
// lab: a SIGTERM during a heal left a device unhealed for the hour).
func TestHealDiscardedOnStop(t *testing.T) {
	f := newFixture(t)
	f.establish()
	fail := &atomic.Int32{}
	f.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store { return &flakyStore{Store: inner, fail: fail} }
	f.cfg.MinBackoff, f.cfg.MaxBackoff = time.Minute, time.Minute // the heal waits after its first attempt
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	fail.Store(1000)
	f.peerSends()
	f.deliverToBridge()
	deadline := time.Now().Add(10 * time.Second)
	for {
		heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 5)
		if err == nil && len(heals) == 1 && heals[0].SessionID != "" {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no session recorded for the heal: %+v, %v", heals, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.unwedger.Stop() // the bridge stops
	if d := f.decision(); d.Action != unwedge.ActionFailed {
		t.Fatalf("decision %+v, want failed", d)
	}
	fail.Store(0)
	f.restartBridge()
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("after a restart: %+v, want healed (the discarded session does not start the interval)", d)
	}
	f.healedBothWays()
}

// TestLostClaimAnswer: the homeserver hands out a key, but the bridge never gets the answer (a
// proxy in front of it times out, or the connection drops). The heal does not claim again, also
// with the client's own retries on (bridgev2's homeserver.retry_limit): one key, one request, and
// the heal ends as a transient failure.
func TestLostClaimAnswer(t *testing.T) {
	cases := []struct {
		name   string
		answer func(w http.ResponseWriter)
	}{
		{"gateway timeout", func(w http.ResponseWriter) {
			http.Error(w, "upstream timed out", http.StatusGatewayTimeout)
		}},
		{"internal server error", func(w http.ResponseWriter) {
			http.Error(w, `{"errcode":"M_UNKNOWN","error":"internal error"}`, http.StatusInternalServerError)
		}},
		{"connection dropped", func(w http.ResponseWriter) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.establish()
			f.bridge.Client.DefaultHTTPRetries, f.bridge.Client.DefaultHTTPBackoff = 4, time.Millisecond
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			f.restartBridge()
			keys, requests := f.hs.OneTimeKeys(f.peer), f.hs.Claims()
			f.hs.LoseClaims(1000, tc.answer)
			f.peerSends()
			f.deliverToBridge()
			if d := f.decision(); d.Action != unwedge.ActionFailed || d.Err == nil {
				t.Fatalf("decision = %+v, want failed", d)
			}
			if n := keys - f.hs.OneTimeKeys(f.peer); n != 1 {
				t.Errorf("the heal spent %d one-time keys, want 1", n)
			}
			if n := f.hs.Claims() - requests; n != 1 {
				t.Errorf("the heal made %d claim requests, want 1", n)
			}
			heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 5)
			if err != nil || len(heals) != 1 || heals[0].Outcome != unwedge.HealFailedTransient || heals[0].Attempts != 1 {
				t.Fatalf("heals = %+v, %v; want one failed_transient after 1 attempt", heals, err)
			}
			if got := f.hs.Inbox(f.peer); len(got) != 0 {
				t.Errorf("the bridge sent %d events to the peer without a new session", len(got))
			}
		})
	}
}

// TestHealsPerMinute: at most max_heals_per_minute heals of all users' devices start within a
// minute. Over it a wedge is throttled (unwedge claims no key; mautrix-go's own unwedging runs, as
// on the stock bridge), and so is an admin's heal without force (nothing runs); a forced heal is
// not refused, and counts.
func TestHealsPerMinute(t *testing.T) {
	f := newFixture(t)
	f.cfg.MaxHealsPerMinute = 1
	f.restartBridge()
	f.establish()
	second := f.newPeer("@bob:example.org", "TABLET")
	second.SendDummy(f.bridge)
	f.deliverToBridge()
	f.noDecision()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()

	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("first wedge: %+v, want healed", d)
	}
	claims := f.hs.Claims()
	second.SendDummy(f.bridge)
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionThrottled || d.UserID != second.UserID {
		t.Fatalf("another user's wedge within the minute: %+v, want throttled", d)
	}
	// The throttled wedge gets mautrix-go's own unwedging, as on the stock bridge: one key.
	f.hs.AwaitInbox(second, 5*time.Second)
	if n := f.hs.Claims() - claims; n != 1 {
		t.Errorf("%d key claims for the throttled wedge, want 1 (mautrix-go's own unwedging)", n)
	}
	claims = f.hs.Claims()
	bob := f.bridge.Fetch(second.UserID, second.DeviceID)
	if d := f.unwedger.HealRequested(f.ctx, bob, "@admin:example.org", false); d.Action != unwedge.ActionThrottled {
		t.Errorf("admin's heal within the minute: %+v, want throttled", d)
	}
	f.decision()
	if f.hs.Claims() != claims {
		t.Error("claimed a key over the cap")
	}
	if d := f.unwedger.HealRequested(f.ctx, bob, "@admin:example.org", true); d.Action != unwedge.ActionHealed {
		t.Errorf("forced heal over the cap: %s (%+v), want healed", d.Action, d)
	}
	f.decision()
	if c, err := f.ledger.RecentHeals(f.ctx, "", time.Now(), time.Now().Add(-time.Minute)); err != nil || c.All != 2 {
		t.Errorf("ledger counts %d heals in the last minute (%v), want 2 (the forced one too)", c.All, err)
	}
	if n := f.unwedger.Counts()[unwedge.Count{Class: unwedge.ClassForced, Action: unwedge.ActionThrottled}]; n != 1 {
		t.Errorf("throttled admin heals counted %d times, want 1", n)
	}
}

// TestHealUnsavedSession: the crypto store fails to write the replacement session back after the
// machine encrypted m.dummy over it. That m.dummy is not sent (the stored state would be one
// message behind what the peer has); the next attempt encrypts and sends another, and the peer
// decrypts it.
func TestHealUnsavedSession(t *testing.T) {
	f := newFixture(t)
	f.establish()
	fail := &atomic.Int32{}
	f.bridge.Store.Wrap = func(inner crypto.Store) crypto.Store { return &flakyStore{Store: inner, fail: fail, update: true} }
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	fail.Store(1)
	f.peerSends()
	sends := f.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type)
	f.deliverToBridge()
	d := f.decision()
	if d.Action != unwedge.ActionHealed || !strings.HasSuffix(d.Detail, "after 2 attempt(s)") {
		t.Fatalf("decision %+v, want healed after 2 attempts", d)
	}
	if n := f.hs.ToDeviceRequests(event.ToDeviceEncrypted.Type) - sends; n != 1 {
		t.Errorf("%d sends, want the second attempt's only", n)
	}
	f.peerDecryptsAll(1)
	f.restartBridge() // the stored state is the one the peer has
	f.hs.Exchange(f.peer, f.bridge)
	f.noDecision()
	f.bridgeSends()
	f.peerDecryptsAll(1)
}
