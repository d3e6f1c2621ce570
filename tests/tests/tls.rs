//! The TLS listener (docs/edge.md "TLS"): HTTP/2 and HTTP/1.1 by ALPN over
//! rustls, with a self-signed certificate made by the `openssl` CLI, driven
//! by hyper's own client so the HTTP/2 framing is real.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use affgate_tests::{EdgeOpts, EdgeProc, click_id_in, keys, wait_for};
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const HOST: &str = "edge.example";
const TOKEN: &str = "tls-network-token";

/// A self-signed P-256 pair for `edge.example`, as docs/edge.md shows it,
/// plus `CA:FALSE`: webpki (rustls' verifier) refuses a certificate marked
/// as a CA when it is presented as the server's own, and OpenSSL's default
/// `req -x509` extensions mark it as one.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("edge.crt"), dir.join("edge.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "365", "-subj", "/CN=edge.example"])
        .args(["-addext", "subjectAltName=DNS:edge.example"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl (the openssl CLI is needed for this test)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

fn start_tls_edge(crt: &Path, key: &Path) -> EdgeProc {
    let e = EdgeProc::start(&EdgeOpts {
        edge_id: 12,
        links_csv: "slug,link_id,destination,redirect_code\n\
                    t,77,https://m.example/t?cid={click_id}&s={sub1},\n\
                    t8,78,https://m.example/t8?cid={click_id},308\n"
            .into(),
        networks_csv: format!("network_id,name,postback_token\n2,Net,{TOKEN}\n"),
        env: vec![
            ("AFFGATE_HTTP_TLS_LISTEN".into(), "127.0.0.1:0".into()),
            ("AFFGATE_HTTP_TLS_CERT".into(), crt.display().to_string()),
            ("AFFGATE_HTTP_TLS_KEY".into(), key.display().to_string()),
        ],
        ..EdgeOpts::default()
    });
    assert!(
        e.tls.is_some(),
        "the edge reports a tls= address; stderr:\n{}",
        e.stderr()
    );
    e
}

/// TLS to the edge, trusting only the test certificate, offering `alpn`.
async fn connect(addr: SocketAddr, crt: &Path, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(crt).expect("read test cert") {
        roots
            .add(c.expect("parse test cert"))
            .expect("add test cert as a root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the TLS listener");
    let name = ServerName::try_from(HOST).expect("server name");
    TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the edge")
}

fn assert_redirect(
    resp: &http::Response<hyper::body::Incoming>,
    code: StatusCode,
    prefix: &str,
) -> String {
    assert_eq!(resp.status(), code, "redirect status");
    let loc = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no Location in {resp:?}"));
    assert!(
        loc.starts_with(prefix),
        "Location `{loc}` starts with {prefix}"
    );
    assert_eq!(
        resp.headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("private, no-store"),
        "Cache-Control over TLS"
    );
    assert!(
        resp.headers().contains_key("x-request-id"),
        "X-Request-Id over TLS"
    );
    let cid = click_id_in(loc).unwrap_or_else(|| panic!("no click id in `{loc}`"));
    let ring = affgate_schema::keys::KeyRing::new(keys());
    let (_, f) = affgate_schema::click_id::ClickId::verify(&cid, &ring, 0)
        .unwrap_or_else(|e| panic!("click id `{cid}` verifies: {e}"));
    assert_eq!(f.edge_id, 12, "minted by this edge");
    cid
}

async fn body_string(resp: http::Response<hyper::body::Incoming>) -> String {
    let b = resp
        .into_body()
        .collect()
        .await
        .expect("read body")
        .to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

fn wait_click(e: &EdgeProc, cid: &str) {
    wait_for(
        &format!("click {cid} in the ring"),
        Duration::from_secs(10),
        || e.inspect(true).click_ids().contains(cid).then_some(()),
    );
}

#[tokio::test]
async fn http2_over_tls_redirects() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (crt, key) = self_signed(tmp.path());
    let e = start_tls_edge(&crt, &key);
    let addr = e.tls.expect("tls address");

    let tls = connect(addr, &crt, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN negotiated h2"
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);

    let get = |path: &str| {
        Request::get(format!("https://{HOST}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    // Several requests multiplexed on the one connection.
    let resp = send
        .send_request(get("/c/t?sub1=a%20b"))
        .await
        .expect("GET /c/t over h2");
    assert_eq!(resp.version(), Version::HTTP_2, "answered over HTTP/2");
    let cid = assert_redirect(&resp, StatusCode::FOUND, "https://m.example/t?cid=");
    assert!(
        resp.headers()[http::header::LOCATION]
            .to_str()
            .expect("ASCII")
            .ends_with("&s=a%20b"),
        "sub1 expanded over h2"
    );
    let resp = send
        .send_request(get("/c/t8"))
        .await
        .expect("GET /c/t8 over h2");
    let cid8 = assert_redirect(
        &resp,
        StatusCode::PERMANENT_REDIRECT,
        "https://m.example/t8?cid=",
    );
    let head = Request::head(format!("https://{HOST}/c/t"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(head).await.expect("HEAD /c/t over h2");
    let cid_head = assert_redirect(&resp, StatusCode::FOUND, "https://m.example/t?cid=");

    let resp = send
        .send_request(get(&format!(
            "/postback?click_id={cid}&txid=h2&token={TOKEN}"
        )))
        .await
        .expect("postback over h2");
    assert_eq!(resp.status(), StatusCode::OK, "postback over h2");
    assert_eq!(body_string(resp).await.trim_end(), "OK");

    let resp = send
        .send_request(get("/c/unknown"))
        .await
        .expect("404 over h2");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = send
        .send_request(get("/healthz"))
        .await
        .expect("healthz over h2");
    assert_eq!(resp.status(), StatusCode::OK);

    for c in [&cid, &cid8, &cid_head] {
        wait_click(&e, c);
    }
    wait_for(
        "the h2 postback in the ring",
        Duration::from_secs(10),
        || {
            e.inspect(true)
                .records
                .into_iter()
                .find(|r| r.kind == "postback" && r.txid == "h2" && r.click_id == cid)
        },
    );
}

#[tokio::test]
async fn http1_over_tls_redirects() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (crt, key) = self_signed(tmp.path());
    let e = start_tls_edge(&crt, &key);
    let addr = e.tls.expect("tls address");

    for (alpn, want_alpn) in [
        (&[&b"http/1.1"[..]][..], Some(&b"http/1.1"[..])),
        (&[][..], None),
    ] {
        let tls = connect(addr, &crt, alpn).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            want_alpn,
            "ALPN for offer {alpn:?}"
        );
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        for _ in 0..2 {
            let req = Request::get("/c/t?sub1=x")
                .header(http::header::HOST, HOST)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let resp = send
                .send_request(req)
                .await
                .expect("GET /c/t over TLS HTTP/1.1");
            assert_eq!(
                resp.version(),
                Version::HTTP_11,
                "answered over HTTP/1.1 ({alpn:?})"
            );
            let cid = assert_redirect(&resp, StatusCode::FOUND, "https://m.example/t?cid=");
            body_string(resp).await;
            wait_click(&e, &cid);
        }
    }
}

#[tokio::test]
async fn tls_refuses_a_client_that_does_not_trust_the_cert() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (crt, key) = self_signed(tmp.path());
    let e = start_tls_edge(&crt, &key);
    let other = tempfile::tempdir().expect("tempdir");
    let (other_crt, _) = self_signed(other.path());
    // A different self-signed cert as the only root: the handshake must fail,
    // and the edge keeps serving the clients that trust it.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&other_crt).expect("read cert") {
        roots.add(c.expect("parse cert")).expect("add root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(e.tls.expect("tls"))
        .await
        .expect("connect");
    let res = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(HOST).expect("name"), tcp)
        .await;
    assert!(
        res.is_err(),
        "an untrusted certificate is refused by the client"
    );

    let tls = connect(e.tls.expect("tls"), &crt, &[b"h2"]).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(format!("https://{HOST}/c/t"))
                .body(Empty::<Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("GET after a failed handshake");
    assert_redirect(&resp, StatusCode::FOUND, "https://m.example/t?cid=");
}
