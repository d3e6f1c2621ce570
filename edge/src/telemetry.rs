//! Request metrics kept per thread, summed when `/metrics` is scraped, and
//! the Prometheus text rendering of everything the edge exposes.
//!
//! The hot path touches only its own thread's cache-line-padded shard with
//! relaxed adds: no shared counter per request (STYLE.md).

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Routes, a closed set for the `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Click = 0,
    Postback = 1,
    Health = 2,
    Other = 3,
}

const ROUTES: [(Route, &str); 4] = [
    (Route::Click, "click"),
    (Route::Postback, "postback"),
    (Route::Health, "health"),
    (Route::Other, "other"),
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Latency bucket upper bounds, microseconds.
const BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
const SHARDS: usize = 32;

#[repr(align(128))]
#[derive(Debug)]
struct Shard {
    requests: [[AtomicU64; 5]; 4],
    /// One more bucket than bounds: +Inf.
    latency: [[AtomicU64; BUCKETS_US.len() + 1]; 4],
    latency_sum_ns: [AtomicU64; 4],
    /// Ring appends that failed (data at risk).
    append_errors: AtomicU64,
    /// Click served by fallback because the link was paused/capped or unknown with Redis down.
    fallbacks: AtomicU64,
    /// Plain-listener connections the fast path handed to hyper.
    handovers: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            requests: Default::default(),
            latency: Default::default(),
            latency_sum_ns: Default::default(),
            append_errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            handovers: AtomicU64::new(0),
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    shards: Box<[Shard]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
    THREAD_SHARD.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT_THREAD.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(i);
        }
        i
    })
}

impl Metrics {
    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    pub fn record(&self, route: Route, status: u16, elapsed: Duration) {
        let s = self.shard();
        let r = route as usize;
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        s.requests[r][class].fetch_add(1, Ordering::Relaxed);
        let us = elapsed.as_micros() as u64;
        let b = BUCKETS_US
            .iter()
            .position(|&ub| us <= ub)
            .unwrap_or(BUCKETS_US.len());
        s.latency[r][b].fetch_add(1, Ordering::Relaxed);
        s.latency_sum_ns[r].fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn append_error(&self) {
        self.shard().append_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fallback(&self) {
        self.shard().fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handover(&self) {
        self.shard().handovers.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections handed from the fast path to hyper so far.
    pub fn handovers(&self) -> u64 {
        self.sum(|s| s.handovers.load(Ordering::Relaxed))
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    /// Request counters and latency histograms in Prometheus text format.
    pub fn render_requests(&self, out: &mut String) {
        out.push_str("# HELP affgate_edge_http_requests_total HTTP requests answered, by route and status class.\n");
        out.push_str("# TYPE affgate_edge_http_requests_total counter\n");
        for (route, name) in ROUTES {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = self.sum(|s| s.requests[route as usize][c].load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "affgate_edge_http_requests_total{{route=\"{name}\",status=\"{class}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP affgate_edge_http_request_duration_seconds Time from request parsed to response ready.\n");
        out.push_str("# TYPE affgate_edge_http_request_duration_seconds histogram\n");
        for (route, name) in ROUTES {
            let r = route as usize;
            let mut cumulative = 0;
            for (b, ub) in BUCKETS_US.iter().enumerate() {
                cumulative += self.sum(|s| s.latency[r][b].load(Ordering::Relaxed));
                let le = *ub as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "affgate_edge_http_request_duration_seconds_bucket{{route=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += self.sum(|s| s.latency[r][BUCKETS_US.len()].load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "affgate_edge_http_request_duration_seconds_bucket{{route=\"{name}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum_ns = self.sum(|s| s.latency_sum_ns[r].load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "affgate_edge_http_request_duration_seconds_sum{{route=\"{name}\"}} {}",
                sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "affgate_edge_http_request_duration_seconds_count{{route=\"{name}\"}} {cumulative}"
            );
        }
        counter(
            out,
            "affgate_edge_ring_append_errors_total",
            "Events that could not be stored in the ring or spill (data at risk).",
            self.sum(|s| s.append_errors.load(Ordering::Relaxed)),
        );
        counter(
            out,
            "affgate_edge_fallback_redirects_total",
            "Clicks sent to a fallback URL (paused link, closed offer, or unknown slug with Redis unreachable).",
            self.sum(|s| s.fallbacks.load(Ordering::Relaxed)),
        );
        counter(
            out,
            "affgate_edge_http_handovers_total",
            "Plain HTTP connections the fast path handed to hyper (a request it does not serve itself).",
            self.handovers(),
        );
    }

    /// Total requests of a route, all statuses (for tests and `ring inspect` cross-checks).
    pub fn requests(&self, route: Route) -> u64 {
        self.sum(|s| {
            s.requests[route as usize]
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum()
        })
    }
}

/// Append one counter with its HELP and TYPE lines.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Append one gauge with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Start `tracing` to stderr; `AFFGATE_LOG` (or `RUST_LOG`) filters, default `info`.
pub fn init_tracing() {
    let filter = std::env::var("AFFGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let m = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.record(Route::Click, 302, Duration::from_micros(40));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.requests(Route::Click), 8000);
        let mut out = String::new();
        m.render_requests(&mut out);
        assert!(
            out.contains("affgate_edge_http_requests_total{route=\"click\",status=\"3xx\"} 8000"),
            "{out}"
        );
        assert!(out.contains("affgate_edge_http_request_duration_seconds_bucket{route=\"click\",le=\"0.00005\"} 8000"), "{out}");
        assert!(out.contains("affgate_edge_http_request_duration_seconds_bucket{route=\"click\",le=\"0.000025\"} 0"), "{out}");
    }
}
