-- v2 -> v3: The index at which the bridge first shared each of its Megolm sessions with a device
-- A device that asks again for one of the bridge's own sessions gets it from this index, never
-- from an earlier one: only what it had before (matrix-rust-sdk's rule for forwarding keys).
CREATE TABLE unwedge_megolm_shared (
	bridge_id    TEXT   NOT NULL,
	session_id   TEXT   NOT NULL,
	identity_key TEXT   NOT NULL,
	first_index  BIGINT NOT NULL,
	-- Unix ms of the first share; rows older than unwedge.history_retention are pruned.
	shared_at    BIGINT NOT NULL,

	PRIMARY KEY (bridge_id, session_id, identity_key)
);

CREATE INDEX unwedge_megolm_shared_at_idx ON unwedge_megolm_shared (bridge_id, shared_at);
