//! ferrymq end-to-end tooling. [`bench`] is the load generator behind the `ferrymq-bench`
//! binary: scenarios, a thin MQTT client, measurement, and the broker comparison.

pub mod bench;
pub mod harness;
