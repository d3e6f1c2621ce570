//! affgate-collector: receives the edges' batches and commits them to the
//! stores, then acknowledges them; turns postbacks into conversions and
//! commissions; serves the admin API and propagates its changes to Redis;
//! runs the migrations.
//!
//! - `config`: the TOML file, `AFFGATE_*` overrides, typed checks.
//! - `migrate`: `affgate-collector migrate`, the ClickHouse runner and the
//!   embedded sqlx migrations.
//! - `store`: the idempotent writers, clicks to ClickHouse
//!   (`store::clickhouse`), postbacks to the PostgreSQL inbox
//!   (`store::postgres`), and `StoreError` (retry or reject).
//! - `ingest`: the UDP socket, the QUIC endpoint (`ingest::quic`), write
//!   windows (`ingest::window`, the pure core) and acks sent only after both
//!   stores committed.
//! - `conversions`: inbox postbacks into conversions, events and
//!   multi-level commissions in PostgreSQL (the ledger), caps, reversals,
//!   and the mirror of conversion events into ClickHouse.
//! - `propagate`: the control plane's state from PostgreSQL into Redis in
//!   DESIGN.md's layout, announced on `affgate:changes`.
//! - `admin`: the admin API on `[admin] listen`.
//! - `telemetry`: tracing set-up and `/metrics`.
//!
//! `main.rs` only parses flags and calls [`run`] or `migrate`; tests drive
//! [`Collector`] in-process or the binary as a child process.

pub mod admin;
pub mod config;
pub mod conversions;
pub mod ingest;
pub mod migrate;
pub mod propagate;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use affgate_schema::keys::KeyRing;
use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;

/// Receive buffer asked for the UDP ingest socket, bytes. The kernel caps
/// it at `net.core.rmem_max` (Debian's default: 208 KiB).
const UDP_RECV_BUFFER: usize = 4 << 20;

/// A running collector.
#[derive(Debug)]
pub struct Collector {
    pub udp_addr: Option<SocketAddr>,
    pub quic_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub stats: Arc<ingest::IngestStats>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The key ring of a config: the current secret and the still-accepted previous ones.
pub fn key_ring(cfg: &Config) -> KeyRing {
    KeyRing::from_secrets(&cfg.secret, &cfg.previous_secrets)
}

impl Collector {
    /// Connect the stores, bind the ingest socket and metrics, start serving.
    /// The stores need not be up: windows fail (unacknowledged) until they are.
    pub async fn start(cfg: Config) -> anyhow::Result<Collector> {
        let keys = key_ring(&cfg);
        let stats = Arc::new(ingest::IngestStats::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let pool = store::postgres::pool(&cfg.postgres).context("[postgres] url")?;
        let propagator = match &cfg.redis_url {
            Some(url) => Some(Arc::new(propagate::Propagator::new(
                url,
                pool.clone(),
                keys.current().clone(),
            )?)),
            None => None,
        };
        let mirror = Arc::new(conversions::mirror::Mirror::new(
            pool.clone(),
            &cfg.clickhouse,
        ));
        let processor = Arc::new(conversions::Processor::new(
            pool.clone(),
            keys.clone(),
            propagator.clone(),
            Some(mirror.wake.clone()),
        ));
        let stores = ingest::Stores {
            clicks: store::clickhouse::ClickStore::new(&cfg.clickhouse),
            inbox: store::postgres::Inbox::new(pool.clone()),
            inbox_wake: Some(processor.wake.clone()),
        };
        tasks.push(tokio::spawn(processor.clone().run(shutdown_rx.clone())));
        tasks.push(tokio::spawn(mirror.clone().run(shutdown_rx.clone())));
        if let Some(p) = &propagator {
            tasks.push(tokio::spawn(p.clone().run(shutdown_rx.clone())));
        }
        let mut admin_addr = None;
        if let (Some(a), Some(p)) = (&cfg.admin, &propagator) {
            let l = TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("bind [admin] listen {}", a.listen))?;
            admin_addr = Some(l.local_addr()?);
            let admin = Arc::new(admin::Admin {
                pool: pool.clone(),
                token: a.token.clone(),
                propagator: p.clone(),
            });
            tasks.push(tokio::spawn(admin::serve(l, admin, shutdown_rx.clone())));
        }
        let telemetry = Arc::new(telemetry::Telemetry {
            ingest: stats.clone(),
            conversions: processor.clone(),
            mirror: mirror.clone(),
            propagator: propagator.clone(),
        });
        // UDP and QUIC feed one queue and one writer: one window, one ack per edge.
        let (tx, rx) = mpsc::channel(ingest::QUEUE);
        let mut acks = ingest::Acks::default();
        let mut udp_addr = None;
        if let Some(listen) = cfg.udp_listen {
            let sock = Arc::new(
                UdpSocket::bind(listen)
                    .await
                    .with_context(|| format!("bind [ingest] udp_listen {listen}"))?,
            );
            udp_addr = Some(sock.local_addr()?);
            enlarge_recv_buffer(&sock);
            acks.udp = Some(sock.clone());
            tasks.push(tokio::spawn(ingest::receive(
                sock,
                keys.clone(),
                tx.clone(),
                stats.clone(),
                shutdown_rx.clone(),
            )));
        }
        let mut quic_addr = None;
        if let Some(q) = &cfg.quic {
            let endpoint = ingest::quic::endpoint(q, &keys)?;
            quic_addr = Some(endpoint.local_addr()?);
            tasks.push(tokio::spawn(ingest::quic::serve(
                endpoint,
                keys.clone(),
                tx.clone(),
                stats.clone(),
                acks.quic.clone(),
                shutdown_rx.clone(),
            )));
        }
        drop(tx);
        tasks.push(tokio::spawn(ingest::write(
            rx,
            Arc::new(acks),
            stores.clone(),
            keys.clone(),
            cfg.window,
            cfg.window_rows.get(),
            stats.clone(),
            shutdown_rx.clone(),
        )));
        let mut metrics_addr = None;
        if let Some(m) = cfg.metrics_listen {
            let l = TcpListener::bind(m)
                .await
                .with_context(|| format!("bind [metrics] listen {m}"))?;
            metrics_addr = Some(l.local_addr()?);
            tasks.push(tokio::spawn(telemetry::serve_metrics(
                l,
                telemetry.clone(),
                shutdown_rx.clone(),
            )));
        }
        Ok(Collector {
            udp_addr,
            quic_addr,
            metrics_addr,
            admin_addr,
            stats,
            shutdown: shutdown_tx,
            tasks,
        })
    }

    /// Stop receiving; a window being written finishes or is abandoned
    /// unacknowledged (the edges resend it).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }
}

/// Run until `shutdown` resolves. Prints one line with the bound addresses
/// on stdout (`affgate-collector listening udp=ADDR|- quic=ADDR|- metrics=ADDR|- admin=ADDR|-`).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let c = Collector::start(cfg).await?;
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "affgate-collector listening udp={} quic={} metrics={} admin={}",
        show(c.udp_addr),
        show(c.quic_addr),
        show(c.metrics_addr),
        show(c.admin_addr)
    );
    tracing::info!("collector serving");
    shutdown.await;
    tracing::info!("shutting down");
    c.shutdown().await;
    Ok(())
}

/// An edge draining a backlog sends thousands of datagrams in a burst; the
/// default receive buffer drops most of a burst whenever the receiver is off
/// the CPU, and each drop costs a resend half a second later. Best effort:
/// the kernel caps the size at `net.core.rmem_max` and we say so.
fn enlarge_recv_buffer(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    if let Err(e) = s.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::warn!(error = %e, "could not enlarge the UDP receive buffer");
        return;
    }
    // Linux reports twice what it grants (the doubling covers bookkeeping).
    let got = s.recv_buffer_size().map(|b| b / 2).unwrap_or(0);
    if got < UDP_RECV_BUFFER {
        tracing::warn!(
            asked = UDP_RECV_BUFFER,
            got,
            "UDP receive buffer capped by net.core.rmem_max: raise it \
             (sysctl -w net.core.rmem_max={UDP_RECV_BUFFER}) or backlogs drain with drops and resends"
        );
    } else {
        tracing::info!(bytes = got, "UDP receive buffer");
    }
}
