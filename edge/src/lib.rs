//! affgate-edge: answers click redirects and conversion postbacks close to
//! visitors and networks, and keeps every event in a crash-surviving ring
//! until a collector has it.
//!
//! - `config`: the TOML file, `AFFGATE_*` overrides, typed checks.
//! - `flush`: delivery to collectors; `flush::outbox` is its pure core.
//! - `http`: routing and listeners; `http::click` is the redirect hot path,
//!   `http::postback` the postback path, `http::fast` the plain listener's
//!   HTTP/1.1 loop (hot routes itself, the rest handed to hyper),
//!   `http::tls` the rustls listener.
//! - `links`: the in-process link cache and its sources (links file,
//!   Redis with pub/sub invalidation), destination templates.
//! - `ring`: the mmap'd event ring, its recovery, spill files, consumer.
//! - `inspect`: what `affgate-edge ring inspect` prints.
//! - `telemetry`: per-thread request metrics, Prometheus text, tracing.
//!
//! `main.rs` only parses flags and calls [`run`]; tests drive [`Edge`]
//! in-process or the binary as a child process.

pub mod config;
pub mod flush;
pub mod http;
pub mod inspect;
pub mod links;
#[allow(unsafe_code)]
pub mod ring;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use affgate_schema::keys::{KeyRing, Keys};
use anyhow::Context;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, LinkSource, Transport};
use crate::flush::outbox::{Outbox, OutboxConfig};
use crate::flush::shell::{DROP_REASONS, DeliveryStats};
use crate::http::App;
use crate::links::LinkCache;
use crate::links::redis::RedisLinks;
use crate::ring::{Ring, RingConfig};
use crate::telemetry::Metrics;

/// Ring record kind of a click event.
pub const KIND_CLICK: u8 = 1;
/// Ring record kind of a postback event.
pub const KIND_POSTBACK: u8 = 2;

/// How long shutdown waits for in-flight connections.
const DRAIN: Duration = Duration::from_secs(5);

/// A running edge.
#[derive(Debug)]
pub struct Edge {
    pub http_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    app: Arc<App>,
    shutdown: watch::Sender<bool>,
    accept_tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

/// The key ring of a config: the current secret and the still-accepted previous ones.
pub fn key_ring(cfg: &Config) -> KeyRing {
    KeyRing::from_secrets(&cfg.secret, &cfg.previous_secrets)
}

impl Edge {
    /// Open the ring, load links, bind every listener and start serving.
    pub async fn start(cfg: Config) -> anyhow::Result<Edge> {
        let keys = key_ring(&cfg);
        let ring = Ring::open(&RingConfig {
            path: cfg.ring_path.clone(),
            size_bytes: cfg.ring_bytes,
            spill_dir: cfg.spill_dir.clone(),
        })
        .context("open ring ([buffer] path)")?;
        let ring = Arc::new(ring);
        let cache = Arc::new(LinkCache::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut background = Vec::new();

        let redis = match &cfg.links {
            LinkSource::File { links, networks } => {
                let snap = links::file::load(links, networks.as_deref(), keys.current())
                    .context("load links file")?;
                tracing::info!(
                    links = snap.links.len(),
                    tokens = snap.tokens.len(),
                    "links loaded from file"
                );
                cache.replace(snap);
                None
            }
            LinkSource::Redis { url } => {
                let r = RedisLinks::new(url, cache.clone(), cfg.miss_timeout)?;
                background.push(tokio::spawn(r.clone().run(shutdown_rx.clone())));
                Some(r)
            }
        };
        // Installed before the edge reports itself listening: a SIGHUP sent
        // right after start must reload, not kill (its default action).
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("install the SIGHUP handler")?;
        background.push(tokio::spawn(reload_on_sighup(
            hup,
            cfg.links.clone(),
            keys.current().clone(),
            cache.clone(),
            redis.clone(),
            shutdown_rx.clone(),
        )));

        let boot_nonce = http::now_ms() ^ (u64::from(std::process::id()) << 40);
        let delivery = Arc::new(DeliveryStats::default());
        if !cfg.collectors.is_empty() {
            let max_batch = match cfg.transport {
                Transport::Udp => cfg.max_datagram_bytes,
                Transport::Quic => cfg.max_datagram_bytes.min(flush::quic::MAX_BATCH_BYTES),
            };
            macro_rules! deliver {
                ($t:expr) => {{
                    let t = $t;
                    // Full-sized datagrams make the runs a segmented send takes.
                    let outbox_cfg = OutboxConfig {
                        pad_full: flush::shell::Transport::gso_stats(&t).offload,
                        ..OutboxConfig::new(cfg.edge_id, cfg.collectors.len(), max_batch)
                    };
                    let outbox = Outbox::new(outbox_cfg, keys.current().clone())
                        .with_first_nonce(http::now_ms() << 16);
                    background.push(tokio::spawn(flush::shell::run(
                        ring.clone(),
                        outbox,
                        keys.clone(),
                        t,
                        cfg.flush_interval,
                        delivery.clone(),
                        shutdown_rx.clone(),
                    )))
                }};
            }
            match (cfg.transport, &cfg.quic) {
                (Transport::Udp, _) => {
                    deliver!(flush::udp::UdpTransport::bind(&cfg.collectors, max_batch).await?)
                }
                (Transport::Quic, Some(q)) => {
                    deliver!(flush::quic::QuicTransport::bind(&cfg.collectors, q).await?)
                }
                (Transport::Quic, None) => {
                    anyhow::bail!("[delivery] quic_ca: required when transport = \"quic\"")
                }
            }
        } else {
            tracing::warn!(
                "[delivery] collectors is empty: events stay in the ring until one is configured"
            );
        }
        let app = Arc::new(App {
            edge_id: cfg.edge_id,
            keys,
            ring: ring.clone(),
            links: cache.clone(),
            redis: redis.clone(),
            metrics: Arc::new(Metrics::default()),
            fallback_url: cfg.fallback_url.as_deref().map(Into::into),
            trust_forwarded_for: cfg.trust_forwarded_for,
            max_body_bytes: cfg.max_body_bytes,
            ring_ok: AtomicBool::new(true),
            boot_nonce,
            delivery,
        });

        let graceful = Arc::new(GracefulShutdown::new());
        let mut accept_tasks = Vec::new();
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("bind [http] listen {}", cfg.listen))?;
        let http_addr = listener.local_addr()?;
        accept_tasks.push(tokio::spawn(http::serve_plain(
            listener,
            app.clone(),
            shutdown_rx.clone(),
            graceful.clone(),
        )));

        let mut tls_addr = None;
        if let Some(tls) = &cfg.tls {
            let server_cfg = http::tls::server_config(&tls.cert, &tls.key)?;
            let l = TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("bind [http] tls_listen {}", tls.listen))?;
            tls_addr = Some(l.local_addr()?);
            accept_tasks.push(tokio::spawn(http::tls::serve_tls(
                l,
                server_cfg,
                app.clone(),
                shutdown_rx.clone(),
                graceful.clone(),
            )));
        }

        let mut metrics_addr = None;
        if let Some(m) = cfg.metrics_listen {
            let l = TcpListener::bind(m)
                .await
                .with_context(|| format!("bind [metrics] listen {m}"))?;
            metrics_addr = Some(l.local_addr()?);
            let app = app.clone();
            let render: Arc<dyn Fn() -> String + Send + Sync> =
                Arc::new(move || render_metrics(&app));
            background.push(tokio::spawn(http::serve_metrics(
                l,
                render,
                shutdown_rx.clone(),
            )));
        }

        Ok(Edge {
            http_addr,
            tls_addr,
            metrics_addr,
            app,
            shutdown: shutdown_tx,
            accept_tasks,
            background,
            graceful,
        })
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stop accepting, let in-flight requests finish (up to 5 s), stop background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.accept_tasks {
            let _ = t.await;
        }
        match Arc::try_unwrap(self.graceful) {
            Ok(g) => {
                if tokio::time::timeout(DRAIN, g.shutdown()).await.is_err() {
                    tracing::warn!("connections still open after {DRAIN:?}; closing them");
                }
            }
            Err(_) => tracing::debug!("a TLS handshake was in flight at shutdown"),
        }
        for t in self.background {
            t.abort();
        }
    }
}

/// Everything `/metrics` shows.
pub fn render_metrics(app: &App) -> String {
    use telemetry::{counter, gauge};
    let mut out = String::with_capacity(8192);
    app.metrics.render_requests(&mut out);
    let s = app.ring.stats();
    gauge(
        &mut out,
        "affgate_edge_ring_capacity_bytes",
        "Ring data capacity.",
        s.capacity_bytes as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_ring_used_bytes",
        "Ring bytes held by unfreed records.",
        s.used_bytes as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_ring_fill_ratio",
        "Used over capacity.",
        if s.capacity_bytes > 0 {
            s.used_bytes as f64 / s.capacity_bytes as f64
        } else {
            0.0
        },
    );
    gauge(
        &mut out,
        "affgate_edge_ring_unacked_records",
        "Records in the ring not yet acknowledged.",
        s.unacked_records as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_spill_records",
        "Spilled records not yet acknowledged.",
        s.spilled_records as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_spill_bytes",
        "Bytes in spill files.",
        s.spill_bytes as f64,
    );
    counter(
        &mut out,
        "affgate_edge_spilled_records_total",
        "Records written to spill files since start.",
        s.spilled_total,
    );
    let lag = s
        .oldest_unacked_ts_ms
        .map(|ts| http::now_ms().saturating_sub(ts) as f64 / 1e3)
        .unwrap_or(0.0);
    gauge(
        &mut out,
        "affgate_edge_delivery_lag_seconds",
        "Age of the oldest unacknowledged record.",
        lag,
    );
    render_delivery(&app.delivery, &mut out);
    let c = app.links.counts();
    gauge(
        &mut out,
        "affgate_edge_links_loaded",
        "Links in the cache.",
        c.links as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_offers_loaded",
        "Offers in the cache.",
        c.offers as f64,
    );
    gauge(
        &mut out,
        "affgate_edge_tokens_loaded",
        "Postback tokens in the cache.",
        c.tokens as f64,
    );
    counter(
        &mut out,
        "affgate_edge_links_reloads_total",
        "Full link loads that succeeded.",
        c.reloads_ok,
    );
    counter(
        &mut out,
        "affgate_edge_links_reload_failures_total",
        "Full link loads that failed (old links kept).",
        c.reloads_failed,
    );
    if let Some(r) = &app.redis {
        let rc = r.counts();
        gauge(
            &mut out,
            "affgate_edge_redis_up",
            "1 while the Redis subscription is live.",
            if rc.up { 1.0 } else { 0.0 },
        );
        counter(
            &mut out,
            "affgate_edge_redis_errors_total",
            "Redis commands or sessions that failed.",
            rc.errors,
        );
        out.push_str(
            "# HELP affgate_edge_link_misses_total Cache misses looked up in Redis, by outcome.\n",
        );
        out.push_str("# TYPE affgate_edge_link_misses_total counter\n");
        for (outcome, n) in [
            ("found", rc.miss_found),
            ("not_found", rc.miss_not_found),
            ("unreachable", rc.miss_unreachable),
        ] {
            out.push_str(&format!(
                "affgate_edge_link_misses_total{{outcome=\"{outcome}\"}} {n}\n"
            ));
        }
    }
    out
}

fn render_delivery(d: &DeliveryStats, out: &mut String) {
    use std::sync::atomic::Ordering;
    use telemetry::{counter, gauge};
    let s = d.outbox.lock().map(|s| s.clone()).unwrap_or_default();
    counter(
        out,
        "affgate_edge_delivery_datagrams_sent_total",
        "Batch datagrams sent, probes included.",
        s.sent_datagrams,
    );
    counter(
        out,
        "affgate_edge_delivery_records_sent_total",
        "Records sent, first sends and resends.",
        s.sent_records,
    );
    counter(
        out,
        "affgate_edge_delivery_records_resent_total",
        "Records sent again after no ack.",
        s.resent_records,
    );
    counter(
        out,
        "affgate_edge_delivery_records_acked_total",
        "Records acknowledged by a collector and freed.",
        s.acked_records,
    );
    counter(
        out,
        "affgate_edge_delivery_failovers_total",
        "Moves to the next collector.",
        s.failovers,
    );
    counter(
        out,
        "affgate_edge_delivery_probes_total",
        "Probes of the first collector while failed over.",
        s.probes,
    );
    counter(
        out,
        "affgate_edge_delivery_oversize_datagrams_total",
        "Datagrams above max_datagram_bytes (one large record).",
        s.oversize_datagrams,
    );
    counter(
        out,
        "affgate_edge_delivery_send_errors_total",
        "Datagram sends the OS refused.",
        d.send_errors.load(Ordering::Relaxed),
    );
    counter(
        out,
        "affgate_edge_delivery_segmented_sends_total",
        "UDP sends that carried several datagrams at once (segmentation offload).",
        d.segmented_sends.load(Ordering::Relaxed),
    );
    counter(
        out,
        "affgate_edge_delivery_segmented_datagrams_total",
        "Datagrams that went out in segmented UDP sends.",
        d.segmented_datagrams.load(Ordering::Relaxed),
    );
    gauge(
        out,
        "affgate_edge_delivery_segmentation_offload",
        "1 while UDP sends use segmentation offload (UDP_SEGMENT), else 0.",
        d.segmentation_offload.load(Ordering::Relaxed) as f64,
    );
    gauge(
        out,
        "affgate_edge_delivery_in_flight_records",
        "Records sent or due, not yet acknowledged.",
        s.in_flight as f64,
    );
    gauge(
        out,
        "affgate_edge_delivery_rtt_seconds",
        "Smoothed round trip from send to ack (0 before the first ack).",
        s.srtt.unwrap_or_default().as_secs_f64(),
    );
    gauge(
        out,
        "affgate_edge_delivery_first_resend_seconds",
        "Delay before a record's first resend: 0.5 s, or the round trip's timeout when longer (1 s before the first ack).",
        s.first_resend.as_secs_f64(),
    );
    gauge(
        out,
        "affgate_edge_delivery_current_collector",
        "Index of the collector records go to.",
        s.current_collector as f64,
    );
    out.push_str("# HELP affgate_edge_delivery_datagrams_dropped_total Incoming datagrams dropped, by reason.\n");
    out.push_str("# TYPE affgate_edge_delivery_datagrams_dropped_total counter\n");
    for (i, reason) in DROP_REASONS.iter().enumerate() {
        let n = d.dropped[i].load(Ordering::Relaxed);
        out.push_str(&format!(
            "affgate_edge_delivery_datagrams_dropped_total{{reason=\"{reason}\"}} {n}\n"
        ));
    }
}

/// SIGHUP: re-read the links file (a bad file is refused, the old links keep serving) or Redis.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    source: LinkSource,
    keys: Keys,
    cache: Arc<LinkCache>,
    redis: Option<Arc<RedisLinks>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.changed() => return,
        }
        match (&source, &redis) {
            (LinkSource::File { links, networks }, _) => {
                match links::file::load(links, networks.as_deref(), &keys) {
                    Ok(snap) => {
                        let n = snap.links.len();
                        cache.replace(snap);
                        tracing::info!(links = n, "links file reloaded");
                    }
                    Err(e) => {
                        cache.note_reload_failed();
                        tracing::error!(error = %e, "links file refused; still serving the previous links");
                    }
                }
            }
            (LinkSource::Redis { .. }, Some(r)) => r.request_reload(),
            (LinkSource::Redis { .. }, None) => {}
        }
    }
}

/// Run until `shutdown` resolves. Prints one line with the bound addresses
/// on stdout (`affgate-edge listening http=ADDR tls=ADDR|- metrics=ADDR|-`).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let edge = Edge::start(cfg).await?;
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "affgate-edge listening http={} tls={} metrics={}",
        edge.http_addr,
        show(edge.tls_addr),
        show(edge.metrics_addr)
    );
    tracing::info!(http = %edge.http_addr, "edge serving");
    shutdown.await;
    tracing::info!("shutting down");
    edge.shutdown().await;
    Ok(())
}
