package database_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/database"
)

// TestSharedIndex: the first share of a session with a device is kept; later, higher indices do
// not replace it; the ledger's prune deletes old records.
func TestSharedIndex(t *testing.T) {
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			for _, index := range []uint32{4, 9} {
				if err := db.Shared.RecordShared(ctx, "session", "phone", index); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range []struct {
				key    id.IdentityKey
				index  uint32
				shared bool
			}{{"phone", 4, true}, {"laptop", 0, false}} {
				index, shared, err := db.Shared.FirstShared(ctx, "session", tc.key)
				if err != nil || index != tc.index || shared != tc.shared {
					t.Errorf("%s: index %d, shared %v (%v), want %d, %v", tc.key, index, shared, err, tc.index, tc.shared)
				}
			}
			if _, _, err := db.Ledger.Prune(ctx, time.Now().Add(time.Minute), time.Now()); err != nil {
				t.Fatal(err)
			}
			if _, shared, err := db.Shared.FirstShared(ctx, "session", "phone"); err != nil || shared {
				t.Errorf("record survived the prune (%v)", err)
			}
		})
	}
}

// TestSharedKeys: the devices the bridge shared room keys with, each once, the latest first, not
// those shared with only before the given time, at most the limit.
func TestSharedKeys(t *testing.T) {
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			shares := []struct {
				session id.SessionID
				key     id.IdentityKey
				at      time.Time
			}{
				{"s1", "old", time.Now().Add(-2 * time.Hour)},
				{"s1", "phone", time.Now().Add(-30 * time.Minute)},
				{"s2", "phone", time.Now().Add(-20 * time.Minute)},
				{"s2", "laptop", time.Now().Add(-10 * time.Minute)},
			}
			for _, s := range shares {
				if _, err := db.Exec(ctx, "INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at) VALUES ($1, $2, $3, 0, $4)",
					db.Shared.BridgeID, s.session, s.key, s.at.UnixMilli()); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range []struct {
				limit int
				want  []id.IdentityKey
			}{{10, []id.IdentityKey{"laptop", "phone"}}, {1, []id.IdentityKey{"laptop"}}} {
				keys, err := db.Shared.SharedKeys(ctx, time.Now().Add(-time.Hour), tc.limit)
				if err != nil || !slices.Equal(keys, tc.want) {
					t.Errorf("limit %d: %v (%v), want %v", tc.limit, keys, err, tc.want)
				}
			}
		})
	}
}

// mautrixShares is a bridge's Megolm sessions as mautrix-go's SQL store keeps them (the room's
// current outbound session, and who got each session) next to unwedge's records of the same
// shares.
type mautrixShares struct {
	t     *testing.T
	db    *database.UnwedgeDB
	store *crypto.SQLCryptoStore
}

func newMautrixShares(t *testing.T, db *database.UnwedgeDB) *mautrixShares {
	return &mautrixShares{t: t, db: db, store: crypto.NewSQLCryptoStore(db.Database, dbutil.ZeroLogger(zerolog.Nop()), "BRIDGE", "BRIDGE", []byte("pickle"))}
}

// rotate makes a new outbound session the room's current one, as the machine does when the old
// one expired.
func (m *mautrixShares) rotate(room id.RoomID) id.SessionID {
	m.t.Helper()
	ctx := m.t.Context()
	sess, err := crypto.NewOutboundGroupSession(room, nil, nil)
	if err != nil {
		m.t.Fatal(err)
	}
	if err = m.store.RemoveOutboundGroupSession(ctx, room); err != nil {
		m.t.Fatal(err)
	}
	if err = m.store.AddOutboundGroupSession(ctx, sess); err != nil {
		m.t.Fatal(err)
	}
	return sess.ID()
}

// share records in both stores that a device got the session at a time.
func (m *mautrixShares) share(session id.SessionID, key id.IdentityKey, at time.Time) {
	m.t.Helper()
	ctx := m.t.Context()
	if err := m.store.MarkOutboundGroupSessionShared(ctx, "@alice:localhost", key, session); err != nil {
		m.t.Fatal(err)
	}
	if _, err := m.db.Exec(ctx, "INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at) VALUES ($1, $2, $3, 0, $4)",
		m.db.Shared.BridgeID, session, key, at.UnixMilli()); err != nil {
		m.t.Fatal(err)
	}
}

// rows counts a session's rows in mautrix-go's table and in unwedge's (all sessions' when
// session is empty).
func (m *mautrixShares) rows(session id.SessionID) (mautrix, unwedge int) {
	m.t.Helper()
	ctx := m.t.Context()
	for table, n := range map[string]*int{"crypto_megolm_outbound_session_shared": &mautrix, "unwedge_megolm_shared": &unwedge} {
		if err := m.db.QueryRow(ctx, "SELECT COUNT(*) FROM "+table+" WHERE $1 = '' OR session_id = $1", session).Scan(n); err != nil {
			m.t.Fatal(err)
		}
	}
	return
}

// TestPruneMautrixShared: the ledger's prune deletes mautrix-go's record of who got a session
// (crypto_megolm_outbound_session_shared) with unwedge's, for the sessions whose every share is
// older than the retention and that no room uses any more. A room's current session keeps both
// (the machine still shares it, and a device asking for it gets it from the index unwedge
// recorded); a session shared within the retention and one unwedge never recorded keep
// mautrix-go's rows.
func TestPruneMautrixShared(t *testing.T) {
	t0 := time.UnixMilli(1_800_000_000_000)
	old, recent := t0.Add(-2*time.Hour), t0.Add(-10*time.Minute)
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			m := newMautrixShares(t, db)
			expired := m.rotate("!a:localhost")
			m.share(expired, "phone", old)
			m.share(expired, "laptop", old)
			current := m.rotate("!a:localhost")
			m.share(current, "phone", old)
			m.share(current, "laptop", old)
			sharedRecently := m.rotate("!b:localhost")
			m.share(sharedRecently, "phone", old)
			m.share(sharedRecently, "laptop", recent)
			if err := m.store.RemoveOutboundGroupSession(t.Context(), "!b:localhost"); err != nil {
				t.Fatal(err)
			}
			unrecorded := id.SessionID(strings.Repeat("u", 43))
			if err := m.store.MarkOutboundGroupSessionShared(t.Context(), "@alice:localhost", "phone", unrecorded); err != nil {
				t.Fatal(err)
			}

			if _, _, err := db.Ledger.Prune(t.Context(), t0.Add(-time.Hour), t0); err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				name             string
				session          id.SessionID
				mautrix, unwedge int
			}{
				{"expired, shared before the retention", expired, 0, 0},
				{"current, shared before the retention", current, 2, 2},
				{"expired, shared within the retention", sharedRecently, 2, 1},
				{"never recorded by unwedge", unrecorded, 1, 0},
			} {
				if mautrix, unwedge := m.rows(tc.session); mautrix != tc.mautrix || unwedge != tc.unwedge {
					t.Errorf("%s: %d rows in mautrix-go's table and %d in unwedge's, want %d and %d", tc.name, mautrix, unwedge, tc.mautrix, tc.unwedge)
				}
			}

			// Once the current session expires and every share is old, its rows go too.
			m.rotate("!a:localhost")
			if _, _, err := db.Ledger.Prune(t.Context(), t0, t0); err != nil {
				t.Fatal(err)
			}
			for _, session := range []id.SessionID{current, sharedRecently} {
				if mautrix, unwedge := m.rows(session); mautrix+unwedge != 0 {
					t.Errorf("%d rows in mautrix-go's table and %d in unwedge's of an expired session shared before the retention", mautrix, unwedge)
				}
			}
		})
	}
}

// TestPruneMautrixSharedBounded: a bridge that starts a new Megolm session every hour and shares
// it with three devices keeps mautrix-go's record of those shares to the sessions of the
// retention, not every session it ever had.
func TestPruneMautrixSharedBounded(t *testing.T) {
	const devices = 3
	t0 := time.UnixMilli(1_800_000_000_000)
	retention := 90 * time.Minute
	for dialect, db := range openPending(t) {
		t.Run(dialect, func(t *testing.T) {
			m := newMautrixShares(t, db)
			for hour := range 10 {
				now := t0.Add(time.Duration(hour) * time.Hour)
				session := m.rotate("!room:localhost")
				for d := range devices {
					m.share(session, id.IdentityKey(fmt.Sprintf("device%d", d)), now)
				}
				if _, _, err := db.Ledger.Prune(t.Context(), now.Add(-retention), now); err != nil {
					t.Fatal(err)
				}
				// The current session and the one before, shared within the retention.
				if mautrix, _ := m.rows(""); mautrix > 2*devices {
					t.Fatalf("after %d hours mautrix-go's table has %d rows, want at most %d", hour+1, mautrix, 2*devices)
				}
			}
		})
	}
}
