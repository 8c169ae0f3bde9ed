//! The ferrymq load generator (`ferrymq-bench`).
//!
//! * [`codec`]: a thin MQTT 3.1.1 client codec (encode in place, decode borrowed).
//! * [`client`]: connect / subscribe setup.
//! * [`scenario`]: what a run does, and the named suite.
//! * [`run`]: publishers and subscribers for one scenario against one address, measured.
//! * [`conns`]: the idle-connection scale test.
//! * [`isolation`]: well-behaved clients next to bad neighbours, ack latency measured.
//! * [`procstat`]: broker CPU and RSS from /proc.
//! * [`brokers`]: starting ferrymq, Mosquitto and rumqttd with equivalent settings.
//! * [`cluster`]: 1, 2, 3… ferrymq cluster nodes on Kafka + PostgreSQL, deliveries across nodes.
//! * [`compare`]: the side-by-side comparison and the CI smoke mode.
//! * [`report`]: human table, markdown.

pub mod brokers;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod compare;
pub mod conns;
pub mod isolation;
pub mod procstat;
pub mod report;
pub mod run;
pub mod scenario;
