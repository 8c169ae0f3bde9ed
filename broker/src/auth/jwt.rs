//! JWT bearer tokens in the CONNECT password field.
//!
//! A password that parses as a JWT header is this provider's: it is verified (signature with
//! the one configured algorithm, `exp` required, `nbf` honoured, `iss` and `aud` must equal the
//! configured values) and either accepted or refused; it never falls through to the next
//! provider. Claims (docs/security.md, "JWT"):
//!
//! | claim | meaning |
//! |---|---|
//! | `sub` | the principal; `${username}` in ACL patterns |
//! | `mqtt_client_id` | optional: the only client id the token may connect as |
//! | `mqtt_client_type` | optional: `device` or `application` |
//! | `mqtt_publish`, `mqtt_subscribe` | ACL patterns; absent = nothing |

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::acl::AclRules;
use super::store::ClientType;
use super::{AuthDecision, Credentials, Identity};
use crate::config::JwtConfig;

/// Longest token looked at; anything longer is not ours.
const MAX_TOKEN_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error("key `auth.jwt.public_key_file`: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key `auth.jwt.{key}`: {message}")]
    Key { key: &'static str, message: String },
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    mqtt_client_id: Option<String>,
    #[serde(default)]
    mqtt_client_type: Option<String>,
    #[serde(default)]
    mqtt_publish: Vec<String>,
    #[serde(default)]
    mqtt_subscribe: Vec<String>,
}

pub struct JwtProvider {
    key: DecodingKey,
    validation: Validation,
}

/// What the provider made of a CONNECT.
#[derive(Debug)]
pub enum Verdict {
    /// The password is not a JWT.
    NotMine,
    Decided(AuthDecision),
}

impl JwtProvider {
    pub fn new(config: &JwtConfig) -> Result<JwtProvider, JwtSetupError> {
        let bad = |key: &'static str, message: String| JwtSetupError::Key { key, message };
        let read_pem = |path: &Path| {
            std::fs::read(path).map_err(|source| JwtSetupError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let (algorithm, key) = match config.algorithm.as_str() {
            "HS256" => {
                let secret = config
                    .secret
                    .as_deref()
                    .ok_or_else(|| bad("secret", "HS256 needs a secret".into()))?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            alg @ ("RS256" | "ES256") => {
                let path = config.public_key_file.as_deref().ok_or_else(|| {
                    bad("public_key_file", format!("{alg} needs a public key file"))
                })?;
                let pem = read_pem(path)?;
                if alg == "RS256" {
                    let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                        bad("public_key_file", format!("not an RSA public key PEM: {e}"))
                    })?;
                    (Algorithm::RS256, key)
                } else {
                    let key = DecodingKey::from_ec_pem(&pem).map_err(|e| {
                        bad("public_key_file", format!("not an EC public key PEM: {e}"))
                    })?;
                    (Algorithm::ES256, key)
                }
            }
            other => return Err(bad("algorithm", format!("`{other}` is not supported"))),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        Ok(JwtProvider { key, validation })
    }

    pub fn check(&self, credentials: &Credentials<'_>) -> Verdict {
        let Some(token) = credentials
            .password
            .filter(|p| p.len() <= MAX_TOKEN_LEN)
            .and_then(|p| std::str::from_utf8(p).ok())
        else {
            return Verdict::NotMine;
        };
        if token.split('.').count() != 3 || jsonwebtoken::decode_header(token).is_err() {
            return Verdict::NotMine;
        }
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) => {
                tracing::debug!(peer = %credentials.peer, error = %e, "JWT refused");
                return Verdict::Decided(AuthDecision::BadCredentials);
            }
        };
        if claims
            .mqtt_client_id
            .as_deref()
            .is_some_and(|id| id != credentials.client_id)
        {
            return Verdict::Decided(AuthDecision::NotAuthorized);
        }
        let client_type = match claims.mqtt_client_type.as_deref() {
            None => None,
            Some(t) => match ClientType::parse(t) {
                Some(t) => Some(t.kind()),
                None => return Verdict::Decided(AuthDecision::BadCredentials),
            },
        };
        let acl = AclRules {
            publish: claims.mqtt_publish,
            subscribe: claims.mqtt_subscribe,
        };
        if let Err(e) = acl.validate() {
            tracing::debug!(peer = %credentials.peer, error = %e, "JWT with invalid ACL claims");
            return Verdict::Decided(AuthDecision::BadCredentials);
        }
        Verdict::Decided(AuthDecision::Allow(Identity {
            username: claims.sub,
            client_type,
            acl,
            via: "jwt",
        }))
    }
}
