//! Side effects outside Kubernetes: Kafka topics through the admin API ([`kafka`]) and the
//! broker's PostgreSQL schema, role and credential rows ([`postgres`]). The controllers call
//! these; each returns what it changed, so a reconcile that finds everything in place writes
//! nothing and emits no Event.

pub mod kafka;
pub mod postgres;
