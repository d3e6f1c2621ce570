//! Links from Redis, in DESIGN.md's layout, written by the collector's
//! control plane and only read here:
//!
//! ```text
//! affgate:link:{slug}   hash  link_id destination status redirect_code offer_id
//!                             affiliate_id network_id fallback_url version
//! affgate:offer:{id}    hash  status (active|capped|paused) fallback_url
//! affgate:token:{hash}  string network id; hash = hex keyed blake3 of the token
//! affgate:changes       pub/sub: "link:{slug}" | "offer:{id}" | "token:{hash}"
//! ```
//!
//! One background task owns the subscription: it subscribes first, then
//! loads every key (so no change can fall between load and subscribe),
//! then applies changes one key at a time. When the connection drops it
//! reconnects with backoff and loads everything again. The hot path never
//! waits on this task; only a cache miss issues one GET, bounded by
//! `miss_timeout`, on a shared multiplexed connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use affgate_schema::click_id::MAX_LINK_ID;
use anyhow::{Context, bail};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, watch};

use super::{
    FullLoad, Link, LinkCache, LinkStatus, Offer, OfferStatus, Template, valid_redirect_code,
    valid_url,
};

pub use affgate_schema::link::{CHANNEL, LINK_PREFIX, OFFER_PREFIX, TOKEN_PREFIX};

/// Longest wait for any command of the background task before the
/// connection is taken for dead and rebuilt.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What a miss lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Now in the cache.
    Found,
    /// Redis answered: no such link.
    NotFound,
    /// Redis down, slow or returned garbage: serve the fallback.
    Unreachable,
}

#[derive(Debug)]
pub struct RedisLinks {
    client: redis::Client,
    cache: Arc<LinkCache>,
    miss_timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    errors: AtomicU64,
    miss_found: AtomicU64,
    miss_not_found: AtomicU64,
    miss_unreachable: AtomicU64,
    reload: Notify,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RedisCounts {
    pub up: bool,
    pub errors: u64,
    pub miss_found: u64,
    pub miss_not_found: u64,
    pub miss_unreachable: u64,
}

impl RedisLinks {
    pub fn new(
        url: &str,
        cache: Arc<LinkCache>,
        miss_timeout: Duration,
    ) -> anyhow::Result<Arc<RedisLinks>> {
        let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
        Ok(Arc::new(RedisLinks {
            client,
            cache,
            miss_timeout,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            miss_found: AtomicU64::new(0),
            miss_not_found: AtomicU64::new(0),
            miss_unreachable: AtomicU64::new(0),
            reload: Notify::new(),
        }))
    }

    pub fn counts(&self) -> RedisCounts {
        RedisCounts {
            up: self.up.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            miss_found: self.miss_found.load(Ordering::Relaxed),
            miss_not_found: self.miss_not_found.load(Ordering::Relaxed),
            miss_unreachable: self.miss_unreachable.load(Ordering::Relaxed),
        }
    }

    /// Ask the background task for a full re-read (SIGHUP).
    pub fn request_reload(&self) {
        self.reload.notify_one();
    }

    fn shared_conn(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    fn set_conn(&self, conn: Option<MultiplexedConnection>) {
        if let Ok(mut c) = self.conn.lock() {
            *c = conn;
        }
    }

    /// One bounded GET for a slug the cache does not hold.
    pub async fn lookup_miss(&self, slug: &str) -> Miss {
        let outcome = self.lookup_miss_inner(slug).await;
        let counter = match outcome {
            Miss::Found => &self.miss_found,
            Miss::NotFound => &self.miss_not_found,
            Miss::Unreachable => &self.miss_unreachable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    async fn lookup_miss_inner(&self, slug: &str) -> Miss {
        let Some(mut conn) = self.shared_conn() else {
            return Miss::Unreachable;
        };
        let key = format!("{LINK_PREFIX}{slug}");
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&key);
        let fut = cmd.query_async::<HashMap<String, String>>(&mut conn);
        match tokio::time::timeout(self.miss_timeout, fut).await {
            Ok(Ok(fields)) if fields.is_empty() => Miss::NotFound,
            Ok(Ok(fields)) => match parse_link(&fields) {
                Ok(link) => {
                    self.cache.upsert_link(slug.into(), link);
                    Miss::Found
                }
                Err(reason) => {
                    tracing::warn!(key, reason, "unusable link hash in redis");
                    Miss::Unreachable
                }
            },
            Ok(Err(e)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "redis miss lookup failed");
                Miss::Unreachable
            }
            Err(_elapsed) => Miss::Unreachable,
        }
    }

    /// The background task: subscribe, load, follow changes; reconnect on failure.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.session(&mut shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    // A session that got as far as a full load resets the backoff:
                    // the next drop after a long outage reconnects at once again.
                    if self.up.swap(false, Ordering::Relaxed) {
                        backoff = BACKOFF_MIN;
                    } else {
                        self.cache.note_reload_failed();
                    }
                    self.set_conn(None);
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "redis links session ended; serving from cache"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connected session. Ok(()) only on shutdown.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut pubsub = timed(self.client.get_async_pubsub())
            .await
            .context("connect for subscribe")?;
        timed(pubsub.subscribe(CHANNEL))
            .await
            .context("subscribe")?;
        // No library response timeout (redis-rs defaults to 500 ms): every
        // command on this connection is bounded by our own, `timed` here and
        // `miss_timeout` on a miss, so a stall shorter than COMMAND_TIMEOUT
        // does not end the session and `miss_timeout_ms` up to 1000 holds.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = timed(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .context("connect")?;
        let started = std::time::Instant::now();
        let load = load_all(&self.cache, self.client.get_connection_info(), &mut conn)
            .await
            .context("full load")?;
        // The miss connection goes live before the cache says "loaded", so a
        // miss right after /readyz turns 200 is looked up, not sent to the fallback.
        self.set_conn(Some(conn.clone()));
        self.up.store(true, Ordering::Relaxed);
        load.finish();
        tracing::info!(
            links = self.cache.counts().links,
            ms = started.elapsed().as_millis() as u64,
            "links loaded from redis"
        );
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { bail!("subscription closed") };
                    let payload: String = match msg.get_payload() {
                        Ok(p) => p,
                        Err(e) => { tracing::warn!(error = %e, "non-text message on {CHANNEL}"); continue; }
                    };
                    apply_change(&self.cache, &mut conn, &payload).await?;
                }
                _ = self.reload.notified() => {
                    load_all(&self.cache, self.client.get_connection_info(), &mut conn)
                        .await
                        .context("reload")?
                        .finish();
                    tracing::info!("links reloaded from redis");
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

async fn timed<T, E>(fut: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("redis did not answer within {COMMAND_TIMEOUT:?}"),
    }
}

/// Apply one `affgate:changes` message. Err only when Redis itself failed.
pub async fn apply_change(
    cache: &LinkCache,
    conn: &mut MultiplexedConnection,
    payload: &str,
) -> anyhow::Result<()> {
    if let Some(slug) = payload.strip_prefix("link:") {
        let key = format!("{LINK_PREFIX}{slug}");
        let fields: HashMap<String, String> =
            timed(redis::cmd("HGETALL").arg(&key).query_async(conn)).await?;
        if fields.is_empty() {
            cache.remove_link(slug);
        } else {
            match parse_link(&fields) {
                Ok(link) => cache.upsert_link(slug.into(), link),
                Err(reason) => tracing::warn!(
                    key,
                    reason,
                    "unusable link hash in redis; keeping the cached one"
                ),
            }
        }
    } else if let Some(id) = payload.strip_prefix("offer:") {
        let Ok(offer_id) = id.parse::<u64>() else {
            tracing::warn!(payload, "bad offer id on {CHANNEL}");
            return Ok(());
        };
        let key = format!("{OFFER_PREFIX}{id}");
        let fields: HashMap<String, String> =
            timed(redis::cmd("HGETALL").arg(&key).query_async(conn)).await?;
        if fields.is_empty() {
            cache.remove_offer(offer_id);
        } else {
            match parse_offer(&fields) {
                Ok(o) => cache.upsert_offer(offer_id, o),
                Err(reason) => tracing::warn!(key, reason, "unusable offer hash in redis"),
            }
        }
    } else if let Some(hash) = payload.strip_prefix("token:") {
        let key = format!("{TOKEN_PREFIX}{hash}");
        let v: Option<String> = timed(redis::cmd("GET").arg(&key).query_async(conn)).await?;
        match v.as_deref().map(str::parse::<u64>) {
            None => cache.remove_token(hash),
            Some(Ok(network)) => cache.upsert_token(hash.to_string(), network),
            Some(Err(_)) => tracing::warn!(key, "token value is not a network id"),
        }
    } else {
        tracing::warn!(payload, "unknown message on {CHANNEL}");
    }
    Ok(())
}

/// SCAN for keys matching `prefix*`.
async fn scan(conn: &mut MultiplexedConnection, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch) = scan_step(conn, prefix, cursor).await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// One SCAN call: the next cursor (0: done) and a batch of keys.
async fn scan_step(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    cursor: u64,
) -> anyhow::Result<(u64, Vec<String>)> {
    timed(
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn),
    )
    .await
}

/// Every link through redis-rs into `load`, for addresses `links::bulk`
/// does not serve (TLS): batch by batch, the next batch fetched while one
/// is parsed.
async fn load_links_redis_rs(
    conn: &mut MultiplexedConnection,
    load: &mut FullLoad<'_>,
) -> anyhow::Result<()> {
    // The next batch is fetched (on another task, over the same
    // multiplexed connection) while this one is parsed.
    let mut pending = tokio::spawn(fetch_links(conn.clone(), 0));
    loop {
        let (next, keys, values) = match (&mut pending).await {
            Ok(r) => r?,
            Err(e) => bail!("link batch task failed: {e}"),
        };
        if next != 0 {
            pending = tokio::spawn(fetch_links(conn.clone(), next));
        }
        for (key, values) in keys.iter().zip(values) {
            let slug = &key[LINK_PREFIX.len()..];
            if values.iter().all(Option::is_none) {
                continue; // deleted between SCAN and HMGET
            }
            match parse_link(&LinkFields(values)) {
                Ok(link) => load.link(slug.into(), link),
                Err(reason) => super::bulk::skip(slug, &reason),
            }
        }
        if next == 0 {
            return Ok(());
        }
    }
}

/// Keys asked per SCAN call.
const SCAN_COUNT: usize = super::bulk::SCAN_COUNT;

async fn hgetall_many(
    conn: &mut MultiplexedConnection,
    keys: &[String],
) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("HGETALL").arg(k);
        }
        let part: Vec<HashMap<String, String>> = timed(pipe.query_async(conn)).await?;
        out.extend(part);
    }
    Ok(out)
}

/// One batch of a bulk load: SCAN from `cursor`, then the link fields of
/// every key it returned, by HMGET in one pipeline.
async fn fetch_links(
    mut conn: MultiplexedConnection,
    cursor: u64,
) -> anyhow::Result<(u64, Vec<String>, Vec<Vec<Option<String>>>)> {
    let (next, keys) = scan_step(&mut conn, LINK_PREFIX, cursor).await?;
    let mut values = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("HMGET").arg(k).arg(&LINK_FIELDS[..]);
        }
        let part: Vec<Vec<Option<String>>> = timed(pipe.query_async(&mut conn)).await?;
        values.extend(part);
    }
    Ok((next, keys, values))
}

/// Read every link, offer and token into `cache`: links go in as they are
/// read, offers and tokens and the removal of what Redis no longer holds
/// wait for [`Loaded::finish`]. An error leaves the cache serving: nothing
/// is removed, and the links already read are Redis's own.
///
/// Links come over a plain connection of their own (`links::bulk`: RESP
/// read in place, batch by batch, so memory peaks at the links plus about
/// two batches of replies); only for an address that needs TLS do they
/// come through redis-rs ([`load_links_redis_rs`]). Offers and tokens, a
/// few hundred keys, always come through `conn`.
pub async fn load_all<'c>(
    cache: &'c LinkCache,
    info: &redis::ConnectionInfo,
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<Loaded<'c>> {
    let mut load = cache.begin_load();
    let bulk = super::bulk::load_links(info, COMMAND_TIMEOUT, |slug, link| load.link(slug, link))
        .await
        .context("links")?;
    if !bulk {
        load_links_redis_rs(conn, &mut load)
            .await
            .context("links")?;
    }
    let mut offers = Vec::new();
    let mut tokens = Vec::new();
    // SCAN may return a key twice: the cache keeps one (the same hash).
    let offer_keys = scan(conn, OFFER_PREFIX).await?;
    for (key, fields) in offer_keys
        .iter()
        .zip(hgetall_many(conn, &offer_keys).await?)
    {
        let Ok(id) = key[OFFER_PREFIX.len()..].parse::<u64>() else {
            tracing::warn!(key, "skipping offer key without a numeric id");
            continue;
        };
        if fields.is_empty() {
            continue;
        }
        match parse_offer(&fields) {
            Ok(o) => offers.push((id, o)),
            Err(reason) => tracing::warn!(key, reason, "skipping unusable offer hash"),
        }
    }
    let token_keys = scan(conn, TOKEN_PREFIX).await?;
    for chunk in token_keys.chunks(1000) {
        let values: Vec<Option<String>> =
            timed(redis::cmd("MGET").arg(chunk).query_async(conn)).await?;
        for (key, v) in chunk.iter().zip(values) {
            if let Some(Ok(network)) = v.as_deref().map(str::parse::<u64>) {
                tokens.push((key[TOKEN_PREFIX.len()..].to_string(), network));
            }
        }
    }
    Ok(Loaded {
        load,
        offers,
        tokens,
    })
}

/// A full load read to the end, waiting to be made the cache's contents.
#[derive(Debug)]
#[must_use = "the load is only complete once finished"]
pub struct Loaded<'c> {
    load: FullLoad<'c>,
    offers: Vec<(u64, Offer)>,
    tokens: Vec<(String, u64)>,
}

impl Loaded<'_> {
    /// Drop the links Redis no longer holds, replace offers and tokens,
    /// and mark the cache loaded.
    pub fn finish(self) {
        self.load.finish(self.offers, self.tokens);
    }
}

/// Read access to a hash's fields, by name: an HGETALL map, or the fixed
/// field list of a bulk load's HMGET.
pub trait Fields {
    fn field(&self, name: &str) -> Option<&str>;
}

impl Fields for HashMap<String, String> {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// The fields a link hash may have, in the order a bulk load asks for them.
pub const LINK_FIELDS: [&str; 9] = [
    "link_id",
    "destination",
    "status",
    "redirect_code",
    "offer_id",
    "affiliate_id",
    "network_id",
    "fallback_url",
    "version",
];

/// An HMGET of [`LINK_FIELDS`]: no map to build per link.
struct LinkFields(Vec<Option<String>>);

impl Fields for LinkFields {
    fn field(&self, name: &str) -> Option<&str> {
        let i = LINK_FIELDS.iter().position(|f| *f == name)?;
        self.0.get(i).and_then(|v| v.as_deref())
    }
}

fn field_u64<F: Fields + ?Sized>(
    fields: &F,
    name: &str,
    default: Option<u64>,
) -> Result<u64, String> {
    match fields.field(name) {
        None | Some("") => default.ok_or_else(|| format!("{name} missing")),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} `{v}` is not an integer")),
    }
}

fn field_url<F: Fields + ?Sized>(fields: &F, name: &str) -> Result<Option<Box<str>>, String> {
    match fields.field(name) {
        None | Some("") => Ok(None),
        Some(u) if valid_url(u) => Ok(Some(u.into())),
        Some(u) => Err(format!("{name} `{u}` is not an absolute http(s) URL")),
    }
}

/// A link hash as the control plane writes it.
pub fn parse_link<F: Fields + ?Sized>(fields: &F) -> Result<Link, String> {
    let link_id = field_u64(fields, "link_id", None)?;
    if link_id > MAX_LINK_ID {
        return Err(format!("link_id {link_id} is above {MAX_LINK_ID}"));
    }
    let destination = fields.field("destination").unwrap_or("");
    if !valid_url(destination) {
        return Err(format!(
            "destination `{destination}` is not an absolute http(s) URL"
        ));
    }
    let status_s = fields.field("status").unwrap_or("");
    let status =
        LinkStatus::parse(status_s).ok_or_else(|| format!("status `{status_s}` unknown"))?;
    let redirect_code = field_u64(fields, "redirect_code", Some(302))?;
    let redirect_code = u16::try_from(redirect_code)
        .ok()
        .filter(|c| valid_redirect_code(*c))
        .ok_or_else(|| format!("redirect_code {redirect_code} is not 301, 302, 307 or 308"))?;
    Ok(Link {
        link_id,
        destination: Template::parse(destination),
        status,
        redirect_code,
        offer_id: field_u64(fields, "offer_id", Some(0))?,
        affiliate_id: field_u64(fields, "affiliate_id", Some(0))?,
        network_id: field_u64(fields, "network_id", Some(0))?,
        fallback_url: field_url(fields, "fallback_url")?,
        version: field_u64(fields, "version", Some(0))?,
    })
}

/// An offer hash as the control plane writes it.
pub fn parse_offer<F: Fields + ?Sized>(fields: &F) -> Result<Offer, String> {
    let status_s = fields.field("status").unwrap_or("");
    let status =
        OfferStatus::parse(status_s).ok_or_else(|| format!("status `{status_s}` unknown"))?;
    Ok(Offer {
        status,
        fallback_url: field_url(fields, "fallback_url")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_full_link_hash() {
        let l = parse_link(&h(&[
            ("link_id", "9"),
            ("destination", "https://m.example/?c={click_id}"),
            ("status", "shadow_banned"),
            ("redirect_code", "307"),
            ("offer_id", "3"),
            ("affiliate_id", "4"),
            ("network_id", "5"),
            ("fallback_url", "https://fb.example/"),
            ("version", "12"),
        ]))
        .unwrap();
        assert_eq!(
            (
                l.link_id,
                l.redirect_code,
                l.offer_id,
                l.affiliate_id,
                l.network_id,
                l.version
            ),
            (9, 307, 3, 4, 5, 12)
        );
        assert_eq!(l.status, LinkStatus::ShadowBanned);
        assert_eq!(l.fallback_url.as_deref(), Some("https://fb.example/"));
    }

    #[test]
    fn defaults_and_rejections() {
        let l = parse_link(&h(&[
            ("link_id", "1"),
            ("destination", "https://m.example/"),
        ]))
        .unwrap();
        assert_eq!((l.redirect_code, l.status), (302, LinkStatus::Active));
        for bad in [
            h(&[("destination", "https://m.example/")]),
            h(&[("link_id", "x"), ("destination", "https://m.example/")]),
            h(&[("link_id", "1"), ("destination", "nope")]),
            h(&[
                ("link_id", "1"),
                ("destination", "https://m.example/"),
                ("redirect_code", "200"),
            ]),
            h(&[
                ("link_id", "1"),
                ("destination", "https://m.example/"),
                ("status", "deleted"),
            ]),
        ] {
            assert!(parse_link(&bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            parse_offer(&h(&[("status", "capped")])).unwrap().status,
            OfferStatus::Capped
        );
        assert!(parse_offer(&h(&[("status", "gone")])).is_err());
    }
}
