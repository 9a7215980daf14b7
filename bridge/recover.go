package bridge

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/status"
	"maunium.net/go/mautrix/event"
)

// recoverySink hands events that became decryptable late to bridgev2, as bridgev2 does with
// events it decrypts itself, and tells users about events whose keys never came.
type recoverySink struct {
	h *Helper
}

// noticeSearchLimit is how many events after a recovered event are searched for the bridge's
// "your message was not bridged" notice about it.
const noticeSearchLimit = 100

func (s *recoverySink) Deliver(ctx context.Context, original, decrypted *event.Event, requests int) error {
	conn := s.h.conn
	log := zerolog.Ctx(ctx).With().Stringer("event_id", original.ID).Logger()
	if minLevel := conn.Config.Encryption.VerificationLevels.Send; decrypted.Mautrix.TrustState < minLevel {
		// The same rule bridgev2 applies to events it decrypts: not bridged, and the user is told.
		log.Warn().Stringer("device_trust", decrypted.Mautrix.TrustState).Stringer("min_trust", minLevel).
			Msg("Dropping late-decrypted event due to insufficient verification level")
		s.sendStatus(ctx, original, event.MessageStatusFail, fmt.Errorf("your device's verification level is too low (%s)", decrypted.Mautrix.TrustState), requests)
		return nil
	}
	if scheduled, _ := original.Content.Raw["com.beeper.scheduled"].(bool); scheduled && decrypted.Content.Raw != nil {
		decrypted.Content.Raw["com.beeper.scheduled"] = true
	}
	decrypted.Mautrix.CheckpointSent = true
	decrypted.Mautrix.DecryptionDuration = time.Since(time.UnixMilli(original.Timestamp))
	s.sendStatus(ctx, original, event.MessageStatusSuccess, nil, requests)
	conn.EventProcessor.Dispatch(ctx, decrypted)
	s.redactNotices(ctx, original)
	return nil
}

func (s *recoverySink) GiveUp(ctx context.Context, original *event.Event, reason string) {
	s.sendStatus(ctx, original, event.MessageStatusFail, fmt.Errorf("%s", reason), 0)
}

func (s *recoverySink) sendStatus(ctx context.Context, original *event.Event, st event.MessageStatus, err error, requests int) {
	ms := &bridgev2.MessageStatus{
		Step:          status.MsgStepDecrypted,
		Status:        st,
		InternalError: err,
		IsCertain:     true,
		RetryNum:      requests,
	}
	if err != nil {
		ms.ErrorReason = event.MessageStatusUndecryptable
		ms.Message = err.Error()
		ms.SendNotice = true
	} else {
		// Only the checkpoint: the portal sends the delivery status once the remote side has it.
		ms.DisableMSS = true
	}
	s.h.conn.SendMessageStatus(ctx, ms, bridgev2.StatusEventInfoFromEvent(original))
}

// redactNotices removes the bot's "your message was not bridged" notices about an event that was
// bridged after all, as bridgev2 does when its own retry succeeds. The notices are replies to the
// event sent soon after it, so they are among the events that follow it.
func (s *recoverySink) redactNotices(ctx context.Context, original *event.Event) {
	bot := s.h.conn.Bot
	log := zerolog.Ctx(ctx).With().Stringer("event_id", original.ID).Logger()
	resp, err := bot.Context(ctx, original.RoomID, original.ID, nil, noticeSearchLimit)
	if err != nil {
		log.Warn().Err(err).Msg("Failed to look for undecryptable-message notices to redact")
		return
	}
	for _, evt := range resp.EventsAfter {
		if evt.Sender != bot.UserID || evt.Type != event.EventMessage {
			continue
		}
		if err = evt.Content.ParseRaw(evt.Type); err != nil {
			continue
		}
		msg := evt.Content.AsMessage()
		if msg.MsgType != event.MsgNotice || msg.RelatesTo.GetReplyTo() != original.ID {
			continue
		}
		if _, err = bot.RedactEvent(ctx, original.RoomID, evt.ID); err != nil {
			log.Warn().Err(err).Stringer("notice_id", evt.ID).Msg("Failed to redact undecryptable-message notice")
		} else {
			log.Debug().Stringer("notice_id", evt.ID).Msg("Redacted undecryptable-message notice")
		}
	}
}
