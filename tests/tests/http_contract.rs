//! The edge's HTTP contract (DESIGN.md "HTTP contract (edge)", docs/edge.md)
//! against the real `affgate-edge` binary with a links file: clicks,
//! postbacks, health, metrics, and the headers every answer carries.
//!
//! What the edge stored is read back with `affgate-edge ring inspect
//! --records`, the operator's view, never from inside the process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use affgate_schema::click_id::{ClickId, ClickIdFields};
use affgate_schema::keys::KeyRing;
use affgate_tests::{
    Client, EdgeOpts, EdgeProc, InspectRecord, Resp, click_id_in, enc, keys, wait_for,
};

const EDGE_ID: u16 = 7;
const NETWORK_TOKEN: &str = "net5-postback-token";
const WAIT: Duration = Duration::from_secs(10);

/// Every link the tests use. `all` carries every macro; `rNNN` one redirect
/// code each; `paused` and `shadow` the two non-active statuses.
const LINKS: &str = "\
slug,link_id,destination,status,redirect_code,offer_id,affiliate_id
all,11,https://m.example/l?cid={click_id}&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&l={link_id}&o={offer_id}&a={affiliate_id},active,,21,31
r301,12,https://m.example/301?cid={click_id},active,301,,
r302,13,https://m.example/302?cid={click_id},active,302,,
r307,14,https://m.example/307?cid={click_id},active,307,,
r308,15,https://m.example/308?cid={click_id},active,308,,
dflt,18,https://m.example/dflt?cid={click_id},,,,
paused,16,https://m.example/paused?cid={click_id},paused,,,
shadow,17,https://m.example/shadow?cid={click_id},shadow_banned,,,
";

fn opts() -> EdgeOpts {
    EdgeOpts {
        edge_id: EDGE_ID,
        links_csv: LINKS.into(),
        networks_csv: format!("network_id,name,postback_token\n5,Net Five,{NETWORK_TOKEN}\n"),
        ..EdgeOpts::default()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// One request on a fresh connection.
fn req(e: &EdgeProc, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    Client::connect(e.http).request(method, target, headers, body)
}

fn get(e: &EdgeProc, target: &str) -> Resp {
    req(e, "GET", target, &[], b"")
}

fn location(r: &Resp, what: &str) -> String {
    r.header("location")
        .unwrap_or_else(|| panic!("{what}: no Location in {r:?}"))
        .to_string()
}

/// The click id a redirect handed out (the destination templates put it after `cid=`).
fn click_id_of(r: &Resp, what: &str) -> String {
    let loc = location(r, what);
    click_id_in(&loc).unwrap_or_else(|| panic!("{what}: no cid= in Location `{loc}`"))
}

/// Verify a click id under the test cluster secret and decode it.
fn verify(cid: &str) -> ClickIdFields {
    ClickId::verify(cid, &KeyRing::new(keys()), now_ms())
        .map(|(_, f)| f)
        .unwrap_or_else(|e| panic!("click id `{cid}` does not verify: {e}"))
}

/// A fresh, valid click id handed out by the edge for link `r302`.
fn mint_click(e: &EdgeProc) -> String {
    let r = get(e, "/c/r302");
    assert_eq!(r.status, 302, "click on r302 to get a click id: {r:?}");
    click_id_of(&r, "r302")
}

fn assert_common_headers(r: &Resp, what: &str) {
    assert_eq!(
        r.header("cache-control"),
        Some("private, no-store"),
        "{what}: every response carries Cache-Control: private, no-store ({r:?})"
    );
    let rid = r
        .header("x-request-id")
        .unwrap_or_else(|| panic!("{what}: every response carries X-Request-Id ({r:?})"));
    assert!(
        !rid.is_empty() && rid.len() <= 128 && rid.bytes().all(|b| b.is_ascii_graphic()),
        "{what}: X-Request-Id `{rid}` is 1-128 visible ASCII"
    );
}

/// Wait until `ring inspect --records` lists a record matching `pred`.
fn wait_record(e: &EdgeProc, what: &str, pred: impl Fn(&InspectRecord) -> bool) -> InspectRecord {
    wait_for(what, WAIT, || {
        e.inspect(true).records.into_iter().find(|r| pred(r))
    })
}

fn wait_click(e: &EdgeProc, cid: &str) -> InspectRecord {
    wait_record(e, &format!("click {cid} in the ring"), |r| {
        r.kind == "click" && r.click_id == cid
    })
}

fn wait_postback_txid(e: &EdgeProc, txid: &str) -> InspectRecord {
    wait_record(e, &format!("postback txid={txid} in the ring"), |r| {
        r.kind == "postback" && r.txid == txid
    })
}

/// (unacked records, clicks, postbacks) as `ring inspect` counts them.
fn ring_counts(e: &EdgeProc) -> (u64, u64, u64) {
    let i = e.inspect(false);
    let n = |k: &str| -> u64 {
        i.value(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("ring inspect has no numeric `{k}`:\n{}", i.text))
    };
    (n("unacked_records"), n("clicks"), n("postbacks"))
}

/// First whitespace-separated token of a body, e.g. `payout:`.
fn first_token(r: &Resp) -> String {
    r.body_str()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn assert_one_line(r: &Resp, what: &str) {
    let body = r.body_str();
    assert_eq!(
        body.trim_end_matches('\n').lines().count(),
        1,
        "{what}: reason is one line, got `{body}`"
    );
}

/// Value of one Prometheus series, e.g. `name{label="x"}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------- clicks

#[test]
fn click_expands_every_macro() {
    let e = EdgeProc::start(&opts());
    let subs = ["a b", "x&y=z#frag/?", "é✓", "a+b-._~", ""];
    let mut target = String::from("/c/all?");
    for (i, s) in subs.iter().enumerate().take(4) {
        target.push_str(&format!("sub{}={}&", i + 1, enc(s)));
    }
    target.push_str("unrelated=1");
    let r = get(&e, &target);
    assert_eq!(r.status, 302, "link `all` has the default code: {r:?}");
    let cid = click_id_of(&r, "all");
    let want = format!(
        "https://m.example/l?cid={cid}&s1={}&s2={}&s3={}&s4={}&s5=&l=11&o=21&a=31",
        enc(subs[0]),
        enc(subs[1]),
        enc(subs[2]),
        enc(subs[3])
    );
    assert_eq!(
        location(&r, "all"),
        want,
        "every macro expanded, subs percent-encoded"
    );
    assert_eq!(cid.len(), 40, "a click id is 40 characters");
    let f = verify(&cid);
    assert_eq!(f.edge_id, EDGE_ID, "click id carries this edge's id");
    assert_eq!(f.link_id, 11, "click id carries the link id");
    assert_eq!(
        r.header("x-request-id"),
        Some(cid.as_str()),
        "a redirect without a client request id uses the click id"
    );
    let rec = wait_click(&e, &cid);
    assert_eq!(
        (rec.slug.as_str(), rec.link_id.as_str()),
        ("all", "11"),
        "record names slug and link"
    );
    assert_eq!(
        rec.status, "-",
        "an active link's click is neither quarantined nor fallback"
    );

    // A second click gets a different id.
    let cid2 = click_id_of(&get(&e, "/c/all"), "all again");
    assert_ne!(cid, cid2, "click ids are unique");
    assert_eq!(verify(&cid2).link_id, 11);
}

#[test]
fn click_uses_each_links_redirect_code() {
    let e = EdgeProc::start(&opts());
    for (slug, code) in [
        ("r301", 301),
        ("r302", 302),
        ("r307", 307),
        ("r308", 308),
        ("dflt", 302),
    ] {
        let r = get(&e, &format!("/c/{slug}"));
        assert_eq!(
            r.status, code,
            "/c/{slug} answers with the link's redirect code"
        );
        let path = if slug == "dflt" {
            "dflt".to_string()
        } else {
            code.to_string()
        };
        let loc = location(&r, slug);
        assert!(
            loc.starts_with(&format!("https://m.example/{path}?cid=")),
            "/c/{slug}: Location `{loc}`"
        );
        assert_common_headers(&r, slug);
        let cid = click_id_of(&r, slug);
        assert_eq!(verify(&cid).edge_id, EDGE_ID);
        wait_click(&e, &cid);
    }
}

#[test]
fn head_is_answered_and_recorded_like_get() {
    let e = EdgeProc::start(&opts());
    let g = get(&e, "/c/r307");
    let h = req(&e, "HEAD", "/c/r307", &[], b"");
    assert_eq!(h.status, g.status, "HEAD answers like GET");
    assert_eq!(h.status, 307);
    assert!(h.body.is_empty(), "HEAD has no body");
    assert_common_headers(&h, "HEAD click");
    let (gc, hc) = (click_id_of(&g, "GET"), click_id_of(&h, "HEAD"));
    assert_ne!(gc, hc, "HEAD mints its own click id");
    assert_eq!(verify(&hc).link_id, 14);
    let rec = wait_click(&e, &hc);
    assert_eq!(rec.slug, "r307", "the HEAD click is in the ring");
    wait_click(&e, &gc);
}

#[test]
fn unknown_and_invalid_slugs_are_404_and_store_nothing() {
    let e = EdgeProc::start(&opts());
    let before = ring_counts(&e);
    let long = "a".repeat(129);
    for target in [
        "/c/nope".to_string(),
        "/c/".to_string(),
        "/c/bad%20slug".to_string(),
        "/c/r302/extra".to_string(),
        "/c/r3!2".to_string(),
        "/c/%E2%9C%93".to_string(),
        format!("/c/{long}"),
    ] {
        let r = get(&e, &target);
        assert_eq!(
            r.status, 404,
            "{target}: unknown or invalid slug is 404 ({r:?})"
        );
        assert!(
            r.header("location").is_none(),
            "{target}: a 404 does not redirect"
        );
        assert_common_headers(&r, &target);
        assert_one_line(&r, &target);
    }
    // A click that works, so "nothing stored" is not just a ring that stores nothing.
    let cid = mint_click(&e);
    wait_click(&e, &cid);
    let after = ring_counts(&e);
    assert_eq!(
        (after.0, after.1),
        (before.0 + 1, before.1 + 1),
        "only the one real click was stored, not the 404s"
    );
}

#[test]
fn paused_link_goes_to_the_fallback_url() {
    let e = EdgeProc::start(&opts());
    let r = get(&e, "/c/paused?sub1=x");
    assert_eq!(
        r.status, 302,
        "a paused link redirects to the fallback: {r:?}"
    );
    assert_eq!(
        location(&r, "paused"),
        "https://fallback.example/",
        "[links] fallback_url"
    );
    assert_common_headers(&r, "paused");
    // No click id in a fallback Location; the request id is the click id.
    let cid = r.header("x-request-id").expect("X-Request-Id").to_string();
    let f = verify(&cid);
    assert_eq!(
        (f.edge_id, f.link_id),
        (EDGE_ID, 16),
        "request id is the minted click id"
    );
    let rec = wait_click(&e, &cid);
    assert_eq!(
        rec.status, "fallback",
        "the click is recorded as a fallback"
    );
    assert_eq!(rec.slug, "paused");
}

#[test]
fn paused_link_without_fallback_is_404() {
    let e = EdgeProc::start(&EdgeOpts {
        fallback_url: None,
        ..opts()
    });
    let before = ring_counts(&e);
    let r = get(&e, "/c/paused");
    assert_eq!(
        r.status, 404,
        "paused and no fallback anywhere: 404 ({r:?})"
    );
    assert!(r.header("location").is_none());
    assert_common_headers(&r, "paused, no fallback");
    // Active links still redirect on this edge.
    let cid = mint_click(&e);
    wait_click(&e, &cid);
    let after = ring_counts(&e);
    assert_eq!(
        after.1,
        before.1 + 1,
        "the 404 stored no click, the redirect one"
    );
}

#[test]
fn shadow_banned_link_redirects_and_is_quarantined() {
    let e = EdgeProc::start(&opts());
    let r = get(&e, "/c/shadow");
    assert_eq!(
        r.status, 302,
        "a shadow-banned link redirects normally: {r:?}"
    );
    let cid = click_id_of(&r, "shadow");
    assert_eq!(
        location(&r, "shadow"),
        format!("https://m.example/shadow?cid={cid}"),
        "to its own destination, not the fallback"
    );
    assert_eq!(verify(&cid).link_id, 17);
    let rec = wait_click(&e, &cid);
    assert_eq!(rec.status, "quarantined", "the click is marked quarantined");
    // An active link's click is not.
    let ok = mint_click(&e);
    assert_eq!(
        wait_click(&e, &ok).status,
        "-",
        "active link's click is not quarantined"
    );
}

#[test]
fn every_response_carries_cache_control_and_request_id() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let pb = |q: &str| format!("/postback?{q}");
    let big = vec![b'a'; 17_000];
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let cases: Vec<(&str, Resp, u16)> = vec![
        ("redirect 302", get(&e, "/c/r302"), 302),
        ("redirect 301", get(&e, "/c/r301"), 301),
        ("HEAD redirect", req(&e, "HEAD", "/c/r308", &[], b""), 308),
        ("fallback redirect", get(&e, "/c/paused"), 302),
        ("unknown slug", get(&e, "/c/nope"), 404),
        ("unknown path", get(&e, "/nope"), 404),
        ("click POST", req(&e, "POST", "/c/r302", &[], b""), 405),
        ("postback PUT", req(&e, "PUT", "/postback", &[], b""), 405),
        ("health POST", req(&e, "POST", "/healthz", &[], b""), 405),
        ("postback 400", get(&e, &pb("payout=1")), 400),
        (
            "postback 403",
            get(&e, &pb(&format!("click_id={cid}"))),
            403,
        ),
        (
            "postback 200",
            get(&e, &pb(&format!("click_id={cid}&token={NETWORK_TOKEN}"))),
            200,
        ),
        (
            "postback 415",
            req(
                &e,
                "POST",
                "/postback",
                &[("Content-Type", "application/json")],
                b"{}",
            ),
            415,
        ),
        (
            "postback 413",
            req(&e, "POST", "/postback", &form, &big),
            413,
        ),
        ("healthz", get(&e, "/healthz"), 200),
        ("readyz", get(&e, "/readyz"), 200),
    ];
    for (what, r, status) in &cases {
        assert_eq!(r.status, *status, "{what}: status ({r:?})");
        assert_common_headers(r, what);
    }
    // Fresh request ids differ from one response to the next.
    let ids: std::collections::HashSet<&str> = cases
        .iter()
        .filter_map(|(_, r, _)| r.header("x-request-id"))
        .collect();
    assert_eq!(
        ids.len(),
        cases.len(),
        "each response has its own request id"
    );
}

#[test]
fn request_id_is_echoed_when_usable() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let mine = "req-4711.abc_DEF";
    let rid = [("X-Request-Id", mine)];
    let cases = [
        ("redirect", req(&e, "GET", "/c/r302", &rid, b"")),
        ("fallback", req(&e, "GET", "/c/paused", &rid, b"")),
        ("404", req(&e, "GET", "/c/nope", &rid, b"")),
        ("405", req(&e, "DELETE", "/c/r302", &rid, b"")),
        ("400", req(&e, "GET", "/postback?payout=x", &rid, b"")),
        (
            "403",
            req(&e, "GET", &format!("/postback?click_id={cid}"), &rid, b""),
        ),
        (
            "200",
            req(
                &e,
                "GET",
                &format!("/postback?click_id={cid}&token={NETWORK_TOKEN}"),
                &rid,
                b"",
            ),
        ),
        ("healthz", req(&e, "GET", "/healthz", &rid, b"")),
        ("other", req(&e, "GET", "/other", &rid, b"")),
    ];
    for (what, r) in &cases {
        assert_eq!(
            r.header("x-request-id"),
            Some(mine),
            "{what}: the request's own id is echoed"
        );
        assert_common_headers(r, what);
    }
    // The redirect with a client id still hands out a click id in Location.
    verify(&click_id_of(&cases[0].1, "redirect with request id"));

    // Unusable ids (too long, not visible ASCII) are replaced with a fresh one.
    let long = "x".repeat(129);
    for bad in [long.as_str(), "has space"] {
        let r = req(&e, "GET", "/healthz", &[("X-Request-Id", bad)], b"");
        let got = r.header("x-request-id").expect("X-Request-Id");
        assert_ne!(got, bad, "unusable request id `{bad}` is not echoed");
        assert_common_headers(&r, "replaced request id");
        let r = req(&e, "GET", "/c/r302", &[("X-Request-Id", bad)], b"");
        assert_eq!(
            r.header("x-request-id"),
            Some(click_id_of(&r, "redirect, bad id").as_str()),
            "a redirect replaces an unusable id with its click id"
        );
    }
    let exactly = "y".repeat(128);
    let r = req(&e, "GET", "/healthz", &[("X-Request-Id", &exactly)], b"");
    assert_eq!(
        r.header("x-request-id"),
        Some(exactly.as_str()),
        "128 characters are usable"
    );
}

#[test]
fn click_rejects_other_methods_with_allow() {
    let e = EdgeProc::start(&opts());
    let before = ring_counts(&e);
    for m in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = req(&e, m, "/c/r302", &[], b"");
        assert_eq!(r.status, 405, "{m} /c/r302 is 405");
        assert_eq!(
            r.header("allow"),
            Some("GET, HEAD"),
            "{m} /c/r302 names the allowed methods"
        );
        assert_common_headers(&r, m);
    }
    let r = req(&e, "POST", "/c/x", &[], b"");
    assert_eq!(r.status, 405, "POST /c/x (unknown slug) is still 405");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        ring_counts(&e),
        before,
        "no click recorded for a refused method"
    );
}

// ---------------------------------------------------------------- postbacks

#[test]
fn postback_is_stored_and_answered_ok() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let r = get(
        &e,
        &format!(
            "/postback?click_id={cid}&txid=T-1&event=sale&status=PENDING&payout=12.345&currency=eur&token={NETWORK_TOKEN}&network_extra=zzz"
        ),
    );
    assert_eq!(r.status, 200, "valid postback: {r:?}");
    assert_eq!(r.body_str().trim_end(), "OK", "body is OK");
    assert_common_headers(&r, "postback 200");
    let rec = wait_postback_txid(&e, "T-1");
    assert_eq!(rec.click_id, cid, "postback record carries the click id");
    assert_eq!(
        rec.status, "pending",
        "status is case-insensitive and stored"
    );
}

#[test]
fn postback_accepts_every_alias() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let t = NETWORK_TOKEN;
    let mut txids = Vec::new();
    for name in ["click_id", "clickid", "subid", "cid", "transaction_id"] {
        let txid = format!("alias-cid-{name}");
        let r = get(&e, &format!("/postback?{name}={cid}&txid={txid}&token={t}"));
        assert_eq!(r.status, 200, "click id under `{name}`: {r:?}");
        txids.push(txid);
    }
    for name in ["txid", "tid", "order_id", "action_id"] {
        let txid = format!("alias-tx-{name}");
        let r = get(
            &e,
            &format!("/postback?click_id={cid}&{name}={txid}&token={t}"),
        );
        assert_eq!(r.status, 200, "txid under `{name}`: {r:?}");
        txids.push(txid);
    }
    for name in ["payout", "amount", "sum", "revenue"] {
        let txid = format!("alias-payout-{name}");
        let r = get(
            &e,
            &format!("/postback?click_id={cid}&txid={txid}&{name}=12.50&token={t}"),
        );
        assert_eq!(r.status, 200, "payout under `{name}`: {r:?}");
        txids.push(txid);
        // A bad value under the alias is refused as `payout`: the alias maps to that field.
        let r = get(
            &e,
            &format!("/postback?click_id={cid}&{name}=12,50&token={t}"),
        );
        assert_eq!(r.status, 400, "bad payout under `{name}`: {r:?}");
        assert_eq!(
            first_token(&r),
            "payout:",
            "bad `{name}` is reported as payout"
        );
    }
    for name in ["token", "security_token"] {
        let txid = format!("alias-token-{name}");
        let r = get(
            &e,
            &format!("/postback?click_id={cid}&txid={txid}&{name}={t}"),
        );
        assert_eq!(r.status, 200, "token under `{name}`: {r:?}");
        txids.push(txid);
        let r = get(
            &e,
            &format!("/postback?click_id={cid}&{name}=not-the-token"),
        );
        assert_eq!(r.status, 403, "wrong token under `{name}`: {r:?}");
    }
    for txid in &txids {
        let rec = wait_postback_txid(&e, txid);
        assert_eq!(rec.click_id, cid, "{txid}: stored with the click id");
        assert_eq!(rec.status, "approved", "{txid}: default status");
    }
}

#[test]
fn postback_defaults_and_empty_values() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let before = ring_counts(&e);
    // Networks send unfilled macros as empty values: they count as absent.
    let r = get(
        &e,
        &format!(
            "/postback?click_id={cid}&txid=&payout=&status=&event=&currency=&token={NETWORK_TOKEN}"
        ),
    );
    assert_eq!(
        r.status, 200,
        "empty values are absent, defaults apply: {r:?}"
    );
    let rec = wait_record(&e, "the defaulted postback", |r| {
        r.kind == "postback" && r.click_id == cid
    });
    assert_eq!(rec.status, "approved", "status defaults to approved");
    assert_eq!(rec.txid, "-", "no txid");
    let after = ring_counts(&e);
    assert_eq!(after.2, before.2 + 1, "exactly one postback stored");
    // The same field twice with the same value is fine.
    let r = get(
        &e,
        &format!(
            "/postback?click_id={cid}&clickid={cid}&payout=2&sum=2&txid=same&tid=same&token={NETWORK_TOKEN}"
        ),
    );
    assert_eq!(
        r.status, 200,
        "one value under several names is one value: {r:?}"
    );
    wait_postback_txid(&e, "same");
}

#[test]
fn postback_post_form_body_combines_with_query() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = req(
        &e,
        "POST",
        &format!("/postback?click_id={cid}"),
        &form,
        format!("txid=B-1&status=rejected&token={NETWORK_TOKEN}").as_bytes(),
    );
    assert_eq!(r.status, 200, "query + form body: {r:?}");
    assert_eq!(r.body_str().trim_end(), "OK");
    let rec = wait_postback_txid(&e, "B-1");
    assert_eq!(
        (rec.click_id.as_str(), rec.status.as_str()),
        (cid.as_str(), "rejected")
    );

    // Everything in the body, charset parameter on the content type.
    let r = req(
        &e,
        "POST",
        "/postback",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        format!("cid={cid}&order_id=B-2&status=reversed&security_token={NETWORK_TOKEN}").as_bytes(),
    );
    assert_eq!(r.status, 200, "body only: {r:?}");
    let rec = wait_postback_txid(&e, "B-2");
    assert_eq!(rec.status, "reversed");

    // Body values are validated like query values.
    let r = req(
        &e,
        "POST",
        &format!("/postback?click_id={cid}&token={NETWORK_TOKEN}"),
        &form,
        b"payout=lots",
    );
    assert_eq!(r.status, 400, "bad payout in the body: {r:?}");
    assert_eq!(first_token(&r), "payout:");
}

#[test]
fn postback_wrong_content_type_is_415_and_oversized_body_413() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let before = ring_counts(&e);
    let body = format!("click_id={cid}&txid=J&token={NETWORK_TOKEN}");
    for ct in [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let r = req(
            &e,
            "POST",
            "/postback",
            &[("Content-Type", ct)],
            body.as_bytes(),
        );
        assert_eq!(r.status, 415, "Content-Type {ct}: {r:?}");
        assert_common_headers(&r, "415");
        assert_one_line(&r, "415");
    }
    // Default [http] max_body_bytes is 16384.
    let mut big = format!("click_id={cid}&token={NETWORK_TOKEN}&txid=big&pad=").into_bytes();
    big.resize(16_385, b'p');
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = req(&e, "POST", "/postback", &form, &big);
    assert_eq!(r.status, 413, "a body over max_body_bytes: {r:?}");
    assert_eq!(first_token(&r), "body:", "413 reason names the body");
    assert_one_line(&r, "413");
    // Exactly at the limit is accepted.
    big.truncate(16_384);
    let r = req(&e, "POST", "/postback", &form, &big);
    assert_eq!(r.status, 200, "a body of exactly max_body_bytes: {r:?}");
    wait_postback_txid(&e, "big");
    let after = ring_counts(&e);
    assert_eq!(
        after.2,
        before.2 + 1,
        "only the in-limit postback was stored"
    );
}

#[test]
fn postback_invalid_parameters_are_400_naming_them() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let t = NETWORK_TOKEN;
    let before = ring_counts(&e);
    let cases: Vec<(&str, String)> = vec![
        ("click_id", format!("token={t}")),
        ("click_id", format!("txid=x&token={t}")),
        ("click_id", format!("click_id=abc&token={t}")),
        ("click_id", format!("click_id={cid}A&token={t}")),
        ("click_id", format!("click_id={}&token={t}", &cid[..39])),
        ("click_id", format!("click_id={}&token={t}", "A".repeat(40))),
        ("click_id", format!("click_id={}&token={t}", "*".repeat(40))),
        (
            "txid",
            format!("click_id={cid}&txid={}&token={t}", "x".repeat(129)),
        ),
        ("txid", format!("click_id={cid}&txid=a%0Ab&token={t}")),
        ("txid", format!("click_id={cid}&tid=a%00b&token={t}")),
        ("event", format!("click_id={cid}&event=a%20b&token={t}")),
        (
            "event",
            format!("click_id={cid}&event={}&token={t}", "e".repeat(65)),
        ),
        ("status", format!("click_id={cid}&status=done&token={t}")),
        ("payout", format!("click_id={cid}&payout=abc&token={t}")),
        ("payout", format!("click_id={cid}&payout=-1&token={t}")),
        (
            "payout",
            format!("click_id={cid}&payout=1.1234567&token={t}"),
        ),
        (
            "payout",
            format!("click_id={cid}&payout=1234567890123&token={t}"),
        ),
        ("payout", format!("click_id={cid}&revenue=1e3&token={t}")),
        (
            "currency",
            format!("click_id={cid}&currency=EURO&token={t}"),
        ),
        ("currency", format!("click_id={cid}&currency=E1R&token={t}")),
        (
            "currency",
            format!("click_id={cid}&currency=%C3%A9UR&token={t}"),
        ),
    ];
    for (field, q) in &cases {
        let r = get(&e, &format!("/postback?{q}"));
        assert_eq!(r.status, 400, "{q}: malformed {field} is 400 ({r:?})");
        assert_eq!(
            first_token(&r),
            format!("{field}:"),
            "{q}: reason names {field}: `{}`",
            r.body_str()
        );
        assert_one_line(&r, q);
        assert_common_headers(&r, q);
    }
    // Limits are inclusive: the longest valid values pass.
    let r = get(
        &e,
        &format!(
            "/postback?click_id={cid}&txid={}&event={}&payout=123456789012.123456&token={t}",
            "x".repeat(128),
            "e".repeat(64)
        ),
    );
    assert_eq!(
        r.status, 200,
        "txid of 128, event of 64, 12.6 digits: {r:?}"
    );
    wait_postback_txid(&e, &"x".repeat(128));
    let after = ring_counts(&e);
    assert_eq!(
        (after.0, after.2),
        (before.0 + 1, before.2 + 1),
        "no 400 stored anything; the one valid postback did"
    );
}

/// A click id with one character changed fails its MAC (or its version) and is malformed.
fn tamper(cid: &str, at: usize) -> String {
    let mut b = cid.as_bytes().to_vec();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).expect("ASCII")
}

#[test]
fn postback_with_a_changed_click_id_character_is_400() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let before = ring_counts(&e);
    for at in [0, 1, 5, 12, 20, 25, 30, 39] {
        let bad = tamper(&cid, at);
        assert_ne!(bad, cid);
        let r = get(
            &e,
            &format!("/postback?click_id={bad}&token={NETWORK_TOKEN}"),
        );
        assert_eq!(r.status, 400, "click id changed at {at}: {r:?}");
        assert_eq!(
            first_token(&r),
            "click_id:",
            "changed at {at}: `{}`",
            r.body_str()
        );
    }
    let r = get(
        &e,
        &format!("/postback?click_id={cid}&token={NETWORK_TOKEN}"),
    );
    assert_eq!(r.status, 200, "the untouched click id is accepted");
    wait_record(&e, "the valid postback", |r| {
        r.kind == "postback" && r.click_id == cid
    });
    assert_eq!(
        ring_counts(&e).2,
        before.2 + 1,
        "only the valid postback was stored"
    );
}

#[test]
fn postback_validation_comes_before_the_token() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let bad_cid = tamper(&cid, 20);
    let before = ring_counts(&e);
    let cases: Vec<(&str, String)> = vec![
        (
            "payout",
            format!("click_id={cid}&payout=abc&token=wrong-token-123"),
        ),
        ("payout", format!("click_id={cid}&payout=abc")),
        (
            "click_id",
            format!("click_id={bad_cid}&token=wrong-token-123"),
        ),
        ("click_id", format!("click_id={bad_cid}")),
        ("click_id", "security_token=nope-nope-nope".to_string()),
        (
            "status",
            format!("click_id={cid}&status=done&security_token=nope-nope"),
        ),
        ("currency", format!("click_id={cid}&currency=x")),
    ];
    for (field, q) in &cases {
        let r = get(&e, &format!("/postback?{q}"));
        assert_eq!(
            r.status, 400,
            "{q}: a bad {field} is 400 whatever the token ({r:?})"
        );
        assert_eq!(first_token(&r), format!("{field}:"), "{q}");
    }
    assert_eq!(ring_counts(&e), before, "nothing stored");
}

#[test]
fn postback_missing_or_unknown_token_is_403() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    wait_click(&e, &cid);
    let before = ring_counts(&e);
    let cases = [
        format!("click_id={cid}"),
        format!("click_id={cid}&token="),
        format!("click_id={cid}&token=not-the-token"),
        format!("click_id={cid}&security_token=not-the-token"),
        format!("click_id={cid}&token={}", NETWORK_TOKEN.to_uppercase()),
        format!("click_id={cid}&token={NETWORK_TOKEN}x"),
    ];
    for q in &cases {
        let r = get(&e, &format!("/postback?{q}"));
        assert_eq!(r.status, 403, "{q}: missing or unknown token ({r:?})");
        assert_eq!(first_token(&r), "token:", "{q}: 403 reason names the token");
        assert_common_headers(&r, q);
        assert_one_line(&r, q);
    }
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = req(
        &e,
        "POST",
        "/postback",
        &form,
        format!("click_id={cid}").as_bytes(),
    );
    assert_eq!(r.status, 403, "POST without a token: {r:?}");
    assert_eq!(ring_counts(&e), before, "no 403 stored anything");
}

#[test]
fn postback_two_values_for_one_field_is_400() {
    let e = EdgeProc::start(&opts());
    let (a, b) = (mint_click(&e), mint_click(&e));
    assert_ne!(a, b);
    let t = NETWORK_TOKEN;
    let before = ring_counts(&e);
    let cases: Vec<(&str, String)> = vec![
        ("click_id", format!("click_id={a}&click_id={b}&token={t}")),
        ("click_id", format!("click_id={a}&cid={b}&token={t}")),
        (
            "click_id",
            format!("subid={a}&transaction_id={b}&token={t}"),
        ),
        ("txid", format!("click_id={a}&txid=1&tid=2&token={t}")),
        (
            "txid",
            format!("click_id={a}&order_id=1&action_id=2&token={t}"),
        ),
        (
            "event",
            format!("click_id={a}&event=sale&event=lead&token={t}"),
        ),
        (
            "status",
            format!("click_id={a}&status=approved&status=pending&token={t}"),
        ),
        (
            "payout",
            format!("click_id={a}&payout=1&amount=2&token={t}"),
        ),
        ("payout", format!("click_id={a}&sum=1&revenue=2&token={t}")),
        (
            "currency",
            format!("click_id={a}&currency=USD&currency=EUR&token={t}"),
        ),
        (
            "token",
            format!("click_id={a}&token={t}&security_token=other-token"),
        ),
    ];
    for (field, q) in &cases {
        let r = get(&e, &format!("/postback?{q}"));
        assert_eq!(r.status, 400, "{q}: two values for {field} ({r:?})");
        assert_eq!(
            first_token(&r),
            format!("{field}:"),
            "{q}: `{}`",
            r.body_str()
        );
    }
    // Query against body.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = req(
        &e,
        "POST",
        &format!("/postback?click_id={a}&txid=q&token={t}"),
        &form,
        b"txid=b",
    );
    assert_eq!(r.status, 400, "txid in query and body differ: {r:?}");
    assert_eq!(first_token(&r), "txid:");
    let r = req(
        &e,
        "POST",
        &format!("/postback?click_id={a}&token={t}"),
        &form,
        format!("cid={b}").as_bytes(),
    );
    assert_eq!(r.status, 400, "click id in query and body differ: {r:?}");
    assert_eq!(first_token(&r), "click_id:");
    assert_eq!(ring_counts(&e), before, "no conflicting postback stored");
}

#[test]
fn postback_other_methods_are_405() {
    let e = EdgeProc::start(&opts());
    let cid = mint_click(&e);
    let before = ring_counts(&e);
    for m in ["PUT", "DELETE", "PATCH", "HEAD"] {
        let r = req(
            &e,
            m,
            &format!("/postback?click_id={cid}&token={NETWORK_TOKEN}"),
            &[],
            b"",
        );
        assert_eq!(r.status, 405, "{m} /postback: {r:?}");
        assert_eq!(
            r.header("allow"),
            Some("GET, POST"),
            "{m} /postback names GET, POST"
        );
        assert_common_headers(&r, m);
    }
    assert_eq!(ring_counts(&e), before, "nothing stored");
}

// ---------------------------------------------------------------- health, metrics, routing

#[test]
fn health_endpoints_answer() {
    let e = EdgeProc::start(&opts());
    let r = get(&e, "/healthz");
    assert_eq!((r.status, r.body_str().trim_end()), (200, "ok"), "liveness");
    let r = get(&e, "/readyz");
    assert_eq!(r.status, 200, "ring writable and links loaded: {r:?}");
    assert_common_headers(&r, "readyz");
    let r = req(&e, "HEAD", "/readyz", &[], b"");
    assert_eq!(r.status, 200, "HEAD /readyz");
    let r = req(&e, "POST", "/readyz", &[], b"");
    assert_eq!(r.status, 405, "POST /readyz");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

#[test]
fn unknown_paths_are_404() {
    let e = EdgeProc::start(&opts());
    for target in [
        "/",
        "/nope",
        "/c",
        "/cc/r302",
        "/postback/x",
        "/healthz/",
        "/metrics",
        "/C/r302",
    ] {
        let r = get(&e, target);
        assert_eq!(r.status, 404, "{target}: {r:?}");
        assert!(r.header("location").is_none(), "{target} does not redirect");
        assert_common_headers(&r, target);
    }
    let r = Client::connect(e.metrics).request("GET", "/nope", &[], b"");
    assert_eq!(r.status, 404, "metrics listener: unknown path");
}

#[test]
fn metrics_count_requests_and_show_the_ring() {
    let e = EdgeProc::start(&opts());
    let clicks_3xx = 7;
    let mut cid = String::new();
    for i in 0..clicks_3xx {
        let slug = if i % 2 == 0 { "r302" } else { "r301" };
        let r = get(&e, &format!("/c/{slug}"));
        assert!(matches!(r.status, 301 | 302), "click {i}: {r:?}");
        cid = click_id_of(&r, slug);
    }
    assert_eq!(get(&e, "/c/nope").status, 404);
    let r = get(
        &e,
        &format!("/postback?click_id={cid}&token={NETWORK_TOKEN}"),
    );
    assert_eq!(r.status, 200, "postback: {r:?}");
    assert_eq!(get(&e, "/postback?payout=x").status, 400);
    assert_eq!(get(&e, "/healthz").status, 200);
    assert_eq!(get(&e, "/elsewhere").status, 404);

    let want = [
        (
            r#"affgate_edge_http_requests_total{route="click",status="3xx"}"#,
            clicks_3xx as f64,
        ),
        (
            r#"affgate_edge_http_requests_total{route="click",status="4xx"}"#,
            1.0,
        ),
        (
            r#"affgate_edge_http_requests_total{route="click",status="5xx"}"#,
            0.0,
        ),
        (
            r#"affgate_edge_http_requests_total{route="postback",status="2xx"}"#,
            1.0,
        ),
        (
            r#"affgate_edge_http_requests_total{route="postback",status="4xx"}"#,
            1.0,
        ),
        (
            r#"affgate_edge_http_requests_total{route="health",status="2xx"}"#,
            1.0,
        ),
        (
            r#"affgate_edge_http_requests_total{route="other",status="4xx"}"#,
            1.0,
        ),
        ("affgate_edge_ring_unacked_records", clicks_3xx as f64 + 1.0),
        ("affgate_edge_links_loaded", 8.0),
        ("affgate_edge_tokens_loaded", 1.0),
        ("affgate_edge_ring_append_errors_total", 0.0),
    ];
    let text = wait_for("metrics to count every request", WAIT, || {
        let t = e.metrics_text();
        want.iter()
            .all(|(s, v)| metric(&t, s) == Some(*v))
            .then_some(t)
    });
    for (s, v) in want {
        assert_eq!(metric(&text, s), Some(v), "{s}");
    }
    let cap = metric(&text, "affgate_edge_ring_capacity_bytes").expect("ring capacity gauge");
    assert!(
        cap > 0.0 && cap <= 4.0 * 1024.0 * 1024.0,
        "capacity {cap} within the 4 MiB ring"
    );
    let used = metric(&text, "affgate_edge_ring_used_bytes").expect("ring used gauge");
    assert!(
        used > 0.0 && used < cap,
        "used {used} of {cap} after 8 records"
    );
    let fill = metric(&text, "affgate_edge_ring_fill_ratio").expect("fill ratio gauge");
    assert!(fill > 0.0 && fill < 1.0, "fill ratio {fill}");
    for g in [
        "affgate_edge_spill_records",
        "affgate_edge_spill_bytes",
        "affgate_edge_delivery_lag_seconds",
        "affgate_edge_fallback_redirects_total",
    ] {
        assert!(metric(&text, g).is_some(), "{g} is exported:\n{text}");
    }
    assert!(
        text.contains("# TYPE affgate_edge_http_requests_total counter"),
        "Prometheus TYPE line"
    );
    // A fallback click counts.
    assert_eq!(get(&e, "/c/paused").status, 302);
    wait_for("fallback counter", WAIT, || {
        (metric(&e.metrics_text(), "affgate_edge_fallback_redirects_total") == Some(1.0))
            .then_some(())
    });
}
