//! Password hashes: argon2id for everything the broker writes, bcrypt accepted for imports.
//!
//! Verifying is deliberately slow (tens of milliseconds), so it runs on the blocking pool and at
//! most one check per CPU runs at a time: a burst of logins queues instead of starving the
//! runtime. Parameters inside stored hashes are bounded, so a bad record cannot make one check
//! take minutes or gigabytes.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

/// Bounds on parameters found in stored hashes.
const MAX_ARGON2_MEMORY_KIB: u32 = 256 * 1024;
const MAX_ARGON2_TIME: u32 = 16;
const MAX_ARGON2_LANES: u32 = 16;
const MAX_BCRYPT_COST: u32 = 15;

/// Hashes `password` with argon2id and the default parameters (m=19 MiB, t=2, p=1, the OWASP
/// recommendation), as a PHC string.
pub fn hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks that `hash` is an argon2id or bcrypt hash the broker can verify within its bounds.
pub fn check_format(hash: &str) -> Result<(), String> {
    if is_bcrypt(hash) {
        let parts: bcrypt::HashParts = hash
            .parse()
            .map_err(|e| format!("not a valid bcrypt hash: {e}"))?;
        if parts.get_cost() > MAX_BCRYPT_COST {
            return Err(format!("bcrypt cost above {MAX_BCRYPT_COST}"));
        }
        return Ok(());
    }
    let parsed = PasswordHash::new(hash)
        .map_err(|e| format!("neither a bcrypt hash nor a PHC string: {e}"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "algorithm `{}` is not accepted (argon2id or bcrypt)",
            parsed.algorithm
        ));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| e.to_string())?;
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB
        || params.t_cost() > MAX_ARGON2_TIME
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(format!(
            "argon2 parameters above the bounds (m <= {MAX_ARGON2_MEMORY_KIB}, t <= {MAX_ARGON2_TIME}, p <= {MAX_ARGON2_LANES})"
        ));
    }
    if parsed.hash.is_none() {
        return Err("PHC string without a hash".into());
    }
    Ok(())
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p))
}

/// Verifies synchronously. Any malformed or out-of-bounds hash fails.
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

/// Costs what verifying against a real argon2id hash costs, for unknown user names.
pub async fn verify_dummy(password: &[u8]) {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash(b"no such user").ok());
    if let Some(dummy) = dummy {
        let _ = verify(password, dummy).await;
    }
}

fn gate() -> &'static Semaphore {
    static GATE: OnceLock<Semaphore> = OnceLock::new();
    GATE.get_or_init(|| {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Semaphore::new(cpus)
    })
}

/// Verifies on the blocking pool, at most one check per CPU at a time.
pub async fn verify(password: &[u8], hash: &str) -> bool {
    let Ok(_permit) = gate().acquire().await else {
        return false;
    };
    let password = password.to_vec();
    let hash = hash.to_string();
    tokio::task::spawn_blocking(move || verify_blocking(&password, &hash))
        .await
        .unwrap_or(false)
}

/// Hashes on the blocking pool, sharing the one-per-CPU gate with verification (the admin API:
/// a hash costs as much as a check).
pub async fn hash_async(password: Vec<u8>) -> Result<String, String> {
    let _permit = gate()
        .acquire()
        .await
        .map_err(|_| "the hashing gate is closed".to_string())?;
    tokio::task::spawn_blocking(move || hash(&password))
        .await
        .map_err(|e| format!("hashing task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let h = hash(b"secret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
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
