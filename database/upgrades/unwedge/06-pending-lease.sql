-- v5 -> v6: A pending event's holder is a lease, as the ledger's are
-- "claim" is kept for one-time keys (/keys/claim); a worker holds a pending event under a lease.
ALTER TABLE unwedge_pending RENAME COLUMN claim_owner TO lease_owner;
ALTER TABLE unwedge_pending RENAME COLUMN claim_until TO lease_until;
