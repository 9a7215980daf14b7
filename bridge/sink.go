package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/bridgev2"
	"maunium.net/go/mautrix/bridgev2/status"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// recoverySink is the bridgev2 side of unwedge.Recovery: it hands events that became decryptable
// late to bridgev2, as bridgev2 does with events it decrypts itself, tells users about events whose
// keys never came, and lists the rooms the bridge shares its own room keys in.
type recoverySink struct {
	h *Helper
}

// OutboundRooms lists the rooms the bridge has an outbound Megolm session in (mautrix-go's SQL
// crypto store has no query for it).
func (s *recoverySink) OutboundRooms(ctx context.Context) ([]id.RoomID, error) {
	store := s.h.store
	rows, err := store.DB.Query(ctx, "SELECT room_id FROM crypto_megolm_outbound_session WHERE account_id = $1", store.AccountID)
	return dbutil.ConvertRowFn[id.RoomID](func(row dbutil.Scannable) (roomID id.RoomID, err error) {
		return roomID, row.Scan(&roomID)
	}).NewRowIter(rows, err).AsList()
}

// IsMember reports whether a user is joined to or invited into a room, as the bridge's state
// store knows it: the users the room's Megolm session is shared with.
func (s *recoverySink) IsMember(ctx context.Context, roomID id.RoomID, userID id.UserID) bool {
	return s.h.conn.StateStore.IsInvited(ctx, roomID, userID)
}

// noticeSearchLimit is how many events after a recovered event are searched for the bridge's
// "your message was not bridged" notice about it.
const noticeSearchLimit = 100

// confirmWait bounds how long Deliver waits for a queued event to show up in bridgev2's database.
const confirmWait = 5 * time.Second

func (s *recoverySink) Deliver(ctx context.Context, original, decrypted *event.Event, requests int) error {
	conn := s.h.conn
	log := zerolog.Ctx(ctx).With().Stringer("event_id", original.ID).Logger()
	// A process that died after bridging the event and before its row was deleted hands it
	// over again: bridgev2's tables say whether it already reached the remote network.
	if bridged, trackable, err := s.bridged(ctx, decrypted); err != nil {
		return fmt.Errorf("failed to check whether the event was bridged before: %w", err)
	} else if trackable && bridged {
		log.Info().Msg("Late-decrypted event was already bridged before a restart: not bridging it again")
		return nil
	}
	// The rules that held when the event arrived hold now, days later maybe: its sender is still
	// in the room and it was not redacted meanwhile. Such an event is dropped without a status:
	// its sender either left the room or took the message back. (encryption.require needs no
	// check: a recovered event was encrypted by construction.)
	if reason, err := s.moderated(ctx, original); err != nil {
		return err
	} else if reason != "" {
		return &unwedge.DroppedError{Reason: reason}
	}
	if minLevel := conn.Config.Encryption.VerificationLevels.Send; decrypted.Mautrix.TrustState < minLevel {
		// The same rule bridgev2 applies to events it decrypts: not bridged, and the user is told.
		s.sendStatus(ctx, original, event.MessageStatusFail, fmt.Errorf("your device's verification level is too low (%s)", decrypted.Mautrix.TrustState), requests)
		return &unwedge.DroppedError{Reason: fmt.Sprintf("insufficient verification level (%s, want %s)", decrypted.Mautrix.TrustState, minLevel)}
	}
	if scheduled, _ := original.Content.Raw["com.beeper.scheduled"].(bool); scheduled && decrypted.Content.Raw != nil {
		decrypted.Content.Raw["com.beeper.scheduled"] = true
	}
	decrypted.Mautrix.CheckpointSent = true
	decrypted.Mautrix.DecryptionDuration = time.Since(time.UnixMilli(original.Timestamp))
	s.sendStatus(ctx, original, event.MessageStatusSuccess, nil, requests)
	conn.EventProcessor.Dispatch(ctx, decrypted)
	if conn.Bridge.Config.PortalEventBuffer != 0 {
		// Dispatch only queued the event for its portal: the row is kept until the portal has
		// handled it, so a crash in between hands it over again instead of losing it.
		s.waitBridged(ctx, decrypted)
	}
	s.h.metrics.observeRecovered(time.UnixMilli(original.Timestamp), time.Now())
	s.redactNotices(ctx, original)
	return nil
}

// moderated says why an event that waited for its key must not be bridged any more, or "": its
// sender is no longer joined to the room (kicked, banned or gone), or the event was redacted.
// The homeserver is asked, not the bridge's state store: the store may be behind (a kick still
// queued behind other events, or one made while the bridge was down), and a moderator's action
// must not be outrun by a key. An error keeps the event pending, to be checked again. Only when
// the bot may not read the room any more does the state store decide.
func (s *recoverySink) moderated(ctx context.Context, evt *event.Event) (string, error) {
	conn := s.h.conn
	var current event.MemberEventContent
	err := conn.Bot.Client.StateEvent(ctx, evt.RoomID, event.StateMember, evt.Sender.String(), &current)
	switch {
	case errors.Is(err, mautrix.MNotFound):
		return "the sender is not a member of the room", nil
	case errors.Is(err, mautrix.MForbidden):
		member, storeErr := conn.StateStore.TryGetMember(ctx, evt.RoomID, evt.Sender)
		if storeErr != nil {
			return "", fmt.Errorf("failed to get the sender's membership: %w", storeErr)
		} else if member == nil || member.Membership != event.MembershipJoin {
			return "the sender is not joined to the room", nil
		}
	case err != nil:
		return "", fmt.Errorf("failed to get the sender's membership from the homeserver: %w", err)
	case current.Membership != event.MembershipJoin:
		return fmt.Sprintf("the sender's membership is %s", current.Membership), nil
	}
	served, err := conn.Bot.Client.GetEvent(ctx, evt.RoomID, evt.ID)
	switch {
	case errors.Is(err, mautrix.MNotFound):
		return "the homeserver no longer serves the event", nil
	case errors.Is(err, mautrix.MForbidden):
		// The bot cannot read the room (it was removed from it): the redactions it saw while up
		// (handleRedaction) are what it knows, and the event is not kept waiting forever.
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Cannot check the late-decrypted event for a redaction: the bot may not read the room")
		return "", nil
	case err != nil:
		return "", fmt.Errorf("failed to check the event on the homeserver: %w", err)
	case redacted(served):
		return "the event was redacted", nil
	}
	return "", nil
}

// redacted reports whether the homeserver served an event redacted: with the redaction in
// unsigned.redacted_because, or with its content pruned (an encrypted event keeps nothing).
func redacted(evt *event.Event) bool {
	return evt.Unsigned.RedactedBecause != nil || len(bytes.TrimSpace(evt.Content.VeryRaw)) <= 2
}

// redactsID is the event a redaction redacts: the top-level redacts of room versions up to 10,
// or the content's of room version 11.
func redactsID(evt *event.Event) id.EventID {
	if evt.Redacts != "" {
		return evt.Redacts
	}
	if content, ok := evt.Content.Parsed.(*event.RedactionEventContent); ok && content.Redacts != "" {
		return content.Redacts
	}
	if target, ok := evt.Content.Raw["redacts"].(string); ok {
		return id.EventID(target)
	}
	var content event.RedactionEventContent
	if len(evt.Content.VeryRaw) > 0 && json.Unmarshal(evt.Content.VeryRaw, &content) == nil {
		return content.Redacts
	}
	return ""
}

// handleRedaction drops a pending event that a redaction removes, at once: it is never bridged,
// even if its key arrives later. The sender's own redaction counts, and a moderator's (whoever
// may redact others' events by the room's power levels).
func (h *Helper) handleRedaction(ctx context.Context, evt *event.Event) {
	rec := h.recovery
	target := redactsID(evt)
	if rec == nil || target == "" || evt.RoomID == "" {
		return
	}
	moderator := false
	if pl, err := h.conn.StateStore.GetPowerLevels(ctx, evt.RoomID); err == nil && pl != nil {
		moderator = pl.GetUserLevel(evt.Sender) >= pl.Redact()
	}
	rec.Redacted(ctx, evt.RoomID, target, evt.ID, evt.Sender, moderator)
}

// bridged reports whether bridgev2 has a record of the Matrix event: messages, stickers and
// reactions are stored by their event ID once the remote network took them (trackable). Edits and
// other events leave no record of their own ID.
func (s *recoverySink) bridged(ctx context.Context, evt *event.Event) (bridged, trackable bool, err error) {
	db := s.h.conn.Bridge.DB
	switch evt.Type {
	case event.EventReaction:
		reaction, err := db.Reaction.GetByMXID(ctx, evt.ID)
		return reaction != nil, true, err
	case event.EventMessage, event.EventSticker:
		if msg := evt.Content.AsMessage(); msg.RelatesTo.GetReplaceID() != "" {
			return false, false, nil
		}
		part, err := db.Message.GetPartByMXID(ctx, evt.ID)
		return part != nil, true, err
	}
	return false, false, nil
}

// waitBridged waits, for at most confirmWait, until bridgev2 recorded a trackable event. A portal
// normally handles it within milliseconds; an event the remote network refused is never recorded
// (bridgev2 told the sender through its message status), and the wait simply ends.
func (s *recoverySink) waitBridged(ctx context.Context, evt *event.Event) {
	deadline := time.Now().Add(confirmWait)
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		bridged, trackable, err := s.bridged(ctx, evt)
		if !trackable || bridged || err != nil || time.Now().After(deadline) {
			if trackable && !bridged {
				zerolog.Ctx(ctx).Debug().Err(err).Stringer("event_id", evt.ID).Msg("Late-decrypted event not recorded by bridgev2 yet; not waiting longer")
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
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
	// /context splits its limit between the events before and after (Synapse: half each), and
	// only those after are searched.
	resp, err := bot.Context(ctx, original.RoomID, original.ID, nil, 2*noticeSearchLimit)
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
