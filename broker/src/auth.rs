//! The authentication seam: CONNECT credentials in, a decision (with the client's identity)
//! out.
//!
//! The broker calls one [`Authenticator`]. In production that is [`chain::AuthChain`], built
//! from `[auth]`: the configured providers (credential store, X.509 mapping, JWT) in order, the
//! anonymous rule and the per-IP limit on failed attempts. [`AllowAll`] is for tests that do not
//! care. Authorization rules travel with the identity and are checked by the session
//! ([`acl`]). docs/security.md describes the whole thing.

pub mod acl;
pub mod applications;
pub mod chain;
pub mod cli;
pub mod embedded;
pub mod jwt;
pub mod limiter;
pub mod password;
pub mod postgres;
pub mod store;
pub mod x509;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::storage::ClientKind;
use acl::AclRules;
use store::CredentialStore;

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

/// Who an accepted client is, as far as the broker's rules are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The verified principal: the record's user name, the JWT `sub`, the name an X.509 CN maps
    /// to. `${username}` in ACL patterns stands for it; `None` (anonymous clients) drops such
    /// patterns.
    pub username: Option<String>,
    /// `None`: not decided by the credential; the APPLICATION registrations and
    /// `[[application_clients]]` decide, else DEVICE.
    pub client_type: Option<ClientKind>,
    /// Publish/subscribe patterns, placeholders not yet substituted.
    pub acl: AclRules,
    /// Which provider accepted the client (`store`, `x509`, `jwt`, `anonymous`), for logs.
    pub via: &'static str,
}

impl Identity {
    /// Anyone, allowed everything, type from configuration.
    pub fn unrestricted() -> Identity {
        Identity {
            username: None,
            client_type: None,
            acl: AclRules::everything(),
            via: "anonymous",
        }
    }
}

/// The outcome of an authentication attempt, mapped to CONNACK codes by the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Allow(Identity),
    /// v5 0x86 / v3 0x04: the user name or password (or token) is not accepted.
    BadCredentials,
    /// v5 0x87 / v3 0x05: known credentials that may not connect this way (wrong client id
    /// for the user, no credentials where anonymous access is off, an unmapped certificate).
    NotAuthorized,
    /// v5 0x9F Connection rate exceeded / v3 0x03 (server unavailable): too many failed attempts
    /// from this address.
    RateLimited,
    /// v5 0x88 Server unavailable / v3 0x03: the credential store could not be read.
    Unavailable,
}

#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision;

    /// The store behind this authenticator, for the admin API; `None` when there is none.
    fn credential_store(&self) -> Option<Arc<dyn CredentialStore>> {
        None
    }
}

/// Accepts every client and allows it everything (tests, embedding).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

#[async_trait]
impl Authenticator for AllowAll {
    async fn authenticate(&self, _credentials: &Credentials<'_>) -> AuthDecision {
        AuthDecision::Allow(Identity::unrestricted())
    }
}
