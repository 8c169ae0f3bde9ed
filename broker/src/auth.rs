//! The authentication seam: CONNECT credentials in, a decision out.
//!
//! The broker calls one [`Authenticator`]; the default allows everyone. Credential stores, X.509
//! and JWT providers (security issue) implement the same trait, so the connection code never
//! changes when real authentication lands.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;

/// What a client presented in CONNECT.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a Bytes>,
    pub peer: SocketAddr,
}

/// The outcome of an authentication attempt, mapped to CONNACK codes by the connection
/// (v5 0x86 / v3 0x04 for bad credentials, v5 0x87 / v3 0x05 for not authorized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Allow,
    BadCredentials,
    NotAuthorized,
}

#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision;
}

/// Accepts every client: the development default until the credential store exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

#[async_trait]
impl Authenticator for AllowAll {
    async fn authenticate(&self, _credentials: &Credentials<'_>) -> AuthDecision {
        AuthDecision::Allow
    }
}
