package bench

import (
	"context"
	"fmt"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
	"github.com/unwedge/unwedge/internal/testenv"
)

// The success path: decrypting what healthy sessions carry costs the same with unwedge as
// without. "stock" is mautrix-go's OlmMachine on its SQL store as the stock helper runs it;
// "unwedge" is the same machine on unwedge's store, with Olm events going through the Unwedger
// and Megolm events through what bridge.Helper.Decrypt adds on success (recovery's bookkeeping).
//
// An event costs about 1.5 ms, mostly Postgres writes, on a noisy machine: measured one after the
// other, the two modes differed by 10 % doing the same work. So each benchmark measures both
// side by side: two bridges in one process, on one fresh database, taking turns event by event
// in ABBA order (interleave). One op is one event in each mode (ns/op includes the measuring);
// the figures are custom metrics: per mode the mean time and the allocations per event, and
// stock time / unwedge time, both of the totals ("stock/unwedge") and as the median of the ABBA
// rounds' ratios ("paired-stock/unwedge"). cmd/bench takes the median of each over its runs.

// successSetup is a bridge and one user device with working Olm and Megolm sessions.
type successSetup struct {
	hs       *cryptotest.Homeserver
	bridge   *cryptotest.Device
	peer     *cryptotest.Device
	recovery *unwedge.Recovery
	megolm   *crypto.OutboundGroupSession
}

const benchRoom = id.RoomID("!bench:example.org")

// newSuccessPair sets up both modes on one fresh database, so that what the database does
// besides (autovacuum, checkpoints, its cache, its connections) it does to both. mautrix-go keys
// some tables by account and others (devices, tracked users) by user, so the two bridges and
// their users have their own IDs, of the same length.
func newSuccessPair(b *testing.B, env *testenv.Env) [2]*successSetup {
	db := openDB(b, env.NewDatabase(b))
	var pair [2]*successSetup
	for m, mode := range modes {
		pair[m] = newSuccessSetup(b, db, mode, string(rune('a'+m)))
	}
	return pair
}

func newSuccessSetup(b *testing.B, db *dbutil.Database, mode, tag string) *successSetup {
	ctx := context.Background()
	s := &successSetup{hs: newHomeserver(b)}
	s.bridge = newBridgeDeviceAs(b, s.hs, db, id.UserID("@bridge-"+tag+":example.org"), id.DeviceID("BRIDGE"+tag), mode == "stock")
	s.peer = newMemoryDevice(s.hs, id.UserID("@alice-"+tag+":example.org"), "PHONE")
	if mode == "unwedge" {
		u, udb := unwedgeBridge(b, s.bridge, db, "bench-"+tag)
		s.recovery = unwedge.NewRecovery(unwedge.DefaultConfig().Recovery, s.bridge.Mach, udb.Pending, nil, u.Healing, "bench-"+tag, zerolog.Nop())
	}
	// An Olm session both ways, then a Megolm session whose key the bridge has.
	s.hs.Exchange(s.peer, s.bridge)
	var err error
	if s.megolm, err = crypto.NewOutboundGroupSession(benchRoom, nil, nil); err != nil {
		b.Fatal(err)
	}
	s.megolm.Shared = true
	s.megolm.MaxMessages = 1 << 30
	if err = s.peer.Mach.CryptoStore.AddOutboundGroupSession(ctx, s.megolm); err != nil {
		b.Fatal(err)
	}
	if err = s.peer.Mach.SendEncryptedToDevice(ctx, s.peer.Fetch(s.bridge.UserID, s.bridge.DeviceID), event.ToDeviceRoomKey, s.megolm.ShareContent()); err != nil {
		b.Fatal(err)
	}
	s.hs.Receive(s.bridge)
	return s
}

// megolmEvents are n room messages from the peer, encrypted with the bridge's Megolm session.
// Both modes get the same event IDs and bodies.
func (s *successSetup) megolmEvents(b *testing.B, ctx context.Context, n int) []*event.Event {
	events := make([]*event.Event, n)
	for i := range events {
		content, err := s.peer.Mach.EncryptMegolmEvent(ctx, benchRoom, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: fmt.Sprintf("message %d", i)})
		if err != nil {
			b.Fatal(err)
		}
		events[i] = &event.Event{
			ID: id.EventID(fmt.Sprintf("$event-%d", i)), RoomID: benchRoom, Sender: s.peer.UserID,
			Type: event.EventEncrypted, Timestamp: int64(i), Content: event.Content{Parsed: content},
		}
	}
	return events
}

func BenchmarkMegolmDecrypt(b *testing.B) {
	env := testenv.Require(b)
	ctx := context.Background()
	var handle [2]func(int)
	for m, s := range newSuccessPair(b, env) {
		events := s.megolmEvents(b, ctx, b.N)
		handle[m] = func(i int) {
			if _, err := s.bridge.Mach.DecryptMegolmEvent(ctx, events[i]); err != nil {
				b.Fatalf("%s: %v", modes[m], err)
			}
			if s.recovery != nil {
				s.recovery.Decrypted(ctx, events[i].ID)
			}
		}
	}
	b.ResetTimer()
	interleave(b.N, handle).report(b)
}

func BenchmarkOlmDecrypt(b *testing.B) {
	env := testenv.Require(b)
	pair := newSuccessPair(b, env)
	var handle [2]func(int)
	for m, s := range pair {
		for range b.N {
			s.peer.SendDummy(s.bridge)
		}
		events := s.hs.Inbox(s.bridge)
		if len(events) != b.N {
			b.Fatalf("%s: %d to-device events queued, want %d", modes[m], len(events), b.N)
		}
		handle[m] = func(i int) { s.bridge.Handle(events[i]) }
	}
	b.ResetTimer()
	measured := interleave(b.N, handle)
	b.StopTimer()
	for m, s := range pair {
		if n := len(s.hs.Inbox(s.bridge)); n != 0 {
			b.Fatalf("%s: the bridge sent %d to-device messages: something failed to decrypt", modes[m], n)
		}
	}
	measured.report(b)
}
