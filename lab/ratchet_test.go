package lab

import (
	"errors"
	"strings"
	"testing"

	"maunium.net/go/mautrix/crypto/olm"

	"github.com/unwedge/unwedge/internal/cryptotest"
)

// olmPair is the Olm session between the user's device and the bridge's device, both ends in
// memory, as the lab's traffic moves it.
type olmPair struct {
	t              *testing.T
	client, bridge olm.Session
}

func newOlmPair(t *testing.T) *olmPair {
	t.Helper()
	// The device opens the session: its first room key for the bridge (the warm-up's command).
	p := &olmPair{t: t}
	p.client, p.bridge, _ = cryptotest.OlmPair(t)
	return p
}

func (p *olmPair) send(from, to olm.Session) error {
	msgType, msg, err := from.Encrypt([]byte("room key"))
	if err != nil {
		p.t.Fatal(err)
	}
	_, err = to.Decrypt(string(msg), msgType)
	return err
}

// bridgeSpeaks and deviceSpeaks are World's, in memory: one Olm message each, which must decrypt.
func (p *olmPair) bridgeSpeaks() {
	p.t.Helper()
	if err := p.send(p.bridge, p.client); err != nil {
		p.t.Fatalf("the device failed the bridge's message: %v", err)
	}
}

func (p *olmPair) deviceSpeaks() {
	p.t.Helper()
	if err := p.send(p.client, p.bridge); err != nil {
		p.t.Fatalf("the bridge failed the device's message: %v", err)
	}
}

// TestReusedIndexRounds replays the Olm messages of the client-restored-reused-index scenarios
// on two goolm sessions in memory (the warm-up, the scenario's Prepare and its backup, the
// runner's churnExchanges, the scenario's Wedge and restore) and checks that the restored
// client's first Olm message fails at the bridge as the scenario says, and as docs/baseline.md
// explains. Goolm keeps five receiving chains: one more round after the backup in the -own
// scenario would turn its failure into another, which this test notices.
func TestReusedIndexRounds(t *testing.T) {
	cases := []struct {
		name string
		// speak is the Olm message the backup follows; wedge the traffic of the scenario's
		// Wedge before its restore.
		speak, wedge func(*olmPair)
		want         error
		wantText     string
	}{
		{
			name:  "client-restored-reused-index",
			speak: (*olmPair).bridgeSpeaks,
			wedge: (*olmPair).bridgeSpeaks,
			want:  olm.ErrBadMAC, wantText: "decrypt from existing chain",
		},
		{
			name:  "client-restored-reused-index-own",
			speak: (*olmPair).deviceSpeaks,
			wedge: func(p *olmPair) { p.bridgeSpeaks(); p.deviceSpeaks() },
			want:  olm.ErrMessageKeyNotFound, wantText: "decrypt: message key not found",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, ok := ScenarioByName(tc.name); !ok {
				t.Fatalf("no scenario %s", tc.name)
			}
			p := newOlmPair(t)
			// Warm-up (Exchange): the bridge's answer, then the device's new room key.
			p.bridgeSpeaks()
			p.deviceSpeaks()
			// Prepare (backupAfter).
			tc.speak(p)
			backup, err := p.client.Pickle([]byte("backup"))
			if err != nil {
				t.Fatal(err)
			}
			p.deviceSpeaks()
			p.bridgeSpeaks()
			p.deviceSpeaks()
			for range churnExchanges {
				p.bridgeSpeaks()
				p.deviceSpeaks()
			}
			tc.wedge(p)
			if p.client, err = olm.SessionFromPickled(backup, []byte("backup")); err != nil {
				t.Fatal(err)
			}
			err = p.send(p.client, p.bridge)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("the restored client's first Olm message: %v, want %q (%v)", err, tc.wantText, tc.want)
			}
		})
	}
}
