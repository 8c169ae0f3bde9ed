-- Several active broker nodes on one schema (issue 14, cluster.enabled = true): each partition of
-- <prefix>.msg.all is routed by the node that claimed it last. A claim bumps the partition's
-- epoch; every router batch stores its position only `WHERE epoch = <the epoch it was read
-- under>`, in the same transaction as its DEVICE appends, so a node that lost a partition (a
-- rebalance, a standby or a restarted node taking over) can no longer store anything for it.
ALTER TABLE router_offsets
    ADD COLUMN owner_node text NULL,
    ADD COLUMN epoch      bigint NOT NULL DEFAULT 0;

-- The publish-log partition a QoS 2 flow was routed from (a publisher's records all land in one
-- partition), so a node that claims a partition loads that partition's open flows only.
-- -1: recorded before this migration; loaded by every claim.
ALTER TABLE router_qos2_flows
    ADD COLUMN partition integer NOT NULL DEFAULT -1;
CREATE INDEX router_qos2_flows_partition ON router_qos2_flows (partition);
