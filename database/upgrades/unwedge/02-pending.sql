-- v1 -> v2: Undecryptable events waiting for their Megolm session
-- Room events the bridge could not decrypt because it lacks their Megolm session. A row lives
-- until the session arrives and the event is bridged, or until the retention passes and the
-- event is given up with a notice. The event is kept as received (encrypted).
CREATE TABLE unwedge_pending (
	bridge_id     TEXT    NOT NULL,
	event_id      TEXT    NOT NULL,
	room_id       TEXT    NOT NULL,
	session_id    TEXT    NOT NULL,
	sender_key    TEXT    NOT NULL,
	sender        TEXT    NOT NULL,
	-- The sending device as the event claims it (deprecated field, may be empty).
	device_id     TEXT    NOT NULL,
	event         TEXT    NOT NULL,
	-- Unix ms: when the event was sent (origin_server_ts) and when the bridge first failed on it.
	origin_ts     BIGINT  NOT NULL,
	first_seen    BIGINT  NOT NULL,
	-- Key requests sent for the event's session, and when the next one is due (Unix ms).
	requests      INTEGER NOT NULL DEFAULT 0,
	next_request  BIGINT  NOT NULL,
	-- A worker handing the event to the bridge holds it until claim_until (Unix ms).
	claim_owner   TEXT    NOT NULL DEFAULT '',
	claim_until   BIGINT  NOT NULL DEFAULT 0,
	last_error    TEXT    NOT NULL DEFAULT '',

	PRIMARY KEY (bridge_id, event_id)
);

CREATE INDEX unwedge_pending_session_idx ON unwedge_pending (bridge_id, session_id);
CREATE INDEX unwedge_pending_request_idx ON unwedge_pending (bridge_id, next_request);
CREATE INDEX unwedge_pending_seen_idx ON unwedge_pending (bridge_id, first_seen);
CREATE INDEX unwedge_pending_sender_idx ON unwedge_pending (bridge_id, sender);
