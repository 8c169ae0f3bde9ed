//! The configured authenticator: providers asked in `auth.providers` order, then the anonymous
//! rule, behind the per-IP limit on failed attempts.
//!
//! Each provider either does not recognise the credentials (the next one is asked) or decides.
//! When none recognises them: a client that presented a user name or password is refused with
//! "bad user name or password"; one that presented nothing is anonymous, accepted only with
//! `auth.allow_anonymous`. Without any provider configured, presented credentials are ignored
//! and every client is anonymous.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::embedded::{EmbeddedCredentials, OpenError};
use super::jwt::{JwtProvider, JwtSetupError, Verdict};
use super::limiter::FailureLimiter;
use super::password;
use super::postgres::PgCredentials;
use super::store::{CredentialKey, CredentialRecord, CredentialStore};
use super::x509::X509Mapper;
use super::{AuthDecision, Authenticator, Credentials, Identity};
use crate::config::{AuthProviderKind, Config};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("credential store: {0}")]
    Store(#[from] OpenError),
    #[error("credential store: {0}")]
    Postgres(crate::storage::StorageError),
    #[error(transparent)]
    Jwt(#[from] JwtSetupError),
    #[error("key `auth.x509.cn_regex`: {0}")]
    Regex(#[from] regex::Error),
}

enum Provider {
    Store,
    X509(X509Mapper),
    Jwt(Box<JwtProvider>),
}

pub struct AuthChain {
    providers: Vec<Provider>,
    store: Arc<dyn CredentialStore>,
    allow_anonymous: bool,
    anonymous: Identity,
    limiter: FailureLimiter,
}

/// A provider's answer.
enum Step {
    Next,
    Decided(AuthDecision),
}

impl AuthChain {
    /// Opens the configured backend's credential store and builds the chain.
    pub async fn open(config: &Config) -> Result<AuthChain, SetupError> {
        Self::new(config, open_store(config).await?)
    }

    pub fn new(config: &Config, store: Arc<dyn CredentialStore>) -> Result<AuthChain, SetupError> {
        let auth = &config.auth;
        let mut providers = Vec::new();
        for kind in &auth.providers {
            providers.push(match kind {
                AuthProviderKind::Store => Provider::Store,
                AuthProviderKind::X509 => Provider::X509(X509Mapper::new(&auth.x509)?),
                AuthProviderKind::Jwt => match &auth.jwt {
                    Some(jwt) => Provider::Jwt(Box::new(JwtProvider::new(jwt)?)),
                    None => {
                        return Err(SetupError::Jwt(JwtSetupError::Key {
                            key: "algorithm",
                            message: "the jwt provider needs [auth.jwt]".into(),
                        }))
                    }
                },
            });
        }
        if auth.allow_anonymous {
            tracing::warn!(
                "ANONYMOUS ACCESS IS ON (auth.allow_anonymous = true): clients without credentials \
                 may connect. Fine for development; for anything reachable from a network, \
                 configure auth.providers and set allow_anonymous = false"
            );
        }
        Ok(AuthChain {
            providers,
            store,
            allow_anonymous: auth.allow_anonymous,
            anonymous: Identity {
                username: None,
                client_type: None,
                acl: auth.anonymous_acl.clone(),
                via: "anonymous",
            },
            limiter: FailureLimiter::new(
                auth.failure_burst,
                Duration::from_secs(auth.failure_refill_secs),
                auth.failure_tracked_ips,
            ),
        })
    }

    async fn run_providers(&self, c: &Credentials<'_>) -> AuthDecision {
        let presented = c.username.is_some() || c.password.is_some();
        if !self.providers.is_empty() {
            for provider in &self.providers {
                let step = match provider {
                    Provider::Store => self.check_store(c).await,
                    Provider::X509(mapper) => self.check_x509(mapper, c).await,
                    Provider::Jwt(jwt) => match jwt.check(c) {
                        Verdict::NotMine => Step::Next,
                        Verdict::Decided(d) => Step::Decided(d),
                    },
                };
                if let Step::Decided(decision) = step {
                    return decision;
                }
            }
            if presented {
                // As slow as a wrong password for a known user, so timing does not tell which
                // user names exist.
                if let Some(given) = c.password {
                    password::verify_dummy(given).await;
                }
                return AuthDecision::BadCredentials;
            }
        }
        if self.allow_anonymous {
            AuthDecision::Allow(self.anonymous.clone())
        } else {
            AuthDecision::NotAuthorized
        }
    }

    async fn lookup(&self, key: &CredentialKey) -> Result<Option<CredentialRecord>, Step> {
        self.store.get(key).await.map_err(|e| {
            tracing::error!(error = %e, "credential store lookup failed");
            Step::Decided(AuthDecision::Unavailable)
        })
    }

    /// User name + password, or (no user name) client id + password.
    async fn check_store(&self, c: &Credentials<'_>) -> Step {
        let key = match c.username {
            Some(u) => CredentialKey::Username(u.to_string()),
            None => CredentialKey::ClientId(c.client_id.to_string()),
        };
        let record = match self.lookup(&key).await {
            Ok(Some(r)) => r,
            Ok(None) => return Step::Next,
            Err(step) => return step,
        };
        let Some(hash) = record.password_hash.as_deref() else {
            // A record without a password (an APPLICATION registration, an X.509-only
            // identity) cannot be logged in with.
            return if c.username.is_some() {
                Step::Decided(AuthDecision::BadCredentials)
            } else {
                Step::Next
            };
        };
        // A client id with a password is reserved: connecting as it needs the password.
        let Some(given) = c.password else {
            return Step::Decided(AuthDecision::BadCredentials);
        };
        if !password::verify(given, hash).await {
            return Step::Decided(AuthDecision::BadCredentials);
        }
        if c.username.is_some()
            && record
                .client_id
                .as_deref()
                .is_some_and(|id| id != c.client_id)
        {
            return Step::Decided(AuthDecision::NotAuthorized);
        }
        Step::Decided(AuthDecision::Allow(identity(record, "store")))
    }

    async fn check_x509(&self, mapper: &X509Mapper, c: &Credentials<'_>) -> Step {
        let Some(key) = c
            .client_cert
            .and_then(|cert| cert.subject_cn.as_deref())
            .and_then(|cn| mapper.key_for(cn))
        else {
            return Step::Next;
        };
        let record = match self.lookup(&key).await {
            Ok(Some(r)) => r,
            Ok(None) => return Step::Next,
            Err(step) => return step,
        };
        if record.username.is_some()
            && record
                .client_id
                .as_deref()
                .is_some_and(|id| id != c.client_id)
        {
            return Step::Decided(AuthDecision::NotAuthorized);
        }
        let mut id = identity(record, "x509");
        if id.username.is_none() {
            let (CredentialKey::Username(name) | CredentialKey::ClientId(name)) = key;
            id.username = Some(name);
        }
        Step::Decided(AuthDecision::Allow(id))
    }

    /// Fills in the client type from an APPLICATION registration (a client-id record) when the
    /// credential did not decide it.
    async fn with_registered_type(&self, mut id: Identity, client_id: &str) -> AuthDecision {
        if id.client_type.is_none() {
            match self
                .lookup(&CredentialKey::ClientId(client_id.to_string()))
                .await
            {
                Ok(Some(r)) => id.client_type = r.client_type.map(|t| t.kind()),
                Ok(None) => {}
                Err(Step::Decided(d)) => return d,
                Err(Step::Next) => {}
            }
        }
        AuthDecision::Allow(id)
    }
}

/// The credential store of the configured backend: the table `mqtt_credentials` in
/// `postgres.schema` with `kafka+postgres`, else `<data_dir>/credentials.redb`.
pub async fn open_store(config: &Config) -> Result<Arc<dyn CredentialStore>, SetupError> {
    if config.storage.is_kafka_postgres() {
        let store = PgCredentials::connect(&config.postgres)
            .await
            .map_err(SetupError::Postgres)?;
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(EmbeddedCredentials::open(&config.data_dir)?))
    }
}

fn identity(record: CredentialRecord, via: &'static str) -> Identity {
    Identity {
        username: record.username,
        client_type: record.client_type.map(|t| t.kind()),
        acl: record.acl,
        via,
    }
}

#[async_trait]
impl Authenticator for AuthChain {
    async fn authenticate(&self, c: &Credentials<'_>) -> AuthDecision {
        let ip = c.peer.ip();
        if self.limiter.is_blocked(ip, Instant::now()) {
            return AuthDecision::RateLimited;
        }
        match self.run_providers(c).await {
            AuthDecision::Allow(id) => self.with_registered_type(id, c.client_id).await,
            d @ (AuthDecision::BadCredentials | AuthDecision::NotAuthorized) => {
                self.limiter.record_failure(ip, Instant::now());
                d
            }
            d => d,
        }
    }

    fn credential_store(&self) -> Option<Arc<dyn CredentialStore>> {
        Some(self.store.clone())
    }
}
