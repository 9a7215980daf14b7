package bridge

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/database"
)

type allInScope struct{}

func (allInScope) InScope(context.Context, id.UserID) (bool, error) { return true, nil }

// TestStatusFromLedger: `unwedge status` reads the heal history from the database, so a restarted
// bridge (or another replica) shows what happened before; what this process decided besides heals
// (here: a wedge limited by the interval) is shown on top while it is newer.
func TestStatusFromLedger(t *testing.T) {
	ctx := context.Background()
	raw, err := dbutil.NewWithDialect("file:"+filepath.Join(t.TempDir(), "bridge.db")+"?_txlock=immediate", "sqlite3-fk-wal")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = raw.Close() })
	udb := database.NewUnwedgeDB("test", raw, dbutil.ZeroLogger(zerolog.Nop()))
	if err = udb.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}

	const alice = id.UserID("@alice:example.org")
	phone := &id.Device{UserID: alice, DeviceID: "PHONE", IdentityKey: "phoneKey"}
	laptop := &id.Device{UserID: alice, DeviceID: "LAPTOP", IdentityKey: "laptopKey"}
	old := database.LedgerDevice{UserID: alice, DeviceID: "OLD", IdentityKey: "oldKey"}
	dev := func(d *id.Device) database.LedgerDevice {
		return database.LedgerDevice{UserID: d.UserID, DeviceID: d.DeviceID, IdentityKey: d.IdentityKey}
	}
	// A previous bridge process healed PHONE twice, failed LAPTOP for good, and healed a device
	// that is gone since.
	heal := func(d database.LedgerDevice, at time.Time, class string, session id.SessionID, outcome database.HealOutcome, healErr string) {
		t.Helper()
		grant, err := udb.Ledger.Acquire(ctx, d, database.AcquireParams{Now: at, MinInterval: time.Hour, Force: true, Owner: "old-process", Lease: time.Minute, Class: class})
		if err != nil || !grant.Granted {
			t.Fatalf("acquire: %+v, %v", grant, err)
		}
		if session != "" {
			if err = udb.Ledger.SessionCreated(ctx, d, "old-process", grant.HealID, session, at); err != nil {
				t.Fatal(err)
			}
		}
		if err = udb.Ledger.Finish(ctx, d, "old-process", grant.HealID, outcome, 1, healErr, at.Add(time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	heal(dev(phone), now.Add(-3*time.Hour), "bad_mac", "firstSession", database.HealHealed, "")
	heal(dev(phone), now.Add(-10*time.Minute), "prekey_unknown_otk", "secondSession", database.HealHealed, "")
	heal(dev(laptop), now.Add(-5*time.Minute), "no_session", "", database.HealFailedPermanent, "no one-time keys")
	heal(old, now.Add(-20*time.Hour), "no_session", "oldSession", database.HealHealed, "")

	// The restarted bridge: its memory is empty, its store knows PHONE and LAPTOP.
	client, err := mautrix.NewClient("https://matrix.example.org", "@bridgebot:example.org", "token")
	if err != nil {
		t.Fatal(err)
	}
	client.DeviceID = "BRIDGE"
	store := unwedge.NewStore(crypto.NewMemoryStore(nil), udb.Shared)
	if err = store.PutDevices(ctx, alice, map[id.DeviceID]*id.Device{phone.DeviceID: phone, laptop.DeviceID: laptop}); err != nil {
		t.Fatal(err)
	}
	log := zerolog.Nop()
	mach := crypto.NewOlmMachine(client, &log, store, mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err = mach.Load(ctx); err != nil {
		t.Fatal(err)
	}
	h := &Helper{db: udb, mach: mach}

	status := h.statusReport(ctx, alice)
	for _, want := range []string{
		"* device `PHONE` (identity key `phoneKey`)\n  * last decision: healed (prekey_unknown_otk) ",
		"new Olm session secondSession after 1 attempt(s)\n",
		"  * last replacement session: healed (prekey_unknown_otk) 10m0s ago, session `secondSession`, 1 attempt(s)\n",
		"  * earlier heal: healed (bad_mac) 3h0m0s ago, session `firstSession`",
		"* device `LAPTOP` (identity key `laptopKey`)\n  * last decision: failed (no_session) ",
		"failed_permanent after 1 attempt(s): no one-time keys",
		"* device `OLD` (identity key `oldKey`), no longer among the user's devices\n",
		"Messages waiting for their keys: 0",
	} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	if strings.Contains(status, "remembered by this bridge process") {
		t.Errorf("a restarted bridge claims to remember decisions:\n%s", status)
	}

	// This process decides something that is no heal: PHONE's session wedges again within the
	// hour. It is shown as the last decision; the heal history stays below it.
	h.unwedger, err = unwedge.New(unwedge.DefaultConfig(), mach, udb.Ledger, allInScope{}, nil, "this-process", log)
	if err != nil {
		t.Fatal(err)
	}
	if outcome := h.unwedger.Heal(ctx, phone, unwedge.ClassNoMatchingSession, ""); outcome != "" {
		t.Fatalf("heal within the interval: %q, want refused", outcome)
	}
	status = h.statusReport(ctx, alice)
	for _, want := range []string{
		"* device `PHONE` (identity key `phoneKey`)\n  * last decision: limited (no_matching_session) ",
		"(remembered by this bridge process)\n  * last replacement session: healed (prekey_unknown_otk)",
		"* device `LAPTOP` (identity key `laptopKey`)\n  * last decision: failed (no_session) ",
	} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	t.Log(status)
}
