package bridge

import (
	"context"
	"errors"
	"runtime/debug"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// syncer receives the bot device's /sync responses (encryption.appservice: false). It does what
// OlmMachine.ProcessSyncResponse does, but hands to-device events to the Unwedger.
type syncer struct {
	helper *Helper
}

func (s *syncer) ProcessResponse(ctx context.Context, resp *mautrix.RespSync, since string) error {
	mach := s.helper.mach
	defer func() {
		// A peer's event must never take the bridge down.
		if err := recover(); err != nil {
			s.helper.log.Error().Interface("error", err).Str("stack", string(debug.Stack())).Msg("Processing sync response panicked")
		}
	}()
	mach.HandleDeviceLists(ctx, &resp.DeviceLists, since)
	for _, evt := range resp.ToDevice.Events {
		evt.Type.Class = event.ToDeviceEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			s.helper.log.Warn().Err(err).Str("event_type", evt.Type.Type).Stringer("sender", evt.Sender).Msg("Failed to parse to-device event")
			continue
		}
		s.helper.unwedger.HandleToDevice(ctx, evt)
	}
	mach.HandleOTKCounts(ctx, &resp.DeviceOTKCount)
	mach.MarkOlmHashSavePoint(ctx)
	return nil
}

func (s *syncer) OnFailedSync(_ *mautrix.RespSync, err error) (time.Duration, error) {
	if errors.Is(err, mautrix.MUnknownToken) {
		return 0, err
	}
	s.helper.log.Error().Err(err).Msg("Error syncing to-device events, retrying in 10 seconds")
	return 10 * time.Second, nil
}

func (s *syncer) GetFilterJSON(_ id.UserID) *mautrix.Filter {
	none := []event.Type{{Type: "*"}}
	return &mautrix.Filter{
		Presence:    &mautrix.FilterPart{NotTypes: none},
		AccountData: &mautrix.FilterPart{NotTypes: none},
		Room: &mautrix.RoomFilter{
			Ephemeral:   &mautrix.FilterPart{NotTypes: none},
			AccountData: &mautrix.FilterPart{NotTypes: none},
			State:       &mautrix.FilterPart{NotTypes: none},
			Timeline:    &mautrix.FilterPart{NotTypes: none},
		},
	}
}

// transactionListener is how the machine subscribes to appservice transactions
// (encryption.appservice: true): the same subscriptions, but encrypted to-device events go
// through the Unwedger.
type transactionListener struct {
	*appservice.EventProcessor
	unwedger *unwedge.Unwedger
}

func (tl *transactionListener) On(evtType event.Type, handler func(ctx context.Context, evt *event.Event)) {
	if evtType == event.ToDeviceEncrypted {
		handler = tl.unwedger.HandleToDevice
	}
	tl.EventProcessor.On(evtType, handler)
}
