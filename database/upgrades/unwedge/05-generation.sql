-- v4 -> v5: The crypto store's generation, to notice at startup that it went back in time
-- One row per bridge: a counter that goes up, at most every few seconds, while the bridge's Olm
-- sessions or account change. Its value is also written to the bot's account data on the
-- homeserver, which a backup of this database does not take back: after a restore the counter
-- here is behind the homeserver's, and the bridge heals its sessions before handling events.
-- identity_key is the bot device's, whose state the counter follows.
CREATE TABLE unwedge_generation (
	bridge_id    TEXT   NOT NULL PRIMARY KEY,
	identity_key TEXT   NOT NULL,
	generation   BIGINT NOT NULL
);
