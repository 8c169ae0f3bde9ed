//! The rules the broker and the operator must agree on, in one small crate both depend on.
//!
//! The operator provisions what the broker later reads: the Kafka topics (their names and the
//! retention of APPLICATION topics), the credential rows (their password hashes) and the
//! PostgreSQL tables (the migrations). Each rule is defined here once, so the two cannot drift,
//! and the operator does not link the broker (its image would otherwise carry the broker's whole
//! dependency tree: redb, the MQTT codec, TLS listeners, WebSocket, JWT, ...).
//!
//! Nothing here talks to a network: names, numbers, hashes and embedded SQL files.

pub mod application;
pub mod migrations;
pub mod password;
pub mod topics;
