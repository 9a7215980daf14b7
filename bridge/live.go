package bridge

import (
	"slices"
	"sync"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// liveEvents holds the events the helper just failed to decrypt for lack of their Megolm session,
// until bridgev2 waits for that session. bridgev2 waits only for events it received live from the
// homeserver, from users allowed to send (matrix.Connector.handleEncryptedEvent), and not for
// events it fetched later (ASIntent.GetEvent, for history and replies, decrypts too). So only
// events that bridgev2 waits for are recorded for recovery, and the senders of those events are
// the only users a key request for the session goes to.
type liveEvents struct {
	lock     sync.Mutex
	sessions map[liveKey]*liveSession
	// held counts the fresh events of all sessions.
	held int
}

type liveKey struct {
	roomID    id.RoomID
	senderKey id.SenderKey
	sessionID id.SessionID
}

type liveSession struct {
	at      time.Time
	senders []id.UserID
	// fresh are the events not yet handed to WaitForSession.
	fresh []*event.Event
}

const (
	// liveTTL outlasts bridgev2's whole wait for a session (25 s in mautrix-go v0.32.0).
	liveTTL = 2 * time.Minute
	// maxLiveSessions and maxLiveEvents bound what is held (sessions, and fresh events of all of
	// them): the oldest session is forgotten first.
	maxLiveSessions = 1024
	maxLiveEvents   = 1024
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
	key := liveKey{evt.RoomID, content.SenderKey, content.SessionID}
	l.prune(now, key)
	sess := l.sessions[key]
	if sess == nil {
		sess = &liveSession{}
		l.sessions[key] = sess
	}
	sess.at = now
	if !slices.Contains(sess.senders, evt.Sender) && len(sess.senders) < maxLiveSenders {
		sess.senders = append(sess.senders, evt.Sender)
	}
	sess.fresh = append(sess.fresh, evt)
	l.held++
}

// take returns the events of a session not taken before, and the senders of all its events.
func (l *liveEvents) take(roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID) (fresh []*event.Event, senders []id.UserID) {
	l.lock.Lock()
	defer l.lock.Unlock()
	sess := l.sessions[liveKey{roomID, senderKey, sessionID}]
	if sess == nil {
		return nil, nil
	}
	fresh, sess.fresh = sess.fresh, nil
	l.held -= len(fresh)
	return fresh, slices.Clone(sess.senders)
}

// prune makes room for one more event of session next: it forgets sessions older than liveTTL
// and then, while full, the oldest session (next last).
func (l *liveEvents) prune(now time.Time, next liveKey) {
	if len(l.sessions) < maxLiveSessions && l.held < maxLiveEvents {
		return
	}
	for key, sess := range l.sessions {
		if now.Sub(sess.at) > liveTTL {
			l.forget(key, sess)
		}
	}
	for len(l.sessions) >= maxLiveSessions || l.held >= maxLiveEvents {
		var oldest liveKey
		var oldestSess *liveSession
		for key, sess := range l.sessions {
			if key == next && len(l.sessions) > 1 {
				continue
			}
			if oldestSess == nil || sess.at.Before(oldestSess.at) {
				oldest, oldestSess = key, sess
			}
		}
		if oldestSess == nil {
			return
		}
		l.forget(oldest, oldestSess)
	}
}

func (l *liveEvents) forget(key liveKey, sess *liveSession) {
	l.held -= len(sess.fresh)
	delete(l.sessions, key)
}
