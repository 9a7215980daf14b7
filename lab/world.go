package lab

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
)

// World is one scenario's stack: a bridge with its own database, the user's devices, the remote
// side's API client, and the webhook receiver that records what was bridged.
type World struct {
	Env    *testenv.Env
	Bridge *harness.Bridge
	// Devices are the user's devices; Devices[0] is the one that gets wedged and sends.
	Devices []*testclient.Client
	// Remote is the login's webhook API client; nil in a management room.
	Remote *webhook.RemoteClient
	// Room is the encrypted portal, or with Management the user's management room with the bot.
	Room  id.RoomID
	DBURI string
	Dir   string
	// Management: the user has no login and Room is their management room (Scenario.Management).
	Management bool
	// Stock: the bridge runs without unwedge.
	Stock bool
	// Appservice: the bridge gets to-device events in appservice transactions (Config.Appservice).
	Appservice bool
	// Rules are the key-sharing rules of the user's devices.
	Rules testclient.Rules

	receiver *receiver
	cleanup  []func()
	// sent maps the events of the measured phases that the wedged device sent to their texts,
	// sentAt to when.
	sent   map[id.EventID]string
	sentAt map[id.EventID]time.Time
	// startedWedged is when the wedged phase's first message was sent, sentWedged how many.
	startedWedged time.Time
	sentWedged    int
	// discardOutbound: the next stop of the bridge also drops its outbound Megolm sessions. The
	// runner sets it before the wedge, so that a wedge that stops the bridge needs no second
	// restart: a restart right after the wedge's could cut short a heal the restarted bridge
	// began (a restored bridge heals at once, on the to-device messages its restored sync
	// token fetches again).
	discardOutbound bool
	// downtimes are when the lab had the bridge stopped (StopBridge to StartBridge); the last
	// one's end is zero while it is stopped.
	downtimes []downtime
}

// downtime is one stop of the bridge: from StopBridge to StartBridge, and how long Synapse's log
// was at the stop (-1 without it).
type downtime struct {
	from, to     time.Time
	synapseLogAt int64
}

const chatID = "lab"

// unwedgeConfig is the bridge config the scenario's mode gets from cfg.BridgeConfig.
func unwedgeConfig(cfg *Config, mode Mode) map[string]any {
	if mode != ModeUnwedge {
		return nil
	}
	return cfg.BridgeConfig
}

// newWorld starts a bridge on a free slot with a fresh Postgres database and a user with the
// scenario's devices, then either logs the user in and opens an encrypted portal that every
// device has joined, or (sc.Management) opens the user's encrypted management room with the bot.
func newWorld(ctx context.Context, env *testenv.Env, cfg *Config, mode Mode, rules testclient.Rules, name string, sc *Scenario) (_ *World, err error) {
	// w is no named result: the error returns must not make it nil before its cleanups run.
	w := &World{
		Env: env, Dir: filepath.Join(cfg.WorkDir, name), Management: sc.Management,
		sent: map[id.EventID]string{}, sentAt: map[id.EventID]time.Time{},
		Stock: mode == ModeStock, Rules: rules, Appservice: cfg.Appservice,
	}
	defer func() {
		if err != nil {
			w.Close()
		}
	}()
	if err = os.MkdirAll(w.Dir, 0o700); err != nil {
		return nil, err
	}
	slot, release, err := harness.AcquireSlot(ctx, env.SlotsDir)
	if err != nil {
		return nil, err
	}
	w.cleanup = append(w.cleanup, release)
	dbName := testenv.UniqueName("unwedge_lab")
	if w.DBURI, err = env.CreateDatabase(ctx, dbName); err != nil {
		return nil, err
	}
	w.cleanup = append(w.cleanup, func() { _ = env.DropDatabase(context.Background(), dbName) })
	if w.receiver, err = startReceiver(); err != nil {
		return nil, err
	}
	w.cleanup = append(w.cleanup, w.receiver.close)

	username := testenv.UniqueName("labuser")
	userID := id.NewUserID(username, env.Domain)
	w.Bridge, err = harness.StartBridge(ctx, harness.BridgeOptions{
		Binary: cfg.Binary, Dir: filepath.Join(w.Dir, "bridge"), HomeserverURL: env.HomeserverURL, Domain: env.Domain,
		Slot: slot, DatabaseType: "postgres", DatabaseURI: w.DBURI,
		// The lab makes the bridge rotate its Megolm session with an admin command.
		Admins:               []id.UserID{userID},
		Stock:                mode == ModeStock,
		Metrics:              mode == ModeUnwedge,
		AppserviceEncryption: cfg.Appservice,
		Config:               unwedgeConfig(cfg, mode),
	})
	if err != nil {
		return nil, err
	}
	w.cleanup = append(w.cleanup, func() { _ = w.Bridge.Stop() })
	for i := range max(sc.Devices, 1) {
		// Each device logs to a file beside the bridge's log (kept with --keep): what it shared,
		// with whom and over which Olm session is half of why a message was lost.
		logFile, err := os.OpenFile(filepath.Join(w.Dir, fmt.Sprintf("device%d.log", i)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, err
		}
		w.cleanup = append(w.cleanup, func() { _ = logFile.Close() })
		dev, err := testclient.New(ctx, testclient.Options{
			HomeserverURL: env.HomeserverURL, Username: username, Password: "lab password 1719",
			DataDir: filepath.Join(w.Dir, fmt.Sprintf("device%d", i)), Rules: rules,
			Log: zerolog.New(logFile).Level(zerolog.DebugLevel).With().Timestamp().Logger(),
		})
		if err != nil {
			return nil, fmt.Errorf("failed to start device %d: %w", i, err)
		}
		w.cleanup = append(w.cleanup, func() { _ = dev.Close() })
		w.Devices = append(w.Devices, dev)
	}
	if w.Management {
		err = w.openManagementRoom(ctx)
	} else {
		err = w.openPortal(ctx, userID)
	}
	if err != nil {
		return nil, err
	}
	for _, dev := range w.Devices {
		if err = dev.WaitForJoin(ctx, w.Room); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// openPortal logs the user in to the webhook network and creates the lab's chat, whose portal
// room the bridge invites the user to.
func (w *World) openPortal(ctx context.Context, userID id.UserID) (err error) {
	if w.Remote, err = w.Bridge.Login(ctx, userID, testenv.UniqueName("acct"), w.receiver.url); err != nil {
		return err
	}
	chat, err := w.Remote.CreateChat(ctx, chatID, "Wedge lab")
	if err != nil {
		return err
	}
	w.Room = chat.RoomID
	return nil
}

// openManagementRoom: the user, with no login, invites the bridge bot to an encrypted room of
// their own. The bot joins and marks it as the user's management room in its welcome message,
// which the device must decrypt (the bridge's first room key crossed Olm).
func (w *World) openManagementRoom(ctx context.Context) (err error) {
	if w.Room, err = w.Wedged().CreateEncryptedRoom(ctx, w.Bridge.BotMXID); err != nil {
		return err
	}
	_, err = w.Wedged().WaitForMessage(ctx, w.Room, func(evt *event.Event) bool {
		return evt.Sender == w.Bridge.BotMXID && strings.Contains(evt.Content.AsMessage().Body, "marked as your management room")
	})
	if err != nil {
		return fmt.Errorf("the bot's welcome in the management room: %w", err)
	}
	return nil
}

// Close stops everything the world started, in reverse order.
func (w *World) Close() {
	for i := len(w.cleanup) - 1; i >= 0; i-- {
		w.cleanup[i]()
	}
	w.cleanup = nil
}

// Wedged is the device that the scenario breaks.
func (w *World) Wedged() *testclient.Client { return w.Devices[0] }

// SQL runs statements on the bridge's database (the bridge should be stopped: its crypto store
// caches Olm sessions).
func (w *World) SQL(ctx context.Context, stmts ...string) error {
	db, err := sql.Open("postgres", w.DBURI)
	if err != nil {
		return err
	}
	defer db.Close()
	for _, stmt := range stmts {
		if _, err = db.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("failed to run %q: %w", stmt, err)
		}
	}
	return nil
}

// WithBridgeStopped stops the bridge, runs fn (on its database), and starts it again. With
// discardOutbound set it also drops the bridge's outbound Megolm sessions after fn.
func (w *World) WithBridgeStopped(ctx context.Context, fn func() error) error {
	if err := w.StopBridge(); err != nil {
		return err
	}
	if err := fn(); err != nil {
		return err
	}
	if w.discardOutbound {
		if err := w.SQL(ctx, "DELETE FROM crypto_megolm_outbound_session"); err != nil {
			return err
		}
		w.discardOutbound = false
	}
	return w.StartBridge(ctx)
}

// StopBridge stops the bridge process with SIGTERM (harness.Bridge.Stop), as an admin's restart
// or a deployment does, and notes when.
func (w *World) StopBridge() error {
	d := downtime{from: time.Now(), synapseLogAt: -1}
	if info, err := os.Stat(w.Env.SynapseLog); err == nil {
		d.synapseLogAt = info.Size()
	}
	w.downtimes = append(w.downtimes, d)
	return w.Bridge.Stop()
}

// StartBridge starts the bridge again and notes when it was ready. In appservice mode it then
// waits until Synapse delivers to-device messages to the bridge again (waitForAppserviceUp).
func (w *World) StartBridge(ctx context.Context) error {
	if err := w.Bridge.Start(ctx); err != nil {
		return err
	}
	n := len(w.downtimes)
	if n == 0 || !w.downtimes[n-1].to.IsZero() {
		return nil
	}
	w.downtimes[n-1].to = time.Now()
	if w.Appservice {
		return w.waitForAppserviceUp(ctx, w.downtimes[n-1].synapseLogAt)
	}
	return nil
}

// appserviceSettle is how long after a start the lab gives Synapse to notice a transaction that
// failed while the bridge was stopped.
const appserviceSettle = 1500 * time.Millisecond

// Synapse's application service scheduler (synapse/appservice/scheduler.py) logs these when a
// transaction to an appservice failed and when it delivered everything it held back.
const (
	synapseRecovering = "Starting recoverer for AS ID "
	synapseRecovered  = "Successfully recovered application service AS ID "
)

// waitForAppserviceUp waits until Synapse holds the bridge's appservice as up again, reading
// Synapse's log from the offset it had when the bridge stopped. A transaction that failed while
// the bridge was down makes Synapse mark it down and start a recoverer; until the recoverer has
// sent the transactions it kept (the bridge's startup ping makes it try at once), Synapse creates
// no transaction without room events, and the ones it sends carry no to-device messages. A room
// key sent to the bridge then would be lost because of the lab's own restart, not of what the
// scenario measures. Without Synapse's log (offset -1) there is nothing to wait for.
//
// Synapse can handle a transaction it failed to deliver during a short stop only after the new
// process is up (seen: refused 50 ms into a stop, recoverer started 250 ms after the new process
// answered Synapse's ping), so the log is read only after appserviceSettle.
func (w *World) waitForAppserviceUp(ctx context.Context, offset int64) error {
	if offset < 0 {
		return nil
	}
	sleep(ctx, appserviceSettle)
	asID := w.Bridge.Opts.Slot.ID
	for {
		down, err := synapseHoldsDown(w.Env.SynapseLog, offset, asID)
		if err != nil || !down {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("appservice %s still down in Synapse: %w", asID, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// synapseHoldsDown tells whether, after offset, Synapse's log started a recoverer for the
// appservice that has not recovered since.
func synapseHoldsDown(path string, offset int64, asID string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if _, err = f.Seek(offset, io.SeekStart); err != nil {
		return false, err
	}
	down := false
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for scanner.Scan() {
		line := scanner.Text()
		switch {
		case strings.HasSuffix(line, synapseRecovering+asID):
			down = true
		case strings.HasSuffix(line, synapseRecovered+asID):
			down = false
		}
	}
	return down, scanner.Err()
}

// sentWhileDown counts the messages sent while the lab had the bridge stopped.
func (w *World) sentWhileDown(sendTimes map[string]time.Time) int {
	n := 0
	for _, at := range sendTimes {
		for _, d := range w.downtimes {
			if !at.Before(d.from) && (d.to.IsZero() || at.Before(d.to)) {
				n++
				break
			}
		}
	}
	return n
}

// bridgeRoomKeys returns the Megolm sessions from a sender that the bridge holds, each with the
// first message index it decrypts (a forwarded or re-shared key may start later than 0). They are
// read from the bridge's crypto store, unpickled with its pickle key.
func (w *World) bridgeRoomKeys(ctx context.Context, sender id.IdentityKey) (map[id.SessionID]uint32, error) {
	db, err := sql.Open("postgres", w.DBURI)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, "SELECT session_id, session FROM crypto_megolm_inbound_session WHERE sender_key = $1 AND session IS NOT NULL", sender)
	if err != nil {
		return nil, fmt.Errorf("failed to read the bridge's room keys: %w", err)
	}
	defer rows.Close()
	out := map[id.SessionID]uint32{}
	for rows.Next() {
		var sessionID id.SessionID
		var pickled []byte
		if err = rows.Scan(&sessionID, &pickled); err != nil {
			return nil, err
		}
		igs, err := olm.InboundGroupSessionFromPickled(pickled, []byte(w.Bridge.PickleKey()))
		if err != nil {
			return nil, fmt.Errorf("failed to unpickle the bridge's room key %s: %w", sessionID, err)
		}
		out[sessionID] = igs.FirstKnownIndex()
	}
	return out, rows.Err()
}

// Exchange sends one message each way, rotating both Megolm sessions first so that room keys
// travel over Olm in both directions, and waits until both arrived. In a management room one
// command does both: it goes in the device's new Megolm session, and the bot answers it in a new
// one of its own (the lab's user is a bridge admin: a permission, not a login).
func (w *World) Exchange(ctx context.Context, tag string) error {
	if w.Management {
		if err := w.Wedged().RotateRoomKey(ctx, w.Room); err != nil {
			return err
		}
		if _, err := w.Command(ctx, "discard-megolm-session", "Successfully reset"); err != nil {
			return fmt.Errorf("exchange %s: %w", tag, err)
		}
		return nil
	}
	if err := w.rotateBridgeKey(ctx); err != nil {
		return err
	}
	text := "remote-" + tag
	if _, err := w.Remote.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: chatID, Sender: "bob", Text: text}); err != nil {
		return err
	}
	if _, err := w.Wedged().WaitForMessage(ctx, w.Room, bodyIs(text)); err != nil {
		return fmt.Errorf("exchange %s: remote message not decrypted: %w", tag, err)
	}
	if err := w.Wedged().RotateRoomKey(ctx, w.Room); err != nil {
		return err
	}
	text = "matrix-" + tag
	if _, err := w.Wedged().SendText(ctx, w.Room, text); err != nil {
		return err
	}
	if _, err := w.receiver.wait(ctx, text); err != nil {
		return fmt.Errorf("exchange %s: matrix message not bridged: %w", tag, err)
	}
	return nil
}

// bridgeSpeaks makes the bridge's device send the wedged device exactly one Olm message, and
// waits until the device has decrypted it. The lab's user is a bridge admin: bridgev2's
// discard-megolm-session command drops the room's outbound Megolm session
// (CryptoHelper.ResetSession) and answers in the room. The answer is the first event the bridge
// encrypts since, so the bridge starts a new Megolm session and shares its key with every member
// device over Olm before it sends the answer; the device can read the answer only once it has
// decrypted that Olm message, so seeing the answer is the proof, with no timing involved. The
// command itself goes in the device's current Megolm session, which the bridge holds: it sends
// no Olm message the other way.
//
// Other ways were weighed: deleting the bridge's outbound session row works only with the bridge
// stopped (a restart per round, and a restart is itself something unwedge reacts to); a key
// request for the bridge's session is answered only by unwedge (AnswerOwnSession), and Element X
// sends none. An admin's command is what a real bridge's admin can do, and both modes answer it.
func (w *World) bridgeSpeaks(ctx context.Context) error {
	if _, err := w.Command(ctx, "discard-megolm-session", "Successfully reset"); err != nil {
		return fmt.Errorf("bridge to device over Olm: %w", err)
	}
	return nil
}

// deviceSpeaks makes the wedged device send the bridge's device exactly one Olm message, as a
// client does when it rotates its Megolm session: it starts a new one and sends a message, whose
// key goes over Olm to every member device first. It waits until the message is bridged, which
// proves the bridge decrypted the Olm message. The message ("matrix-<tag>") is not one the lab
// measures.
func (w *World) deviceSpeaks(ctx context.Context, tag string) error {
	if err := w.Wedged().RotateRoomKey(ctx, w.Room); err != nil {
		return err
	}
	text := "matrix-" + tag
	if _, err := w.Wedged().SendText(ctx, w.Room, text); err != nil {
		return err
	}
	if _, err := w.receiver.wait(ctx, text); err != nil {
		return fmt.Errorf("device to bridge over Olm: %s not bridged: %w", text, err)
	}
	return nil
}

// rotateBridgeKey makes the bridge discard its outbound Megolm session, so that its next message
// shares a new room key with the user's devices over Olm.
func (w *World) rotateBridgeKey(ctx context.Context) error {
	if _, err := w.Wedged().SendText(ctx, w.Room, "!wh discard-megolm-session"); err != nil {
		return err
	}
	// The command's answer may itself be undecryptable; a short pause lets the bridge act on it.
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(700 * time.Millisecond):
	}
	return nil
}

// discardBridgeOutboundSessions drops the bridge's outbound Megolm sessions (bridge stopped),
// unless the wedge already did in its own stop (discardOutbound).
func (w *World) discardBridgeOutboundSessions(ctx context.Context) error {
	if !w.discardOutbound {
		return nil
	}
	return w.WithBridgeStopped(ctx, func() error { return nil })
}

// BridgeDevice is the bridge's current device as the wedged client knows it. The bot user keeps
// the devices of earlier bridges on the same slot, so the device ID comes from the bridge's database.
func (w *World) BridgeDevice(ctx context.Context) (*id.Device, error) {
	db, err := sql.Open("postgres", w.DBURI)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var deviceID id.DeviceID
	if err = db.QueryRowContext(ctx, "SELECT device_id FROM crypto_account").Scan(&deviceID); err != nil {
		return nil, fmt.Errorf("failed to read the bridge's device ID: %w", err)
	}
	device, err := w.Wedged().Machine().CryptoStore.GetDevice(ctx, w.Bridge.BotMXID, deviceID)
	if err != nil {
		return nil, err
	} else if device == nil {
		return nil, fmt.Errorf("the client does not know the bridge's device %s", deviceID)
	}
	return device, nil
}

// logEntry is one line of the bridge's JSON log.
type logEntry map[string]any

func (e logEntry) str(key string) string { s, _ := e[key].(string); return s }

func (e logEntry) time() time.Time {
	t, _ := time.Parse(time.RFC3339Nano, e.str("time"))
	return t
}

// BridgeLog returns the bridge's log entries at or after since.
func (w *World) BridgeLog(since time.Time) ([]logEntry, error) {
	f, err := os.Open(w.Bridge.LogPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var entries []logEntry
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for scanner.Scan() {
		var entry logEntry
		if json.Unmarshal(scanner.Bytes(), &entry) != nil {
			continue
		}
		entries = append(entries, entry)
	}
	return entriesSince(entries, since), scanner.Err()
}

// entriesSince keeps the log entries written at since or later.
func entriesSince(entries []logEntry, since time.Time) []logEntry {
	return slices.DeleteFunc(entries, func(e logEntry) bool { return e.time().Before(since) })
}

// waitForDecryptAttempts waits until the bridge has tried to decrypt n different room events
// since a time and failed, and with unwedge until it has also recorded each for recovery.
//
// bridgev2 logs "Couldn't find session" right after Decrypt returned and before it calls
// WaitForSession, which is where unwedge records the event (Recovery.WaitForSession): a bridge
// stopped between the two loses the event as the stock bridge does, the window the lab does not
// measure (as with a transaction bridgev2 acknowledged but had not handled yet). So with unwedge
// only the line written after the event was stored counts.
func (w *World) waitForDecryptAttempts(ctx context.Context, since time.Time, n int) error {
	for {
		entries, err := w.BridgeLog(since)
		if err != nil {
			return err
		}
		seen := map[string]bool{}
		for _, entry := range entries {
			switch entry.str("message") {
			case "Couldn't find session, waiting for keys to arrive...", "Failed to decrypt event":
				if w.Stock {
					seen[entry.str("event_id")] = true
				}
			case unwedgeRecorded:
				if !w.Stock {
					seen[entry.str("event_id")] = true
				}
			}
		}
		if len(seen) >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the bridge tried %d of %d events: %w", len(seen), n, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitForTried waits until the bridge has begun to decrypt (bridgev2's "Decrypting received
// event") every message the device sent since a time, whatever came of it.
func (w *World) waitForTried(ctx context.Context, since time.Time) error {
	for {
		entries, err := w.BridgeLog(since)
		if err != nil {
			return err
		}
		tried := map[id.EventID]bool{}
		for _, entry := range entries {
			if entry.str("message") == stockDecryptStarted {
				tried[id.EventID(entry.str("event_id"))] = true
			}
		}
		missing := 0
		for evtID := range w.sent {
			if sent, ok := w.sentAt[evtID]; ok && !sent.Before(since) && !tried[evtID] {
				missing++
			}
		}
		if missing == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the bridge has not tried %d messages sent since %s: %w", missing, since.Format(time.RFC3339Nano), ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// receiver is the remote side's webhook: it records when each bridged message arrived.
type receiver struct {
	url    string
	server *http.Server

	mu      sync.Mutex
	arrived map[string]time.Time
	changed chan struct{}
}

func startReceiver() (*receiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &receiver{url: "http://" + ln.Addr().String() + "/hook", arrived: map[string]time.Time{}, changed: make(chan struct{})}
	r.server = &http.Server{Handler: http.HandlerFunc(r.serve), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = r.server.Serve(ln) }()
	return r, nil
}

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	var msg webhook.OutgoingMessage
	if err := json.NewDecoder(req.Body).Decode(&msg); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	if _, seen := r.arrived[msg.Text]; !seen {
		r.arrived[msg.Text] = time.Now()
	}
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// arrivals returns when each text arrived.
func (r *receiver) arrivals() map[string]time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]time.Time, len(r.arrived))
	for k, v := range r.arrived {
		out[k] = v
	}
	return out
}

func (r *receiver) wait(ctx context.Context, text string) (time.Time, error) {
	for {
		r.mu.Lock()
		at, ok := r.arrived[text]
		changed := r.changed
		r.mu.Unlock()
		if ok {
			return at, nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-changed:
		}
	}
}

func (r *receiver) close() {
	_ = r.server.Close()
}

func hasPrefixAny(s string, prefixes ...string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func bodyIs(text string) func(*event.Event) bool {
	return func(evt *event.Event) bool { return evt.Content.AsMessage().Body == text }
}

// failuresSinceLastStart counts the Olm decryption failures in the bridge's log since the bridge
// process last started.
func (w *World) failuresSinceLastStart() (int, error) {
	entries, err := w.BridgeLog(time.Time{})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, entry := range entries {
		switch entry.str("message") {
		case "Starting bridge":
			n = 0
		case "Failed to decrypt to-device event":
			n++
		}
	}
	return n, nil
}
