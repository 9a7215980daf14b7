package lab

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/lib/pq"
	"maunium.net/go/mautrix/crypto/goolm/account"
)

// Scenario is one way an Olm session between the user's device and the bridge breaks.
type Scenario struct {
	Name        string
	Description string
	// Devices the user has; the first is the one that wedges. Zero means one.
	Devices int
	// Management: the user has not logged in to the bridge and talks only to the bridge bot, in
	// an encrypted management room (a room of their own with only the bot in it). The user's messages are bot commands
	// (managementCommands) and the other direction is the bot's answers; there is no portal and
	// no remote side.
	Management bool
	// Prepare runs once the portal works, before more traffic (for example, taking a backup).
	Prepare func(ctx context.Context, w *World) error
	// Wedge breaks the session, after traffic has moved the ratchets on since Prepare. Nil when
	// no Olm session breaks and the scenario's trouble lies elsewhere (restart-while-sending).
	Wedge func(ctx context.Context, w *World) error
	// BeforeEach, if set, runs before each message the device sends in the measured phases:
	// phase is "wedged" or "after", i counts from 0 to k-1.
	BeforeEach func(ctx context.Context, w *World, phase string, i, k int) error
	// WhileWedged, if set, runs after the device sent its messages in the wedged phase.
	WhileWedged func(ctx context.Context, w *World) error
}

// Scenarios are the lab's scenarios, in the order they are reported.
var Scenarios = []*Scenario{
	{
		Name:        "bridge-restored-from-backup",
		Description: "the bridge's crypto tables go back to a backup while the client kept going",
		Prepare:     snapshotBridgeCrypto,
		Wedge:       restoreBridgeCrypto,
	},
	{
		Name: "not-logged-in",
		Description: "as bridge-restored-from-backup, for a user with no login on the bridge who sends bot " +
			"commands in their management room",
		Management: true,
		Prepare:    snapshotBridgeCrypto,
		Wedge:      restoreBridgeCrypto,
	},
	{
		Name:        "client-restored-from-backup",
		Description: "the client restores its crypto state from an earlier backup (riot-web#3822)",
		Prepare: func(ctx context.Context, w *World) error {
			return w.Wedged().Snapshot(ctx, filepath.Join(w.Dir, "client-backup.db"))
		},
		Wedge: func(ctx context.Context, w *World) error {
			return w.Wedged().Restore(ctx, filepath.Join(w.Dir, "client-backup.db"))
		},
	},
	{
		Name: "client-restored-reused-index",
		Description: "the client restores its whole crypto state from a backup taken right after it decrypted " +
			"an Olm message from the bridge; both sides' ratchets moved on four times since (MSC1719)",
		Prepare: func(ctx context.Context, w *World) error {
			return w.backupAfter(ctx, w.bridgeSpeaks)
		},
		Wedge: func(ctx context.Context, w *World) error {
			// The bridge speaks last: its ratchet is its fourth since the backup, and it holds
			// a sending chain, so the restored client's new chain is one it tries to derive
			// (without a sending chain goolm would refuse the message as a protocol violation).
			if err := w.bridgeSpeaks(ctx); err != nil {
				return err
			}
			return w.restoreBackup(ctx)
		},
	},
	{
		Name: "client-restored-reused-index-own",
		Description: "the client restores its whole crypto state from a backup taken right after its own Olm " +
			"message to the bridge; it goes on with that chain at an index the bridge has consumed (MSC1719)",
		Prepare: func(ctx context.Context, w *World) error {
			return w.backupAfter(ctx, func(ctx context.Context) error { return w.deviceSpeaks(ctx, "backup") })
		},
		Wedge: func(ctx context.Context, w *World) error {
			if err := w.bridgeSpeaks(ctx); err != nil {
				return err
			}
			if err := w.deviceSpeaks(ctx, "before-restore"); err != nil {
				return err
			}
			return w.restoreBackup(ctx)
		},
	},
	{
		Name:        "expired-one-time-key",
		Description: "the client opens a new session with a one-time key the bridge no longer has (riot-web#3309)",
		Wedge:       expireOneTimeKeys,
	},
	{
		Name:        "bridge-session-lost",
		Description: "the bridge's Olm session row for the device is gone; the client keeps using its side",
		Wedge:       func(ctx context.Context, w *World) error { return deleteBridgeSessions(ctx, w, false) },
	},
	{
		Name:        "corrupt-session",
		Description: "the bridge's stored Olm session for the device cannot be unpickled",
		Wedge:       corruptBridgeSessions,
	},
	{
		Name: "restart-before-key-arrives",
		Description: "the bridge's session with the device is lost, with its Olm history, while the device is " +
			"offline; the bridge restarts before the device comes back and answers with the room keys",
		Wedge: func(ctx context.Context, w *World) error {
			w.Wedged().GoOffline()
			// The session's earlier states go too: from them the Olm history would decrypt the
			// device's room keys at once, and no key would wait for the device to come back,
			// which is what this scenario measures.
			return deleteBridgeSessions(ctx, w, true)
		},
		WhileWedged: func(ctx context.Context, w *World) error {
			// The bridge fails to decrypt, heals and asks for the keys; all of it waits on the
			// homeserver for the offline device while the bridge restarts. The restart waits
			// until the bridge has tried every message: bridgev2 acknowledges a transaction
			// before it handles its events, and one it has not reached yet would be lost with
			// the restart whatever happens to keys (a bridgev2 limitation the lab does not measure).
			if err := w.waitForDecryptAttempts(ctx, w.startedWedged, w.sentWedged); err != nil {
				return err
			}
			if err := w.Bridge.Stop(); err != nil {
				return err
			}
			if err := w.Bridge.Start(ctx); err != nil {
				return err
			}
			return w.Wedged().GoOnline(ctx)
		},
	},
	{
		Name: "fast-rotation",
		Description: "as bridge-restored-from-backup, with a client that starts a new Megolm session for " +
			"every message: a key lost over the broken session is asked for after its session was rotated away",
		Prepare:    snapshotBridgeCrypto,
		Wedge:      restoreBridgeCrypto,
		BeforeEach: rotateEveryMessage,
	},
	{
		Name: "restart-while-sending",
		Description: "the bridge is stopped (SIGTERM) as the device starts a new Megolm session and sends, " +
			"and started again while it keeps sending; no Olm session breaks",
		BeforeEach:  restartWhileSending,
		WhileWedged: startIfStopped,
	},
	{
		Name:        "many-devices",
		Description: "the user has three devices; only the first one's session is lost",
		Devices:     3,
		Wedge:       func(ctx context.Context, w *World) error { return deleteBridgeSessions(ctx, w, false) },
	},
}

// rotateEveryMessage starts a new Megolm session before each message, so that each message's key
// crosses Olm on its own.
func rotateEveryMessage(ctx context.Context, w *World, _ string, _, _ int) error {
	return w.Wedged().RotateRoomKey(ctx, w.Room)
}

// restartWhileSending stops the bridge before the wedged phase's first message, whose new Megolm
// session's key then goes out while the bridge is down, and starts it again before message
// ceil(k/2). Over /sync the key waits in the bot device's inbox; in appservice mode Synapse's
// catch-up transactions after the outage carry the room events but no to-device messages
// (synapse/storage/databases/main/appservice.py, get_oldest_unsent_txn): the key stays only in
// the bot device's inbox, which unwedge reads at startup, and otherwise only a key request or a
// re-share after a new Olm session can bring it.
//
// Nothing measured is in flight when the bridge stops: the churn's messages have arrived and no
// message of the phase has been sent. After the start the lab waits until the bridge has tried to
// decrypt every message sent while it was down (Synapse delivered them), so that the rest of the
// phase goes to a bridge that is back, not one Synapse still holds as down.
func restartWhileSending(ctx context.Context, w *World, phase string, i, k int) error {
	if phase != "wedged" {
		return nil
	}
	switch i {
	case 0:
		return w.StopBridge()
	case (k + 1) / 2:
		return startIfStopped(ctx, w)
	}
	return nil
}

// startIfStopped starts the bridge if the lab stopped it, and waits until it has tried to decrypt
// every message sent since.
func startIfStopped(ctx context.Context, w *World) error {
	n := len(w.downtimes)
	if n == 0 || !w.downtimes[n-1].to.IsZero() {
		return nil
	}
	stopped := w.downtimes[n-1].from
	if err := w.StartBridge(ctx); err != nil {
		return err
	}
	return w.waitForTried(ctx, stopped)
}

// The client-restored-reused-index scenarios restore a client's whole crypto state after both
// Olm ratchets moved on, as a client restored from a real backup does (MSC1719's first example),
// unlike client-restored-from-backup, whose traffic after the backup leaves the restored client's
// next message decryptable. Each round after the backup is one Olm message each way (bridgeSpeaks,
// deviceSpeaks), four in all with the runner's two churn exchanges. goolm's ratchet
// (crypto/goolm/ratchet/olm.go) then fails the restored client's first Olm message:
//
//   - backup after the bridge's message (client-restored-reused-index): the restored client starts
//     a new sending chain from its root key and the bridge's ratchet key as they were at the
//     backup. The bridge derives the chain from its current root key and ratchet private key, the
//     fourth since; the earlier ones are gone, so the chain is wrong: "decrypt from existing
//     chain: ... (bad mac)".
//   - backup after the client's own message (client-restored-reused-index-own): the client sends
//     once more on the same chain after the backup, so the bridge consumes the index the restored
//     client reuses. The bridge still keeps that receiving chain (goolm keeps five; this is the
//     fifth newest) but not the used key: "decrypt: message key not found".
//
// Under Element X's rules (no answer to key requests; the current session shared again from its
// current index after a new Olm session) the room key that went over the failed Olm message is
// lost unless the bridge can decrypt that message.

// backupAfter runs speak, which ends with one side's Olm message, takes the client's backup right
// after it, then one round each way so that both ratchets move on before the runner's churn.
func (w *World) backupAfter(ctx context.Context, speak func(context.Context) error) error {
	if err := speak(ctx); err != nil {
		return err
	}
	if err := w.Wedged().Snapshot(ctx, filepath.Join(w.Dir, "client-backup.db")); err != nil {
		return err
	}
	// The client's first Olm message after the backup. After the client's own message it goes
	// on the same chain, at the index the restored client will use again.
	if err := w.deviceSpeaks(ctx, "after-backup-0"); err != nil {
		return err
	}
	if err := w.bridgeSpeaks(ctx); err != nil {
		return err
	}
	return w.deviceSpeaks(ctx, "after-backup-1")
}

// restoreBackup restores the client's whole crypto state from backupAfter's backup.
func (w *World) restoreBackup(ctx context.Context) error {
	return w.Wedged().Restore(ctx, filepath.Join(w.Dir, "client-backup.db"))
}

// managementCommands are what a Management scenario's user sends in each phase, and how the bot's
// answer begins. Both commands work without a login (the first one's answer says there is none,
// the second's that the room is the user's management room), and the answers tell the phases apart.
var managementCommands = map[string]struct{ command, answer string }{
	"wedged": {"list-logins", "You're not logged in"},
	"after":  {"help", "This is your management room"},
}

// ScenarioByName finds a scenario.
func ScenarioByName(name string) (*Scenario, bool) {
	for _, s := range Scenarios {
		if s.Name == name {
			return s, true
		}
	}
	return nil, false
}

const snapshotPrefix = "lab_snapshot_"

// cryptoTables lists the tables of the bridge's end-to-bridge encryption state: mautrix-go's
// crypto store (crypto_*) and, with unwedge, unwedge's (unwedge_*), which a backup of the
// bridge's database holds as well.
func cryptoTables(ctx context.Context, w *World) ([]string, error) {
	db, err := sql.Open("postgres", w.DBURI)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND (tablename LIKE 'crypto\_%' OR tablename LIKE 'unwedge\_%') ORDER BY tablename`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var tables []string
	for rows.Next() {
		var name string
		if err = rows.Scan(&name); err != nil {
			return nil, err
		}
		tables = append(tables, name)
	}
	if len(tables) == 0 {
		return nil, fmt.Errorf("no crypto tables in the bridge's database")
	}
	return tables, rows.Err()
}

// snapshotBridgeCrypto is the backup: a copy of every crypto table, taken with the bridge stopped.
func snapshotBridgeCrypto(ctx context.Context, w *World) error {
	tables, err := cryptoTables(ctx, w)
	if err != nil {
		return err
	}
	return w.WithBridgeStopped(ctx, func() error {
		stmts := make([]string, len(tables))
		for i, table := range tables {
			stmts[i] = fmt.Sprintf("CREATE TABLE %s AS SELECT * FROM %s", pq.QuoteIdentifier(snapshotPrefix+table), pq.QuoteIdentifier(table))
		}
		return w.SQL(ctx, stmts...)
	})
}

// restoreBridgeCrypto puts the backup back: Olm ratchets, one-time keys, Megolm sessions, the
// sync token and unwedge's tables all go back in time; the rest of the bridge's database is kept.
func restoreBridgeCrypto(ctx context.Context, w *World) error {
	tables, err := cryptoTables(ctx, w)
	if err != nil {
		return err
	}
	return w.WithBridgeStopped(ctx, func() error {
		quoted := make([]string, len(tables))
		for i, table := range tables {
			quoted[i] = pq.QuoteIdentifier(table)
		}
		stmts := []string{"TRUNCATE " + strings.Join(quoted, ", ")}
		for i, table := range tables {
			stmts = append(stmts, fmt.Sprintf("INSERT INTO %s SELECT * FROM %s", quoted[i], pq.QuoteIdentifier(snapshotPrefix+table)))
		}
		return w.SQL(ctx, stmts...)
	})
}

// deleteBridgeSessions deletes the bridge's Olm sessions with the wedged device, and with
// history, unwedge's Olm history of them too (a stock bridge has none).
func deleteBridgeSessions(ctx context.Context, w *World, history bool) error {
	key := pq.QuoteLiteral(string(w.Wedged().IdentityKey()))
	stmts := []string{fmt.Sprintf("DELETE FROM crypto_olm_session WHERE sender_key = %s", key)}
	if history && !w.Stock {
		stmts = append(stmts, fmt.Sprintf("DELETE FROM unwedge_olm_history WHERE sender_key = %s", key))
	}
	return w.WithBridgeStopped(ctx, func() error { return w.SQL(ctx, stmts...) })
}

func corruptBridgeSessions(ctx context.Context, w *World) error {
	return w.WithBridgeStopped(ctx, func() error {
		return w.SQL(ctx, fmt.Sprintf("UPDATE crypto_olm_session SET session = convert_to('not an olm pickle', 'UTF8') WHERE sender_key = %s",
			pq.QuoteLiteral(string(w.Wedged().IdentityKey()))))
	})
}

// expireOneTimeKeys makes the bridge forget the private halves of every one-time key it has
// published (they stay on the server), then makes the client drop its sessions with the bridge,
// so that the client's next to-device message opens a session with a key the bridge lacks.
func expireOneTimeKeys(ctx context.Context, w *World) error {
	bridgeDevice, err := w.BridgeDevice(ctx)
	if err != nil {
		return err
	}
	err = w.WithBridgeStopped(ctx, func() error {
		db, err := sql.Open("postgres", w.DBURI)
		if err != nil {
			return err
		}
		defer db.Close()
		var accountID string
		var pickled []byte
		if err = db.QueryRowContext(ctx, "SELECT account_id, account FROM crypto_account").Scan(&accountID, &pickled); err != nil {
			return fmt.Errorf("failed to read the bridge's account: %w", err)
		}
		key := []byte(w.Bridge.PickleKey())
		acc, err := account.AccountFromPickled(pickled, key)
		if err != nil {
			return fmt.Errorf("failed to unpickle the bridge's account: %w", err)
		}
		if len(acc.OTKeys) == 0 {
			return fmt.Errorf("the bridge's account has no one-time keys to expire")
		}
		acc.OTKeys = nil
		if pickled, err = acc.Pickle(key); err != nil {
			return err
		}
		_, err = db.ExecContext(ctx, "UPDATE crypto_account SET account = $1 WHERE account_id = $2", pickled, accountID)
		return err
	})
	if err != nil {
		return err
	}
	client := w.Wedged()
	store := client.Machine().CryptoStore
	sessions, err := store.GetSessions(ctx, bridgeDevice.IdentityKey)
	if err != nil {
		return err
	}
	for _, sess := range sessions {
		if err = store.DeleteSession(ctx, bridgeDevice.IdentityKey, sess); err != nil {
			return err
		}
	}
	// The crypto store caches Olm sessions: reload the client from its own database.
	reload := filepath.Join(w.Dir, "client-reload.db")
	if err = client.Snapshot(ctx, reload); err != nil {
		return err
	}
	return client.Restore(ctx, reload)
}
