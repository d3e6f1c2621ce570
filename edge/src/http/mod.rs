//! The edge's HTTP surface (DESIGN.md "HTTP contract (edge)"): routing,
//! listeners, and what every response carries.
//!
//! - `click.rs`: `GET|HEAD /c/{slug}`, the redirect hot path.
//! - `postback.rs`: `GET|POST /postback`, parse, verify, append, 200.
//! - `tls.rs`: the rustls listener (HTTP/2 and HTTP/1.1 by ALPN).
//! - `fast.rs`: the plain listener's HTTP/1.1 connection loop; it answers
//!   `GET|HEAD /c/{slug}` and `GET /postback` itself and hands every other
//!   request, with the rest of its connection, to hyper.
//! - `view.rs` and `reply.rs`: what the handlers read ([`view::RequestView`],
//!   over a hyper request or a fast-path one) and what they answer
//!   ([`reply::Reply`], made into a hyper response or written as bytes).
//!
//! Every response carries `X-Request-Id` (the request's, when it sent a
//! usable one, else a fresh one) and `Cache-Control: private, no-store`.
//! Nothing a client sends can produce a 5xx: bad input is 4xx with a
//! one-line reason.

pub mod click;
pub mod fast;
pub mod postback;
pub mod reply;
pub mod tls;
pub mod view;

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use affgate_schema::keys::KeyRing;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::reply::Reply;
use self::view::RequestView;
use crate::links::LinkCache;
use crate::links::redis::RedisLinks;
use crate::ring::Ring;
use crate::telemetry::{Metrics, Route};

pub type Body = Full<Bytes>;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request handler reads. Shared by all connections.
#[derive(Debug)]
pub struct App {
    pub edge_id: u16,
    pub keys: KeyRing,
    pub ring: Arc<Ring>,
    pub links: Arc<LinkCache>,
    pub redis: Option<Arc<RedisLinks>>,
    pub metrics: Arc<Metrics>,
    /// `[links] fallback_url`.
    pub fallback_url: Option<Box<str>>,
    pub trust_forwarded_for: bool,
    pub max_body_bytes: usize,
    /// Cleared when an append fails; set again by the next one that works.
    pub ring_ok: AtomicBool,
    /// Distinguishes this process's fresh request ids from an earlier run's.
    pub boot_nonce: u64,
    /// The flusher's counters, for `/metrics`.
    pub delivery: Arc<crate::flush::shell::DeliveryStats>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

thread_local! {
    static REQ_COUNTER: Cell<(u32, u64)> = const { Cell::new((u32::MAX, 0)) };
    /// Where this thread's response header values are carved from.
    static HEADER_CHUNK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}
static NEXT_REQ_THREAD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Size of the per-thread chunk header values are carved from.
const HEADER_CHUNK_BYTES: usize = 64 * 1024;

/// `bytes` as a [`Bytes`] carved from a per-thread chunk: the hot path
/// allocates once per 64 KiB of header values (`Location`, `X-Request-Id`),
/// not once per value. A carved piece keeps its chunk alive only as long as
/// the response holding it.
pub fn header_bytes(bytes: &[u8]) -> Bytes {
    HEADER_CHUNK.with_borrow_mut(|chunk| {
        if chunk.capacity() - chunk.len() < bytes.len() {
            *chunk = BytesMut::with_capacity(HEADER_CHUNK_BYTES.max(bytes.len()));
        }
        chunk.extend_from_slice(bytes);
        chunk.split().freeze()
    })
}

/// A header value carved with [`header_bytes`]; None if `bytes` is not a
/// valid header value (visible ASCII, spaces and tabs).
pub fn header_value(bytes: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(header_bytes(bytes)).ok()
}

impl App {
    /// The request's own `X-Request-Id` when usable (1-128 visible ASCII), else a fresh one.
    pub fn request_id(&self, req: &impl RequestView) -> HeaderValue {
        self.request_id_or_fresh(req.header(&X_REQUEST_ID))
    }

    /// `client_rid` when usable (1-128 visible ASCII), carved from the
    /// per-thread header chunk, else a fresh id.
    pub fn request_id_or_fresh(&self, client_rid: Option<&[u8]>) -> HeaderValue {
        match client_rid.filter(|b| usable_request_id(b)) {
            Some(b) => header_value(b).unwrap_or_else(|| self.fresh_request_id()),
            None => self.fresh_request_id(),
        }
    }

    /// `{boot nonce}-{thread}-{counter}` in hex: unique per process and thread, no shared counter.
    pub fn fresh_request_id(&self) -> HeaderValue {
        let (thread, n) = REQ_COUNTER.with(|c| {
            let (mut t, n) = c.get();
            if t == u32::MAX {
                t = NEXT_REQ_THREAD.fetch_add(1, Ordering::Relaxed);
            }
            c.set((t, n + 1));
            (t, n)
        });
        // Formatted on the stack: at most 12 + 1 + 8 + 1 + 16 hex digits.
        let mut buf = [0u8; 40];
        let mut len = 0;
        push_hex(&mut buf, &mut len, self.boot_nonce & 0xffff_ffff_ffff, 12);
        buf[len] = b'-';
        len += 1;
        push_hex(&mut buf, &mut len, u64::from(thread), 1);
        buf[len] = b'-';
        len += 1;
        push_hex(&mut buf, &mut len, n, 1);
        header_value(&buf[..len]).unwrap_or_else(|| HeaderValue::from_static("-"))
    }

    /// Route one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let started = Instant::now();
        let path = req.uri().path();
        let route = if path.starts_with("/c/") {
            Route::Click
        } else if path == "/postback" {
            Route::Postback
        } else if path == "/healthz" || path == "/readyz" {
            Route::Health
        } else {
            Route::Other
        };
        let reply = match route {
            Route::Click => {
                let slug = &req.uri().path()["/c/".len()..];
                // The cache hit answers without awaiting; only a miss (a
                // Redis lookup) gets a future, boxed so that this one stays
                // small on the hot path.
                match click::serve_cached(&self, &req, slug, peer) {
                    Ok(resp) => resp,
                    Err(()) => Box::pin(click::serve_miss(&self, &req, slug, peer)).await,
                }
            }
            Route::Postback => match postback::serve_get(&self, &req) {
                Some(resp) => resp,
                // POST: the body is read, boxed for the same reason.
                None => Box::pin(postback::handle(&self, req)).await,
            },
            Route::Health => self.health(&req),
            Route::Other => {
                let rid = self.request_id(&req);
                Reply::text(StatusCode::NOT_FOUND, rid, "not found")
            }
        };
        self.metrics
            .record(route, reply.status.as_u16(), started.elapsed());
        reply.into_response()
    }

    fn health(&self, req: &Request<Incoming>) -> Reply {
        let rid = self.request_id(req);
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Reply::method_not_allowed(rid, "GET, HEAD");
        }
        if req.uri().path() == "/healthz" {
            return Reply::text(StatusCode::OK, rid, "ok");
        }
        let ring = self.ring_ok.load(Ordering::Relaxed);
        let links = self.links.is_loaded();
        if ring && links {
            Reply::text(StatusCode::OK, rid, "ready")
        } else {
            let why = match (ring, links) {
                (false, false) => "not ready: ring not writable, links not loaded",
                (false, true) => "not ready: ring not writable",
                _ => "not ready: links not loaded",
            };
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, rid, why)
        }
    }
}

/// Lowercase hex of `v`, at least `min_digits` (zero-padded), appended at `buf[*len..]`.
fn push_hex(buf: &mut [u8; 40], len: &mut usize, v: u64, min_digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = ((64 - v.leading_zeros() as usize).div_ceil(4)).max(min_digits);
    for i in (0..digits).rev() {
        buf[*len] = HEX[((v >> (4 * i)) & 0xf) as usize];
        *len += 1;
    }
}

/// An `X-Request-Id` a client sent that the edge echoes: 1-128 visible ASCII.
pub fn usable_request_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Accept plain HTTP/1.x connections (keep-alive) until shutdown. Each is
/// served by [`fast::serve_connection`]: the hot routes by the fast path,
/// the rest by hyper.
pub async fn serve_plain(
    listener: TcpListener,
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).max_buf_size(fast::MAX_READ_BUF);
    let http = Arc::new(http);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(fast::serve_connection(
            stream,
            peer,
            app.clone(),
            http.clone(),
            shutdown.clone(),
            graceful.watcher(),
        ));
    }
}

/// The hyper service of a connection from `peer`: every request to [`App::handle`].
pub fn hyper_service(
    app: Arc<App>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
+ Send {
    hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
    })
}

/// Prometheus `/metrics` on its own listener.
pub async fn serve_metrics(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let render = render.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let render = render.clone();
            async move {
                let mut r = if req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(Bytes::from(render())));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                } else {
                    Response::new(Full::new(Bytes::from_static(b"not found\n")))
                };
                if req.uri().path() != "/metrics" {
                    *r.status_mut() = StatusCode::NOT_FOUND;
                }
                Ok::<_, Infallible>(r)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
