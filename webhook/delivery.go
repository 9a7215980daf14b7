package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/webhook/store"
)

// OutgoingMessage is the JSON body POSTed to a login's webhook URL for each Matrix message.
type OutgoingMessage struct {
	ID        int64      `json:"id"`
	ChatID    string     `json:"chat_id"`
	EventID   id.EventID `json:"event_id"`
	Sender    id.UserID  `json:"sender"`
	Text      string     `json:"text"`
	Timestamp int64      `json:"timestamp"`
}

// deliverer posts pending outbox messages to their webhooks, oldest first, retrying transient
// failures with backoff. Within one chat a message is not sent before the ones before it.
type deliverer struct {
	conn   *Connector
	http   *http.Client
	wakeCh chan struct{}
	cancel context.CancelFunc
	done   sync.WaitGroup
}

const deliveryBatch = 100

// idleRecheck bounds how long the loop sleeps with nothing due, so rows added by another
// process sharing the database are picked up too.
const idleRecheck = 30 * time.Second

func newDeliverer(conn *Connector) *deliverer {
	return &deliverer{conn: conn, wakeCh: make(chan struct{}, 1)}
}

func (d *deliverer) start(ctx context.Context) {
	d.http = newDeliveryClient(d.conn.Config.Delivery.Timeout, d.conn.Config.Delivery.AllowPrivateAddresses)
	ctx, d.cancel = context.WithCancel(ctx)
	log := d.conn.br.Log.With().Str("component", "webhook delivery").Logger()
	d.done.Add(1)
	go func() {
		defer d.done.Done()
		d.loop(log.WithContext(ctx))
	}()
}

func (d *deliverer) stop() {
	if d.cancel != nil {
		d.cancel()
	}
	d.done.Wait()
}

func (d *deliverer) wake() {
	select {
	case d.wakeCh <- struct{}{}:
	default:
	}
}

func (d *deliverer) loop(ctx context.Context) {
	log := zerolog.Ctx(ctx)
	for {
		wait := idleRecheck
		if err := d.deliverDue(ctx); err != nil && ctx.Err() == nil {
			log.Err(err).Msg("Failed to deliver outbox messages")
			wait = d.conn.Config.Delivery.MinBackoff
		} else if next, ok, err := d.conn.db.Outbox.NextDue(ctx); err != nil && ctx.Err() == nil {
			log.Err(err).Msg("Failed to check next outbox delivery")
			wait = d.conn.Config.Delivery.MinBackoff
		} else if ok {
			wait = min(max(time.Until(next), 0), idleRecheck)
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-d.wakeCh:
			timer.Stop()
		case <-timer.C:
		}
	}
}

func (d *deliverer) deliverDue(ctx context.Context) error {
	msgs, err := d.conn.db.Outbox.Due(ctx, time.Now(), deliveryBatch)
	if err != nil {
		return fmt.Errorf("failed to get due messages: %w", err)
	}
	held := make(map[[2]string]bool)
	for _, msg := range msgs {
		chat := [2]string{msg.LoginID, msg.ChatID}
		if held[chat] {
			continue
		}
		if err = d.attempt(ctx, msg); err != nil {
			return err
		} else if msg.Status == store.OutboxPending {
			held[chat] = true
		}
	}
	return nil
}

// attempt posts one message and records the outcome, updating msg.Status.
func (d *deliverer) attempt(ctx context.Context, msg *store.OutboxMessage) error {
	log := zerolog.Ctx(ctx).With().Int64("outbox_id", msg.ID).Str("login_id", msg.LoginID).Str("chat_id", msg.ChatID).Logger()
	login, err := d.conn.br.GetExistingUserLoginByID(ctx, bridgeLoginID(msg.LoginID))
	if err != nil {
		return fmt.Errorf("failed to get login %s: %w", msg.LoginID, err)
	}
	var deliveryErr *deliveryError
	if login == nil {
		deliveryErr = &deliveryError{public: "delivery failed: the login was removed", permanent: true}
	} else if url := login.Metadata.(*LoginMetadata).WebhookURL; url == "" {
		deliveryErr = &deliveryError{public: "delivery failed: the login has no webhook URL", permanent: true}
	} else {
		deliveryErr = d.post(ctx, url, msg)
	}
	now := time.Now()
	if deliveryErr == nil {
		msg.Status = store.OutboxDelivered
		log.Debug().Int("attempt", msg.Attempts+1).Msg("Delivered message to webhook")
		return d.conn.db.Outbox.MarkDelivered(ctx, msg.ID, now)
	}
	attempts := msg.Attempts + 1
	cfg := &d.conn.Config.Delivery
	// The outbox and the room notice get the generic text; the detail (dial errors name addresses
	// and tell open ports from closed ones) is only logged, for the admin.
	if deliveryErr.permanent || attempts >= cfg.MaxAttempts {
		msg.Status = store.OutboxFailed
		log.Warn().Err(deliveryErr).Int("attempt", attempts).Bool("permanent", deliveryErr.permanent).Msg("Giving up delivering message to webhook")
		if err = d.conn.db.Outbox.MarkAttemptFailed(ctx, msg.ID, store.OutboxFailed, now, deliveryErr.public); err != nil {
			return fmt.Errorf("failed to mark message %d failed: %w", msg.ID, err)
		}
		d.notifyFailure(ctx, login, msg, deliveryErr.public, attempts)
		return nil
	}
	next := now.Add(cfg.backoff(attempts))
	log.Debug().Err(deliveryErr).Int("attempt", attempts).Time("next_attempt", next).Msg("Webhook delivery failed, will retry")
	return d.conn.db.Outbox.MarkAttemptFailed(ctx, msg.ID, store.OutboxPending, next, deliveryErr.public)
}

// deliveryError is a failed delivery attempt: err is the detail for the bridge log, public the
// text the user sees in the outbox and the room notice, which never holds addresses, ports or
// dial errors (they would make the webhook a port scanner of the bridge's network).
type deliveryError struct {
	public    string
	err       error
	permanent bool
}

func (e *deliveryError) Error() string {
	if e.err == nil {
		return e.public
	}
	return e.err.Error()
}

func (e *deliveryError) Unwrap() error { return e.err }

// errUnreachable is the public text of every failure to get an HTTP answer: refused or forbidden
// addresses, DNS, TLS and timeouts look the same to the user.
const errUnreachable = "delivery failed: the webhook could not be reached"

// post sends one message; nil means delivered.
func (d *deliverer) post(ctx context.Context, url string, msg *store.OutboxMessage) *deliveryError {
	body, err := json.Marshal(&OutgoingMessage{
		ID: msg.ID, ChatID: msg.ChatID, EventID: id.EventID(msg.EventID), Sender: id.UserID(msg.SenderMXID),
		Text: msg.Body, Timestamp: msg.Timestamp,
	})
	if err != nil {
		return &deliveryError{"delivery failed: the message could not be encoded", fmt.Errorf("failed to encode message: %w", err), true}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return &deliveryError{"delivery failed: invalid webhook URL", fmt.Errorf("failed to build request: %w", err), true}
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := d.http.Do(req)
	if err != nil {
		return &deliveryError{errUnreachable, fmt.Errorf("webhook request failed: %w", err), false}
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64*1024))
	_ = resp.Body.Close()
	statusErr := func(permanent bool) *deliveryError {
		public := fmt.Sprintf("delivery failed (HTTP %d)", resp.StatusCode)
		if resp.StatusCode >= 300 && resp.StatusCode < 400 {
			public += ": redirects are not followed"
		}
		return &deliveryError{public, fmt.Errorf("webhook answered %s", resp.Status), permanent}
	}
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode >= 500:
		return statusErr(false)
	default:
		return statusErr(true)
	}
}

// notifyFailure tells the sender in the room that their message will not reach the remote side.
func (d *deliverer) notifyFailure(ctx context.Context, login *bridgev2.UserLogin, msg *store.OutboxMessage, cause string, attempts int) {
	if login == nil {
		return
	}
	portal, err := d.conn.br.GetExistingPortalByKey(ctx, portalKey(login, msg.ChatID))
	if err != nil || portal == nil || portal.MXID == "" {
		zerolog.Ctx(ctx).Warn().Err(err).Int64("outbox_id", msg.ID).Msg("No portal to report failed delivery in")
		return
	}
	d.conn.br.Matrix.SendMessageStatus(ctx, &bridgev2.MessageStatus{
		Status:      event.MessageStatusFail,
		ErrorReason: event.MessageStatusNetworkError,
		Message:     fmt.Sprintf("Your message was not delivered to the webhook after %d attempts: %s", attempts, cause),
		IsCertain:   true,
		SendNotice:  true,
	}, &bridgev2.MessageStatusEventInfo{
		RoomID:        portal.MXID,
		SourceEventID: id.EventID(msg.EventID),
		EventType:     event.EventMessage,
		Sender:        id.UserID(msg.SenderMXID),
	})
}
