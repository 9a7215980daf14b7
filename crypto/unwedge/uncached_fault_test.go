//go:build unwedgefault

package unwedge_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"go.mau.fi/util/dbutil"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// TestHealAdoptsLoadedSession: a heal's replacement session is in the table but not the SQL
// store's cache, and the machine loads it while the heal runs (here it sends the peer a message
// between the heal's claim and its m.dummy). The heal then encrypts m.dummy over the machine's
// object of the session, not its own: over its own, it would use the message index the machine
// just used, and the peer could not decrypt the second of the two.
func TestHealAdoptsLoadedSession(t *testing.T) {
	f := newFixture(t)
	f.establish()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
	f.restartBridge()
	var sent atomic.Bool
	f.unwedger.ArmFaults(func(_ context.Context, point string) {
		if point == unwedge.FaultSessionCreated && sent.CompareAndSwap(false, true) {
			f.bridgeSends() // over the replacement session: the machine loads it from the table
		}
	})
	f.peerSends()
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("decision %+v, want healed", d)
	}
	if !sent.Load() {
		t.Fatal("the fault point was not reached")
	}
	f.peerDecryptsAll(2)
	f.hs.Exchange(f.peer, f.bridge)
	f.noDecision()
}

// TestHealUncachedStoreFailure: the database refuses the replacement session's row when the heal
// makes it (a trigger, on each dialect). The heal keeps the session and writes it before
// encrypting over it, in the same attempt: one key claimed, and the session is in the table after
// a restart.
func TestHealUncachedStoreFailure(t *testing.T) {
	refuse := map[dbutil.Dialect][2]string{
		dbutil.Postgres: {
			`CREATE FUNCTION refuse_row() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'database is down'; END $$ LANGUAGE plpgsql;
			CREATE TRIGGER refuse_insert BEFORE INSERT ON crypto_olm_session FOR EACH ROW WHEN (NEW.account_id = 'BRIDGE') EXECUTE FUNCTION refuse_row()`,
			`DROP TRIGGER refuse_insert ON crypto_olm_session`,
		},
		dbutil.SQLite: {
			`CREATE TRIGGER refuse_insert BEFORE INSERT ON crypto_olm_session WHEN NEW.account_id = 'BRIDGE' BEGIN SELECT RAISE(ABORT, 'database is down'); END`,
			`DROP TRIGGER refuse_insert`,
		},
	}
	for dialect, db := range cryptotest.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			f := newFixtureOn(t, db)
			f.establish()
			f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1", string(bridgeDevice))
			f.restartBridge()
			statements := refuse[db.Dialect]
			f.exec(statements[0])
			var dropped atomic.Bool
			f.unwedger.ArmFaults(func(_ context.Context, point string) {
				if point == unwedge.FaultSessionCreated && dropped.CompareAndSwap(false, true) {
					// The database is back before the attempt encrypts.
					if _, err := db.Exec(f.ctx, statements[1]); err != nil {
						t.Errorf("drop the trigger: %v", err)
					}
				}
			})
			claims := f.hs.Claims()
			f.peerSends()
			f.deliverToBridge()
			if d := f.decision(); d.Action != unwedge.ActionHealed || !strings.HasSuffix(d.Detail, "after 1 attempt(s)") {
				t.Fatalf("decision %+v, want healed after 1 attempt", d)
			}
			if !dropped.Load() {
				t.Fatal("the fault point was not reached")
			}
			if n := f.hs.Claims() - claims; n != 1 {
				t.Errorf("%d claims, want 1", n)
			}
			f.restartBridge()
			f.healedBothWays()
		})
	}
}
