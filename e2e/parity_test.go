package e2e

import (
	"context"
	"crypto/ed25519"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/crypto/ssss"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
)

// Parity with mautrix-go's stock encryption helper (bridgev2/matrix/crypto.go): what it does for
// encryption.self_sign and for key requests, unwedge's helper must do too.

const testPassword = "correct horse battery" // every test user's, as in start

// TestSelfSign: with encryption.self_sign the bridge cross-signs its bot device as the stock
// helper's doSelfSign does. Another user's /keys/query shows the bot's master key, a
// self-signing key signed by it, and the bot's current device signed by that. bridgev2's
// kv_store holds the recovery key, which unlocks the bot's secret storage, where the private
// half of that master key is kept. After a restart the bridge starts again on the stored key,
// with the same keys, and its device is still cross-signed. (A helper that ignores self_sign
// leaves the bot without cross-signing keys and kv_store without a recovery key.)
func TestSelfSign(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	env := testenv.Require(t)
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	observer := newTestClient(t, ctx, env, testenv.UniqueName("observer"))
	br, err := harness.NewBridge(harness.BridgeOptions{
		Binary: binary(t), Dir: t.TempDir(), HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: slot, DatabaseType: "postgres", DatabaseURI: env.NewDatabase(t),
		Config: map[string]any{"encryption.self_sign": true},
	})
	if err != nil {
		t.Fatal(err)
	}
	stopOnCleanup(t, br)
	if _, err = br.ClearBotDevices(ctx); err != nil {
		t.Fatal(err)
	}
	db := openBridgeDB(t, br)

	if earlier := queryCrossSigning(t, ctx, observer, br.BotMXID); earlier.master != "" {
		// A self-signing bridge ran on this slot before, and its keys are still on the
		// homeserver: a bridge with an empty database then refuses to start (stock doSelfSign)
		// until recovery_key in kv_store says "overwrite". An admin would set it after a start
		// without self_sign created the database; so does the test.
		t.Logf("bot %s already has master key %s: starting once without self_sign to set recovery_key=overwrite", br.BotMXID, earlier.master)
		if err = br.SetConfig(map[string]any{"encryption.self_sign": false}); err != nil {
			t.Fatal(err)
		}
		if err = br.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err = br.Stop(); err != nil {
			t.Fatal(err)
		}
		// kv_store is keyed by the bridge's ID, which is also the ID of its crypto account.
		if _, err = db.ExecContext(ctx, `INSERT INTO kv_store (bridge_id, key, value)
			SELECT account_id, 'recovery_key', 'overwrite' FROM crypto_account
			ON CONFLICT (bridge_id, key) DO UPDATE SET value = excluded.value`); err != nil {
			t.Fatal(err)
		}
		if err = br.SetConfig(map[string]any{"encryption.self_sign": true}); err != nil {
			t.Fatal(err)
		}
	}
	if err = br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	device := botDeviceID(t, ctx, db)
	first := checkCrossSigned(t, ctx, observer, br.BotMXID, device)
	recoveryKey := storedRecoveryKey(t, ctx, db)
	checkRecoveryKey(t, ctx, br, recoveryKey, first.master)

	if err = br.Stop(); err != nil {
		t.Fatal(err)
	}
	if err = br.Start(ctx); err != nil {
		t.Fatalf("bridge did not start again with its stored recovery key: %v", err)
	}
	if again := botDeviceID(t, ctx, db); again != device {
		t.Errorf("bot device after restart = %s, want %s", again, device)
	}
	second := checkCrossSigned(t, ctx, observer, br.BotMXID, device)
	if second != first {
		t.Errorf("cross-signing keys after restart = %+v, want the same as before %+v", second, first)
	}
	if key := storedRecoveryKey(t, ctx, db); key != recoveryKey {
		t.Error("recovery key in kv_store changed across the restart")
	}
}

// TestKeyShareRules: the bridge answers m.room_key_request as the stock helper's allowKeyShare
// does (key sharing on; blacklisted devices refused; trust at least verification_levels.share;
// portal rooms only; the requesting user known to the bridge and a bridge admin), plus one
// exception: a device may have one of the bridge's own Megolm sessions again if the bridge
// shared it with that device and the device's user is still in the room.
//
// One bridge serves every case. Its share level is "unverified", which the clients' devices
// (not cross-signed) reach, so that trust never decides: every refusal below is for who asks,
// not for how well the device is verified. The earlier helper answered every device of every
// user logged in to the bridge for every portal room, whatever its permission level, so it
// sent the key in each refusal case but the blacklisted one (see each case's comment).
//
// The requester first forgets the session (it is deleted from its crypto store, as a lost key
// would be) and then asks the bridge's device for it; the case ends when the key is back in the
// store or the bridge's m.room_key.withheld is. A refusal may also be silent, so a case that
// expects one waits at most refusalWait for the key.
func TestKeyShareRules(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	env := testenv.Require(t)
	admin := id.NewUserID(testenv.UniqueName("admin"), env.Domain)
	s := start(t, ctx, false, "postgres", "", map[string]any{
		"encryption.allow_key_sharing":         true,
		"encryption.verification_levels.share": "unverified",
		// As the harness writes them (everyone on the homeserver a user), plus one admin.
		"bridge.permissions": map[string]string{"*": "relay", env.Domain: "user", admin.String(): "admin"},
	})
	db := openBridgeDB(t, s.bridge)
	bot := botDevice{user: s.bridge.BotMXID, device: botDeviceID(t, ctx, db)}

	// alice (s.user, not an admin) has a portal, and a message the bridge sent into it.
	aliceKey := s.bridgedKey(t, ctx, s.user, s.remote, "parity", "for alice's devices only")

	// dave, not an admin either, has his own portal with a message from the bridge, and leaves.
	dave := newTestClient(t, ctx, s.env, testenv.UniqueName("dave"))
	daveRemote := s.login(t, ctx, dave)
	daveKey := s.bridgedKey(t, ctx, dave, daveRemote, "dave", "for dave while he is in the room")
	if _, err := dave.Mautrix().LeaveRoom(ctx, daveKey.room); err != nil {
		t.Fatal(err)
	}
	waitMembership(t, ctx, db, daveKey.room, dave.UserID(), event.MembershipLeave)

	cases := []struct {
		name string
		// requester logs in (or picks) the device that asks.
		requester func(t *testing.T) *testclient.Client
		key       func() roomKey
		// refusal is the stock helper's withheld code; "" if the key must arrive.
		refusal event.RoomKeyWithheldCode
	}{{
		// bob is logged in to the bridge but not an admin, and not in alice's room: stock refuses
		// non-admins. The old helper answered (bob is a user of the bridge, the room a portal).
		name: "user outside the room",
		requester: func(t *testing.T) *testclient.Client {
			bob := newTestClient(t, ctx, s.env, testenv.UniqueName("bob"))
			s.login(t, ctx, bob)
			return bob
		},
		key:     func() roomKey { return aliceKey },
		refusal: event.RoomKeyWithheldUnauthorized,
	}, {
		// alice's second device logs in after the bridge shared the session with her first: the
		// bridge never shared it with this device, so only stock rules apply, and alice is not
		// an admin. The old helper answered (alice is a user of the bridge, the room a portal).
		name: "new device of a room member",
		requester: func(t *testing.T) *testclient.Client {
			return newTestClient(t, ctx, s.env, s.user.UserID().Localpart())
		},
		key:     func() roomKey { return aliceKey },
		refusal: event.RoomKeyWithheldUnauthorized,
	}, {
		// The bridge shared the session with dave's device, but dave left the room: the exception
		// does not hold any more, and dave is not an admin. The old helper answered (dave is still
		// a user of the bridge, and the portal stays when a user leaves).
		name: "device of a user who left the room",
		requester: func(t *testing.T) *testclient.Client {
			return dave
		},
		key:     func() roomKey { return daveKey },
		refusal: event.RoomKeyWithheldUnauthorized,
	}, {
		// alice's first device had the session from the bridge, but the bridge's crypto store
		// now has the device blacklisted: neither stock nor the exception answers a blacklisted
		// device. The old helper refused it too (it checked the blacklist first): this case
		// guards the exception, which must not override the blacklist.
		name: "blacklisted device that had the session",
		requester: func(t *testing.T) *testclient.Client {
			setTrust(t, ctx, db, s.user.UserID(), s.user.DeviceID(), id.TrustStateBlacklisted)
			return s.user
		},
		key:     func() roomKey { return aliceKey },
		refusal: event.RoomKeyWithheldBlacklisted,
	}, {
		// The exception: alice's first device had the bridge's own session and alice is still in
		// the room, so the device gets the key again although alice is no admin.
		name: "device that had the session",
		requester: func(t *testing.T) *testclient.Client {
			return s.user
		},
		key: func() roomKey { return aliceKey },
	}, {
		// Stock answers bridge admins for any portal room: the admin is in none of them.
		name: "bridge admin outside the room",
		requester: func(t *testing.T) *testclient.Client {
			c := newTestClient(t, ctx, s.env, admin.Localpart())
			s.login(t, ctx, c)
			return c
		},
		key: func() roomKey { return aliceKey },
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requester, key := tc.requester(t), tc.key()
			started := time.Now()
			got := bot.request(t, ctx, requester, key, tc.refusal != "")
			t.Logf("%s (%s) asked for %s: %s after %s", requester.UserID(), requester.DeviceID(), key.session, got,
				time.Since(started).Round(time.Millisecond))
			switch {
			case tc.refusal == "" && !got.received:
				t.Errorf("key not received: %s", got)
			case tc.refusal != "" && got.received:
				t.Errorf("key received, want it refused (%s)", tc.refusal)
			case tc.refusal != "" && got.withheld != nil && got.withheld.Code != tc.refusal:
				t.Errorf("withheld with %s (%q), want %s", got.withheld.Code, got.withheld.Reason, tc.refusal)
			}
		})
	}
}

// roomKey is one of the bridge's Megolm sessions.
type roomKey struct {
	room    id.RoomID
	session id.SessionID
	sender  id.SenderKey // the bridge's identity key
}

// bridgedKey opens a portal for the user and has the bridge send a message into it, and returns
// the Megolm session the user's device decrypted it with.
func (s *setup) bridgedKey(t *testing.T, ctx context.Context, user *testclient.Client, remote *webhook.RemoteClient, chatID, text string) roomKey {
	t.Helper()
	chat, err := remote.CreateChat(ctx, chatID, "Chat "+chatID)
	if err != nil {
		t.Fatal(err)
	} else if err = user.WaitForJoin(ctx, chat.RoomID); err != nil {
		t.Fatal(err)
	}
	if _, err = remote.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: chatID, Sender: "ghost", SenderName: "Ghost", Text: text}); err != nil {
		t.Fatal(err)
	}
	evt, err := user.WaitForMessage(ctx, chat.RoomID, bodyIs(text))
	if err != nil {
		t.Fatal(err)
	}
	key := roomKey{room: chat.RoomID, session: user.MegolmSessionID(evt.ID)}
	igs, err := user.Machine().CryptoStore.GetGroupSession(ctx, key.room, key.session)
	if err != nil || igs == nil {
		t.Fatalf("session %s of the bridged message not in %s's store: %v", key.session, user.UserID(), err)
	}
	key.sender = igs.SenderKey
	return key
}

// login logs the client's user in to the bridge.
func (s *setup) login(t *testing.T, ctx context.Context, user *testclient.Client) *webhook.RemoteClient {
	t.Helper()
	remote, err := s.bridge.Login(ctx, user.UserID(), testenv.UniqueName("acct"), "")
	if err != nil {
		t.Fatal(err)
	}
	return remote
}

// botDevice is the bridge bot's device, which key requests go to.
type botDevice struct {
	user   id.UserID
	device id.DeviceID
}

// keyAnswer is what came of a key request.
type keyAnswer struct {
	received bool
	withheld *event.RoomKeyWithheldEventContent
}

func (a keyAnswer) String() string {
	switch {
	case a.received:
		return "key received"
	case a.withheld != nil:
		return "withheld " + string(a.withheld.Code) + " (" + a.withheld.Reason + ")"
	default:
		return "no answer"
	}
}

const (
	// answerWait bounds the wait for a key the bridge must send.
	answerWait = 30 * time.Second
	// refusalWait bounds the wait for a key the bridge must not send, when it says nothing.
	refusalWait = 15 * time.Second
)

// request makes the requester forget the session and ask the bot's device for it, and waits for
// the key or, if a refusal is expected, a withheld notice (at most refusalWait if a refusal is
// expected, else answerWait; then the answer holds the last withheld notice seen, if any).
func (b botDevice) request(t *testing.T, ctx context.Context, requester *testclient.Client, key roomKey, expectRefusal bool) keyAnswer {
	t.Helper()
	mach := requester.Machine()
	// The session itself, or a withheld notice stored in its place by an earlier request.
	if err := requester.ForgetRoomKey(ctx, key.room, key.session); err != nil {
		t.Fatal(err)
	}
	wait := answerWait
	if expectRefusal {
		wait = refusalWait
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := mach.SendRoomKeyRequest(ctx, key.room, key.sender, key.session, "", map[id.UserID][]id.DeviceID{b.user: {b.device}})
	if err != nil {
		t.Fatal(err)
	}
	var withheld *event.RoomKeyWithheldEventContent
	for {
		igs, err := mach.CryptoStore.GetGroupSession(ctx, key.room, key.session)
		var notice *event.RoomKeyWithheldEventContent
		switch {
		case igs != nil:
			return keyAnswer{received: true}
		case errors.As(err, &notice) && expectRefusal:
			return keyAnswer{withheld: notice}
		case errors.As(err, &notice):
			// When the key must come, a withheld notice does not end the wait: the bridge sends
			// each refusal twice (m.room_key.withheld, then org.matrix.room_key.withheld), and the
			// second of an earlier case's refusal of the same session to the same device can be
			// stored after this case deleted the first. The key replaces it when it comes.
			withheld = notice
		case err != nil && ctx.Err() == nil:
			t.Fatal(err)
		}
		select {
		case <-ctx.Done():
			return keyAnswer{withheld: withheld}
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// newTestClient logs a user in as a new E2EE device (registering the user first if needed).
func newTestClient(t *testing.T, ctx context.Context, env *testenv.Env, username string) *testclient.Client {
	t.Helper()
	c, err := testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL,
		Username:      username,
		Password:      testPassword,
		DataDir:       t.TempDir(),
		Log:           zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// stopOnCleanup stops the bridge when the test ends, and keeps its log if the test failed.
func stopOnCleanup(t *testing.T, br *harness.Bridge) {
	t.Cleanup(func() {
		if err := br.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("bridge log tail:\n%s", br.LogTail(60))
			keepLog(t, br.LogPath)
		}
	})
}

// openBridgeDB opens the bridge's Postgres database.
func openBridgeDB(t *testing.T, br *harness.Bridge) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", br.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

// botDeviceID is the bot device the bridge's crypto store is for.
func botDeviceID(t *testing.T, ctx context.Context, db *sql.DB) id.DeviceID {
	t.Helper()
	var device id.DeviceID
	if err := db.QueryRowContext(ctx, "SELECT device_id FROM crypto_account").Scan(&device); err != nil {
		t.Fatalf("no bot device in the bridge's crypto store: %v", err)
	}
	return device
}

// setTrust sets a device's trust in the bridge's crypto store, as an admin does to blacklist or
// verify one (crypto_device.trust), and puts the old value back when the test ends.
func setTrust(t *testing.T, ctx context.Context, db *sql.DB, user id.UserID, device id.DeviceID, trust id.TrustState) {
	t.Helper()
	var old id.TrustState
	err := db.QueryRowContext(ctx, "SELECT trust FROM crypto_device WHERE user_id=$1 AND device_id=$2", user, device).Scan(&old)
	if err != nil {
		t.Fatalf("device %s of %s not in the bridge's crypto store: %v", device, user, err)
	} else if _, err = db.ExecContext(ctx, "UPDATE crypto_device SET trust=$3 WHERE user_id=$1 AND device_id=$2", user, device, trust); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := db.ExecContext(ctx, "UPDATE crypto_device SET trust=$3 WHERE user_id=$1 AND device_id=$2", user, device, old); err != nil {
			t.Errorf("failed to restore the trust of %s: %v", device, err)
		}
	})
}

// waitMembership waits until the bridge's state store has the user's membership in the room.
func waitMembership(t *testing.T, ctx context.Context, db *sql.DB, room id.RoomID, user id.UserID, want event.Membership) {
	t.Helper()
	for {
		var got event.Membership
		err := db.QueryRowContext(ctx, "SELECT membership FROM mx_user_profile WHERE room_id=$1 AND user_id=$2", room, user).Scan(&got)
		if err == nil && got == want {
			return
		} else if err != nil && !errors.Is(err, sql.ErrNoRows) {
			t.Fatal(err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("bridge never saw %s's membership in %s become %s (last %q)", user, room, want, got)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// storedRecoveryKey is bridgev2's recovery_key in kv_store.
func storedRecoveryKey(t *testing.T, ctx context.Context, db *sql.DB) string {
	t.Helper()
	var key string
	err := db.QueryRowContext(ctx, "SELECT value FROM kv_store WHERE key='recovery_key'").Scan(&key)
	if err != nil {
		t.Fatalf("no recovery_key in kv_store: %v", err)
	} else if key == "" || key == "overwrite" {
		t.Fatalf("recovery_key in kv_store is %q", key)
	}
	return key
}

// crossSigning is a user's cross-signing keys as another user sees them.
type crossSigning struct {
	master, selfSigning id.Ed25519
}

// rawKeysQuery is the /keys/query response, each key object kept as sent for verifying its
// signatures.
type rawKeysQuery struct {
	DeviceKeys      map[id.UserID]map[id.DeviceID]json.RawMessage `json:"device_keys"`
	MasterKeys      map[id.UserID]json.RawMessage                 `json:"master_keys"`
	SelfSigningKeys map[id.UserID]json.RawMessage                 `json:"self_signing_keys"`
}

func queryKeys(t *testing.T, ctx context.Context, c *testclient.Client, user id.UserID) *rawKeysQuery {
	t.Helper()
	cli := c.Mautrix()
	var resp rawKeysQuery
	req := &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{user: {}}}
	if _, err := cli.MakeRequest(ctx, http.MethodPost, cli.BuildClientURL("v3", "keys", "query"), req, &resp); err != nil {
		t.Fatalf("failed to query the keys of %s: %v", user, err)
	}
	return &resp
}

// queryCrossSigning returns the user's master and self-signing keys (empty if there are none).
func queryCrossSigning(t *testing.T, ctx context.Context, c *testclient.Client, user id.UserID) crossSigning {
	t.Helper()
	return queryKeys(t, ctx, c, user).crossSigning(t, user)
}

func (resp *rawKeysQuery) crossSigning(t *testing.T, user id.UserID) crossSigning {
	t.Helper()
	return crossSigning{
		master:      crossSigningKey(t, resp.MasterKeys[user], id.XSUsageMaster),
		selfSigning: crossSigningKey(t, resp.SelfSigningKeys[user], id.XSUsageSelfSigning),
	}
}

func crossSigningKey(t *testing.T, raw json.RawMessage, usage id.CrossSigningUsage) id.Ed25519 {
	t.Helper()
	if raw == nil {
		return ""
	}
	var keys mautrix.CrossSigningKeys
	if err := json.Unmarshal(raw, &keys); err != nil {
		t.Fatalf("invalid %s key: %v", usage, err)
	} else if len(keys.Keys) != 1 || !slices.Contains(keys.Usage, usage) {
		t.Fatalf("%s key = %s", usage, raw)
	}
	return keys.FirstKey()
}

// checkCrossSigned checks, as another user, that the user's device is cross-signed: a master
// key, a self-signing key signed by the master key, and the device's keys signed by the
// self-signing key.
func checkCrossSigned(t *testing.T, ctx context.Context, c *testclient.Client, user id.UserID, device id.DeviceID) crossSigning {
	t.Helper()
	resp := queryKeys(t, ctx, c, user)
	keys := resp.crossSigning(t, user)
	if keys.master == "" || keys.selfSigning == "" {
		t.Fatalf("%s has no cross-signing keys (master %q, self-signing %q)", user, keys.master, keys.selfSigning)
	}
	verify := func(what string, raw json.RawMessage, key id.Ed25519) {
		t.Helper()
		if ok, err := signatures.VerifySignatureJSON(raw, user, key.String(), key); !ok {
			t.Errorf("%s not signed by %s: %v\n%s", what, key, err, raw)
		}
	}
	verify("self-signing key", resp.SelfSigningKeys[user], keys.master)
	deviceKeys, ok := resp.DeviceKeys[user][device]
	if !ok {
		t.Fatalf("device %s of %s not on the homeserver", device, user)
	}
	verify("device "+device.String(), deviceKeys, keys.selfSigning)
	return keys
}

// checkRecoveryKey checks that the recovery key unlocks the bot's default secret storage key,
// and that the master key kept there is the one on the homeserver.
func checkRecoveryKey(t *testing.T, ctx context.Context, br *harness.Bridge, recoveryKey string, master id.Ed25519) {
	t.Helper()
	cli, err := mautrix.NewClient(br.Opts.HomeserverURL, br.BotMXID, br.Opts.Slot.ASToken)
	if err != nil {
		t.Fatal(err)
	}
	cli.SetAppServiceUserID = true
	storage := ssss.NewSSSSMachine(cli)
	keyID, keyData, err := storage.GetDefaultKeyData(ctx)
	if err != nil {
		t.Fatalf("bot has no default secret storage key: %v", err)
	}
	key, err := keyData.VerifyRecoveryKey(keyID, recoveryKey)
	if err != nil {
		t.Fatalf("stored recovery key does not unlock secret storage key %s: %v", keyID, err)
	}
	seed, err := storage.GetDecryptedAccountData(ctx, event.AccountDataCrossSigningMaster, key)
	if err != nil {
		t.Fatalf("master key not in secret storage: %v", err)
	} else if len(seed) != ed25519.SeedSize {
		t.Fatalf("master key seed in secret storage has %d bytes", len(seed))
	}
	public := ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	if got := id.Ed25519(base64.RawStdEncoding.EncodeToString(public)); got != master {
		t.Errorf("master key in secret storage is %s, homeserver has %s", got, master)
	}
}
