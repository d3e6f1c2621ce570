//! The flusher's shell: owns the ring's consumer, a [`Transport`] and the
//! timer, and only moves records and bytes between them and the
//! [`Outbox`]. Every decision is the Outbox's.
//!
//! Each tick (`flush_interval_ms`): poll new records from the ring (as many
//! as the Outbox has room for), then send every datagram the Outbox says is
//! due. Between ticks: acks from collectors are opened (MAC), handed to the
//! Outbox, and the locations it returns are acknowledged in the ring, which
//! frees them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use affgate_schema::datagram::{self, Kind};
use affgate_schema::keys::KeyRing;
use tokio::sync::watch;

use super::outbox::{Outbox, OutboxStats, Outgoing};
use crate::ring::{Record, Ring};

/// Moves datagrams to and from collectors. `recv` must be cancel-safe: the
/// shell drops its future whenever the timer fires first.
pub trait Transport: Send + 'static {
    /// Send one datagram to collector `collector` (index in `[delivery] collectors`).
    fn send(
        &mut self,
        collector: usize,
        out: &Outgoing,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Send `outs` in order; returns how many failed (those records stay in
    /// flight and are resent on their deadline). The default sends one at a
    /// time; UDP sends runs of them in one call ([`super::udp::gso_run`]).
    fn send_all(&mut self, outs: &[Outgoing]) -> impl Future<Output = usize> + Send {
        async move {
            let mut failed = 0;
            for out in outs {
                if let Err(e) = self.send(out.collector, out).await {
                    tracing::debug!(collector = out.collector, error = %e, "send failed");
                    failed += 1;
                }
            }
            failed
        }
    }
    /// Segmented sends so far (none for transports without them).
    fn gso_stats(&self) -> GsoStats {
        GsoStats::default()
    }
    /// The next datagram from any collector, with that collector's index.
    fn recv(&mut self) -> impl Future<Output = std::io::Result<(usize, Vec<u8>)>> + Send;
}

/// A transport's segmented sends (`flush/udp.rs`); all zero for one that
/// sends a datagram per call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GsoStats {
    /// Segmentation offload is on (it turns off for good when refused).
    pub offload: bool,
    /// `sendmsg` calls that carried more than one datagram.
    pub segmented_sends: u64,
    /// Datagrams sent in them.
    pub segmented_datagrams: u64,
}

/// Datagrams the shell polls from the Outbox before handing them to the
/// transport at once: a segmented UDP send's worth.
const SEND_CHUNK: usize = super::udp::GSO_MAX_SEGMENTS;

/// How often the flusher publishes the Outbox's stats for `/metrics`.
const STATS_EVERY: Duration = Duration::from_millis(100);

/// A datagram whose source matches no configured collector: credited to
/// the current one (its MAC, not its address, makes it trustworthy).
pub const UNKNOWN_COLLECTOR: usize = usize::MAX;

/// Reasons an incoming datagram is dropped; a closed set for a metric label.
pub const DROP_REASONS: [&str; 8] = [
    "too_short",
    "magic",
    "version",
    "kind",
    "mac",
    "edge_id",
    "decode",
    "ranges",
];

/// What the flusher shows on `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub outbox: Mutex<OutboxStats>,
    pub dropped: [AtomicU64; DROP_REASONS.len()],
    pub send_errors: AtomicU64,
    pub ring_errors: AtomicU64,
    /// Segmented UDP sends (`sendmsg` calls carrying several datagrams).
    pub segmented_sends: AtomicU64,
    /// Datagrams that went out in segmented sends.
    pub segmented_datagrams: AtomicU64,
    /// 1 while UDP segmentation offload is on, else 0.
    pub segmentation_offload: AtomicU64,
}

impl DeliveryStats {
    fn drop_reason(&self, reason: &str) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Run until shutdown. Holds the ring's single consumer for its lifetime.
pub async fn run<T: Transport>(
    ring: Arc<Ring>,
    mut outbox: Outbox,
    keys: KeyRing,
    mut transport: T,
    interval: Duration,
    stats: Arc<DeliveryStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(mut consumer) = ring.consumer() else {
        tracing::error!("the ring already has a consumer; delivery is not running");
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polled: Vec<Record> = Vec::with_capacity(1024);
    let mut outgoing: Vec<Outgoing> = Vec::with_capacity(SEND_CHUNK);
    let mut rng = fastrand::Rng::new();
    let mut published: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let room = outbox.room();
                if room > 0 {
                    polled.clear();
                    if let Err(e) = consumer.poll(room, &mut polled) {
                        stats.ring_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "ring poll failed; retrying next tick");
                    }
                    for rec in polled.drain(..) {
                        if let Err(u) = outbox.push(rec, now) {
                            tracing::error!(error = %u, "dropping an undecodable ring record (event lost)");
                            if let Err(e) = consumer.ack(u.loc) {
                                tracing::warn!(error = %e, "could not free an undecodable record");
                            }
                        }
                    }
                }
                outbox.set_jitter(rng.f64() * 0.4 + 0.8);
                loop {
                    outgoing.clear();
                    while outgoing.len() < SEND_CHUNK {
                        match outbox.poll_datagram(now) {
                            Some(out) => outgoing.push(out),
                            None => break,
                        }
                    }
                    if outgoing.is_empty() {
                        break;
                    }
                    // Failed sends' records stay in flight and are resent on their deadline.
                    let failed = transport.send_all(&outgoing).await;
                    stats.send_errors.fetch_add(failed as u64, Ordering::Relaxed);
                }
                // A snapshot walks every record in flight: often enough for
                // scrapes and for tests polling a gauge, not every tick.
                if published.is_none_or(|p| now.duration_since(p) >= STATS_EVERY) {
                    published = Some(now);
                    if let Ok(mut s) = stats.outbox.lock() {
                        *s = outbox.stats();
                    }
                    let g = transport.gso_stats();
                    stats.segmented_sends.store(g.segmented_sends, Ordering::Relaxed);
                    stats.segmented_datagrams.store(g.segmented_datagrams, Ordering::Relaxed);
                    stats.segmentation_offload.store(u64::from(g.offload), Ordering::Relaxed);
                }
            }
            r = transport.recv() => {
                let (from, bytes) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive failed");
                        continue;
                    }
                };
                let now = Instant::now();
                let (header, body) = match datagram::open(&keys, crate::http::now_ms(), &bytes) {
                    Ok(x) => x,
                    Err(e) => {
                        stats.drop_reason(e.reason());
                        continue;
                    }
                };
                if header.kind != Kind::Ack {
                    stats.drop_reason("kind");
                    continue;
                }
                let from = if from == UNKNOWN_COLLECTOR { outbox.current_collector() } else { from };
                match outbox.on_ack(from, body, now) {
                    Ok(locs) => {
                        for loc in locs {
                            if let Err(e) = consumer.ack(loc) {
                                stats.ring_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "ring ack failed");
                            }
                        }
                    }
                    Err(e) => {
                        stats.drop_reason(e.reason());
                        tracing::debug!(from, error = %e, "ack refused");
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
