package bridge

import (
	"context"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// reshareRoomKeys sends a device the bridge's current outbound Megolm sessions again, over the
// Olm session in use now, when that session replaced one the device could not read (the bridge
// healed it, or the device opened a new one). Only sessions the bridge already shared with this
// device (by user and identity key) are sent, so nobody gets a key they did not have. The keys
// are at the sessions' current index: what the device missed before it can ask for, and
// allowKeyShare answers those requests.
func (h *Helper) reshareRoomKeys(ctx context.Context, device *id.Device) {
	log := zerolog.Ctx(ctx).With().Stringer("user_id", device.UserID).Stringer("device_id", device.DeviceID).Logger()
	rooms, err := h.outboundRooms(ctx)
	if err != nil {
		log.Err(err).Msg("Failed to list outbound Megolm sessions to share again")
		return
	}
	sent := 0
	for _, roomID := range rooms {
		sess, err := h.mach.CryptoStore.GetOutboundGroupSession(ctx, roomID)
		if err != nil || sess == nil || !sess.Shared || sess.Expired() {
			continue
		}
		shared, err := h.mach.CryptoStore.IsOutboundGroupSessionShared(ctx, device.UserID, device.IdentityKey, sess.ID())
		if err != nil || !shared {
			continue
		}
		if err = h.mach.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, sess.ShareContent()); err != nil {
			log.Warn().Err(err).Stringer("room_id", roomID).Stringer("session_id", sess.ID()).Msg("Failed to share room key again")
			continue
		}
		sent++
	}
	if sent > 0 {
		log.Info().Int("sessions", sent).Msg("Shared the bridge's room keys again over the new Olm session")
	}
}

func (h *Helper) outboundRooms(ctx context.Context) ([]id.RoomID, error) {
	rows, err := h.store.DB.Query(ctx, "SELECT room_id FROM crypto_megolm_outbound_session WHERE account_id = $1", h.store.AccountID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var rooms []id.RoomID
	for rows.Next() {
		var roomID id.RoomID
		if err = rows.Scan(&roomID); err != nil {
			return nil, err
		}
		rooms = append(rooms, roomID)
	}
	return rooms, rows.Err()
}
