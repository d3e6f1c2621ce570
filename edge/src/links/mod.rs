//! The link cache: what the hot path reads to answer a click or check a
//! postback token, with no I/O on a hit.
//!
//! Filled from one of two sources:
//! - `file`: the static links CSV and networks CSV (reloaded on SIGHUP;
//!   a file that does not parse is refused and the old contents keep serving);
//! - `redis`: the control plane's layout (DESIGN.md "Redis layout"): a full
//!   load at start and after every reconnect, single keys from the
//!   `affgate:changes` channel, one bounded GET on a miss. The full load's
//!   links come over a plain connection of their own (`bulk`), their
//!   replies read in place (`resp`).
//!
//! Tokens are held only as keyed hashes (`keys::token_hash`), as in Redis.

pub mod bulk;
pub mod file;
pub mod redis;
pub mod resp;
pub mod template;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;

pub use template::{Macros, Template};

/// A link's status as set by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    Active,
    Paused,
    ShadowBanned,
}

impl LinkStatus {
    pub fn parse(s: &str) -> Option<LinkStatus> {
        match s {
            "active" | "" => Some(LinkStatus::Active),
            "paused" => Some(LinkStatus::Paused),
            "shadow_banned" => Some(LinkStatus::ShadowBanned),
            _ => None,
        }
    }
}

/// An offer's status as set by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferStatus {
    Active,
    Capped,
    Paused,
}

impl OfferStatus {
    pub fn parse(s: &str) -> Option<OfferStatus> {
        match s {
            "active" | "" => Some(OfferStatus::Active),
            "capped" => Some(OfferStatus::Capped),
            "paused" => Some(OfferStatus::Paused),
            _ => None,
        }
    }
}

/// One tracked link.
#[derive(Debug, Clone)]
pub struct Link {
    pub link_id: u64,
    pub destination: Template,
    pub status: LinkStatus,
    /// 301, 302, 307 or 308.
    pub redirect_code: u16,
    pub offer_id: u64,
    pub affiliate_id: u64,
    pub network_id: u64,
    pub fallback_url: Option<Box<str>>,
    /// Control-plane version; an older version never replaces a newer one.
    pub version: u64,
}

#[derive(Debug, Clone)]
pub struct Offer {
    pub status: OfferStatus,
    pub fallback_url: Option<Box<str>>,
}

/// Redirect codes a link may use.
pub fn valid_redirect_code(code: u16) -> bool {
    matches!(code, 301 | 302 | 307 | 308)
}

/// Slugs and destination URLs follow the rules the control plane checks
/// them by (`affgate_schema::link`), so what the admin API accepts, the
/// edge loads.
pub use affgate_schema::link::{valid_slug, valid_url};

/// Everything a source loads at once.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub links: Vec<(Box<str>, Link)>,
    pub offers: Vec<(u64, Offer)>,
    /// token hash (hex) → network id
    pub tokens: Vec<(String, u64)>,
}

/// The cache maps' hash: FxHash's multiply-rotate over 8-byte words, from a
/// per-process random seed. A fifth of SipHash's cost on a short slug, and
/// the hot path hashes twice per click (link, offer). Not meant to resist
/// chosen keys: only the control plane (Redis) or the operator (links
/// file) inserts keys, so a visitor's slug can only probe, never fill a
/// bucket.
#[derive(Debug, Clone, Copy)]
pub struct FastHash {
    seed: u64,
}

impl Default for FastHash {
    fn default() -> Self {
        FastHash {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.seed)
    }
}

/// The hasher of [`FastHash`].
#[derive(Debug, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("chunks of 8")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // One more round so the low bits of the last word reach the top
        // bits (hashbrown's control bytes, DashMap's shard choice).
        (self.0 ^ (self.0 >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
    }
}

/// The in-process cache shared by all workers.
#[derive(Debug, Default)]
pub struct LinkCache {
    /// Boxed: the table holds 24-byte entries, so its power-of-two growth
    /// (up to 2.3x the entries right after a resize) costs little per link;
    /// inline 96-byte entries made the table alone ~200 bytes per link at 1M.
    links: DashMap<Box<str>, Box<Link>, FastHash>,
    offers: DashMap<u64, Offer, FastHash>,
    tokens: DashMap<String, u64, FastHash>,
    loaded: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

/// What the cache says about a slug's offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferState {
    Open,
    /// Capped or paused: redirect to the fallback.
    Closed,
}

impl LinkCache {
    pub fn new() -> LinkCache {
        LinkCache::default()
    }

    /// Run `f` on the cached link, without cloning it.
    pub fn with_link<R>(&self, slug: &str, f: impl FnOnce(&Link) -> R) -> Option<R> {
        self.links.get(slug).map(|l| f(&l))
    }

    /// The offer's state (an unknown offer is open). Copies nothing: the
    /// hot path asks for the fallback only when the offer is closed.
    pub fn offer_state(&self, offer_id: u64) -> OfferState {
        match self.offers.get(&offer_id).map(|o| o.status) {
            Some(OfferStatus::Capped | OfferStatus::Paused) => OfferState::Closed,
            Some(OfferStatus::Active) | None => OfferState::Open,
        }
    }

    /// The offer's fallback URL, if it is known and has one.
    pub fn offer_fallback(&self, offer_id: u64) -> Option<Box<str>> {
        self.offers
            .get(&offer_id)
            .and_then(|o| o.fallback_url.clone())
    }

    /// Network id owning a token hash.
    pub fn network_for_token_hash(&self, hash: &str) -> Option<u64> {
        self.tokens.get(hash).map(|n| *n)
    }

    /// Insert or replace a link unless the cached one is newer.
    pub fn upsert_link(&self, slug: Box<str>, link: Link) {
        match self.links.entry(slug) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().version <= link.version {
                    e.insert(Box::new(link));
                }
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(Box::new(link));
            }
        }
    }

    pub fn remove_link(&self, slug: &str) {
        self.links.remove(slug);
    }

    pub fn upsert_offer(&self, id: u64, offer: Offer) {
        self.offers.insert(id, offer);
    }

    pub fn remove_offer(&self, id: u64) {
        self.offers.remove(&id);
    }

    pub fn upsert_token(&self, hash: String, network_id: u64) {
        self.tokens.insert(hash, network_id);
    }

    pub fn remove_token(&self, hash: &str) {
        self.tokens.remove(hash);
    }

    /// Replace everything with `snap`: entries missing from it are removed.
    pub fn replace(&self, snap: Snapshot) {
        let mut load = self.begin_load();
        for (slug, link) in snap.links {
            load.link(slug, link);
        }
        load.finish(snap.offers, snap.tokens);
    }

    /// Start a full load that puts links in as they are read, rather than
    /// all at once from a [`Snapshot`] at the end: a million links inserted
    /// while Redis is still answering cost no time of their own, and no
    /// vector of all of them is held. Links not given by
    /// [`FullLoad::finish`] are removed then; a load dropped unfinished
    /// (Redis failed mid-way) removes nothing, and leaves what it put in:
    /// each is what Redis held when it was read.
    pub fn begin_load(&self) -> FullLoad<'_> {
        FullLoad {
            cache: self,
            // The first load (or after everything was removed): nothing to
            // drop, so no set of the loaded slugs to build.
            seen: (!self.links.is_empty()).then(std::collections::HashSet::new),
        }
    }

    pub fn note_reload_failed(&self) {
        self.reloads_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// True once a full load succeeded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn counts(&self) -> CacheCounts {
        CacheCounts {
            links: self.links.len() as u64,
            offers: self.offers.len() as u64,
            tokens: self.tokens.len() as u64,
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
        }
    }
}

/// A full load under way (see [`LinkCache::begin_load`]).
#[derive(Debug)]
pub struct FullLoad<'a> {
    cache: &'a LinkCache,
    /// Slugs loaded so far, when there are cached links the load may have
    /// to remove.
    seen: Option<std::collections::HashSet<Box<str>>>,
}

impl FullLoad<'_> {
    /// Insert or replace a link. A full load is authoritative: the cached
    /// link is replaced whatever its version.
    pub fn link(&mut self, slug: Box<str>, link: Link) {
        if let Some(seen) = &mut self.seen {
            seen.insert(slug.clone());
        }
        self.cache.links.insert(slug, Box::new(link));
    }

    /// End the load: drop the links it did not give, replace the offers
    /// and tokens, and mark the cache loaded.
    pub fn finish(self, offers: Vec<(u64, Offer)>, tokens: Vec<(String, u64)>) {
        let cache = self.cache;
        if let Some(seen) = self.seen {
            cache.links.retain(|k, _| seen.contains(k));
        }
        replace_all(&cache.offers, offers);
        replace_all(&cache.tokens, tokens);
        cache.loaded.store(true, Ordering::Release);
        cache.reloads_ok.fetch_add(1, Ordering::Relaxed);
    }
}

/// Make `map` hold exactly `entries`.
fn replace_all<K, V>(map: &DashMap<K, V, FastHash>, entries: Vec<(K, V)>)
where
    K: Eq + std::hash::Hash + Clone,
{
    let keys: std::collections::HashSet<K> = entries.iter().map(|(k, _)| k.clone()).collect();
    for (k, v) in entries {
        map.insert(k, v);
    }
    map.retain(|k, _| keys.contains(k));
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CacheCounts {
    pub links: u64,
    pub offers: u64,
    pub tokens: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(id: u64, version: u64) -> Link {
        Link {
            link_id: id,
            destination: Template::parse("https://m.example/"),
            status: LinkStatus::Active,
            redirect_code: 302,
            offer_id: 1,
            affiliate_id: 1,
            network_id: 1,
            fallback_url: None,
            version,
        }
    }

    #[test]
    fn older_versions_never_replace_newer() {
        let c = LinkCache::new();
        c.upsert_link("a".into(), link(1, 5));
        c.upsert_link("a".into(), link(2, 4));
        assert_eq!(
            c.with_link("a", |l| l.link_id),
            Some(1),
            "version 4 must not replace 5"
        );
        c.upsert_link("a".into(), link(3, 5));
        assert_eq!(
            c.with_link("a", |l| l.link_id),
            Some(3),
            "same version replaces"
        );
    }

    #[test]
    fn replace_drops_what_the_snapshot_lacks() {
        let c = LinkCache::new();
        c.upsert_link("gone".into(), link(1, 1));
        c.upsert_token("h1".into(), 1);
        assert!(!c.is_loaded());
        c.replace(Snapshot {
            links: vec![("kept".into(), link(2, 1))],
            offers: vec![],
            tokens: vec![("h2".into(), 2)],
        });
        assert!(c.is_loaded());
        assert!(c.with_link("gone", |_| ()).is_none());
        assert_eq!(c.with_link("kept", |l| l.link_id), Some(2));
        assert_eq!(c.network_for_token_hash("h1"), None);
        assert_eq!(c.network_for_token_hash("h2"), Some(2));
    }

    #[test]
    fn an_unfinished_load_removes_nothing_and_a_finished_one_drops_the_rest() {
        let c = LinkCache::new();
        c.replace(Snapshot {
            links: vec![("a".into(), link(1, 9)), ("b".into(), link(2, 1))],
            offers: vec![],
            tokens: vec![("h".into(), 1)],
        });
        {
            let mut load = c.begin_load();
            load.link("a".into(), link(3, 1));
            // Dropped: Redis failed mid-way.
        }
        assert_eq!(
            c.with_link("a", |l| l.link_id),
            Some(3),
            "a full load replaces whatever the version"
        );
        assert_eq!(c.with_link("b", |l| l.link_id), Some(2), "nothing removed");
        assert_eq!(c.network_for_token_hash("h"), Some(1), "tokens untouched");
        let mut load = c.begin_load();
        load.link("c".into(), link(4, 1));
        load.link("c".into(), link(4, 1)); // SCAN may repeat a key
        load.finish(vec![], vec![]);
        assert_eq!(c.counts().links, 1, "only c is left");
        assert_eq!(c.network_for_token_hash("h"), None);
    }

    #[test]
    fn a_link_stays_small() {
        // The cache holds one per link (memory per link is in
        // BENCHMARKS.md); a field that grows it should be a choice.
        assert!(
            std::mem::size_of::<Link>() <= 80,
            "{}",
            std::mem::size_of::<Link>()
        );
    }

    #[test]
    fn fast_hash_spreads_slugs() {
        let h = FastHash::default();
        let mut seen = std::collections::HashSet::new();
        let mut top = [0u32; 16];
        let n = 100_000u32;
        for i in 0..n {
            let v = h.hash_one(format!("s{i}").as_str());
            seen.insert(v);
            top[(v >> 60) as usize] += 1;
        }
        assert_eq!(seen.len(), n as usize, "no full collisions among {n} slugs");
        for (i, c) in top.iter().enumerate() {
            assert!(
                *c > n / 32 && *c < n / 8,
                "top 4 bits value {i} got {c} of {n}"
            );
        }
    }

    #[test]
    fn slugs_and_urls() {
        assert!(valid_slug("abc-DEF_1.2"));
        assert!(!valid_slug(""));
        assert!(!valid_slug("a/b"));
        assert!(!valid_slug(&"a".repeat(129)));
        assert!(valid_url("https://m.example/x?y={click_id}"));
        assert!(!valid_url("ftp://m.example/"));
        assert!(!valid_url("https://"));
        assert!(!valid_url("https:///path"));
        assert!(!valid_url("https://a b"));
    }
}
