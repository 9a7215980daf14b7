package bridge

import (
	"context"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/bridgev2"
	bridgedb "maunium.net/go/mautrix/bridgev2/database"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

const (
	testBot         = id.UserID("@bridgebot:example.org")
	testGhostPrefix = "@webhook_"
)

// testMatrix is the Matrix side bridgev2.NewBridge needs for bridges made in tests: the bot's
// user ID and the ghosts' namespace (users whose localpart starts with webhook_).
type testMatrix struct{ bridgev2.MatrixConnector }

func (testMatrix) Init(*bridgev2.Bridge)         {}
func (testMatrix) BotIntent() bridgev2.MatrixAPI { return testBotIntent{} }
func (testMatrix) ParseGhostMXID(userID id.UserID) (networkid.UserID, bool) {
	ghost, ok := strings.CutPrefix(string(userID), testGhostPrefix)
	return networkid.UserID(ghost), ok
}

type testBotIntent struct{ bridgev2.MatrixAPI }

func (testBotIntent) GetMXID() id.UserID { return testBot }

// newTestBridge makes a bridgev2 bridge with the given ID on db, with bridgev2's tables, and
// the Matrix state store bridgev2's Matrix connector keeps in the same database.
func newTestBridge(t *testing.T, bridgeID networkid.BridgeID, db *dbutil.Database) (*bridgev2.Bridge, *sqlstatestore.SQLStateStore) {
	t.Helper()
	br := bridgev2.NewBridge(bridgeID, db, zerolog.Nop(), nil, testMatrix{}, newFake(), func(*bridgev2.Bridge) bridgev2.CommandProcessor { return nil })
	// bridgev2 sets it in StartConnectors; portals it loads derive their context from it.
	br.BackgroundCtx = t.Context()
	testenv.Upgrade(t, br.DB)
	states := sqlstatestore.NewSQLStateStore(db, dbutil.ZeroLogger(zerolog.Nop()), false)
	testenv.Upgrade(t, states)
	return br, states
}

// TestScopePortalMembers: portal_members is the users joined to or invited into an encrypted
// portal room of this bridge, as the state store knows them now (security finding 19: users who left or
// were banned stayed in scope).
func TestScopePortalMembers(t *testing.T) {
	const (
		portal      = id.RoomID("!portal:example.org")
		otherPortal = id.RoomID("!other-portal:example.org")
		plainPortal = id.RoomID("!unencrypted-portal:example.org")
		management  = id.RoomID("!management:example.org")
		foreign     = id.RoomID("!other-bridge:example.org")
	)
	type membership struct {
		room id.RoomID
		m    event.Membership
	}
	cases := []struct {
		user    id.UserID
		rooms   []membership
		inScope bool
	}{
		{"@joined:example.org", []membership{{portal, event.MembershipJoin}}, true},
		{"@invited:example.org", []membership{{portal, event.MembershipInvite}}, true},
		{"@left:example.org", []membership{{portal, event.MembershipLeave}}, false},
		{"@banned:example.org", []membership{{portal, event.MembershipBan}}, false},
		{"@knocked:example.org", []membership{{portal, event.MembershipKnock}}, false},
		{"@moved:example.org", []membership{{portal, event.MembershipLeave}, {otherPortal, event.MembershipJoin}}, true},
		{"@left-all:example.org", []membership{{portal, event.MembershipBan}, {otherPortal, event.MembershipLeave}}, false},
		{"@management-only:example.org", []membership{{management, event.MembershipJoin}}, false},
		{"@other-bridge:example.org", []membership{{foreign, event.MembershipJoin}}, false},
		{"@unencrypted:example.org", []membership{{plainPortal, event.MembershipJoin}}, false},
		{"@stranger:example.org", nil, false},
		{testGhostPrefix + "alice:example.org", []membership{{portal, event.MembershipJoin}}, false},
		{testBot, []membership{{portal, event.MembershipJoin}}, false},
	}
	for dialect, db := range cryptotest.Databases(t) {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			br, states := newTestBridge(t, "test", db)
			other, _ := newTestBridge(t, "other", db)
			for _, p := range []struct {
				br   *bridgev2.Bridge
				room id.RoomID
			}{{br, portal}, {br, otherPortal}, {br, plainPortal}, {other, foreign}} {
				if err := p.br.DB.Portal.Insert(ctx, &bridgedb.Portal{PortalKey: networkid.PortalKey{ID: networkid.PortalID(p.room)}, MXID: p.room}); err != nil {
					t.Fatal(err)
				}
			}
			for _, room := range []id.RoomID{portal, otherPortal, management, foreign} {
				if err := states.SetEncryptionEvent(ctx, room, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range cases {
				for _, r := range tc.rooms {
					if err := states.SetMembership(ctx, r.room, tc.user, r.m); err != nil {
						t.Fatal(err)
					}
				}
			}
			scope := NewAudience(br, states, unwedge.ScopePortalMembers)
			for _, tc := range cases {
				if got, err := scope.InScope(ctx, tc.user); err != nil || got != tc.inScope {
					t.Errorf("%s (%v): in scope %t (%v), want %t", tc.user, tc.rooms, got, err, tc.inScope)
				}
			}
		})
	}
}
