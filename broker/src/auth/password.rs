//! Password hashes: argon2id for everything the broker writes, bcrypt accepted for imports. The
//! format rules (parameters, bounds, hash and verify) live in `ferrymq_common::password`, shared
//! with the operator; this module adds how the broker runs them.
//!
//! Verifying is deliberately slow (tens of milliseconds), so it runs on the blocking pool and at
//! most one check per CPU runs at a time: a burst of logins queues instead of starving the
//! runtime.

use std::sync::OnceLock;

use tokio::sync::Semaphore;

/// The hash format rules, shared with the operator (which writes ApplicationClient hashes).
pub use ferrymq_common::password::{check_format, hash, verify_blocking, FormatError, HashError};

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
    tokio::task::spawn_blocking(move || hash(&password).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("hashing task failed: {e}"))?
}
