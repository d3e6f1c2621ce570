//! QUIC ingest: a server endpoint on `[ingest] quic_listen`.
//!
//! An edge sends each batch as a QUIC datagram, or, when it does not fit
//! one, alone on a unidirectional stream (read to its end, at most
//! [`MAX_STREAM_BYTES`]). Either way the bytes are the same sealed datagram
//! as over UDP and go through [`super::accept`] (MAC first) into the same
//! queue, tagged [`Route::Quic`] with the connection's id; the writer's
//! acks for that route go back on that connection as datagrams
//! ([`Connections`]). TLS only authenticates the collector to the edge;
//! what authenticates a batch is still its MAC.
//!
//! The stateless-reset key is derived from the cluster secret, so a
//! collector restarted on the same address can answer an edge's packets on
//! an old connection with a valid stateless reset. Whether that reset
//! arrives before the edge's 10 s idle timeout depends on the edge's probe
//! backoff; in the kill -9 test the idle timeout came first, so count on
//! up to 10 s before an edge dials a restarted collector again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use affgate_schema::keys::{KeyRing, Keys};
use anyhow::Context;
use bytes::Bytes;
use quinn::crypto::{CryptoError, HmacKey};
use quinn::{Connection, ConnectionError, Endpoint, ReadToEndError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use super::window::Route;
use super::{IngestStats, Received, accept};
use crate::config::QuicConfig;

/// The application protocol both ends insist on.
pub const ALPN: &[u8] = b"affgate/1";

/// Longest batch accepted on a stream (one oversize record with its framing).
pub const MAX_STREAM_BYTES: usize = 1 << 20;

/// A connection with nothing received for this long is dead (edges ping
/// every 2 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams an edge may have open at once.
const MAX_UNI_STREAMS: u32 = 64;
/// blake3 `derive_key` context of the stateless-reset key.
const CTX_RESET: &str = "affgate 2025-01 quic stateless reset key";

/// Open QUIC connections by `stable_id`, so the writer can ack on them.
#[derive(Debug, Default, Clone)]
pub struct Connections(Arc<Mutex<HashMap<usize, Connection>>>);

impl Connections {
    fn insert(&self, conn: Connection) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(conn.stable_id(), conn);
        }
    }

    fn remove(&self, id: usize) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&id);
        }
    }

    /// Send `bytes` as a datagram on connection `id`.
    pub fn send_datagram(&self, id: usize, bytes: &[u8]) -> std::io::Result<()> {
        let conn = self.0.lock().ok().and_then(|m| m.get(&id).cloned());
        let Some(conn) = conn else {
            // Closed since the batch came: the edge resends on a new one.
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "quic connection closed",
            ));
        };
        conn.send_datagram(Bytes::copy_from_slice(bytes))
            .map_err(std::io::Error::other)
    }
}

/// Stateless-reset key: keyed blake3, the same for every collector of a cluster.
struct ResetKey([u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    fn derive(keys: &Keys) -> ResetKey {
        ResetKey(blake3::derive_key(CTX_RESET, keys.datagram_mac_key()))
    }
}

impl HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let h = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(32);
        signature_out[..n].copy_from_slice(&h.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let Ok(sig) = <[u8; 32]>::try_from(signature) else {
            return Err(CryptoError);
        };
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from(sig) {
            Ok(())
        } else {
            Err(CryptoError)
        }
    }
}

/// The rustls server config: TLS 1.3, ring, ALPN `affgate/1`.
fn tls_config(cfg: &QuicConfig) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("[ingest] quic_cert: read {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("[ingest] quic_cert: parse {}", cfg.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "[ingest] quic_cert: no certificate in {}",
            cfg.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("[ingest] quic_key: read {}", cfg.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("tls 1.3 with the ring provider")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("[ingest] quic_cert and quic_key do not form a usable pair")?;
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
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    t.datagram_receive_buffer_size(Some(4 << 20));
    t
}

/// Bind the server endpoint on `cfg.listen`.
pub fn endpoint(cfg: &QuicConfig, keys: &KeyRing) -> anyhow::Result<Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls_config(cfg)?)
        .context("quic server crypto")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    let reset = quinn::EndpointConfig::new(Arc::new(ResetKey::derive(keys.current())));
    let sock = std::net::UdpSocket::bind(cfg.listen)
        .with_context(|| format!("bind [ingest] quic_listen {}", cfg.listen))?;
    let runtime = quinn::default_runtime().context("quic needs the tokio runtime")?;
    Endpoint::new(reset, Some(server), sock, runtime)
        .with_context(|| format!("start the quic endpoint on {}", cfg.listen))
}

/// Accept connections until shutdown; each feeds `tx`.
pub async fn serve(
    endpoint: Endpoint,
    keys: KeyRing,
    tx: mpsc::Sender<Received>,
    stats: Arc<IngestStats>,
    conns: Connections,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = shutdown.changed() => {
                endpoint.close(0u32.into(), b"collector stopping");
                return;
            }
        };
        tokio::spawn(connection(
            incoming,
            keys.clone(),
            tx.clone(),
            stats.clone(),
            conns.clone(),
        ));
    }
}

/// One edge's connection: datagrams and streams in, until it closes.
async fn connection(
    incoming: quinn::Incoming,
    keys: KeyRing,
    tx: mpsc::Sender<Received>,
    stats: Arc<IngestStats>,
    conns: Connections,
) {
    let remote: SocketAddr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "quic handshake failed");
            return;
        }
    };
    let id = conn.stable_id();
    conns.insert(conn.clone());
    tracing::info!(%remote, "quic connection from an edge");
    let closed = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(b) => accept(&keys, &b, Route::Quic(id), &tx, &stats),
                Err(e) => break e,
            },
            s = conn.accept_uni() => match s {
                Ok(recv) => {
                    tokio::spawn(read_stream(recv, id, keys.clone(), tx.clone(), stats.clone()));
                }
                Err(e) => break e,
            },
        }
    };
    conns.remove(id);
    match closed {
        ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed => {
            tracing::info!(%remote, "quic connection closed");
        }
        e => tracing::info!(%remote, error = %e, "quic connection lost"),
    }
}

/// One oversize batch: the whole stream is one sealed datagram.
async fn read_stream(
    mut recv: quinn::RecvStream,
    id: usize,
    keys: KeyRing,
    tx: mpsc::Sender<Received>,
    stats: Arc<IngestStats>,
) {
    match recv.read_to_end(MAX_STREAM_BYTES).await {
        Ok(bytes) => accept(&keys, &bytes, Route::Quic(id), &tx, &stats),
        Err(ReadToEndError::TooLong) => {
            stats
                .datagrams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats.drop_reason("too_large");
            let _ = recv.stop(0u32.into());
        }
        // Reset or connection lost: the edge resends.
        Err(e) => tracing::debug!(error = %e, "quic stream read failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use affgate_schema::keys::Secret;

    fn keys(b: u8) -> Keys {
        Keys::derive(&Secret::from_bytes([b; 32]))
    }

    #[test]
    fn reset_key_is_the_clusters_and_verifies_its_own_signatures() {
        let (a, a2, b) = (
            ResetKey::derive(&keys(1)),
            ResetKey::derive(&keys(1)),
            ResetKey::derive(&keys(2)),
        );
        let mut sa = [0u8; 32];
        let mut sa2 = [0u8; 32];
        let mut sb = [0u8; 32];
        a.sign(b"connection id", &mut sa);
        a2.sign(b"connection id", &mut sa2);
        b.sign(b"connection id", &mut sb);
        assert_eq!(sa, sa2, "a restarted collector makes the same reset tokens");
        assert_ne!(sa, sb, "another cluster's tokens differ");
        assert!(a.verify(b"connection id", &sa).is_ok());
        assert!(a.verify(b"connection id", &sb).is_err());
        assert!(
            a.verify(b"connection id", &sa[..16]).is_err(),
            "short signature"
        );
        let mut short = [0u8; 16];
        a.sign(b"connection id", &mut short);
        assert_eq!(short, sa[..16], "a shorter output is a prefix");
    }

    #[test]
    fn acks_to_a_closed_connection_fail_without_panicking() {
        let c = Connections::default();
        let e = c.send_datagram(7, b"ack").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotConnected);
    }

    #[test]
    fn cert_and_key_errors_name_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = QuicConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: dir.path().join("missing-cert.pem"),
            key: dir.path().join("missing-key.pem"),
        };
        let err = tls_config(&cfg).unwrap_err();
        assert!(format!("{err:#}").contains("quic_cert"), "{err:#}");
        let _ = transport_config(); // its `expect` holds
    }
}
