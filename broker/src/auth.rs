//! The authentication seam: CONNECT credentials in, a decision out.
//!
//! The broker calls one [`Authenticator`]; the default allows everyone. Credential stores, X.509
//! and JWT providers (security issue) implement the same trait, so the connection code never
//! changes when real authentication lands.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;

/// What a client presented in CONNECT, and what the connection knows about it.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a Bytes>,
    /// The client's address: the socket peer, or the source a PROXY protocol header named.
    pub peer: SocketAddr,
    /// Name of the listener the client connected to.
    pub listener: &'a str,
    /// The certificate a TLS client presented, already verified against the listener's
    /// `client_ca_file`. `None` on plain listeners and for TLS clients without one.
    pub client_cert: Option<&'a ClientCertificate>,
}

/// A verified TLS client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The subject's Common Name, when the certificate has one (the first, if several).
    pub subject_cn: Option<String>,
    /// The chain as presented, DER, the client's own certificate first.
    pub chain_der: Vec<Bytes>,
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
