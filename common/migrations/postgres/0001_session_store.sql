-- ferrymq session store (storage.backend = "kafka+postgres"). Runs inside the schema named by
-- postgres.schema (the connection's search_path), so each broker owns its own schema.

-- One row per persistent session.
CREATE TABLE sessions (
    client_id          text PRIMARY KEY,
    -- 0 = DEVICE, 1 = APPLICATION
    kind               smallint NOT NULL,
    -- Session Expiry Interval in seconds; 4294967295 = never
    expiry_interval    bigint   NOT NULL,
    -- When the client disconnected, ms since the epoch; 0 while connected
    disconnected_at_ms bigint   NOT NULL DEFAULT 0,
    -- DEVICE: sequence number the next queued message gets
    next_seq           bigint   NOT NULL DEFAULT 1,
    -- Highest sequence number sent to the client at least once (resends above it carry DUP=0)
    sent_upto          bigint   NOT NULL DEFAULT 0
);

CREATE TABLE subscriptions (
    client_id text  NOT NULL,
    filter    text  NOT NULL,
    -- versioned encoding of the subscription options (QoS, no local, retain handling, id)
    options   bytea NOT NULL,
    PRIMARY KEY (client_id, filter)
);

-- DEVICE offline queues: bounded per client (device.queue_limit, oldest trimmed) and by TTL.
CREATE TABLE device_queue (
    client_id     text    NOT NULL,
    seq           bigint  NOT NULL,
    -- ms since the epoch after which the entry is dropped; 0 = never
    expires_at_ms bigint  NOT NULL,
    -- PUBREC received (QoS 2): resend PUBREL, not PUBLISH
    released      boolean NOT NULL DEFAULT false,
    -- versioned encoding of the delivery (QoS granted, subscription ids, message)
    record        bytea   NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE INDEX device_queue_expiry ON device_queue (expires_at_ms) WHERE expires_at_ms > 0;

-- APPLICATION delivery context: the log itself is the Kafka topic <prefix>.app.<client>.
CREATE TABLE application_offsets (
    client_id     text   PRIMARY KEY,
    -- Kafka offset + 1 of the first entry not yet acknowledged by the client
    committed_seq bigint NOT NULL
);
CREATE TABLE application_released (
    client_id text   NOT NULL,
    seq       bigint NOT NULL,
    PRIMARY KEY (client_id, seq)
);

-- Incoming QoS 2 packet ids stored and PUBRECed but not yet released by PUBREL.
CREATE TABLE inbound_qos2 (
    client_id text    NOT NULL,
    pkid      integer NOT NULL,
    PRIMARY KEY (client_id, pkid)
);

CREATE TABLE retained (
    topic  text  PRIMARY KEY,
    -- versioned encoding of the message
    record bytea NOT NULL
);

-- How far the log router has stored each partition of <prefix>.msg.all (the next offset to
-- route). Updated in the same transaction as the queue writes of each batch.
CREATE TABLE router_offsets (
    partition   integer PRIMARY KEY,
    next_offset bigint  NOT NULL
);
