//! The TLS listener: rustls (ring provider), ALPN `h2` then `http/1.1`,
//! served by hyper-util's auto builder so one port speaks both.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::App;

/// Build the rustls server config from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read tls_cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse tls_cert {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls_cert {}: no certificate found", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read tls_key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls_cert and tls_key do not form a usable pair")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accept TLS connections until shutdown.
pub async fn serve_tls(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let acceptor = TlsAcceptor::from(cfg);
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(
        TokioExecutor::new(),
    ));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "tls accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let graceful = graceful.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            // Only the accept loops may hold the tracker once a connection is watched.
            drop(graceful);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tls connection ended with an error");
            }
        });
    }
}
