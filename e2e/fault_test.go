package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
	"github.com/unwedge/unwedge/internal/fault/inject"
	"github.com/unwedge/unwedge/internal/testenv"
)

// The fault tests run the bridge against the real homeserver and Postgres and break one of the
// three (SIGKILL, a stopped Synapse, a stopped Postgres) at a named point of a heal or of
// recovery (inject.EnvVar), in the bridge built with fault points (faulty). Each ends with the
// same checks: the message sent during the fault is bridged exactly once, and the device got
// exactly one replacement session.

// faultSetup is a bridge with fault points and a short lease (a restarted bridge takes over a
// dead one's heal and pending events after seconds), a portal, and the bridge's database.
type faultSetup struct {
	*setup
	db *sql.DB
}

func startFaulty(t *testing.T, ctx context.Context, chat string) (*faultSetup, id.RoomID) {
	t.Helper()
	s := startBuild(t, ctx, faulty, false, "postgres", "", map[string]any{"network.unwedge.lease": "10s"})
	room := s.openPortal(t, ctx, chat)
	if _, err := s.user.SendText(ctx, room, "before the fault"); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, "before the fault", nil)
	db, err := sql.Open("postgres", s.bridge.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return &faultSetup{setup: s, db: db}, room
}

// restartWedged restarts the bridge without its Olm sessions with the user's device (a lost
// session row, and its Olm history), with fault injection armed as spec says (or none); it returns the log offset
// from which the new process writes.
func (f *faultSetup) restartWedged(t *testing.T, ctx context.Context, spec string) int {
	t.Helper()
	if err := f.bridge.Stop(); err != nil {
		t.Fatal(err)
	}
	// The session's earlier states go too: from them the Olm history would decrypt the device's
	// next message (its room key would not wait for a heal and a key request, which these tests
	// hold and break).
	for _, table := range []string{"crypto_olm_session", "unwedge_olm_history"} {
		if _, err := f.db.ExecContext(ctx, "DELETE FROM "+table+" WHERE sender_key = $1", f.user.IdentityKey()); err != nil {
			t.Fatal(err)
		}
	}
	return f.restart(t, ctx, spec)
}

// restart starts the (stopped or killed) bridge again, with fault injection armed as spec says.
func (f *faultSetup) restart(t *testing.T, ctx context.Context, spec string) int {
	t.Helper()
	offset := f.logSize()
	f.bridge.Opts.Env = nil
	if spec != "" {
		if f.bridge.Opts.Binary != faulty.get(t) {
			t.Fatal("fault injection needs the bridge built with fault points: start it with startFaulty")
		}
		f.bridge.Opts.Env = []string{inject.EnvVar + "=" + spec}
	}
	if err := f.bridge.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return offset
}

func (f *faultSetup) logSize() int {
	info, err := os.Stat(f.bridge.LogPath)
	if err != nil {
		return 0
	}
	return int(info.Size())
}

// waitLog waits until the bridge logged, after offset, a line that contains all of substrs.
func (f *faultSetup) waitLog(t *testing.T, ctx context.Context, offset int, timeout time.Duration, substrs ...string) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		if data, err := os.ReadFile(f.bridge.LogPath); err == nil && len(data) > offset && hasLine(data[offset:], substrs) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the bridge did not log %q: %v; log:\n%s", substrs, ctx.Err(), f.bridge.LogTail(40))
		case <-deadline:
			t.Fatalf("the bridge did not log %q within %s; log:\n%s", substrs, timeout, f.bridge.LogTail(40))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func hasLine(log []byte, substrs []string) bool {
	for line := range bytes.Lines(log) {
		all := true
		for _, s := range substrs {
			all = all && bytes.Contains(line, []byte(s))
		}
		if all {
			return true
		}
	}
	return false
}

// sessionHeals lists the heals that created a session, as "outcome session_id".
func (f *faultSetup) sessionHeals(t *testing.T, ctx context.Context) []string {
	t.Helper()
	rows, err := f.db.QueryContext(ctx, "SELECT outcome, session_id FROM unwedge_heal WHERE session_id <> '' ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var heals []string
	for rows.Next() {
		var outcome, session string
		if err = rows.Scan(&outcome, &session); err != nil {
			t.Fatal(err)
		}
		heals = append(heals, outcome+" "+session)
	}
	if err = rows.Err(); err != nil {
		t.Fatal(err)
	}
	return heals
}

// bridgedOnce waits until the message is in the outbox, then checks that it is there once, that
// nothing about it is left pending, and that it stays once while the bridge's recovery makes
// another full pass.
func (f *faultSetup) bridgedOnce(t *testing.T, ctx context.Context, text string) {
	t.Helper()
	msg := f.waitOutbox(t, ctx, text, nil)
	for {
		var pending int
		if err := f.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending WHERE event_id = $1", msg.EventID).Scan(&pending); err != nil {
			t.Fatal(err)
		} else if pending == 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("bridged event %s is still pending", msg.EventID)
		case <-time.After(250 * time.Millisecond):
		}
	}
	sleepUntil(ctx, time.Now().Add(unwedge.StockWait+5*time.Second)) // a sweep runs every 30 s
	var copies int
	if err := f.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM webhook_outbox WHERE body = $1", text).Scan(&copies); err != nil || copies != 1 {
		t.Errorf("the message is in the outbox %d times (%v), want once", copies, err)
	}
}

// wedgedMessage makes the user's device send a message whose room key goes over the Olm
// session the bridge lost, so the bridge can decrypt neither until a heal.
func (f *faultSetup) wedgedMessage(t *testing.T, ctx context.Context, room id.RoomID, text string) {
	t.Helper()
	if err := f.user.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	if _, err := f.user.SendText(ctx, room, text); err != nil {
		t.Fatal(err)
	}
}

// TestCrashBetweenSessionAndDummy kills the bridge with SIGKILL after it created the replacement
// session for a wedged device and before m.dummy went out. After the restart the heal is
// finished over that same session (no second one within the hour), and the message whose room
// key was lost in the wedge is bridged once.
func TestCrashBetweenSessionAndDummy(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	f, room := startFaulty(t, ctx, "crash")
	f.restartWedged(t, ctx, unwedge.FaultSessionCreated)
	const text = "sent while the bridge crashed mid-heal"
	f.wedgedMessage(t, ctx, room, text)
	select {
	case <-f.bridge.Exited():
	case <-time.After(time.Minute):
		t.Fatal("the bridge did not reach the fault point")
	}
	var outcome, sessionID string
	if err := f.db.QueryRowContext(ctx, "SELECT outcome, session_id FROM unwedge_heal ORDER BY id DESC LIMIT 1").Scan(&outcome, &sessionID); err != nil {
		t.Fatalf("no heal in the ledger after the bridge exited (%v); bridge log:\n%s", err, f.bridge.LogTail(30))
	}
	if outcome != "in_progress" || sessionID == "" {
		t.Fatalf("after the crash the heal is %s with session %q, want in_progress with the session recorded; bridge log:\n%s", outcome, sessionID, f.bridge.LogTail(30))
	}

	f.restart(t, ctx, "")
	f.bridgedOnce(t, ctx, text)
	if heals := f.sessionHeals(t, ctx); len(heals) != 1 || heals[0] != "healed "+sessionID {
		t.Errorf("heals with a session: %v, want only the interrupted one, healed over %s", heals, sessionID)
	}
}

// TestOutageDuringHeal stops the homeserver or Postgres while a heal holds at a point (before
// the one-time key is claimed, or between creating the session and sending m.dummy), lets the
// heal run into the outage, and brings the service back. The heal finishes after the outage with
// one session, and the message is bridged once.
func TestOutageDuringHeal(t *testing.T) {
	env := testenv.RequireFaults(t)
	const hsDown, pgDown = "127.0.0.1:8008: connect: connection refused", "127.0.0.1:5432: connect: connection refused"
	cases := []struct {
		name        string
		point       string
		stop, start func(context.Context) error
		// refused is how a request of the heal fails during the outage.
		refused string
	}{
		{"homeserver/before claim", unwedge.FaultHealGranted, env.StopHomeserver, env.StartHomeserver, hsDown},
		{"homeserver/before m.dummy", unwedge.FaultSessionCreated, env.StopHomeserver, env.StartHomeserver, hsDown},
		{"postgres/before claim", unwedge.FaultHealGranted, env.StopPostgres, env.StartPostgres, pgDown},
		{"postgres/before m.dummy", unwedge.FaultSessionCreated, env.StopPostgres, env.StartPostgres, pgDown},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			f, room := startFaulty(t, ctx, "outage")
			release := filepath.Join(t.TempDir(), "release")
			offset := f.restartWedged(t, ctx, tc.point+":hold="+release)
			const text = "sent while a service went down mid-heal"
			f.wedgedMessage(t, ctx, room, text)
			f.waitLog(t, ctx, offset, time.Minute, "Fault injection: holding")
			// The event waits in the database for its key (recorded before the outage).
			f.waitPending(t, ctx, 1)

			down := f.outage(t, ctx, offset, release, tc.stop, tc.start, `"action":"unwedge"`, tc.refused)
			t.Logf("%s down for %s", tc.name, down.Round(100*time.Millisecond))

			f.bridgedOnce(t, ctx, text)
			heals := f.sessionHeals(t, ctx)
			if len(heals) != 1 || !strings.HasPrefix(heals[0], "healed ") {
				t.Errorf("heals with a session: %v, want exactly one, healed", heals)
			}
			select {
			case <-f.bridge.Exited():
				t.Error("the bridge exited during the outage")
			default:
			}
		})
	}
}

// outage stops a service of the stack, lets the bridge held at a fault point go on (release),
// waits until it logged a line with all of seen (it ran into the outage), and a second more, then
// starts the service again; it returns how long the service was down. A test that ends before
// that leaves the service started.
func (f *faultSetup) outage(t *testing.T, ctx context.Context, offset int, release string, stop, start func(context.Context) error, seen ...string) time.Duration {
	t.Helper()
	down := time.Now()
	if err := stop(ctx); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			_ = start(context.Background())
		}
	})
	if err := os.WriteFile(release, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f.waitLog(t, ctx, offset, 30*time.Second, seen...)
	time.Sleep(time.Second) // the bridge keeps running into the outage for a while
	if err := start(ctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	return time.Since(down)
}

// waitPending waits until at least n events wait for their keys.
func (f *faultSetup) waitPending(t *testing.T, ctx context.Context, n int) {
	t.Helper()
	for {
		var pending int
		if err := f.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending").Scan(&pending); err == nil && pending >= n {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("fewer than %d events recorded as pending; log:\n%s", n, f.bridge.LogTail(40))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestCrashBetweenKeyAndBridge kills the bridge with SIGKILL after the key of a pending event
// arrived: before the event was handed to bridgev2, and after bridgev2 bridged it but before its
// row was deleted. After the restart the event is bridged, once.
func TestCrashBetweenKeyAndBridge(t *testing.T) {
	t.Parallel()
	for _, point := range []string{unwedge.FaultKeyArrived, unwedge.FaultEventDelivered} {
		t.Run(point, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			f, room := startFaulty(t, ctx, "late-key")
			if err := f.bridge.Stop(); err != nil {
				t.Fatal(err)
			}
			f.restart(t, ctx, point)
			const text = "the bridge crashes when its key arrives"
			f.lateKeyMessage(t, ctx, room, text)
			select {
			case <-f.bridge.Exited():
			case <-time.After(2 * time.Minute):
				t.Fatalf("the bridge did not reach %s; log:\n%s", point, f.bridge.LogTail(40))
			}
			var pending int
			if err := f.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM unwedge_pending").Scan(&pending); err != nil || pending != 1 {
				t.Fatalf("%d pending events after the crash (%v), want the one still there", pending, err)
			}
			f.restart(t, ctx, "")
			f.bridgedOnce(t, ctx, text)
		})
	}
}

// lateKeyMessage sends a message whose room key the bridge does not get, and lets the device
// share it only after bridgev2's own wait, so that recovery (not bridgev2) bridges it.
func (f *faultSetup) lateKeyMessage(t *testing.T, ctx context.Context, room id.RoomID, text string) {
	t.Helper()
	allowKeyShare := f.gateKeyShare()
	sent := time.Now()
	_, session, err := f.user.SendWithheldText(ctx, room, text)
	if err != nil {
		t.Fatal(err)
	}
	f.waitPending(t, ctx, 1)
	sleepUntil(ctx, sent.Add(unwedge.StockWait-3*time.Second))
	allowKeyShare(session)
}

// TestOutageDuringRecovery stops Postgres when the key of a pending event has just arrived and
// the event is about to be handed to bridgev2. The hand-over fails, the bridge stays up, and
// after Postgres is back the event is bridged, once.
func TestOutageDuringRecovery(t *testing.T) {
	env := testenv.RequireFaults(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	f, room := startFaulty(t, ctx, "recovery-outage")
	if err := f.bridge.Stop(); err != nil {
		t.Fatal(err)
	}
	release := filepath.Join(t.TempDir(), "release")
	offset := f.restart(t, ctx, unwedge.FaultKeyArrived+":hold="+release)
	const text = "its key arrives as the database goes down"
	f.lateKeyMessage(t, ctx, room, text)
	f.waitLog(t, ctx, offset, time.Minute, "Fault injection: holding")

	f.outage(t, ctx, offset, release, env.StopPostgres, env.StartPostgres,
		"Pending event still cannot be bridged", "127.0.0.1:5432: connect: connection refused")
	f.bridgedOnce(t, ctx, text)
	select {
	case <-f.bridge.Exited():
		t.Error("the bridge exited during the outage")
	default:
	}
}
