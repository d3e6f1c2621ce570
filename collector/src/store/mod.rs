//! Writers for the two stores a write window commits to: clicks to
//! ClickHouse ([`clickhouse::ClickStore`]), postbacks to the PostgreSQL
//! inbox ([`postgres::Inbox`]).
//!
//! Both are idempotent, so a window that is written again after a failure
//! (or a batch an edge sent twice) changes nothing: ClickHouse collapses
//! copies of a click id (`ReplacingMergeTree`, exact-set rollups),
//! PostgreSQL keeps the first row per dedup key (`ON CONFLICT DO NOTHING`).
//! What a caller does with a failure is the error's variant: see
//! [`StoreError`].

pub mod clickhouse;
pub mod postgres;

use std::fmt;

/// Which store an error came from (a closed set, usable as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    ClickHouse,
    Postgres,
}

impl Store {
    pub fn as_str(self) -> &'static str {
        match self {
            Store::ClickHouse => "clickhouse",
            Store::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed write, shaped by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store was unreachable, timed out, or failed on its side (also:
    /// a missing table or refused login, which an operator fixes). Nothing
    /// is known to be committed; the same rows may succeed later, so leave
    /// them unacknowledged and let the edges resend.
    #[error("{store} write failed, retry: {message}")]
    Retry { store: Store, message: String },
    /// The store refused these rows as data (a value out of range, a
    /// violated constraint): sending them again fails the same way.
    #[error("{store} refused the rows: {message}")]
    Reject { store: Store, message: String },
}

impl StoreError {
    pub fn is_retry(&self) -> bool {
        matches!(self, StoreError::Retry { .. })
    }

    pub fn store(&self) -> Store {
        match self {
            StoreError::Retry { store, .. } | StoreError::Reject { store, .. } => *store,
        }
    }
}
