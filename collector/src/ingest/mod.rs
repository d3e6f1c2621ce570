//! Ingest: datagrams in, committed rows, acks out (docs/delivery.md).
//!
//! - `window.rs`: the pure core: gather batches, dedup within a window,
//!   decide when to write, and what to acknowledge afterwards.
//! - `quic.rs`: the QUIC endpoint: datagrams and unidirectional streams in,
//!   ack datagrams out on the connection a batch came on.
//! - this file: the shell. A receiver task owns the UDP socket's read side:
//!   it opens each datagram (MAC first; nothing unauthenticated is decoded)
//!   and hands batch bodies to the writer over a bounded queue (full: the
//!   datagram is dropped and counted; the edge resends). QUIC connections
//!   feed the same queue. The one writer task fills the window, writes it to
//!   ClickHouse and PostgreSQL when due, and sends the acks only when both
//!   writes committed, each back the way its batch came ([`Acks`]).
//!
//! A window's age counts from when its oldest batch was *received*, not
//! from when the writer got to it, and the writer takes everything already
//! queued before it checks whether the window is due. So while an insert
//! runs, what arrives meanwhile becomes the next window, written as soon as
//! the insert returns: under load the windows grow by themselves (fewer,
//! larger inserts, which ClickHouse needs far less CPU for) without adding
//! lag, and when idle a window is still written `window_ms` after its first
//! batch arrived.

pub mod quic;
pub mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use affgate_schema::datagram::{self, Kind};
use affgate_schema::keys::KeyRing;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sockopt};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::store::clickhouse::ClickStore;
use crate::store::postgres::Inbox;
use window::{Peer, Route, Taken, Window};

/// Reasons an incoming datagram is dropped (closed set: metric labels).
/// `too_large`: a QUIC stream longer than [`quic::MAX_STREAM_BYTES`].
pub const DROP_REASONS: [&str; 9] = [
    "too_short",
    "magic",
    "version",
    "kind",
    "mac",
    "decode",
    "edge_id",
    "overload",
    "too_large",
];

/// Ranges per ack datagram: 16 bytes each keeps an ack well under 1200 bytes.
const RANGES_PER_ACK: usize = 48;

/// Queue between receiver and writer, in datagrams.
pub const QUEUE: usize = 16_384;

/// An opened batch body on its way to the writer.
#[derive(Debug)]
pub struct Received {
    pub peer: Peer,
    pub body: Vec<u8>,
    /// When its datagram (or QUIC stream) arrived: the window's age counts from it.
    pub at: Instant,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub datagrams: AtomicU64,
    /// UDP reads that carried more than one datagram (receive offload).
    pub coalesced_reads: AtomicU64,
    pub dropped: [AtomicU64; DROP_REASONS.len()],
    pub batches: AtomicU64,
    pub entries: AtomicU64,
    pub duplicates: AtomicU64,
    pub undecodable: AtomicU64,
    pub clicks_written: AtomicU64,
    pub postbacks_written: AtomicU64,
    pub postbacks_new: AtomicU64,
    pub windows_committed: AtomicU64,
    pub windows_failed: AtomicU64,
    pub clickhouse_errors: AtomicU64,
    pub postgres_errors: AtomicU64,
    pub acks_sent: AtomicU64,
    pub last_window_rows: AtomicU64,
    pub last_commit_us: AtomicU64,
    pub healthy: AtomicBool,
}

impl IngestStats {
    pub fn drop_reason(&self, reason: &str) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Read datagrams, verify, queue batch bodies for the writer.
///
/// The socket asks for generic receive offload (`UDP_GRO`, Linux 5.0+):
/// datagrams of one sender that arrive back to back (an edge's segmented
/// send, see the edge's `flush/udp.rs`) come up in one read, cut at the
/// size the kernel reports ([`segments`]), and each is then opened on its
/// own exactly as if it had been read alone. Without the option every read
/// is one datagram.
pub async fn receive(
    sock: Arc<UdpSocket>,
    keys: KeyRing,
    tx: mpsc::Sender<Received>,
    stats: Arc<IngestStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = nix::sys::socket::setsockopt(&*sock, sockopt::UdpGroSegment, &true) {
        tracing::info!(error = %e, "UDP receive offload unavailable; one datagram per read");
    }
    // A coalesced read is at most one IP packet's payload.
    let mut buf = vec![0u8; 65_536];
    let mut cmsg = nix::cmsg_space!(i32);
    let fd = sock.as_raw_fd();
    loop {
        let read = tokio::select! {
            r = sock.async_io(Interest::READABLE, || recv_coalesced(fd, &mut buf, &mut cmsg)) => r,
            _ = shutdown.changed() => return,
        };
        let (n, addr, stride) = match read {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        if stride < n {
            stats.coalesced_reads.fetch_add(1, Ordering::Relaxed);
        }
        for d in segments(&buf[..n], stride) {
            accept(&keys, d, Route::Udp(addr), &tx, &stats);
        }
    }
}

/// One `recvmsg`: bytes read, the sender, and the size of each datagram in
/// them (the GRO segment size; `n` when the read is one datagram).
#[allow(clippy::ptr_arg)] // nix's `recvmsg` takes the control buffer as a `Vec`
fn recv_coalesced(
    fd: RawFd,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> std::io::Result<(usize, SocketAddr, usize)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let n = msg.bytes;
    let mut stride = n;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(size) = c
                && let Ok(size) = usize::try_from(size)
                && size > 0
            {
                stride = size;
            }
        }
    }
    let addr = msg
        .address
        .as_ref()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        })
        .ok_or_else(|| std::io::Error::other("udp datagram without an IP source address"))?;
    Ok((n, addr, stride))
}

/// The datagrams in one (possibly coalesced) read: `stride` bytes each,
/// the last one possibly shorter. A zero stride is one datagram.
pub fn segments(bytes: &[u8], stride: usize) -> std::slice::Chunks<'_, u8> {
    bytes.chunks(if stride == 0 {
        bytes.len().max(1)
    } else {
        stride
    })
}

/// Count one datagram (or QUIC stream), open it, and queue its batch body
/// for the writer; dropped and counted by reason if it fails.
pub fn accept(
    keys: &KeyRing,
    bytes: &[u8],
    route: Route,
    tx: &mpsc::Sender<Received>,
    stats: &IngestStats,
) {
    stats.datagrams.fetch_add(1, Ordering::Relaxed);
    let (header, body) = match datagram::open(keys, now_ms(), bytes) {
        Ok(x) => x,
        Err(e) => {
            stats.drop_reason(e.reason());
            return;
        }
    };
    if header.kind != Kind::Batch {
        stats.drop_reason("kind");
        return;
    }
    let peer = Peer {
        edge_id: header.edge_id,
        route,
    };
    let received = Received {
        peer,
        body: body.to_vec(),
        at: Instant::now(),
    };
    if tx.try_send(received).is_err() {
        stats.drop_reason("overload");
    }
}

/// Where acks go out.
pub trait AckSink: Send + Sync {
    fn send_ack(&self, to: Route, bytes: &[u8])
    -> impl Future<Output = std::io::Result<()>> + Send;
}

/// The collector's ack sink: UDP acks from the ingest socket, QUIC acks as
/// datagrams on the connection the batch came on.
#[derive(Debug, Default)]
pub struct Acks {
    pub udp: Option<Arc<UdpSocket>>,
    pub quic: quic::Connections,
}

impl AckSink for Acks {
    async fn send_ack(&self, to: Route, bytes: &[u8]) -> std::io::Result<()> {
        match to {
            Route::Udp(addr) => match &self.udp {
                Some(sock) => sock.send_to(bytes, addr).await.map(|_| ()),
                None => Err(std::io::Error::other("no udp socket")),
            },
            Route::Quic(id) => self.quic.send_datagram(id, bytes),
        }
    }
}

/// The stores a window commits to.
#[derive(Debug, Clone)]
pub struct Stores {
    pub clicks: ClickStore,
    pub inbox: Inbox,
    /// Woken when new postbacks are in the inbox (conversion processing).
    pub inbox_wake: Option<Arc<tokio::sync::Notify>>,
}

/// Fill windows from `rx`, commit them when due, ack what committed.
#[allow(clippy::too_many_arguments)]
pub async fn write<S: AckSink>(
    mut rx: mpsc::Receiver<Received>,
    sink: Arc<S>,
    stores: Stores,
    keys: KeyRing,
    window_age: Duration,
    window_rows: usize,
    stats: Arc<IngestStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut window = Window::new(window_age, window_rows);
    let mut nonce = now_ms() << 16;
    stats.healthy.store(true, Ordering::Relaxed);
    loop {
        let deadline = window.deadline();
        tokio::select! {
            m = rx.recv() => {
                let Some(first) = m else { return };
                let healthy = stats.healthy.load(Ordering::Relaxed);
                add(&mut window, first, healthy, &stats);
                // Everything already waiting joins this window (up to its
                // row bound): after a slow insert that is the backlog.
                while !window.is_full() {
                    match rx.try_recv() {
                        Ok(r) => add(&mut window, r, healthy, &stats),
                        Err(_) => break,
                    }
                }
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = shutdown.changed() => return,
        }
        if window.is_due(Instant::now()) {
            stats.batches.store(window.batches, Ordering::Relaxed);
            stats.entries.store(window.entries, Ordering::Relaxed);
            stats.duplicates.store(window.duplicates, Ordering::Relaxed);
            stats
                .undecodable
                .store(window.undecodable, Ordering::Relaxed);
            let taken = window.take();
            commit(taken, &*sink, &stores, &keys, &mut nonce, &stats).await;
        }
    }
}

fn add(window: &mut Window, r: Received, healthy: bool, stats: &IngestStats) {
    if let Err(e) = window.add_batch(r.peer, &r.body, healthy, r.at) {
        stats.drop_reason(e.reason());
        tracing::debug!(edge_id = r.peer.edge_id, error = %e, "batch refused");
    }
}

/// Write one window; ack only if every write committed.
async fn commit<S: AckSink>(
    taken: Taken,
    sink: &S,
    stores: &Stores,
    keys: &KeyRing,
    nonce: &mut u64,
    stats: &IngestStats,
) {
    let started = Instant::now();
    let received_ms = now_ms();
    let (c, p) = tokio::join!(
        async {
            if taken.clicks.is_empty() {
                Ok(())
            } else {
                stores.clicks.insert(&taken.clicks, received_ms).await
            }
        },
        async {
            // Quarantined clicks are noted in PostgreSQL too, so a later
            // conversion of one earns nothing; rare, and idempotent.
            let quarantined: Vec<(&str, u64)> = taken
                .clicks
                .iter()
                .filter(|c| c.quarantined)
                .map(|c| (c.click_id.as_str(), c.ts_ms))
                .collect();
            stores.inbox.insert_quarantined(&quarantined).await?;
            if taken.postbacks.is_empty() {
                Ok(0)
            } else {
                stores.inbox.insert(&taken.postbacks).await
            }
        }
    );
    let mut ok = true;
    if let Err(e) = &c {
        ok = false;
        stats.clickhouse_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rows = taken.clicks.len(), error = %e, "clickhouse insert failed; window not acknowledged, edges will resend");
    }
    match &p {
        Ok(new) => {
            stats.postbacks_new.fetch_add(*new, Ordering::Relaxed);
            if *new > 0
                && let Some(w) = &stores.inbox_wake
            {
                w.notify_one();
            }
        }
        Err(e) => {
            ok = false;
            stats.postgres_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(rows = taken.postbacks.len(), error = %e, "postgres inbox insert failed; window not acknowledged, edges will resend");
        }
    }
    stats.healthy.store(ok, Ordering::Relaxed);
    stats
        .last_commit_us
        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats
        .last_window_rows
        .store(taken.rows() as u64, Ordering::Relaxed);
    if !ok {
        stats.windows_failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.windows_committed.fetch_add(1, Ordering::Relaxed);
    stats
        .clicks_written
        .fetch_add(taken.clicks.len() as u64, Ordering::Relaxed);
    stats
        .postbacks_written
        .fetch_add(taken.postbacks.len() as u64, Ordering::Relaxed);
    let mut body = Vec::with_capacity(256);
    let mut sealed = Vec::with_capacity(1200);
    for (peer, ranges) in &taken.acks {
        let chunks: Vec<&[(u64, u64)]> = if ranges.is_empty() {
            vec![&[]]
        } else {
            ranges.chunks(RANGES_PER_ACK).collect()
        };
        for chunk in chunks {
            window::encode_ack(peer.edge_id, chunk, &mut body);
            *nonce += 1;
            datagram::seal(
                keys.current(),
                Kind::Ack,
                peer.edge_id,
                *nonce,
                &body,
                &mut sealed,
            );
            match sink.send_ack(peer.route, &sealed).await {
                Ok(()) => {
                    stats.acks_sent.fetch_add(1, Ordering::Relaxed);
                }
                // A lost ack only means a resend, deduplicated by the stores.
                Err(e) => tracing::debug!(to = %peer.route, error = %e, "ack send failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn a_coalesced_read_splits_at_the_stride_with_a_shorter_last() {
        let bytes: Vec<u8> = (0..25u8).collect();
        let parts: Vec<&[u8]> = segments(&bytes, 10).collect();
        assert_eq!(parts, [&bytes[..10], &bytes[10..20], &bytes[20..]]);
        let one: Vec<&[u8]> = segments(&bytes, 25).collect();
        assert_eq!(one, [&bytes[..]], "stride = length: one datagram");
        let zero: Vec<&[u8]> = segments(&bytes, 0).collect();
        assert_eq!(zero, [&bytes[..]], "no stride reported: one datagram");
        assert_eq!(segments(&[], 0).count(), 0, "an empty read is no datagram");
    }
}
