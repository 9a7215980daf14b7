package testclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	// Registers the sqlite3-fk-wal driver (mattn/go-sqlite3, so it needs cgo). mautrix's
	// cryptohelper relies on the same side effect.
	_ "go.mau.fi/util/dbutil/litestream"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"
)

// sqliteDriver is the database/sql driver for the client's files: foreign keys on, WAL.
const sqliteDriver = "sqlite3-fk-wal"

func openSQLite(path string) (*dbutil.Database, error) {
	db, err := dbutil.NewWithDialect("file:"+path+"?_txlock=immediate", sqliteDriver)
	if err != nil {
		return nil, fmt.Errorf("failed to open %s: %w", path, err)
	}
	return db, nil
}

// stateStore is the room state (membership, encryption, history visibility) the Olm machine
// needs. It lives in its own file so that Restore rolls back the crypto state only.
type stateStore struct {
	db    *dbutil.Database
	store *sqlstatestore.SQLStateStore
}

func openStateStore(ctx context.Context, path string, log zerolog.Logger) (*stateStore, error) {
	db, err := openSQLite(path)
	if err != nil {
		return nil, err
	}
	store := sqlstatestore.NewSQLStateStore(db, dbutil.ZeroLogger(dbLog(log, "matrix_state")), false)
	if err = store.Upgrade(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("failed to upgrade state store: %w", err)
	}
	return &stateStore{db: db, store: store}, nil
}

func (s *stateStore) close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("failed to close state store: %w", err)
	}
	return nil
}

// cryptoState is one opening of the crypto database and the Olm machine on top of it.
type cryptoState struct {
	db     *dbutil.Database
	store  *crypto.SQLCryptoStore
	shares *shareLog
	mach   *crypto.OlmMachine
}

func (cs *cryptoState) close() error {
	cs.mach.Destroy()
	if err := cs.db.Close(); err != nil {
		return fmt.Errorf("failed to close crypto store: %w", err)
	}
	return nil
}

func (c *Client) cryptoPath() string {
	return filepath.Join(c.dataDir, c.cli.DeviceID.String()+"-crypto.db")
}

func (c *Client) statePath() string {
	return filepath.Join(c.dataDir, c.cli.DeviceID.String()+"-state.db")
}

// openCrypto opens the crypto database and loads (or creates) the Olm account.
func (c *Client) openCrypto(ctx context.Context) (*cryptoState, error) {
	db, err := openSQLite(c.cryptoPath())
	if err != nil {
		return nil, err
	}
	log := c.log.With().Str("component", "crypto").Logger()
	store := crypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(dbLog(log, "crypto")), c.cli.UserID.String(), c.cli.DeviceID, c.pickle)
	if err = store.DB.Upgrade(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("failed to upgrade crypto store: %w", err)
	}
	shares, err := openShareLog(ctx, db, log)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	watch := &olmWatch{SQLCryptoStore: store, hist: &c.hist}
	if c.rules.element() {
		watch.shares = shares
	}
	mach := crypto.NewOlmMachine(c.cli, &log, watch, c.stateDB.store)
	mach.SetBackgroundCtx(c.lifetime)
	if err = mach.Load(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("failed to load olm account: %w", err)
	}
	mach.SessionReceived = func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, _ uint32) {
		c.retryDecryption(ctx, mach, roomID, sessionID)
	}
	cs := &cryptoState{db: db, store: store, shares: shares, mach: mach}
	mach.AllowKeyShare = c.allowKeyShare(cs, mach.AllowKeyShare)
	return cs, nil
}

// RotateRoomKey discards the room's outbound Megolm session, so the next message sent to the
// room starts a new session and shares its key over Olm with every member's devices.
func (c *Client) RotateRoomKey(ctx context.Context, roomID id.RoomID) error {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return errClosed
	}
	if err := cs.store.RemoveOutboundGroupSession(ctx, roomID); err != nil {
		return fmt.Errorf("failed to discard outbound group session of %s: %w", roomID, err)
	}
	c.log.Debug().Stringer("room_id", roomID).Msg("Discarded outbound group session")
	return nil
}

// RequestRoomKey asks the sender's device and the client's own other devices for the room key of
// an undecryptable event (m.room_key_request), as Element does for messages it cannot decrypt.
// The event is decrypted when a forwarded key arrives.
func (c *Client) RequestRoomKey(ctx context.Context, evt *event.Event) error {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return fmt.Errorf("event %s is not encrypted", evt.ID)
	}
	//lint:ignore SA1019 deprecated, but still sent by clients and the only hint at the sender's device
	senderDevice := content.DeviceID
	if senderDevice == "" {
		senderDevice = "*"
	}
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return errClosed
	}
	err := cs.mach.SendRoomKeyRequest(ctx, evt.RoomID, content.SenderKey, content.SessionID, "", map[id.UserID][]id.DeviceID{
		evt.Sender:   {senderDevice},
		c.cli.UserID: {"*"},
	})
	if err != nil {
		return fmt.Errorf("failed to request room key %s: %w", content.SessionID, err)
	}
	c.log.Debug().Stringer("event_id", evt.ID).Stringer("session_id", content.SessionID).Msg("Requested room key")
	return nil
}

// OutboundSessionID returns the ID of the room's current outbound Megolm session, or "" if there
// is none (nothing sent yet, or rotated).
func (c *Client) OutboundSessionID(ctx context.Context, roomID id.RoomID) (id.SessionID, error) {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return "", errClosed
	}
	sess, err := cs.store.GetOutboundGroupSession(ctx, roomID)
	if err != nil {
		return "", fmt.Errorf("failed to get outbound group session of %s: %w", roomID, err)
	} else if sess == nil {
		return "", nil
	}
	return sess.ID(), nil
}

// HasRoomKey reports whether the client holds the inbound Megolm session (room key) with the ID.
func (c *Client) HasRoomKey(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (bool, error) {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return false, errClosed
	}
	sess, err := cs.store.GetGroupSession(ctx, roomID, sessionID)
	if errors.Is(err, crypto.ErrGroupSessionWithheld) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("failed to get inbound group session %s: %w", sessionID, err)
	}
	return sess != nil, nil
}

// Snapshot writes a consistent copy of the client's crypto state (Olm account, Olm sessions,
// Megolm sessions, device list) to path, replacing any file there. It does not stop syncing.
func (c *Client) Snapshot(ctx context.Context, path string) error {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	cs := c.crypto.Load()
	if cs == nil {
		return errClosed
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("failed to remove old snapshot: %w", err)
	}
	if _, err := cs.db.RawDB.ExecContext(ctx, "VACUUM INTO ?", path); err != nil {
		return fmt.Errorf("failed to snapshot crypto store to %s: %w", path, err)
	}
	c.log.Debug().Str("path", path).Msg("Snapshotted crypto state")
	return nil
}

// Restore stops syncing, replaces the client's crypto state with a snapshot taken by Snapshot
// and starts syncing again. The client then uses the Olm and Megolm state of the snapshot: Olm
// ratchets and one-time keys roll back, and room keys received after the snapshot are gone.
// This is what a client restored from a backup does.
//
// The sync position is kept (timeline events are not replayed), and so are the room state and
// the message history. Machine returns a new OlmMachine afterwards.
func (c *Client) Restore(ctx context.Context, path string) error {
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("failed to restore crypto state: %w", err)
	}
	c.stopSyncing()
	if err := c.swapCrypto(ctx, path); err != nil {
		return err
	}
	c.log.Info().Str("path", path).Msg("Restored crypto state from snapshot")
	return c.startSyncing(ctx)
}

func (c *Client) swapCrypto(ctx context.Context, path string) error {
	c.cryptoLock.Lock()
	defer c.cryptoLock.Unlock()
	old := c.crypto.Load()
	if old == nil {
		return errClosed
	}
	nextBatch, err := old.store.GetNextBatch(ctx)
	if err != nil {
		return fmt.Errorf("failed to read sync position: %w", err)
	}
	c.crypto.Store(nil)
	if err = old.close(); err != nil {
		return err
	}
	dst := c.cryptoPath()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err = os.Remove(dst + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("failed to remove crypto store file: %w", err)
		}
	}
	if err = copyFile(path, dst); err != nil {
		return err
	}
	cs, err := c.openCrypto(ctx)
	if err != nil {
		return err
	}
	if cs.mach.GetAccount() == nil || !cs.mach.GetAccount().Shared {
		_ = cs.close()
		return fmt.Errorf("snapshot %s holds no published Olm account", path)
	} else if key := cs.mach.OwnIdentity().IdentityKey; key != c.identity {
		_ = cs.close()
		return fmt.Errorf("snapshot %s belongs to another device (identity key %s, want %s)", path, key, c.identity)
	}
	if err = cs.store.PutNextBatch(ctx, nextBatch); err != nil {
		_ = cs.close()
		return fmt.Errorf("failed to keep sync position: %w", err)
	}
	c.crypto.Store(cs)
	c.cli.Store = cs.store
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("failed to open snapshot: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("failed to create crypto store file: %w", err)
	}
	if _, err = io.Copy(out, in); err != nil {
		_ = out.Close()
		return fmt.Errorf("failed to copy snapshot: %w", err)
	}
	if err = out.Close(); err != nil {
		return fmt.Errorf("failed to write crypto store file: %w", err)
	}
	return nil
}

var errClosed = errors.New("testclient: client is closed")
