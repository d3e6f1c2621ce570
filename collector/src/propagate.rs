//! Propagation: the control plane's state from PostgreSQL into Redis, in
//! DESIGN.md's layout, announced on `affgate:changes`. Only this module
//! writes those keys; edges only read them.
//!
//! ```text
//! affgate:link:{slug}    hash  link_id destination status redirect_code offer_id
//!                              affiliate_id network_id fallback_url (the offer's) version
//! affgate:offer:{id}     hash  status (active|capped|paused) fallback_url version
//! affgate:token:{hash}   string network id (hash: keyed blake3 of the token, hex)
//! affgate:changes        pub/sub "link:{slug}" | "offer:{id}" | "token:{hash}"
//! affgate:control:synced string  time (Unix ms) of the last full publication
//! ```
//!
//! Invariants:
//! - PostgreSQL first: a key is written from a row that committed, and every
//!   row change bumps the row's `version`.
//! - A write and its announcement are one Lua script: a hash is replaced and
//!   announced only if Redis holds no newer version of it, so two collectors
//!   (or a full publication racing an API change) never move a key
//!   backwards, and rewriting what is already there announces nothing.
//! - Any failure marks the state dirty; the background task then publishes
//!   everything again (once a second until it succeeds). It also does so at
//!   start and whenever `affgate:control:synced` is missing (Redis was
//!   flushed or replaced), so edges catch up after any Redis outage.
//! - Capped offers reopen at the next UTC midnight: the task clears
//!   `offers.capped_on` of earlier days (bumping the version) and publishes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use affgate_schema::keys::{Keys, token_hash};
use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

pub use affgate_schema::link::{CHANNEL, LINK_PREFIX, OFFER_PREFIX, TOKEN_PREFIX};
pub const SYNCED_KEY: &str = "affgate:control:synced";

/// Longest wait for one Redis command on the API's path; beyond it the
/// change is left to the background catch-up.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for one pipeline of a full publication.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the background task checks Redis and the day.
const TICK: Duration = Duration::from_secs(1);
/// Rows per page and commands per pipeline in a full publication.
const PAGE: i64 = 2000;

/// KEYS[1] = hash key; ARGV[1] = version, ARGV[2] = change message,
/// ARGV[3..] = field, value, ... Returns 1 if written and announced.
const PUT_HASH: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if v and tonumber(v) and tonumber(v) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PUBLISH', 'affgate:changes', ARGV[2])
return 1
";

/// KEYS[1] = token key; ARGV[1] = network id, ARGV[2] = change message.
const PUT_STRING: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', 'affgate:changes', ARGV[2])
return 1
";

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PropagateStats {
    pub writes: AtomicU64,
    pub failures: AtomicU64,
    pub full_syncs: AtomicU64,
    pub up: AtomicBool,
}

/// Writes and announces control-plane changes; see the module doc.
#[derive(Debug)]
pub struct Propagator {
    client: redis::Client,
    pool: PgPool,
    keys: Keys,
    conn: Mutex<Option<MultiplexedConnection>>,
    dirty: AtomicBool,
    pub stats: PropagateStats,
}

/// One Redis write: the key, the script, its arguments.
struct Put {
    key: String,
    script: &'static str,
    args: Vec<String>,
}

impl Propagator {
    pub fn new(url: &str, pool: PgPool, keys: Keys) -> anyhow::Result<Propagator> {
        let client = redis::Client::open(url).with_context(|| format!("[redis] url {url}"))?;
        Ok(Propagator {
            client,
            pool,
            keys,
            conn: Mutex::new(None),
            // Start dirty: the first tick publishes everything.
            dirty: AtomicBool::new(true),
            stats: PropagateStats::default(),
        })
    }

    /// Publish one link (after its row committed). Never fails: a Redis
    /// problem leaves the state dirty for the background task.
    pub async fn link(&self, id: i64) {
        self.publish_one(
            "link",
            &format!("{LINK_SELECT} WHERE l.id = $1"),
            id,
            link_put,
        )
        .await;
    }

    /// Publish every link of an offer (after their rows committed).
    pub async fn offer_links(&self, offer_id: i64) {
        self.publish_one(
            "offer links",
            &format!("{LINK_SELECT} WHERE l.offer_id = $1"),
            offer_id,
            link_put,
        )
        .await;
    }

    /// Publish one offer's status (after its row committed).
    pub async fn offer(&self, id: i64) {
        self.publish_one(
            "offer",
            &format!("{OFFER_SELECT} WHERE id = $1"),
            id,
            offer_put,
        )
        .await;
    }

    /// Publish one network's token (after its row committed).
    pub async fn network(&self, id: i64) {
        self.publish_one("network", NETWORK_SELECT_ONE, id, |r| {
            token_put(&self.keys, r)
        })
        .await;
    }

    /// Read the rows `sql` selects for `id` and write them in one
    /// pipeline; no row publishes nothing.
    async fn publish_one(
        &self,
        what: &str,
        sql: &str,
        id: i64,
        put: impl Fn(&sqlx::postgres::PgRow) -> anyhow::Result<Put>,
    ) {
        let r = async {
            let rows = sqlx::query(sql).bind(id).fetch_all(&self.pool).await?;
            let puts = rows.iter().map(&put).collect::<anyhow::Result<Vec<_>>>()?;
            self.apply(puts, COMMAND_TIMEOUT).await
        }
        .await;
        self.outcome(what, r);
    }

    fn outcome(&self, what: &str, r: anyhow::Result<()>) {
        if let Err(e) = r {
            self.dirty.store(true, Ordering::Relaxed);
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                what,
                error = format!("{e:#}"),
                "propagation failed; will publish everything again once redis answers"
            );
        }
    }

    async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        if let Some(c) = self.conn.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(None);
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("connect to redis")?;
        if let Ok(mut slot) = self.conn.lock() {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    fn forget_connection(&self) {
        if let Ok(mut slot) = self.conn.lock() {
            *slot = None;
        }
    }

    /// Run `puts` in one pipeline (EVAL; the scripts are short), counting
    /// the keys written.
    async fn apply(&self, puts: Vec<Put>, timeout: Duration) -> anyhow::Result<()> {
        if puts.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for p in &puts {
            pipe.cmd("EVAL")
                .arg(p.script)
                .arg(1)
                .arg(&p.key)
                .arg(&p.args);
        }
        let r: Result<Result<Vec<i64>, _>, _> =
            tokio::time::timeout(timeout, pipe.query_async(&mut conn)).await;
        let written = match r {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                self.forget_connection();
                return Err(e).context("redis write");
            }
            Err(_) => {
                self.forget_connection();
                bail!("redis did not answer within {timeout:?}");
            }
        };
        let n = written.iter().filter(|w| **w == 1).count() as u64;
        self.stats.writes.fetch_add(n, Ordering::Relaxed);
        self.stats.up.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Write every network, offer and link (only changed ones are
    /// announced), then the `synced` marker.
    pub async fn publish_all(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let networks = sqlx::query(NETWORK_SELECT_ALL)
            .fetch_all(&self.pool)
            .await
            .context("read networks")?;
        let puts = networks
            .iter()
            .map(|r| token_put(&self.keys, r))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.apply(puts, SYNC_TIMEOUT).await?;
        let offers = sqlx::query(&format!("{OFFER_SELECT} ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .context("read offers")?;
        let puts = offers
            .iter()
            .map(offer_put)
            .collect::<anyhow::Result<_>>()?;
        self.apply(puts, SYNC_TIMEOUT).await?;
        let mut after = 0i64;
        let mut links = 0usize;
        loop {
            let rows = sqlx::query(&format!(
                "{LINK_SELECT} WHERE l.id > $1 ORDER BY l.id LIMIT $2"
            ))
            .bind(after)
            .bind(PAGE)
            .fetch_all(&self.pool)
            .await
            .context("read links")?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("id")?;
            links += rows.len();
            let puts = rows.iter().map(link_put).collect::<anyhow::Result<_>>()?;
            self.apply(puts, SYNC_TIMEOUT).await?;
        }
        let mut conn = self.connection().await?;
        let now = crate::ingest::now_ms();
        let set: Result<Result<(), _>, _> = tokio::time::timeout(
            COMMAND_TIMEOUT,
            redis::cmd("SET")
                .arg(SYNCED_KEY)
                .arg(now)
                .query_async(&mut conn),
        )
        .await;
        match set {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e).context("set synced marker"),
            Err(_) => bail!("redis did not answer within {COMMAND_TIMEOUT:?}"),
        }
        self.stats.full_syncs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            networks = networks.len(),
            offers = offers.len(),
            links,
            ms = started.elapsed().as_millis() as u64,
            "control plane published to redis"
        );
        Ok(())
    }

    /// Whether Redis still holds the marker of a full publication.
    async fn synced(&self) -> anyhow::Result<bool> {
        let mut conn = self.connection().await?;
        let r: Result<Result<bool, _>, _> = tokio::time::timeout(
            COMMAND_TIMEOUT,
            redis::cmd("EXISTS").arg(SYNCED_KEY).query_async(&mut conn),
        )
        .await;
        match r {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                self.forget_connection();
                Err(e).context("check synced marker")
            }
            Err(_) => {
                self.forget_connection();
                bail!("redis did not answer within {COMMAND_TIMEOUT:?}")
            }
        }
    }

    /// Reopen offers capped on an earlier UTC day; returns their ids.
    async fn reopen_capped(&self) -> anyhow::Result<Vec<i64>> {
        let rows = sqlx::query(
            "UPDATE offers SET capped_on = NULL, version = version + 1
             WHERE capped_on < (now() AT TIME ZONE 'UTC')::date RETURNING id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reopen capped offers")?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>("id").context("offer id"))
            .collect()
    }

    /// The background task: full publication at start, after any failure
    /// and when Redis lost the marker; capped offers reopened each new day.
    pub async fn run(self: std::sync::Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.reopen_capped().await {
                Ok(ids) => {
                    for id in ids {
                        tracing::info!(offer_id = id, "offer reopened for the new day");
                        self.offer(id).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "could not reopen capped offers")
                }
            }
            let need = self.dirty.load(Ordering::Relaxed)
                || match self.synced().await {
                    Ok(synced) => !synced,
                    Err(_) => true,
                };
            if need {
                // Cleared before reading, so a failure during the publication
                // (or a change racing it) sets it again.
                self.dirty.store(false, Ordering::Relaxed);
                if let Err(e) = self.publish_all().await {
                    self.dirty.store(true, Ordering::Relaxed);
                    self.stats.up.store(false, Ordering::Relaxed);
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "full publication to redis failed; retrying"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

const NETWORK_SELECT_ONE: &str = "SELECT id, postback_token FROM networks WHERE id = $1";
const NETWORK_SELECT_ALL: &str = "SELECT id, postback_token FROM networks ORDER BY id";

/// Links with what the edge needs from their offer.
/// A link's `fallback_url` is its offer's (links have none of their own):
/// changing an offer's fallback bumps its links' versions.
const LINK_SELECT: &str = "SELECT l.id, l.slug, l.destination, l.status, l.redirect_code,
        l.offer_id, l.affiliate_id, o.network_id, o.fallback_url, l.version
    FROM links l JOIN offers o ON o.id = l.offer_id";

/// Offers with their status as edges see it.
const OFFER_SELECT: &str = "SELECT id, fallback_url, version,
        CASE WHEN status = 'paused' THEN 'paused'
             WHEN capped_on >= (now() AT TIME ZONE 'UTC')::date THEN 'capped'
             ELSE 'active' END AS edge_status
    FROM offers";

fn link_put(row: &sqlx::postgres::PgRow) -> anyhow::Result<Put> {
    let slug: String = row.try_get("slug")?;
    let version: i64 = row.try_get("version")?;
    let fields: [(&str, String); 8] = [
        ("link_id", row.try_get::<i64, _>("id")?.to_string()),
        ("destination", row.try_get("destination")?),
        ("status", row.try_get("status")?),
        (
            "redirect_code",
            row.try_get::<i16, _>("redirect_code")?.to_string(),
        ),
        ("offer_id", row.try_get::<i64, _>("offer_id")?.to_string()),
        (
            "affiliate_id",
            row.try_get::<i64, _>("affiliate_id")?.to_string(),
        ),
        (
            "network_id",
            row.try_get::<i64, _>("network_id")?.to_string(),
        ),
        ("version", version.to_string()),
    ];
    let mut args = vec![version.to_string(), format!("link:{slug}")];
    for (k, v) in fields {
        args.push(k.to_string());
        args.push(v);
    }
    if let Some(f) = row.try_get::<Option<String>, _>("fallback_url")? {
        args.push("fallback_url".into());
        args.push(f);
    }
    Ok(Put {
        key: format!("{LINK_PREFIX}{slug}"),
        script: PUT_HASH,
        args,
    })
}

fn offer_put(row: &sqlx::postgres::PgRow) -> anyhow::Result<Put> {
    let id: i64 = row.try_get("id")?;
    let version: i64 = row.try_get("version")?;
    let fallback: Option<String> = row.try_get("fallback_url")?;
    let mut args = vec![
        version.to_string(),
        format!("offer:{id}"),
        "status".into(),
        row.try_get("edge_status")?,
        "version".into(),
        version.to_string(),
    ];
    if let Some(f) = fallback {
        args.push("fallback_url".into());
        args.push(f);
    }
    Ok(Put {
        key: format!("{OFFER_PREFIX}{id}"),
        script: PUT_HASH,
        args,
    })
}

fn token_put(keys: &Keys, row: &sqlx::postgres::PgRow) -> anyhow::Result<Put> {
    let id: i64 = row.try_get("id")?;
    let token: String = row.try_get("postback_token")?;
    let hash = token_hash(keys, &token);
    Ok(Put {
        key: format!("{TOKEN_PREFIX}{hash}"),
        script: PUT_STRING,
        args: vec![id.to_string(), format!("token:{hash}")],
    })
}
