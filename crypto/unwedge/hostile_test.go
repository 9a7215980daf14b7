package unwedge_test

// Tests of what a hostile world can do on purpose (docs/security.md, findings 10 to 21): a
// federated homeserver's answers to the bridge's key claims and queries, and a user who lists
// another user's identity key as their own device's.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/cryptotest"
)

// hostileServer sits between the bridge's client and the homeserver, below unwedge's filter: it
// rewrites the answers to key endpoints as a federated server relayed by the homeserver could.
type hostileServer struct {
	next http.RoundTripper

	lock sync.Mutex
	// rewrites change the answers to requests whose path ends with their key.
	rewrites map[string]func(answer []byte) []byte
}

// set rewrites the answers to requests whose path ends with suffix; nil passes them on.
func (h *hostileServer) set(suffix string, rewrite func(answer []byte) []byte) {
	h.lock.Lock()
	defer h.lock.Unlock()
	if rewrite == nil {
		delete(h.rewrites, suffix)
		return
	}
	h.rewrites[suffix] = rewrite
}

func (h *hostileServer) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := h.next.RoundTrip(req)
	var rewrite func([]byte) []byte
	h.lock.Lock()
	for suffix, fn := range h.rewrites {
		if strings.HasSuffix(req.URL.Path, suffix) {
			rewrite = fn
		}
	}
	h.lock.Unlock()
	if err != nil || rewrite == nil {
		return resp, err
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, err
	}
	body = rewrite(body)
	resp.Body, resp.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
	resp.Header.Del("Content-Length")
	return resp, nil
}

// hostile puts a hostileServer under the bridge's client and restarts the bridge, whose new
// Unwedger filters on top of it.
func (f *fixture) hostile() *hostileServer {
	h := &hostileServer{next: http.DefaultTransport, rewrites: map[string]func([]byte) []byte{}}
	if f.bridge.Client.Client != nil && f.bridge.Client.Client.Transport != nil {
		h.next = f.bridge.Client.Client.Transport
		if _, guarded := h.next.(interface {
			Dropped() map[unwedge.Endpoint]int64
		}); guarded {
			h.next = http.DefaultTransport
		}
	}
	f.bridge.Client.Client = &http.Client{Transport: h}
	f.restartBridge()
	return h
}

// garbageFrom is an Olm message from the peer's device whose body is garbage, as sender sent it.
func (f *fixture) garbageFrom(sender id.UserID) *event.Event {
	f.t.Helper()
	f.peerSends()
	evt := f.hs.Inbox(f.bridge)[0]
	evt.Sender = sender
	content := evt.Content.AsEncrypted()
	ct := content.OlmCiphertext[f.bridgeKey()]
	ct.Body = randomBase64(96)
	content.OlmCiphertext[f.bridgeKey()] = ct
	return evt
}

// editJSON decodes an answer, lets edit change it, and encodes it again.
func editJSON(t testing.TB, edit func(answer map[string]any)) func([]byte) []byte {
	return func(body []byte) []byte {
		var answer map[string]any
		if err := json.Unmarshal(body, &answer); err != nil {
			t.Errorf("answer %s: %v", body, err)
			return body
		}
		edit(answer)
		out, _ := json.Marshal(answer)
		return out
	}
}

// claimedKeys is a claim answer's one_time_keys for a user's device.
func claimedKeys(answer map[string]any, userID id.UserID, deviceID id.DeviceID) map[string]any {
	users, _ := answer["one_time_keys"].(map[string]any)
	devices, _ := users[string(userID)].(map[string]any)
	keys, _ := devices[string(deviceID)].(map[string]any)
	return keys
}

// TestHostileClaimAnswers (security finding 10): a heal's /keys/claim answer, as a hostile federated
// server can shape it. mautrix-go v0.32.0 dereferences nil for a device it did not ask about,
// which killed the process. Now the answer is cut to what was asked, and whatever the rest, the
// process goes on, the asked device gets at most one session, and a heal that cannot be made
// fails for good (min_interval starts: the same device's next wedge is limited).
func TestHostileClaimAnswers(t *testing.T) {
	cases := []struct {
		name string
		edit func(t *testing.T, f *fixture, answer map[string]any)
		// null answers null instead (after edit).
		null bool
		// want is how the heal ends; panics, whether a recovered panic ended it.
		want   unwedge.Action
		panics bool
	}{{
		name: "an extra device of the same user",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) {
			answer["one_time_keys"].(map[string]any)[string(peerUser)].(map[string]any)["EVIL"] = claimedKeys(answer, peerUser, peerDevice)
		},
		want: unwedge.ActionHealed,
	}, {
		name: "another user's device",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) {
			answer["one_time_keys"].(map[string]any)["@mallory:evil.example"] = map[string]any{"EVIL": claimedKeys(answer, peerUser, peerDevice)}
		},
		want: unwedge.ActionHealed,
	}, {
		name: "only a device that was not asked",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) {
			devices := answer["one_time_keys"].(map[string]any)[string(peerUser)].(map[string]any)
			devices["EVIL"] = devices[string(peerDevice)]
			delete(devices, string(peerDevice))
		},
		want: unwedge.ActionFailed,
	}, {
		name: "two keys for the asked device",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) {
			keys := claimedKeys(answer, peerUser, peerDevice)
			for _, key := range keys {
				keys["signed_curve25519:AAAAAAzzz"] = key
			}
		},
		want: unwedge.ActionHealed,
	}, {
		name: "keys of the wrong shape",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) {
			answer["one_time_keys"] = map[string]any{string(peerUser): map[string]any{string(peerDevice): map[string]any{"signed_curve25519:X": "not an object", "curve25519:Y": nil}}, "@x:y": nil}
		},
		want: unwedge.ActionFailed,
	}, {
		name: "one_time_keys is no object",
		edit: func(_ *testing.T, f *fixture, answer map[string]any) { answer["one_time_keys"] = []any{1, "two"} },
		want: unwedge.ActionFailed,
	}, {
		// mautrix-go v0.32.0 reads a null answer as no answer and dereferences it (found by
		// FuzzKeyAnswers).
		name: "a null answer",
		edit: func(*testing.T, *fixture, map[string]any) {},
		null: true,
		want: unwedge.ActionFailed,
	}, {
		name: "an answer that makes the client panic",
		edit: func(*testing.T, *fixture, map[string]any) {
			panic("a bug that what the server sent reached")
		},
		want:   unwedge.ActionFailed,
		panics: true,
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.establish()
			h := f.hostile()
			edit := editJSON(t, func(answer map[string]any) { tc.edit(t, f, answer) })
			h.set("/keys/claim", func(answer []byte) []byte {
				if answer = edit(answer); tc.null {
					return []byte("null")
				}
				return answer
			})
			before := f.sessions(f.bridge, f.peerKey())

			f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
			d := f.decision()

			if d.Action != tc.want {
				t.Fatalf("heal after a hostile claim answer: %+v, want %s", d, tc.want)
			}
			if got := f.sessions(f.bridge, f.peerKey()) - before; got > 1 || (tc.want == unwedge.ActionHealed) != (got == 1) {
				t.Errorf("%d new sessions with the device, want %d", got, map[bool]int{true: 1}[tc.want == unwedge.ActionHealed])
			}
			if panics := f.unwedger.Panics()[unwedge.PanicEncryptDummies]; (panics > 0) != tc.panics {
				t.Errorf("%d panics recovered in the heal, want panics %v", panics, tc.panics)
			}
			if tc.panics && !errors.Is(d.Err, unwedge.ErrPanicked) {
				t.Errorf("the heal's error %v is not the recovered panic", d.Err)
			}
			heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 1)
			if err != nil || len(heals) != 1 {
				t.Fatalf("heals: %+v, %v", heals, err)
			}
			if want := map[bool]unwedge.HealOutcome{true: unwedge.HealHealed, false: unwedge.HealFailedPermanent}[tc.want == unwedge.ActionHealed]; heals[0].Outcome != want {
				t.Errorf("the ledger has the heal as %s, want %s", heals[0].Outcome, want)
			}
			// Healed or failed for good, the next wedge within the interval is limited.
			h.set("/keys/claim", nil)
			f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
			if d := f.decision(); d.Action != unwedge.ActionLimited {
				t.Errorf("the next wedge: %+v, want limited", d)
			}
		})
	}
}

// TestHostileQueryAnswer (security finding 10): a /keys/query answer that carries other users' devices
// (a hostile server answering for users on other servers) does not put them in the crypto store.
func TestHostileQueryAnswer(t *testing.T) {
	f := newFixture(t)
	h := f.hostile()
	mallory := f.newPeer("@mallory:example.org", "EVIL")
	h.set("/keys/query", editJSON(t, func(answer map[string]any) {
		users := answer["device_keys"].(map[string]any)
		mine := users[string(peerUser)].(map[string]any)[string(peerDevice)].(map[string]any)
		forged := map[string]any{}
		for k, v := range mine {
			forged[k] = v
		}
		forged["user_id"], forged["device_id"] = string(mallory.UserID), "FORGED"
		users[string(mallory.UserID)] = map[string]any{"FORGED": forged}
		answer["master_keys"] = map[string]any{string(mallory.UserID): map[string]any{"user_id": string(mallory.UserID)}}
	}))
	if _, err := f.bridge.Mach.FetchKeys(f.ctx, []id.UserID{peerUser}, true); err != nil {
		t.Fatal(err)
	}
	if devices, err := f.bridge.Mach.CryptoStore.GetDevices(f.ctx, mallory.UserID); err != nil || len(devices) != 0 {
		t.Errorf("a user the bridge did not ask about: %d devices stored (%v), want none", len(devices), err)
	}
	if dev, err := f.bridge.Mach.CryptoStore.GetDevice(f.ctx, peerUser, peerDevice); err != nil || dev == nil || dev.IdentityKey != f.peerKey() {
		t.Errorf("the asked device: %+v, %v", dev, err)
	}
	if n := f.unwedger.AnswersDropped()[unwedge.EndpointQuery]; n != 2 {
		t.Errorf("%d entries dropped from the query answer, want 2 (the device keys and the master key)", n)
	}
}

// forgeDevice re-uploads the device's keys with another device's identity key, signed with the
// device's own ed25519 key: mautrix-go accepts that, as any homeserver does.
func forgeDevice(t *testing.T, d *cryptotest.Device, key id.IdentityKey) {
	t.Helper()
	acc, err := d.Mach.CryptoStore.GetAccount(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	keys, err := cryptotest.SignedDeviceKeys(acc, id.Device{UserID: d.UserID, DeviceID: d.DeviceID}, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err = d.Client.UploadKeys(t.Context(), &mautrix.ReqUploadKeys{DeviceKeys: keys}); err != nil {
		t.Fatal(err)
	}
}

// TestHostileForgedIdentityKey (security finding 11): Mallory lists Alice's identity key as her device's
// and sends one garbage Olm message with Alice's key. The bridge must not make a session under
// Alice's key with Mallory's device (it would be Alice's newest, and she could not decrypt the
// bridge's messages), nor let Mallory's failure limit Alice's own heals.
func TestHostileForgedIdentityKey(t *testing.T) {
	f := newFixture(t)
	f.establish()
	mallory := f.newPeer("@mallory:example.org", "EVIL")
	forgeDevice(t, mallory, f.peerKey())
	// The devices of the test kit share one crypto_device table, where Mallory's machine put her
	// real device: the bridge fetches the forged one as it would from the homeserver.
	if _, err := f.bridge.Mach.FetchKeys(f.ctx, []id.UserID{mallory.UserID}, true); err != nil {
		t.Fatal(err)
	}
	if dev := f.bridge.Fetch(mallory.UserID, mallory.DeviceID); dev == nil || dev.IdentityKey != f.peerKey() {
		t.Fatalf("the bridge does not store the forged device: %+v", dev)
	}
	claims := f.hs.Claims()

	f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(mallory.UserID))
	if d := f.decision(); d.Action != unwedge.ActionKeyConflict || d.UserID != mallory.UserID || !strings.Contains(d.Detail, string(peerUser)) {
		t.Fatalf("Mallory's wedge with Alice's key: %+v, want key_conflict naming Alice's device", d)
	}
	if n := f.hs.Claims() - claims; n != 0 {
		t.Errorf("%d key claims for Mallory's forged device, want 0", n)
	}
	// The bridge's newest session under Alice's key, over which it writes to her, is one she has.
	latest, err := f.bridge.Mach.CryptoStore.GetLatestSession(f.ctx, f.peerKey())
	if err != nil || latest == nil {
		t.Fatalf("the bridge's latest session with Alice: %v, %v", latest, err)
	}
	hers, _ := f.peer.Mach.CryptoStore.GetSessions(f.ctx, f.bridgeKey())
	if !slices.ContainsFunc(hers, func(s *crypto.OlmSession) bool { return s.ID() == latest.ID() }) {
		t.Errorf("the bridge writes to Alice over session %s, which she does not have", latest.ID())
	}
	// Alice's own wedge is not limited by Mallory's: no heal of Mallory's counted for her.
	f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
	if d := f.decision(); d.Action == unwedge.ActionLimited || d.Action == unwedge.ActionHealed {
		t.Errorf("Alice's wedge while Mallory's forged device lists her key: %+v, want key_conflict (neither device is healed)", d)
	}

	// An admin who checked both devices can force the heal of Alice's.
	if d := f.unwedger.HealRequested(f.ctx, f.bridge.Fetch(peerUser, peerDevice), "@admin:example.org", true); d.Action != unwedge.ActionHealed {
		t.Errorf("Alice's forced heal: %+v, want healed", d)
	}

	// At startup, neither device with the key is picked: Alice's batch heal is refused too, and
	// another device in the same batch heals.
	bob := f.newPeer("@bob:example.org", "LAPTOP")
	bobDevice := f.bridge.Fetch(bob.UserID, bob.DeviceID)
	decisions := f.unwedger.HealBatch(f.ctx, []*id.Device{f.bridge.Fetch(peerUser, peerDevice), f.bridge.Fetch(mallory.UserID, mallory.DeviceID), bobDevice}, unwedge.ClassRolledBack)
	for i, want := range []unwedge.Action{unwedge.ActionKeyConflict, unwedge.ActionKeyConflict, unwedge.ActionHealed} {
		if decisions[i].Action != want {
			t.Errorf("batch decision %d: %+v, want %s", i, decisions[i], want)
		}
	}
}

// TestCappedWedgeLeftToStock (security finding 14): a wedge that unwedge does not heal because of its caps
// (a user's max_heals_per_user, the bridge's max_heals_per_minute) gets what the stock bridge
// would have done: mautrix-go's own unwedging, which opens a new session and sends m.dummy.
// Before, such wedges got nothing, and a user with sock puppets could keep everyone's there.
func TestCappedWedgeLeftToStock(t *testing.T) {
	f := newFixture(t)
	f.cfg.MaxHealsPerUser = 1
	f.establish()
	// Alice's second device had a session that the bridge lost.
	tablet := f.newPeer(peerUser, "TABLET")
	f.hs.Exchange(tablet, f.bridge)
	f.noDecision()
	f.exec("DELETE FROM crypto_olm_session WHERE account_id=$1 AND sender_key=$2", string(bridgeDevice), tablet.IdentityKey())
	f.restartBridge()

	f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
	if d := f.decision(); d.Action != unwedge.ActionHealed {
		t.Fatalf("the phone's wedge: %+v, want healed", d)
	}
	claims := f.hs.Claims()
	tablet.SendDummy(f.bridge)
	f.deliverToBridge()
	if d := f.decision(); d.Action != unwedge.ActionCapped || !strings.Contains(d.Detail, "mautrix-go") {
		t.Fatalf("the tablet's wedge: %+v, want capped and left to mautrix-go", d)
	}
	f.hs.AwaitInbox(tablet, 5*time.Second) // mautrix-go's unwedging runs in the background
	if n := f.hs.Claims() - claims; n != 1 {
		t.Errorf("%d key claims for the capped device, want 1 (mautrix-go's own unwedging)", n)
	}
	if got := f.hs.Inbox(tablet); len(got) != 1 {
		t.Errorf("the capped device got %d events, want mautrix-go's m.dummy", len(got))
	}
}

// TestNewSessionOutOfScope (security finding 15): a device that opens a new session while its user is out
// of scope is not remembered, so it takes no place among the devices that get the bridge's room
// keys again, and gets them once its user is in scope.
func TestNewSessionOutOfScope(t *testing.T) {
	f := newFixture(t)
	f.establish()
	reshared := make(chan id.DeviceID, 4)
	f.reshare = func(_ context.Context, device *id.Device) { reshared <- device.DeviceID }
	f.unwedger.Stop()
	f.startUnwedger()
	f.scope.allowed.Store(false)
	f.peerOpensNewSession()
	f.scope.allowed.Store(true)
	f.peerOpensNewSession()
	select {
	case dev := <-reshared:
		if dev != peerDevice {
			t.Errorf("room keys again for %s, want %s", dev, peerDevice)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the device got no room keys again once its user was in scope: its new session was remembered while out of scope")
	}
	if len(reshared) != 0 {
		t.Errorf("room keys again %d more times", len(reshared))
	}
}

// TestClaimServerFailure: a /keys/claim answer whose failures name the device's server (the
// homeserver could not reach it: a federated server briefly down) gave no key through no fault of
// the device. The heal is tried again with backoff; when the server answers by the last attempt
// it heals, and when it never does the heal ends failed_transient, so min_interval does not start
// and the device's next wedge heals. A device with no key and no failure still fails for good.
func TestClaimServerFailure(t *testing.T) {
	cases := []struct {
		name string
		// failing is how many claim answers (from the first) lose the device's key.
		failing int
		// failure names the device's server in those answers' failures.
		failure bool
		want    unwedge.Action
		outcome unwedge.HealOutcome
		// nextLimited: the device's next wedge within min_interval is limited.
		nextLimited bool
	}{
		{"the server answers at the second attempt", 1, true, unwedge.ActionHealed, unwedge.HealHealed, true},
		{"the server never answers", 1000, true, unwedge.ActionFailed, unwedge.HealFailedTransient, false},
		{"no key and no failure", 1000, false, unwedge.ActionFailed, unwedge.HealFailedPermanent, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.establish()
			h := f.hostile()
			answers := 0
			h.set("/keys/claim", editJSON(t, func(answer map[string]any) {
				if answers++; answers > tc.failing {
					return
				}
				delete(answer["one_time_keys"].(map[string]any), string(peerUser))
				if tc.failure {
					answer["failures"] = map[string]any{peerUser.Homeserver(): map[string]any{"status": 503, "message": "Not ready for retry"}}
				}
			}))
			f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
			d := f.decision()
			if d.Action != tc.want {
				t.Fatalf("heal: %+v, want %s", d, tc.want)
			}
			heals, err := f.ledger.Heals(f.ctx, peerUser, peerDevice, 1)
			if err != nil || len(heals) != 1 {
				t.Fatalf("heals: %+v, %v", heals, err)
			}
			wantAttempts := min(tc.failing+1, f.cfg.MaxRetries)
			if !tc.failure {
				wantAttempts = 1
			}
			if heals[0].Outcome != tc.outcome || heals[0].Attempts != wantAttempts {
				t.Errorf("the ledger has the heal as %s after %d attempts, want %s after %d", heals[0].Outcome, heals[0].Attempts, tc.outcome, wantAttempts)
			}
			h.set("/keys/claim", nil)
			f.unwedger.HandleToDevice(f.ctx, f.garbageFrom(peerUser))
			if d := f.decision(); (d.Action == unwedge.ActionLimited) != tc.nextLimited {
				t.Errorf("the next wedge: %+v, want limited: %v", d, tc.nextLimited)
			}
		})
	}
}
