//! The plain listener's HTTP/1.1 connection loop: the hot routes without hyper.
//!
//! `GET|HEAD /c/{slug}` and `GET /postback` are parsed in place with
//! httparse, answered by the same handlers hyper's path uses (through
//! [`RequestView`] and [`Reply`]) and written into a per-connection output
//! buffer. Every complete request in the read buffer is answered before the
//! buffer goes out in one `write_all`, so pipelined requests cost one write.
//! Per request the cached redirect allocates nothing here but capnp's
//! segment table (`edge/tests/hot_path_allocations.rs` counts it).
//!
//! What the fast path takes, exactly (everything else is handed over):
//!
//! - method `GET` or `HEAD` for `/c/{slug}`, `GET` for `/postback`;
//! - HTTP/1.0 or HTTP/1.1, an origin-form target (`/...`) of at most
//!   [`MAX_TARGET`] bytes, each byte an unreserved, sub-delim, `:`, `@`,
//!   `/`, `?` or `%` (a subset of what hyper's URI parser accepts, so both
//!   see the same path and query);
//! - no body: no `Transfer-Encoding`, `Content-Length` absent or `0`; no
//!   `Expect`, no `Upgrade`; at most [`MAX_HEADERS`] headers.
//!
//! **Hand-over.** Any other request (health checks, 404s, 405s, `POST
//! /postback`, an h2c preface), a request httparse rejects as malformed, and
//! a head that does not fit in [`MAX_READ_BUF`] bytes go to hyper's HTTP/1
//! connection for the rest of the connection: the answers already in the
//! output buffer are written first, then hyper reads the unconsumed bytes
//! ([`Rewind`]) and the socket after them. So hyper's own answers stay
//! exactly what they were (400 for garbage, 431 for oversized heads, its
//! body handling), and a connection that starts on the fast path can end on
//! hyper's, never the other way round.
//!
//! **Keep-alive** as hyper decides it: HTTP/1.1 stays open unless a
//! `Connection` header carries `close`; HTTP/1.0 closes unless one carries
//! `keep-alive`, and is then answered with `connection: keep-alive`. A last
//! HTTP/1.1 answer carries `connection: close`.
//!
//! **Shutdown** as `GracefulShutdown` does for hyper's connections: each
//! connection holds a graceful [`Watcher`] (so `Edge::shutdown` waits for
//! it) and follows the edge's shutdown channel. An idle connection closes at
//! once; a request in hand (in the buffer, or partly read) is answered with
//! `connection: close`, then the connection closes. The channel is watched
//! through a per-connection waker ([`Drain`]), so the read loop touches no
//! lock shared with other connections.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::task::AtomicWaker;
use http::header::HeaderName;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::reply::{ConnectionHeader, Framing, Reply};
use super::view::RequestView;
use super::{App, click, postback};
use crate::telemetry::Route;

/// Headers the fast path parses; a request with more goes to hyper (which
/// takes up to 100, then answers 431).
pub const MAX_HEADERS: usize = 32;
/// Longest request target the fast path takes; longer ones go to hyper.
pub const MAX_TARGET: usize = 8 * 1024;
/// Initial size of a connection's read buffer.
pub const READ_BUF_START: usize = 4 * 1024;
/// Largest read buffer: hyper's `max_buf_size` on this listener. A head that
/// does not fit goes to hyper, which answers it 431 as before.
pub const MAX_READ_BUF: usize = 64 * 1024;
/// Initial size of a connection's output buffer.
const OUT_BUF_START: usize = 4 * 1024;
/// Output written before more pipelined requests are answered.
const OUT_FLUSH: usize = 64 * 1024;

/// A request parsed in place: borrows the read buffer and the header array.
#[derive(Debug)]
pub struct Parsed<'b, 'h> {
    method: &'b str,
    path: &'b str,
    query: Option<&'b str>,
    headers: &'h [httparse::Header<'b>],
    http10: bool,
    keep_alive: bool,
    route: FastRoute,
}

/// The routes the fast path answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastRoute {
    Click,
    Postback,
}

impl RequestView for Parsed<'_, '_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.path
    }

    fn query(&self) -> Option<&str> {
        self.query
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str();
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// What parsing the front of the read buffer found.
#[derive(Debug)]
enum Parse<'b, 'h> {
    /// Not a whole head yet.
    Partial,
    /// Hyper's to answer (see the module doc).
    HandOver,
    /// A request the fast path answers, `used` bytes long.
    Fast { req: Parsed<'b, 'h>, used: usize },
}

type Headers<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

fn parse<'b, 'h>(input: &'b [u8], headers: &'h mut Headers<'b>) -> Parse<'b, 'h> {
    let mut req = httparse::Request::new(&mut []);
    let used = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, input, headers)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        // Malformed, or more headers than we parse: hyper answers it.
        Err(_) => return Parse::HandOver,
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::HandOver;
    };
    let takes =
        target.starts_with('/') && target.len() <= MAX_TARGET && target.bytes().all(is_target_byte);
    if !takes {
        return Parse::HandOver;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let route = match method {
        "GET" | "HEAD" if path.starts_with("/c/") => FastRoute::Click,
        "GET" if path == "/postback" => FastRoute::Postback,
        _ => return Parse::HandOver,
    };
    let http10 = version == 0;
    // hyper's rule: any `close` token wins; else HTTP/1.1 keeps alive and
    // HTTP/1.0 only with a `keep-alive` token.
    let (mut close, mut keep_alive_token) = (false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Parse::HandOver;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parse::HandOver;
        }
    }
    Parse::Fast {
        req: Parsed {
            method,
            path,
            query,
            headers: req.headers,
            http10,
            keep_alive: !close && (!http10 || keep_alive_token),
            route,
        },
        used,
    }
}

/// Bytes of a request target both this parser and hyper's take as they
/// are: unreserved, sub-delims, `:`, `@`, `/`, `?`, `%`.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
                | b'%'
        )
}

/// What [`answer_one`] did with the front of the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A response is in the output buffer; the request was `used` bytes;
    /// `close`: it is the connection's last.
    Answered { used: usize, close: bool },
    /// A valid slug the link cache lacks: [`answer_miss`] awaits Redis for
    /// the request in these `used` bytes.
    Miss { used: usize },
    /// The head is not complete yet: read more.
    Partial,
    /// Hyper's to answer, from these bytes on.
    HandOver,
}

/// Parse the request at the front of `input`, answer it into `out` if the
/// fast path takes it and the answer needs no I/O. `draining`: shutdown has
/// begun, so this answer is the connection's last.
pub fn answer_one(
    app: &App,
    peer: SocketAddr,
    input: &[u8],
    out: &mut Vec<u8>,
    draining: bool,
) -> Step {
    let mut headers: Headers<'_> = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let (req, used) = match parse(input, &mut headers) {
        Parse::Partial => return Step::Partial,
        Parse::HandOver => return Step::HandOver,
        Parse::Fast { req, used } => (req, used),
    };
    let started = Instant::now();
    let (route, reply) = match req.route {
        FastRoute::Click => match click::serve_cached(app, &req, slug(&req), peer) {
            Ok(reply) => (Route::Click, reply),
            Err(()) => return Step::Miss { used },
        },
        FastRoute::Postback => match postback::serve_get(app, &req) {
            Some(reply) => (Route::Postback, reply),
            None => return Step::HandOver,
        },
    };
    let close = finish(app, route, started, &reply, &req, out, draining);
    Step::Answered { used, close }
}

/// The [`Step::Miss`] request at the front of `input`: one bounded Redis
/// lookup, then the answer into `out`. Returns whether the connection closes
/// after it.
pub async fn answer_miss(
    app: &App,
    peer: SocketAddr,
    input: &[u8],
    out: &mut Vec<u8>,
    draining: bool,
) -> bool {
    let mut headers: Headers<'_> = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let Parse::Fast { req, .. } = parse(input, &mut headers) else {
        // `answer_one` parsed these very bytes as a fast request.
        tracing::error!("a cache-miss request no longer parses; closing the connection");
        return true;
    };
    let started = Instant::now();
    let reply = click::serve_miss(app, &req, slug(&req), peer).await;
    finish(app, Route::Click, started, &reply, &req, out, draining)
}

fn slug<'b>(req: &Parsed<'b, '_>) -> &'b str {
    req.path.get("/c/".len()..).unwrap_or("")
}

/// Record the request, write its response; whether the connection closes after it.
fn finish(
    app: &App,
    route: Route,
    started: Instant,
    reply: &Reply,
    req: &Parsed<'_, '_>,
    out: &mut Vec<u8>,
    draining: bool,
) -> bool {
    app.metrics
        .record(route, reply.status.as_u16(), started.elapsed());
    let close = draining || !req.keep_alive;
    let connection = match (req.http10, close) {
        (true, false) => ConnectionHeader::KeepAlive,
        (true, true) => ConnectionHeader::None,
        (false, true) => ConnectionHeader::Close,
        (false, false) => ConnectionHeader::None,
    };
    let framing = Framing {
        http10: req.http10,
        head: req.method == "HEAD",
        connection,
    };
    reply.write_http1(out, framing, &http_date());
    close
}

thread_local! {
    /// This thread's `Date` value and the second it names.
    static DATE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
}

/// Now as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once
/// per second per thread, as hyper does.
pub fn http_date() -> [u8; 29] {
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with(|cell| {
        let (at, text) = cell.get();
        if at == secs {
            return text;
        }
        let mut text = [0u8; 29];
        let mut w: &mut [u8] = &mut text;
        // 29 bytes for any year up to 9999; a later clock keeps the old text.
        if std::io::Write::write_fmt(&mut w, format_args!("{}", httpdate::HttpDate::from(now)))
            .is_ok()
        {
            cell.set((secs, text));
        }
        text
    })
}

/// Serve one plain-TCP connection: the fast path until a request is hyper's,
/// then hyper's HTTP/1 connection for the rest.
pub async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    http: Arc<hyper::server::conn::http1::Builder>,
    shutdown: watch::Receiver<bool>,
    watcher: Watcher,
) {
    // Held until the connection ends: `Edge::shutdown` waits for it.
    let _watcher = watcher;
    let mut shutdown = shutdown;
    let drain_future = pin!(async move {
        // A closed channel means the edge is gone: drain too.
        let _ = shutdown.wait_for(|&down| down).await;
    });
    let mut drain = Drain::new(drain_future);
    let mut buf = vec![0u8; READ_BUF_START];
    let (mut start, mut filled) = (0usize, 0usize);
    let mut out = Vec::with_capacity(OUT_BUF_START);
    loop {
        let mut close = false;
        let mut hand_over = false;
        // Answered up to OUT_FLUSH with bytes left: write, then answer on
        // before reading again.
        let mut more = false;
        while start < filled {
            if out.len() >= OUT_FLUSH {
                more = true;
                break;
            }
            let draining = drain.check();
            match answer_one(&app, peer, &buf[start..filled], &mut out, draining) {
                Step::Answered { used, close: last } => {
                    start += used;
                    close = last;
                }
                Step::Miss { used } => {
                    close = answer_miss(&app, peer, &buf[start..filled], &mut out, draining).await;
                    start += used;
                }
                Step::Partial => break,
                Step::HandOver => {
                    hand_over = true;
                    break;
                }
            }
            if close {
                break;
            }
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                tracing::debug!(error = %e, "http connection ended with an error");
                return;
            }
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        if hand_over {
            return hand_to_hyper(stream, buf, start, filled, peer, app, &http, drain).await;
        }
        if more {
            continue;
        }
        if start == filled {
            (start, filled) = (0, 0);
        } else if start > 0 {
            buf.copy_within(start..filled, 0);
            (start, filled) = (0, filled - start);
        }
        if filled == buf.len() {
            if buf.len() >= MAX_READ_BUF {
                // Too large a head for us; hyper answers it (431).
                return hand_to_hyper(stream, buf, start, filled, peer, app, &http, drain).await;
            }
            buf.resize((buf.len() * 2).min(MAX_READ_BUF), 0);
        }
        match read_or_drain(&mut stream, &mut buf[filled..], &mut drain, filled == 0).await {
            Some(Ok(0)) | None => {
                // EOF, or shutdown while idle: close, as hyper does.
                let _ = stream.shutdown().await;
                return;
            }
            Some(Ok(n)) => filled += n,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "http connection ended with an error");
                return;
            }
        }
    }
}

/// Read into `buf`; `None` once shutdown has begun while `idle` (nothing of
/// a request read yet).
async fn read_or_drain<F: Future<Output = ()>>(
    stream: &mut TcpStream,
    buf: &mut [u8],
    drain: &mut Drain<'_, F>,
    idle: bool,
) -> Option<io::Result<usize>> {
    poll_fn(|cx| {
        drain.register(cx.waker());
        if idle && drain.check() {
            return Poll::Ready(None);
        }
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(rb.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Hyper's HTTP/1 connection over the rest of this one, starting with
/// `buf[start..filled]`.
#[allow(clippy::too_many_arguments)]
async fn hand_to_hyper<F: Future<Output = ()>>(
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    peer: SocketAddr,
    app: Arc<App>,
    http: &hyper::server::conn::http1::Builder,
    mut drain: Drain<'_, F>,
) {
    app.metrics.handover();
    let io = Rewind {
        buf,
        pos: start,
        end: filled,
        inner: stream,
    };
    let conn = http.serve_connection(TokioIo::new(io), super::hyper_service(app, peer));
    let mut conn = pin!(conn);
    let mut signalled = false;
    let result = poll_fn(|cx| {
        // hyper first: the request in hand is read before a graceful shutdown,
        // which would otherwise close a connection that looks idle.
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if !signalled {
            drain.register(cx.waker());
            if drain.check() {
                signalled = true;
                conn.as_mut().graceful_shutdown();
                return conn.as_mut().poll(cx);
            }
        }
        Poll::Pending
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// The edge's shutdown channel seen through this connection's own waker:
/// the channel's waiter list (a mutex shared by every connection) is touched
/// when the connection starts and when shutdown is signalled, not on every
/// read.
struct Drain<'f, F: Future<Output = ()>> {
    future: Pin<&'f mut F>,
    signal: Arc<DrainSignal>,
    waker: Waker,
    /// The future has been polled and registered the signal's waker.
    armed: bool,
    done: bool,
}

#[derive(Debug, Default)]
struct DrainSignal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for DrainSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<'f, F: Future<Output = ()>> Drain<'f, F> {
    fn new(future: Pin<&'f mut F>) -> Self {
        let signal = Arc::new(DrainSignal::default());
        Drain {
            future,
            waker: Waker::from(signal.clone()),
            signal,
            armed: false,
            done: false,
        }
    }

    /// Wake this task when shutdown is signalled.
    fn register(&self, task: &Waker) {
        self.signal.task.register(task);
    }

    /// Whether shutdown has begun.
    fn check(&mut self) -> bool {
        if self.done {
            return true;
        }
        if self.armed && !self.signal.fired.swap(false, Ordering::Acquire) {
            return false;
        }
        self.armed = true;
        let mut cx = Context::from_waker(&self.waker);
        self.done = self.future.as_mut().poll(&mut cx).is_ready();
        self.done
    }
}

impl<F: Future<Output = ()>> std::fmt::Debug for Drain<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").field("done", &self.done).finish()
    }
}

/// The socket with the bytes the fast path read but did not answer in
/// front: hyper reads those first.
#[derive(Debug)]
struct Rewind {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.end {
            let n = (this.end - this.pos).min(out.remaining());
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.end {
                this.buf = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
