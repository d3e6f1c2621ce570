//! The UDP transport: one unconnected socket, datagrams to each collector's
//! address, acks read from the same socket.
//!
//! An ack is trusted for its MAC, not its source address; the source only
//! tells the Outbox which collector answered (for failback), so a reply
//! from an address we did not send to is attributed by port, then to
//! "unknown".

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::net::UdpSocket;

use super::outbox::Outgoing;
use super::shell::{Transport, UNKNOWN_COLLECTOR};

#[derive(Debug)]
pub struct UdpTransport {
    sock: UdpSocket,
    addrs: Vec<SocketAddr>,
    buf: Vec<u8>,
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

impl UdpTransport {
    pub async fn bind(collectors: &[String]) -> anyhow::Result<UdpTransport> {
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
        Ok(UdpTransport {
            sock,
            addrs,
            buf: vec![0; 65_536],
        })
    }
}

impl Transport for UdpTransport {
    async fn send(&mut self, collector: usize, out: &Outgoing) -> std::io::Result<()> {
        let to = self.addrs[collector % self.addrs.len()];
        self.sock.send_to(&out.bytes, to).await.map(|_| ())
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
