// Package e2e runs the reference bridge as a process against the local Synapse and Postgres
// (scripts/stack.sh) with a real end-to-end-encrypted client.
//
// Each test has its own bridge process (or, with startShared, its own user and login on one
// bridge), database, slot and users, so the tests run in parallel: most of their time is spent
// waiting for the bridge's timers. The exceptions are the fault tests that stop the homeserver or
// Postgres (testenv.RequireFaults): they are not parallel, so Go runs them before the others,
// with nothing else of this package running, and scripts/test.sh runs them while no other
// package uses the stack.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/bridgev2/networkid"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/fault"
	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
	"github.com/unwedge/unwedge/webhook/store"
)

// bridgeBuild is a bridge binary, built once per test process.
type bridgeBuild struct {
	tags []string // beside goolm
	once sync.Once
	dir  string
	bin  string
	err  error
}

var (
	// product is the bridge as build.sh builds it: without fault points.
	product = &bridgeBuild{}
	// faulty is the bridge with fault points (build tag fault.Tag), which the fault tests arm
	// with inject.EnvVar.
	faulty = &bridgeBuild{tags: []string{fault.Tag}}
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.stop != nil {
		shared.stop()
	}
	for _, b := range []*bridgeBuild{product, faulty} {
		if b.dir != "" {
			_ = os.RemoveAll(b.dir)
		}
	}
	os.Exit(code)
}

// binary builds the product bridge once per test process.
func binary(t *testing.T) string { return product.get(t) }

func (b *bridgeBuild) get(t *testing.T) string {
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "unwedge-e2e-")
		if b.err == nil {
			b.bin, b.err = harness.BuildBridge(context.Background(), b.dir, b.tags...)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.bin
}

type setup struct {
	env    *testenv.Env
	slot   *harness.Slot
	bridge *harness.Bridge
	user   *testclient.Client
	remote *webhook.RemoteClient
}

// start runs the product bridge on a free slot and logs a fresh E2EE user in to it.
func start(t *testing.T, ctx context.Context, appservice bool, dbType, webhookURL string, config ...map[string]any) *setup {
	t.Helper()
	return startBuild(t, ctx, product, appservice, dbType, webhookURL, config...)
}

// startBuild is start with the given build of the bridge.
func startBuild(t *testing.T, ctx context.Context, build *bridgeBuild, appservice bool, dbType, webhookURL string, config ...map[string]any) *setup {
	t.Helper()
	env := testenv.Require(t)
	s, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	opts := harness.BridgeOptions{
		Binary: build.get(t), Dir: t.TempDir(), HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: s, DatabaseType: dbType, AppserviceEncryption: appservice,
	}
	if len(config) > 0 {
		opts.Config = config[0]
	}
	if dbType == "postgres" {
		opts.DatabaseURI = env.NewDatabase(t)
	}
	br, err := harness.StartBridge(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	stopOnCleanup(t, br)
	user, remote := newLogin(t, ctx, env, br, webhookURL, testclient.RulesMautrix)
	return &setup{env: env, slot: s, bridge: br, user: user, remote: remote}
}

// newLogin starts a fresh E2EE user whose client follows rules, and logs it in to the bridge.
func newLogin(t *testing.T, ctx context.Context, env *testenv.Env, br *harness.Bridge, webhookURL string, rules testclient.Rules) (*testclient.Client, *webhook.RemoteClient) {
	t.Helper()
	user, err := testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL,
		Username:      testenv.UniqueName("alice"),
		Password:      "correct horse battery",
		DataDir:       t.TempDir(),
		Log:           zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
		Rules:         rules,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = user.Close() })
	remote, err := br.Login(ctx, user.UserID(), testenv.UniqueName("acct"), webhookURL)
	if err != nil {
		t.Fatal(err)
	}
	return user, remote
}

// shared is one product bridge (to-device events over /sync, Postgres, the default config) for
// the tests that need nothing else of their bridge, each with a user and a login of its own, as
// the users of a real bridge are. It starts with the first test that asks for it and stops when
// the test process ends (TestMain).
var shared struct {
	once   sync.Once
	bridge *harness.Bridge
	slot   *harness.Slot
	stop   func()
	err    error
}

// startShared logs a fresh E2EE user in to the shared bridge, whose notifications go to
// webhookURL (which may be empty).
func startShared(t *testing.T, ctx context.Context, webhookURL string) *setup {
	t.Helper()
	env := testenv.Require(t)
	bin := binary(t)
	shared.once.Do(func() { shared.err = startSharedBridge(env, bin) })
	if shared.err != nil {
		t.Fatalf("shared bridge: %v", shared.err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("shared bridge log tail:\n%s", shared.bridge.LogTail(60))
			keepLog(t, shared.bridge.LogPath)
		}
	})
	s := &setup{env: env, slot: shared.slot, bridge: shared.bridge}
	s.user, s.remote = newLogin(t, ctx, env, shared.bridge, webhookURL, testclient.RulesMautrix)
	return s
}

// startSharedBridge starts the shared bridge on a slot and a database of its own, and sets
// shared.stop, which stops it and gives both back.
func startSharedBridge(env *testenv.Env, bin string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var undo []func()
	shared.stop = func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		return err
	}
	undo = append(undo, release)
	dbName := testenv.UniqueName("unwedge_test")
	uri, err := env.CreateDatabase(ctx, dbName)
	if err != nil {
		return err
	}
	undo = append(undo, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := env.DropDatabase(ctx, dbName); err != nil {
			fmt.Fprintf(os.Stderr, "shared bridge: %v\n", err)
		}
	})
	dir, err := os.MkdirTemp("", "unwedge-e2e-shared-")
	if err != nil {
		return err
	}
	undo = append(undo, func() { _ = os.RemoveAll(dir) })
	br, err := harness.StartBridge(ctx, harness.BridgeOptions{
		Binary: bin, Dir: dir, HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: slot, DatabaseType: "postgres", DatabaseURI: uri,
	})
	if err != nil {
		return err
	}
	undo = append(undo, func() {
		if err := br.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "shared bridge: %v\n", err)
		}
	})
	shared.bridge, shared.slot = br, slot
	return nil
}

// openPortal creates a chat on the remote side and waits until the user has joined its room.
func (s *setup) openPortal(t *testing.T, ctx context.Context, chatID string) id.RoomID {
	t.Helper()
	chat, err := s.remote.CreateChat(ctx, chatID, "Chat "+chatID)
	if err != nil {
		t.Fatal(err)
	}
	if !chat.Created || chat.RoomID == "" {
		t.Fatalf("chat not created: %+v", chat)
	}
	if err = s.user.WaitForJoin(ctx, chat.RoomID); err != nil {
		t.Fatal(err)
	}
	return chat.RoomID
}

// waitOutbox polls the outbox until a message with the text is there.
func (s *setup) waitOutbox(t *testing.T, ctx context.Context, text string, done func(*store.OutboxMessage) bool) *store.OutboxMessage {
	t.Helper()
	for {
		resp, err := s.remote.Outbox(ctx, 0, 500)
		if err != nil {
			t.Fatal(err)
		}
		for _, msg := range resp.Messages {
			if msg.Body == text && (done == nil || done(msg)) {
				return msg
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("message %q not in outbox: %+v", text, resp.Messages)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func TestEncryptedRoundTrip(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name       string
		appservice bool
		db         string
	}{
		{"sync/postgres", false, "postgres"},
		{"appservice/postgres", true, "postgres"},
		{"sync/sqlite", false, "sqlite3-fk-wal"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			var s *setup
			if !tc.appservice && tc.db == "postgres" {
				s = startShared(t, ctx, "") // the shared bridge is this case's
			} else {
				s = start(t, ctx, tc.appservice, tc.db, "")
			}
			room := s.openPortal(t, ctx, "general")

			// webhook -> Matrix: the ghost's message arrives encrypted and decrypts at the client.
			const inbound = "hello from the webhook side"
			if _, err := s.remote.PostMessage(ctx, &webhook.PostMessageRequest{
				ChatID: "general", Sender: "bob", SenderName: "Bob", Text: inbound,
			}); err != nil {
				t.Fatal(err)
			}
			evt, err := s.user.WaitForMessage(ctx, room, bodyIs(inbound))
			if err != nil {
				t.Fatal(err)
			}
			if !evt.Mautrix.WasEncrypted {
				t.Error("webhook message reached the client unencrypted")
			}
			// Each login has its own ghosts: the login's "bob".
			who, err := s.remote.Whoami(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ghost := id.EncodeUserLocalpart(string(webhook.GhostID(networkid.UserLoginID(who.LoginID), "bob")))
			if want := id.NewUserID(strings.ReplaceAll(s.slot.UsernameTemplate, "{{.}}", ghost), s.env.Domain); evt.Sender != want {
				t.Errorf("sender = %s, want ghost %s", evt.Sender, want)
			}

			// Matrix -> webhook: the client's encrypted message is decrypted by the bridge and lands in the outbox.
			const outbound = "hello from matrix"
			evtID, err := s.user.SendText(ctx, room, outbound)
			if err != nil {
				t.Fatal(err)
			}
			msg := s.waitOutbox(t, ctx, outbound, nil)
			if msg.EventID != evtID.String() || msg.SenderMXID != s.user.UserID().String() || msg.Status != store.OutboxStored {
				t.Errorf("outbox message = %+v, want event %s from %s, stored", msg, evtID, s.user.UserID())
			}
		})
	}
}

func bodyIs(text string) func(*event.Event) bool {
	return func(evt *event.Event) bool {
		return evt.Content.AsMessage().Body == text
	}
}

// keepLog copies a failed test's bridge log out of its temporary directory, which the test
// removes, and says where.
func keepLog(t *testing.T, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Logf("bridge log not kept: %v", err)
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	kept := filepath.Join(os.TempDir(), fmt.Sprintf("unwedge-%s-%d-bridge.log", name, time.Now().Unix()))
	if err = os.WriteFile(kept, data, 0o600); err != nil {
		t.Logf("bridge log not kept: %v", err)
		return
	}
	t.Logf("whole bridge log: %s", kept)
}
