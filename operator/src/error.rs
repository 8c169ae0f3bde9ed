//! The controllers' error type. A reconcile that returns one is retried with backoff
//! (`controller::error_policy`); conditions already say what went wrong.

use crate::seam::ProvisionError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// A short label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Provision(_) => "provision",
            Error::Serialization(_) => "serialization",
            Error::MissingField(_) => "missing_field",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
