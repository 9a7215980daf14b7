package testclient_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
)

// testLog collects a test's logs and prints them only if the test failed. Unlike
// zerolog.NewTestWriter it is safe to write to after the test has finished.
func testLog(t *testing.T) zerolog.Logger {
	var mu sync.Mutex
	var buf bytes.Buffer
	t.Cleanup(func() {
		if t.Failed() {
			mu.Lock()
			defer mu.Unlock()
			t.Logf("client logs:\n%s", buf.String())
		}
	})
	level := zerolog.DebugLevel
	if lvl, err := zerolog.ParseLevel(os.Getenv("TESTCLIENT_LOG_LEVEL")); err == nil && lvl != zerolog.NoLevel {
		level = lvl
	}
	w := zerolog.ConsoleWriter{Out: writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), NoColor: true, TimeFormat: "15:04:05.000"}
	return zerolog.New(w).Level(level).With().Timestamp().Logger()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// newClient logs a fresh user in with its own data directory.
func newClient(t *testing.T, ctx context.Context, env *testenv.Env, name string, log zerolog.Logger) *testclient.Client {
	t.Helper()
	return startClient(t, ctx, name, testclient.Options{
		HomeserverURL: env.HomeserverURL,
		Username:      testenv.UniqueName(name),
		Password:      "correct horse battery",
		DataDir:       t.TempDir(),
		Log:           log.With().Str("client", name).Logger(),
	})
}

// startClient starts a client that is closed when the test ends.
func startClient(t *testing.T, ctx context.Context, name string, opts testclient.Options) *testclient.Client {
	t.Helper()
	c, err := testclient.New(ctx, opts)
	if err != nil {
		t.Fatalf("failed to start %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("failed to close %s: %v", name, err)
		}
	})
	return c
}

// pair starts alice and bob in an encrypted room that alice created and bob auto-joined.
func pair(t *testing.T, ctx context.Context) (alice, bob *testclient.Client, room id.RoomID) {
	t.Helper()
	env := testenv.Require(t)
	log := testLog(t)
	alice = newClient(t, ctx, env, "alice", log)
	bob = newClient(t, ctx, env, "bob", log)
	room, err := alice.CreateEncryptedRoom(ctx, bob.UserID())
	if err != nil {
		t.Fatal(err)
	}
	if err = bob.WaitForJoin(ctx, room); err != nil {
		t.Fatal(err)
	}
	return alice, bob, room
}

func bodyIs(text string) func(*event.Event) bool {
	return func(evt *event.Event) bool { return evt.Content.AsMessage().Body == text }
}

// exchange sends text from one client and waits until the other decrypts it and the sender has
// decrypted its own echo.
func exchange(t *testing.T, ctx context.Context, from, to *testclient.Client, room id.RoomID, text string) (id.EventID, *event.Event) {
	t.Helper()
	evtID, err := from.SendText(ctx, room, text)
	if err != nil {
		t.Fatal(err)
	}
	evt, err := to.WaitForMessage(ctx, room, bodyIs(text))
	if err != nil {
		t.Fatal(err)
	}
	if evt.ID != evtID || evt.Sender != from.UserID() || !evt.Mautrix.WasEncrypted {
		t.Fatalf("%s got %s from %s (encrypted: %t), want %s from %s, encrypted",
			to.UserID(), evt.ID, evt.Sender, evt.Mautrix.WasEncrypted, evtID, from.UserID())
	}
	if _, err = from.WaitForMessage(ctx, room, func(e *event.Event) bool { return e.ID == evtID }); err != nil {
		t.Fatalf("sender did not decrypt its own message: %v", err)
	}
	return evtID, evt
}

func TestConversation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)
	invited, err := bob.WaitForJoinedRoom(ctx, func(_ id.RoomID, inviter id.UserID) bool { return inviter == alice.UserID() })
	if err != nil || invited != room {
		t.Fatalf("room bob joined on alice's invite = %q (err %v), want %s", invited, err, room)
	}
	if encrypted, err := bob.IsEncrypted(ctx, room); err != nil || !encrypted {
		t.Fatalf("bob does not know the room is encrypted (err %v)", err)
	}

	start := time.Now()
	exchange(t, ctx, alice, bob, room, "hello bob")
	t.Logf("alice -> bob (new Olm session, room key, message) in %s", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	exchange(t, ctx, bob, alice, room, "hello alice")
	t.Logf("bob -> alice (new Olm session, room key, message) in %s", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	exchange(t, ctx, alice, bob, room, "how are you")
	t.Logf("alice -> bob (same Megolm session) in %s", time.Since(start).Round(time.Millisecond))

	// Each side also decrypts its own messages, and nothing failed to decrypt.
	for _, c := range []*testclient.Client{alice, bob} {
		if got := len(c.Messages(room)); got != 3 {
			t.Errorf("%s has %d messages, want 3: %v", c.UserID(), got, bodies(c.Messages(room)))
		}
		if u := c.Undecryptable(room); len(u) != 0 {
			t.Errorf("%s could not decrypt %d events: %v", c.UserID(), len(u), c.DecryptionError(u[0].ID))
		}
	}
	if got, want := bodies(bob.Messages(room)), []string{"hello bob", "hello alice", "how are you"}; !slices.Equal(got, want) {
		t.Errorf("bob's history = %q, want %q", got, want)
	}
}

func TestRotateRoomKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)

	first, _ := exchange(t, ctx, alice, bob, room, "before rotation")
	firstSession := bob.MegolmSessionID(first)
	if out, err := alice.OutboundSessionID(ctx, room); err != nil || out != firstSession || out == "" {
		t.Fatalf("alice's outbound session = %q (err %v), bob saw %q", out, err, firstSession)
	}

	if err := alice.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	if out, err := alice.OutboundSessionID(ctx, room); err != nil || out != "" {
		t.Fatalf("outbound session after rotation = %q (err %v), want none", out, err)
	}
	second, _ := exchange(t, ctx, alice, bob, room, "after rotation")
	secondSession := bob.MegolmSessionID(second)
	if secondSession == "" || secondSession == firstSession {
		t.Fatalf("message after rotation used session %q, want a new one (first was %q)", secondSession, firstSession)
	}
	if out, _ := alice.OutboundSessionID(ctx, room); out != secondSession {
		t.Errorf("alice's outbound session = %q, bob saw %q", out, secondSession)
	}
	// The old session stays usable for history.
	for _, sess := range []id.SessionID{firstSession, secondSession} {
		if ok, err := bob.HasRoomKey(ctx, room, sess); err != nil || !ok {
			t.Errorf("bob lacks room key %s (err %v)", sess, err)
		}
	}
}

func TestLateRoomKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)
	mach := alice.Machine()

	// Start an outbound session that is shared with nobody but alice, and keep its key at index 0.
	if err := mach.ShareGroupSession(ctx, room, []id.UserID{alice.UserID()}); err != nil {
		t.Fatal(err)
	}
	out, err := mach.CryptoStore.GetOutboundGroupSession(ctx, room)
	if err != nil || out == nil {
		t.Fatalf("no outbound session: %v", err)
	}
	sessionKey := out.Internal.Key()

	evtID, err := alice.SendText(ctx, room, "key comes later")
	if err != nil {
		t.Fatal(err)
	}
	undecryptable, err := bob.WaitForUndecryptable(ctx, room, func(evt *event.Event) bool { return evt.ID == evtID })
	if err != nil {
		t.Fatal(err)
	}
	if got := bob.MegolmSessionID(undecryptable.ID); got != out.ID() {
		t.Errorf("undecryptable event session = %s, want %s", got, out.ID())
	}
	if bob.DecryptionError(evtID) == nil {
		t.Error("no decryption error recorded for the undecryptable event")
	}

	// Now send bob the room key over Olm.
	bobDevice, err := mach.GetOrFetchDevice(ctx, bob.UserID(), bob.DeviceID())
	if err != nil {
		t.Fatal(err)
	}
	err = mach.SendEncryptedToDevice(ctx, bobDevice, event.ToDeviceRoomKey, event.Content{Parsed: &event.RoomKeyEventContent{
		Algorithm:  id.AlgorithmMegolmV1,
		RoomID:     room,
		SessionID:  out.ID(),
		SessionKey: sessionKey,
	}})
	if err != nil {
		t.Fatal(err)
	}
	evt, err := bob.WaitForMessage(ctx, room, bodyIs("key comes later"))
	if err != nil {
		t.Fatal(err)
	}
	if evt.ID != evtID || !evt.Mautrix.WasEncrypted {
		t.Errorf("late decryption gave %s (encrypted %t), want %s", evt.ID, evt.Mautrix.WasEncrypted, evtID)
	}
	if u := bob.Undecryptable(room); len(u) != 0 {
		t.Errorf("event still undecryptable after its key arrived: %d events", len(u))
	}
	if bob.DecryptionError(evtID) != nil {
		t.Errorf("decryption error kept after late decryption: %v", bob.DecryptionError(evtID))
	}
}

func TestSnapshotRestore(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)

	exchange(t, ctx, alice, bob, room, "one")
	before, _ := exchange(t, ctx, bob, alice, room, "two")
	oldSession := alice.MegolmSessionID(before)

	snapshot := filepath.Join(t.TempDir(), "alice.db")
	if err := alice.Snapshot(ctx, snapshot); err != nil {
		t.Fatal(err)
	}
	oldMachine := alice.Machine()

	// Advance the state: alice's Megolm ratchet moves on, and bob shares a new room key over Olm.
	exchange(t, ctx, alice, bob, room, "three")
	if err := bob.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	after, _ := exchange(t, ctx, bob, alice, room, "four")
	newSession := alice.MegolmSessionID(after)
	if newSession == "" || newSession == oldSession {
		t.Fatalf("bob's rotated session = %q, old %q", newSession, oldSession)
	}
	if ok, err := alice.HasRoomKey(ctx, room, newSession); err != nil || !ok {
		t.Fatalf("alice lacks the new room key before restore (err %v)", err)
	}

	start := time.Now()
	if err := alice.Restore(ctx, snapshot); err != nil {
		t.Fatal(err)
	}
	t.Logf("restore took %s", time.Since(start).Round(time.Millisecond))
	if alice.Machine() == oldMachine {
		t.Error("Machine() still returns the machine from before the restore")
	}
	if ok, err := alice.HasRoomKey(ctx, room, newSession); err != nil || ok {
		t.Errorf("room key received after the snapshot survived the restore (err %v)", err)
	}
	if ok, err := alice.HasRoomKey(ctx, room, oldSession); err != nil || !ok {
		t.Errorf("room key received before the snapshot lost by the restore (err %v)", err)
	}
	// The history is not part of the crypto state.
	if got := bodies(alice.Messages(room)); !slices.Equal(got, []string{"one", "two", "three", "four"}) {
		t.Errorf("alice's history after restore = %q", got)
	}

	// The client still syncs and sends: both directions arrive, decryptable or not (the
	// rolled-back Olm and Megolm state is the wedge lab's business).
	for _, step := range []struct {
		from, to *testclient.Client
		text     string
	}{
		{alice, bob, "five (alice restored)"},
		{bob, alice, "six (to restored alice)"},
	} {
		if err := step.from.RotateRoomKey(ctx, room); err != nil {
			t.Fatal(err)
		}
		evtID, err := step.from.SendText(ctx, room, step.text)
		if err != nil {
			t.Fatal(err)
		}
		evt, decrypted, err := step.to.WaitForEvent(ctx, room, evtID)
		if err != nil {
			t.Fatal(err)
		}
		if decrypted {
			t.Logf("%q reached %s decrypted", evt.Content.AsMessage().Body, step.to.UserID())
		} else {
			t.Logf("%q reached %s undecryptable: %v", step.text, step.to.UserID(), step.to.DecryptionError(evtID))
		}
	}
}

// A client restored from a backup lost a room key; it asks the sender for it again and decrypts.
func TestRequestRoomKeyAfterRestore(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alice, bob, room := pair(t, ctx)

	exchange(t, ctx, alice, bob, room, "one")
	snapshot := filepath.Join(t.TempDir(), "bob.db")
	if err := bob.Snapshot(ctx, snapshot); err != nil {
		t.Fatal(err)
	}
	if err := alice.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	two, _ := exchange(t, ctx, alice, bob, room, "two")
	lost := bob.MegolmSessionID(two)
	if err := bob.Restore(ctx, snapshot); err != nil {
		t.Fatal(err)
	}
	if ok, err := bob.HasRoomKey(ctx, room, lost); err != nil || ok {
		t.Fatalf("bob still has room key %s after restore (err %v)", lost, err)
	}

	three, err := alice.SendText(ctx, room, "three")
	if err != nil {
		t.Fatal(err)
	}
	evt, decrypted, err := bob.WaitForEvent(ctx, room, three)
	if err != nil {
		t.Fatal(err)
	} else if decrypted {
		t.Fatal("bob decrypted a message whose room key the restore removed")
	}
	if err = bob.RequestRoomKey(ctx, evt); err != nil {
		t.Fatal(err)
	}
	got, err := bob.WaitForMessage(ctx, room, func(e *event.Event) bool { return e.ID == three })
	if err != nil {
		t.Fatal(err)
	}
	if body := got.Content.AsMessage().Body; body != "three" || !got.Mautrix.WasEncrypted {
		t.Errorf("got %q (encrypted: %t), want \"three\", encrypted", body, got.Mautrix.WasEncrypted)
	}
	// The sender forwarded its own session, so mautrix does not flag the key as forwarded; the
	// session is back all the same.
	if ok, err := bob.HasRoomKey(ctx, room, lost); err != nil || !ok {
		t.Errorf("bob lacks room key %s after the key request (err %v)", lost, err)
	}
	if len(bob.Undecryptable(room)) != 0 {
		t.Errorf("bob still has %d undecryptable events", len(bob.Undecryptable(room)))
	}
}

func TestReopenDevice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	env := testenv.Require(t)
	log := testLog(t)
	dir := t.TempDir()
	opts := testclient.Options{
		HomeserverURL: env.HomeserverURL,
		Username:      testenv.UniqueName("carol"),
		Password:      "correct horse battery",
		DataDir:       dir,
		Log:           log,
	}
	first, err := testclient.New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	identity := first.IdentityKey()
	if err = first.Close(); err != nil {
		t.Fatal(err)
	}

	// Same device: same Olm account.
	opts.DeviceID = first.DeviceID()
	again, err := testclient.New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if again.DeviceID() != first.DeviceID() || again.IdentityKey() != identity {
		t.Errorf("reopened device %s/%s, want %s/%s", again.DeviceID(), again.IdentityKey(), first.DeviceID(), identity)
	}

	// No device ID: a new device with a new account.
	opts.DeviceID = ""
	other, err := testclient.New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if other.DeviceID() == first.DeviceID() || other.IdentityKey() == identity {
		t.Errorf("new login reused device %s", other.DeviceID())
	}
}

func bodies(evts []*event.Event) []string {
	out := make([]string, len(evts))
	for i, evt := range evts {
		out[i] = evt.Content.AsMessage().Body
	}
	return out
}
