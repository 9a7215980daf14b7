package unwedge

import (
	"context"
	"fmt"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// PendingStore keeps undecryptable events until their keys arrive; PendingQuery
// implements it.
type PendingStore interface {
	Add(ctx context.Context, p *Pending, limits PendingLimits) (bool, error)
	Delete(ctx context.Context, eventID id.EventID) (bool, error)
	Waiting(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (bool, error)
	DueSessions(ctx context.Context, now, handover time.Time, limit int) ([]*PendingSession, error)
	WaitingSessions(ctx context.Context, handover time.Time, limit int) ([]*PendingSession, error)
	MarkRequested(ctx context.Context, s *PendingSession, requests int, next time.Time) error
	RequestNow(ctx context.Context, sender id.UserID, senderKey id.SenderKey, now time.Time) (int64, error)
	LeaseSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, owner string, now, until, handover time.Time, limit int) ([]*Pending, error)
	LeaseExpired(ctx context.Context, before time.Time, owner string, now, until time.Time, limit int) ([]*Pending, error)
	Release(ctx context.Context, eventID id.EventID, owner, lastErr string) error
	Done(ctx context.Context, eventID id.EventID, owner string) error
	DeleteRedacted(ctx context.Context, roomID id.RoomID, eventID id.EventID, sender id.UserID) (id.UserID, error)
}

// Pending is a room event the bridge could not decrypt for lack of its Megolm session.
type Pending struct {
	EventID   id.EventID
	RoomID    id.RoomID
	SessionID id.SessionID
	SenderKey id.SenderKey
	Sender    id.UserID
	DeviceID  id.DeviceID
	// Event is the event as received (still encrypted).
	Event     *event.Event
	OriginTS  time.Time
	FirstSeen time.Time
	// Arrival orders the events as the bridge first received them (Unix ns, strictly increasing
	// per process; Recovery sets it).
	Arrival     int64
	Requests    int
	NextRequest time.Time
	LastError   string
}

// PendingSession is a Megolm session that pending events wait for.
type PendingSession struct {
	RoomID    id.RoomID
	SessionID id.SessionID
	SenderKey id.SenderKey
	Sender    id.UserID
	DeviceID  id.DeviceID
	Requests  int
	Events    int
}

// PendingLimits caps the pending events: per sender, per room and in total.
type PendingLimits struct {
	PerSender, PerRoom, Total int
}

// PendingCap names the cap that kept an event out.
type PendingCap string

const (
	CapSender PendingCap = "sender"
	CapRoom   PendingCap = "room"
	CapTotal  PendingCap = "total"
)

// PendingFullError is Add's answer for an event over one of the caps; nothing was recorded.
type PendingFullError struct {
	Cap     PendingCap
	Pending int
}

func (e *PendingFullError) Error() string {
	return fmt.Sprintf("%d events of this %s already wait for keys", e.Pending, e.Cap)
}
