package cryptotest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/mockserver"
)

// Homeserver is mautrix-go's in-memory homeserver (mockserver) behind a handler that serializes
// it (its maps are not synchronized), counts what clients ask of it, and injects the failures a
// real homeserver cannot produce on demand.
type Homeserver struct {
	// Log is what the machines and Unwedgers of the devices made from now on log to: warnings in
	// the test's log (Logger); benchmarks set zerolog.Nop().
	Log zerolog.Logger

	t    testing.TB
	ms   *mockserver.MockServer
	srv  *httptest.Server
	lock sync.Mutex // serializes ms

	claims, claimedKeys, queries atomic.Int64
	toDevice                     sync.Map // event type -> *atomic.Int64 of messages
	toDeviceRequests             sync.Map // event type -> *atomic.Int64 of requests

	faultLock   sync.Mutex
	failClaims  int
	loseClaims  int
	lostAnswer  func(w http.ResponseWriter)
	failQueries int
	failSends   map[string]int // access token -> sends to fail
	keyRequests []KeyRequest
	// discardToDevice: to-device messages are counted, not kept (DiscardToDevice).
	discardToDevice atomic.Bool
}

// KeyRequest is an m.room_key_request a client sent through the homeserver: to which device, for
// which Megolm session.
type KeyRequest struct {
	To        id.UserID
	Device    id.DeviceID
	SessionID id.SessionID
}

// NewHomeserver starts an in-memory homeserver, stopped when the test ends.
func NewHomeserver(t testing.TB) *Homeserver {
	hs := &Homeserver{Log: Logger(t), t: t, ms: mockserver.Create(t), failSends: map[string]int{}}
	hs.srv = httptest.NewServer(http.HandlerFunc(hs.serve))
	t.Cleanup(hs.srv.Close)
	return hs
}

const (
	pathClaim    = "/_matrix/client/v3/keys/claim"
	pathQuery    = "/_matrix/client/v3/keys/query"
	pathToDevice = "/_matrix/client/v3/sendToDevice/"
)

func (hs *Homeserver) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/account_data/"):
		// mockserver stores account data but does not serve it.
		hs.getAccountData(w, r)
		return
	case r.URL.Path == pathQuery:
		hs.queries.Add(1)
		if hs.takeFault(&hs.failQueries) {
			http.Error(w, "homeserver unreachable", http.StatusBadGateway)
			return
		}
	case r.URL.Path == pathClaim:
		hs.countClaim(r)
		if hs.takeFault(&hs.failClaims) {
			http.Error(w, `{"errcode":"M_UNKNOWN","error":"overloaded"}`, http.StatusServiceUnavailable)
			return
		}
		if hs.takeFault(&hs.loseClaims) {
			hs.lock.Lock()
			hs.ms.Router.ServeHTTP(httptest.NewRecorder(), r)
			hs.lock.Unlock()
			hs.faultLock.Lock()
			answer := hs.lostAnswer
			hs.faultLock.Unlock()
			answer(w)
			return
		}
	case strings.HasPrefix(r.URL.Path, pathToDevice):
		evtType, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, pathToDevice), "/")
		requests, _ := hs.toDeviceRequests.LoadOrStore(evtType, &atomic.Int64{})
		requests.(*atomic.Int64).Add(1)
		if hs.failSend(r) {
			http.Error(w, "homeserver unreachable", http.StatusBadGateway)
			return
		}
		hs.countToDevice(r)
		if hs.discardToDevice.Load() {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte("{}"))
			return
		}
	}
	hs.lock.Lock()
	defer hs.lock.Unlock()
	hs.ms.Router.ServeHTTP(w, r)
}

// getAccountData answers GET /_matrix/client/v3/user/{userID}/account_data/{type} from what
// mockserver stored.
func (hs *Homeserver) getAccountData(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/_matrix/client/v3/user/"), "/")
	if len(parts) != 3 || parts[1] != "account_data" {
		http.Error(w, `{"errcode":"M_UNRECOGNIZED","error":"unrecognized request"}`, http.StatusNotFound)
		return
	}
	hs.lock.Lock()
	data, ok := hs.ms.AccountData[id.UserID(parts[0])][event.Type{Type: parts[2], Class: event.AccountDataEventType}]
	hs.lock.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"errcode":"M_NOT_FOUND","error":"account data not found"}`))
		return
	}
	_, _ = w.Write(data)
}

// takeFault uses up one of the failures counted by n.
func (hs *Homeserver) takeFault(n *int) bool {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	if *n <= 0 {
		return false
	}
	*n--
	return true
}

func (hs *Homeserver) failSend(r *http.Request) bool {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if hs.failSends[token] <= 0 {
		return false
	}
	hs.failSends[token]--
	return true
}

func (hs *Homeserver) countClaim(r *http.Request) {
	hs.claims.Add(1)
	var req mautrix.ReqClaimKeys
	if json.Unmarshal(readBody(r), &req) == nil {
		for _, devices := range req.OneTimeKeys {
			hs.claimedKeys.Add(int64(len(devices)))
		}
	}
}

func (hs *Homeserver) countToDevice(r *http.Request) {
	evtType, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, pathToDevice), "/")
	var req struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	if json.Unmarshal(readBody(r), &req) != nil {
		return
	}
	n := 0
	for userID, devices := range req.Messages {
		n += len(devices)
		if evtType != event.ToDeviceRoomKeyRequest.Type {
			continue
		}
		for deviceID, raw := range devices {
			var content event.RoomKeyRequestEventContent
			if json.Unmarshal(raw, &content) == nil && content.Action == event.KeyRequestActionRequest {
				hs.faultLock.Lock()
				hs.keyRequests = append(hs.keyRequests, KeyRequest{userID, deviceID, content.Body.SessionID})
				hs.faultLock.Unlock()
			}
		}
	}
	counter, _ := hs.toDevice.LoadOrStore(evtType, &atomic.Int64{})
	counter.(*atomic.Int64).Add(int64(n))
}

// readBody reads a request's body and puts it back for the homeserver.
func readBody(r *http.Request) []byte {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	return body
}

// Claims is how many key claim requests the homeserver got, failed and lost ones included.
func (hs *Homeserver) Claims() int64 { return hs.claims.Load() }

// ClaimedKeys is how many one-time keys those requests asked for (one per device).
func (hs *Homeserver) ClaimedKeys() int64 { return hs.claimedKeys.Load() }

// Queries is how many device key queries the homeserver got.
func (hs *Homeserver) Queries() int64 { return hs.queries.Load() }

// ToDevice is how many to-device messages of a type (such as "m.room.encrypted") were sent.
func (hs *Homeserver) ToDevice(evtType string) int64 {
	if counter, ok := hs.toDevice.Load(evtType); ok {
		return counter.(*atomic.Int64).Load()
	}
	return 0
}

// ToDeviceRequests is how many /sendToDevice requests of a type the homeserver got, failed ones
// included (a request carries messages for any number of devices).
func (hs *Homeserver) ToDeviceRequests(evtType string) int64 {
	if counter, ok := hs.toDeviceRequests.Load(evtType); ok {
		return counter.(*atomic.Int64).Load()
	}
	return 0
}

// KeyRequests returns the room key requests sent so far, in order.
func (hs *Homeserver) KeyRequests() []KeyRequest {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	return slices.Clone(hs.keyRequests)
}

// FailClaims answers the next n key claims with 503: the homeserver handed out no key, so the
// claim may be repeated.
func (hs *Homeserver) FailClaims(n int) {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	hs.failClaims = n
}

// LoseClaims passes the next n key claims to the homeserver, which hands out a key, and then
// answers with answer instead (a proxy's 504, a dropped connection): the key is spent, and the
// client does not learn it.
func (hs *Homeserver) LoseClaims(n int, answer func(w http.ResponseWriter)) {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	hs.loseClaims, hs.lostAnswer = n, answer
}

// FailQueries answers the next n device key queries with 502.
func (hs *Homeserver) FailQueries(n int) {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	hs.failQueries = n
}

// FailSends answers the device's next n to-device sends with 502, as a proxy in front of a
// stopped homeserver does; other devices' sends go through.
func (hs *Homeserver) FailSends(from *Device, n int) {
	hs.faultLock.Lock()
	defer hs.faultLock.Unlock()
	hs.failSends[from.Client.AccessToken] = n
}

// Login logs a device in (any password will do) and returns its client.
func (hs *Homeserver) Login(userID id.UserID, deviceID id.DeviceID) *mautrix.Client {
	hs.t.Helper()
	client, err := mautrix.NewClient(hs.srv.URL, "", "")
	if err != nil {
		hs.t.Fatal(err)
	}
	_, err = client.Login(hs.t.Context(), &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(userID)},
		DeviceID:         deviceID,
		Password:         "password",
		StoreCredentials: true,
	})
	if err != nil {
		hs.t.Fatal(err)
	}
	return client
}

// NewDevice logs a device in, loads its machine on store and uploads its keys.
func (hs *Homeserver) NewDevice(userID id.UserID, deviceID id.DeviceID, store Store) *Device {
	hs.t.Helper()
	d := Open(hs.t, hs.Login(userID, deviceID), store, hs.Log)
	if err := d.Mach.ShareKeys(hs.t.Context(), 0); err != nil {
		hs.t.Fatal(err)
	}
	return d
}

// Replica is a second process of a device, as a bridge replica is: logged in as the same device,
// with its own machine on the same store.
func (hs *Homeserver) Replica(of *Device) *Device {
	hs.t.Helper()
	return Open(hs.t, hs.Login(of.UserID, of.DeviceID), of.Store, hs.Log)
}

// Inbox takes the to-device events waiting for a device.
func (hs *Homeserver) Inbox(d *Device) []*event.Event {
	hs.lock.Lock()
	defer hs.lock.Unlock()
	queued := hs.ms.DeviceInbox[d.UserID][d.DeviceID]
	if len(queued) == 0 {
		return nil
	}
	hs.ms.DeviceInbox[d.UserID][d.DeviceID] = nil
	out := make([]*event.Event, len(queued))
	for i := range queued {
		evt := queued[i]
		evt.Type.Class = event.ToDeviceEventType
		evt.ToUserID, evt.ToDeviceID = d.UserID, d.DeviceID
		out[i] = &evt
	}
	return out
}

// Requeue puts an event (changed, say) back in a device's inbox.
func (hs *Homeserver) Requeue(d *Device, evt *event.Event) {
	hs.t.Helper()
	raw, err := json.Marshal(evt.Content.Parsed)
	if err != nil {
		hs.t.Fatal(err)
	}
	evt.Content.VeryRaw = raw
	hs.lock.Lock()
	defer hs.lock.Unlock()
	if hs.ms.DeviceInbox[d.UserID] == nil {
		hs.ms.DeviceInbox[d.UserID] = map[id.DeviceID][]event.Event{}
	}
	hs.ms.DeviceInbox[d.UserID][d.DeviceID] = append(hs.ms.DeviceInbox[d.UserID][d.DeviceID], *evt)
}

// AwaitInbox waits until a to-device event waits for the device, and leaves it there.
func (hs *Homeserver) AwaitInbox(d *Device, timeout time.Duration) {
	hs.t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		hs.lock.Lock()
		n := len(hs.ms.DeviceInbox[d.UserID][d.DeviceID])
		hs.lock.Unlock()
		if n > 0 {
			return
		} else if time.Now().After(deadline) {
			hs.t.Fatalf("nothing was sent to %s's %s within %s", d.UserID, d.DeviceID, timeout)
		}
	}
}

// Receive hands the to-device events waiting for a device to it (Device.Handle), as its sync
// does, and returns them.
func (hs *Homeserver) Receive(d *Device) []*event.Event {
	events := hs.Inbox(d)
	for _, evt := range events {
		d.Handle(evt)
	}
	return events
}

// Exchange sends an m.dummy from one device to the other over its latest session (opening one
// if it has none), and the other receives what waits for it.
func (hs *Homeserver) Exchange(from, to *Device) []*event.Event {
	hs.t.Helper()
	from.SendDummy(to)
	return hs.Receive(to)
}

// OneTimeKeys counts the device's one-time keys the homeserver has left to hand out.
func (hs *Homeserver) OneTimeKeys(d *Device) int {
	hs.lock.Lock()
	defer hs.lock.Unlock()
	return len(hs.ms.OneTimeKeys[d.UserID][d.DeviceID])
}

// ClaimAllKeys claims every one-time key the device has left, as other clients may have: the
// next claim for it gets none.
func (hs *Homeserver) ClaimAllKeys(d *Device) {
	hs.t.Helper()
	claimer := hs.Login("@claimer:example.org", "CLAIMER")
	for hs.OneTimeKeys(d) > 0 {
		_, err := claimer.ClaimKeys(hs.t.Context(), &mautrix.ReqClaimKeys{
			OneTimeKeys: mautrix.OneTimeKeysRequest{d.UserID: {d.DeviceID: id.KeyAlgorithmSignedCurve25519}},
		})
		if err != nil {
			hs.t.Fatal(err)
		}
	}
}

// DiscardToDevice makes the homeserver count to-device messages and keep none: for measurements
// of many devices that never read their inbox, whose messages would be the process's memory.
func (hs *Homeserver) DiscardToDevice() { hs.discardToDevice.Store(true) }

// AddPeer puts a device on the homeserver without an OlmMachine: an ed25519 key pair, a
// curve25519 identity key and one signed one-time key, enough for another device to claim the key
// and open an Olm session with it (which only a real device could read). It returns the device as
// the crypto store lists it.
func (hs *Homeserver) AddPeer(userID id.UserID, deviceID id.DeviceID) *id.Device {
	hs.t.Helper()
	public, private, err := ed25519.GenerateKey(nil)
	if err != nil {
		hs.t.Fatal(err)
	}
	random := func() string {
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		return base64.RawStdEncoding.EncodeToString(b)
	}
	otk := random()
	signature := base64.RawStdEncoding.EncodeToString(ed25519.Sign(private, []byte(`{"key":"`+otk+`"}`)))
	raw := fmt.Sprintf(`{"key":%q,"signatures":{%q:{"ed25519:%s":%q}}}`, otk, userID, deviceID, signature)
	var key mautrix.OneTimeKey
	if err = json.Unmarshal([]byte(raw), &key); err != nil {
		hs.t.Fatal(err)
	}
	hs.lock.Lock()
	if hs.ms.OneTimeKeys[userID] == nil {
		hs.ms.OneTimeKeys[userID] = map[id.DeviceID]map[id.KeyID]mautrix.OneTimeKey{}
	}
	hs.ms.OneTimeKeys[userID][deviceID] = map[id.KeyID]mautrix.OneTimeKey{id.NewKeyID(id.KeyAlgorithmSignedCurve25519, "AAAAAQ"): key}
	hs.lock.Unlock()
	return &id.Device{UserID: userID, DeviceID: deviceID, IdentityKey: id.Curve25519(random()),
		SigningKey: id.Ed25519(base64.RawStdEncoding.EncodeToString(public))}
}
