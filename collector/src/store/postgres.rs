//! Postbacks into the PostgreSQL inbox (`postback_inbox`,
//! `migrations/postgres/0001_inbox.sql`): one `INSERT ... SELECT FROM
//! UNNEST(...) ON CONFLICT (dedup_key) DO NOTHING` per write window, so the
//! window's rows commit together (one statement, one transaction) and a row
//! whose dedup key is already there, from an earlier window or earlier in
//! the same one, is skipped.
//!
//! The dedup key is computed here from the postback's own fields
//! (`Event::dedup_key`), never trusted from the wire. Money travels as
//! micro-units (`i64`) and becomes `numeric(18,6)` in SQL by an exact
//! division; times travel as Unix milliseconds.

use std::borrow::Cow;
use std::time::Duration;

use affgate_schema::{DedupKey, Postback};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Store, StoreError};
use crate::config::PostgresConfig;

/// Connections the collector keeps to PostgreSQL.
const MAX_CONNECTIONS: u32 = 8;
/// Longest wait for a free or new connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side limit on one statement, so a stuck insert fails (and retries)
/// instead of holding a window forever.
const STATEMENT_TIMEOUT: &str = "30s";

/// A pool for `cfg`, connected lazily: the first query connects, and a
/// server that is down shows up as [`StoreError::Retry`] there.
pub fn pool(cfg: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = cfg.url.parse()?;
    let options = options.application_name("affgate-collector").options([
        ("statement_timeout", STATEMENT_TIMEOUT),
        // Keep NOTICEs (`... already exists, skipping`) out of the log.
        ("client_min_messages", "warning"),
        // The admin API's JSON shows times in UTC; day arithmetic (caps) is UTC.
        ("TimeZone", "UTC"),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options))
}

/// Writes postbacks to `postback_inbox`.
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
}

const INSERT: &str = "\
INSERT INTO postback_inbox
    (dedup_key, edge_id, seq, network_id, click_id, txid, event, status,
     payout, currency, request_id, ts)
SELECT k, e, s, n, c, t, ev, st,
       p::numeric / 1000000, cur, r,
       'epoch'::timestamptz + ms * interval '1 millisecond'
FROM UNNEST($1::bytea[], $2::int4[], $3::int8[], $4::int8[], $5::text[],
            $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[],
            $11::text[], $12::int8[])
     AS u(k, e, s, n, c, t, ev, st, p, cur, r, ms)
ON CONFLICT (dedup_key) DO NOTHING";

impl Inbox {
    pub fn new(pool: PgPool) -> Inbox {
        Inbox { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Inserts `(edge_id, seq, postback)` rows, the edge id and ring
    /// sequence number being the batch entry's. Returns how many rows were
    /// new; the others were already in the inbox.
    pub async fn insert(&self, rows: &[(u16, u64, Postback)]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        let mut keys = Vec::with_capacity(n);
        let mut edges = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        let mut networks = Vec::with_capacity(n);
        let mut click_ids = Vec::with_capacity(n);
        let mut txids = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut payouts = Vec::with_capacity(n);
        let mut currencies = Vec::with_capacity(n);
        let mut request_ids = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        for (edge_id, seq, p) in rows {
            let key =
                DedupKey::for_postback(p.network_id, &p.click_id, &p.txid, &p.event, p.status);
            keys.push(key.0.to_vec());
            edges.push(i32::from(*edge_id));
            seqs.push(bigint("seq", *seq)?);
            networks.push(bigint("network_id", p.network_id)?);
            click_ids.push(text(&p.click_id));
            txids.push(text(&p.txid));
            events.push(text(&p.event));
            statuses.push(p.status.as_str());
            payouts.push(p.payout_micros);
            currencies.push(text(&p.currency));
            request_ids.push(text(&p.request_id));
            times.push(bigint("ts_ms", p.ts_ms)?);
        }
        let done = sqlx::query(INSERT)
            .bind(keys)
            .bind(edges)
            .bind(seqs)
            .bind(networks)
            .bind(click_ids)
            .bind(txids)
            .bind(events)
            .bind(statuses)
            .bind(payouts)
            .bind(currencies)
            .bind(request_ids)
            .bind(times)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }
}

impl Inbox {
    /// Notes quarantined clicks `(click_id, ts_ms)` in `quarantined_clicks`.
    pub async fn insert_quarantined(&self, clicks: &[(&str, u64)]) -> Result<(), StoreError> {
        if clicks.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = clicks.iter().map(|c| c.0).collect();
        let times = clicks
            .iter()
            .map(|c| bigint("ts_ms", c.1))
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO quarantined_clicks (click_id, ts)
             SELECT c, 'epoch'::timestamptz + ms * interval '1 millisecond'
             FROM UNNEST($1::text[], $2::int8[]) AS u(c, ms)
             ON CONFLICT (click_id) DO NOTHING",
        )
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }
}

fn bigint(field: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Reject {
        store: Store::Postgres,
        message: format!("{field} {v} does not fit a bigint"),
    })
}

/// PostgreSQL text cannot hold NUL; a network may send `%00`. The stored
/// text gets U+FFFD instead, while the dedup key keeps naming the original
/// bytes.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Sorts an sqlx error into retry or reject (see [`StoreError`]): SQLSTATE
/// classes 22 (data exception) and 23 (integrity constraint) and values
/// that would not encode are the rows' fault; everything else (connection,
/// timeouts, resources, a missing table) may pass later.
pub fn classify(e: sqlx::Error) -> StoreError {
    let reject = match &e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    };
    let message = e.to_string();
    if reject {
        StoreError::Reject {
            store: Store::Postgres,
            message,
        }
    } else {
        StoreError::Retry {
            store: Store::Postgres,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_events_dedup_key() {
        let p = Postback {
            ts_ms: 1,
            edge_id: 2,
            network_id: 3,
            click_id: "c".into(),
            txid: "t".into(),
            event: "conversion".into(),
            status: affgate_schema::Status::Reversed,
            payout_micros: None,
            currency: "USD".into(),
            request_id: "r".into(),
        };
        // insert() computes it without building an Event; they must agree.
        assert_eq!(
            DedupKey::for_postback(p.network_id, &p.click_id, &p.txid, &p.event, p.status),
            affgate_schema::Event::Postback(p).dedup_key()
        );
    }

    #[test]
    fn nul_is_replaced_and_other_text_borrowed() {
        assert!(matches!(text("abc"), Cow::Borrowed("abc")));
        assert_eq!(text("a\0b"), "a\u{fffd}b");
    }

    #[test]
    fn out_of_range_integers_are_rejected() {
        assert_eq!(bigint("seq", 5).unwrap(), 5);
        let err = bigint("seq", u64::MAX).unwrap_err();
        assert!(!err.is_retry());
        assert!(err.to_string().contains("seq"), "{err}");
    }

    #[test]
    fn io_and_pool_errors_retry() {
        assert!(classify(sqlx::Error::PoolTimedOut).is_retry());
        assert!(
            classify(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            )))
            .is_retry()
        );
    }
}
