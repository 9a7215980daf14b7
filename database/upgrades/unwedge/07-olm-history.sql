-- v6 -> v7: The Olm history: earlier states of the bridge's Olm sessions, to decrypt what a client restored from a backup sends
-- One row each time a session's ratchet moved (a new sending chain, a new receiving chain) or a
-- session began: the session pickled as the crypto store pickles it (encryption.pickle_key).
-- Rows older than unwedge.olm_history are pruned.
CREATE TABLE unwedge_olm_history (
	bridge_id  TEXT   NOT NULL,
	sender_key TEXT   NOT NULL,
	session_id TEXT   NOT NULL,
	-- Unix ms.
	taken_at   BIGINT NOT NULL,
	pickle     TEXT   NOT NULL
);

CREATE INDEX unwedge_olm_history_key_idx ON unwedge_olm_history (bridge_id, sender_key, taken_at);
CREATE INDEX unwedge_olm_history_at_idx ON unwedge_olm_history (bridge_id, taken_at);

-- The hashes of the Olm messages the bridge decrypted within unwedge.olm_history, copied from
-- crypto_olm_message_hash before mautrix-go deletes them (after minutes), so that the history
-- never decrypts one of them again.
CREATE TABLE unwedge_olm_seen (
	bridge_id TEXT   NOT NULL,
	hash      TEXT   NOT NULL,
	-- Unix ms.
	seen_at   BIGINT NOT NULL,

	PRIMARY KEY (bridge_id, hash)
);

CREATE INDEX unwedge_olm_seen_at_idx ON unwedge_olm_seen (bridge_id, seen_at);
