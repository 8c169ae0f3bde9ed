//! ferrymq: an MQTT 3.1 / 3.1.1 / 5.0 broker for IoT at scale.
//!
//! The data path, in the order bytes flow (see docs/architecture.md):
//! [`listener`] accepts → [`connection`] frames bytes with the [`protocol`] codec →
//! [`session`] runs the per-client state machine → [`router`] matches subscriptions and fans
//! out into each subscriber's bounded queue → the subscriber's connection writes it.

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod http;
pub mod ingest;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod protocol;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod router;
pub mod server;
pub mod session;
pub mod standby;
pub mod storage;
pub mod tls;
pub mod wake;
pub mod websocket;
