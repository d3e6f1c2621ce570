//! The plain listener's HTTP/1.1 fast path (`edge::http::fast`) over real
//! loopback sockets: pipelining, split writes, keep-alive rules, HEAD, the
//! hand-over to hyper (health, 404, POST bodies, oversized heads, garbage,
//! a hyper-bound request pipelined after a fast one), shutdown, and a table
//! of requests answered alike by the fast path and by hyper alone.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use affgate_edge::http::{App, hyper_service, serve_plain};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest wait for any answer or close.
const DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    /// The edge's plain listener (fast path, then hyper).
    fast: SocketAddr,
    /// The same app served by hyper alone, as before the fast path.
    hyper: SocketAddr,
    app: Arc<App>,
    shutdown: watch::Sender<bool>,
    graceful: Option<Arc<GracefulShutdown>>,
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Arc::new(common::app(
        dir.path(),
        16 << 20,
        "slug,link_id,destination\n\
         abc,7,https://m.example/p?c={click_id}&s={sub1}\n\
         plain,8,https://m.example/plain\n",
        Some("network_id,name,postback_token\n3,net,tok-secret-1\n"),
    ));
    let (tx, rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let fast = l.local_addr().expect("addr");
    let accept = tokio::spawn(serve_plain(l, app.clone(), rx, graceful.clone()));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hyper = l.local_addr().expect("addr");
    let hyper_app = app.clone();
    tokio::spawn(async move {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.keep_alive(true).max_buf_size(64 * 1024);
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            let conn =
                http.serve_connection(TokioIo::new(s), hyper_service(hyper_app.clone(), peer));
            tokio::spawn(conn);
        }
    });
    Server {
        fast,
        hyper,
        app,
        shutdown: tx,
        graceful: Some(graceful),
        accept,
        _dir: dir,
    }
}

/// One parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resp {
    version: u8,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Header names (lower case) and values, sorted, without `date`.
    fn comparable(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("date"))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        h.sort();
        h
    }
}

/// A client that reads responses one by one from a connection.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send");
    }

    /// The next response; `head`: it answers a HEAD (no body).
    async fn response(&mut self, head: bool) -> Resp {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(n) =
                    r.parse(&self.buf).expect("a well-formed response")
                {
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8(h.value.to_vec()).expect("ascii value"),
                            )
                        })
                        .collect();
                    let len = if head {
                        0
                    } else {
                        headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .map(|(_, v)| v.parse::<usize>().expect("numeric length"))
                            .expect("every response has a content-length")
                    };
                    if self.buf.len() >= n + len {
                        let resp = Resp {
                            version: r.version.expect("version"),
                            status: r.code.expect("status"),
                            headers,
                            body: self.buf[n..n + len].to_vec(),
                        };
                        self.buf.drain(..n + len);
                        return resp;
                    }
                }
                let mut chunk = [0u8; 4096];
                let k = self.s.read(&mut chunk).await.expect("read");
                assert!(
                    k > 0,
                    "connection closed before a whole response: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                self.buf.extend_from_slice(&chunk[..k]);
            }
        })
        .await
        .expect("a response within the deadline")
    }

    /// The server closes the connection with nothing more to read.
    async fn expect_closed(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes: {:?}", self.buf);
        let mut chunk = [0u8; 64];
        let k = tokio::time::timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .expect("closed within the deadline")
            .unwrap_or(0);
        assert_eq!(
            k,
            0,
            "expected EOF, got {:?}",
            String::from_utf8_lossy(&chunk[..k])
        );
    }
}

fn get(path: &str, rid: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: e\r\nX-Request-Id: {rid}\r\n\r\n")
}

#[tokio::test]
async fn three_pipelined_requests_in_one_write_answer_in_order() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    let batch = format!(
        "{}{}{}",
        get("/c/abc?sub1=x", "r1"),
        get("/c/plain", "r2"),
        get("/c/nope", "r3")
    );
    c.send(batch.as_bytes()).await;
    let a = c.response(false).await;
    let b = c.response(false).await;
    let d = c.response(false).await;
    assert_eq!((a.status, a.header("x-request-id")), (302, Some("r1")));
    assert!(
        a.header("location")
            .is_some_and(|l| l.starts_with("https://m.example/p?c=") && l.ends_with("&s=x")),
        "{a:?}"
    );
    assert_eq!((b.status, b.header("x-request-id")), (302, Some("r2")));
    assert_eq!(b.header("location"), Some("https://m.example/plain"));
    assert_eq!((d.status, d.header("x-request-id")), (404, Some("r3")));
    assert_eq!(d.body, b"unknown link\n");
    // Still open for more.
    c.send(get("/c/plain", "r4").as_bytes()).await;
    assert_eq!(c.response(false).await.status, 302);
    assert_eq!(
        srv.app.metrics.handovers(),
        0,
        "all answered by the fast path"
    );
}

#[tokio::test]
async fn a_request_in_one_byte_writes() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    for b in get("/c/plain", "split").bytes() {
        c.send(&[b]).await;
        c.s.flush().await.expect("flush");
    }
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("x-request-id")), (302, Some("split")));
    assert_eq!(srv.app.metrics.handovers(), 0, "answered by the fast path");
}

#[tokio::test]
async fn http10_closes_unless_keep_alive() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.version, r.status), (0, 302), "answered in HTTP/1.0");
    assert_eq!(
        r.header("connection"),
        None,
        "hyper adds nothing to a closing HTTP/1.0 answer"
    );
    c.expect_closed().await;

    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!((r.version, r.status), (0, 302));
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(b"GET /c/plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(c.response(false).await.status, 302, "kept alive");
    assert_eq!(srv.app.metrics.handovers(), 0, "answered by the fast path");
}

#[tokio::test]
async fn connection_close_closes_after_the_response() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("connection"), Some("close"));
    c.expect_closed().await;
}

#[tokio::test]
async fn head_has_headers_but_no_body() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(format!("HEAD /c/nope HTTP/1.1\r\n\r\n{}", get("/c/plain", "after")).as_bytes())
        .await;
    let h = c.response(true).await;
    assert_eq!(h.status, 404);
    assert_eq!(
        h.header("content-length"),
        Some("13"),
        "the GET body's length"
    );
    let next = c.response(false).await;
    assert_eq!(
        (next.status, next.header("x-request-id")),
        (302, Some("after")),
        "the next bytes are the next response, not a body"
    );
    c.send(b"HEAD /c/plain HTTP/1.1\r\n\r\n").await;
    let h = c.response(true).await;
    assert_eq!(h.status, 302);
    assert_eq!(
        h.header("content-length"),
        None,
        "as hyper: none for an empty HEAD answer"
    );
    assert!(h.header("location").is_some());
    assert_eq!(srv.app.metrics.handovers(), 0, "answered by the fast path");
}

#[tokio::test]
async fn everything_else_is_hypers() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(get("/healthz", "h").as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
    c.send(get("/nowhere", "n").as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("x-request-id")), (404, Some("n")));
    assert_eq!(r.body, b"not found\n");
    assert_eq!(srv.app.metrics.handovers(), 1, "one connection handed over");
    // Once hyper's, the connection stays hyper's, and still answers clicks.
    c.send(get("/c/plain", "c").as_bytes()).await;
    assert_eq!(c.response(false).await.status, 302);

    let mut c = Client::connect(srv.fast).await;
    let body = "txid=1";
    c.send(
        format!(
            "POST /postback HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body, b"click_id: missing\n", "the body was read by hyper");

    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await;
    assert_eq!(
        c.response(false).await.status,
        302,
        "a chunked empty body, via hyper"
    );

    let mut c = Client::connect(srv.fast).await;
    c.send(b"\x16\x03\x01 this is not http\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400, "garbage: hyper's 400");
    c.expect_closed().await;

    let mut c = Client::connect(srv.fast).await;
    let big = format!(
        "GET /c/plain HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    c.send(big.as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431, "an oversized head: hyper's 431");
    assert_eq!(
        srv.app.metrics.handovers(),
        5,
        "each of the five connections went to hyper"
    );
}

#[tokio::test]
async fn a_fast_answer_then_a_pipelined_hyper_request() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    let batch = format!(
        "{}{}{}",
        get("/c/plain", "1"),
        get("/readyz", "2"),
        get("/c/plain", "3")
    );
    c.send(batch.as_bytes()).await;
    let r: Vec<Resp> = vec![
        c.response(false).await,
        c.response(false).await,
        c.response(false).await,
    ];
    let got: Vec<_> = r
        .iter()
        .map(|r| (r.status, r.header("x-request-id").unwrap_or("")))
        .collect();
    assert_eq!(got, vec![(302, "1"), (200, "2"), (302, "3")]);
    assert_eq!(r[1].body, b"ready\n");
    assert_eq!(srv.app.metrics.handovers(), 1);
}

#[tokio::test]
async fn postback_on_the_fast_path() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.1\r\n\r\n").await;
    let click_id = c
        .response(false)
        .await
        .header("x-request-id")
        .expect("the click id names the request")
        .to_string();
    let seq = srv.app.ring.next_seq();
    c.send(
        get(
            &format!("/postback?click_id={click_id}&txid=t1&token=tok-secret-1"),
            "p",
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"OK\n"[..]));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(
        srv.app.ring.next_seq() > seq + 1,
        "the postback took a ring sequence"
    );
    c.send(get(&format!("/postback?click_id={click_id}&token=bad"), "p2").as_bytes())
        .await;
    assert_eq!(c.response(false).await.status, 403);
    let mut m = String::new();
    srv.app.metrics.render_requests(&mut m);
    assert!(
        m.contains("affgate_edge_http_requests_total{route=\"postback\",status=\"2xx\"} 1"),
        "fast-path requests are counted: {m}"
    );
    assert!(m.contains("affgate_edge_http_requests_total{route=\"click\",status=\"3xx\"} 1"));
    assert_eq!(srv.app.metrics.handovers(), 0, "answered by the fast path");
}

/// The same requests to the fast path and to hyper alone: same status line,
/// same headers apart from `date`, same body.
#[tokio::test]
async fn fast_path_and_hyper_answer_alike() {
    let srv = server().await;
    let mut c = Client::connect(srv.fast).await;
    c.send(b"GET /c/plain HTTP/1.1\r\n\r\n").await;
    let click_id = c
        .response(false)
        .await
        .header("x-request-id")
        .expect("rid")
        .to_string();
    let cases: Vec<(String, bool)> = vec![
        (get("/c/plain", "t"), false),
        (get("/c/plain?sub1=a&sub2=b", "t"), false),
        ("HEAD /c/plain HTTP/1.1\r\nX-Request-Id: t\r\n\r\n".into(), true),
        ("HEAD /c/nope HTTP/1.1\r\nX-Request-Id: t\r\n\r\n".into(), true),
        (get("/c/nope", "t"), false),
        (get("/c/", "t"), false),
        (get("/c/bad%20slug", "t"), false),
        (get("/c/plain?", "t"), false),
        ("GET /c/plain HTTP/1.1\r\nX-Request-Id: t\r\nContent-Length: 0\r\n\r\n".into(), false),
        ("GET /c/plain HTTP/1.0\r\nX-Request-Id: t\r\n\r\n".into(), false),
        ("GET /c/plain HTTP/1.0\r\nX-Request-Id: t\r\nConnection: keep-alive\r\n\r\n".into(), false),
        ("GET /c/plain HTTP/1.1\r\nX-Request-Id: t\r\nConnection: close\r\n\r\n".into(), false),
        ("GET /c/plain HTTP/1.1\r\nX-Request-Id: t\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n".into(), false),
        ("HEAD /postback HTTP/1.1\r\nX-Request-Id: t\r\n\r\n".into(), true),
        (get("/postback", "t"), false),
        (get("/postback?click_id=garbage&token=tok-secret-1", "t"), false),
        (get(&format!("/postback?click_id={click_id}&token=nope"), "t"), false),
        (get(&format!("/postback?click_id={click_id}&token=tok-secret-1&payout=1&amount=2"), "t"), false),
        (get(&format!("/postback?click_id={click_id}&txid=x&token=tok-secret-1"), "t"), false),
        ("GET /postback?token=tok-secret-1 HTTP/1.1\r\nX-Request-Id: t\r\n\r\n".into(), false),
        ("POST /c/plain HTTP/1.1\r\nX-Request-Id: t\r\nContent-Length: 0\r\n\r\n".into(), false),
        (get("/healthz", "t"), false),
        (get("/c/plain", &"x".repeat(129)), false),
    ];
    for (req, head) in cases {
        let mut answers = Vec::new();
        for addr in [srv.fast, srv.hyper] {
            let mut c = Client::connect(addr).await;
            c.send(req.as_bytes()).await;
            answers.push(c.response(head).await);
        }
        let (f, h) = (&answers[0], &answers[1]);
        let mut fc = f.comparable();
        let mut hc = h.comparable();
        if f.header("x-request-id") != Some("t") {
            // A fresh id (the click id, or a counter) differs by nature.
            fc.retain(|(n, _)| n != "x-request-id" && n != "location");
            hc.retain(|(n, _)| n != "x-request-id" && n != "location");
            assert_eq!(
                f.header("x-request-id").is_some(),
                h.header("x-request-id").is_some()
            );
            assert_eq!(
                f.header("location").is_some(),
                h.header("location").is_some()
            );
        }
        assert_eq!((f.version, f.status), (h.version, h.status), "{req:?}");
        assert_eq!(fc, hc, "{req:?}");
        assert_eq!(f.body, h.body, "{req:?}");
        assert_eq!(f.header("date").map(str::len), Some(29), "{req:?}");
    }
    assert_eq!(
        srv.app.metrics.handovers(),
        3,
        "HEAD /postback, POST /c/plain and /healthz went to hyper; the rest were the fast path's"
    );
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_the_request_in_hand() {
    let mut srv = server().await;
    let mut idle = Client::connect(srv.fast).await;
    idle.send(get("/c/plain", "i").as_bytes()).await;
    assert_eq!(idle.response(false).await.status, 302);
    let mut busy = Client::connect(srv.fast).await;
    busy.send(get("/c/plain", "b").as_bytes()).await;
    assert_eq!(busy.response(false).await.status, 302);
    // Half a request: in hand when shutdown begins.
    busy.send(b"GET /c/plain HTTP/1.1\r\nX-Req").await;
    let mut handed = Client::connect(srv.fast).await;
    handed.send(get("/healthz", "h").as_bytes()).await;
    assert_eq!(handed.response(false).await.status, 200);

    srv.shutdown.send(true).expect("shutdown");
    (&mut srv.accept).await.expect("accept loop ends");
    let graceful = Arc::into_inner(srv.graceful.take().expect("graceful"))
        .expect("only the accept loop held the tracker");
    let drained =
        tokio::spawn(async move { tokio::time::timeout(DEADLINE, graceful.shutdown()).await });
    idle.expect_closed().await;
    handed.expect_closed().await;
    busy.send(b"uest-Id: b2\r\n\r\n").await;
    let r = busy.response(false).await;
    assert_eq!((r.status, r.header("x-request-id")), (302, Some("b2")));
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "the last answer says so"
    );
    busy.expect_closed().await;
    drained
        .await
        .expect("join")
        .expect("every connection ended, so graceful shutdown completes");
}
