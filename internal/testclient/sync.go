package testclient

import (
	"context"
	"errors"
	"fmt"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// syncer is mautrix's DefaultSyncer with a hook after each processed response and fast retries.
type syncer struct {
	*mautrix.DefaultSyncer
	processed func(ctx context.Context, resp *mautrix.RespSync)
}

func (s *syncer) ProcessResponse(ctx context.Context, resp *mautrix.RespSync, since string) error {
	err := s.DefaultSyncer.ProcessResponse(ctx, resp, since)
	if err == nil {
		s.processed(ctx, resp)
	}
	return err
}

func (s *syncer) OnFailedSync(_ *mautrix.RespSync, err error) (time.Duration, error) {
	if errors.Is(err, mautrix.MUnknownToken) {
		return 0, err
	}
	return retryDelay, nil
}

// newSyncer wires the Olm machine, the state store and the client's own handlers into /sync.
// Handlers look the machine up at call time, so they follow Restore.
func (c *Client) newSyncer() *syncer {
	s := &syncer{DefaultSyncer: mautrix.NewDefaultSyncer(), processed: c.syncProcessed}
	s.OnSync(func(ctx context.Context, resp *mautrix.RespSync, since string) bool {
		// To-device events (room keys), device list changes and one-time key counts first, so
		// that the timeline events of the same response can use the keys.
		return c.crypto.Load().mach.ProcessSyncResponse(ctx, resp, since)
	})
	s.OnEvent(c.cli.StateStoreSyncHandler)
	s.OnEventType(event.StateMember, func(ctx context.Context, evt *event.Event) {
		c.crypto.Load().mach.HandleMemberEvent(ctx, evt)
		c.handleMember(ctx, evt)
	})
	s.OnEventType(event.StateHistoryVisibility, func(ctx context.Context, evt *event.Event) {
		c.crypto.Load().mach.HandleHistoryVisibility(ctx, evt)
	})
	s.OnEventType(event.EventEncrypted, c.handleEncrypted)
	s.OnEventType(event.EventMessage, c.handleMessage)
	return s
}

// startSyncing starts the sync loop and waits until it has processed one response.
func (c *Client) startSyncing(ctx context.Context) error {
	c.syncLock.Lock()
	if c.stopSync != nil {
		c.syncLock.Unlock()
		return errors.New("testclient: already syncing")
	}
	syncCtx, cancel := context.WithCancel(c.lifetime)
	done := make(chan struct{})
	c.stopSync, c.syncDone = cancel, done
	c.syncLock.Unlock()

	first := c.hist.syncCount() + 1
	go c.syncLoop(syncCtx, done)
	err := c.hist.waitFor(ctx, func() bool { return c.hist.syncCount() >= first || c.SyncError() != nil })
	if err != nil {
		return fmt.Errorf("failed to wait for the first sync: %w", err)
	} else if err = c.SyncError(); err != nil {
		return fmt.Errorf("sync failed: %w", err)
	}
	return nil
}

// stopSyncing stops the sync loop and waits for it to return.
func (c *Client) stopSyncing() {
	c.syncLock.Lock()
	cancel, done := c.stopSync, c.syncDone
	c.stopSync, c.syncDone = nil, nil
	c.syncLock.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

func (c *Client) syncLoop(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	for {
		err := c.cli.SyncWithContext(ctx)
		if ctx.Err() != nil {
			return
		} else if errors.Is(err, mautrix.MUnknownToken) {
			c.log.Error().Err(err).Msg("Sync stopped: access token no longer valid")
			c.syncFailed.Store(&err)
			c.hist.notify()
			return
		}
		c.log.Warn().Err(err).Msg("Sync loop failed, restarting")
		select {
		case <-ctx.Done():
			return
		case <-time.After(retryDelay):
		}
	}
}

// syncProcessed records the rooms the client is in once a whole response has been handled, so
// that a room counts as joined only when its state (encryption, members) is known.
func (c *Client) syncProcessed(_ context.Context, resp *mautrix.RespSync) {
	c.hist.syncDone(resp, c.cli.UserID)
}

// handleMember accepts invites for the client's own user.
func (c *Client) handleMember(_ context.Context, evt *event.Event) {
	if evt.GetStateKey() != c.cli.UserID.String() || evt.Mautrix.EventSource&event.SourceInvite == 0 {
		return
	} else if evt.Content.AsMember().Membership != event.MembershipInvite {
		return
	}
	if !c.hist.startJoin(evt.RoomID) {
		return
	}
	log := c.log.With().Stringer("room_id", evt.RoomID).Stringer("inviter", evt.Sender).Logger()
	log.Debug().Msg("Accepting invite")
	c.background.Add(1)
	go func() {
		defer c.background.Done()
		defer c.hist.endJoin(evt.RoomID)
		ctx := log.WithContext(c.lifetime)
		for attempt := 1; ; attempt++ {
			_, err := c.cli.JoinRoomByID(ctx, evt.RoomID)
			if err == nil {
				log.Debug().Msg("Joined room")
				return
			} else if attempt >= 5 || ctx.Err() != nil {
				log.Err(err).Int("attempts", attempt).Msg("Failed to accept invite")
				return
			}
			log.Warn().Err(err).Int("attempt", attempt).Msg("Failed to accept invite, retrying")
			select {
			case <-ctx.Done():
				return
			case <-time.After(retryDelay):
			}
		}
	}()
}

// handleMessage records unencrypted messages.
func (c *Client) handleMessage(_ context.Context, evt *event.Event) {
	if evt.Mautrix.EventSource&event.SourceTimeline == 0 {
		return
	}
	c.hist.addDecrypted(evt)
}

// handleEncrypted decrypts a Megolm event from the timeline; one that cannot be decrypted is
// kept as undecryptable and retried whenever a key for its session arrives.
func (c *Client) handleEncrypted(ctx context.Context, evt *event.Event) {
	if evt.Mautrix.EventSource&event.SourceTimeline == 0 || evt.StateKey != nil {
		return
	}
	content := evt.Content.AsEncrypted()
	if !c.hist.noteEncrypted(evt, content.SessionID) {
		return // already decrypted
	}
	mach := c.crypto.Load().mach
	decrypted, err := mach.DecryptMegolmEvent(ctx, evt)
	if err == nil {
		c.hist.addDecrypted(decrypted)
		return
	}
	c.log.Debug().Err(err).
		Stringer("event_id", evt.ID).
		Stringer("room_id", evt.RoomID).
		Stringer("session_id", content.SessionID).
		Msg("Failed to decrypt event")
	c.hist.addUndecryptable(evt, err)
	// The key may have arrived between the attempt and the bookkeeping.
	if !errors.Is(err, crypto.ErrNoSessionFound) {
		return
	} else if sess, _ := mach.CryptoStore.GetGroupSession(ctx, evt.RoomID, content.SessionID); sess != nil {
		c.retryDecryption(ctx, mach, evt.RoomID, content.SessionID)
	}
}

// retryDecryption retries the undecryptable events of a Megolm session after its key arrived.
// It runs inside OlmMachine callbacks, so it must not take cryptoLock.
func (c *Client) retryDecryption(ctx context.Context, mach *crypto.OlmMachine, roomID id.RoomID, sessionID id.SessionID) {
	for _, evt := range c.hist.undecryptableInSession(roomID, sessionID) {
		decrypted, err := mach.DecryptMegolmEvent(ctx, evt)
		if err != nil {
			c.log.Debug().Err(err).Stringer("event_id", evt.ID).Msg("Retried decryption failed")
			c.hist.addUndecryptable(evt, err)
			continue
		}
		c.log.Debug().Stringer("event_id", evt.ID).Stringer("session_id", sessionID).Msg("Decrypted event after its key arrived")
		c.hist.addDecrypted(decrypted)
	}
}

// GoOffline stops syncing, as a phone without network does: to-device messages for the device
// wait on the homeserver, and nothing is decrypted or answered until GoOnline.
func (c *Client) GoOffline() {
	c.stopSyncing()
}

// GoOnline syncs again and returns once the first response (with everything that waited) was
// processed.
func (c *Client) GoOnline(ctx context.Context) error {
	return c.startSyncing(ctx)
}
