package database_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

var testDevice = unwedge.LedgerDevice{UserID: "@alice:localhost", DeviceID: "PHONE", IdentityKey: "curve-key-a"}

func openLedger(t *testing.T, dialect, uri string) *database.LedgerQuery {
	parent := testenv.OpenDatabase(t, dialect, uri)
	cryptotest.CryptoTables(t, parent)
	db := database.NewUnwedgeDB("test-bridge", parent, dbutil.ZeroLogger(zerolog.Nop()))
	testenv.Upgrade(t, db)
	return db.Ledger
}

func params(now time.Time, owner string) unwedge.AcquireParams {
	return unwedge.AcquireParams{Now: now, MinInterval: time.Hour, Owner: owner, Lease: 2 * time.Minute, Class: "no_session"}
}

// heal runs one heal to its end and reports whether it was granted.
func heal(t *testing.T, lq *database.LedgerQuery, p unwedge.AcquireParams, outcome unwedge.HealOutcome) bool {
	t.Helper()
	ctx := context.Background()
	grant, err := lq.AcquireDevice(ctx, testDevice, p)
	if err != nil {
		t.Fatal(err)
	}
	if !grant.Granted {
		return false
	}
	if outcome == unwedge.HealHealed {
		if err = lq.SessionCreated(ctx, unwedge.HealRef{Device: testDevice, Owner: p.Owner, HealID: grant.HealID}, id.SessionID("session-"+p.Owner), p.Now); err != nil {
			t.Fatal(err)
		}
	}
	if err = lq.FinishHeal(ctx, unwedge.HealRef{Device: testDevice, Owner: p.Owner, HealID: grant.HealID}, unwedge.HealEnd{Outcome: outcome, Attempts: 1, At: p.Now}); err != nil {
		t.Fatal(err)
	}
	return true
}

func TestLedgerLimit(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	steps := []struct {
		name    string
		at      time.Duration
		force   bool
		outcome unwedge.HealOutcome
		granted bool
	}{
		{"first wedge heals", 0, false, unwedge.HealHealed, true},
		{"again within the hour is limited", 30 * time.Minute, false, unwedge.HealHealed, false},
		{"an admin may force within the hour", 31 * time.Minute, true, unwedge.HealHealed, true},
		{"the forced session restarts the hour", 89 * time.Minute, false, unwedge.HealHealed, false},
		{"after the hour a transient failure", 92 * time.Minute, false, unwedge.HealFailedTransient, true},
		{"does not burn the hour", 93 * time.Minute, false, unwedge.HealFailedPermanent, true},
		{"a permanent failure waits the hour", 100 * time.Minute, false, unwedge.HealHealed, false},
		{"and then may try again", 154 * time.Minute, false, unwedge.HealHealed, true},
	}
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			lq := openLedger(t, dialect, uri)
			for _, step := range steps {
				p := params(t0.Add(step.at), "bridge-a")
				p.Force = step.force
				if got := heal(t, lq, p, step.outcome); got != step.granted {
					t.Fatalf("%s: granted = %t, want %t", step.name, got, step.granted)
				}
			}
			n, err := lq.CountCreated(context.Background(), testDevice.UserID, testDevice.DeviceID, t0)
			if err != nil || n != 3 {
				t.Errorf("created sessions = %d, %v; want 3", n, err)
			}
			heals, err := lq.Heals(context.Background(), testDevice.UserID, "", 100)
			if err != nil || len(heals) != 5 || heals[0].Outcome != unwedge.HealHealed || heals[1].Outcome != unwedge.HealFailedPermanent {
				t.Errorf("heal history = %d rows, %v", len(heals), err)
			}
		})
	}
}

func TestLedgerLease(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			lq := openLedger(t, dialect, uri)
			held, err := lq.AcquireDevice(ctx, testDevice, params(t0, "crashed"))
			if err != nil || !held.Granted {
				t.Fatalf("first acquire: %+v %v", held, err)
			}
			// A forced heal still respects a live lease: two heals never run at once.
			p := params(t0.Add(time.Minute), "other")
			p.Force = true
			if g, err := lq.AcquireDevice(ctx, testDevice, p); err != nil || g.Granted || g.LeaseOwner != "crashed" {
				t.Fatalf("acquire under a live lease: %+v %v", g, err)
			}
			// The holder died without creating a session: after the lease the device can be healed.
			if g, err := lq.AcquireDevice(ctx, testDevice, params(t0.Add(3*time.Minute), "other")); err != nil || !g.Granted {
				t.Fatalf("acquire after the lease ran out: %+v %v", g, err)
			}
			// The dead holder's heal can no longer be resumed: the new one closed it.
			unfinished, err := lq.UnfinishedHeals(ctx)
			if err != nil || len(unfinished) != 1 || unfinished[0].ID == held.HealID {
				t.Fatalf("unfinished heals = %+v, %v; want only the new one", unfinished, err)
			}
			if heals, _ := lq.Heals(ctx, testDevice.UserID, testDevice.DeviceID, 5); len(heals) != 2 || heals[1].Outcome != unwedge.HealFailedTransient || !strings.Contains(heals[1].Error, "superseded") {
				t.Fatalf("heals = %+v, want the first one closed as superseded", heals)
			}
			// The dead holder's late Finish must not release the new holder's lease.
			if err = lq.FinishHeal(ctx, unwedge.HealRef{Device: testDevice, Owner: "crashed", HealID: held.HealID}, unwedge.HealEnd{Outcome: unwedge.HealFailedTransient, Attempts: 1, Err: "late", At: t0.Add(4 * time.Minute)}); err != nil {
				t.Fatal(err)
			}
			if g, _ := lq.AcquireDevice(ctx, testDevice, params(t0.Add(4*time.Minute), "third")); g.Granted {
				t.Fatal("a stale owner released someone else's lease")
			}
		})
	}
}

// TestLedgerConcurrency: many goroutines on two bridge processes (two connection pools on one
// database) race for the same wedged device; exactly one gets to create a session.
func TestLedgerConcurrency(t *testing.T) {
	t0 := time.Now()
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			replicas := []*database.LedgerQuery{openLedger(t, dialect, uri), openLedger(t, dialect, uri)}
			var granted atomic.Int32
			var wg sync.WaitGroup
			for i := range 32 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					lq := replicas[i%2]
					p := params(t0, fmt.Sprintf("replica-%d/goroutine-%d", i%2, i))
					g, err := lq.AcquireDevice(context.Background(), testDevice, p)
					if err != nil {
						t.Error(err)
						return
					}
					if g.Granted {
						granted.Add(1)
						_ = lq.SessionCreated(context.Background(), unwedge.HealRef{Device: testDevice, Owner: p.Owner, HealID: g.HealID}, "s", t0)
						_ = lq.FinishHeal(context.Background(), unwedge.HealRef{Device: testDevice, Owner: p.Owner, HealID: g.HealID}, unwedge.HealEnd{Outcome: unwedge.HealHealed, Attempts: 1, At: t0})
					}
				}()
			}
			wg.Wait()
			if n := granted.Load(); n != 1 {
				t.Fatalf("%d goroutines were granted a new session, want exactly 1", n)
			}
			// A restart (a new process on the same database) is still limited.
			restarted := openLedger(t, dialect, uri)
			if g, err := restarted.AcquireDevice(context.Background(), testDevice, params(t0.Add(time.Minute), "restarted")); err != nil || g.Granted {
				t.Fatalf("after restart: %+v %v", g, err)
			}
		})
	}
}

func TestLedgerPrune(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			lq := openLedger(t, dialect, uri)
			heal(t, lq, params(t0, "a"), unwedge.HealHealed)
			heal(t, lq, params(t0.Add(2*time.Hour), "a"), unwedge.HealHealed)
			heals, devices, err := lq.Prune(context.Background(), t0.Add(time.Hour), t0.Add(3*time.Hour))
			if err != nil || heals != 1 || devices != 0 {
				t.Fatalf("prune = %d heals, %d devices, %v; want 1, 0 (the device healed recently)", heals, devices, err)
			}
			heals, devices, err = lq.Prune(context.Background(), t0.Add(5*time.Hour), t0.Add(5*time.Hour))
			if err != nil || heals != 1 || devices != 1 {
				t.Fatalf("second prune = %d heals, %d devices, %v", heals, devices, err)
			}
		})
	}
}

// TestLedgerRecentHeals: the bridge's cap on heals per minute counts every heal it started within
// the window, automatic and forced, of any device, on any replica; not older ones, nor another
// bridge's on the same database, nor heals at startup. The per-user cap counts only the user's
// automatic heals, not those at startup (the bridge starts them on its own).
func TestLedgerRecentHeals(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			lq, replica := openLedger(t, dialect, uri), openLedger(t, dialect, uri)
			otherDB := database.NewUnwedgeDB("other-bridge", testenv.OpenDatabase(t, dialect, uri), dbutil.ZeroLogger(zerolog.Nop()))
			testenv.Upgrade(t, otherDB)
			heals := []struct {
				lq     *database.LedgerQuery
				device id.DeviceID
				at     time.Duration
				force  bool
				class  unwedge.Class
			}{
				{lq, "PHONE", 0, false, ""},
				{replica, "TABLET", 10 * time.Second, true, ""},
				{lq, "LAPTOP", -2 * time.Minute, false, ""},
				{otherDB.Ledger, "PHONE", 20 * time.Second, false, ""},
				{lq, "WATCH", 5 * time.Second, false, unwedge.ClassRolledBack},
				{replica, "DESKTOP", 15 * time.Second, false, unwedge.ClassSessionLost},
			}
			for _, h := range heals {
				dev := unwedge.LedgerDevice{UserID: testDevice.UserID, DeviceID: h.device, IdentityKey: id.IdentityKey("key-" + h.device)}
				p := params(t0.Add(h.at), "bridge")
				if h.class != "" {
					p.Class = h.class
				}
				if p.Force = h.force; h.force {
					p.ForcedBy = "@admin:localhost"
				}
				if g, err := h.lq.AcquireDevice(context.Background(), dev, p); err != nil || !g.Granted {
					t.Fatalf("heal of %s: %+v, %v", h.device, g, err)
				}
			}
			since := t0.Add(30*time.Second - time.Minute)
			if c, err := lq.RecentHeals(context.Background(), testDevice.UserID, since, since); err != nil || c.All != 2 || c.User != 1 {
				t.Errorf("heals within the minute = %+v, %v; want 2 in all (this bridge's automatic and forced ones), 1 of the user (automatic)", c, err)
			}
		})
	}
}
