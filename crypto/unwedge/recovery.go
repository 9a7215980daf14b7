package unwedge

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/fault"
)

// StockWait is how long bridgev2 itself waits for a missing Megolm session before it gives up on
// an event (3 s, a key request, then 22 s more in mautrix-go v0.31.0 and v0.32.0), plus a margin. Until then
// the event is bridgev2's; after it, Recovery's.
// Relies on bridgev2/matrix/matrix.go's initialSessionWaitTimeout and extendedSessionWaitTimeout (pinned in internal/upstream).
const StockWait = 30 * time.Second

// bridgeWait is how long bridgev2 itself waits for a missing Megolm session (3 s, then 22 s more
// in mautrix-go v0.32.0), as texts for admins say it; StockWait adds a margin to it.
const bridgeWait = 25 * time.Second

// MinRetention is the shortest allowed recovery.retention.
const MinRetention = time.Minute

// Fault points of recovery (package fault): only test builds have them, armed with
// Recovery.ArmFaults.
const (
	// FaultKeyArrived is after a pending event's key arrived and it was decrypted, before it is
	// handed to the bridge.
	FaultKeyArrived = "key_arrived"
	// FaultEventDelivered is after the bridge took the event, before its row is deleted.
	FaultEventDelivered = "event_delivered"
)

// Sink is the bridge side of recovery: it bridges events that became decryptable, tells users
// about events that never did, and knows the rooms the bridge shares its own room keys in.
type Sink interface {
	// OutboundRooms lists the rooms the bridge has an outbound Megolm session in.
	OutboundRooms(ctx context.Context) ([]id.RoomID, error)
	// IsMember reports whether a user is joined to or invited into a room, as the bridge knows.
	IsMember(ctx context.Context, roomID id.RoomID, userID id.UserID) bool
	// Deliver hands a late-decrypted event to the bridge (original is the encrypted event) and
	// returns once the bridge has handled it. An error keeps the event pending, to be tried
	// again; a *DroppedError deletes it without bridging it (the rules of the room no longer
	// allow it). The same event may be delivered again after a crash between Deliver and the
	// deletion of its row: the sink must not bridge it twice.
	Deliver(ctx context.Context, original, decrypted *event.Event, requests int) error
	// GiveUp tells the sender that the event will not be bridged, and why.
	GiveUp(ctx context.Context, original *event.Event, reason string)
}

// Recovery makes sure a message whose Megolm session was lost (with a wedged Olm session or
// otherwise) is bridged when its key arrives, also after bridgev2 gave up on it and across
// restarts: undecryptable events are kept in the database, their keys are requested from the
// sending device with backoff (not while that device's Olm session is being replaced, since the
// answer would come back over the broken session), and when the session arrives the events are
// decrypted and handed to the bridge in the order they arrived.
type Recovery struct {
	cfg     RecoveryConfig
	mach    *crypto.OlmMachine
	store   PendingStore
	sink    Sink
	healing func(userID id.UserID, key id.SenderKey) bool
	// panicGuard keeps the loop going when an event reaches a bug (panics.go).
	panicGuard
	owner string
	log   zerolog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   sync.WaitGroup
	wake   chan struct{}

	lock sync.Mutex
	// recorded holds the latest events recorded by this process (at most maxRecorded), so that a
	// later successful decrypt by bridgev2 removes the row without a database query on every
	// decrypt. An event that fell out is handed over later; the sink knows it was bridged.
	recorded recentSet[id.EventID]
	// decrypted holds the latest events the bridge decrypted that were not recorded (yet): one
	// that a concurrent wait records just after it was decrypted is removed again.
	decrypted recentSet[id.EventID]
	// arrival is the last arrival stamp given to a recorded event.
	arrival int64
	// received holds Megolm sessions that arrived, until their events were handed over.
	received map[receivedSession]time.Time
	// tooLate holds the sessions whose pending events are earlier than the first index the
	// bridge holds them from (that index): tried again only when a copy from an earlier index
	// arrives (SessionReceived), not every round.
	tooLate lockedMap[receivedSession, uint32]
	counts  map[RecoveryCount]int64

	// live and waits are what bridgev2's own wait for a session is about (waits.go).
	live  liveEvents
	waits waitTable

	// now is the clock (tests move it).
	now func() time.Time
	// started is when Start ran: bridgev2's waits for events recorded before it died with the
	// process that recorded them.
	started time.Time

	// Lease is how long a process holds the pending events it is handing over; after a crash,
	// another process (or the restarted one) takes them over when it runs out. Set it before
	// Start; NewRecovery sets 2 minutes.
	Lease time.Duration
}

type receivedSession struct {
	roomID    id.RoomID
	sessionID id.SessionID
}

// RecoveryCount names one of Recovery's counters (Counts).
type RecoveryCount string

// Recovery counters, as returned by Counts.
const (
	CountRecorded    RecoveryCount = "recorded"
	CountNotRecorded RecoveryCount = "not_recorded"
	// Events not recorded because of each cap (also counted in CountNotRecorded).
	CountFullSender       RecoveryCount = "not_recorded_sender_cap"
	CountFullRoom         RecoveryCount = "not_recorded_room_cap"
	CountFullTotal        RecoveryCount = "not_recorded_total_cap"
	CountDecryptedStock   RecoveryCount = "decrypted_by_bridge"
	CountRecovered        RecoveryCount = "recovered"
	CountGivenUp          RecoveryCount = "given_up"
	CountDropped          RecoveryCount = "dropped"
	CountRequestsSent     RecoveryCount = "key_requests_sent"
	CountRequestsFilled   RecoveryCount = "key_requests_filled"
	CountRequestsDeferred RecoveryCount = "key_requests_deferred"
)

const (
	recoveryTick  = 5 * time.Second
	sweepInterval = 30 * time.Second
	defaultLease  = 2 * time.Minute
	batchLimit    = 200
	maxRecorded   = 10000
	maxDecrypted  = 1024
)

// fullCounts is the counter of each cap.
var fullCounts = map[PendingCap]RecoveryCount{
	CapSender: CountFullSender, CapRoom: CountFullRoom, CapTotal: CountFullTotal,
}

// NewRecovery makes a Recovery. healing reports whether a device's Olm session is being replaced
// right now (Unwedger.Healing); owner names this process in the leases of pending events, as in the ledger's.
func NewRecovery(cfg RecoveryConfig, mach *crypto.OlmMachine, store PendingStore, sink Sink, healing func(id.UserID, id.SenderKey) bool, owner string, log zerolog.Logger) *Recovery {
	ctx, cancel := context.WithCancel(log.WithContext(context.Background()))
	return &Recovery{
		cfg: cfg, mach: mach, store: store, sink: sink, healing: healing, owner: owner, log: log,
		ctx: ctx, cancel: cancel, wake: make(chan struct{}, 1),
		recorded: newRecentSet[id.EventID](maxRecorded), decrypted: newRecentSet[id.EventID](maxDecrypted), received: make(map[receivedSession]time.Time), counts: make(map[RecoveryCount]int64),
		now: time.Now, started: time.Now(), Lease: defaultLease,
	}
}

// Record keeps an event that could not be decrypted because its Megolm session is missing. The
// caller must have received it live from the homeserver (not fetched it later), from a user
// allowed to send. Events over MaxPendingPerUser of their sender, MaxPendingPerRoom of their room
// or MaxPending in total are not kept.
func (r *Recovery) Record(ctx context.Context, evt *event.Event) error {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok || content.Algorithm != id.AlgorithmMegolmV1 || content.SessionID == "" || evt.ID == "" || evt.RoomID == "" || evt.Sender == "" {
		return fmt.Errorf("event %s is not a Megolm event", evt.ID)
	}
	now := r.now()
	r.lock.Lock()
	r.arrival = max(r.arrival+1, now.UnixNano())
	arrival := r.arrival
	r.lock.Unlock()
	//lint:ignore SA1019 the deprecated fields are the only hint at the sending device
	senderKey, deviceID := content.SenderKey, content.DeviceID
	added, err := r.store.Add(ctx, &Pending{
		EventID: evt.ID, RoomID: evt.RoomID, SessionID: content.SessionID, SenderKey: senderKey, Sender: evt.Sender,
		DeviceID: deviceID, Event: evt, OriginTS: time.UnixMilli(evt.Timestamp), FirstSeen: now, Arrival: arrival, NextRequest: now,
	}, r.cfg.limits())
	var full *PendingFullError
	if errors.As(err, &full) {
		r.count(CountNotRecorded)
		r.count(fullCounts[full.Cap])
		return err
	} else if err != nil {
		return err
	}
	r.lock.Lock()
	decrypted := r.decrypted.remove(evt.ID)
	if !decrypted {
		r.recorded.add(evt.ID)
	}
	r.lock.Unlock()
	if decrypted {
		// The bridge decrypted it meanwhile (bridgev2 waits for a session once per event, and
		// another event's wait may record this one): it is not pending after all.
		if _, err = r.store.Delete(ctx, evt.ID); err != nil {
			return fmt.Errorf("failed to remove event %s decrypted meanwhile: %w", evt.ID, err)
		}
		return nil
	}
	if added {
		r.count(CountRecorded)
		zerolog.Ctx(ctx).Info().Str("unwedge", "pending").Stringer("event_id", evt.ID).Stringer("session_id", content.SessionID).
			Stringer("user_id", evt.Sender).Stringer("identity_key", senderKey).Msg("Recorded undecryptable event: it will be bridged when its key arrives")
	}
	return nil
}

// Decrypted is told that the bridge decrypted an event itself (bridgev2's own wait got the key).
func (r *Recovery) Decrypted(ctx context.Context, eventID id.EventID) {
	r.lock.Lock()
	ok := r.recorded.remove(eventID)
	if !ok {
		r.decrypted.add(eventID)
	}
	r.lock.Unlock()
	if !ok {
		return
	}
	if deleted, err := r.store.Delete(ctx, eventID); err != nil {
		zerolog.Ctx(ctx).Err(err).Stringer("event_id", eventID).Msg("Failed to remove decrypted event from pending events")
	} else if deleted {
		r.count(CountDecryptedStock)
	}
}

// SessionReceived is told that a Megolm session arrived, known from firstKnownIndex
// (OlmMachine.SessionReceived). A session whose events wait for an earlier index than the bridge
// holds (tooLate) is handed over again only when this copy starts earlier.
func (r *Recovery) SessionReceived(roomID id.RoomID, sessionID id.SessionID, firstKnownIndex uint32) {
	s := receivedSession{roomID, sessionID}
	if held, ok := r.tooLate.get(s); ok {
		if firstKnownIndex >= held {
			return
		}
		r.tooLate.delete(s)
	}
	r.log.Debug().Stringer("room_id", roomID).Stringer("session_id", sessionID).Uint32("first_known_index", firstKnownIndex).
		Msg("Megolm session received")
	r.lock.Lock()
	r.received[s] = r.now()
	r.lock.Unlock()
	r.poke()
}

// DeviceHealed follows a heal of the device (Unwedger.OnHealed): the keys lost with its old Olm
// session are asked for again, over the new one, both for the sessions bridgev2 is waiting for and
// for the recorded events of the device's user that name the device; and the bridge's own room
// keys go to the device again (Reshare).
func (r *Recovery) DeviceHealed(ctx context.Context, device *id.Device) {
	for sessionID, roomID := range r.waits.healedNow(device, r.now()) {
		r.RequestSession(ctx, roomID, device.IdentityKey, sessionID, device.UserID, device.DeviceID)
	}
	r.Reshare(ctx, device)
	if !r.cfg.Enabled {
		return
	}
	if n, err := r.store.RequestNow(ctx, device.UserID, device.IdentityKey, r.now()); err != nil {
		zerolog.Ctx(ctx).Err(err).Msg("Failed to schedule key requests after heal")
	} else if n > 0 {
		r.poke()
	}
}

// Reshare sends a device the bridge's current outbound Megolm sessions again, over the Olm
// session in use now, when that session replaced one the device could not read (the bridge healed
// it, or the device opened a new one: Unwedger.OnNewSession), with the checks sharing applies
// (ReshareOwnSessions). The keys are at the sessions' current index: what the device missed
// before it can ask for, and AnswerOwnSession answers from the index it had.
func (r *Recovery) Reshare(ctx context.Context, device *id.Device) {
	if r.sink == nil {
		return
	}
	log := zerolog.Ctx(ctx).With().Stringer("user_id", device.UserID).Stringer("device_id", device.DeviceID).
		Stringer("identity_key", device.IdentityKey).Logger()
	rooms, err := r.sink.OutboundRooms(ctx)
	if err != nil {
		log.Err(err).Msg("Failed to list outbound Megolm sessions to share again")
		return
	}
	sent, err := ReshareOwnSessions(ctx, r.mach, device, rooms, r.sink.IsMember)
	if err != nil {
		log.Warn().Err(err).Msg("Failed to share some room keys again")
	}
	if sent > 0 {
		log.Info().Int("sessions", sent).Msg("Shared the bridge's room keys again over the new Olm session")
	}
}

// finish removes a leased event that was bridged, dropped or given up.
func (r *Recovery) finish(ctx context.Context, eventID id.EventID) error {
	if err := r.store.Done(ctx, eventID, r.owner); err != nil {
		return err
	}
	r.lock.Lock()
	r.recorded.remove(eventID)
	r.lock.Unlock()
	return nil
}

func (r *Recovery) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Start runs the recovery loop until Stop.
func (r *Recovery) Start() {
	r.lock.Lock()
	r.started = r.now()
	r.lock.Unlock()
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		var lastSweep time.Time
		for {
			sweep := r.now().Sub(lastSweep) >= sweepInterval
			if sweep {
				lastSweep = r.now()
			}
			_ = r.catch(r.ctx, PanicRecoveryPass, func() error {
				r.pass(r.ctx, sweep)
				return nil
			})
			select {
			case <-r.ctx.Done():
				return
			case <-r.wake:
			case <-time.After(recoveryTick):
			}
		}
	}()
}

// Stop ends the loop and waits for it.
func (r *Recovery) Stop() {
	r.cancel()
	r.done.Wait()
}

// Counts returns the recovery counters since start.
func (r *Recovery) Counts() map[RecoveryCount]int64 {
	r.lock.Lock()
	defer r.lock.Unlock()
	return maps.Clone(r.counts)
}

func (r *Recovery) count(name RecoveryCount) {
	r.lock.Lock()
	r.counts[name]++
	r.lock.Unlock()
}

// pass does one round: hand over events whose sessions arrived, send due key requests, and give
// up expired events. With sweep it also looks for sessions that arrived unannounced (through
// another replica, or while this process was down).
func (r *Recovery) pass(ctx context.Context, sweep bool) {
	log := zerolog.Ctx(ctx)
	now := r.now()
	// Events recorded by this process are bridgev2's for StockWait (it waits for their key
	// itself); events recorded before this process started had their wait in a process that is
	// gone, and are Recovery's at once.
	r.lock.Lock()
	handover := now.Add(-StockWait)
	// The store keeps milliseconds, and an event first seen at the hand-over time counts: one
	// recorded in the millisecond this process started is this process's.
	if before := r.started.Add(-time.Millisecond); handover.Before(before) {
		handover = before
	}
	arrived := make([]receivedSession, 0, len(r.received))
	for s, at := range r.received {
		arrived = append(arrived, s)
		if now.Sub(at) > 2*StockWait {
			delete(r.received, s)
		}
	}
	r.lock.Unlock()
	for _, s := range arrived {
		// A session that arrives while bridgev2 waits for it is bridgev2's: its wait decrypts
		// and bridges the events, and their rows go (Decrypted). Any other arrived session's
		// events are bridged at once, whoever recorded them and whenever.
		if busy, until := r.waits.busy(s.sessionID, now); busy {
			if !until.IsZero() {
				time.AfterFunc(until.Sub(now), r.poke)
			}
			continue
		}
		// Most sessions arrive with nothing waiting for them: they are forgotten at once.
		if r.deliverSession(ctx, s.roomID, s.sessionID, now, now) > 0 || !r.waiting(ctx, s.roomID, s.sessionID) {
			r.lock.Lock()
			delete(r.received, s)
			r.lock.Unlock()
		}
	}
	if sweep {
		waiting, err := r.store.WaitingSessions(ctx, handover, batchLimit)
		if err != nil && ctx.Err() == nil {
			log.Err(err).Msg("Failed to list sessions that pending events wait for")
		}
		for _, s := range waiting {
			if !r.waitsForEarlier(s.RoomID, s.SessionID) && r.hasSession(ctx, s.RoomID, s.SessionID) {
				r.deliverSession(ctx, s.RoomID, s.SessionID, now, handover)
			}
		}
	}
	r.requestKeys(ctx, now, handover)
	r.giveUp(ctx, now)
}

func (r *Recovery) waiting(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) bool {
	waiting, err := r.store.Waiting(ctx, roomID, sessionID)
	return err != nil || waiting
}

func (r *Recovery) hasSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) bool {
	sess, err := r.mach.CryptoStore.GetGroupSession(ctx, roomID, sessionID)
	return err == nil && sess != nil
}

// deliverSession decrypts the handed-over events of a session that arrived and gives them to the
// bridge in the order they arrived, batchLimit at a time; it returns how many it bridged.
func (r *Recovery) deliverSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, now, handover time.Time) int {
	if r.waitsForEarlier(roomID, sessionID) {
		return 0
	}
	log := zerolog.Ctx(ctx).With().Stringer("room_id", roomID).Stringer("session_id", sessionID).Logger()
	delivered, handled, requested := 0, 0, 0
	var last *Pending
	for {
		leased, err := r.store.LeaseSession(ctx, roomID, sessionID, r.owner, now, now.Add(r.Lease), handover, batchLimit)
		if err != nil {
			if ctx.Err() == nil {
				log.Err(err).Msg("Failed to lease pending events")
			}
			break
		}
		released := 0
		for _, p := range leased {
			last = p
			requested = max(requested, p.Requests)
			switch r.deliverEvent(ctx, log, p, now) {
			case eventDelivered:
				delivered++
				handled++
			case eventDropped:
				handled++
			case eventReleased:
				released++
			}
		}
		// A full batch of events that all went through may have more behind it; events given
		// back would only be leased again.
		if len(leased) < batchLimit || released > 0 {
			break
		}
	}
	if handled > 0 && requested > 0 {
		r.count(CountRequestsFilled)
		r.cancelRequest(ctx, last)
	}
	return delivered
}

// eventOutcome is how the hand-over of one pending event ended.
type eventOutcome int

const (
	eventDelivered eventOutcome = iota
	eventDropped
	// eventReleased: it still cannot be bridged, and waits on.
	eventReleased
	// eventKept: it went through, but its row could not be removed; the lease runs out.
	eventKept
)

// deliverEvent decrypts one leased event and hands it to the bridge.
func (r *Recovery) deliverEvent(ctx context.Context, log zerolog.Logger, p *Pending, now time.Time) eventOutcome {
	elog := log.With().Stringer("event_id", p.EventID).Stringer("user_id", p.Sender).Stringer("identity_key", p.SenderKey).Logger()
	decrypted, err := r.mach.DecryptMegolmEvent(ctx, p.Event)
	if err == nil {
		fault.At(r.ctx, FaultKeyArrived)
		// The sink's lines about the event carry its sender's fields too.
		err = r.sink.Deliver(elog.WithContext(ctx), p.Event, decrypted, p.Requests)
	}
	var dropped *DroppedError
	if errors.As(err, &dropped) {
		// The key came, but the room's rules no longer let the event through.
		if err = r.finish(ctx, p.EventID); err != nil {
			elog.Err(err).Msg("Failed to remove dropped event from pending events")
			return eventKept
		}
		r.count(CountDropped)
		elog.Warn().Str("unwedge", "dropped").Stringer("sender", p.Sender).Str("reason", dropped.Reason).
			Msg("Dropped undecryptable event: it will not be bridged")
		return eventDropped
	}
	if err != nil {
		if errors.Is(err, olm.ErrUnknownMessageIndex) {
			r.waitForEarlier(ctx, log, p)
		} else {
			elog.Warn().Err(err).Msg("Pending event still cannot be bridged")
		}
		if err = r.store.Release(ctx, p.EventID, r.owner, err.Error()); err != nil {
			elog.Err(err).Msg("Failed to release pending event")
		}
		return eventReleased
	}
	fault.At(r.ctx, FaultEventDelivered)
	if err = r.finish(ctx, p.EventID); err != nil {
		// The lease runs out and the event is handed over again; the sink knows it was bridged.
		elog.Err(err).Msg("Failed to remove bridged event from pending events")
	}
	r.count(CountRecovered)
	elog.Info().Str("unwedge", "recovered").Dur("waited", now.Sub(p.FirstSeen)).Int("key_requests", p.Requests).Msg("Bridged event after its key arrived late")
	return eventDelivered
}

// waitsForEarlier reports whether the session's pending events wait for a copy from an earlier
// index than the bridge holds (waitForEarlier).
func (r *Recovery) waitsForEarlier(roomID id.RoomID, sessionID id.SessionID) bool {
	_, ok := r.tooLate.get(receivedSession{roomID, sessionID})
	return ok
}

// waitForEarlier notes that the bridge holds p's session only from a later index than p's: its
// events wait, without being tried again, until a copy from an earlier index arrives (a forwarded
// key answering a request, or the sender sharing it again). Logged once per session.
func (r *Recovery) waitForEarlier(ctx context.Context, log zerolog.Logger, p *Pending) {
	if r.waitsForEarlier(p.RoomID, p.SessionID) {
		return
	}
	var first uint32
	if igs, err := r.mach.CryptoStore.GetGroupSession(ctx, p.RoomID, p.SessionID); err == nil && igs != nil {
		first = igs.Internal.FirstKnownIndex()
	}
	r.tooLate.update(receivedSession{p.RoomID, p.SessionID}, func(uint32, bool) (uint32, bool) { return first, true })
	log.Info().Stringer("user_id", p.Sender).Stringer("identity_key", p.SenderKey).Uint32("first_known_index", first).
		Msg("Pending events wait for an earlier copy of their room key: the bridge holds it only from a later index")
}

// requestKeys sends the key requests that are due, one per session, and schedules the next.
func (r *Recovery) requestKeys(ctx context.Context, now, handover time.Time) {
	log := zerolog.Ctx(ctx)
	due, err := r.store.DueSessions(ctx, now, handover, batchLimit)
	if err != nil {
		if ctx.Err() == nil {
			log.Err(err).Msg("Failed to list due key requests")
		}
		return
	}
	for _, s := range due {
		slog := log.With().Stringer("room_id", s.RoomID).Stringer("session_id", s.SessionID).Stringer("user_id", s.Sender).Stringer("identity_key", s.SenderKey).Logger()
		if r.waitsForEarlier(s.RoomID, s.SessionID) {
			// Its key requests go on: a forwarded copy from an earlier index is what it waits for.
		} else if r.hasSession(ctx, s.RoomID, s.SessionID) {
			r.deliverSession(ctx, s.RoomID, s.SessionID, now, handover)
			continue
		}
		next, requests := now.Add(r.cfg.Retention), s.Requests
		switch {
		case s.Requests >= r.cfg.KeyRequests:
			// No more requests; the key may still arrive by itself until the retention passes.
		case r.healing(s.Sender, s.SenderKey):
			// Asked after the heal (DeviceHealed); an answer now would use the broken session.
			r.count(CountRequestsDeferred)
			next = now.Add(r.cfg.MinBackoff)
		default:
			target := r.requestTarget(ctx, s.Sender, s.SenderKey, s.DeviceID)
			err = r.mach.SendRoomKeyRequest(ctx, s.RoomID, s.SenderKey, s.SessionID, r.requestID(s.SessionID), map[id.UserID][]id.DeviceID{s.Sender: {target}})
			if err != nil {
				slog.Warn().Err(err).Msg("Failed to send key request for pending events")
				next = now.Add(r.cfg.MinBackoff)
				break
			}
			requests++
			r.count(CountRequestsSent)
			next = now.Add(r.cfg.backoff(requests))
			if requests >= r.cfg.KeyRequests {
				next = now.Add(r.cfg.Retention)
			}
			slog.Debug().Stringer("device_id", target).Int("request", requests).Int("events", s.Events).Time("next_request", next).
				Msg("Requested key for pending events")
		}
		if err = r.store.MarkRequested(ctx, s, requests, next); err != nil {
			slog.Err(err).Msg("Failed to record key request")
		}
	}
}

// requestTarget is the device that sent the session: found by its identity key, else as the
// event names it (its deprecated device_id), else all the sender's devices.
func (r *Recovery) requestTarget(ctx context.Context, sender id.UserID, key id.SenderKey, named id.DeviceID) id.DeviceID {
	if dev, err := r.mach.CryptoStore.FindDeviceByKey(ctx, sender, key); err == nil && dev != nil {
		return dev.DeviceID
	} else if named != "" {
		return named
	}
	return "*"
}

// requestID is the same for every request of a session, so a cancellation covers them all.
func (r *Recovery) requestID(sessionID id.SessionID) string {
	sum := sha256.Sum256([]byte(string(r.mach.Client.DeviceID) + "|" + string(sessionID)))
	return "unwedge-" + hex.EncodeToString(sum[:12])
}

// cancelRequest withdraws the key request of a session that arrived.
func (r *Recovery) cancelRequest(ctx context.Context, p *Pending) {
	target := r.requestTarget(ctx, p.Sender, p.SenderKey, p.DeviceID)
	req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{p.Sender: {target: {
		Parsed: &event.RoomKeyRequestEventContent{
			Action: event.KeyRequestActionCancel, RequestID: r.requestID(p.SessionID), RequestingDeviceID: r.mach.Client.DeviceID,
		},
	}}}}
	if _, err := r.mach.Client.SendToDevice(ctx, event.ToDeviceRoomKeyRequest, req); err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Stringer("session_id", p.SessionID).Stringer("user_id", p.Sender).Stringer("device_id", target).
			Stringer("identity_key", p.SenderKey).Msg("Failed to cancel key request")
	}
}

// DroppedError is what Sink.Deliver returns for an event that must not be bridged any more,
// although its key arrived: its sender left or was removed from the room, it was redacted, or its
// device is not trusted enough. Its row is deleted and it is counted as dropped.
type DroppedError struct {
	Reason string
}

func (e *DroppedError) Error() string { return "not bridged: " + e.Reason }

// Redacted is told that a redaction of eventID arrived in roomID, sent by redacter. A pending
// event that it redacts is dropped at once: it is never bridged, even if its key arrives later.
// Unless moderator (the redacter may redact other users' events there), only the event's own
// sender's redaction counts. It reports whether an event was dropped.
func (r *Recovery) Redacted(ctx context.Context, roomID id.RoomID, eventID, redactionID id.EventID, redacter id.UserID, moderator bool) bool {
	sender := redacter
	if moderator {
		sender = ""
	}
	sender, err := r.store.DeleteRedacted(ctx, roomID, eventID, sender)
	if err != nil {
		zerolog.Ctx(ctx).Err(err).Stringer("event_id", eventID).Stringer("room_id", roomID).Msg("Failed to remove redacted event from pending events")
		return false
	} else if sender == "" {
		return false
	}
	r.lock.Lock()
	r.recorded.remove(eventID)
	r.lock.Unlock()
	r.count(CountDropped)
	zerolog.Ctx(ctx).Warn().Str("unwedge", "dropped").Stringer("event_id", eventID).Stringer("room_id", roomID).Stringer("sender", sender).
		Stringer("redaction_id", redactionID).Stringer("redacted_by", redacter).Str("reason", "the event was redacted").
		Msg("Dropped undecryptable event: it will not be bridged")
	return true
}

// ErrGaveUp is the reason given for an event whose key never arrived.
var ErrGaveUp = errors.New("the bridge never received the keys to decrypt it")

// giveUp removes events that waited longer than the retention, telling their senders.
func (r *Recovery) giveUp(ctx context.Context, now time.Time) {
	expired, err := r.store.LeaseExpired(ctx, now.Add(-r.cfg.Retention), r.owner, now, now.Add(r.Lease), batchLimit)
	if err != nil {
		if ctx.Err() == nil {
			zerolog.Ctx(ctx).Err(err).Msg("Failed to list expired pending events")
		}
		return
	}
	for _, p := range expired {
		elog := zerolog.Ctx(ctx).With().Stringer("event_id", p.EventID).Stringer("room_id", p.RoomID).Stringer("user_id", p.Sender).
			Stringer("identity_key", p.SenderKey).Stringer("session_id", p.SessionID).Logger()
		reason := fmt.Sprintf("%s (waited %s, asked %d times)", ErrGaveUp, humanDuration(r.cfg.Retention), p.Requests)
		r.sink.GiveUp(elog.WithContext(ctx), p.Event, reason)
		if err = r.finish(ctx, p.EventID); err != nil {
			elog.Err(err).Msg("Failed to remove given-up event")
			continue
		}
		r.count(CountGivenUp)
		elog.Warn().Str("unwedge", "given_up").Int("key_requests", p.Requests).Msg("Gave up on undecryptable event: its key never arrived")
	}
}

// humanDuration writes whole days as days ("7 days"), anything else as Go does ("90m0s").
func humanDuration(d time.Duration) string {
	const day = 24 * time.Hour
	switch {
	case d == day:
		return "1 day"
	case d%day == 0:
		return fmt.Sprintf("%d days", d/day)
	}
	return d.String()
}
