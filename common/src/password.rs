//! Password hashes: argon2id with the default parameters for everything ferrymq writes (the
//! broker's `credentials` commands and admin API, the operator's ApplicationClient rows), bcrypt
//! accepted for hashes imported from other brokers.
//!
//! Verifying is deliberately slow (tens of milliseconds): callers on an async runtime run it on
//! the blocking pool (the broker also bounds how many run at once). Parameters inside stored
//! hashes are bounded, so a bad record cannot make one check take minutes or gigabytes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Bounds on parameters found in stored hashes.
const MAX_ARGON2_MEMORY_KIB: u32 = 256 * 1024;
const MAX_ARGON2_TIME: u32 = 16;
const MAX_ARGON2_LANES: u32 = 16;
const MAX_BCRYPT_COST: u32 = 15;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("no randomness for the salt: {0}")]
    Randomness(String),
    #[error("{0}")]
    Argon2(String),
}

/// Why a stored hash is not one the broker verifies.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(String);

/// Hashes `password` with argon2id and the default parameters (m=19 MiB, t=2, p=1, the OWASP
/// recommendation), as a PHC string.
pub fn hash(password: &[u8]) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| HashError::Randomness(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Argon2(e.to_string()))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Argon2(e.to_string()))
}

/// Checks that `hash` is an argon2id or bcrypt hash the broker can verify within its bounds.
pub fn check_format(hash: &str) -> Result<(), FormatError> {
    if is_bcrypt(hash) {
        let parts: bcrypt::HashParts = hash
            .parse()
            .map_err(|e| FormatError(format!("not a valid bcrypt hash: {e}")))?;
        if parts.get_cost() > MAX_BCRYPT_COST {
            return Err(FormatError(format!("bcrypt cost above {MAX_BCRYPT_COST}")));
        }
        return Ok(());
    }
    let parsed = PasswordHash::new(hash)
        .map_err(|e| FormatError(format!("neither a bcrypt hash nor a PHC string: {e}")))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(FormatError(format!(
            "algorithm `{}` is not accepted (argon2id or bcrypt)",
            parsed.algorithm
        )));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| FormatError(e.to_string()))?;
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB
        || params.t_cost() > MAX_ARGON2_TIME
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(FormatError(format!(
            "argon2 parameters above the bounds (m <= {MAX_ARGON2_MEMORY_KIB}, t <= {MAX_ARGON2_TIME}, p <= {MAX_ARGON2_LANES})"
        )));
    }
    if parsed.hash.is_none() {
        return Err(FormatError("PHC string without a hash".into()));
    }
    Ok(())
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p))
}

/// Verifies synchronously (slow: see the module doc). Any malformed or out-of-bounds hash fails.
pub fn verify_blocking(password: &[u8], hash: &str) -> bool {
    if check_format(hash).is_err() {
        return false;
    }
    if is_bcrypt(hash) {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let h = hash(b"secret").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        check_format(&h).unwrap();
        assert!(verify_blocking(b"secret", &h));
        assert!(!verify_blocking(b"Secret", &h));
    }

    #[test]
    fn bcrypt_imports_verify() {
        let h = bcrypt::hash("imported", 4).unwrap();
        check_format(&h).unwrap();
        assert!(verify_blocking(b"imported", &h));
        assert!(!verify_blocking(b"other", &h));
    }

    #[test]
    fn bad_hashes_are_refused() {
        assert!(check_format("plain").is_err());
        assert!(check_format("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaA").is_err());
        assert!(check_format(
            "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
        )
        .is_err());
        assert!(!verify_blocking(b"x", "plain"));
    }
}
