-- QoS 2 packet ids the log router has routed a message for and not yet seen released (PUBREL)
-- or reset (a new session of the publisher). A resend of such a packet id with DUP set is a
-- copy of a message already routed (the broker crashed between appending it and storing the
-- publisher's packet id) and is dropped. Updated in the router's batch transaction.
-- (0002 is the credential store.)
CREATE TABLE router_qos2_flows (
    client_id text    NOT NULL,
    pkid      integer NOT NULL,
    PRIMARY KEY (client_id, pkid)
);
