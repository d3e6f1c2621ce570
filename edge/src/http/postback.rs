//! `GET|POST /postback`: a network reports a conversion.
//!
//! Order of checks (DESIGN.md): every parameter is validated first, and a
//! malformed one is a 400 naming it; only then the token (missing or
//! unknown: 403). A click id that fails its MAC is malformed. 200 `OK`
//! means the event is in the ring. If the ring and spill both fail, the
//! answer is 503 so the network retries: nothing is acknowledged that was
//! not stored.
//!
//! Parameter names and aliases:
//!
//! | field    | accepted names                                   |
//! |----------|--------------------------------------------------|
//! | click_id | click_id, clickid, subid, cid, transaction_id    |
//! | txid     | txid, tid, order_id, action_id                   |
//! | event    | event (default `conversion`)                     |
//! | status   | status (default `approved`)                      |
//! | payout   | payout, amount, sum, revenue                     |
//! | currency | currency (default `USD`)                         |
//! | token    | token, security_token                            |
//!
//! An empty value counts as absent; the same field given twice with
//! different values (under any of its names) is a 400; unknown parameters
//! are ignored, since networks append their own.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::Ordering;

use affgate_schema::click_id::ClickId;
use affgate_schema::decimal::parse_micros;
use affgate_schema::event::{PostbackRef, Status, encode_postback};
use affgate_schema::keys::{KeyRing, token_hash};
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::reply::Reply;
use super::view::RequestView;
use super::{App, now_ms};
use crate::KIND_POSTBACK;

pub const MAX_TXID: usize = 128;
pub const MAX_EVENT: usize = 64;

thread_local! {
    static EVENT_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ClickId = 0,
    Txid = 1,
    Event = 2,
    Status = 3,
    Payout = 4,
    Currency = 5,
    Token = 6,
}

const FIELD_NAMES: [&str; 7] = [
    "click_id", "txid", "event", "status", "payout", "currency", "token",
];

fn field_of(name: &str) -> Option<Field> {
    Some(match name {
        "click_id" | "clickid" | "subid" | "cid" | "transaction_id" => Field::ClickId,
        "txid" | "tid" | "order_id" | "action_id" => Field::Txid,
        "event" => Field::Event,
        "status" => Field::Status,
        "payout" | "amount" | "sum" | "revenue" => Field::Payout,
        "currency" => Field::Currency,
        "token" | "security_token" => Field::Token,
        _ => return None,
    })
}

/// A validated postback, before the token check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params<'a> {
    pub click_id: ClickId,
    pub txid: Cow<'a, str>,
    pub event: Cow<'a, str>,
    pub status: Status,
    pub payout_micros: Option<i64>,
    pub currency: [u8; 3],
    pub token: Option<Cow<'a, str>>,
}

/// Gather every known field from the query and a form body; a field given
/// twice with different values is an error naming it.
fn gather<'a>(sources: &[&'a [u8]]) -> Result<[Option<Cow<'a, str>>; 7], String> {
    let mut fields: [Option<Cow<'a, str>>; 7] = Default::default();
    for src in sources {
        for (k, v) in form_urlencoded::parse(src) {
            let Some(f) = field_of(&k) else { continue };
            if v.is_empty() {
                continue;
            }
            let slot = &mut fields[f as usize];
            match slot {
                Some(existing) if *existing != v => {
                    return Err(format!(
                        "{}: given twice with different values",
                        FIELD_NAMES[f as usize]
                    ));
                }
                Some(_) => {}
                None => *slot = Some(v),
            }
        }
    }
    Ok(fields)
}

/// Parse and validate everything but the token. Err is the 400 reason.
pub fn parse<'a>(
    query: &'a [u8],
    body: &'a [u8],
    keys: &KeyRing,
    now_ms: u64,
) -> Result<Params<'a>, String> {
    let [click_id, txid, event, status, payout, currency, token] = gather(&[query, body])?;
    let click_id = click_id.ok_or("click_id: missing")?;
    let (click_id, _fields) =
        ClickId::verify(&click_id, keys, now_ms).map_err(|e| format!("click_id: {e}"))?;
    let txid = txid.unwrap_or(Cow::Borrowed(""));
    if txid.len() > MAX_TXID || txid.chars().any(char::is_control) {
        return Err(format!(
            "txid: at most {MAX_TXID} bytes, no control characters"
        ));
    }
    let event = event.unwrap_or(Cow::Borrowed("conversion"));
    if event.len() > MAX_EVENT
        || !event
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(format!("event: 1-{MAX_EVENT} of A-Z a-z 0-9 _ - . :"));
    }
    let status = match status {
        None => Status::Approved,
        Some(s) => {
            Status::parse(&s).ok_or("status: must be approved, pending, rejected or reversed")?
        }
    };
    let payout_micros = match payout {
        None => None,
        Some(p) => Some(parse_micros(&p).map_err(|e| format!("payout: {e}"))?),
    };
    let currency = match currency {
        None => *b"USD",
        Some(c) => {
            let b = c.as_bytes();
            if b.len() != 3 || !b.iter().all(u8::is_ascii_alphabetic) {
                return Err("currency: must be a 3-letter ISO 4217 code".into());
            }
            [
                b[0].to_ascii_uppercase(),
                b[1].to_ascii_uppercase(),
                b[2].to_ascii_uppercase(),
            ]
        }
    };
    Ok(Params {
        click_id,
        txid,
        event,
        status,
        payout_micros,
        currency,
        token,
    })
}

/// `GET /postback`, answered without awaiting anything. `None` for any
/// other method: [`handle`] takes it (POST reads its body; the rest are 405).
pub fn serve_get(app: &App, req: &impl RequestView) -> Option<Reply> {
    if req.method() != "GET" {
        return None;
    }
    let rid = app.request_id(req);
    let query = req.query().unwrap_or("").as_bytes();
    Some(answer(app, rid, query, b""))
}

/// `GET` or `POST /postback`.
pub async fn handle(app: &App, req: hyper::Request<Incoming>) -> Reply {
    let rid = app.request_id(&req);
    let is_post = match *req.method() {
        Method::GET => false,
        Method::POST => true,
        _ => return Reply::method_not_allowed(rid, "GET, POST"),
    };
    let (parts, body) = req.into_parts();
    let body: Bytes = if is_post {
        let ct = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            .unwrap_or(b"application/x-www-form-urlencoded");
        if !ct.starts_with(b"application/x-www-form-urlencoded") {
            return Reply::text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                rid,
                "content-type: send application/x-www-form-urlencoded",
            );
        }
        match Limited::new(body, app.max_body_bytes).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let reason = format!("body: larger than {} bytes", app.max_body_bytes);
                return Reply::text(StatusCode::PAYLOAD_TOO_LARGE, rid, &reason);
            }
            Err(_) => return Reply::text(StatusCode::BAD_REQUEST, rid, "body: could not be read"),
        }
    } else {
        Bytes::new()
    };
    let query = parts.uri.query().unwrap_or("").as_bytes();
    answer(app, rid, query, &body)
}

/// Validate, check the token, append, answer.
fn answer(app: &App, rid: HeaderValue, query: &[u8], body: &[u8]) -> Reply {
    let now = now_ms();
    let params = match parse(query, body, &app.keys, now) {
        Ok(p) => p,
        Err(reason) => return Reply::text(StatusCode::BAD_REQUEST, rid, &reason),
    };
    let Some(token) = params.token.as_deref() else {
        return Reply::text(StatusCode::FORBIDDEN, rid, "token: missing");
    };
    let Some(network_id) = app
        .links
        .network_for_token_hash(&token_hash(app.keys.current(), token))
    else {
        return Reply::text(StatusCode::FORBIDDEN, rid, "token: not recognised");
    };
    let currency = std::str::from_utf8(&params.currency).unwrap_or("USD");
    let event = PostbackRef {
        ts_ms: now,
        edge_id: app.edge_id,
        network_id,
        click_id: params.click_id.as_str(),
        txid: &params.txid,
        event: &params.event,
        status: params.status,
        payout_micros: params.payout_micros,
        currency,
        request_id: rid.to_str().unwrap_or(""),
    };
    let seq = app.ring.next_seq();
    let stored = EVENT_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        encode_postback(&event, &mut buf);
        app.ring.append(seq, KIND_POSTBACK, now, &buf)
    });
    match stored {
        Ok(_) => {
            app.ring_ok.store(true, Ordering::Relaxed);
            Reply::text_static(StatusCode::OK, rid, "OK\n")
        }
        Err(e) => {
            app.ring_ok.store(false, Ordering::Relaxed);
            app.metrics.append_error();
            tracing::error!(error = %e, "postback not stored: ring and spill failed; answering 503 so the network retries");
            Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                rid,
                "not stored, retry later",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use affgate_schema::keys::{Keys, Secret};

    fn ring() -> KeyRing {
        KeyRing::new(Keys::derive(&Secret::from_bytes([1; 32])))
    }

    fn cid() -> String {
        ClickId::mint(ring().current(), 3, 1_700_000_000_000, 42, 7)
            .unwrap()
            .as_str()
            .to_string()
    }

    fn p(q: &str) -> Result<Params<'_>, String> {
        parse(q.as_bytes(), b"", &ring(), 1_700_000_000_000)
    }

    #[test]
    fn defaults() {
        let q = format!("click_id={}&token=t", cid());
        let v = p(&q).unwrap();
        assert_eq!(v.status, Status::Approved);
        assert_eq!(v.event, "conversion");
        assert_eq!(&v.currency, b"USD");
        assert_eq!(v.payout_micros, None);
        assert_eq!(v.txid, "");
        assert_eq!(v.token.as_deref(), Some("t"));
    }

    #[test]
    fn aliases_map_to_fields() {
        let q = format!(
            "subid={}&order_id=T1&revenue=12.5&currency=eur&status=Pending&security_token=s",
            cid()
        );
        let v = p(&q).unwrap();
        assert_eq!(v.txid, "T1");
        assert_eq!(v.payout_micros, Some(12_500_000));
        assert_eq!(&v.currency, b"EUR");
        assert_eq!(v.status, Status::Pending);
        assert_eq!(v.token.as_deref(), Some("s"));
    }

    #[test]
    fn body_and_query_combine() {
        let q = format!("click_id={}", cid());
        let v = parse(q.as_bytes(), b"txid=B&payout=1", &ring(), 0).unwrap();
        assert_eq!(v.txid, "B");
        assert_eq!(v.payout_micros, Some(1_000_000));
    }

    #[test]
    fn every_reason_names_its_parameter() {
        let c = cid();
        let cases = [
            ("token=x".to_string(), "click_id"),
            (format!("click_id={}x", c), "click_id"),
            (
                "click_id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string(),
                "click_id",
            ),
            (format!("click_id={c}&cid=other"), "click_id"),
            (format!("click_id={c}&payout=1&amount=2"), "payout"),
            (format!("click_id={c}&payout=abc"), "payout"),
            (format!("click_id={c}&payout=-1"), "payout"),
            (format!("click_id={c}&payout=1.1234567"), "payout"),
            (format!("click_id={c}&status=done"), "status"),
            (format!("click_id={c}&currency=EURO"), "currency"),
            (format!("click_id={c}&currency=E1R"), "currency"),
            (format!("click_id={c}&event=a%20b"), "event"),
            (
                format!("click_id={c}&txid={}", "x".repeat(MAX_TXID + 1)),
                "txid",
            ),
            (format!("click_id={c}&txid=a%0Ab"), "txid"),
        ];
        for (q, field) in cases {
            let err = p(&q).unwrap_err();
            assert!(
                err.starts_with(&format!("{field}:")),
                "{q}: `{err}` should name {field}"
            );
            assert!(!err.contains('\n'), "one line");
        }
    }

    #[test]
    fn same_value_twice_is_fine() {
        let c = cid();
        let q = format!("click_id={c}&clickid={c}&payout=2&sum=2");
        assert_eq!(p(&q).unwrap().payout_micros, Some(2_000_000));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(q in proptest::collection::vec(proptest::num::u8::ANY, 0..512), b in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            let _ = parse(&q, &b, &ring(), 0);
        }
    }
}
