package database

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

const (
	pendingColumns = `event_id, room_id, session_id, sender_key, sender, device_id, event, origin_ts, first_seen, arrival, requests, next_request, last_error`
	// The lock row serialises inserts (Postgres locks the row until the transaction ends; SQLite
	// has one writer anyway), so the counts below stay true until the insert.
	lockPendingQuery = `
		INSERT INTO unwedge_pending_lock (bridge_id, records) VALUES ($1, 1)
		ON CONFLICT (bridge_id) DO UPDATE SET records = unwedge_pending_lock.records + 1`
	countPendingLimitsQuery = `
		SELECT
			(SELECT COUNT(*) FROM unwedge_pending WHERE bridge_id = $1 AND event_id = $2),
			(SELECT COUNT(*) FROM unwedge_pending WHERE bridge_id = $1 AND sender = $3),
			(SELECT COUNT(*) FROM unwedge_pending WHERE bridge_id = $1 AND room_id = $4),
			(SELECT COUNT(*) FROM unwedge_pending WHERE bridge_id = $1)`
	// A session's key requests are counted per sender: another member naming the same session
	// and sender key in their own events neither joins nor uses up the sender's requests.
	insertPendingQuery = `
		INSERT INTO unwedge_pending (bridge_id, event_id, room_id, session_id, sender_key, sender, device_id, event, origin_ts, first_seen, arrival, requests, next_request)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
			COALESCE((SELECT MAX(requests) FROM unwedge_pending WHERE bridge_id = $1 AND room_id = $3 AND session_id = $4 AND sender_key = $5 AND sender = $6), 0),
			COALESCE((SELECT MAX(next_request) FROM unwedge_pending WHERE bridge_id = $1 AND room_id = $3 AND session_id = $4 AND sender_key = $5 AND sender = $6), $12))
		ON CONFLICT (bridge_id, event_id) DO NOTHING`
	countPendingQuery   = `SELECT COUNT(*) FROM unwedge_pending WHERE bridge_id = $1`
	oldestPendingQuery  = `SELECT MIN(first_seen) FROM unwedge_pending WHERE bridge_id = $1`
	deletePendingQuery  = `DELETE FROM unwedge_pending WHERE bridge_id = $1 AND event_id = $2`
	sessionPendingQuery = `SELECT EXISTS (SELECT 1 FROM unwedge_pending WHERE bridge_id = $1 AND room_id = $2 AND session_id = $3)`
	// Sessions whose events passed the hand-over time and whose next key request is due.
	dueSessionsQuery = `
		SELECT room_id, session_id, sender_key, sender, MAX(device_id), MAX(requests), COUNT(*) FROM unwedge_pending
		WHERE bridge_id = $1 AND next_request <= $2 AND first_seen <= $3
		GROUP BY room_id, session_id, sender_key, sender
		ORDER BY MIN(next_request) LIMIT $4`
	waitingSessionsQuery = `
		SELECT room_id, session_id, sender_key, sender, MAX(device_id), MAX(requests), COUNT(*) FROM unwedge_pending
		WHERE bridge_id = $1 AND first_seen <= $2
		GROUP BY room_id, session_id, sender_key, sender
		ORDER BY MIN(arrival) LIMIT $3`
	markRequestedQuery = `
		UPDATE unwedge_pending SET requests = $6, next_request = $7
		WHERE bridge_id = $1 AND room_id = $2 AND session_id = $3 AND sender_key = $4 AND sender = $5`
	requestNowQuery = `
		UPDATE unwedge_pending SET next_request = $4 WHERE bridge_id = $1 AND sender = $2 AND sender_key = $3 AND next_request > $4`
	// The leases take at most $8 (and $6) events at once, the earliest arrivals first. The
	// lease's condition stands in the outer WHERE too: on Postgres a lease that waited for
	// another's row lock checks only that WHERE again, against the committed row (the subquery's
	// rows are from before the wait), so a row another owner just leased is left out.
	leaseSessionQuery = `
		UPDATE unwedge_pending SET lease_owner = $4, lease_until = $5
		WHERE bridge_id = $1 AND lease_until < $7 AND event_id IN (
			SELECT event_id FROM unwedge_pending
			WHERE bridge_id = $1 AND room_id = $2 AND session_id = $3 AND first_seen <= $6 AND lease_until < $7
			ORDER BY arrival LIMIT $8
		)
		RETURNING ` + pendingColumns
	leaseExpiredQuery = `
		UPDATE unwedge_pending SET lease_owner = $2, lease_until = $3
		WHERE bridge_id = $1 AND lease_until < $5 AND event_id IN (
			SELECT event_id FROM unwedge_pending
			WHERE bridge_id = $1 AND first_seen < $4 AND lease_until < $5
			ORDER BY arrival LIMIT $6
		)
		RETURNING ` + pendingColumns
	releasePendingQuery = `
		UPDATE unwedge_pending SET lease_owner = '', lease_until = 0, last_error = $4
		WHERE bridge_id = $1 AND event_id = $2 AND lease_owner = $3`
	// A redaction removes the event whatever its lease: a hand-over in progress checks the
	// redaction itself. An empty $4 matches any sender (a moderator's redaction).
	deleteRedactedQuery = `
		DELETE FROM unwedge_pending WHERE bridge_id = $1 AND room_id = $2 AND event_id = $3 AND ($4 = '' OR sender = $4)
		RETURNING sender`
	deleteLeasedQuery = `DELETE FROM unwedge_pending WHERE bridge_id = $1 AND event_id = $2 AND lease_owner = $3`
	listPendingQuery  = `
		SELECT ` + pendingColumns + ` FROM unwedge_pending
		WHERE bridge_id = $1 AND ($2 = '' OR sender = $2) ORDER BY arrival, event_id LIMIT $3`
)

// PendingQuery keeps undecryptable events until their keys arrive.
type PendingQuery struct {
	BridgeID string
	db       *dbutil.Database
}

// Add records an undecryptable event; the first key request is due at NextRequest, unless the
// sender's events of the same session already wait, whose request count and schedule it joins.
// It reports false when the event was already recorded, and a *unwedge.PendingFullError when the event
// would pass one of the limits. The limits are checked and the event inserted by one writer at a
// time, so concurrent adds (also of other replicas) never pass them.
func (pq *PendingQuery) Add(ctx context.Context, p *unwedge.Pending, limits unwedge.PendingLimits) (added bool, err error) {
	raw, err := json.Marshal(p.Event)
	if err != nil {
		return false, fmt.Errorf("failed to encode event %s: %w", p.EventID, err)
	}
	err = pq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := pq.db.Exec(ctx, lockPendingQuery, pq.BridgeID); err != nil {
			return err
		}
		var exists, bySender, byRoom, total int
		err := pq.db.QueryRow(ctx, countPendingLimitsQuery, pq.BridgeID, p.EventID, p.Sender, p.RoomID).Scan(&exists, &bySender, &byRoom, &total)
		switch {
		case err != nil:
			return err
		case exists > 0:
			return nil
		case bySender >= limits.PerSender:
			return &unwedge.PendingFullError{Cap: unwedge.CapSender, Pending: bySender}
		case byRoom >= limits.PerRoom:
			return &unwedge.PendingFullError{Cap: unwedge.CapRoom, Pending: byRoom}
		case total >= limits.Total:
			return &unwedge.PendingFullError{Cap: unwedge.CapTotal, Pending: total}
		}
		res, err := pq.db.Exec(ctx, insertPendingQuery, pq.BridgeID, p.EventID, p.RoomID, p.SessionID, p.SenderKey, p.Sender, p.DeviceID,
			string(raw), p.OriginTS.UnixMilli(), p.FirstSeen.UnixMilli(), p.Arrival, p.NextRequest.UnixMilli())
		if err != nil {
			return err
		}
		n, _ := res.RowsAffected()
		added = n > 0
		return nil
	})
	var full *unwedge.PendingFullError
	if err != nil && !errors.As(err, &full) {
		return false, fmt.Errorf("failed to record pending event %s: %w", p.EventID, err)
	}
	return added, err
}

// Count counts all pending events.
func (pq *PendingQuery) Count(ctx context.Context) (n int, err error) {
	err = pq.db.QueryRow(ctx, countPendingQuery, pq.BridgeID).Scan(&n)
	return
}

// Oldest returns when the bridge first failed on the pending event that has waited longest
// (first_seen, the bridge's clock, not the sender-controlled origin_server_ts); ok is false when
// no event is pending.
func (pq *PendingQuery) Oldest(ctx context.Context) (firstSeen time.Time, ok bool, err error) {
	var oldest sql.NullInt64
	if err = pq.db.QueryRow(ctx, oldestPendingQuery, pq.BridgeID).Scan(&oldest); err != nil || !oldest.Valid {
		return time.Time{}, false, err
	}
	return time.UnixMilli(oldest.Int64), true, nil
}

// Delete removes an event (the bridge decrypted it itself); it reports whether it was pending.
func (pq *PendingQuery) Delete(ctx context.Context, eventID id.EventID) (bool, error) {
	res, err := pq.db.Exec(ctx, deletePendingQuery, pq.BridgeID, eventID)
	if err != nil {
		return false, err
	}
	n, _ := res.RowsAffected()
	return n > 0, nil
}

// Waiting reports whether any event waits for a session.
func (pq *PendingQuery) Waiting(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (waiting bool, err error) {
	err = pq.db.QueryRow(ctx, sessionPendingQuery, pq.BridgeID, roomID, sessionID).Scan(&waiting)
	return
}

func scanPendingSession(row dbutil.Scannable) (*unwedge.PendingSession, error) {
	var s unwedge.PendingSession
	return &s, row.Scan(&s.RoomID, &s.SessionID, &s.SenderKey, &s.Sender, &s.DeviceID, &s.Requests, &s.Events)
}

// DueSessions lists sessions whose events were first seen before handover and whose next key
// request is due at now, the longest-waiting first.
func (pq *PendingQuery) DueSessions(ctx context.Context, now, handover time.Time, limit int) ([]*unwedge.PendingSession, error) {
	rows, err := pq.db.Query(ctx, dueSessionsQuery, pq.BridgeID, now.UnixMilli(), handover.UnixMilli(), limit)
	return dbutil.ConvertRowFn[*unwedge.PendingSession](scanPendingSession).NewRowIter(rows, err).AsList()
}

// WaitingSessions lists sessions with events first seen before handover, the oldest first.
func (pq *PendingQuery) WaitingSessions(ctx context.Context, handover time.Time, limit int) ([]*unwedge.PendingSession, error) {
	rows, err := pq.db.Query(ctx, waitingSessionsQuery, pq.BridgeID, handover.UnixMilli(), limit)
	return dbutil.ConvertRowFn[*unwedge.PendingSession](scanPendingSession).NewRowIter(rows, err).AsList()
}

// MarkRequested records a key request for a session's events of its sender, and when the next
// one is due.
func (pq *PendingQuery) MarkRequested(ctx context.Context, s *unwedge.PendingSession, requests int, next time.Time) error {
	_, err := pq.db.Exec(ctx, markRequestedQuery, pq.BridgeID, s.RoomID, s.SessionID, s.SenderKey, s.Sender, requests, next.UnixMilli())
	return err
}

// RequestNow makes the key requests for the sessions of a user's device due now (its Olm session
// was just replaced, so an answer can finally reach the bridge). Events of other senders that name
// the device's key are left alone.
func (pq *PendingQuery) RequestNow(ctx context.Context, sender id.UserID, senderKey id.SenderKey, now time.Time) (int64, error) {
	res, err := pq.db.Exec(ctx, requestNowQuery, pq.BridgeID, sender, senderKey, now.UnixMilli())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// LeaseSession holds a session's events that passed the hand-over time for owner until until,
// so no other worker or replica hands them to the bridge at the same time. Events that another
// owner holds are left out. At most limit events are leased, the first to arrive; they come back
// in the order they arrived.
func (pq *PendingQuery) LeaseSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, owner string, now, until, handover time.Time, limit int) ([]*unwedge.Pending, error) {
	rows, err := pq.db.Query(ctx, leaseSessionQuery, pq.BridgeID, roomID, sessionID, owner, until.UnixMilli(), handover.UnixMilli(), now.UnixMilli(), limit)
	return sortPending(dbutil.ConvertRowFn[*unwedge.Pending](scanPending).NewRowIter(rows, err).AsList())
}

// LeaseExpired holds at most limit of the events first seen before before, to be given up.
func (pq *PendingQuery) LeaseExpired(ctx context.Context, before time.Time, owner string, now, until time.Time, limit int) ([]*unwedge.Pending, error) {
	rows, err := pq.db.Query(ctx, leaseExpiredQuery, pq.BridgeID, owner, until.UnixMilli(), before.UnixMilli(), now.UnixMilli(), limit)
	return sortPending(dbutil.ConvertRowFn[*unwedge.Pending](scanPending).NewRowIter(rows, err).AsList())
}

// Release gives a leased event back, with the error that kept it pending.
func (pq *PendingQuery) Release(ctx context.Context, eventID id.EventID, owner, lastErr string) error {
	_, err := pq.db.Exec(ctx, releasePendingQuery, pq.BridgeID, eventID, owner, lastErr)
	return err
}

// Done removes a leased event: it was bridged or given up.
func (pq *PendingQuery) Done(ctx context.Context, eventID id.EventID, owner string) error {
	_, err := pq.db.Exec(ctx, deleteLeasedQuery, pq.BridgeID, eventID, owner)
	return err
}

// DeleteRedacted removes a redacted event of the room, if it was sent by sender (any sender when
// sender is empty), and returns its sender, or "" when no such event was pending.
func (pq *PendingQuery) DeleteRedacted(ctx context.Context, roomID id.RoomID, eventID id.EventID, sender id.UserID) (deleted id.UserID, err error) {
	err = pq.db.QueryRow(ctx, deleteRedactedQuery, pq.BridgeID, roomID, eventID, sender).Scan(&deleted)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return
}

// List lists pending events, of one sender or all when sender is empty, in the order they arrived.
func (pq *PendingQuery) List(ctx context.Context, sender id.UserID, limit int) ([]*unwedge.Pending, error) {
	rows, err := pq.db.Query(ctx, listPendingQuery, pq.BridgeID, sender, limit)
	return dbutil.ConvertRowFn[*unwedge.Pending](scanPending).NewRowIter(rows, err).AsList()
}

func scanPending(row dbutil.Scannable) (*unwedge.Pending, error) {
	var p unwedge.Pending
	var raw string
	var originTS, firstSeen, nextRequest int64
	err := row.Scan(&p.EventID, &p.RoomID, &p.SessionID, &p.SenderKey, &p.Sender, &p.DeviceID, &raw,
		&originTS, &firstSeen, &p.Arrival, &p.Requests, &nextRequest, &p.LastError)
	if err != nil {
		return nil, err
	}
	p.OriginTS, p.FirstSeen, p.NextRequest = time.UnixMilli(originTS), time.UnixMilli(firstSeen), time.UnixMilli(nextRequest)
	p.Event = &event.Event{}
	if err = json.Unmarshal([]byte(raw), p.Event); err != nil {
		return nil, fmt.Errorf("failed to decode pending event %s: %w", p.EventID, err)
	}
	p.Event.Type.Class = event.MessageEventType
	if err = p.Event.Content.ParseRaw(p.Event.Type); err != nil {
		return nil, fmt.Errorf("failed to parse pending event %s: %w", p.EventID, err)
	}
	return &p, nil
}

// sortPending orders events as they arrived (RETURNING has no ORDER BY).
func sortPending(list []*unwedge.Pending, err error) ([]*unwedge.Pending, error) {
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(list, func(a, b *unwedge.Pending) int {
		if c := cmp.Compare(a.Arrival, b.Arrival); c != 0 {
			return c
		}
		return strings.Compare(string(a.EventID), string(b.EventID))
	})
	return list, nil
}
