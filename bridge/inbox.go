package bridge

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// In appservice mode (encryption.appservice) the homeserver pushes the bot device's to-device
// messages in transactions. When a transaction fails (the bridge is down, restarting, or
// unreachable), Synapse sends its room events again later, but not its to-device messages
// (synapse/storage/databases/main/appservice.py, get_oldest_unsent_txn: "to-device messages ... are
// not yet populated for catch-up transactions"): the room keys in them are gone, and their messages
// are never decrypted. Synapse keeps every to-device message in the device's inbox until the device
// syncs past it, which an appservice's device never does. So the bridge reads that inbox itself,
// with /sync as the bot device (MSC3202 device masquerading, or the device's own token): at
// startup before it handles any event, and every inboxInterval (long-polling while room events
// wait for their keys: followInbox). Each page's encrypted messages go
// through the Unwedger (HandleCopy), which hands a message it already had from a transaction to the
// machine no second time; then the sync token is saved (the crypto store's, which appservice mode does not
// use otherwise), and the homeserver deletes what the token passed.
//
// The first time, with no token saved, the inbox holds everything since the device was made,
// already handled from transactions: it is skipped in the background, not handled (an old message
// the crypto store no longer remembers as handled would look like a wedge). A transaction that
// fails while that first reading runs loses its to-device messages as before.

// inboxFilter excludes everything from the sync but to-device messages: no rooms, presence or
// account data.
const inboxFilter = `{"room":{"rooms":[]},"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]}}`

const (
	// inboxInterval is how often the inbox is read while the bridge runs; a room event whose key
	// is missing has it read at once (pokeInbox), at most every inboxMinInterval.
	inboxInterval    = 30 * time.Second
	inboxMinInterval = 2 * time.Second
	// inboxStartupPages bounds the pages read at startup before events are handled (Synapse
	// returns at most 100 to-device messages a page); the rest is read while events are handled.
	inboxStartupPages = 50
	// inboxLongPoll is how long a reading waits on the homeserver for new to-device messages
	// while room events wait for their keys (followInbox).
	inboxLongPoll = 25 * time.Second
)

// inboxReport is what one reading of the inbox did.
type inboxReport struct {
	Pages, Messages, Handled int
	// Skipped: the first reading, whose messages were skipped.
	Skipped bool
	// More: the page limit was reached with messages left.
	More bool
}

// readInbox handles the bot device's inbox from the saved token on, at most pages pages. With
// no token saved it does nothing (drainInbox does the first reading). With wait, the first page
// waits up to that long on the homeserver for a message when there is none.
func (h *Helper) readInbox(ctx context.Context, pages int, wait time.Duration) (inboxReport, error) {
	var report inboxReport
	token, err := h.store.LoadNextBatch(ctx, h.client.UserID)
	if err != nil {
		return report, fmt.Errorf("failed to load the to-device inbox's token: %w", err)
	} else if token == "" {
		return report, nil
	}
	for report.Pages < pages {
		resp, err := h.syncInbox(ctx, token, wait)
		if err != nil {
			return report, err
		}
		wait = 0
		report.Pages++
		report.Messages += len(resp.ToDevice.Events)
		for _, evt := range resp.ToDevice.Events {
			evt.Type.Class = event.ToDeviceEventType
			if evt.Type != event.ToDeviceEncrypted {
				continue // key requests and the like: not worth handling twice
			}
			if err = evt.Content.ParseRaw(evt.Type); err != nil {
				h.log.Warn().Err(err).Stringer("sender", evt.Sender).Msg("Failed to parse to-device event from the inbox")
				continue
			}
			h.unwedger.HandleCopy(ctx, evt)
			report.Handled++
			h.inboxHandled.Add(1)
		}
		if err = h.store.SaveNextBatch(ctx, h.client.UserID, resp.NextBatch); err != nil {
			return report, fmt.Errorf("failed to save the to-device inbox's token: %w", err)
		}
		if len(resp.ToDevice.Events) == 0 || resp.NextBatch == token {
			return report, nil
		}
		token = resp.NextBatch
	}
	report.More = true
	return report, nil
}

// drainInbox is the first reading: it skips what the inbox holds, page after page, and saves the
// token once the inbox is empty (a restart meanwhile starts over where the homeserver deleted up
// to).
func (h *Helper) drainInbox(ctx context.Context) (inboxReport, error) {
	report := inboxReport{Skipped: true}
	token := ""
	for {
		resp, err := h.syncInbox(ctx, token, 0)
		if err != nil {
			return report, err
		}
		report.Pages++
		report.Messages += len(resp.ToDevice.Events)
		if len(resp.ToDevice.Events) == 0 || resp.NextBatch == token {
			if err = h.store.SaveNextBatch(ctx, h.client.UserID, resp.NextBatch); err != nil {
				return report, fmt.Errorf("failed to save the to-device inbox's token: %w", err)
			}
			return report, nil
		}
		token = resp.NextBatch
	}
}

// syncInbox is one /sync as the bot device, for its to-device messages only, waiting up to wait
// on the homeserver for one when there is none.
func (h *Helper) syncInbox(ctx context.Context, since string, wait time.Duration) (*mautrix.RespSync, error) {
	resp, err := h.client.FullSyncRequest(ctx, mautrix.ReqSync{Since: since, FilterID: inboxFilter, SetPresence: event.PresenceOffline, Timeout: int(wait.Milliseconds())})
	if err != nil {
		return nil, fmt.Errorf("failed to read the bot device's to-device inbox: %w", err)
	}
	return resp, nil
}

// pokeInbox asks followInbox to read the inbox now: a room event's key is missing, and it may be
// in a to-device message that a failed transaction did not deliver.
func (h *Helper) pokeInbox() {
	select {
	case h.inboxPoke <- struct{}{}:
	default:
	}
}

// followInbox reads the inbox every inboxInterval, and when poked, until ctx ends; first it
// drains it, if it was never read. While room events wait for their keys, each reading waits on
// the homeserver for new messages (inboxLongPoll) instead: a key that a failed transaction did not
// deliver (an answer to the bridge's key request that came while it restarted, say) is read when
// it arrives, not up to inboxInterval later.
func (h *Helper) followInbox(ctx context.Context) {
	// The loop goes on after a round that panicked (inboxRound).
	var wait time.Duration
	for {
		report, err := h.inboxRound(ctx, wait)
		switch {
		case err != nil && ctx.Err() == nil:
			h.log.Warn().Err(err).Msg("Failed to read the bot device's to-device inbox; tried again later")
		case report.Skipped:
			h.log.Info().Int("skipped", report.Messages).Int("pages", report.Pages).Msg("Read the bot device's to-device inbox for the first time; what it held was skipped")
		case report.Handled > 0:
			h.log.Debug().Int("handled", report.Handled).Int("pages", report.Pages).Bool("more", report.More).Msg("Read the bot device's to-device inbox")
		}
		if report.More {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(inboxMinInterval):
		}
		// After a failed reading (the homeserver down, say), the next comes on the usual schedule.
		if wait = 0; err == nil && h.eventsWaiting(ctx) {
			wait = inboxLongPoll
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-h.inboxPoke:
		case <-time.After(inboxInterval - inboxMinInterval):
		}
	}
}

// eventsWaiting reports whether room events wait for their keys (any replica's).
func (h *Helper) eventsWaiting(ctx context.Context) bool {
	if h.db == nil {
		return false
	}
	n, err := h.db.Pending.Count(ctx)
	return err == nil && n > 0
}

// inboxRound reads the inbox once (all of it the first time). What a peer sent may reach a bug:
// a panic ends the round with an error, logged with its stack and counted
// (unwedge_panics_total{where="appservice_inbox"}), and the next round comes as usual.
func (h *Helper) inboxRound(ctx context.Context, wait time.Duration) (report inboxReport, err error) {
	defer func() {
		if p := recover(); p != nil {
			h.inboxPanics.Add(1)
			h.log.Error().Str("panic_in", string(unwedge.PanicAppserviceInbox)).Interface("panic", p).
				Bytes(zerolog.ErrorStackFieldName, debug.Stack()).Msg("Recovered from a panic; the process goes on")
			err = fmt.Errorf("%w in %s: %v", unwedge.ErrPanicked, unwedge.PanicAppserviceInbox, p)
		}
	}()
	token, err := h.store.LoadNextBatch(ctx, h.client.UserID)
	if err == nil && token == "" {
		return h.drainInbox(ctx)
	} else if err == nil {
		return h.readInbox(mautrix.WithMaxRetries(ctx, 0), inboxStartupPages, wait)
	}
	return report, err
}
