package e2e

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/base64"
	"fmt"
	"os"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/webhook"
)

// TestStockStartup shows, on the bridge process and the real Synapse, that the start-up steps of
// the stock encryption helper (mautrix-go's bridgev2/matrix/crypto.go, Init) run with unwedge
// on, in bridge/stock.go's Helper.Init. Each check fails when its step is left out of Init.
//
// One bridge, with encryption.delete_keys.delete_outdated_inbound and
// periodically_delete_expired on, bridges a message each way in one portal and a message from
// the user in a second. Then, while it is stopped, its database is prepared for four steps at
// once, and it starts again with its existing device:
//
//   - delete_outdated_inbound (RedactOutdatedGroupSessions, synchronously in Init): an inbound
//     Megolm session without received_at is redacted ("Session redacted: outdated"); the real
//     session it was copied from, which has received_at, is not.
//   - periodically_delete_expired (the ExpiredKeyDeleteLoop goroutine, whose first round runs at
//     once): a session received 30 days ago with a max_age of one day is redacted ("Session
//     redacted: expired") and logged as such.
//   - one-time-key repair (repairOTKsIfNeeded, for an existing device): kv_store's
//     otk_repair_needed goes from "true" to "false", and RepairOneTimeKeys logged its work.
//   - encryption resync (the resyncEncryptionInfo goroutine): the second portal, whose
//     mx_room_state.encryption is {"resync":true} and whose inbound sessions lack max_age and
//     max_messages, gets its m.room.encryption content back and the sessions get the rotation
//     limits of that event (Megolm's defaults where it sets none).
//
// Last, the device-keys check (verifyKeysAreOnServer, then Reset): the bot's devices are deleted
// on Synapse while the bridge is stopped. At the next start the bridge logs "Existing device
// doesn't have keys on server, resetting crypto", comes up with a new device whose keys are on
// the server, and messages are bridged each way again, encrypted with the new device's keys.
// Without the check the bridge would keep a device that no client can encrypt to.
func TestStockStartup(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	s := start(t, ctx, false, "postgres", "", map[string]any{
		"encryption.delete_keys.delete_outdated_inbound":     true,
		"encryption.delete_keys.periodically_delete_expired": true,
	})
	db := openBridgeDB(t, s.bridge)
	f := &faultSetup{setup: s, db: db} // for restart and waitLog
	room := s.openPortal(t, ctx, "stock")
	s.roundTrip(t, ctx, "stock", room, "before the restarts")
	resyncRoom := s.openPortal(t, ctx, "resync")
	if _, err := s.user.SendText(ctx, resyncRoom, "a session to resync"); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, "a session to resync", nil)
	account, device := stockAccount(t, ctx, db)
	// The session of the user's message in the first portal, which the copies below start from.
	var source string
	if err := db.QueryRowContext(ctx, `SELECT session_id FROM crypto_megolm_inbound_session
		WHERE account_id=$1 AND room_id=$2 AND sender_key=$3 AND session IS NOT NULL`,
		account, room, s.user.IdentityKey()).Scan(&source); err != nil {
		t.Fatalf("no inbound session of %s in %s: %v", s.user.UserID(), room, err)
	}
	// copySession stores a copy of the source session under a new ID, with the given received_at
	// and max_age (NULL for nil).
	copySession := func(t *testing.T, receivedAt *time.Time, maxAge *int64) id.SessionID {
		t.Helper()
		sessionID := randomSessionID()
		if _, err := db.ExecContext(ctx, `
			INSERT INTO crypto_megolm_inbound_session (account_id, session_id, sender_key, signing_key, room_id,
				session, forwarding_chains, shared_history, received_at, max_age, max_messages, is_scheduled)
			SELECT account_id, $3, sender_key, signing_key, room_id, session, forwarding_chains, shared_history,
				$4, $5, 100, false
			FROM crypto_megolm_inbound_session WHERE account_id=$1 AND session_id=$2`,
			account, source, sessionID, receivedAt, maxAge); err != nil {
			t.Fatal(err)
		}
		return sessionID
	}
	// redacted says why a session is not redacted yet with the reason ("" once it is).
	redacted := func(sessionID id.SessionID, reason string) string {
		var session []byte
		var code, gotReason sql.NullString
		err := db.QueryRowContext(ctx, `SELECT session, withheld_code, withheld_reason FROM crypto_megolm_inbound_session
			WHERE account_id=$1 AND session_id=$2`, account, sessionID).Scan(&session, &code, &gotReason)
		switch {
		case err != nil:
			return err.Error()
		case session != nil || code.String != string(event.RoomKeyWithheldBeeperRedacted) || gotReason.String != reason:
			return fmt.Sprintf("session %s: %d bytes of session, withheld %q (%q), want it redacted (%q)",
				sessionID, len(session), code.String, gotReason.String, reason)
		}
		return ""
	}

	if err := s.bridge.Stop(); err != nil {
		t.Fatal(err)
	}
	var outdated, expired id.SessionID
	var resyncEvent event.EncryptionEventContent
	steps := []struct {
		name    string
		prepare func(t *testing.T)      // while the bridge is stopped
		check   func(offset int) string // after the start: "" when done, else what is missing
	}{{
		name: "delete_outdated_inbound",
		prepare: func(t *testing.T) {
			outdated = copySession(t, nil, nil)
		},
		check: func(int) string {
			if missing := redacted(outdated, "Session redacted: outdated"); missing != "" {
				return missing
			}
			var session []byte
			if err := db.QueryRowContext(ctx, `SELECT session FROM crypto_megolm_inbound_session WHERE account_id=$1 AND session_id=$2`,
				account, source).Scan(&session); err != nil || session == nil {
				return fmt.Sprintf("the user's session %s, which has received_at, was redacted too (%v)", source, err)
			}
			return ""
		},
	}, {
		name: "periodically_delete_expired",
		prepare: func(t *testing.T) {
			receivedAt, maxAge := time.Now().UTC().Add(-30*24*time.Hour), (24 * time.Hour).Milliseconds()
			expired = copySession(t, &receivedAt, &maxAge)
		},
		check: func(offset int) string {
			if missing := redacted(expired, "Session redacted: expired"); missing != "" {
				return missing
			} else if !f.logged(offset, "Redacted expired megolm sessions", string(expired)) {
				return "no log of the expired session's redaction"
			}
			return ""
		},
	}, {
		name: "otk_repair_needed",
		prepare: func(t *testing.T) {
			if _, err := db.ExecContext(ctx, `INSERT INTO kv_store (bridge_id, key, value) VALUES ($1, 'otk_repair_needed', 'true')
				ON CONFLICT (bridge_id, key) DO UPDATE SET value = excluded.value`, account); err != nil {
				t.Fatal(err)
			}
		},
		check: func(offset int) string {
			var value string
			if err := db.QueryRowContext(ctx, `SELECT value FROM kv_store WHERE bridge_id=$1 AND key='otk_repair_needed'`,
				account).Scan(&value); err != nil {
				return err.Error()
			} else if value != "false" {
				return fmt.Sprintf("otk_repair_needed = %q, want \"false\"", value)
			} else if !f.logged(offset, `"action":"repair otks"`) {
				return "RepairOneTimeKeys logged nothing"
			}
			return ""
		},
	}, {
		name: "encryption resync",
		prepare: func(t *testing.T) {
			if err := s.user.Mautrix().StateEvent(ctx, resyncRoom, event.StateEncryption, "", &resyncEvent); err != nil {
				t.Fatal(err)
			}
			res, err := db.ExecContext(ctx, `UPDATE crypto_megolm_inbound_session SET max_age=NULL, max_messages=NULL
				WHERE account_id=$1 AND room_id=$2`, account, resyncRoom)
			if n, _ := rowsAffected(res, err); n == 0 {
				t.Fatalf("no inbound sessions in %s to resync (%v)", resyncRoom, err)
			}
			res, err = db.ExecContext(ctx, `UPDATE mx_room_state SET encryption='{"resync":true}' WHERE room_id=$1`, resyncRoom)
			if n, _ := rowsAffected(res, err); n != 1 {
				t.Fatalf("%s not in mx_room_state (%v)", resyncRoom, err)
			}
		},
		check: func(int) string {
			maxAge, maxMessages := resyncEvent.RotationPeriodMillis, resyncEvent.RotationPeriodMessages
			if maxAge <= 0 {
				maxAge = (7 * 24 * time.Hour).Milliseconds()
			}
			if maxMessages <= 0 {
				maxMessages = 100
			}
			var algorithm sql.NullString
			if err := db.QueryRowContext(ctx, `SELECT encryption->>'algorithm' FROM mx_room_state WHERE room_id=$1`,
				resyncRoom).Scan(&algorithm); err != nil {
				return err.Error()
			} else if id.Algorithm(algorithm.String) != resyncEvent.Algorithm {
				return fmt.Sprintf("mx_room_state.encryption has algorithm %q, want %q", algorithm.String, resyncEvent.Algorithm)
			}
			var left int
			if err := db.QueryRowContext(ctx, `SELECT count(*) FROM crypto_megolm_inbound_session
				WHERE account_id=$1 AND room_id=$2 AND (max_age IS DISTINCT FROM $3 OR max_messages IS DISTINCT FROM $4)`,
				account, resyncRoom, maxAge, maxMessages).Scan(&left); err != nil {
				return err.Error()
			} else if left > 0 {
				return fmt.Sprintf("%d inbound sessions of %s without max_age %d and max_messages %d", left, resyncRoom, maxAge, maxMessages)
			}
			return ""
		},
	}}
	for _, step := range steps {
		step.prepare(t)
	}
	offset := f.restart(t, ctx, "")
	if _, again := stockAccount(t, ctx, db); again != device {
		t.Fatalf("bot device after the restart = %s, want the existing %s", again, device)
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			stockWait(t, ctx, 15*time.Second, func() string { return step.check(offset) })
		})
	}

	t.Run("device keys missing on server", func(t *testing.T) {
		if err := s.bridge.Stop(); err != nil {
			t.Fatal(err)
		}
		if n, err := s.bridge.ClearBotDevices(ctx); err != nil {
			t.Fatal(err)
		} else if n == 0 {
			t.Fatal("the bot had no device on the homeserver to delete")
		}
		offset := f.restart(t, ctx, "")
		f.waitLog(t, ctx, offset, 30*time.Second, "Existing device doesn't have keys on server, resetting crypto")
		f.waitLog(t, ctx, offset, 30*time.Second, "End-to-bridge encryption successfully reset")
		_, newDevice := stockAccount(t, ctx, db)
		if newDevice == device {
			t.Fatalf("bot device after the reset = %s, the deleted one", newDevice)
		}
		// The user's client learns the bot's devices from the homeserver, as on a device-list
		// change; this also drops the user's Megolm session, shared with the deleted device only.
		devices, err := s.user.Machine().FetchKeys(ctx, []id.UserID{s.bridge.BotMXID}, true)
		if err != nil {
			t.Fatal(err)
		}
		dev, ok := devices[s.bridge.BotMXID][newDevice]
		if !ok || dev.IdentityKey == "" {
			t.Fatalf("new bot device %s has no keys on the homeserver (devices: %v)", newDevice, devices[s.bridge.BotMXID])
		} else if _, ok = devices[s.bridge.BotMXID][device]; ok {
			t.Errorf("deleted bot device %s still has keys on the homeserver", device)
		}
		if err = s.user.RotateRoomKey(ctx, room); err != nil {
			t.Fatal(err)
		}
		evt := s.roundTrip(t, ctx, "stock", room, "after the reset")
		igs, err := s.user.Machine().CryptoStore.GetGroupSession(ctx, room, s.user.MegolmSessionID(evt.ID))
		if err != nil || igs == nil {
			t.Fatalf("session of the bridged message not in the user's store: %v", err)
		} else if igs.SenderKey != dev.IdentityKey {
			t.Errorf("bridged message encrypted by %s, want the new device's key %s", igs.SenderKey, dev.IdentityKey)
		}
	})
}

// roundTrip bridges a message from the webhook to the user's client (encrypted) and one from the
// client to the webhook in the portal of the chat, and returns the first as the client decrypted it.
func (s *setup) roundTrip(t *testing.T, ctx context.Context, chatID string, room id.RoomID, text string) *event.Event {
	t.Helper()
	inbound, outbound := "from the webhook: "+text, "from matrix: "+text
	if _, err := s.remote.PostMessage(ctx, &webhook.PostMessageRequest{
		ChatID: chatID, Sender: "bob", SenderName: "Bob", Text: inbound,
	}); err != nil {
		t.Fatal(err)
	}
	evt, err := s.user.WaitForMessage(ctx, room, bodyIs(inbound))
	if err != nil {
		t.Fatal(err)
	} else if !evt.Mautrix.WasEncrypted {
		t.Error("webhook message reached the client unencrypted")
	}
	if _, err = s.user.SendText(ctx, room, outbound); err != nil {
		t.Fatal(err)
	}
	s.waitOutbox(t, ctx, outbound, nil)
	return evt
}

// stockAccount is the bridge's crypto account: its ID (the bridge ID, which kv_store rows are
// keyed by too) and the bot device.
func stockAccount(t *testing.T, ctx context.Context, db *sql.DB) (account string, device id.DeviceID) {
	t.Helper()
	if err := db.QueryRowContext(ctx, "SELECT account_id, device_id FROM crypto_account").Scan(&account, &device); err != nil {
		t.Fatalf("no bot device in the bridge's crypto store: %v", err)
	}
	return account, device
}

// logged reports whether the bridge logged, after offset, a line that contains all of substrs.
func (f *faultSetup) logged(offset int, substrs ...string) bool {
	data, err := os.ReadFile(f.bridge.LogPath)
	return err == nil && len(data) > offset && hasLine(data[offset:], substrs)
}

// stockWait calls check every 100 ms until it returns "", and fails with its last answer when
// timeout passes first.
func stockWait(t *testing.T, ctx context.Context, timeout time.Duration, check func() string) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		missing := check()
		if missing == "" {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s (%v)", missing, ctx.Err())
		case <-deadline:
			t.Fatalf("%s after %s", missing, timeout)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func rowsAffected(res sql.Result, err error) (int64, error) {
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// randomSessionID is a made-up Megolm session ID (43 characters of unpadded base64, as real ones).
func randomSessionID() id.SessionID {
	buf := make([]byte, 32)
	_, _ = rand.Read(buf)
	return id.SessionID(base64.RawStdEncoding.EncodeToString(buf))
}
