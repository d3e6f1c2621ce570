//! Heap allocations on the redirect hot path, counted, not timed: after a
//! warm-up, `serve_link` (decide, mint, encode, append, build the 302) may
//! allocate only the response's `HeaderMap` (two: its index and entry
//! tables, on the first insert) and the segment table inside capnp's message
//! builder. `Location` and `X-Request-Id` come from a per-thread chunk, so
//! they cost an allocation only once per chunk. (hyper adds its read
//! buffer's two per request around this; see docs/edge.md.)
//!
//! A counting global allocator is process-wide, so this file holds one test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use affgate_edge::http::App;
use affgate_edge::http::click::{ClickRequest, serve_link};
use affgate_edge::links::{LinkCache, Snapshot};
use affgate_edge::ring::{Ring, RingConfig};
use affgate_edge::telemetry::Metrics;
use affgate_schema::keys::{KeyRing, Keys, Secret};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only
// counts allocations.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_redirect_allocates_only_its_header_map_and_capnp_segment_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Ring::open(&RingConfig {
        path: dir.path().join("edge.ring"),
        size_bytes: 64 << 20,
        spill_dir: dir.path().join("spill"),
    })
    .expect("open ring");
    let links = LinkCache::new();
    let csv = dir.path().join("links.csv");
    std::fs::write(
        &csv,
        "slug,link_id,destination\nabc,7,https://m.example/p?c={click_id}&s={sub1}&a={affiliate_id}\n",
    )
    .expect("write links");
    let keys = Keys::derive(&Secret::from_bytes([9; 32]));
    let snap: Snapshot =
        affgate_edge::links::file::load(&csv, None, &keys).expect("links file loads");
    links.replace(snap);
    let app = App {
        edge_id: 1,
        keys: KeyRing::new(keys),
        ring: Arc::new(ring),
        links: Arc::new(links),
        redis: None,
        metrics: Arc::new(Metrics::default()),
        fallback_url: None,
        trust_forwarded_for: false,
        max_body_bytes: 16384,
        ring_ok: AtomicBool::new(true),
        boot_nonce: 1,
        delivery: Arc::default(),
    };
    let click = ClickRequest {
        slug: "abc",
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64)".into(),
        referer: "https://ref.example/".into(),
        subs: ["s1".into(), "".into(), "".into(), "".into(), "".into()],
    };
    let serve = || {
        app.links
            .with_link("abc", |l| serve_link(&app, Some(l), &click, None))
            .expect("link is cached")
    };
    // Warm up: thread-local buffers grow to size once.
    for _ in 0..100 {
        let r = serve();
        assert_eq!(r.status(), 302);
        assert!(r.headers().contains_key("location"));
        assert!(r.headers().contains_key("x-request-id"));
    }
    let n = 10_000u64;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..n {
        drop(serve());
    }
    let per_redirect = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64;
    // 2 for the HeaderMap + 1 capnp segment table, plus a 64 KiB header
    // chunk every few hundred responses.
    assert!(
        per_redirect <= 3.05,
        "{per_redirect:.3} allocations per redirect; expected the HeaderMap, capnp's segment table and an amortised header chunk"
    );
    eprintln!("allocations per redirect: {per_redirect:.3}");
}
