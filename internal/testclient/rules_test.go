package testclient

import (
	"errors"
	"flag"
	"io"
	"testing"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

func TestParseRules(t *testing.T) {
	cases := []struct {
		name string
		want Rules
	}{
		{"mautrix", RulesMautrix},
		{"element-web", RulesElementWeb},
		{"element-x", RulesElementX},
		{"", ""},
		{"Element-Web", ""},
		{"element", ""},
		{"element_x", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRules(tc.name)
			if tc.want == "" {
				if !errors.Is(err, ErrUnknownRules) {
					t.Fatalf("ParseRules(%q) = %q, %v; want ErrUnknownRules", tc.name, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseRules(%q) = %q, %v; want %q", tc.name, got, err, tc.want)
			}
			// As a flag, the way a command line takes it.
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			rules := RulesMautrix
			fs.TextVar(&rules, "rules", RulesMautrix, "key-sharing rules")
			if err = fs.Parse([]string{"-rules", tc.name}); err != nil || rules != tc.want {
				t.Errorf("-rules %s gave %q, %v", tc.name, rules, err)
			}
		})
	}
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var rules Rules
	fs.TextVar(&rules, "rules", RulesMautrix, "key-sharing rules")
	if err := fs.Parse([]string{"-rules", "element"}); err == nil {
		t.Errorf("-rules element was accepted as %q", rules)
	}
}

// TestDecide walks matrix-rust-sdk's GossipMachine::should_share_key through its branches.
func TestDecide(t *testing.T) {
	// A session the client holds from index 3 on.
	out, err := crypto.NewOutboundGroupSession("!room:test", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err = out.Internal.Encrypt([]byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	session, err := crypto.NewInboundGroupSession("sender", "signing", "!room:test", out.Internal.Key(), 0, 0, nil, false)
	if err != nil {
		t.Fatal(err)
	} else if got := session.Internal.FirstKnownIndex(); got != 3 {
		t.Fatalf("first known index %d, want 3", got)
	}
	const key, otherKey = id.IdentityKey("device key"), id.IdentityKey("another key")
	sharedAt5 := &shareRecord{identityKey: key, index: 5}
	cases := []struct {
		name      string
		rules     Rules
		facts     keyRequestFacts
		want      KeyShareDecision
		wantIndex uint32
	}{
		{"element-x never answers", RulesElementX,
			keyRequestFacts{session: session, ownUser: true, verified: true, current: true, shared: sharedAt5, identityKey: key},
			KeyShareForwardingDisabled, 0},
		{"unknown session", RulesElementWeb,
			keyRequestFacts{current: true, shared: sharedAt5, identityKey: key},
			KeyShareUnknownSession, 0},
		{"own verified device: any session, from the first known index", RulesElementWeb,
			keyRequestFacts{session: session, ownUser: true, verified: true, identityKey: key},
			KeyShareAccepted, 3},
		{"own verified device: whole current session", RulesElementWeb,
			keyRequestFacts{session: session, ownUser: true, verified: true, current: true, shared: sharedAt5, identityKey: key},
			KeyShareAccepted, 3},
		{"other user: current session, from the shared index", RulesElementWeb,
			keyRequestFacts{session: session, current: true, shared: sharedAt5, identityKey: key},
			KeyShareAccepted, 5},
		{"other user: current session never shared with the device", RulesElementWeb,
			keyRequestFacts{session: session, current: true, identityKey: key},
			KeyShareOutboundSessionNotShared, 0},
		{"other user: device changed its identity key", RulesElementWeb,
			keyRequestFacts{session: session, current: true, shared: sharedAt5, identityKey: otherKey},
			KeyShareChangedSenderKey, 0},
		{"other user: rotated-away or foreign session", RulesElementWeb,
			keyRequestFacts{session: session, identityKey: key},
			KeyShareMissingOutboundSession, 0},
		{"own unverified device: current session shared with it", RulesElementWeb,
			keyRequestFacts{session: session, ownUser: true, current: true, shared: sharedAt5, identityKey: key},
			KeyShareAccepted, 5},
		{"own unverified device: current session not shared with it", RulesElementWeb,
			keyRequestFacts{session: session, ownUser: true, current: true, identityKey: key},
			KeyShareOutboundSessionNotShared, 0},
		{"own unverified device: other session", RulesElementWeb,
			keyRequestFacts{session: session, ownUser: true, identityKey: key},
			KeyShareUntrustedDevice, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, index := tc.rules.decide(tc.facts)
			if got != tc.want || index != tc.wantIndex {
				t.Errorf("decide = %s from %d, want %s from %d", got, index, tc.want, tc.wantIndex)
			}
		})
	}
}
