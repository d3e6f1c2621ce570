//! What a handler answers, before it is a hyper `Response` or bytes.
//!
//! Every edge response is one of a few shapes: a status, the request id,
//! `Cache-Control: private, no-store`, and a `Location` (redirects) or a
//! plain-text body (everything else), `Allow` on 405. A [`Reply`] holds
//! exactly that. [`Reply::into_response`] makes the hyper response (TLS,
//! HTTP/2, requests the plain listener handed to hyper); [`Reply::write_http1`]
//! writes the HTTP/1.x response straight into the fast path's output buffer,
//! with the same status line and header set hyper writes for it (names in
//! lower case, `connection` when hyper would add one, `content-length`,
//! `date`), so a client cannot tell which of the two answered.
//!
//! Header values are [`HeaderValue`]s carved from the per-thread header
//! chunk (`http::header_value`) or static: building a reply allocates
//! nothing unless its body is a formatted reason.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{Body, X_REQUEST_ID};

/// `Cache-Control` of every response.
pub const NO_STORE: &str = "private, no-store";
/// `Content-Type` of every text body.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// One answer, independent of the protocol that carries it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// `X-Request-Id`: the request's own, or a fresh one.
    pub request_id: HeaderValue,
    /// `Location`, on redirects.
    pub location: Option<HeaderValue>,
    /// `Content-Type`, with a text body.
    pub content_type: Option<&'static str>,
    /// `Allow`, on 405.
    pub allow: Option<&'static str>,
    pub body: Bytes,
}

/// What the fast path adds about the connection to an HTTP/1.x response,
/// as hyper does: `keep-alive` to an HTTP/1.0 request that asked for it,
/// `close` to an HTTP/1.1 request after which the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionHeader {
    None,
    KeepAlive,
    Close,
}

/// How the fast path frames one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The request was HTTP/1.0: the status line says so too.
    pub http10: bool,
    /// A HEAD request: headers as for GET, no body.
    pub head: bool,
    pub connection: ConnectionHeader,
}

impl Reply {
    /// No body: a redirect once `location` is set.
    pub fn empty(status: StatusCode, request_id: HeaderValue) -> Reply {
        Reply {
            status,
            request_id,
            location: None,
            content_type: None,
            allow: None,
            body: Bytes::new(),
        }
    }

    /// A plain-text answer: `reason` on one line.
    pub fn text(status: StatusCode, request_id: HeaderValue, reason: &str) -> Reply {
        let mut body = String::with_capacity(reason.len() + 1);
        body.push_str(reason);
        body.push('\n');
        Reply {
            content_type: Some(TEXT_PLAIN),
            body: Bytes::from(body),
            ..Reply::empty(status, request_id)
        }
    }

    /// A plain-text answer with a constant body (`"OK\n"`): nothing allocated for it.
    pub fn text_static(status: StatusCode, request_id: HeaderValue, body: &'static str) -> Reply {
        Reply {
            content_type: Some(TEXT_PLAIN),
            body: Bytes::from_static(body.as_bytes()),
            ..Reply::empty(status, request_id)
        }
    }

    /// 405 naming the methods `allow`ed.
    pub fn method_not_allowed(request_id: HeaderValue, allow: &'static str) -> Reply {
        Reply {
            allow: Some(allow),
            ..Reply::text_static(
                StatusCode::METHOD_NOT_ALLOWED,
                request_id,
                "method not allowed\n",
            )
        }
    }

    /// The hyper response; its headers in the order [`Reply::write_http1`] writes them.
    pub fn into_response(self) -> Response<Body> {
        let mut r = Response::new(Full::new(self.body));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static(NO_STORE));
        h.insert(X_REQUEST_ID.clone(), self.request_id);
        if let Some(l) = self.location {
            h.insert(LOCATION, l);
        }
        if let Some(ct) = self.content_type {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        if let Some(a) = self.allow {
            h.insert(ALLOW, HeaderValue::from_static(a));
        }
        r
    }

    /// Append the whole HTTP/1.x response (head, and body unless HEAD) to
    /// `out`, with `date` (an IMF-fixdate, 29 bytes) as its `Date`.
    ///
    /// What hyper's encoder does for the same response, and so this: the
    /// status line's version follows the request's; `content-length` is
    /// the body's, except that an empty body to a HEAD gets none. Replies
    /// are never 1xx, 204 or 304, which frame differently.
    pub fn write_http1(&self, out: &mut Vec<u8>, framing: Framing, date: &[u8]) {
        debug_assert!(
            !self.status.is_informational()
                && self.status != StatusCode::NO_CONTENT
                && self.status != StatusCode::NOT_MODIFIED,
            "framed like a response with a body"
        );
        out.extend_from_slice(if framing.http10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            self.status
                .canonical_reason()
                .unwrap_or("<none>")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\ncache-control: ");
        out.extend_from_slice(NO_STORE.as_bytes());
        out.extend_from_slice(b"\r\nx-request-id: ");
        out.extend_from_slice(self.request_id.as_bytes());
        if let Some(l) = &self.location {
            out.extend_from_slice(b"\r\nlocation: ");
            out.extend_from_slice(l.as_bytes());
        }
        if let Some(ct) = self.content_type {
            out.extend_from_slice(b"\r\ncontent-type: ");
            out.extend_from_slice(ct.as_bytes());
        }
        if let Some(a) = self.allow {
            out.extend_from_slice(b"\r\nallow: ");
            out.extend_from_slice(a.as_bytes());
        }
        match framing.connection {
            ConnectionHeader::None => {}
            ConnectionHeader::KeepAlive => out.extend_from_slice(b"\r\nconnection: keep-alive"),
            ConnectionHeader::Close => out.extend_from_slice(b"\r\nconnection: close"),
        }
        if !(framing.head && self.body.is_empty()) {
            out.extend_from_slice(b"\r\ncontent-length: ");
            push_decimal(out, self.body.len());
        }
        out.extend_from_slice(b"\r\ndate: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n\r\n");
        if !framing.head {
            out.extend_from_slice(&self.body);
        }
    }
}

/// `n` in decimal, appended (no `fmt` machinery, no allocation).
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &[u8] = b"Sun, 06 Nov 1994 08:49:37 GMT";

    fn write(r: &Reply, framing: Framing) -> String {
        let mut out = Vec::new();
        r.write_http1(&mut out, framing, DATE);
        String::from_utf8(out).expect("ascii")
    }

    const GET11: Framing = Framing {
        http10: false,
        head: false,
        connection: ConnectionHeader::None,
    };

    #[test]
    fn redirect_bytes() {
        let mut r = Reply::empty(StatusCode::FOUND, HeaderValue::from_static("rid-1"));
        r.location = Some(HeaderValue::from_static("https://m.example/x"));
        assert_eq!(
            write(&r, GET11),
            "HTTP/1.1 302 Found\r\ncache-control: private, no-store\r\nx-request-id: rid-1\r\n\
             location: https://m.example/x\r\ncontent-length: 0\r\n\
             date: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n"
        );
        let head = Framing {
            head: true,
            ..GET11
        };
        assert!(
            !write(&r, head).contains("content-length"),
            "an empty HEAD answer has no content-length, as hyper writes it"
        );
    }

    #[test]
    fn text_bytes_http10_keep_alive_and_head() {
        let r = Reply::method_not_allowed(HeaderValue::from_static("r"), "GET, HEAD");
        let s = write(
            &r,
            Framing {
                http10: true,
                head: false,
                connection: ConnectionHeader::KeepAlive,
            },
        );
        assert_eq!(
            s,
            "HTTP/1.0 405 Method Not Allowed\r\ncache-control: private, no-store\r\n\
             x-request-id: r\r\ncontent-type: text/plain; charset=utf-8\r\nallow: GET, HEAD\r\n\
             connection: keep-alive\r\ncontent-length: 19\r\n\
             date: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\nmethod not allowed\n"
        );
        let s = write(
            &r,
            Framing {
                http10: false,
                head: true,
                connection: ConnectionHeader::Close,
            },
        );
        assert!(s.ends_with("GMT\r\n\r\n"), "HEAD: no body: {s}");
        assert!(
            s.contains("\r\ncontent-length: 19\r\n"),
            "HEAD keeps the length: {s}"
        );
        assert!(s.contains("\r\nconnection: close\r\n"), "{s}");
    }

    #[test]
    fn decimal() {
        for n in [0usize, 7, 10, 19, 65_536, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn into_response_carries_every_header() {
        let r = Reply::method_not_allowed(HeaderValue::from_static("r"), "GET, POST");
        let resp = r.into_response();
        assert_eq!(resp.status(), 405);
        let h = resp.headers();
        assert_eq!(h["cache-control"], NO_STORE);
        assert_eq!(h["x-request-id"], "r");
        assert_eq!(h["content-type"], TEXT_PLAIN);
        assert_eq!(h["allow"], "GET, POST");
        assert!(!h.contains_key("location"));
    }
}
