-- Several active broker nodes (issue 14, cluster.enabled = true): session ownership and the
-- session timers every node shares.

-- The session-directory claim (its offset in <prefix>.sessions) of the connection that owns the
-- session. A node that takes the session over raises it before it reads the session's state;
-- every later write made for the session carries the epoch of its connection and is refused
-- when it is below this one, so a node that lost the session (cut off, slow to notice the
-- takeover) cannot change it any more. 0: written by a single node, or before this migration.
ALTER TABLE sessions ADD COLUMN owner_epoch bigint NOT NULL DEFAULT 0;

-- The delayed will and the expiry of a disconnected persistent session, in the database so
-- that each fires once for the whole cluster, whichever node is alive: every node claims due
-- rows with FOR UPDATE SKIP LOCKED and fires them in the transaction that removes them. A
-- reconnect of the client deletes the row (which cancels both). One row per session.
CREATE TABLE session_timers (
    client_id     text   PRIMARY KEY,
    -- owner_epoch of the connection that ended (the row is refused for a stale one)
    owner_epoch   bigint NOT NULL,
    -- when the will is due (ms since the epoch); NULL: no will waits
    will_at_ms    bigint NULL,
    -- versioned encoding of the will message; NULL: none
    will          bytea  NULL,
    -- when the session ends (ms since the epoch); NULL: never
    expires_at_ms bigint NULL
);
CREATE INDEX session_timers_will_due ON session_timers (will_at_ms) WHERE will_at_ms IS NOT NULL;
CREATE INDEX session_timers_expiry_due ON session_timers (expires_at_ms)
    WHERE expires_at_ms IS NOT NULL;

-- A node firing a timer claims it first (claim_token, claimed_until_ms), publishes the will,
-- then removes the row or the session under the same token. A node that dies in between
-- leaves the claim to lapse; another node fires the row again after claimed_until_ms.
ALTER TABLE session_timers
    ADD COLUMN claim_token      bigint NOT NULL DEFAULT 0,
    ADD COLUMN claimed_until_ms bigint NOT NULL DEFAULT 0;
-- Claim tokens are unique for ever, so a lapsed claim never matches a later one.
CREATE SEQUENCE session_timer_claims;

-- The cluster's nodes and their leases: every node renews its row every second. A node whose
-- lease lapsed is dead for the others: the first to take its row (DELETE … RETURNING) ends
-- the clean sessions the directory still shows connected to it and disconnects its persistent
-- ones (their expiry starts), so that they do not wait for a node that is gone for good.
CREATE TABLE nodes (
    node_id        text   PRIMARY KEY,
    lease_until_ms bigint NOT NULL
);
