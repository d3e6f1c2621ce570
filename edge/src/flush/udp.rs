//! The UDP transport: one unconnected socket, datagrams to each collector's
//! address, acks read from the same socket.
//!
//! An ack is trusted for its MAC, not its source address; the source only
//! tells the Outbox which collector answered (for failback), so a reply
//! from an address we did not send to is attributed by port, then to
//! "unknown".
//!
//! # Segmentation offload
//!
//! Where the kernel has UDP segmentation offload (`UDP_SEGMENT`, Linux
//! 4.18+), a run of datagrams to one collector goes out in one `sendmsg`:
//! equal-sized datagrams and at most one shorter last one, the kernel (or
//! the NIC) cutting them apart again, so each still leaves as its own
//! datagram on the wire. The Outbox pads the datagrams of a burst to full
//! size to make such runs ([`super::outbox::OutboxConfig::pad_full`]); see
//! [`gso_run`] for the rules. Oversize datagrams always go alone. A
//! segmented send the kernel refuses (`EIO`, `EINVAL`: a device or path
//! that cannot segment) turns the offload off for good, with a warning, and
//! that run and everything after it go one datagram per call.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg, sockopt};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::outbox::Outgoing;
use super::shell::{GsoStats, Transport, UNKNOWN_COLLECTOR};

/// Most datagrams in one segmented send (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 on older kernels, 128 on newer ones).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one segmented send: a UDP payload's bound, less headroom.
pub const GSO_MAX_BYTES: usize = 64_000;

#[derive(Debug)]
pub struct UdpTransport {
    sock: UdpSocket,
    addrs: Vec<SocketAddr>,
    buf: Vec<u8>,
    /// Largest datagram that may lead a segmented run (`max_datagram_bytes`);
    /// 0 when segmentation offload is off.
    gso_segment_max: usize,
    /// Segmented sends that went out, for `/metrics`.
    stats: GsoStats,
}

/// Resolve `host:port` strings, in order.
pub async fn resolve(collectors: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(collectors.len());
    for c in collectors {
        let a = tokio::net::lookup_host(c.as_str())
            .await
            .with_context(|| format!("[delivery] collectors: resolve `{c}`"))?
            .next()
            .with_context(|| format!("[delivery] collectors: `{c}` resolves to no address"))?;
        addrs.push(a);
    }
    Ok(addrs)
}

/// How many of `outs` (at least one) go in one segmented send: the first,
/// then, to the same collector, datagrams exactly as long as the first, and
/// at most one shorter one, which ends the run; at most
/// [`GSO_MAX_SEGMENTS`] datagrams and [`GSO_MAX_BYTES`] bytes. A first
/// datagram longer than `segment_max` (oversize) or a zero `segment_max`
/// (offload off) makes a run of one.
pub fn gso_run(outs: &[Outgoing], segment_max: usize) -> usize {
    let Some(first) = outs.first() else { return 0 };
    let seg = first.bytes.len();
    if seg == 0 || seg > segment_max || first.oversize {
        return 1;
    }
    let mut n = 1;
    let mut total = seg;
    for o in &outs[1..] {
        let len = o.bytes.len();
        if n == GSO_MAX_SEGMENTS
            || o.collector != first.collector
            || len > seg
            || len == 0
            || total + len > GSO_MAX_BYTES
        {
            break;
        }
        n += 1;
        total += len;
        if len < seg {
            break;
        }
    }
    n
}

impl UdpTransport {
    /// Bind an ephemeral socket of the collectors' address family. Runs of
    /// datagrams up to `max_datagram_bytes` long are sent with segmentation
    /// offload when the kernel has it ([`UdpTransport::segmentation`]).
    pub async fn bind(
        collectors: &[String],
        max_datagram_bytes: usize,
    ) -> anyhow::Result<UdpTransport> {
        let addrs = resolve(collectors).await?;
        let v4 = addrs.iter().all(SocketAddr::is_ipv4);
        let v6 = addrs.iter().all(SocketAddr::is_ipv6);
        let local: SocketAddr = match (v4, v6) {
            (true, _) => "0.0.0.0:0".parse()?,
            (_, true) => "[::]:0".parse()?,
            _ => bail!("[delivery] collectors: mix IPv4 and IPv6 addresses; use one family"),
        };
        let sock = UdpSocket::bind(local)
            .await
            .context("bind the delivery UDP socket")?;
        // The option reads back when the kernel knows it.
        let gso = nix::sys::socket::getsockopt(&sock, sockopt::UdpGsoSegment).is_ok();
        if !gso {
            tracing::info!("UDP segmentation offload unavailable; one datagram per send");
        }
        Ok(UdpTransport {
            sock,
            addrs,
            buf: vec![0; 65_536],
            gso_segment_max: if gso { max_datagram_bytes } else { 0 },
            stats: GsoStats::default(),
        })
    }

    fn addr(&self, collector: usize) -> SocketAddr {
        self.addrs[collector % self.addrs.len()]
    }

    /// Whether runs of datagrams go out in one segmented send.
    pub fn segmentation(&self) -> bool {
        self.gso_segment_max > 0
    }

    /// Send `run` (see [`gso_run`]) to `to` in one `sendmsg`: segmented
    /// when it holds more than one datagram.
    async fn send_run(&self, to: SocketAddr, run: &[Outgoing]) -> std::io::Result<()> {
        let iov: Vec<IoSlice<'_>> = run.iter().map(|o| IoSlice::new(&o.bytes)).collect();
        let segment = u16::try_from(run[0].bytes.len()).unwrap_or(u16::MAX);
        let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
        let cmsgs: &[ControlMessage<'_>] = if run.len() > 1 { &cmsg } else { &[] };
        let addr = SockaddrStorage::from(to);
        let fd = self.sock.as_raw_fd();
        self.sock
            .async_io(Interest::WRITABLE, || {
                sendmsg(fd, &iov, cmsgs, MsgFlags::empty(), Some(&addr))
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            })
            .await
    }
}

impl Transport for UdpTransport {
    async fn send(&mut self, collector: usize, out: &Outgoing) -> std::io::Result<()> {
        self.send_run(self.addr(collector), std::slice::from_ref(out))
            .await
    }

    async fn send_all(&mut self, outs: &[Outgoing]) -> usize {
        let mut failed = 0;
        let mut i = 0;
        while i < outs.len() {
            let n = gso_run(&outs[i..], self.gso_segment_max);
            let run = &outs[i..i + n];
            match self.send_run(self.addr(run[0].collector), run).await {
                Ok(()) => {
                    if n > 1 {
                        self.stats.segmented_sends += 1;
                        self.stats.segmented_datagrams += n as u64;
                    }
                    i += n;
                }
                Err(e)
                    if n > 1
                        && matches!(e.raw_os_error(), Some(c) if c == Errno::EIO as i32 || c == Errno::EINVAL as i32) =>
                {
                    // Not sent: this run goes again, one datagram at a time.
                    tracing::warn!(error = %e, "UDP segmentation offload refused; sending one datagram per call from now on");
                    self.gso_segment_max = 0;
                }
                Err(e) => {
                    tracing::debug!(collector = run[0].collector, datagrams = n, error = %e, "send failed");
                    failed += n;
                    i += n;
                }
            }
        }
        failed
    }

    fn gso_stats(&self) -> GsoStats {
        GsoStats {
            offload: self.segmentation(),
            ..self.stats
        }
    }

    async fn recv(&mut self) -> std::io::Result<(usize, Vec<u8>)> {
        let (n, from) = self.sock.recv_from(&mut self.buf).await?;
        let idx = self
            .addrs
            .iter()
            .position(|a| *a == from)
            .or_else(|| self.addrs.iter().position(|a| a.port() == from.port()))
            .unwrap_or(UNKNOWN_COLLECTOR);
        Ok((idx, self.buf[..n].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(collector: usize, len: usize) -> Outgoing {
        Outgoing {
            collector,
            bytes: vec![0; len],
            records: 1,
            oversize: false,
            probe: false,
        }
    }

    fn runs(outs: &[Outgoing], segment_max: usize) -> Vec<usize> {
        let mut v = Vec::new();
        let mut i = 0;
        while i < outs.len() {
            let n = gso_run(&outs[i..], segment_max);
            assert!(n >= 1, "a run holds at least one datagram");
            v.push(n);
            i += n;
        }
        v
    }

    #[test]
    fn equal_datagrams_and_one_shorter_make_one_run() {
        let outs = [out(0, 1200), out(0, 1200), out(0, 1200), out(0, 700)];
        assert_eq!(runs(&outs, 1200), vec![4]);
    }

    #[test]
    fn a_shorter_datagram_ends_the_run() {
        let outs = [out(0, 1200), out(0, 900), out(0, 1200), out(0, 1200)];
        assert_eq!(runs(&outs, 1200), vec![2, 2]);
    }

    #[test]
    fn a_longer_datagram_starts_a_new_run() {
        let outs = [out(0, 800), out(0, 1200), out(0, 1200)];
        assert_eq!(runs(&outs, 1200), vec![1, 2]);
    }

    #[test]
    fn another_collector_starts_a_new_run() {
        let outs = [out(0, 1200), out(1, 1200), out(1, 1200)];
        assert_eq!(runs(&outs, 1200), vec![1, 2]);
    }

    #[test]
    fn oversize_and_offload_off_go_alone() {
        let mut big = out(0, 3000);
        big.oversize = true;
        let outs = [big, out(0, 1200), out(0, 1200)];
        assert_eq!(runs(&outs, 1200), vec![1, 2]);
        assert_eq!(runs(&outs, 0), vec![1, 1, 1], "offload off: one per send");
    }

    #[test]
    fn runs_are_bounded_in_count_and_bytes() {
        let outs: Vec<Outgoing> = (0..200).map(|_| out(0, 1200)).collect();
        let r = runs(&outs, 1200);
        let per_run = (GSO_MAX_BYTES / 1200).min(GSO_MAX_SEGMENTS);
        assert!(r.iter().all(|&n| n <= per_run), "{r:?}");
        assert_eq!(r.iter().sum::<usize>(), 200);
        let small: Vec<Outgoing> = (0..200).map(|_| out(0, 600)).collect();
        assert_eq!(runs(&small, 1200)[0], GSO_MAX_SEGMENTS);
    }

    /// The kernel really cuts a segmented send into its datagrams: a plain
    /// receiver (no GRO) reads each one whole.
    #[tokio::test]
    async fn a_segmented_send_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.expect("bind receiver");
        let to = rx.local_addr().expect("receiver address").to_string();
        let mut tx = UdpTransport::bind(&[to], 1200).await.expect("bind sender");
        let outs: Vec<Outgoing> = (0..5u8)
            .map(|i| Outgoing {
                bytes: vec![i; if i == 4 { 300 } else { 1200 }],
                ..out(0, 0)
            })
            .collect();
        assert_eq!(tx.send_all(&outs).await, 0, "no send failed");
        if tx.segmentation() {
            assert_eq!(
                tx.gso_stats(),
                GsoStats {
                    offload: true,
                    segmented_sends: 1,
                    segmented_datagrams: 5
                },
                "one segmented send"
            );
        }
        let mut buf = vec![0u8; 65_536];
        for i in 0..5u8 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv(&mut buf))
                .await
                .expect("datagram arrives")
                .expect("recv");
            let want = if i == 4 { 300 } else { 1200 };
            assert_eq!(n, want, "datagram {i} keeps its length");
            assert!(
                buf[..n].iter().all(|&b| b == i),
                "datagram {i} keeps its bytes and order"
            );
        }
    }
}
