package store

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"go.mau.fi/util/dbutil"
)

// OutboxStatus is where a Matrix message stands on its way to the remote webhook.
type OutboxStatus string

const (
	// OutboxPending messages wait for (re)delivery to the login's webhook URL.
	OutboxPending OutboxStatus = "pending"
	// OutboxDelivered messages were accepted by the webhook with a 2xx answer.
	OutboxDelivered OutboxStatus = "delivered"
	// OutboxFailed messages could not be delivered; the sender was told in the room.
	OutboxFailed OutboxStatus = "failed"
	// OutboxStored messages belong to a login without a webhook URL: kept for the outbox API only.
	OutboxStored OutboxStatus = "stored"
)

// OutboxMessage is one message sent from Matrix into a webhook portal.
type OutboxMessage struct {
	ID            int64        `json:"id"`
	LoginID       string       `json:"-"`
	ChatID        string       `json:"chat_id"`
	EventID       string       `json:"event_id"`
	SenderMXID    string       `json:"sender"`
	Body          string       `json:"text"`
	Timestamp     int64        `json:"timestamp"`
	Status        OutboxStatus `json:"status"`
	Attempts      int          `json:"attempts"`
	NextAttemptAt int64        `json:"-"`
	LastError     string       `json:"last_error,omitempty"`
	DeliveredAt   int64        `json:"delivered_at,omitempty"`
}

const (
	outboxColumns = `id, login_id, chat_id, event_id, sender_mxid, body, timestamp, status, attempts,
		next_attempt_at, last_error, delivered_at`
	// A redelivered Matrix event (the homeserver retries transactions) keeps its first row.
	insertOutboxQuery = `
		INSERT INTO webhook_outbox (bridge_id, login_id, chat_id, event_id, sender_mxid, body, timestamp, status)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
		ON CONFLICT (bridge_id, event_id) DO UPDATE SET event_id = excluded.event_id
		RETURNING ` + outboxColumns
	listOutboxQuery = `
		SELECT ` + outboxColumns + ` FROM webhook_outbox
		WHERE bridge_id = $1 AND login_id = $2 AND id > $3 ORDER BY id LIMIT $4`
	dueOutboxQuery = `
		SELECT ` + outboxColumns + ` FROM webhook_outbox
		WHERE bridge_id = $1 AND status = 'pending' AND next_attempt_at <= $2 ORDER BY id LIMIT $3`
	nextDueOutboxQuery = `
		SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE bridge_id = $1 AND status = 'pending'`
	markDeliveredQuery = `
		UPDATE webhook_outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = $3, last_error = ''
		WHERE bridge_id = $1 AND id = $2`
	markAttemptFailedQuery = `
		UPDATE webhook_outbox SET status = $3, attempts = attempts + 1, next_attempt_at = $4, last_error = $5
		WHERE bridge_id = $1 AND id = $2`
)

// OutboxQuery reads and writes the webhook outbox of one bridge.
type OutboxQuery struct {
	BridgeID string
	db       *dbutil.Database
}

func scanOutboxMessage(row dbutil.Scannable) (*OutboxMessage, error) {
	var msg OutboxMessage
	err := row.Scan(&msg.ID, &msg.LoginID, &msg.ChatID, &msg.EventID, &msg.SenderMXID, &msg.Body, &msg.Timestamp,
		&msg.Status, &msg.Attempts, &msg.NextAttemptAt, &msg.LastError, &msg.DeliveredAt)
	if err != nil {
		return nil, err
	}
	return &msg, nil
}

// Insert stores a new outbox message and returns it with its ID. Inserting the same event twice
// returns the existing row unchanged.
func (oq *OutboxQuery) Insert(ctx context.Context, msg *OutboxMessage) (*OutboxMessage, error) {
	row := oq.db.QueryRow(ctx, insertOutboxQuery, oq.BridgeID, msg.LoginID, msg.ChatID, msg.EventID, msg.SenderMXID,
		msg.Body, msg.Timestamp, msg.Status)
	return scanOutboxMessage(row)
}

// List returns up to limit messages of a login with an ID above after, oldest first.
func (oq *OutboxQuery) List(ctx context.Context, loginID string, after int64, limit int) ([]*OutboxMessage, error) {
	return dbutil.ConvertRowFn[*OutboxMessage](scanOutboxMessage).
		NewRowIter(oq.db.Query(ctx, listOutboxQuery, oq.BridgeID, loginID, after, limit)).AsList()
}

// Due returns up to limit pending messages whose next attempt is due at now, oldest first.
func (oq *OutboxQuery) Due(ctx context.Context, now time.Time, limit int) ([]*OutboxMessage, error) {
	return dbutil.ConvertRowFn[*OutboxMessage](scanOutboxMessage).
		NewRowIter(oq.db.Query(ctx, dueOutboxQuery, oq.BridgeID, now.UnixMilli(), limit)).AsList()
}

// NextDue returns when the earliest pending message is due, and false when none is pending.
func (oq *OutboxQuery) NextDue(ctx context.Context) (time.Time, bool, error) {
	var next sql.NullInt64
	err := oq.db.QueryRow(ctx, nextDueOutboxQuery, oq.BridgeID).Scan(&next)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && !next.Valid) {
		return time.Time{}, false, nil
	} else if err != nil {
		return time.Time{}, false, err
	}
	return time.UnixMilli(next.Int64), true, nil
}

// MarkDelivered records a successful delivery.
func (oq *OutboxQuery) MarkDelivered(ctx context.Context, id int64, at time.Time) error {
	_, err := oq.db.Exec(ctx, markDeliveredQuery, oq.BridgeID, id, at.UnixMilli())
	return err
}

// MarkAttemptFailed records a failed attempt: with status pending it is retried at next,
// with status failed it is given up.
func (oq *OutboxQuery) MarkAttemptFailed(ctx context.Context, id int64, status OutboxStatus, next time.Time, reason string) error {
	_, err := oq.db.Exec(ctx, markAttemptFailedQuery, oq.BridgeID, id, status, next.UnixMilli(), reason)
	return err
}
