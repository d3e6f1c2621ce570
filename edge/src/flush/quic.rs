//! The QUIC transport: one client endpoint, one connection per collector,
//! batches as unreliable QUIC datagrams, acks back as datagrams.
//!
//! What must hold:
//! - `send` never waits on a collector that does not answer for longer than
//!   [`DIAL_WAIT`] per dial attempt: a dial runs in its own task, and a send
//!   to a collector with no established connection returns an error (the
//!   records stay in the Outbox, which resends them or fails over).
//! - A closed or failed connection is dialled again on the next send to
//!   that collector, at most once per [`REDIAL_AFTER`].
//! - A batch that does not fit the connection's current datagram size (an
//!   `oversize` record, or a path that shrank) goes on a unidirectional
//!   stream of its own: written in full, then finished, in a task, so a
//!   stalled stream never holds up the flusher.
//! - `recv` only reads an mpsc fed by one reader task per connection, so it
//!   is cancel-safe.
//!
//! TLS: the collectors' certificates must chain to `[delivery] quic_ca` and
//! carry `[delivery] quic_server_name`; ALPN is [`ALPN`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use quinn::{Connection, ConnectionError, Endpoint, SendDatagramError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::outbox::Outgoing;
use super::shell::Transport;
use super::udp::resolve;
use crate::config::QuicClientConfig;

/// The application protocol both ends insist on.
pub const ALPN: &[u8] = b"affgate/1";

/// Batches are packed to at most this many bytes over QUIC: a QUIC datagram
/// on a path of the minimum 1200-byte MTU carries about 1160 bytes (less
/// with longer connection ids). Larger configured values are lowered to it.
pub const MAX_BATCH_BYTES: usize = 1100;

/// A connection with nothing received for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ping an idle connection this often, so a live one never idles out and a
/// restarted collector answers the ping with a stateless reset.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A handshake not done in this time is abandoned.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the first send after starting a dial may wait for it.
const DIAL_WAIT: Duration = Duration::from_millis(150);
/// Least time between two dials of one collector.
const REDIAL_AFTER: Duration = Duration::from_millis(250);
/// Streams (oversize batches) being written at once, over all collectors.
const MAX_STREAM_SENDS: usize = 64;

/// One collector's connection state.
#[derive(Debug)]
enum Slot {
    /// No connection; the next dial may start at `not_before`.
    Idle {
        not_before: Instant,
    },
    /// A dial task is running; sends may wait for it until `wait_until`.
    Dialing {
        done: oneshot::Receiver<Result<Connection, String>>,
        wait_until: Instant,
    },
    Up(Connection),
}

#[derive(Debug)]
pub struct QuicTransport {
    endpoint: Endpoint,
    server_name: String,
    addrs: Vec<SocketAddr>,
    slots: Vec<Slot>,
    acks_tx: mpsc::Sender<(usize, Vec<u8>)>,
    acks: mpsc::Receiver<(usize, Vec<u8>)>,
    streams: Arc<Semaphore>,
}

fn not_connected(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, why.into())
}

/// The rustls client config: TLS 1.3, ring, roots from `ca`, ALPN `affgate/1`.
fn tls_config(ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("[delivery] quic_ca: read {}", ca.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("[delivery] quic_ca: parse {}", ca.display()))?;
    if certs.is_empty() {
        bail!("[delivery] quic_ca: no certificate in {}", ca.display());
    }
    for c in certs {
        roots.add(c).with_context(|| {
            format!(
                "[delivery] quic_ca: unusable certificate in {}",
                ca.display()
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("tls 1.3 with the ring provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("10 s fits a QUIC idle timeout"),
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // The collector opens no streams towards the edge.
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Datagrams beyond the congestion window wait here (the oldest are
    // dropped past it: the Outbox resends them).
    t.datagram_send_buffer_size(4 << 20);
    t
}

impl QuicTransport {
    pub async fn bind(
        collectors: &[String],
        cfg: &QuicClientConfig,
    ) -> anyhow::Result<QuicTransport> {
        let addrs = resolve(collectors).await?;
        let local: SocketAddr = if addrs.iter().all(SocketAddr::is_ipv4) {
            "0.0.0.0:0".parse()?
        } else if addrs.iter().all(SocketAddr::is_ipv6) {
            "[::]:0".parse()?
        } else {
            bail!("[delivery] collectors: mix IPv4 and IPv6 addresses; use one family");
        };
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls_config(&cfg.ca)?)
            .context("quic client crypto")?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport_config()));
        let mut endpoint = Endpoint::client(local).context("bind the delivery QUIC endpoint")?;
        endpoint.set_default_client_config(client);
        let (acks_tx, acks) = mpsc::channel(1024);
        let now = Instant::now();
        Ok(QuicTransport {
            endpoint,
            server_name: cfg.server_name.clone(),
            slots: addrs
                .iter()
                .map(|_| Slot::Idle { not_before: now })
                .collect(),
            addrs,
            acks_tx,
            acks,
            streams: Arc::new(Semaphore::new(MAX_STREAM_SENDS)),
        })
    }

    /// Start dialling collector `idx` in a task that, once connected, also
    /// starts the connection's ack reader.
    fn dial(&mut self, idx: usize, now: Instant) -> Slot {
        let addr = self.addrs[idx];
        let (done_tx, done) = oneshot::channel();
        match self.endpoint.connect(addr, &self.server_name) {
            Ok(connecting) => {
                let acks = self.acks_tx.clone();
                tokio::spawn(async move {
                    let r = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                        Ok(Ok(conn)) => {
                            tracing::info!(collector = %addr, "quic connection established");
                            tokio::spawn(read_acks(idx, addr, conn.clone(), acks));
                            Ok(conn)
                        }
                        Ok(Err(e)) => Err(format!("handshake with {addr}: {e}")),
                        Err(_) => Err(format!("handshake with {addr}: timed out")),
                    };
                    // The transport may have dropped its receiver (shutdown):
                    // the connection then closes with its last handle.
                    let _ = done_tx.send(r);
                });
            }
            Err(e) => {
                let _ = done_tx.send(Err(format!("dial {addr}: {e}")));
            }
        }
        Slot::Dialing {
            done,
            wait_until: now + DIAL_WAIT,
        }
    }

    /// The established connection to collector `idx`, dialling if needed.
    async fn connection(&mut self, idx: usize) -> std::io::Result<Connection> {
        let now = Instant::now();
        if let Slot::Up(c) = &self.slots[idx] {
            match c.close_reason() {
                None => return Ok(c.clone()),
                Some(_) => self.slots[idx] = Slot::Idle { not_before: now },
            }
        }
        if let Slot::Idle { not_before } = self.slots[idx] {
            if now < not_before {
                return Err(not_connected("waiting to dial again"));
            }
            self.slots[idx] = self.dial(idx, now);
        }
        let Slot::Dialing { done, wait_until } = &mut self.slots[idx] else {
            unreachable!("an idle slot was just set to dialling");
        };
        let r = match done.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) if now < *wait_until => {
                match tokio::time::timeout_at((*wait_until).into(), done).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err("dial task ended".into()),
                    Err(_) => {
                        *wait_until = now; // waited once; later sends do not
                        return Err(not_connected("quic handshake in progress"));
                    }
                }
            }
            Err(oneshot::error::TryRecvError::Empty) => {
                return Err(not_connected("quic handshake in progress"));
            }
            Err(oneshot::error::TryRecvError::Closed) => Err("dial task ended".into()),
        };
        match r {
            Ok(c) => {
                self.slots[idx] = Slot::Up(c.clone());
                Ok(c)
            }
            Err(e) => {
                tracing::debug!(collector = %self.addrs[idx], error = %e, "quic dial failed");
                self.slots[idx] = Slot::Idle {
                    not_before: Instant::now() + REDIAL_AFTER,
                };
                Err(not_connected(e))
            }
        }
    }

    /// Write `bytes` on a new unidirectional stream, in a task.
    fn send_on_stream(&self, conn: Connection, bytes: &[u8]) -> std::io::Result<()> {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return Err(std::io::Error::other("too many stream sends in progress"));
        };
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            let _permit = permit;
            let r: anyhow::Result<()> = async {
                let mut s = conn.open_uni().await?;
                s.write_all(&bytes).await?;
                s.finish()?;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                // Not acknowledged, so the Outbox resends it.
                tracing::debug!(error = %e, "quic stream send failed");
            }
        });
        Ok(())
    }
}

/// Feed every datagram of `conn` to the transport's ack queue until the
/// connection closes.
async fn read_acks(
    idx: usize,
    addr: SocketAddr,
    conn: Connection,
    acks: mpsc::Sender<(usize, Vec<u8>)>,
) {
    loop {
        match conn.read_datagram().await {
            Ok(b) => {
                if acks.send((idx, b.to_vec())).await.is_err() {
                    return; // the flusher is gone
                }
            }
            Err(ConnectionError::LocallyClosed) => return,
            Err(e) => {
                // The next send dials again.
                tracing::warn!(collector = %addr, error = %e, "quic connection lost");
                return;
            }
        }
    }
}

impl Transport for QuicTransport {
    async fn send(&mut self, collector: usize, out: &Outgoing) -> std::io::Result<()> {
        let idx = collector % self.addrs.len();
        let conn = self.connection(idx).await?;
        let fits = conn
            .max_datagram_size()
            .is_some_and(|max| out.bytes.len() <= max);
        if out.oversize || !fits {
            return self.send_on_stream(conn, &out.bytes);
        }
        match conn.send_datagram(Bytes::copy_from_slice(&out.bytes)) {
            Ok(()) => Ok(()),
            // The path's datagram size shrank between the check and the send.
            Err(SendDatagramError::TooLarge) => self.send_on_stream(conn, &out.bytes),
            Err(SendDatagramError::ConnectionLost(e)) => {
                self.slots[idx] = Slot::Idle {
                    not_before: Instant::now(),
                };
                Err(not_connected(e.to_string()))
            }
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    async fn recv(&mut self) -> std::io::Result<(usize, Vec<u8>)> {
        // `acks_tx` lives as long as `self`, so this never ends.
        match self.acks.recv().await {
            Some(x) => Ok(x),
            None => std::future::pending().await,
        }
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Tell collectors now rather than letting them idle out.
        self.endpoint.close(0u32.into(), b"edge stopping");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a pem\n").expect("write");
        let err = tls_config(&p).unwrap_err();
        assert!(format!("{err:#}").contains("quic_ca"), "{err:#}");
        let err = tls_config(&dir.path().join("missing.pem")).unwrap_err();
        assert!(format!("{err:#}").contains("quic_ca"), "{err:#}");
    }

    #[test]
    fn timeouts_are_valid_quic_values() {
        // `expect`s in transport_config state these invariants.
        let _ = transport_config();
        assert!(
            KEEP_ALIVE < IDLE_TIMEOUT,
            "keep-alives keep a live connection up"
        );
        assert!(
            DIAL_WAIT < Duration::from_secs(1),
            "failover is within a second"
        );
    }
}
