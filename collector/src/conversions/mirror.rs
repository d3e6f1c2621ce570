//! The analysts' mirror: every recorded conversion event into ClickHouse's
//! `conversions` table (`migrations/clickhouse/0002_conversions.sql`).
//!
//! PostgreSQL is the outbox: `conversion_events.mirrored_at` is NULL until
//! the event's row is in ClickHouse. The loop reads a page of unmirrored
//! events in id order, inserts them in one `INSERT`, and only then marks
//! them. A crash between the two inserts the page again, which
//! ReplacingMergeTree collapses (the row is the same: `ts` is the event time
//! the inbox recorded at first receipt, never a redelivery's). ClickHouse
//! down: events wait, nothing is lost. Pages of fewer than `PAGE`
//! events go out at most once per `LINGER` (500 ms), so a steady trickle
//! of conversions becomes two inserts a second, not one per processed batch.
//!
//! The mirror's `status` is the status the postback asked for; the ledger's
//! verdict (`capped`, `quarantined`, a transition not applied) stays in
//! PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clickhouse::Client;
use sqlx::{PgPool, Row};
use tokio::sync::{Notify, watch};

use crate::config::ClickHouseConfig;
use crate::store::clickhouse::client;

/// Events per insert.
const PAGE: i64 = 5000;
const IDLE_POLL: Duration = Duration::from_secs(1);
/// At most one partial page per `LINGER`: events recorded meanwhile go
/// out in the next insert together, instead of one small insert (one
/// ClickHouse part to write and merge) per processed batch. Full pages
/// go back to back.
const LINGER: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One row of ClickHouse `conversions`, in the table's column order.
#[derive(Debug, clickhouse::Row, serde::Serialize)]
pub struct ConversionRow {
    pub dedup_key: [u8; 32],
    pub conversion_key: [u8; 32],
    pub click_id: String,
    pub ts: u32,
    pub ts_ms: u64,
    pub edge_id: u16,
    pub network_id: u64,
    pub txid: String,
    pub event: String,
    /// Enum8: approved 1, pending 2, rejected 3, reversed 4.
    pub status: i8,
    /// Nullable(Decimal(18, 6)): micro-units.
    pub payout: Option<i64>,
    pub currency: [u8; 3],
    pub request_id: String,
    pub link_id: u64,
    pub offer_id: u64,
    pub affiliate_id: u64,
    pub received_ms: u64,
}

fn status_code(s: &str) -> i8 {
    match s {
        "approved" => 1,
        "pending" => 2,
        "rejected" => 3,
        _ => 4,
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub mirrored: AtomicU64,
    pub inserts: AtomicU64,
    pub errors: AtomicU64,
}

/// Copies conversion events to ClickHouse.
pub struct Mirror {
    pool: PgPool,
    client: Client,
    linger: Duration,
    pub wake: Arc<Notify>,
    pub stats: MirrorStats,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").finish_non_exhaustive()
    }
}

impl Mirror {
    pub fn new(pool: PgPool, cfg: &ClickHouseConfig) -> Mirror {
        Mirror {
            pool,
            client: client(cfg, Some(&cfg.database)),
            linger: LINGER,
            wake: Arc::new(Notify::new()),
            stats: MirrorStats::default(),
        }
    }

    /// Wait `linger` (default 500 ms) after a partial page before the next.
    pub fn with_linger(mut self, linger: Duration) -> Mirror {
        self.linger = linger;
        self
    }

    /// Mirror one page; returns how many events it carried.
    pub async fn page(&self) -> anyhow::Result<usize> {
        let rows = sqlx::query(
            "SELECT e.id, e.dedup_key, c.conversion_key, c.click_id,
                    (extract(epoch FROM e.ts) * 1000)::int8 AS ts_ms, e.edge_id,
                    c.network_id, c.txid, c.event, e.status,
                    (e.payout * 1000000)::int8 AS payout_micros, e.currency::text AS currency,
                    e.request_id, c.link_id, c.offer_id, c.affiliate_id,
                    (extract(epoch FROM e.recorded_at) * 1000)::int8 AS received_ms
             FROM conversion_events e JOIN conversions c ON c.id = e.conversion_id
             WHERE e.mirrored_at IS NULL ORDER BY e.id LIMIT $1",
        )
        .bind(PAGE)
        .fetch_all(&self.pool)
        .await
        .context("read unmirrored events")?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut insert = self
            .client
            .insert::<ConversionRow>("conversions")
            .await
            .context("clickhouse insert")?;
        for r in &rows {
            ids.push(r.try_get::<i64, _>("id")?);
            let ts_ms = u64::try_from(r.try_get::<i64, _>("ts_ms")?).unwrap_or(0);
            let key32 = |name: &str| -> anyhow::Result<[u8; 32]> {
                let v: Vec<u8> = r.try_get(name)?;
                v.try_into()
                    .map_err(|_| anyhow::anyhow!("{name} is not 32 bytes"))
            };
            let currency: String = r.try_get("currency")?;
            let mut cur = [b' '; 3];
            for (d, s) in cur.iter_mut().zip(currency.bytes()) {
                *d = s;
            }
            let id = |name: &str| -> anyhow::Result<u64> {
                Ok(u64::try_from(r.try_get::<i64, _>(name)?).unwrap_or(0))
            };
            let row = ConversionRow {
                dedup_key: key32("dedup_key")?,
                conversion_key: key32("conversion_key")?,
                click_id: r.try_get("click_id")?,
                ts: u32::try_from(ts_ms / 1000).unwrap_or(u32::MAX),
                ts_ms,
                edge_id: u16::try_from(r.try_get::<i32, _>("edge_id")?).unwrap_or(0),
                network_id: id("network_id")?,
                txid: r.try_get("txid")?,
                event: r.try_get("event")?,
                status: status_code(&r.try_get::<String, _>("status")?),
                payout: r.try_get("payout_micros")?,
                currency: cur,
                request_id: r.try_get("request_id")?,
                link_id: id("link_id")?,
                offer_id: id("offer_id")?,
                affiliate_id: id("affiliate_id")?,
                received_ms: id("received_ms")?,
            };
            insert.write(&row).await.context("clickhouse insert")?;
        }
        insert.end().await.context("clickhouse insert")?;
        sqlx::query("UPDATE conversion_events SET mirrored_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await
            .context("mark mirrored")?;
        self.stats
            .mirrored
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.stats.inserts.fetch_add(1, Ordering::Relaxed);
        Ok(ids.len())
    }

    /// The background task: mirror whenever woken or once a second, but
    /// a partial page at most once per linger.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut last_partial: Option<Instant> = None;
        loop {
            if let Some(at) = last_partial {
                tokio::select! {
                    _ = tokio::time::sleep_until((at + self.linger).into()) => {}
                    _ = shutdown.changed() => return,
                }
            }
            let wait = loop {
                match self.page().await {
                    Ok(n) if n as i64 == PAGE => continue,
                    Ok(n) => {
                        backoff = Duration::from_millis(200);
                        last_partial = (n > 0).then(Instant::now);
                        break IDLE_POLL;
                    }
                    Err(e) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "conversion mirror to clickhouse failed; events wait in postgres"
                        );
                        let w = backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        break w;
                    }
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
