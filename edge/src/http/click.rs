//! `GET|HEAD /c/{slug}`: the redirect hot path.
//!
//! A cache read, a click id, an append, a write. The click is in the ring
//! before the response exists; if the append fails the visitor is still
//! redirected (a click is never refused) and the failure is counted and
//! logged as data at risk. HEAD is answered exactly like GET, and recorded
//! like it, so every click id this edge hands out is in the ring.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use affgate_schema::click_id::ClickId;
use affgate_schema::event::{ClickRef, encode_click};
use http::StatusCode;
use http::header::{HeaderName, REFERER, USER_AGENT};

use super::reply::Reply;
use super::view::RequestView;
use super::{App, X_REQUEST_ID, header_value, now_ms, usable_request_id};
use crate::KIND_CLICK;
use crate::links::redis::Miss;
use crate::links::{Link, LinkStatus, Macros, OfferState, valid_slug};

/// Longest sub value kept, bytes.
pub const MAX_SUB: usize = 256;
pub const MAX_USER_AGENT: usize = 512;
pub const MAX_REFERER: usize = 1024;

thread_local! {
    /// Reused encode buffer: no allocation per click once warm.
    static EVENT_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
    /// Reused expansion buffer; the Location value itself is carved from
    /// the per-thread header chunk (`http::header_bytes`).
    static LOCATION_BUF: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

/// What the request supplies to the click record and the destination.
#[derive(Debug)]
pub struct ClickRequest<'a> {
    pub slug: &'a str,
    pub ip: IpAddr,
    pub user_agent: Cow<'a, str>,
    pub referer: Cow<'a, str>,
    pub subs: [Cow<'a, str>; 5],
}

/// Truncate to at most `max` bytes on a char boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn truncate_cow(c: Cow<'_, str>, max: usize) -> Cow<'_, str> {
    match c {
        Cow::Borrowed(s) => Cow::Borrowed(truncate(s, max)),
        Cow::Owned(s) if s.len() > max => Cow::Owned(truncate(&s, max).to_string()),
        owned => owned,
    }
}

/// `sub1`…`sub5` from the query; first occurrence wins.
pub fn subs_from_query(query: Option<&str>) -> [Cow<'_, str>; 5] {
    let mut subs: [Cow<'_, str>; 5] = Default::default();
    let mut seen = [false; 5];
    if let Some(q) = query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            let i = match k.as_ref() {
                "sub1" => 0,
                "sub2" => 1,
                "sub3" => 2,
                "sub4" => 3,
                "sub5" => 4,
                _ => continue,
            };
            if !seen[i] {
                seen[i] = true;
                subs[i] = truncate_cow(v, MAX_SUB);
            }
        }
    }
    subs
}

fn header_str<'a>(req: &'a impl RequestView, name: &HeaderName, max: usize) -> Cow<'a, str> {
    match req.header(name) {
        Some(v) => truncate_cow(String::from_utf8_lossy(v), max),
        None => Cow::Borrowed(""),
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The visitor's address: the peer, or the first `X-Forwarded-For` entry behind a trusted proxy.
pub fn client_ip(req: &impl RequestView, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for
        && let Some(ip) = req
            .header(&X_FORWARDED_FOR)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
    {
        return ip;
    }
    peer.ip()
}

/// Where a click goes.
enum Target<'l> {
    Destination(&'l Link),
    Fallback(Cow<'l, str>),
}

/// The hot path: answer from the cache without awaiting anything. `Err(())`
/// only for a valid slug the cache lacks: then [`serve_miss`] looks it up.
#[allow(clippy::result_unit_err)]
pub fn serve_cached(
    app: &App,
    req: &impl RequestView,
    slug: &str,
    peer: SocketAddr,
) -> Result<Reply, ()> {
    let method = req.method();
    if method != "GET" && method != "HEAD" {
        return Ok(Reply::method_not_allowed(app.request_id(req), "GET, HEAD"));
    }
    if !valid_slug(slug) {
        return Ok(Reply::text(
            StatusCode::NOT_FOUND,
            app.request_id(req),
            "unknown link",
        ));
    }
    let click = click_request(app, req, slug, peer);
    let client_rid = req.header(&X_REQUEST_ID);
    app.links
        .with_link(slug, |link| serve_link(app, Some(link), &click, client_rid))
        .ok_or(())
}

/// A slug the cache lacks: one bounded Redis lookup, then 404 or the fallback.
pub async fn serve_miss(app: &App, req: &impl RequestView, slug: &str, peer: SocketAddr) -> Reply {
    let miss = match &app.redis {
        Some(redis) => redis.lookup_miss(slug).await,
        None => Miss::NotFound,
    };
    let click = click_request(app, req, slug, peer);
    let client_rid = req.header(&X_REQUEST_ID);
    match miss {
        Miss::Found => {
            if let Some(r) = app
                .links
                .with_link(slug, |link| serve_link(app, Some(link), &click, client_rid))
            {
                return r;
            }
            Reply::text(StatusCode::NOT_FOUND, app.request_id(req), "unknown link")
        }
        Miss::NotFound => Reply::text(StatusCode::NOT_FOUND, app.request_id(req), "unknown link"),
        Miss::Unreachable => serve_link(app, None, &click, client_rid),
    }
}

fn click_request<'a>(
    app: &App,
    req: &'a impl RequestView,
    slug: &'a str,
    peer: SocketAddr,
) -> ClickRequest<'a> {
    ClickRequest {
        slug,
        ip: client_ip(req, peer, app.trust_forwarded_for),
        user_agent: header_str(req, &USER_AGENT, MAX_USER_AGENT),
        referer: header_str(req, &REFERER, MAX_REFERER),
        subs: subs_from_query(req.query()),
    }
}

/// Decide, record, answer. `link` None: unknown slug while Redis is
/// unreachable. `client_rid`: the request's `X-Request-Id` as sent.
pub fn serve_link(
    app: &App,
    link: Option<&Link>,
    click: &ClickRequest<'_>,
    client_rid: Option<&[u8]>,
) -> Reply {
    let (target, quarantined) = match link {
        Some(l) => {
            let offer_state = app.links.offer_state(l.offer_id);
            let closed = l.status == LinkStatus::Paused || offer_state == OfferState::Closed;
            if closed {
                let url = app
                    .links
                    .offer_fallback(l.offer_id)
                    .map(|u| Cow::Owned(u.into_string()))
                    .or_else(|| l.fallback_url.as_deref().map(Cow::Borrowed))
                    .or_else(|| app.fallback_url.as_deref().map(Cow::Borrowed));
                match url {
                    Some(u) => (Target::Fallback(u), false),
                    None => {
                        return Reply::text(
                            StatusCode::NOT_FOUND,
                            app.request_id_or_fresh(client_rid),
                            "link paused and no fallback configured",
                        );
                    }
                }
            } else {
                (Target::Destination(l), l.status == LinkStatus::ShadowBanned)
            }
        }
        None => match app.fallback_url.as_deref() {
            Some(u) => (Target::Fallback(Cow::Borrowed(u)), false),
            None => {
                return Reply::text(
                    StatusCode::NOT_FOUND,
                    app.request_id_or_fresh(client_rid),
                    "unknown link",
                );
            }
        },
    };
    let (link_id, offer_id, affiliate_id) = link
        .map(|l| (l.link_id, l.offer_id, l.affiliate_id))
        .unwrap_or((0, 0, 0));
    let ts_ms = now_ms();
    let seq = app.ring.next_seq();
    let click_id = match ClickId::mint(app.keys.current(), app.edge_id, ts_ms, link_id, seq as u32)
    {
        Ok(c) => c,
        Err(e) => {
            // Loaders refuse link ids above MAX_LINK_ID, so this is a bug, not input.
            tracing::error!(link_id, error = %e, "cannot mint click id");
            return Reply::text(
                StatusCode::NOT_FOUND,
                app.request_id_or_fresh(client_rid),
                "unknown link",
            );
        }
    };
    // `as_str` checks UTF-8 each call: once here.
    let click_id = click_id.as_str();
    let fallback = matches!(target, Target::Fallback(_));
    let event = ClickRef {
        click_id,
        ts_ms,
        edge_id: app.edge_id,
        link_id,
        offer_id,
        affiliate_id,
        slug: click.slug,
        ip: click.ip,
        user_agent: &click.user_agent,
        referer: &click.referer,
        subs: [
            &click.subs[0],
            &click.subs[1],
            &click.subs[2],
            &click.subs[3],
            &click.subs[4],
        ],
        quarantined,
        fallback,
    };
    append_click(app, seq, ts_ms, &event);
    if fallback {
        app.metrics.fallback();
    }
    let (code, location) = match target {
        Target::Destination(l) => {
            let m = Macros {
                click_id,
                subs: event.subs,
                link_id,
                offer_id,
                affiliate_id,
            };
            let location = LOCATION_BUF.with_borrow_mut(|buf| {
                l.destination.expand_into(&m, buf);
                header_value(buf.as_bytes())
            });
            (l.redirect_code, location)
        }
        Target::Fallback(u) => (302, header_value(u.as_bytes())),
    };
    // No usable id from the client: the click id names the request.
    let rid = match client_rid.filter(|b| usable_request_id(b)) {
        Some(b) => header_value(b),
        None => header_value(click_id.as_bytes()),
    }
    .unwrap_or_else(|| app.fresh_request_id());
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FOUND);
    let mut reply = Reply::empty(status, rid);
    if location.is_none() {
        // Destinations are checked when loaded and macro values are percent-encoded.
        tracing::error!(slug = click.slug, "destination is not a valid header value");
    }
    reply.location = location;
    reply
}

fn append_click(app: &App, seq: u64, ts_ms: u64, event: &ClickRef<'_>) {
    EVENT_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        encode_click(event, &mut buf);
        match app.ring.append(seq, KIND_CLICK, ts_ms, &buf) {
            Ok(_) => {
                app.ring_ok.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                app.ring_ok.store(false, Ordering::Relaxed);
                app.metrics.append_error();
                tracing::error!(error = %e, click_id = event.click_id, "click not stored: ring and spill failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subs_first_occurrence_wins_and_is_truncated() {
        let long = "x".repeat(MAX_SUB + 10);
        let q = format!("sub1=a%20b&sub1=zzz&sub5={long}&other=1&sub3=%E2%9C%93");
        let s = subs_from_query(Some(&q));
        assert_eq!(s[0], "a b");
        assert_eq!(s[1], "");
        assert_eq!(s[2], "✓");
        assert_eq!(s[4].len(), MAX_SUB);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn forwarded_for_only_when_trusted() {
        let req = |xff: &str| {
            http::Request::builder()
                .uri("/c/x")
                .header("x-forwarded-for", xff)
                .body(())
                .unwrap()
        };
        let h = req("203.0.113.9, 10.0.0.1");
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(client_ip(&h, peer, false), peer.ip());
        assert_eq!(
            client_ip(&h, peer, true),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let h = req("garbage");
        assert_eq!(
            client_ip(&h, peer, true),
            peer.ip(),
            "unparsable header falls back to the peer"
        );
    }
}
