// Package testclient is an end-to-end-encrypted Matrix client for tests: the stand-in for a
// user's Element. It registers or logs in a user, keeps its Olm/Megolm state in a SQLite file in
// its data directory, syncs in the background, joins every room it is invited to, shares room
// keys with every device of the room's members, and keeps a history of the messages it could and
// could not decrypt. Snapshot and Restore copy and roll back its crypto state, which is how the
// wedge lab reproduces "a client restored from a backup".
//
// Options.Rules picks whose key-sharing behaviour it has (rules.go): mautrix-go's, which answers
// any key request for a session it shared (the default), Element Web's or Element X's
// (matrix-rust-sdk's), which answer few or none but share the current room key again with a
// device that started a new Olm session (shares.go). KeyRequests tells what it answered.
//
// Olm comes from mautrix-go; build with -tags goolm for the pure-Go implementation.
package testclient

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/exsync"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// Options configure New.
type Options struct {
	// HomeserverURL is the client-server API base URL, e.g. http://127.0.0.1:8008.
	HomeserverURL string
	// Username is the localpart. The user is registered (m.login.dummy) if it does not exist yet.
	Username string
	// Password must be at least 8 characters.
	Password string
	// DeviceID logs in as this device, reusing its crypto state in DataDir if there is any.
	// When empty, every New logs in as a new device.
	DeviceID id.DeviceID
	// DeviceName is the device's display name (default "unwedge testclient").
	DeviceName string
	// DataDir holds the client's SQLite files (required). One Client at a time per device.
	DataDir string
	// Rules is whose key-sharing behaviour the client follows (default RulesMautrix). Setting
	// Machine().AllowKeyShare replaces how the rules answer key requests, until Restore.
	Rules Rules
	// Log receives the client's and mautrix's logs. The zero value discards them.
	Log zerolog.Logger
}

// Client is an end-to-end-encrypted Matrix client. Its methods are safe for concurrent use.
type Client struct {
	cli      *mautrix.Client
	log      zerolog.Logger
	dataDir  string
	pickle   []byte
	stateDB  *stateStore
	identity id.IdentityKey
	rules    Rules

	// sendLock serializes sharing and encrypting per room.
	sendLock exsync.KeyedMutex[id.RoomID]

	// cryptoLock is held for reading by operations that use the crypto state and for writing by
	// Restore while it swaps the state. The sync loop is stopped before the swap instead.
	cryptoLock sync.RWMutex
	crypto     atomic.Pointer[cryptoState]

	// lifetime is canceled by Close; it bounds all background work.
	lifetime       context.Context
	cancelLifetime context.CancelFunc
	background     sync.WaitGroup

	syncLock   sync.Mutex // guards stopSync and syncDone
	stopSync   context.CancelFunc
	syncDone   chan struct{}
	syncFailed atomic.Pointer[error]

	hist history

	closeOnce sync.Once
	closeErr  error
}

// New logs the user in (registering it first if needed), sets up its crypto state, starts
// syncing in the background and returns once the first sync has been processed.
func New(ctx context.Context, opts Options) (*Client, error) {
	if opts.HomeserverURL == "" || opts.Username == "" || opts.DataDir == "" {
		return nil, errors.New("testclient: HomeserverURL, Username and DataDir are required")
	} else if len(opts.Password) < 8 {
		return nil, errors.New("testclient: Password must be at least 8 characters")
	} else if strings.ContainsAny(opts.DeviceID.String(), `/\`) {
		return nil, fmt.Errorf("testclient: invalid device ID %q", opts.DeviceID)
	}
	if opts.Rules == "" {
		opts.Rules = RulesMautrix
	} else if _, err := ParseRules(string(opts.Rules)); err != nil {
		return nil, fmt.Errorf("testclient: %w", err)
	}
	if opts.DeviceName == "" {
		opts.DeviceName = "unwedge testclient"
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("failed to create data dir: %w", err)
	}
	cli, err := mautrix.NewClient(opts.HomeserverURL, "", "")
	if err != nil {
		return nil, fmt.Errorf("failed to create mautrix client: %w", err)
	}
	cli.Log = opts.Log.Hook(quietCancel{})
	if err = logIn(ctx, cli, opts); err != nil {
		return nil, err
	}
	log := opts.Log.With().
		Str("component", "testclient").
		Stringer("user_id", cli.UserID).
		Stringer("device_id", cli.DeviceID).
		Logger()
	cli.Log = log.Hook(quietCancel{})
	c := &Client{
		cli:     cli,
		log:     log,
		dataDir: opts.DataDir,
		pickle:  pickleKey(cli.UserID, cli.DeviceID),
		rules:   opts.Rules,
		hist:    newHistory(),
	}
	c.lifetime, c.cancelLifetime = context.WithCancel(log.WithContext(context.Background()))
	if err = c.init(ctx); err != nil {
		_ = c.Close()
		return nil, err
	}
	log.Info().Stringer("rules", opts.Rules).Msg("Test client ready")
	return c, nil
}

func (c *Client) init(ctx context.Context) error {
	var err error
	c.stateDB, err = openStateStore(ctx, c.statePath(), c.log)
	if err != nil {
		return err
	}
	c.cli.StateStore = c.stateDB.store
	cs, err := c.openCrypto(ctx)
	if err != nil {
		return err
	}
	c.crypto.Store(cs)
	c.cli.Store = cs.store
	if err = c.publishDeviceKeys(ctx, cs.mach); err != nil {
		return err
	}
	c.identity = cs.mach.OwnIdentity().IdentityKey
	c.cli.Syncer = c.newSyncer()
	return c.startSyncing(ctx)
}

// logIn registers the user through open registration, or logs in if it already exists.
func logIn(ctx context.Context, cli *mautrix.Client, opts Options) error {
	reg, err := cli.RegisterDummy(ctx, &mautrix.ReqRegister[any]{
		Username:                 opts.Username,
		Password:                 opts.Password,
		DeviceID:                 opts.DeviceID,
		InitialDeviceDisplayName: opts.DeviceName,
	})
	if err == nil {
		cli.UserID, cli.DeviceID, cli.AccessToken = reg.UserID, reg.DeviceID, reg.AccessToken
		return nil
	} else if !errors.Is(err, mautrix.MUserInUse) {
		return fmt.Errorf("failed to register %s: %w", opts.Username, err)
	}
	_, err = cli.Login(ctx, &mautrix.ReqLogin{
		Type:                     mautrix.AuthTypePassword,
		Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: opts.Username},
		Password:                 opts.Password,
		DeviceID:                 opts.DeviceID,
		InitialDeviceDisplayName: opts.DeviceName,
		StoreCredentials:         true,
	})
	if err != nil {
		return fmt.Errorf("failed to log in as existing user %s: %w", opts.Username, err)
	}
	return nil
}

// pickleKey is fixed per user and device, so a device's crypto state can be reopened.
func pickleKey(userID id.UserID, deviceID id.DeviceID) []byte {
	sum := sha256.Sum256([]byte("unwedge testclient pickle key\x00" + userID.String() + "\x00" + deviceID.String()))
	return sum[:]
}

// publishDeviceKeys uploads the device keys and one-time keys of a new Olm account, and checks
// that the keys on the server match a reopened one.
func (c *Client) publishDeviceKeys(ctx context.Context, mach *crypto.OlmMachine) error {
	resp, err := c.cli.QueryKeys(ctx, &mautrix.ReqQueryKeys{
		DeviceKeys: map[id.UserID]mautrix.DeviceIDList{c.cli.UserID: {c.cli.DeviceID}},
	})
	if err != nil {
		return fmt.Errorf("failed to query own device keys: %w", err)
	}
	shared := mach.GetAccount().Shared
	device, onServer := resp.DeviceKeys[c.cli.UserID][c.cli.DeviceID]
	switch {
	case !onServer || len(device.Keys) == 0:
		if shared {
			return fmt.Errorf("device %s has crypto state in %s but no keys on the server", c.cli.DeviceID, c.dataDir)
		}
		if err = mach.ShareKeys(ctx, -1); err != nil {
			return fmt.Errorf("failed to upload device keys: %w", err)
		}
		c.log.Debug().Msg("Uploaded device keys")
	case !shared:
		return fmt.Errorf("device %s already has keys on the server but no crypto state in %s", c.cli.DeviceID, c.dataDir)
	case device.Keys.GetEd25519(c.cli.DeviceID) != mach.OwnIdentity().SigningKey:
		return fmt.Errorf("device %s has a different signing key on the server than in %s", c.cli.DeviceID, c.dataDir)
	}
	return nil
}

// UserID returns the client's user ID.
func (c *Client) UserID() id.UserID { return c.cli.UserID }

// DeviceID returns the client's device ID.
func (c *Client) DeviceID() id.DeviceID { return c.cli.DeviceID }

// IdentityKey returns the device's Curve25519 identity key.
func (c *Client) IdentityKey() id.IdentityKey { return c.identity }

// Rules returns whose key-sharing behaviour the client follows.
func (c *Client) Rules() Rules { return c.rules }

// Mautrix returns the underlying mautrix client. Events sent through it are not encrypted.
func (c *Client) Mautrix() *mautrix.Client { return c.cli }

// Machine returns the current Olm machine. Restore replaces it, so do not keep it across one.
func (c *Client) Machine() *crypto.OlmMachine {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	return c.crypto.Load().mach
}

// ForgetRoomKey deletes a Megolm session from the client's crypto store (or the withheld notice
// stored in its place), as if the client never had it.
func (c *Client) ForgetRoomKey(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) error {
	c.cryptoLock.RLock()
	defer c.cryptoLock.RUnlock()
	store := c.crypto.Load().store
	if _, err := store.DB.Exec(ctx, "DELETE FROM crypto_megolm_inbound_session WHERE account_id=$1 AND room_id=$2 AND session_id=$3",
		store.AccountID, roomID, sessionID); err != nil {
		return fmt.Errorf("failed to forget room key %s: %w", sessionID, err)
	}
	return nil
}

// SyncError returns the error that stopped the sync loop for good (an invalid access token), or nil.
func (c *Client) SyncError() error {
	if err := c.syncFailed.Load(); err != nil {
		return *err
	}
	return nil
}

// Close stops syncing and all background work and closes the client's databases. The device
// stays logged in, so a new Client with the same DataDir and DeviceID can take over.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.stopSyncing()
		c.cancelLifetime()
		c.background.Wait()
		c.cryptoLock.Lock()
		defer c.cryptoLock.Unlock()
		var errs []error
		if cs := c.crypto.Swap(nil); cs != nil {
			errs = append(errs, cs.close())
		}
		if c.stateDB != nil {
			errs = append(errs, c.stateDB.close())
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// quietCancel drops mautrix's "Request canceled" warnings: requests are canceled on purpose when
// the sync loop stops.
type quietCancel struct{}

func (quietCancel) Run(e *zerolog.Event, _ zerolog.Level, msg string) {
	if msg == "Request canceled" {
		e.Discard()
	}
}

// dbLog is the logger for the client's databases: schema upgrades and queries are noise in tests.
func dbLog(log zerolog.Logger, section string) zerolog.Logger {
	return log.Level(max(log.GetLevel(), zerolog.WarnLevel)).With().Str("db_section", section).Logger()
}

// retryDelay is how long the sync loop and invite handling wait after a failure.
const retryDelay = 500 * time.Millisecond
