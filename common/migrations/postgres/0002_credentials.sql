-- ferrymq credential store (storage.backend = "kafka+postgres"): one row per credential record,
-- the interface documented in docs/security.md ("Credential store"). The broker, its admin CLI
-- and API, and the Kubernetes operator (plain SQL) all write it; the broker reads it at every
-- CONNECT and checks each row it reads the way it checks a record it writes.
--
-- Both key columns use the "C" collation (byte order), so the primary key index lists records
-- in the same order as the embedded store's `u:`/`c:` keys: all client ids, then all user names,
-- each by bytes.
CREATE TABLE mqtt_credentials (
    -- 'username': keyed by the user name a client logs in with; 'client_id': by client id
    key_kind      text COLLATE "C" NOT NULL,
    key_name      text COLLATE "C" NOT NULL,
    -- username rows: the only client id the user may connect as (NULL: any);
    -- client_id rows: NULL or key_name
    client_id     text NULL,
    -- argon2id PHC string or bcrypt hash; NULL: the record cannot be logged in with
    password_hash text NULL,
    -- NULL: the APPLICATION registrations and the config decide
    client_type   text NULL,
    -- topic patterns; empty allows nothing
    publish       text[] NOT NULL DEFAULT '{}',
    subscribe     text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (key_kind, key_name),
    CONSTRAINT mqtt_credentials_key_kind CHECK (key_kind IN ('username', 'client_id')),
    CONSTRAINT mqtt_credentials_key_name CHECK (octet_length(key_name) BETWEEN 1 AND 65535),
    CONSTRAINT mqtt_credentials_client_id
        CHECK (key_kind = 'username' OR client_id IS NULL OR client_id = key_name),
    CONSTRAINT mqtt_credentials_password_hash CHECK (
        password_hash IS NULL
        OR password_hash LIKE '$argon2id$%'
        OR password_hash ~ '^\$2[abxy]\$'
    ),
    CONSTRAINT mqtt_credentials_client_type
        CHECK (client_type IS NULL OR client_type IN ('device', 'application')),
    CONSTRAINT mqtt_credentials_publish CHECK (
        cardinality(publish) <= 256
        AND coalesce(array_ndims(publish), 1) = 1
        AND array_position(publish, NULL) IS NULL
    ),
    CONSTRAINT mqtt_credentials_subscribe CHECK (
        cardinality(subscribe) <= 256
        AND coalesce(array_ndims(subscribe), 1) = 1
        AND array_position(subscribe, NULL) IS NULL
    )
);
