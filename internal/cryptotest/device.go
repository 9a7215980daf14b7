package cryptotest

import (
	"fmt"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// PickleKey is the key the devices' SQL stores pickle their secrets with.
const PickleKey = "pickle key"

// Store says where a device keeps its crypto state, and what its machine sees of it.
type Store struct {
	// DB holds mautrix-go's SQL crypto store, with the device's ID as its account; nil keeps the
	// state in mautrix-go's memory store (which lasts as long as the Device, over restarts).
	DB *dbutil.Database
	// Shared, when set, wraps the store in unwedge's, as the bridge's is; nil leaves it stock.
	Shared unwedge.SharedIndex
	// History, with Shared, is the Olm history unwedge's store keeps; nil keeps none.
	History *unwedge.History
	// Wrap, when set, wraps the store under unwedge's, for failures of a database that a real one
	// cannot produce on demand.
	Wrap func(crypto.Store) crypto.Store
}

// Device is one logged-in device with a real OlmMachine.
type Device struct {
	UserID   id.UserID
	DeviceID id.DeviceID
	Client   *mautrix.Client
	Mach     *crypto.OlmMachine
	// SQL is the SQL crypto store under the machine's; nil on a memory store.
	SQL *crypto.SQLCryptoStore
	// Wrapped is the machine's store when it is unwedge's (Store.Shared is set), else nil.
	Wrapped *unwedge.Store
	// Unwedger, when set, gets the device's to-device events (Handle) instead of its machine, as
	// the bridge's transport hands them over.
	Unwedger *unwedge.Unwedger

	// Store and Log are what Restart loads the machine with: change them before a restart to
	// restart differently (stock, or with a failing store).
	Store Store
	Log   zerolog.Logger

	t      testing.TB
	memory crypto.Store
}

// Open loads a machine for a client that is logged in, on store: for a client of a homeserver
// other than Homeserver (the local Synapse); Homeserver.NewDevice is Login, Open and uploading
// the device's keys.
func Open(t testing.TB, client *mautrix.Client, store Store, log zerolog.Logger) *Device {
	t.Helper()
	d := &Device{UserID: client.UserID, DeviceID: client.DeviceID, Client: client, Store: store, Log: log, t: t}
	d.load()
	return d
}

// Restart stops the device's Unwedger, if it has one, and loads its machine again from its
// store, as a restarted process does: nothing in memory but a memory store.
func (d *Device) Restart() {
	d.t.Helper()
	if d.Unwedger != nil {
		d.Unwedger.Stop()
		d.Unwedger = nil
	}
	d.load()
}

func (d *Device) load() {
	d.t.Helper()
	ctx := d.t.Context()
	var store crypto.Store
	if d.Store.DB != nil {
		d.SQL = crypto.NewSQLCryptoStore(d.Store.DB, dbutil.ZeroLogger(zerolog.Nop()), string(d.DeviceID), d.DeviceID, []byte(PickleKey))
		if err := d.SQL.DB.Upgrade(ctx); err != nil {
			d.t.Fatal(err)
		}
		store = d.SQL
	} else {
		if d.memory == nil {
			d.memory = crypto.NewMemoryStore(nil)
		}
		d.SQL, store = nil, d.memory
	}
	if d.Store.Wrap != nil {
		store = d.Store.Wrap(store)
	}
	d.Wrapped = nil
	if d.Store.Shared != nil {
		d.Wrapped = unwedge.NewStore(store, d.Store.Shared, d.Store.History)
		store = d.Wrapped
	}
	log := d.Log.With().Stringer("device_id", d.DeviceID).Logger()
	d.Mach = crypto.NewOlmMachine(d.Client, &log, store, mautrix.NewMemoryStateStore().(crypto.StateStore))
	if err := d.Mach.Load(ctx); err != nil {
		d.t.Fatal(err)
	}
}

// IdentityKey is the device's own Curve25519 key.
func (d *Device) IdentityKey() id.IdentityKey { return d.Mach.OwnIdentity().IdentityKey }

// Fetch returns a device as this device's machine knows it, asking the homeserver if it does not.
func (d *Device) Fetch(userID id.UserID, deviceID id.DeviceID) *id.Device {
	d.t.Helper()
	dev, err := d.Mach.GetOrFetchDevice(d.t.Context(), userID, deviceID)
	if err != nil {
		d.t.Fatal(err)
	}
	return dev
}

// SendDummy sends an m.dummy to another device over the latest session with it, opening one
// (claiming a key) if there is none.
func (d *Device) SendDummy(to *Device) {
	d.t.Helper()
	if err := d.Mach.SendEncryptedToDevice(d.t.Context(), d.Fetch(to.UserID, to.DeviceID), event.ToDeviceDummy, event.Content{}); err != nil {
		d.t.Fatal(err)
	}
}

// Handle hands a to-device event to the device: to its Unwedger if it has one, else its machine.
func (d *Device) Handle(evt *event.Event) {
	if d.Unwedger != nil {
		d.Unwedger.HandleToDevice(d.t.Context(), evt)
	} else {
		d.Mach.HandleToDeviceEvent(d.t.Context(), evt)
	}
}

// Unwedging says how Device.Unwedge makes an Unwedger.
type Unwedging struct {
	Config unwedge.Config
	Ledger unwedge.Ledger
	// Audience is whose devices it heals; nil: everyone's.
	Audience unwedge.Audience
	Repair   bool
	// Owner names the process in the ledger's leases; "": a name of its own.
	Owner string
	// Log, when set, is where it logs instead of the device's Log.
	Log *zerolog.Logger
	// Replacing, Followers and Observer are unwedge.Parts'.
	Replacing *unwedge.Replacing
	Followers unwedge.Followers
	Observer  func(unwedge.Decision)
}

// Unwedge puts an Unwedger on the device's machine, stopped when the test ends (or the device
// restarts), and routes the device's to-device events through it.
func (d *Device) Unwedge(opts Unwedging) *unwedge.Unwedger {
	d.t.Helper()
	// On an SQL store, the bridge's tables: unreadable sessions are deleted, and identity keys
	// checked for a second owner.
	var tables unwedge.Tables
	if d.SQL != nil {
		tables = &unwedge.CryptoTables{DB: d.SQL.DB, AccountID: string(d.DeviceID), PickleKey: []byte(PickleKey)}
	}
	if opts.Audience == nil {
		opts.Audience = Everyone{}
	}
	if opts.Owner == "" {
		opts.Owner = fmt.Sprintf("%s-%p", d.DeviceID, d.Mach)
	}
	log := d.Log
	if opts.Log != nil {
		log = *opts.Log
	}
	u, err := unwedge.New(opts.Config, d.Mach, unwedge.Parts{
		Store: d.Wrapped, Ledger: opts.Ledger, Audience: opts.Audience, Tables: tables,
		Replacing: opts.Replacing, Followers: opts.Followers, Observer: opts.Observer,
	}, opts.Owner, log)
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(u.Stop)
	d.Unwedger = u
	return u
}
