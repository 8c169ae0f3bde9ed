//! The PostgreSQL schema of the `kafka+postgres` backend (`common/migrations/postgres/`),
//! embedded at build time. The broker applies all of them at start; the operator applies those
//! up to the credential table before the broker's first start, with the same sqlx bookkeeping,
//! so the broker finds them applied.

use sqlx::migrate::Migrator;

/// Every migration, in version order.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_from_one() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert!(!versions.is_empty());
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, expected);
    }
}
