package unwedge_test

import (
	"crypto/rand"
	"encoding/base64"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestAbuseGarbageFlood: a real device of a user in scope sends the bridge Olm garbage as fast as
// it can. It gets one replacement session (one key claim) and nothing more within the hour, and
// every message is counted.
func TestAbuseGarbageFlood(t *testing.T) {
	f := newFixture(t)
	f.establish()
	claims := f.hs.Claims()
	const flood = 200
	// Decisions are collected as they come (the fixture's channel holds fewer than the flood).
	decided := map[unwedge.Action]int{}
	collected := make(chan struct{})
	go func() {
		defer close(collected)
		for range flood {
			decided[f.decision().Action]++
		}
	}()
	for i := range flood {
		f.peerSends()
		evt := f.hs.Inbox(f.bridge)[0]
		content := evt.Content.AsEncrypted()
		ct := content.OlmCiphertext[f.bridgeKey()]
		ct.Body = randomBase64(64 + i%200)
		content.OlmCiphertext[f.bridgeKey()] = ct
		f.unwedger.HandleToDevice(f.ctx, evt)
	}
	<-collected
	f.unwedger.Stop() // waits for the heal
	if got := f.hs.Claims() - claims; got != 1 {
		t.Errorf("%d key claims for a flood from one device, want 1", got)
	}
	if decided[unwedge.ActionHealed] != 1 || decided[unwedge.ActionHealed]+decided[unwedge.ActionLimited]+decided[unwedge.ActionIgnored] != flood {
		t.Errorf("decisions %v for %d messages, want 1 healed and the rest limited or ignored", decided, flood)
	}
	if n, err := f.ledger.CountCreated(f.ctx, peerUser, peerDevice, time.Time{}); err != nil || n != 1 {
		t.Errorf("ledger: %d sessions created (%v), want 1", n, err)
	}
}

// TestAbuseFakeIdentityKeys: Olm messages that claim to come from a user but carry identity keys
// of no device of theirs. No key is claimed, and the homeserver is asked about the user's devices
// once, not once per message.
func TestAbuseFakeIdentityKeys(t *testing.T) {
	f := newFixture(t)
	f.establish()
	claims, queries := f.hs.Claims(), f.hs.Queries()
	const fakes = 50
	for range fakes {
		f.peerSends()
		evt := f.hs.Inbox(f.bridge)[0]
		content := evt.Content.AsEncrypted()
		content.SenderKey = id.SenderKey(randomBase64(32))
		f.unwedger.HandleToDevice(f.ctx, evt)
		if d := f.decision(); d.Action != unwedge.ActionUnknownDevice && d.Action != unwedge.ActionIgnored {
			t.Fatalf("decision %+v for a fake identity key", d)
		}
	}
	if got := f.hs.Claims() - claims; got != 0 {
		t.Errorf("%d key claims for fake identity keys, want 0", got)
	}
	if got := f.hs.Queries() - queries; got > 1 {
		t.Errorf("%d device queries for %d fake identity keys of one user, want at most 1", got, fakes)
	}
	counts := f.unwedger.Counts()
	var unknown int64
	for c, n := range counts {
		if c.Action == unwedge.ActionUnknownDevice {
			unknown += n
		}
	}
	if unknown != fakes {
		t.Errorf("unknown_device decisions = %d, want %d (counts %v)", unknown, fakes, counts)
	}
}

func randomBase64(n int) string {
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	return base64.RawStdEncoding.EncodeToString(buf)
}
