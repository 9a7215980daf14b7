package bench

import (
	"context"
	"fmt"
	"testing"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/testenv"
)

// The success path: decrypting what healthy sessions carry costs the same with unwedge as
// without. "stock" is mautrix-go's OlmMachine on its SQL store as the stock helper runs it;
// "unwedge" is the same machine on unwedge's store, with Olm events going through the Unwedger
// and Megolm events through what bridge.Helper.Decrypt adds (recovery's bookkeeping). cmd/bench
// runs both alternately and reports the throughput ratio.

var modes = []string{"stock", "unwedge"}

// successSetup is a bridge and one user device with working Olm and Megolm sessions.
type successSetup struct {
	hs       *homeserver
	bridge   *device
	peer     *device
	unwedger *unwedge.Unwedger
	recovery *unwedge.Recovery
	megolm   *crypto.OutboundGroupSession
}

const benchRoom = id.RoomID("!bench:example.org")

func newSuccessSetup(b *testing.B, env *testenv.Env, mode string) *successSetup {
	ctx := context.Background()
	s := &successSetup{hs: newHomeserver(b)}
	db := openDB(b, env.NewDatabase(b))
	s.bridge = newBridgeDevice(b, ctx, s.hs, db, mode == "stock")
	s.peer = newMemoryDevice(b, ctx, s.hs, "@alice:example.org", "PHONE")
	if mode == "unwedge" {
		u, unwedgeDB := newUnwedger(b, ctx, s.bridge, db, "bench")
		s.unwedger = u
		s.recovery = unwedge.NewRecovery(unwedge.DefaultConfig().Recovery, s.bridge.mach, unwedgeDB.Pending, nil, u.Healing, "bench", zerolog.Nop())
	}
	// An Olm session both ways, then a Megolm session whose key the bridge has.
	sendDummy(b, ctx, s.peer, s.bridge)
	s.deliver(ctx)
	var err error
	if s.megolm, err = crypto.NewOutboundGroupSession(benchRoom, nil, nil); err != nil {
		b.Fatal(err)
	}
	s.megolm.Shared = true
	s.megolm.MaxMessages = 1 << 30
	if err = s.peer.mach.CryptoStore.AddOutboundGroupSession(ctx, s.megolm); err != nil {
		b.Fatal(err)
	}
	target, err := s.peer.mach.GetOrFetchDevice(ctx, s.bridge.userID, s.bridge.deviceID)
	if err != nil {
		b.Fatal(err)
	}
	if err = s.peer.mach.SendEncryptedToDevice(ctx, target, event.ToDeviceRoomKey, s.megolm.ShareContent()); err != nil {
		b.Fatal(err)
	}
	s.deliver(ctx)
	return s
}

// deliver hands the bridge its queued to-device events, as its transport does.
func (s *successSetup) deliver(ctx context.Context) int {
	events := s.hs.inbox(s.bridge.userID, s.bridge.deviceID)
	for _, evt := range events {
		s.handle(ctx, evt)
	}
	return len(events)
}

// handle gives one to-device event to the bridge: through the Unwedger, or to stock's machine.
func (s *successSetup) handle(ctx context.Context, evt *event.Event) {
	if s.unwedger != nil {
		s.unwedger.HandleToDevice(ctx, evt)
	} else {
		s.bridge.mach.HandleToDeviceEvent(ctx, evt)
	}
}

func BenchmarkMegolmDecrypt(b *testing.B) {
	env := testenv.Require(b)
	for _, mode := range modes {
		b.Run(mode, func(b *testing.B) {
			ctx := context.Background()
			s := newSuccessSetup(b, env, mode)
			events := make([]*event.Event, b.N)
			for i := range events {
				content, err := s.peer.mach.EncryptMegolmEvent(ctx, benchRoom, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: fmt.Sprintf("message %d", i)})
				if err != nil {
					b.Fatal(err)
				}
				events[i] = &event.Event{
					ID: id.EventID(fmt.Sprintf("$%s-%d-%d", mode, b.N, i)), RoomID: benchRoom, Sender: s.peer.userID,
					Type: event.EventEncrypted, Timestamp: int64(i), Content: event.Content{Parsed: content},
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for _, evt := range events {
				if _, err := s.bridge.mach.DecryptMegolmEvent(ctx, evt); err != nil {
					b.Fatal(err)
				}
				if s.recovery != nil {
					s.recovery.Decrypted(ctx, evt.ID)
				}
			}
		})
	}
}

func BenchmarkOlmDecrypt(b *testing.B) {
	env := testenv.Require(b)
	for _, mode := range modes {
		b.Run(mode, func(b *testing.B) {
			ctx := context.Background()
			s := newSuccessSetup(b, env, mode)
			for range b.N {
				sendDummy(b, ctx, s.peer, s.bridge)
			}
			events := s.hs.inbox(s.bridge.userID, s.bridge.deviceID)
			b.ReportAllocs()
			b.ResetTimer()
			for _, evt := range events {
				s.handle(ctx, evt)
			}
			b.StopTimer()
			if n := len(s.hs.inbox(s.bridge.userID, s.bridge.deviceID)); n != 0 {
				b.Fatalf("the bridge sent %d to-device messages: something failed to decrypt", n)
			}
		})
	}
}
