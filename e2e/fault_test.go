package e2e

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/unwedge/unwedge/bridge"
	"github.com/unwedge/unwedge/crypto/unwedge"
)

// TestCrashBetweenSessionAndDummy kills the bridge with SIGKILL after it created the replacement
// session for a wedged device and before m.dummy went out. After the restart the heal is
// finished over that same session (no second one within the hour), and the message whose room
// key was lost in the wedge is bridged once.
func TestCrashBetweenSessionAndDummy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	// A short lease, so the restarted bridge takes over the dead one's heal after seconds.
	s := start(t, ctx, false, "postgres", "", map[string]any{"network.unwedge.lease": "10s"})
	room := s.openPortal(t, ctx, "crash")
	if _, err := s.user.SendText(ctx, room, "before the crash"); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, "before the crash", nil)
	db, err := sql.Open("postgres", s.bridge.Opts.DatabaseURI)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	// The bridge loses its session with the device, and this start dies at the fault point.
	if err = s.bridge.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err = db.ExecContext(ctx, "DELETE FROM crypto_olm_session WHERE sender_key = $1", s.user.IdentityKey()); err != nil {
		t.Fatal(err)
	}
	s.bridge.Opts.Env = []string{bridge.FaultEnv + "=" + unwedge.FaultSessionCreated}
	if err = s.bridge.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err = s.user.RotateRoomKey(ctx, room); err != nil {
		t.Fatal(err)
	}
	const text = "sent while the bridge crashed mid-heal"
	if _, err = s.user.SendText(ctx, room, text); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.bridge.Exited():
	case <-time.After(time.Minute):
		t.Fatal("the bridge did not reach the fault point")
	}
	var outcome, sessionID string
	if err = db.QueryRowContext(ctx, "SELECT outcome, session_id FROM unwedge_heal ORDER BY id DESC LIMIT 1").Scan(&outcome, &sessionID); err != nil {
		t.Fatalf("no heal in the ledger after the bridge exited (%v); bridge log:\n%s", err, s.bridge.LogTail(30))
	}
	if outcome != "in_progress" || sessionID == "" {
		t.Fatalf("after the crash the heal is %s with session %q, want in_progress with the session recorded; bridge log:\n%s", outcome, sessionID, s.bridge.LogTail(30))
	}

	s.bridge.Opts.Env = nil
	if err = s.bridge.Start(ctx); err != nil {
		t.Fatal(err)
	}
	msg := s.waitOutbox(t, ctx, text, nil)
	t.Logf("bridged %s after the restart", msg.EventID)

	rows, err := db.QueryContext(ctx, "SELECT outcome, session_id FROM unwedge_heal WHERE session_id <> ''")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var heals []string
	for rows.Next() {
		var o, sid string
		if err = rows.Scan(&o, &sid); err != nil {
			t.Fatal(err)
		}
		heals = append(heals, o+" "+sid)
	}
	if len(heals) != 1 || heals[0] != "healed "+sessionID {
		t.Errorf("heals with a session: %v, want only the interrupted one, healed over %s", heals, sessionID)
	}
	var copies int
	if err = db.QueryRowContext(ctx, "SELECT COUNT(*) FROM webhook_outbox WHERE body = $1", text).Scan(&copies); err != nil || copies != 1 {
		t.Errorf("the message is in the outbox %d times (%v), want once", copies, err)
	}
}
