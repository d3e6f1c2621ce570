//! Tracing set-up, and `/metrics` (Prometheus text) on `[metrics] listen`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conversions::Processor;
use crate::conversions::mirror::Mirror;
use crate::ingest::{DROP_REASONS, IngestStats};
use crate::propagate::Propagator;

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Telemetry {
    pub ingest: Arc<IngestStats>,
    pub conversions: Arc<Processor>,
    pub mirror: Arc<Mirror>,
    pub propagator: Option<Arc<Propagator>>,
}

/// One metric family: `# HELP`, `# TYPE` and its series (`labels` as
/// written inside `{}`, empty for none).
fn family(out: &mut String, kind: &str, name: &str, help: &str, series: &[(&str, u64)]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// Prometheus text of every counter.
pub fn render_all(t: &Telemetry) -> String {
    use std::fmt::Write as _;
    let mut out = render(&t.ingest);
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let c = &t.conversions.stats;
    family(
        &mut out,
        "counter",
        "affgate_collector_postbacks_processed_total",
        "Inbox postbacks processed, by outcome.",
        &[
            ("outcome=\"recorded\"", l(&c.recorded)),
            ("outcome=\"not_applied\"", l(&c.not_applied)),
            ("outcome=\"refused\"", l(&c.refused)),
        ],
    );
    let oldest = c.oldest_claimed_ts_ms.load(Ordering::Relaxed);
    let lag_ms = if oldest == 0 {
        0
    } else {
        crate::ingest::now_ms().saturating_sub(oldest)
    };
    let _ = writeln!(
        out,
        "# HELP affgate_collector_inbox_lag_seconds Age of the oldest postback the conversion processor last claimed from the inbox (0 once it found the inbox drained); grows while processing is stuck.\n# TYPE affgate_collector_inbox_lag_seconds gauge\naffgate_collector_inbox_lag_seconds {}",
        lag_ms as f64 / 1e3
    );
    family(
        &mut out,
        "counter",
        "affgate_collector_conversion_errors_total",
        "Failed conversion processing passes (retried).",
        &[("", l(&c.errors))],
    );
    family(
        &mut out,
        "counter",
        "affgate_collector_conversion_events_mirrored_total",
        "Conversion events written to ClickHouse.",
        &[("", l(&t.mirror.stats.mirrored))],
    );
    family(
        &mut out,
        "counter",
        "affgate_collector_mirror_inserts_total",
        "ClickHouse inserts made by the conversion mirror (one per page).",
        &[("", l(&t.mirror.stats.inserts))],
    );
    family(
        &mut out,
        "counter",
        "affgate_collector_mirror_errors_total",
        "Failed mirror passes (retried).",
        &[("", l(&t.mirror.stats.errors))],
    );
    if let Some(p) = &t.propagator {
        let s = &p.stats;
        family(
            &mut out,
            "counter",
            "affgate_collector_redis_writes_total",
            "Redis keys written and announced.",
            &[("", l(&s.writes))],
        );
        family(
            &mut out,
            "counter",
            "affgate_collector_redis_failures_total",
            "Failed propagations (caught up by a full publication).",
            &[("", l(&s.failures))],
        );
        family(
            &mut out,
            "counter",
            "affgate_collector_redis_full_publications_total",
            "Full publications of the control plane.",
            &[("", l(&s.full_syncs))],
        );
        family(
            &mut out,
            "gauge",
            "affgate_collector_redis_up",
            "1 while the last Redis write succeeded.",
            &[("", u64::from(s.up.load(Ordering::Relaxed)))],
        );
    }
    out
}

/// Logs to stderr, filtered by `AFFGATE_LOG` (then `RUST_LOG`, default `info`).
pub fn init_tracing() {
    let filter = std::env::var("AFFGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prometheus text of the ingest counters.
pub fn render(s: &IngestStats) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        "affgate_collector_datagrams_received_total",
        "Datagrams read from the ingest socket.",
        l(&s.datagrams),
    );
    counter(
        "affgate_collector_udp_coalesced_reads_total",
        "UDP reads that carried several datagrams at once (receive offload).",
        l(&s.coalesced_reads),
    );
    counter(
        "affgate_collector_batches_total",
        "Batches accepted into a write window, probes included.",
        l(&s.batches),
    );
    counter(
        "affgate_collector_entries_total",
        "Entries received, duplicates included.",
        l(&s.entries),
    );
    counter(
        "affgate_collector_duplicate_entries_total",
        "Entries already in the same window.",
        l(&s.duplicates),
    );
    counter(
        "affgate_collector_undecodable_entries_total",
        "Entries acknowledged without a write: their event does not decode.",
        l(&s.undecodable),
    );
    counter(
        "affgate_collector_clicks_written_total",
        "Clicks committed to ClickHouse.",
        l(&s.clicks_written),
    );
    counter(
        "affgate_collector_postbacks_written_total",
        "Postbacks committed to the PostgreSQL inbox (duplicates included).",
        l(&s.postbacks_written),
    );
    counter(
        "affgate_collector_postbacks_new_total",
        "Postbacks that were new to the inbox.",
        l(&s.postbacks_new),
    );
    counter(
        "affgate_collector_windows_committed_total",
        "Write windows committed and acknowledged.",
        l(&s.windows_committed),
    );
    counter(
        "affgate_collector_windows_failed_total",
        "Write windows dropped unacknowledged (a store failed).",
        l(&s.windows_failed),
    );
    counter(
        "affgate_collector_acks_sent_total",
        "Ack datagrams sent.",
        l(&s.acks_sent),
    );
    let _ = writeln!(
        out,
        "# HELP affgate_collector_insert_errors_total Failed writes, by store.\n# TYPE affgate_collector_insert_errors_total counter"
    );
    let _ = writeln!(
        out,
        "affgate_collector_insert_errors_total{{store=\"clickhouse\"}} {}",
        l(&s.clickhouse_errors)
    );
    let _ = writeln!(
        out,
        "affgate_collector_insert_errors_total{{store=\"postgres\"}} {}",
        l(&s.postgres_errors)
    );
    let _ = writeln!(
        out,
        "# HELP affgate_collector_datagrams_dropped_total Datagrams dropped, by reason.\n# TYPE affgate_collector_datagrams_dropped_total counter"
    );
    for (i, r) in DROP_REASONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "affgate_collector_datagrams_dropped_total{{reason=\"{r}\"}} {}",
            l(&s.dropped[i])
        );
    }
    let _ = writeln!(
        out,
        "# HELP affgate_collector_window_rows Rows in the last write window.\n# TYPE affgate_collector_window_rows gauge\naffgate_collector_window_rows {}",
        l(&s.last_window_rows)
    );
    let _ = writeln!(
        out,
        "# HELP affgate_collector_commit_seconds Duration of the last window commit.\n# TYPE affgate_collector_commit_seconds gauge\naffgate_collector_commit_seconds {}",
        l(&s.last_commit_us) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP affgate_collector_stores_healthy 1 while the last window committed.\n# TYPE affgate_collector_stores_healthy gauge\naffgate_collector_stores_healthy {}",
        u8::from(s.healthy.load(Ordering::Relaxed))
    );
    out
}

/// Serve `/metrics` until shutdown.
pub async fn serve_metrics(
    listener: TcpListener,
    stats: Arc<Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let stats = stats.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let stats = stats.clone();
            async move {
                let mut r = if req.uri().path() == "/metrics" {
                    hyper::Response::new(Full::new(Bytes::from(render_all(&stats))))
                } else {
                    let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"not found\n")));
                    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                    r
                };
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                Ok::<_, Infallible>(r)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
