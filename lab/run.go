package lab

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
)

// Run runs the scenarios under each of cfg.Rules in each available mode, Parallel at a time, and
// reports them in the order of scenarios, then rules, then modes.
func Run(ctx context.Context, env *testenv.Env, cfg Config, scenarios []*Scenario, modes []Mode) *Report {
	if len(cfg.Rules) == 0 {
		cfg.Rules = DefaultRules
	}
	report := &Report{K: cfg.K, Transport: "sync", Rules: cfg.Rules, BridgeConfig: cfg.BridgeConfig}
	if cfg.Appservice {
		report.Transport = "appservice"
	}
	type job struct {
		index    int
		scenario *Scenario
		rules    testclient.Rules
		mode     Mode
	}
	var jobs []job
	for _, mode := range modes {
		if !mode.Available() {
			report.UnavailableModes = append(report.UnavailableModes, mode)
		}
	}
	for _, scenario := range scenarios {
		for _, rules := range cfg.Rules {
			for _, mode := range modes {
				if mode.Available() {
					jobs = append(jobs, job{len(jobs), scenario, rules, mode})
				}
			}
		}
	}
	report.Scenarios = make([]*Result, len(jobs))
	queue := make(chan job)
	var wg sync.WaitGroup
	for range max(cfg.Parallel, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range queue {
				report.Scenarios[j.index] = RunScenario(ctx, env, cfg, j.scenario, j.rules, j.mode)
			}
		}()
	}
	for _, j := range jobs {
		queue <- j
	}
	close(queue)
	wg.Wait()
	return report
}

// RunScenario runs one scenario under one rule set in one mode from an empty bridge database to
// its result.
func RunScenario(ctx context.Context, env *testenv.Env, cfg Config, sc *Scenario, rules testclient.Rules, mode Mode) *Result {
	res := &Result{Name: sc.Name, Mode: mode, Rules: rules, TimeToFirstBridgedMS: -1, WedgedBridgedP50MS: -1, WedgedBridgedMaxMS: -1, KeyToBridgedP50MS: -1, KeyToBridgedMaxMS: -1, WindowMS: -1}
	started := time.Now()
	if err := runScenario(ctx, env, &cfg, sc, res); err != nil {
		res.Error = err.Error()
	}
	res.DurationMS = time.Since(started).Milliseconds()
	return res
}

func runScenario(ctx context.Context, env *testenv.Env, cfg *Config, sc *Scenario, res *Result) error {
	name := fmt.Sprintf("%s-%s-%s-%d", sc.Name, res.Rules, res.Mode, time.Now().UnixNano())
	w, err := newWorld(ctx, env, cfg, res.Mode, res.Rules, name, sc)
	if err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	defer w.Close()
	stepCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if err = w.Exchange(stepCtx, "warmup"); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	if sc.Prepare != nil {
		if err = sc.Prepare(stepCtx, w); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
	}
	// Traffic after the backup moves the Olm ratchets on in both directions.
	for i := range churnExchanges {
		if err = w.Exchange(stepCtx, fmt.Sprintf("churn%d", i)); err != nil {
			return fmt.Errorf("churn: %w", err)
		}
	}
	wedgedAt := time.Now()
	w.discardOutbound = true
	if sc.Wedge != nil {
		if err = sc.Wedge(stepCtx, w); err != nil {
			return fmt.Errorf("wedge: %w", err)
		}
	}

	// The bridge's next message starts a new Megolm session. Discarding it with the bridge
	// stopped (in the wedge's own stop, or here) sends nothing to the device, so the device
	// speaks first after the wedge.
	if err = w.discardBridgeOutboundSessions(stepCtx); err != nil {
		return err
	}
	// While wedged: the device starts a new Megolm session, whose key must cross the broken Olm
	// session, then the remote side talks and the bridge shares its new key with the device.
	sendTimes := map[string]time.Time{}
	if err = w.Wedged().RotateRoomKey(stepCtx, w.Room); err != nil {
		return err
	}
	w.startedWedged, w.sentWedged = time.Now(), cfg.K
	if err = w.sendMatrix(stepCtx, sc, "wedged", cfg.K, sendTimes); err != nil {
		return err
	}
	if sc.WhileWedged != nil {
		if err = sc.WhileWedged(stepCtx, w); err != nil {
			return fmt.Errorf("while wedged: %w", err)
		}
	}
	if err = w.postRemote(stepCtx, "remote-wedged", cfg.K); err != nil {
		return err
	}
	sleep(ctx, cfg.HealWindow)
	// After: the device keeps its Megolm session, as a real client would.
	if err = w.sendMatrix(stepCtx, sc, "after", cfg.K, sendTimes); err != nil {
		return err
	}
	if err = w.postRemote(stepCtx, "remote-after", cfg.K); err != nil {
		return err
	}
	lastSent := time.Now()
	if res.Settled, err = w.waitForAll(ctx, cfg, res.Mode); err != nil {
		return err
	}
	res.WaitedMS = time.Since(lastSent).Milliseconds()
	if err = w.measure(stepCtx, res, cfg.K, sendTimes, wedgedAt); err != nil {
		return err
	}
	if cfg.Inspect != nil {
		return cfg.Inspect(stepCtx, w, res)
	}
	return nil
}

// churnExchanges is how many Exchanges follow the scenario's Prepare: each moves both Olm
// ratchets one step (the client-restored-reused-index scenarios count on it, TestReusedIndexRounds).
const churnExchanges = 2

// sendMatrix sends the phase's K messages from the wedged device, named "<phase>-<i>"; in a
// management room each is the phase's bot command. The scenario's BeforeEach runs before each.
func (w *World) sendMatrix(ctx context.Context, sc *Scenario, phase string, k int, sendTimes map[string]time.Time) error {
	for i := range k {
		if sc.BeforeEach != nil {
			if err := sc.BeforeEach(ctx, w, phase, i, k); err != nil {
				return fmt.Errorf("before %s-%d: %w", phase, i, err)
			}
		}
		text := fmt.Sprintf("%s-%d", phase, i)
		body := text
		if w.Management {
			body = managementCommands[phase].command
		}
		sendTimes[text] = time.Now()
		evtID, err := w.Wedged().SendText(ctx, w.Room, body)
		if err != nil {
			return fmt.Errorf("failed to send %s: %w", text, err)
		}
		w.sent[evtID], w.sentAt[evtID] = text, sendTimes[text]
		sleep(ctx, 100*time.Millisecond)
	}
	return nil
}

// postRemote posts the phase's K messages on the remote side. A management room has none: the
// other direction there is the bot's answers to the commands.
func (w *World) postRemote(ctx context.Context, phase string, k int) error {
	if w.Management {
		return nil
	}
	for i := range k {
		text := fmt.Sprintf("%s-%d", phase, i)
		if _, err := w.Remote.PostMessage(ctx, &webhook.PostMessageRequest{ChatID: chatID, Sender: "bob", Text: text}); err != nil {
			return fmt.Errorf("failed to post %s: %w", text, err)
		}
		sleep(ctx, 100*time.Millisecond)
	}
	return nil
}

// waitForAll waits until every message of both phases is accounted for, and reports whether
// that happened before cfg.Deadline (counted from the last message) passed. A message is
// accounted for when it arrived, or in stock mode when it can no longer arrive (settledStock).
// In unwedge mode only arrival counts: recovery keeps an undecryptable event for days and shares
// the bridge's room keys again after a heal, so a message missing there may still come until the
// deadline.
func (w *World) waitForAll(ctx context.Context, cfg *Config, mode Mode) (bool, error) {
	deadline := time.Now().Add(cfg.Deadline)
	for {
		bridged, err := w.bridgedTexts()
		if err != nil {
			return false, err
		}
		if len(bridged) == 2*cfg.K && w.remoteDecrypted(w.Wedged()) == 2*cfg.K {
			return true, nil
		}
		if mode == ModeStock {
			settled, err := w.settledStock(cfg.K, bridged)
			if err != nil || settled {
				return settled, err
			}
		}
		if !time.Now().Before(deadline) || ctx.Err() != nil {
			return false, nil
		}
		sleep(ctx, 250*time.Millisecond)
	}
}

// Stock bridgev2's last word on an event it could not decrypt: after its 3 s wait and 22 s more
// without the key, or at once for an error other than a missing key (mautrix-go v0.32.0,
// bridgev2/matrix/matrix.go). Nothing in stock mautrix-go tries the event again after either.
const (
	stockGaveUp         = "Didn't get session, giving up trying to decrypt event"
	stockDecryptFailed  = "Failed to decrypt event"
	stockDecryptStarted = "Decrypting received event"
	bridgeStarted       = "Starting bridge"
)

// unwedgeRecorded is unwedge's log line once an undecryptable event is stored for recovery
// (crypto/unwedge Recovery.Record).
const unwedgeRecorded = "Recorded undecryptable event: it will be bridged when its key arrives"

// settledStock tells whether, with the stock bridge, every message that has not arrived yet never
// will, given what has arrived (bridged).
//
// Matrix -> remote: a message the device sent is settled once bridgev2 gave up on it (its log line
// with the event's ID), or once the bridge process that tried it has exited (a later "Starting
// bridge"): stock bridgev2 keeps no undecryptable event across a restart, and the homeserver does
// not send a transaction again that the bridge acknowledged, which it does before handling its
// events.
//
// Remote -> Matrix: a remote message is settled once every device has it, decrypted or not. Stock
// mautrix-go shares a Megolm session with a device once, over Olm, before the first event
// encrypted with it, and never again; the device handles the to-device events of a sync before
// its timeline, and the homeserver sends a to-device event no later than the room events sent
// after it; the lab's devices send no key requests. So a remote message a device could not
// decrypt when it got it stays undecryptable. In a management room the bot's answers are
// settled only when every device decrypted the answer to each command the bot handled.
func (w *World) settledStock(k int, bridged map[string]time.Time) (bool, error) {
	entries, err := w.BridgeLog(w.startedWedged)
	if err != nil {
		return false, err
	}
	gaveUp := map[id.EventID]bool{}
	// The events the running process tried, and those only a process that exited since did.
	trying, orphaned := map[id.EventID]bool{}, map[id.EventID]bool{}
	for _, entry := range entries {
		evtID := id.EventID(entry.str("event_id"))
		switch entry.str("message") {
		case bridgeStarted:
			for tried := range trying {
				orphaned[tried] = true
			}
			clear(trying)
		case stockDecryptStarted:
			trying[evtID] = true
			delete(orphaned, evtID)
		case stockGaveUp, stockDecryptFailed:
			gaveUp[evtID] = true
		}
	}
	for evtID, text := range w.sent {
		if _, ok := bridged[text]; !ok && !gaveUp[evtID] && !orphaned[evtID] {
			return false, nil
		}
	}
	for _, dev := range w.Devices {
		if w.Management {
			if w.remoteDecrypted(dev) != len(bridged) {
				return false, nil
			}
		} else if w.remoteReceived(dev) < 2*k {
			return false, nil
		}
	}
	return true, nil
}

// remoteReceived counts the remote messages of both phases that reached a device in the portal,
// decrypted or not: the decrypted ones by their text, the others by their sender (neither the
// user nor the bridge bot, so the remote sender's ghost) and time (after the wedge).
func (w *World) remoteReceived(dev *testclient.Client) int {
	seen := map[id.EventID]bool{}
	for _, evt := range dev.Messages(w.Room) {
		if w.isRemote(evt, "wedged") || w.isRemote(evt, "after") {
			seen[evt.ID] = true
		}
	}
	since := w.startedWedged.UnixMilli()
	for _, evt := range dev.Undecryptable(w.Room) {
		if evt.Sender != dev.UserID() && evt.Sender != w.Bridge.BotMXID && evt.Timestamp >= since {
			seen[evt.ID] = true
		}
	}
	return len(seen)
}

// bridgedTexts returns the device's messages of both phases that reached the other side, and
// when: the webhook, or in a management room the bot's command handler.
func (w *World) bridgedTexts() (map[string]time.Time, error) {
	if w.Management {
		return w.handledCommands()
	}
	out := map[string]time.Time{}
	for text, at := range w.receiver.arrivals() {
		if hasPrefixAny(text, "wedged-", "after-") {
			out[text] = at
		}
	}
	return out, nil
}

// handledCommands reads from the bridge's log which of the device's commands the bot handled, and
// when: bridgev2 logs "Received command" for each, with the command event's ID, once it has
// decrypted it (itself, or through unwedge's recovery). The bot answers every one it handles.
func (w *World) handledCommands() (map[string]time.Time, error) {
	entries, err := w.BridgeLog(w.startedWedged)
	if err != nil {
		return nil, err
	}
	out := map[string]time.Time{}
	for _, entry := range entries {
		if text, ok := w.sent[id.EventID(entry.str("event_id"))]; ok && entry.str("message") == "Received command" {
			if _, seen := out[text]; !seen {
				out[text] = entry.time()
			}
		}
	}
	return out, nil
}

// remoteDecrypted counts the remote messages a device decrypted, of the given phases ("wedged",
// "after"; both when none is given). In a management room they are the bot's answers to the
// phase's commands.
func (w *World) remoteDecrypted(dev *testclient.Client, phases ...string) int {
	if len(phases) == 0 {
		phases = []string{"wedged", "after"}
	}
	n := 0
	for _, evt := range dev.Messages(w.Room) {
		for _, phase := range phases {
			if w.isRemote(evt, phase) {
				n++
			}
		}
	}
	return n
}

// isRemote tells whether a message is one of the phase's remote messages.
func (w *World) isRemote(evt *event.Event, phase string) bool {
	body := evt.Content.AsMessage().Body
	if w.Management {
		return evt.Sender == w.Bridge.BotMXID && strings.HasPrefix(body, managementCommands[phase].answer)
	}
	return strings.HasPrefix(body, "remote-"+phase+"-")
}

func (w *World) measure(ctx context.Context, res *Result, k int, sendTimes map[string]time.Time, wedgedAt time.Time) error {
	bridged, err := w.bridgedTexts()
	if err != nil {
		return fmt.Errorf("failed to read what was bridged: %w", err)
	}
	res.Sent, res.RemoteSent = 2*k, 2*k
	res.Bridged = len(bridged)
	res.Lost = res.Sent - res.Bridged
	if w.Management {
		// The bot answers each command it handled, once: those answers are what it sent.
		res.RemoteSent = res.Bridged
	}
	for text := range bridged {
		if strings.HasPrefix(text, "wedged-") {
			res.BridgedWedged++
		} else {
			res.BridgedAfter++
		}
	}
	res.Healed = res.BridgedAfter == k
	res.RemoteDecrypted = w.remoteDecrypted(w.Wedged())
	res.RemoteLost = res.RemoteSent - res.RemoteDecrypted
	res.RemoteHealed = w.remoteDecrypted(w.Wedged(), "after") == k
	for _, dev := range w.Devices[1:] {
		res.OtherDevicesRemoteLost += res.RemoteSent - w.remoteDecrypted(dev)
	}

	firstSent := sendTimes["wedged-0"]
	var firstBridged time.Time
	for _, at := range bridged {
		if firstBridged.IsZero() || at.Before(firstBridged) {
			firstBridged = at
		}
	}
	if !firstBridged.IsZero() {
		res.TimeToFirstBridgedMS = firstBridged.Sub(firstSent).Milliseconds()
	}
	res.WedgedBridgedP50MS, res.WedgedBridgedMaxMS = wedgedLatencies(bridged, sendTimes)
	res.SentWhileDown = w.sentWhileDown(sendTimes)
	healedAt, err := w.healedAt(ctx, wedgedAt)
	if err != nil {
		return err
	}
	if res.LostBeforeHeal, err = w.lostBeforeHeal(ctx, bridged, healedAt); err != nil {
		return fmt.Errorf("failed to tell which messages were lost before the heal: %w", err)
	}
	res.SentInWindow = sentInWindow(sendTimes, wedgedAt, healedAt)
	if res.Mode == ModeUnwedge {
		if res.OlmHistoryStates, res.OlmHistorySessions, res.OlmHistoryBytes, err = w.olmHistorySize(ctx); err != nil {
			return fmt.Errorf("failed to measure the Olm history: %w", err)
		}
	}

	// The whole log for the keys' arrivals (a key may have come before the wedge), read once; the
	// rest reads what came since the wedge.
	all, err := w.BridgeLog(time.Time{})
	if err != nil {
		return fmt.Errorf("failed to read bridge log: %w", err)
	}
	res.KeyToBridgedP50MS, res.KeyToBridgedMaxMS = w.keyToBridged(all, bridged)
	entries := entriesSince(slices.Clone(all), wedgedAt)
	res.WindowMS = windowMS(entries, healedAt)
	device := string(w.Wedged().DeviceID())
	var firstFailure time.Time
	for _, entry := range entries {
		switch entry.str("message") {
		case "Failed to decrypt to-device event":
			if entry.str("error") == crypto.ErrDuplicateMessage.Error() {
				// An Olm message the bridge had decrypted already, handed to it again (in
				// appservice mode unwedge reads the bot device's inbox at startup, which holds
				// what transactions delivered before the restart too): not a failure to decrypt.
				continue
			}
			if res.OlmFailures == 0 {
				firstFailure = entry.time()
			}
			res.OlmFailures++
		case "Created new Olm session":
			if entry.str("peer_device_id") == device {
				res.ReplacementSessions++
			}
		}
	}
	res.FailureToFirstBridgedMS = -1
	if !firstFailure.IsZero() {
		var first time.Time
		for _, at := range bridged {
			if at.After(firstFailure) && (first.IsZero() || at.Before(first)) {
				first = at
			}
		}
		if !first.IsZero() {
			res.FailureToFirstBridgedMS = first.Sub(firstFailure).Milliseconds()
		}
	}
	return nil
}

// wedgedLatencies returns the median (the lower middle one of an even count) and the longest time
// from sent to bridged of the wedged phase's bridged messages, in milliseconds; -1 and -1 when
// none was bridged.
func wedgedLatencies(bridged, sendTimes map[string]time.Time) (p50, longest int64) {
	var took []int64
	for text, at := range bridged {
		if strings.HasPrefix(text, "wedged-") {
			took = append(took, at.Sub(sendTimes[text]).Milliseconds())
		}
	}
	return median(took)
}

// median returns the median (the lower middle one of an even count) and the largest of
// durations in milliseconds; -1 and -1 for none.
func median(took []int64) (p50, longest int64) {
	if len(took) == 0 {
		return -1, -1
	}
	slices.Sort(took)
	return took[(len(took)-1)/2], took[len(took)-1]
}

// sessionReceived is the line Recovery logs when the bridge's machine stores a Megolm session
// (crypto/unwedge Recovery.SessionReceived).
const sessionReceived = "Megolm session received"

// keyToBridged returns Result.KeyToBridgedP50MS and KeyToBridgedMaxMS: for each message of the
// device that was bridged, from when the bridge held its room key (the first "Megolm session
// received" line of its session from its index or earlier; the message's sending if that came
// later) to when the remote side had it. Messages whose key arrival the log does not show are
// left out.
func (w *World) keyToBridged(entries []logEntry, bridged map[string]time.Time) (p50, longest int64) {
	return keyToBridged(entries, bridged, w.sent, w.sentAt, w.Wedged().Sent)
}

func keyToBridged(entries []logEntry, bridged map[string]time.Time, sent map[id.EventID]string, sentAt map[id.EventID]time.Time,
	encryption func(id.EventID) (testclient.SentEncryption, bool)) (p50, longest int64) {
	type received struct {
		at    time.Time
		first uint32
	}
	arrivals := map[id.SessionID][]received{}
	for _, entry := range entries {
		if entry.str("message") != sessionReceived {
			continue
		}
		first, ok := entry["first_known_index"].(float64)
		if !ok {
			continue
		}
		sessionID := id.SessionID(entry.str("session_id"))
		arrivals[sessionID] = append(arrivals[sessionID], received{entry.time(), uint32(first)})
	}
	var took []int64
	for evtID, text := range sent {
		at, ok := bridged[text]
		if !ok {
			continue
		}
		enc, ok := encryption(evtID)
		if !ok {
			continue
		}
		var held time.Time
		for _, r := range arrivals[enc.SessionID] {
			if r.first <= enc.Index && (held.IsZero() || r.at.Before(held)) {
				held = r.at
			}
		}
		if held.IsZero() {
			continue
		}
		if sentAt[evtID].After(held) {
			held = sentAt[evtID]
		}
		took = append(took, max(at.Sub(held).Milliseconds(), 0))
	}
	return median(took)
}

// lostBeforeHeal counts the device's messages that were not bridged because their room key was
// lost before the bridge could heal. It reads three records: what the bridge holds (the Megolm
// sessions in its crypto store, and the first index each decrypts), what the device sent (each
// message's session and index, each copy of a room key and when it began to go out), and when the
// device got the bridge's replacement Olm session (the first new Olm session from the bridge's
// device since the wedge: the heal as the device sees it).
//
// A lost message counts when the bridge does not hold its key (from its index or earlier) and no
// copy that decrypts it began to go to the bridge's device after the heal, or there was no heal.
// Every copy it had then went over the broken Olm session (or, in appservice mode, to a bridge
// Synapse could not reach, whose to-device messages its catch-up transactions drop). A lost
// message whose key the bridge holds, or whose key was sent again after the heal, is lost by the
// bridge: it counts in Lost only.
func (w *World) lostBeforeHeal(ctx context.Context, bridged map[string]time.Time, healedAt time.Time) (int, error) {
	dev := w.Wedged()
	bridgeDevice, err := w.BridgeDevice(ctx)
	if err != nil {
		return 0, err
	}
	held, err := w.bridgeRoomKeys(ctx, dev.IdentityKey())
	if err != nil {
		return 0, err
	}
	copies := dev.RoomKeysSent()
	lost := 0
	for evtID, text := range w.sent {
		if _, ok := bridged[text]; ok {
			continue
		}
		enc, ok := dev.Sent(evtID)
		if !ok {
			return 0, fmt.Errorf("the device has no record of how it encrypted %s", text)
		}
		if first, ok := held[enc.SessionID]; ok && first <= enc.Index {
			continue
		}
		afterHeal := !healedAt.IsZero() && slices.ContainsFunc(copies, func(c testclient.RoomKeyCopy) bool {
			return c.UserID == bridgeDevice.UserID && c.DeviceID == bridgeDevice.DeviceID &&
				c.SessionID == enc.SessionID && c.Index <= enc.Index && !c.At.Before(healedAt)
		})
		if !afterHeal {
			lost++
		}
	}
	return lost, nil
}

// healedAt is when the wedged device got the bridge's replacement Olm session: the first Olm
// session the bridge's device started with it since the wedge (the heal as the device sees it).
// Zero when none came.
func (w *World) healedAt(ctx context.Context, wedgedAt time.Time) (time.Time, error) {
	bridgeDevice, err := w.BridgeDevice(ctx)
	if err != nil {
		return time.Time{}, err
	}
	for _, s := range w.Wedged().NewOlmSessions() {
		if s.SenderKey == bridgeDevice.IdentityKey && !s.At.Before(wedgedAt) {
			return s.At, nil
		}
	}
	return time.Time{}, nil
}

// olmHistorySize is what the bridge's Olm history holds at the end of the scenario: states, the
// sessions they are of, and the bytes of their pickles.
func (w *World) olmHistorySize(ctx context.Context) (states, sessions int, bytes int64, err error) {
	db, err := sql.Open("postgres", w.DBURI)
	if err != nil {
		return 0, 0, 0, err
	}
	defer db.Close()
	err = db.QueryRowContext(ctx, "SELECT COUNT(*), COUNT(DISTINCT session_id), COALESCE(SUM(LENGTH(pickle)), 0) FROM unwedge_olm_history").
		Scan(&states, &sessions, &bytes)
	return states, sessions, bytes, err
}

// sentInWindow counts the messages sent after the wedge and before the heal (healedAt), or after
// the wedge at all when there was no heal (zero healedAt): Result.SentInWindow.
func sentInWindow(sendTimes map[string]time.Time, wedgedAt, healedAt time.Time) int {
	n := 0
	for _, at := range sendTimes {
		if !at.Before(wedgedAt) && (healedAt.IsZero() || at.Before(healedAt)) {
			n++
		}
	}
	return n
}

// windowMS is Result.WindowMS: from the first start of the bridge in entries (the bridge's log
// since the wedge) to healedAt, in milliseconds; -1 without a heal or a start before it.
func windowMS(entries []logEntry, healedAt time.Time) int64 {
	if healedAt.IsZero() {
		return -1
	}
	for _, entry := range entries {
		if entry.str("message") == bridgeStarted {
			if started := entry.time(); !started.After(healedAt) {
				return healedAt.Sub(started).Milliseconds()
			}
			break
		}
	}
	return -1
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
