package unwedge

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// This file holds what Recovery keeps in memory about bridgev2's own wait for a missing Megolm
// session (3 s, a key request, 22 s more in mautrix-go v0.32.0): which events failed, which
// sessions bridgev2 waits for and for whose events, and which devices were healed lately.

// Undecryptable is told that the bridge failed to decrypt a room event for lack of its Megolm
// session. The event is held until bridgev2 waits for the session (WaitForSession), which it
// does only for live events; events it fetched later are forgotten.
func (r *Recovery) Undecryptable(evt *event.Event) {
	r.live.remember(evt, r.now())
}

// WaitForSession is bridgev2's wait for a Megolm session (matrix.Crypto.WaitForSession), as the
// stock helper does it, and more: the events bridgev2 waits for are recorded (when recovery is
// enabled), so they are bridged when their key arrives even after bridgev2 gave up on them; and
// when the events' sender had the device healed lately, the key is requested at once.
func (r *Recovery) WaitForSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, timeout time.Duration) bool {
	fresh, senders := r.live.take(roomID, senderKey, sessionID, r.now())
	// The wait is registered before its events are recorded: Recovery hands a session's recorded
	// events to the bridge at once when its key arrives, unless bridgev2 waits for it (busy).
	healed := r.waits.start(roomID, senderKey, sessionID, senders, r.now())
	defer func() { r.waits.end(senderKey, sessionID, r.now()) }()
	if r.cfg.Enabled {
		for _, evt := range fresh {
			if err := r.Record(ctx, evt); err != nil {
				zerolog.Ctx(ctx).Warn().Err(err).Stringer("event_id", evt.ID).Msg("Undecryptable event not kept for recovery")
			}
		}
	}
	if healed != nil {
		go r.RequestSession(context.WithoutCancel(ctx), roomID, senderKey, sessionID, healed.UserID, healed.DeviceID)
	}
	return r.mach.WaitForSession(ctx, roomID, senderKey, sessionID, timeout)
}

// RequestSession asks a device for a Megolm session (matrix.Crypto.RequestSession), as the stock
// helper does, except while the device's Olm session is being replaced: the answer would come
// back over the broken session. DeviceHealed asks again when the heal is done.
func (r *Recovery) RequestSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, userID id.UserID, deviceID id.DeviceID) {
	if deviceID == "" {
		deviceID = "*"
	}
	log := r.log.With().Stringer("user_id", userID).Stringer("device_id", deviceID).Stringer("session_id", sessionID).Stringer("room_id", roomID).Logger()
	if r.healing(userID, senderKey) {
		log.Debug().Msg("Not sending key request while the sender's Olm session is being replaced")
		return
	}
	if err := r.mach.SendRoomKeyRequest(ctx, roomID, senderKey, sessionID, "", map[id.UserID][]id.DeviceID{userID: {deviceID}}); err != nil {
		log.Warn().Err(err).Msg("Failed to send key request")
	} else {
		log.Debug().Msg("Sent key request")
	}
}

// liveEvents holds the events the bridge just failed to decrypt for lack of their Megolm session,
// until bridgev2 waits for that session, for liveTTL at most. bridgev2 waits only for events it
// received live from the homeserver, from users allowed to send
// (matrix.Connector.handleEncryptedEvent), right after its decrypt failed; not for events it
// fetched later (ASIntent.GetEvent, for history and replies, decrypts too). So only events that
// bridgev2 waits for are recorded for recovery (a fetched event only if bridgev2 waits for the
// same session of the same sender key in the same room within liveTTL), and the senders of those
// events are the only users a key request for the session goes to.
type liveEvents struct {
	lock     sync.Mutex
	sessions map[liveKey]*liveSession
	// queue holds what was remembered, the oldest first, to forget it after liveTTL.
	queue []liveItem
	// held counts the fresh events of all sessions.
	held int
}

type liveKey struct {
	roomID    id.RoomID
	senderKey id.SenderKey
	sessionID id.SessionID
}

type liveItem struct {
	key     liveKey
	eventID id.EventID
	at      time.Time
}

type liveSession struct {
	// last is when an event of the session was last remembered.
	last    time.Time
	senders []id.UserID
	// fresh are the events not yet handed to WaitForSession.
	fresh []*event.Event
}

const (
	// liveTTL is how long an event and its sender are remembered. bridgev2 waits right after its
	// decrypt failed, and a second time 3 s later (mautrix-go v0.32.0), asking for the senders
	// again.
	// Relies on bridgev2/matrix/matrix.go handleEncryptedEvent's two WaitForSession calls (pinned in internal/upstream).
	liveTTL = 10 * time.Second
	// maxLiveSessions, maxLiveEvents and maxLiveQueue bound what is held (sessions, fresh events
	// of all of them, and what is to be forgotten): the oldest is forgotten first.
	maxLiveSessions = 1024
	maxLiveEvents   = 1024
	maxLiveQueue    = 4 * maxLiveEvents
	// maxLiveSenders bounds the senders remembered per session.
	maxLiveSenders = 8
)

// remember holds an event whose session is missing.
func (l *liveEvents) remember(evt *event.Event, now time.Time) {
	content, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return
	}
	l.lock.Lock()
	defer l.lock.Unlock()
	if l.sessions == nil {
		l.sessions = make(map[liveKey]*liveSession)
	}
	l.expire(now)
	for len(l.queue) > 0 && (l.held >= maxLiveEvents || len(l.sessions) >= maxLiveSessions || len(l.queue) >= maxLiveQueue) {
		l.pop()
	}
	key := liveKey{evt.RoomID, content.SenderKey, content.SessionID}
	sess := l.sessions[key]
	if sess == nil {
		sess = &liveSession{}
		l.sessions[key] = sess
	}
	sess.last = now
	if !slices.Contains(sess.senders, evt.Sender) && len(sess.senders) < maxLiveSenders {
		sess.senders = append(sess.senders, evt.Sender)
	}
	sess.fresh = append(sess.fresh, evt)
	l.held++
	l.queue = append(l.queue, liveItem{key, evt.ID, now})
}

// take returns the events of a session not taken before, and the senders of all its events
// remembered within liveTTL.
func (l *liveEvents) take(roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, now time.Time) (fresh []*event.Event, senders []id.UserID) {
	l.lock.Lock()
	defer l.lock.Unlock()
	l.expire(now)
	sess := l.sessions[liveKey{roomID, senderKey, sessionID}]
	if sess == nil {
		return nil, nil
	}
	fresh, sess.fresh = sess.fresh, nil
	l.held -= len(fresh)
	return fresh, slices.Clone(sess.senders)
}

// expire forgets what was remembered more than liveTTL ago.
func (l *liveEvents) expire(now time.Time) {
	for len(l.queue) > 0 && now.Sub(l.queue[0].at) > liveTTL {
		l.pop()
	}
}

// pop forgets the oldest remembered event, and its session when nothing newer was remembered
// of it.
func (l *liveEvents) pop() {
	item := l.queue[0]
	l.queue = l.queue[1:]
	sess := l.sessions[item.key]
	if sess == nil {
		return
	}
	if i := slices.IndexFunc(sess.fresh, func(evt *event.Event) bool { return evt.ID == item.eventID }); i >= 0 {
		sess.fresh = slices.Delete(sess.fresh, i, i+1)
		l.held--
	}
	if !sess.last.After(item.at) {
		l.held -= len(sess.fresh)
		delete(l.sessions, item.key)
	}
}

// waitTable holds the Megolm sessions bridgev2 is waiting for, by the sender key their events
// name, so that a heal of that device can request them again at once over the new session; and
// the devices healed in the last recentHeal, whose missing keys are requested at once instead of
// after bridgev2's first wait.
type waitTable struct {
	lock    sync.Mutex
	waiting map[id.SenderKey]map[id.SessionID]waitingSession
	healed  map[id.SenderKey]healedDevice
	// ended holds when the last wait for a session (under any sender key) ended, for waitGrace.
	ended map[id.SessionID]time.Time
}

// waitingSession is a session bridgev2 waits for, and the senders of its events. The sender key
// of an event is whatever its sender wrote: a key request goes to a healed device only when its
// user sent one of the events.
type waitingSession struct {
	roomID  id.RoomID
	senders []id.UserID
	// waits counts bridgev2's waits for the session that are running.
	waits int
}

type healedDevice struct {
	device *id.Device
	at     time.Time
}

// recentHeal is how long after a heal a missing key of the device is requested at once.
const recentHeal = 2 * time.Minute

// waitGrace is how long after bridgev2's last wait for a session ended the session is still
// left to bridgev2: a wait that returned because the key arrived is followed by bridgev2's own
// decrypt (and Recovery.Decrypted), and a first wait that ran out by its second one (a key request
// in between, mautrix-go v0.33.0).
// Relies on bridgev2/matrix/matrix.go handleEncryptedEvent and waitLongerForSession (pinned in internal/upstream).
const waitGrace = time.Second

// start registers a wait (one of maybe several for the session) and returns the device healed lately whose user sent one of the events,
// if any; end unregisters it.
func (w *waitTable) start(roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, senders []id.UserID, now time.Time) *id.Device {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.waiting == nil {
		w.waiting = make(map[id.SenderKey]map[id.SessionID]waitingSession)
	}
	if w.waiting[senderKey] == nil {
		w.waiting[senderKey] = make(map[id.SessionID]waitingSession)
	}
	waiting := w.waiting[senderKey][sessionID]
	waiting.roomID, waiting.waits = roomID, waiting.waits+1
	for _, sender := range senders {
		if !slices.Contains(waiting.senders, sender) && len(waiting.senders) < maxLiveSenders {
			waiting.senders = append(waiting.senders, sender)
		}
	}
	w.waiting[senderKey][sessionID] = waiting
	if healed, ok := w.healed[senderKey]; ok && now.Sub(healed.at) < recentHeal && slices.Contains(senders, healed.device.UserID) {
		return healed.device
	}
	return nil
}

func (w *waitTable) end(senderKey id.SenderKey, sessionID id.SessionID, now time.Time) {
	w.lock.Lock()
	defer w.lock.Unlock()
	if waiting := w.waiting[senderKey][sessionID]; waiting.waits > 1 {
		waiting.waits--
		w.waiting[senderKey][sessionID] = waiting
		return
	}
	delete(w.waiting[senderKey], sessionID)
	if len(w.waiting[senderKey]) == 0 {
		delete(w.waiting, senderKey)
	}
	if w.waitingFor(sessionID) {
		return
	}
	if w.ended == nil {
		w.ended = make(map[id.SessionID]time.Time)
	}
	for s, at := range w.ended {
		if now.Sub(at) > waitGrace {
			delete(w.ended, s)
		}
	}
	w.ended[sessionID] = now
}

// waitingFor reports whether a wait for the session runs under any sender key (an event's sender
// key is its sender's word). The lock must be held.
func (w *waitTable) waitingFor(sessionID id.SessionID) bool {
	for _, sessions := range w.waiting {
		if _, ok := sessions[sessionID]; ok {
			return true
		}
	}
	return false
}

// busy reports whether bridgev2 waits for the session now, or did within waitGrace; and when
// the grace runs out, if it is not waiting now.
func (w *waitTable) busy(sessionID id.SessionID, now time.Time) (busy bool, until time.Time) {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.waitingFor(sessionID) {
		return true, time.Time{}
	}
	if at, ok := w.ended[sessionID]; ok && now.Sub(at) <= waitGrace {
		return true, at.Add(waitGrace)
	}
	return false, time.Time{}
}

// healedNow remembers a heal of the device and returns the sessions bridgev2 waits for that its
// user's events named, by session, with their rooms.
func (w *waitTable) healedNow(device *id.Device, now time.Time) map[id.SessionID]id.RoomID {
	w.lock.Lock()
	defer w.lock.Unlock()
	if w.healed == nil {
		w.healed = make(map[id.SenderKey]healedDevice)
	}
	for key, healed := range w.healed {
		if now.Sub(healed.at) > recentHeal {
			delete(w.healed, key)
		}
	}
	w.healed[device.IdentityKey] = healedDevice{device: device, at: now}
	sessions := make(map[id.SessionID]id.RoomID)
	for sessionID, waiting := range w.waiting[device.IdentityKey] {
		if slices.Contains(waiting.senders, device.UserID) {
			sessions[sessionID] = waiting.roomID
		}
	}
	return sessions
}
