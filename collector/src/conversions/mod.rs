//! Conversions: postbacks from the PostgreSQL inbox turned into
//! conversions, their events and commissions (the ledger), then mirrored to
//! ClickHouse.
//!
//! - `decide`: the pure core, first status and transitions.
//! - `split`: the pure commission split and its rounding rule.
//! - `mirror`: conversion events into ClickHouse's `conversions` table.
//!
//! This file is the PostgreSQL shell. Inbox rows are taken in batches of
//! up to [`CLAIM_BATCH`], oldest first, in one transaction (`FOR UPDATE
//! SKIP LOCKED`, so several collectors share the queue). First, for the
//! whole batch (`Processor::prefetch`): verify and decode the click ids,
//! and read which dedup keys are already events, the links with offer and
//! affiliate path, the quarantined clicks, and the conversions named by
//! exactly one row, locked. Then each row, in order: lock the conversion if
//! the prefetch did not, or create it (`conversion_key` is unique), decide,
//! write the event (`dedup_key` is unique), the
//! commissions (unique per conversion and level) and the cap count (its
//! row locked); then all the batch's rows are marked processed with their
//! outcomes and the transaction commits. A row that fails (the ledger
//! refuses its values, another collector raced it, a deadlock) rolls the
//! whole batch back, and those rows are taken again one per transaction,
//! so one bad row costs its batch a retry, never a wrong count. Nothing
//! here trusts luck: every double-count is excluded by a constraint or a
//! row lock inside the transaction that commits it.

pub mod decide;
pub mod mirror;
pub mod split;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use affgate_schema::keys::KeyRing;
use affgate_schema::{ClickId, ClickIdFields, DedupKey, Status, parse_micros};
use anyhow::Context;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::{Notify, watch};

use crate::propagate::Propagator;
use decide::{ConvStatus, NewConversion};

/// Longest idle wait between looks at the inbox when nobody wakes us.
const IDLE_POLL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Inbox rows taken per transaction. One commit (one WAL flush), one mark
/// statement, one set of reads and, for new conversions, three writes for
/// the batch instead of per row; the row locks (conversion, cap) are held
/// for the batch, tens of milliseconds. 256 records 1.3-1.6x the
/// conversions per second of 64 (BENCHMARKS.md); a row the ledger refuses
/// costs its batch a retry of each row alone.
pub const CLAIM_BATCH: i64 = 256;

/// Counters for `/metrics`, by outcome.
#[derive(Debug, Default)]
pub struct ConversionStats {
    pub recorded: AtomicU64,
    pub not_applied: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    /// Event time (ms) of the oldest inbox row the last claim took; 0 once
    /// a claim found the inbox drained. `/metrics` shows its age.
    pub oldest_claimed_ts_ms: AtomicU64,
}

/// What happened to one inbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new conversion, or a status change of one.
    Recorded,
    /// Recorded as an event, but the transition was not allowed.
    NotApplied,
    /// Not attributable; the inbox row keeps the reason.
    Refused(&'static str),
}

impl Outcome {
    fn as_str(&self) -> &str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::NotApplied => "not_applied",
            Outcome::Refused(why) => why,
        }
    }
}

/// Another transaction created the same conversion between our look and
/// our insert; the row is rolled back and taken again.
#[derive(Debug, thiserror::Error)]
#[error("conversion created concurrently")]
struct Raced;

/// What one batch came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// No unprocessed rows.
    Empty,
    /// This many rows processed and committed.
    Done(u64),
    /// A row failed and this many rows were rolled back, untouched.
    Failed(u64),
}

/// One claimed inbox row.
#[derive(Debug)]
struct InboxRow {
    dedup_key: Vec<u8>,
    edge_id: i32,
    seq: i64,
    network_id: i64,
    click_id: String,
    txid: String,
    event: String,
    status: Status,
    payout: Option<i64>,
    currency: String,
    request_id: String,
    ts_ms: i64,
    /// The UTC day of `ts` (`YYYY-MM-DD`): the cap's day.
    day: String,
}

/// Turns inbox rows into conversions.
#[derive(Debug)]
pub struct Processor {
    pool: PgPool,
    keys: KeyRing,
    propagator: Option<Arc<Propagator>>,
    /// Woken after each recorded event (the ClickHouse mirror).
    recorded: Option<Arc<Notify>>,
    pub wake: Arc<Notify>,
    pub stats: ConversionStats,
}

impl Processor {
    pub fn new(
        pool: PgPool,
        keys: KeyRing,
        propagator: Option<Arc<Propagator>>,
        recorded: Option<Arc<Notify>>,
    ) -> Processor {
        Processor {
            pool,
            keys,
            propagator,
            recorded,
            wake: Arc::new(Notify::new()),
            stats: ConversionStats::default(),
        }
    }

    /// Process until the inbox is empty; returns how many rows were done.
    pub async fn drain(&self) -> anyhow::Result<u64> {
        let mut n = 0;
        loop {
            match self.process_batch(CLAIM_BATCH).await? {
                Batch::Empty => return Ok(n),
                Batch::Done(k) => n += k,
                Batch::Failed(k) => {
                    // One row spoilt the batch: take those rows again one
                    // per transaction, where a bad row only marks itself.
                    for _ in 0..k {
                        if self.process_batch(1).await? == Batch::Empty {
                            break;
                        }
                        n += 1;
                    }
                }
            }
        }
    }

    /// Claim up to `limit` rows and process them in one transaction. A
    /// failing row fails a batch of several ([`Batch::Failed`], all rolled
    /// back); a row claimed alone is settled by [`Self::settle_failure`].
    async fn process_batch(&self, limit: i64) -> anyhow::Result<Batch> {
        let mut tx = self.pool.begin().await.context("begin")?;
        let rows = claim(&mut tx, limit).await?;
        // Claims are in `ts` order: the first row is the oldest waiting (a
        // time before 1970 reads as 1, since 0 means drained).
        let oldest = rows
            .first()
            .map_or(0, |r| u64::try_from(r.ts_ms).unwrap_or(1));
        self.stats
            .oldest_claimed_ts_ms
            .store(oldest, Ordering::Relaxed);
        if rows.is_empty() {
            tx.rollback().await.context("end empty claim")?;
            return Ok(Batch::Empty);
        }
        let pre = self.prefetch(&mut tx, &rows).await?;
        let done = match self.write_batch(&mut tx, &rows, &pre).await {
            Ok(done) => done,
            Err(e) => {
                // Roll back before anything else: a dropped transaction is
                // only rolled back when its connection is next used, and
                // until then its row locks make the retries' SKIP LOCKED
                // claims come back empty (and would block settle_failure's
                // mark).
                tx.rollback()
                    .await
                    .with_context(|| format!("roll back after: {e:#}"))?;
                if let [row] = &rows[..] {
                    return self.settle_failure(row, e).await.map(|()| Batch::Done(1));
                }
                tracing::debug!(
                    error = format!("{e:#}"),
                    rows = rows.len(),
                    "batch rolled back; its rows are taken one by one"
                );
                return Ok(Batch::Failed(rows.len() as u64));
            }
        };
        let keys: Vec<&[u8]> = rows.iter().map(|r| &r.dedup_key[..]).collect();
        let outcomes: Vec<&str> = done.iter().map(|(o, _)| o.as_str()).collect();
        mark_all(&mut tx, &keys, &outcomes).await?;
        tx.commit().await.context("commit conversions")?;
        for (row, (outcome, capped_offer)) in rows.iter().zip(done) {
            self.committed(row, outcome, capped_offer).await;
        }
        Ok(Batch::Done(rows.len() as u64))
    }

    /// Every row of the batch, in claim order, with its outcome and the
    /// offer it capped. New conversions without a cap are written together
    /// ([`write_new`]), each run of them before the next row that is taken
    /// alone, so the writes land in claim order as if made row by row.
    async fn write_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        rows: &[InboxRow],
        pre: &Prefetched,
    ) -> anyhow::Result<Vec<(Outcome, Option<i64>)>> {
        let mut done = Vec::with_capacity(rows.len());
        let mut run = Vec::new();
        for ((row, click), key) in rows.iter().zip(&pre.clicks).zip(&pre.keys) {
            if let Some(new) = plan_new(row, click.as_ref(), key, pre)? {
                run.push(new);
                done.push((Outcome::Recorded, None));
                continue;
            }
            write_new(tx, &run).await?;
            run.clear();
            done.push(self.process(tx, row, click.as_ref(), key, pre).await?);
        }
        write_new(tx, &run).await?;
        Ok(done)
    }

    /// What the batch's rows read before any of them writes, in four
    /// statements for the batch instead of four per row: which dedup keys
    /// are already events, the links (with offer and affiliate path) their
    /// verified click ids name, which of their clicks are quarantined, and
    /// the conversions they name, locked. A conversion key named by more
    /// than one row is left out of the lock, so those rows lock and read it
    /// one by one and each sees what the earlier rows wrote.
    ///
    /// These lookups are planned at every execution (`persistent(false)`):
    /// a prepared statement's cached plan is chosen while its tables are
    /// nearly empty, a sequential scan, and kept as they grow, until each
    /// batch scanned the whole ledger (seen on `conversions`, PostgreSQL 15).
    async fn prefetch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        rows: &[InboxRow],
    ) -> anyhow::Result<Prefetched> {
        let now = crate::ingest::now_ms();
        let clicks: Vec<Option<ClickIdFields>> = rows
            .iter()
            .map(|r| {
                ClickId::verify(&r.click_id, &self.keys, now)
                    .ok()
                    .map(|(_, f)| f)
            })
            .collect();

        let dedup_keys: Vec<&[u8]> = rows.iter().map(|r| &r.dedup_key[..]).collect();
        let seen = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT dedup_key FROM conversion_events WHERE dedup_key = ANY($1)",
        )
        .persistent(false)
        .bind(&dedup_keys)
        .fetch_all(&mut **tx)
        .await
        .context("duplicate check")?
        .into_iter()
        .collect();

        let mut link_ids: Vec<i64> = clicks.iter().flatten().map(link_id_of).collect();
        link_ids.sort_unstable();
        link_ids.dedup();
        let mut links = HashMap::with_capacity(link_ids.len());
        for l in sqlx::query(
            "SELECT l.id, l.offer_id, l.affiliate_id, l.status AS link_status,
                    o.network_id, o.payout::text AS payout, o.currency,
                    o.commission_levels::text[] AS levels, o.daily_cap,
                    o.attribution_window_days, a.path::text AS path
             FROM links l JOIN offers o ON o.id = l.offer_id
                          JOIN affiliates a ON a.id = l.affiliate_id
             WHERE l.id = ANY($1)",
        )
        .persistent(false)
        .bind(&link_ids)
        .fetch_all(&mut **tx)
        .await
        .context("load links")?
        {
            links.insert(l.try_get("id")?, LinkRow::from_row(&l)?);
        }

        let verified: Vec<&str> = rows
            .iter()
            .zip(&clicks)
            .filter(|(_, c)| c.is_some())
            .map(|(r, _)| r.click_id.as_str())
            .collect();
        let quarantined = sqlx::query_scalar::<_, String>(
            "SELECT click_id FROM quarantined_clicks WHERE click_id = ANY($1)",
        )
        .persistent(false)
        .bind(&verified)
        .fetch_all(&mut **tx)
        .await
        .context("quarantine check")?
        .into_iter()
        .collect();

        let keys: Vec<DedupKey> = rows.iter().map(conversion_key_of).collect();
        let mut named: HashMap<[u8; 32], usize> = HashMap::with_capacity(rows.len());
        for k in &keys {
            *named.entry(k.0).or_default() += 1;
        }
        // Sorted, so two collectors' batches take these locks in one order.
        let mut once: Vec<[u8; 32]> = named
            .into_iter()
            .filter_map(|(k, n)| (n == 1).then_some(k))
            .collect();
        once.sort_unstable();
        let once_refs: Vec<&[u8]> = once.iter().map(|k| &k[..]).collect();
        let mut conversions: HashMap<[u8; 32], Option<LockedConversion>> =
            once.iter().map(|k| (*k, None)).collect();
        for (key, c) in lock_conversions(tx, &once_refs).await? {
            conversions.insert(key, Some(c));
        }
        Ok(Prefetched {
            clicks,
            keys,
            seen,
            links,
            quarantined,
            conversions,
        })
    }

    /// The background task: drain whenever woken (after an inbox insert) or
    /// once a second; back off while PostgreSQL fails.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let wait = match self.drain().await {
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    IDLE_POLL
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "conversion processing failed; the inbox keeps the postbacks"
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// A row processed alone failed and its transaction was rolled back.
    /// Unusable values are marked `error` in a fresh transaction, so the
    /// row does not block the queue forever; a race leaves it for the next
    /// pass, which sees the other collector's work; anything else (the
    /// database itself) is returned for the caller's backoff.
    async fn settle_failure(&self, row: &InboxRow, e: anyhow::Error) -> anyhow::Result<()> {
        if is_data_error(&e) {
            tracing::error!(error = format!("{e:#}"), "postback refused by the ledger");
            let mut tx = self.pool.begin().await.context("begin")?;
            mark_all(&mut tx, &[&row.dedup_key[..]], &["error"]).await?;
            tx.commit().await.context("commit")?;
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else if e.is::<Raced>() {
            tracing::debug!("conversion created by another collector meanwhile; retrying the row");
            Ok(())
        } else {
            Err(e)
        }
    }

    /// After the row's transaction committed: count, log, wake the mirror,
    /// and propagate an offer that just reached its cap.
    async fn committed(&self, row: &InboxRow, outcome: Outcome, capped_offer: Option<i64>) {
        let counter = match outcome {
            Outcome::Recorded => &self.stats.recorded,
            Outcome::NotApplied => &self.stats.not_applied,
            Outcome::Refused(why) => {
                tracing::info!(
                    click_id = row.click_id,
                    network_id = row.network_id,
                    why,
                    "postback not attributable"
                );
                &self.stats.refused
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = &self.recorded {
            w.notify_one();
        }
        if let (Some(offer), Some(p)) = (capped_offer, &self.propagator) {
            tracing::info!(offer_id = offer, "offer reached its daily cap");
            p.offer(offer).await;
        }
    }

    /// One row that [`plan_new`] did not take, alone, inside the
    /// batch's transaction. Returns the outcome and the offer that just
    /// reached its cap, if any.
    async fn process(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        row: &InboxRow,
        click: Option<&ClickIdFields>,
        conversion_key: &DedupKey,
        pre: &Prefetched,
    ) -> anyhow::Result<(Outcome, Option<i64>)> {
        let (click, l) = match attribute(row, click, pre) {
            Ok(attributed) => attributed,
            Err(refused) => return Ok((refused, None)),
        };
        let offer_id = l.offer_id;
        let existing = match pre.conversions.get(&conversion_key.0) {
            Some(locked) => locked.clone(),
            // Not locked by the prefetch: this key has an earlier row in
            // the batch, whose writes this row must see.
            None => lock_conversions(tx, &[&conversion_key.0[..]])
                .await?
                .pop()
                .map(|(_, c)| c),
        };

        let Some(c) = existing else {
            let day = &row.day;
            let cap = match l.daily_cap {
                Some(cap) if decide::takes_cap_slot(row.status) => {
                    sqlx::query(
                        "INSERT INTO offer_daily (offer_id, day) VALUES ($1, $2::date)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(offer_id)
                    .bind(day)
                    .execute(&mut **tx)
                    .await
                    .context("cap row")?;
                    let taken: i32 = sqlx::query_scalar(
                        "SELECT conversions FROM offer_daily
                         WHERE offer_id = $1 AND day = $2::date FOR UPDATE",
                    )
                    .bind(offer_id)
                    .bind(day)
                    .fetch_one(&mut **tx)
                    .await
                    .context("lock cap row")?;
                    Some((i64::from(taken), i64::from(cap)))
                }
                _ => None,
            };
            let new = new_write(row, click, l, conversion_key, pre, cap)?;
            let status = new.status;
            write_new(tx, std::slice::from_ref(&new)).await?;
            let mut capped_offer = None;
            if let Some((taken, cap)) = cap
                && status != ConvStatus::Capped
            {
                sqlx::query(
                    "UPDATE offer_daily SET conversions = conversions + 1
                     WHERE offer_id = $1 AND day = $2::date",
                )
                .bind(offer_id)
                .bind(day)
                .execute(&mut **tx)
                .await
                .context("count cap")?;
                if taken + 1 >= cap {
                    let changed = sqlx::query(
                        "UPDATE offers SET capped_on = $2::date, version = version + 1
                         WHERE id = $1 AND (capped_on IS NULL OR capped_on < $2::date)
                           AND $2::date >= (now() AT TIME ZONE 'UTC')::date",
                    )
                    .bind(offer_id)
                    .bind(day)
                    .execute(&mut **tx)
                    .await
                    .context("cap offer")?;
                    if changed.rows_affected() > 0 {
                        capped_offer = Some(offer_id);
                    }
                }
            }
            return Ok((Outcome::Recorded, capped_offer));
        };

        // A postback for an existing conversion: a transition, or none.
        let (conversion_id, before) = (c.id, c.status);
        let after = decide::transition(before, row.status).unwrap_or(before);
        let applied = before != after;
        insert_events(
            tx,
            &[EventWrite {
                row,
                conversion_id,
                before: Some(before),
                after,
            }],
        )
        .await?;
        if !applied {
            return Ok((Outcome::NotApplied, None));
        }
        sqlx::query("UPDATE conversions SET status = $2, updated_at = now() WHERE id = $1")
            .bind(conversion_id)
            .bind(after.as_str())
            .execute(&mut **tx)
            .await
            .context("update conversion")?;
        if after.has_commissions() {
            // Amounts are (re)computed when the conversion is approved (the
            // approving postback may carry the final amount); other
            // transitions only move the status.
            if after == ConvStatus::Approved {
                // The approving postback's amount replaces the conversion's;
                // without one, the conversion keeps what it has.
                let (amount, currency) = match row.payout {
                    None => (c.payout, c.currency),
                    Some(_) => {
                        let (payout, currency) = amount_of(row, l)?;
                        sqlx::query(
                            "UPDATE conversions SET payout = $2::numeric / 1000000, currency = $3
                             WHERE id = $1",
                        )
                        .bind(conversion_id)
                        .bind(payout)
                        .bind(&currency)
                        .execute(&mut **tx)
                        .await
                        .context("update payout")?;
                        (payout, currency)
                    }
                };
                let shares = shares_of(l, amount)?;
                upsert_commissions(
                    tx,
                    &[CommissionWrite {
                        conversion_id,
                        shares: &shares,
                        currency: &currency,
                        status: after,
                    }],
                )
                .await?;
            } else {
                sqlx::query(
                    "UPDATE commissions SET status = $2, updated_at = now() WHERE conversion_id = $1",
                )
                .bind(conversion_id)
                .bind(after.as_str())
                .execute(&mut **tx)
                .await
                .context("update commissions")?;
            }
        }
        Ok((Outcome::Recorded, None))
    }
}

/// The checks every row passes before it can be attributed, in order: not
/// already an event, a click id that verifies, a known link, the offer's
/// network. Its click and link, or the refusal.
fn attribute<'c, 'p>(
    row: &InboxRow,
    click: Option<&'c ClickIdFields>,
    pre: &'p Prefetched,
) -> Result<(&'c ClickIdFields, &'p LinkRow), Outcome> {
    if pre.seen.contains(&row.dedup_key[..]) {
        return Err(Outcome::Refused("duplicate"));
    }
    let Some(click) = click else {
        return Err(Outcome::Refused("bad_click_id"));
    };
    let Some(l) = pre.links.get(&link_id_of(click)) else {
        return Err(Outcome::Refused("unknown_link"));
    };
    if l.network_id != row.network_id {
        return Err(Outcome::Refused("network_mismatch"));
    }
    Ok((click, l))
}

/// A row that makes a new conversion without touching a daily cap (the
/// common case), decided from the prefetch alone: its writes can wait and
/// be made with its neighbours' ([`write_new`]). None for every other row
/// (refused, an existing conversion, a key named again in the batch, a
/// capped offer's slot), which [`Processor::process`] takes alone.
fn plan_new<'a>(
    row: &'a InboxRow,
    click: Option<&ClickIdFields>,
    key: &'a DedupKey,
    pre: &Prefetched,
) -> anyhow::Result<Option<NewWrite<'a>>> {
    let Ok((click, l)) = attribute(row, click, pre) else {
        return Ok(None);
    };
    let capped = l.daily_cap.is_some() && decide::takes_cap_slot(row.status);
    // Some(None): named once in the batch and locked, with no conversion yet.
    if capped || !matches!(pre.conversions.get(&key.0), Some(None)) {
        return Ok(None);
    }
    new_write(row, click, l, key, pre, None).map(Some)
}

/// The network's amount, or the offer's payout in the offer's currency.
fn amount_of(row: &InboxRow, l: &LinkRow) -> anyhow::Result<(i64, String)> {
    Ok(match row.payout {
        Some(p) => (p, row.currency.clone()),
        None => (micros(&l.payout)?, l.currency.clone()),
    })
}

/// The commission split of `amount` over the link's affiliate and its
/// ancestors, at the offer's rates.
fn shares_of(l: &LinkRow, amount: i64) -> anyhow::Result<Vec<split::Share>> {
    let rates = l
        .levels
        .iter()
        .map(|r| micros(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = &l.path;
    let chain = split::beneficiaries(path)
        .with_context(|| format!("affiliate path {path} is not a chain of ids"))?;
    Ok(split::split(amount, &rates, &chain))
}

/// A new conversion decided: its first status, amount and commissions.
/// `cap` as for [`NewConversion::cap`].
fn new_write<'a>(
    row: &'a InboxRow,
    click: &ClickIdFields,
    l: &LinkRow,
    key: &'a DedupKey,
    pre: &Prefetched,
    cap: Option<(i64, i64)>,
) -> anyhow::Result<NewWrite<'a>> {
    let (payout, currency) = amount_of(row, l)?;
    let quarantined = l.link_status == "shadow_banned" || pre.quarantined.contains(&row.click_id);
    let status = decide::first_status(&NewConversion {
        status: row.status,
        quarantined,
        age_ms: row.ts_ms - click.ts_ms as i64,
        window_days: i64::from(l.attribution_window_days),
        cap,
    });
    let shares = if status.has_commissions() {
        shares_of(l, payout)?
    } else {
        Vec::new()
    };
    Ok(NewWrite {
        row,
        key,
        link_id: link_id_of(click),
        offer_id: l.offer_id,
        affiliate_id: l.affiliate_id,
        click_ts_ms: click.ts_ms as i64,
        status,
        payout,
        currency,
        shares,
    })
}

/// A new conversion to write: the conversion, its first event, its
/// commissions.
#[derive(Debug)]
struct NewWrite<'a> {
    row: &'a InboxRow,
    key: &'a DedupKey,
    link_id: i64,
    offer_id: i64,
    affiliate_id: i64,
    click_ts_ms: i64,
    status: ConvStatus,
    /// Micro-units of `currency`.
    payout: i64,
    currency: String,
    /// Empty unless the status earns commissions.
    shares: Vec<split::Share>,
}

/// A conversion event to write.
#[derive(Debug)]
struct EventWrite<'a> {
    row: &'a InboxRow,
    conversion_id: i64,
    before: Option<ConvStatus>,
    after: ConvStatus,
}

/// One conversion's commissions to write.
#[derive(Debug)]
struct CommissionWrite<'a> {
    conversion_id: i64,
    shares: &'a [split::Share],
    currency: &'a str,
    status: ConvStatus,
}

/// Write new conversions, in order, with their events and commissions: three
/// statements however many there are. A conversion or event that exists
/// already (another collector was faster) is [`Raced`].
async fn write_new(tx: &mut Transaction<'_, Postgres>, new: &[NewWrite<'_>]) -> anyhow::Result<()> {
    if new.is_empty() {
        return Ok(());
    }
    let ids: Vec<(Vec<u8>, i64)> = sqlx::query_as(
        "INSERT INTO conversions (conversion_key, click_id, network_id, txid, event,
            link_id, offer_id, affiliate_id, status, payout, currency, click_ts, converted_at)
         SELECT k, c, n, t, e, l, o, a, s, p::numeric / 1000000, cur,
            'epoch'::timestamptz + cts * interval '1 millisecond',
            'epoch'::timestamptz + ts * interval '1 millisecond'
         FROM UNNEST($1::bytea[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[],
                     $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::text[], $12::int8[],
                     $13::int8[]) WITH ORDINALITY
              AS u(k, c, n, t, e, l, o, a, s, p, cur, cts, ts, ord)
         ORDER BY ord
         ON CONFLICT (conversion_key) DO NOTHING RETURNING conversion_key, id",
    )
    .bind(column(new, |n| &n.key.0[..]))
    .bind(column(new, |n| n.row.click_id.as_str()))
    .bind(column(new, |n| n.row.network_id))
    .bind(column(new, |n| n.row.txid.as_str()))
    .bind(column(new, |n| n.row.event.as_str()))
    .bind(column(new, |n| n.link_id))
    .bind(column(new, |n| n.offer_id))
    .bind(column(new, |n| n.affiliate_id))
    .bind(column(new, |n| n.status.as_str()))
    .bind(column(new, |n| n.payout))
    .bind(column(new, |n| n.currency.as_str()))
    .bind(column(new, |n| n.click_ts_ms))
    .bind(column(new, |n| n.row.ts_ms))
    .fetch_all(&mut **tx)
    .await
    .context("insert conversions")?;
    if ids.len() != new.len() {
        // Another collector created some of them after our look: roll back
        // and take the rows again, now seeing those conversions.
        return Err(Raced.into());
    }
    let ids: HashMap<Vec<u8>, i64> = ids.into_iter().collect();
    let id_of = |n: &NewWrite<'_>| -> anyhow::Result<i64> {
        ids.get(&n.key.0[..])
            .copied()
            .context("a conversion the insert did not return")
    };
    let events = new
        .iter()
        .map(|n| {
            Ok(EventWrite {
                row: n.row,
                conversion_id: id_of(n)?,
                before: None,
                after: n.status,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    insert_events(tx, &events).await?;
    let commissions = new
        .iter()
        .zip(&events)
        .filter(|(n, _)| !n.shares.is_empty())
        .map(|(n, e)| CommissionWrite {
            conversion_id: e.conversion_id,
            shares: &n.shares,
            currency: &n.currency,
            status: n.status,
        })
        .collect::<Vec<_>>();
    upsert_commissions(tx, &commissions).await
}

/// Write conversion events, in order, in one statement. One that exists
/// already (recorded by another transaction since the duplicate check) is
/// [`Raced`]: everything is undone and the retry finds it a duplicate.
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[EventWrite<'_>],
) -> anyhow::Result<()> {
    let written = sqlx::query(
        "INSERT INTO conversion_events (dedup_key, conversion_id, status, payout, currency,
            status_before, status_after, applied, edge_id, seq, request_id, ts)
         SELECT k, c, s, p::numeric / 1000000, cur, b, a, b IS DISTINCT FROM a, e, q, r,
            'epoch'::timestamptz + ts * interval '1 millisecond'
         FROM UNNEST($1::bytea[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[],
                     $7::text[], $8::int4[], $9::int8[], $10::text[], $11::int8[]) WITH ORDINALITY
              AS u(k, c, s, p, cur, b, a, e, q, r, ts, ord)
         ORDER BY ord
         ON CONFLICT (dedup_key) DO NOTHING",
    )
    .bind(column(events, |e| &e.row.dedup_key[..]))
    .bind(column(events, |e| e.conversion_id))
    .bind(column(events, |e| e.row.status.as_str()))
    .bind(column(events, |e| e.row.payout))
    .bind(column(events, |e| e.row.currency.as_str()))
    .bind(column(events, |e| e.before.map(ConvStatus::as_str)))
    .bind(column(events, |e| e.after.as_str()))
    .bind(column(events, |e| e.row.edge_id))
    .bind(column(events, |e| e.row.seq))
    .bind(column(events, |e| e.row.request_id.as_str()))
    .bind(column(events, |e| e.row.ts_ms))
    .execute(&mut **tx)
    .await
    .context("insert conversion events")?;
    if written.rows_affected() != events.len() as u64 {
        return Err(Raced.into());
    }
    Ok(())
}

/// Write (or, on approval, rewrite) conversions' commissions, one row per
/// level, in one statement.
async fn upsert_commissions(
    tx: &mut Transaction<'_, Postgres>,
    writes: &[CommissionWrite<'_>],
) -> anyhow::Result<()> {
    let shares: Vec<(&CommissionWrite<'_>, &split::Share)> = writes
        .iter()
        .flat_map(|w| w.shares.iter().map(move |s| (w, s)))
        .collect();
    if shares.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO commissions (conversion_id, level, affiliate_id, rate, amount, currency, status)
         SELECT c, lv, af, r::numeric / 1000000, a::numeric / 1000000, cur, s
         FROM UNNEST($1::int8[], $2::int2[], $3::int8[], $4::int8[], $5::int8[], $6::text[],
                     $7::text[]) AS u(c, lv, af, r, a, cur, s)
         ON CONFLICT (conversion_id, level) DO UPDATE
            SET amount = EXCLUDED.amount, currency = EXCLUDED.currency,
                status = EXCLUDED.status, updated_at = now()",
    )
    .bind(column(&shares, |(w, _)| w.conversion_id))
    .bind(column(&shares, |(_, s)| s.level as i16))
    .bind(column(&shares, |(_, s)| s.affiliate_id))
    .bind(column(&shares, |(_, s)| s.rate))
    .bind(column(&shares, |(_, s)| s.amount))
    .bind(column(&shares, |(w, _)| w.currency))
    .bind(column(&shares, |(w, _)| w.status.as_str()))
    .execute(&mut **tx)
    .await
    .context("write commissions")?;
    Ok(())
}

/// What a batch read up front (`Processor::prefetch`).
#[derive(Debug)]
struct Prefetched {
    /// Per claimed row, in claim order: its click id's fields, if it verifies.
    clicks: Vec<Option<ClickIdFields>>,
    /// Per claimed row, in claim order: its conversion key.
    keys: Vec<DedupKey>,
    /// Dedup keys of the batch already recorded as conversion events.
    seen: HashSet<Vec<u8>>,
    /// By link id.
    links: HashMap<i64, LinkRow>,
    /// Click ids of the batch in `quarantined_clicks`.
    quarantined: HashSet<String>,
    /// Conversion keys named by exactly one row of the batch, locked: the
    /// conversion, or None where there is none yet. A key not in here is
    /// named by several rows and is locked and read per row.
    conversions: HashMap<[u8; 32], Option<LockedConversion>>,
}

/// A link with what conversion processing needs of its offer and affiliate.
#[derive(Debug)]
struct LinkRow {
    offer_id: i64,
    affiliate_id: i64,
    link_status: String,
    network_id: i64,
    /// numeric text.
    payout: String,
    currency: String,
    /// Commission rates per level, numeric text.
    levels: Vec<String>,
    daily_cap: Option<i32>,
    attribution_window_days: i32,
    /// The affiliate's `ltree` path as text.
    path: String,
}

impl LinkRow {
    fn from_row(l: &sqlx::postgres::PgRow) -> anyhow::Result<LinkRow> {
        Ok(LinkRow {
            offer_id: l.try_get("offer_id")?,
            affiliate_id: l.try_get("affiliate_id")?,
            link_status: l.try_get("link_status")?,
            network_id: l.try_get("network_id")?,
            payout: l.try_get("payout")?,
            currency: l.try_get("currency")?,
            levels: l.try_get("levels")?,
            daily_cap: l.try_get("daily_cap")?,
            attribution_window_days: l.try_get("attribution_window_days")?,
            path: l.try_get("path")?,
        })
    }
}

/// A conversion as locked (`FOR UPDATE`) before a postback changes it.
#[derive(Debug, Clone)]
struct LockedConversion {
    id: i64,
    status: ConvStatus,
    /// Micro-units.
    payout: i64,
    currency: String,
}

impl LockedConversion {
    fn from_row(c: &sqlx::postgres::PgRow) -> anyhow::Result<LockedConversion> {
        Ok(LockedConversion {
            id: c.try_get("id")?,
            status: conv_status(&c.try_get::<String, _>("status")?)?,
            payout: micros(&c.try_get::<String, _>("payout")?)?,
            currency: c.try_get("currency")?,
        })
    }
}

/// Lock and read the conversions of these keys (in key order, so two
/// collectors take the locks in one order), with their keys; a key with no
/// conversion yet is simply absent.
async fn lock_conversions(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&[u8]],
) -> anyhow::Result<Vec<([u8; 32], LockedConversion)>> {
    sqlx::query(
        "SELECT conversion_key, id, status, payout::text AS payout, currency::text AS currency
         FROM conversions WHERE conversion_key = ANY($1)
         ORDER BY conversion_key FOR UPDATE",
    )
    .persistent(false)
    .bind(keys)
    .fetch_all(&mut **tx)
    .await
    .context("lock conversions")?
    .iter()
    .map(|c| {
        let key: Vec<u8> = c.try_get("conversion_key")?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|k: Vec<u8>| anyhow::anyhow!("conversion key of {} bytes", k.len()))?;
        Ok((key, LockedConversion::from_row(c)?))
    })
    .collect()
}

fn conversion_key_of(row: &InboxRow) -> DedupKey {
    DedupKey::for_conversion(row.network_id as u64, &row.click_id, &row.txid, &row.event)
}

/// A click id's link as PostgreSQL's `bigint` (link ids are 40 bits).
fn link_id_of(click: &ClickIdFields) -> i64 {
    i64::try_from(click.link_id).unwrap_or(i64::MAX)
}

/// Lock up to `limit` of the oldest unprocessed inbox rows, skipping rows
/// another collector holds; oldest first.
async fn claim(tx: &mut Transaction<'_, Postgres>, limit: i64) -> anyhow::Result<Vec<InboxRow>> {
    let rows = sqlx::query(
        "SELECT dedup_key, edge_id, seq, network_id, click_id, txid, event, status,
                payout::text AS payout, currency::text AS currency, request_id,
                (extract(epoch FROM ts) * 1000)::int8 AS ts_ms,
                (ts AT TIME ZONE 'UTC')::date::text AS day
         FROM postback_inbox WHERE processed_at IS NULL
         ORDER BY ts LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
    .context("claim inbox rows")?;
    rows.iter().map(inbox_row).collect()
}

fn inbox_row(r: &sqlx::postgres::PgRow) -> anyhow::Result<InboxRow> {
    let status: String = r.try_get("status")?;
    let payout: Option<String> = r.try_get("payout")?;
    Ok(InboxRow {
        dedup_key: r.try_get("dedup_key")?,
        edge_id: r.try_get("edge_id")?,
        seq: r.try_get("seq")?,
        network_id: r.try_get("network_id")?,
        click_id: r.try_get("click_id")?,
        txid: r.try_get("txid")?,
        event: r.try_get("event")?,
        status: Status::parse(&status).with_context(|| format!("inbox status {status}"))?,
        payout: payout.as_deref().map(micros).transpose()?,
        currency: r.try_get("currency")?,
        request_id: r.try_get("request_id")?,
        ts_ms: r.try_get("ts_ms")?,
        day: r.try_get("day")?,
    })
}

/// Mark inbox rows processed, each with its outcome, in one statement.
async fn mark_all(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&[u8]],
    outcomes: &[&str],
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE postback_inbox p SET processed_at = now(), outcome = u.outcome
         FROM UNNEST($1::bytea[], $2::text[]) AS u(dedup_key, outcome)
         WHERE p.dedup_key = u.dedup_key",
    )
    .bind(keys)
    .bind(outcomes)
    .execute(&mut **tx)
    .await
    .context("mark inbox rows")?;
    Ok(())
}

/// One field of every item, as an array to bind for `UNNEST`.
fn column<'a, T, U>(items: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
    items.iter().map(field).collect()
}

/// numeric text (`12.500000`) to micro-units.
fn micros(s: &str) -> anyhow::Result<i64> {
    parse_micros(s).with_context(|| format!("amount {s}"))
}

fn conv_status(s: &str) -> anyhow::Result<ConvStatus> {
    ConvStatus::parse(s).with_context(|| format!("conversion status {s}"))
}

/// A row-level refusal (data exception, constraint): retrying cannot help.
fn is_data_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>().is_some_and(|e| match e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        })
    }) || e
        .chain()
        .any(|c| c.downcast_ref::<affgate_schema::DecimalError>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_text_is_read_exactly() {
        assert_eq!(micros("12.500000").unwrap(), 12_500_000);
        assert_eq!(micros("0.000001").unwrap(), 1);
        assert!(micros("-1").is_err());
    }
}
