//! The edge's `App` over a links file and a fresh ring in a temp dir, as
//! the in-process edge tests build it (no Redis, no collector).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use affgate_edge::http::App;
use affgate_edge::links::{LinkCache, Snapshot};
use affgate_edge::ring::{Ring, RingConfig};
use affgate_edge::telemetry::Metrics;
use affgate_schema::keys::{KeyRing, Keys, Secret};

/// An app on `links_csv` (and `networks_csv`, if any) written into `dir`,
/// with a ring of `ring_bytes` there; keys from a fixed secret.
pub fn app(dir: &Path, ring_bytes: u64, links_csv: &str, networks_csv: Option<&str>) -> App {
    let ring = Ring::open(&RingConfig {
        path: dir.join("edge.ring"),
        size_bytes: ring_bytes,
        spill_dir: dir.join("spill"),
    })
    .expect("open ring");
    let csv = dir.join("links.csv");
    std::fs::write(&csv, links_csv).expect("write links");
    let nets = networks_csv.map(|text| {
        let path = dir.join("networks.csv");
        std::fs::write(&path, text).expect("write networks");
        path
    });
    let keys = Keys::derive(&Secret::from_bytes([9; 32]));
    let snap: Snapshot =
        affgate_edge::links::file::load(&csv, nets.as_deref(), &keys).expect("links file loads");
    let links = LinkCache::new();
    links.replace(snap);
    App {
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
    }
}
