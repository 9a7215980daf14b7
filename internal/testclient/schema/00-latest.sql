-- v0 -> v1: Element's key-sharing records
-- The index at which the client shared one of its own outbound Megolm sessions with a device, and
-- the device's Olm wedging index at that time: matrix-rust-sdk's ShareInfo::Shared
-- (src/olm/group_sessions/outbound.rs). Only the Element rules write it, and a room keeps the
-- rows of its current outbound session only.
CREATE TABLE testclient_megolm_share (
	room_id       TEXT   NOT NULL,
	session_id    TEXT   NOT NULL,
	user_id       TEXT   NOT NULL,
	device_id     TEXT   NOT NULL,
	identity_key  TEXT   NOT NULL,
	message_index BIGINT NOT NULL,
	wedging_index BIGINT NOT NULL,
	PRIMARY KEY (session_id, user_id, device_id)
);

-- How many Olm sessions each peer device (by Curve25519 identity key) has started with the client
-- through a pre-key message: matrix-rust-sdk's DeviceData::olm_wedging_index.
CREATE TABLE testclient_olm_wedging (
	identity_key  TEXT   PRIMARY KEY,
	wedging_index BIGINT NOT NULL
);
