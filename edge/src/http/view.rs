//! What a handler reads from a request, whichever parser produced it.
//!
//! The click and postback handlers are written against [`RequestView`], so
//! the same code serves a hyper [`http::Request`] (TLS, HTTP/2, and the
//! requests the plain listener hands to hyper) and a request the HTTP/1.1
//! fast path parsed with httparse in place (`fast::Parsed`). A view only
//! borrows: nothing is copied or allocated to build one.

use http::header::HeaderName;

/// Method, path, query and headers of one request.
pub trait RequestView {
    /// The method as sent, e.g. `"GET"` (methods are case-sensitive).
    fn method(&self) -> &str;
    /// The path of the request target, without the query.
    fn path(&self) -> &str;
    /// The query after `?`, if the target has one (possibly empty).
    fn query(&self) -> Option<&str>;
    /// The first value of header `name` as sent.
    fn header(&self, name: &HeaderName) -> Option<&[u8]>;
}

impl<B> RequestView for http::Request<B> {
    fn method(&self) -> &str {
        http::Request::method(self).as_str()
    }

    fn path(&self) -> &str {
        self.uri().path()
    }

    fn query(&self) -> Option<&str> {
        self.uri().query()
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers().get(name).map(|v| v.as_bytes())
    }
}
