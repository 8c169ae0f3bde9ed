//! The ferrymq Kubernetes operator: controllers for `MqttBroker` and `ApplicationClient`.

pub mod config;
pub mod provision;
