//! The ferrymq Kubernetes operator: controllers for `MqttBroker` and `ApplicationClient`.
//!
//! * [`config`] renders the broker's TOML config; [`resources`] builds the owned objects.
//! * [`broker`] and [`app`] are the reconcilers; [`controller`] runs them.
//! * [`seam`] is the boundary to Kafka and PostgreSQL, implemented by [`provisioner`] over
//!   [`provision`].

pub mod app;
pub mod apply;
pub mod broker;
pub mod config;
pub mod context;
pub mod controller;
pub mod error;
pub mod metrics;
pub mod naming;
pub mod provision;
pub mod provisioner;
pub mod resources;
pub mod seam;
pub mod secrets;
