package database_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/testenv"
)

// TestLedgerBatch: Acquire and Finish decide and record, for a batch of devices, what
// Acquire and Finish do for each: new devices and devices past the interval are granted (an
// abandoned heal of theirs superseded), a device within the interval, after a permanent failure
// or under another owner's lease is refused with its reason; the outcomes release the leases and
// a permanent failure starts the interval.
func TestLedgerBatch(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	dev := func(name string) unwedge.LedgerDevice {
		return unwedge.LedgerDevice{UserID: id.UserID("@" + name + ":localhost"), DeviceID: "PHONE", IdentityKey: id.IdentityKey("key-" + name)}
	}
	newDev, pastDev, abandoned, recent, failed, leased := dev("new"), dev("past"), dev("abandoned"), dev("recent"), dev("failed"), dev("leased")
	for dialect, uri := range testenv.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			lq := openLedger(t, dialect, uri)
			// The devices' history, one device at a time.
			finish := func(d unwedge.LedgerDevice, at time.Duration, outcome unwedge.HealOutcome) {
				g, err := lq.AcquireDevice(ctx, d, params(t0.Add(at), "bridge-a"))
				if err != nil || !g.Granted {
					t.Fatalf("acquire %s: %+v %v", d.UserID, g, err)
				}
				ref := unwedge.HealRef{Device: d, Owner: "bridge-a", HealID: g.HealID}
				if outcome == unwedge.HealHealed {
					if err = lq.SessionCreated(ctx, ref, "session", t0.Add(at)); err != nil {
						t.Fatal(err)
					}
				}
				if outcome != unwedge.HealInProgress {
					if err = lq.FinishHeal(ctx, ref, unwedge.HealEnd{Outcome: outcome, Attempts: 1, At: t0.Add(at)}); err != nil {
						t.Fatal(err)
					}
				}
			}
			finish(pastDev, 0, unwedge.HealHealed)
			finish(abandoned, 0, unwedge.HealInProgress) // a process died; its lease runs out after 2 minutes
			finish(recent, 90*time.Minute, unwedge.HealHealed)
			finish(failed, 100*time.Minute, unwedge.HealFailedPermanent)
			if g, err := lq.AcquireDevice(ctx, leased, params(t0.Add(119*time.Minute), "bridge-b")); err != nil || !g.Granted {
				t.Fatalf("acquire by another owner: %+v %v", g, err)
			}

			now := t0.Add(2 * time.Hour)
			devs := []unwedge.LedgerDevice{newDev, recent, pastDev, leased, abandoned, failed}
			grants, err := lq.Acquire(ctx, devs, params(now, "bridge-a"))
			if err != nil || len(grants) != len(devs) {
				t.Fatalf("Acquire: %d grants, %v", len(grants), err)
			}
			want := []unwedge.Grant{
				{Granted: true},
				{LastCreatedAt: t0.Add(90 * time.Minute)},
				{Granted: true, LastCreatedAt: t0},
				{LeaseOwner: "bridge-b", LeaseUntil: t0.Add(121 * time.Minute)},
				{Granted: true},
				{LastFailedAt: t0.Add(100 * time.Minute)},
			}
			ids := map[int64]bool{}
			for i, g := range grants {
				got := *g
				if g.Granted {
					if g.HealID == 0 || ids[g.HealID] {
						t.Errorf("%s: heal ID %d, want a new one", devs[i].UserID, g.HealID)
					}
					ids[g.HealID] = true
					got.HealID = 0
				}
				if got != want[i] {
					t.Errorf("%s: grant %+v, want %+v", devs[i].UserID, got, want[i])
				}
			}
			heals, err := lq.Heals(ctx, abandoned.UserID, "", 5)
			if err != nil || len(heals) != 2 || heals[0].Outcome != unwedge.HealInProgress || heals[0].Class != "no_session" ||
				heals[1].Outcome != unwedge.HealFailedTransient || heals[1].Error != fmt.Sprintf("superseded by heal %d", heals[0].ID) {
				t.Fatalf("heals of the abandoned device: %+v, %v; want the new one in progress and the old one superseded", heals, err)
			}

			var refs []unwedge.HealRef
			var ends []unwedge.HealEnd
			outcomes := []unwedge.HealOutcome{unwedge.HealHealed, "", unwedge.HealFailedPermanent, "", unwedge.HealFailedTransient, ""}
			for i, g := range grants {
				if g.Granted {
					refs = append(refs, unwedge.HealRef{Device: devs[i], Owner: "bridge-a", HealID: g.HealID})
					ends = append(ends, unwedge.HealEnd{Outcome: outcomes[i], Attempts: i + 1, Err: fmt.Sprintf("error %d", i), At: now})
				}
			}
			if err = lq.Finish(ctx, refs, ends); err != nil {
				t.Fatal(err)
			}
			for i, ref := range refs {
				heals, err := lq.Heals(ctx, ref.Device.UserID, "", 1)
				if err != nil || len(heals) != 1 || heals[0].ID != ref.HealID || heals[0].Outcome != ends[i].Outcome ||
					heals[0].Attempts != ends[i].Attempts || heals[0].Error != ends[i].Err || !heals[0].FinishedAt.Equal(now) {
					t.Errorf("heal of %s after Finish: %+v, %v; want %+v", ref.Device.UserID, heals, err, ends[i])
				}
			}
			// The leases are released: a minute later only the permanent failure waits.
			later := params(now.Add(time.Minute), "bridge-c")
			for _, d := range []unwedge.LedgerDevice{newDev, pastDev, abandoned} {
				g, err := lq.AcquireDevice(ctx, d, later)
				wantGranted := d != pastDev
				if err != nil || g.Granted != wantGranted || !wantGranted && !g.LastFailedAt.Equal(now) {
					t.Errorf("%s a minute later: %+v, %v; want granted %t", d.UserID, g, err, wantGranted)
				}
			}
		})
	}
}

// TestLedgerDiscarded: a heal that ends with its session discarded (the crypto store never kept it
// and the bridge stopped) leaves the device free to be healed again at once, with Finish and
// Finish; a discarded session that is no longer the device's last one changes nothing.
func TestLedgerDiscarded(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	n := 0
	for dialect, uri := range testenv.Databases(t) {
		for _, many := range []bool{false, true} {
			for _, tc := range []struct {
				name      string
				discarded id.SessionID
				granted   bool
			}{
				{"kept", "", false},
				{"discarded", "session", true},
				{"another session discarded", "older", false},
			} {
				t.Run(fmt.Sprintf("%s/many=%v/%s", dialect, many, tc.name), func(t *testing.T) {
					ctx := context.Background()
					lq := openLedger(t, dialect, uri)
					n++ // a device of its own
					d := unwedge.LedgerDevice{UserID: id.UserID(fmt.Sprintf("@discard%d:localhost", n)), DeviceID: "PHONE", IdentityKey: "key-alice"}
					g, err := lq.AcquireDevice(ctx, d, params(t0, "bridge-a"))
					if err != nil || !g.Granted {
						t.Fatalf("acquire: %+v %v", g, err)
					}
					ref := unwedge.HealRef{Device: d, Owner: "bridge-a", HealID: g.HealID}
					if err = lq.SessionCreated(ctx, ref, "session", t0); err != nil {
						t.Fatal(err)
					}
					end := unwedge.HealEnd{Outcome: unwedge.HealFailedTransient, Attempts: 1, At: t0, Discarded: tc.discarded}
					if many {
						err = lq.Finish(ctx, []unwedge.HealRef{ref}, []unwedge.HealEnd{end})
					} else {
						err = lq.FinishHeal(ctx, ref, end)
					}
					if err != nil {
						t.Fatal(err)
					}
					g, err = lq.AcquireDevice(ctx, d, params(t0.Add(time.Minute), "bridge-b"))
					if err != nil || g.Granted != tc.granted {
						t.Errorf("next heal a minute later: %+v %v, want granted %v", g, err, tc.granted)
					}
				})
			}
		}
	}
}
