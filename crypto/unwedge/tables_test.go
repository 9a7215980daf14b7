package unwedge_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// The startup check's reads of the crypto tables, a page at a time, on both dialects: the SQL of
// their cursors differs between the two.

const tablesAccount = "BRIDGE"

// trimmed drops the blanks Postgres pads the CHAR(43) sender_key with (the tests' keys are
// shorter than real ones).
func trimmed[K ~string](keys []K) []K {
	out := make([]K, len(keys))
	for i, key := range keys {
		out[i] = K(strings.TrimSpace(string(key)))
	}
	return out
}

// sessionTables is a crypto store's tables with sessions written as mautrix-go writes them.
type sessionTables struct {
	t      *testing.T
	ctx    context.Context
	db     *dbutil.Database
	tables *unwedge.CryptoTables
	pickle []byte
	n      int
}

func newSessionTables(t *testing.T, db *dbutil.Database) *sessionTables {
	cryptotest.CryptoTables(t, db)
	return &sessionTables{t: t, ctx: t.Context(), db: db, pickle: cryptotest.SessionPickle(t),
		tables: &unwedge.CryptoTables{DB: db, AccountID: tablesAccount, PickleKey: []byte(cryptotest.PickleKey)}}
}

// add stores a session with the key, readable or not, created and last used at the times.
func (s *sessionTables) add(key id.SenderKey, readable bool, created, encrypted, decrypted time.Time) {
	s.t.Helper()
	s.n++
	pickled := s.pickle
	if !readable {
		pickled = []byte("not a pickle")
	}
	if _, err := s.db.Exec(s.ctx, "INSERT INTO crypto_olm_session (account_id, session_id, sender_key, session, created_at, last_encrypted, last_decrypted) VALUES ($1, $2, $3, $4, $5, $6, $7)",
		tablesAccount, fmt.Sprintf("session%03d", s.n), key, pickled, created, encrypted, decrypted); err != nil {
		s.t.Fatal(err)
	}
}

// TestUnreadablePeers: the sessions are read a few rows at a time in the order of their sender
// key; a key with one unreadable row among several, across a page boundary, comes once, with the
// page of its last row; rows deleted between pages (the check deletes unreadable ones as it goes)
// skip nothing.
func TestUnreadablePeers(t *testing.T) {
	for dialect, db := range cryptotest.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			s := newSessionTables(t, db)
			now := time.Now()
			// Page size 2: a's three rows span two pages, its unreadable one on the first.
			s.add("a", false, now, now, now)
			s.add("a", true, now, now, now)
			s.add("a", true, now, now, now)
			s.add("b", true, now, now, now)
			s.add("c", true, now, now, now)
			s.add("c", false, now, now, now)
			s.add("d", false, now, now, now)
			var cursor unwedge.SessionsCursor
			var found []id.SenderKey
			total := 0
			for pages := 0; ; pages++ {
				if pages > 10 {
					t.Fatal("no end after 10 pages")
				}
				keys, rows, next, err := s.tables.UnreadablePeers(s.ctx, cursor, 2)
				if err != nil {
					t.Fatal(err)
				}
				for _, key := range keys {
					// As the check does: the unreadable rows go before the next page.
					if _, err = s.tables.DeleteUnreadableSessions(s.ctx, key); err != nil {
						t.Fatal(err)
					}
				}
				found, total, cursor = append(found, keys...), total+rows, next
				if rows == 0 {
					break
				}
			}
			if want := []id.SenderKey{"a", "c", "d"}; !slices.Equal(trimmed(found), want) {
				t.Errorf("unreadable %v, want %v", found, want)
			}
			if total != 7 {
				t.Errorf("%d rows read, want 7", total)
			}
			var left int
			if err := db.QueryRow(s.ctx, "SELECT COUNT(*) FROM crypto_olm_session").Scan(&left); err != nil || left != 4 {
				t.Errorf("%d rows left (%v), want the 4 readable", left, err)
			}
		})
	}
}

// TestRecentPeers: the devices come the most recently used first (the later of the last
// encryption and decryption of any of their sessions), each once, a page at a time; sessions made
// after the check began are left out, and a device whose older session was used since is left to
// UsedSincePeers, unless it has a session newer than the check.
func TestRecentPeers(t *testing.T) {
	for dialect, db := range cryptotest.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			s := newSessionTables(t, db)
			since := time.Now().Add(-time.Minute)
			at := func(minutes int) time.Time { return since.Add(-time.Duration(minutes) * time.Minute) }
			old := at(1000)
			s.add("quiet", true, old, at(500), at(400))
			s.add("sender", true, old, at(300), at(10)) // decrypted lately
			s.add("receiver", true, old, at(20), at(600))
			s.add("two", true, old, at(700), at(700))
			s.add("two", true, old, at(30), at(900)) // its other session is more recent
			s.add("tie1", true, old, at(50), at(50))
			s.add("tie2", true, old, at(50), at(50))
			s.add("new", true, since.Add(time.Second), since.Add(time.Second), since.Add(time.Second))
			s.add("moved", true, old, since.Add(time.Second), at(800)) // used during the check
			s.add("healed", true, old, since.Add(time.Second), at(800))
			s.add("healed", true, since.Add(2*time.Second), since.Add(2*time.Second), since.Add(2*time.Second))
			var cursor unwedge.RecentCursor
			var got []id.SenderKey
			for pages := 0; ; pages++ {
				if pages > 10 {
					t.Fatal("no end after 10 pages")
				}
				keys, next, err := s.tables.RecentPeers(s.ctx, since, cursor, 2)
				if err != nil {
					t.Fatal(err)
				}
				if len(keys) == 0 {
					break
				}
				got, cursor = append(got, keys...), next
			}
			want := []id.SenderKey{"sender", "receiver", "two", "tie2", "tie1", "quiet"}
			if !slices.Equal(trimmed(got), want) {
				t.Errorf("by recency %v, want %v", got, want)
			}
			moved, err := s.tables.UsedSincePeers(s.ctx, since, "", 10)
			if err != nil || !slices.Equal(trimmed(moved), []id.SenderKey{"moved"}) {
				t.Errorf("used since the check began: %v (%v), want [moved]", moved, err)
			}
			if len(moved) == 0 {
				return
			}
			if moved, err = s.tables.UsedSincePeers(s.ctx, since, moved[0], 10); err != nil || len(moved) != 0 {
				t.Errorf("after the last: %v (%v), want none", moved, err)
			}
		})
	}
}

// TestLostKeys: the devices shared with since the time that have no session row, the latest
// shared first, a page at a time; a device that gets a session between pages (a heal) is not
// listed again, and a corrupt row counts as a session (the check deletes it later).
func TestLostKeys(t *testing.T) {
	for dialect, db := range cryptotest.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			s := newSessionTables(t, db)
			udb := cryptotest.UnwedgeDB(t, db)
			now := time.Now()
			share := func(key id.IdentityKey, session id.SessionID, ago time.Duration) {
				if _, err := db.Exec(s.ctx, "INSERT INTO unwedge_megolm_shared (bridge_id, session_id, identity_key, first_index, shared_at) VALUES ($1, $2, $3, 0, $4)",
					udb.Shared.BridgeID, session, key, now.Add(-ago).UnixMilli()); err != nil {
					t.Fatal(err)
				}
			}
			share("lost1", "s1", time.Minute)
			share("lost1", "s2", 50*time.Minute) // its latest share counts
			share("lost2", "s1", 2*time.Minute)
			share("lost3", "s1", 3*time.Minute)
			share("lost4", "s1", 4*time.Minute)
			share("too old", "s0", 2*time.Hour)
			share("has session", "s1", 30*time.Second)
			s.add("has session", true, now, now, now)
			share("corrupt", "s1", 30*time.Second)
			s.add("corrupt", false, now, now, now)
			var cursor unwedge.SharedCursor
			var got []id.IdentityKey
			for pages := 0; ; pages++ {
				if pages > 10 {
					t.Fatal("no end after 10 pages")
				}
				keys, next, err := udb.Shared.LostKeys(s.ctx, tablesAccount, now.Add(-time.Hour), cursor, 2)
				if err != nil {
					t.Fatal(err)
				}
				if len(keys) == 0 {
					break
				}
				got, cursor = append(got, keys...), next
				if pages == 0 {
					s.add("lost3", true, now, now, now) // healed while the first page was
				}
			}
			if want := []id.IdentityKey{"lost1", "lost2", "lost4"}; !slices.Equal(got, want) {
				t.Errorf("lost %v, want %v", got, want)
			}
		})
	}
}
