package bridge

import (
	"context"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/crypto/unwedge"
)

// reshareRoomKeys sends a device the bridge's current outbound Megolm sessions again, over the
// Olm session in use now, when that session replaced one the device could not read (the bridge
// healed it, or the device opened a new one), with the checks sharing applies
// (unwedge.ReshareOwnSessions). The keys are at the sessions' current index: what the device
// missed before it can ask for, and allowKeyShare answers those requests from the index it had.
func (h *Helper) reshareRoomKeys(ctx context.Context, device *id.Device) {
	log := zerolog.Ctx(ctx).With().Stringer("user_id", device.UserID).Stringer("device_id", device.DeviceID).
		Stringer("identity_key", device.IdentityKey).Logger()
	rooms, err := h.outboundRooms(ctx)
	if err != nil {
		log.Err(err).Msg("Failed to list outbound Megolm sessions to share again")
		return
	}
	sent, err := unwedge.ReshareOwnSessions(ctx, h.mach, device, rooms, h.conn.StateStore.IsInvited)
	if err != nil {
		log.Warn().Err(err).Msg("Failed to share some room keys again")
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
