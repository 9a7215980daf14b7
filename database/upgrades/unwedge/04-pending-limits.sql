-- v3 -> v4: Pending events in order of arrival, with caps per room and in total
-- The order in which the bridge first received each pending event (Unix ns, strictly increasing
-- per process): events are handed over and listed in this order, not by the sender-controlled
-- origin_server_ts.
ALTER TABLE unwedge_pending ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;
UPDATE unwedge_pending SET arrival = first_seen * 1000000;
CREATE INDEX unwedge_pending_room_idx ON unwedge_pending (bridge_id, room_id);

-- One row per bridge: every insert into unwedge_pending first writes it, so the caps on pending
-- events (per sender, per room, in total) are checked and kept by one writer at a time, also
-- across replicas. records counts the inserts tried.
CREATE TABLE unwedge_pending_lock (
	bridge_id TEXT   NOT NULL PRIMARY KEY,
	records   BIGINT NOT NULL DEFAULT 0
);
