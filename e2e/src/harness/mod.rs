//! Process-level test harness: the real `ferrymq` binary as a child process (spawn, SIGKILL,
//! restart on the same port and data dir, SIGTERM), a raw MQTT client with full control over
//! packet ids and DUP flags, retrying publishers, recording subscribers and a delivery checker.
//!
//! [`BrokerProcess::start`] builds nothing: it runs `FERRYMQ_BIN` or
//! `<workspace>/target/<profile>/ferrymq`, so run `cargo build -p ferrymq-broker` (with
//! `--release` for release) first. The tests in `e2e/tests/` and the operator's broker tests
//! call [`release_binary`], which runs `cargo build -p ferrymq-broker --release` once per test
//! binary and returns `target/release/ferrymq` unless `FERRYMQ_BIN` is set.
//!
//! Environment:
//! * `FERRYMQ_BIN`: broker binary to run;
//! * `FERRYMQ_E2E_SEED`: seed for every random choice (kill points); printed by every test;
//! * `FERRYMQ_E2E_KEEP=1`: keep the temporary directories (data, config, `broker.log`);
//! * `FERRYMQ_E2E_LOG`: `FERRYMQ_LOG` filter for the broker (default `info`);
//! * `FERRYMQ_E2E_FAULT=wipe`: negative control, deletes the data dir before every restart so
//!   the crash tests must fail (shows they can).

#[cfg(feature = "kube")]
pub mod kube;
pub mod mqtt;
pub mod payload;
mod process;
pub mod rng;
pub mod services;
pub mod workload;

pub use mqtt::{ConnAckInfo, ConnectOptions, Connection, Incoming, Message, Protocol, WillOptions};
pub use payload::MsgId;
pub use process::{
    default_binary, free_port, http_status, release_binary, target_dir, workspace_root,
    BrokerOptions, BrokerProcess, BIN_ENV, FAULT_ENV, KEEP_ENV,
};
pub use rng::{random_kill_points, Rng, SEED_ENV};
pub use workload::{
    check_delivery, connect_retry, persistent, subscribe_and_leave, DeliveryCheck, Expectation,
    Publisher, PublisherConfig, PublisherReport, Received, Subscriber,
};
