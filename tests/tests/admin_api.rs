//! The admin API end to end (DESIGN.md "Admin API contract", docs/admin.md,
//! docs/openapi.json): a real `affgate-collector` with its admin listener,
//! its own PostgreSQL database and a private `redis-server`.
//!
//! - `auth_openapi_and_refusals`: 401 on every route; the served OpenAPI
//!   document names every route and exactly the fields the answers carry;
//!   every POST/PATCH field tried missing, wrong-typed and oversized, and
//!   every query parameter tried out of range, answers 4xx naming the field
//!   and never 5xx; 404, 405, 409 and references to rows that do not exist.
//! - `slugs_pages_decimals_and_redis`: generated and given slugs,
//!   pagination, decimals in and out, and what lands in Redis, including
//!   the catch-up after Redis was flushed or down.
//!
//! Each test runs one collector; every wait polls with a deadline.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use affgate_tests::{
    ADMIN_TOKEN, Client, CollectorOpts, CollectorProc, Redis, Stack, api_as, created, keys,
    token_hash, wait_for,
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);
/// The alphabet of generated slugs (collector/src/admin/slug.rs).
const SLUG_ALPHABET: &str = "23456789abcdefghjkmnpqrstuvwxyz";

/// Every route the admin API serves behind the token, with what it answers
/// to the right token and the body given (`{}` for POST and PATCH): each
/// is exercised below, and each must appear in docs/openapi.json.
const ROUTES: &[(&str, &str, u16)] = &[
    ("POST", "/api/v1/networks", 422),
    ("GET", "/api/v1/networks", 200),
    ("GET", "/api/v1/networks/{id}", 200),
    ("POST", "/api/v1/offers", 422),
    ("GET", "/api/v1/offers", 200),
    ("GET", "/api/v1/offers/{id}", 200),
    ("PATCH", "/api/v1/offers/{id}", 400),
    ("POST", "/api/v1/affiliates", 422),
    ("GET", "/api/v1/affiliates", 200),
    ("GET", "/api/v1/affiliates/{id}", 200),
    ("POST", "/api/v1/links", 422),
    ("GET", "/api/v1/links", 200),
    ("GET", "/api/v1/links/{id}", 200),
    ("PATCH", "/api/v1/links/{id}", 400),
    ("GET", "/api/v1/conversions", 200),
    // No conversion exists in this test: the route answers "conversion
    // not found", not "endpoint not found".
    ("GET", "/api/v1/conversions/{id}", 404),
];

// ---------------------------------------------------------------- helpers

/// The admin API of one collector, remembering every answer so a test can
/// check that none of them was a 5xx.
struct Admin {
    addr: SocketAddr,
    answers: RefCell<Vec<(String, u16)>>,
}

impl Admin {
    fn new(collector: &CollectorProc) -> Admin {
        Admin {
            addr: collector.admin.expect("the collector runs the admin API"),
            answers: RefCell::new(Vec::new()),
        }
    }

    fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let r = api_as(self.addr, token, method, path, body);
        let what = format!("{method} {path} {}", short(body.unwrap_or("")));
        self.answers.borrow_mut().push((what, r.0));
        r
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_as(Some(ADMIN_TOKEN), method, path, body)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    fn send(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(method, path, Some(&body.to_string()))
    }

    fn create(&self, path: &str, body: Value) -> Value {
        created(path, self.send("POST", path, &body))
    }

    fn ok(&self, path: &str) -> Value {
        let (status, v) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    fn assert_no_5xx(&self) {
        let answers = self.answers.borrow();
        let bad: Vec<_> = answers.iter().filter(|(_, s)| *s >= 500).collect();
        eprintln!("{} admin API answers", answers.len());
        assert!(
            bad.is_empty(),
            "{} of {} answers were 5xx: {bad:#?}",
            bad.len(),
            answers.len()
        );
    }
}

/// A request or body cut for messages.
fn short(s: &str) -> String {
    if s.chars().count() > 120 {
        format!(
            "{}...({} chars)",
            s.chars().take(120).collect::<String>(),
            s.len()
        )
    } else {
        s.to_string()
    }
}

fn id(v: &Value) -> i64 {
    v["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer id in {v}"))
}

/// A refusal: `status` with a non-empty `error` and `field` as given.
fn refusal(
    status: u16,
    v: &Value,
    want_status: u16,
    want_field: Option<&str>,
) -> Result<(), String> {
    let error_ok = v["error"].as_str().is_some_and(|e| !e.is_empty());
    // `field` is always present: null or the name.
    let field_ok = match (v.get("field"), want_field) {
        (Some(f), None) => f.is_null(),
        (Some(f), Some(w)) => f.as_str() == Some(w),
        (None, _) => false,
    };
    if status == want_status && error_ok && field_ok {
        Ok(())
    } else {
        Err(format!(
            "want {want_status} field {want_field:?}, got {status} {v}"
        ))
    }
}

fn collector(stack: &Stack, redis: &Redis) -> CollectorProc {
    CollectorProc::start_with(
        stack,
        &CollectorOpts {
            admin_redis: Some(redis.url()),
            ..Default::default()
        },
    )
}

/// The property names of schema `name` in the OpenAPI document, through
/// `allOf` and `$ref`.
fn schema_props(doc: &Value, name: &str) -> BTreeSet<String> {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "openapi.json has no schema {name}");
    let mut out = BTreeSet::new();
    let mut add = |part: &Value| {
        if let Some(r) = part["$ref"].as_str() {
            let target = r.rsplit('/').next().expect("a $ref has a last segment");
            out.extend(schema_props(doc, target));
        }
        if let Some(p) = part["properties"].as_object() {
            out.extend(p.keys().cloned());
        }
    };
    add(s);
    for part in s["allOf"].as_array().into_iter().flatten() {
        add(part);
    }
    out
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

// ---------------------------------------------------------------- the refusal table

/// What a field must be, as far as the refusals below go.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A non-empty string of at most this many characters.
    Text(usize),
    /// A network's postback token: 8 to 200 printable ASCII.
    Token,
    /// A positive integer id.
    Id,
    /// An integer in this range.
    Int(i64, i64),
    Decimal,
    Decimals,
    Currency,
    Url,
    Destination,
    Slug,
    RedirectCode,
    Choice,
}

fn wrong_string_types() -> Vec<(&'static str, Value)> {
    vec![
        ("number", json!(5)),
        ("float", json!(1.5)),
        ("bool", json!(true)),
        ("object", json!({"a": "b"})),
        ("array", json!(["x"])),
        ("empty", json!("")),
        ("control character", json!("a\u{1}b")),
        ("NUL", json!("a\u{0}b")),
    ]
}

fn wrong_integer_types() -> Vec<(&'static str, Value)> {
    vec![
        ("string", json!("5")),
        ("float", json!(1.5)),
        ("bool", json!(true)),
        ("object", json!({"a": 1})),
        ("array", json!([1])),
        ("beyond i64", json!(9_223_372_036_854_775_808u64)),
        ("1e30", json!(1e30)),
    ]
}

/// 2049 characters: one over the URL limit.
fn long_url() -> String {
    let base = "https://m.example/";
    format!("{base}{}", "a".repeat(2049 - base.len()))
}

fn bad_values(kind: Kind) -> Vec<(&'static str, Value)> {
    let mut v = Vec::new();
    match kind {
        Kind::Text(max) => {
            v.extend(wrong_string_types());
            v.push(("too long", json!("x".repeat(max + 1))));
            v.push(("too long in characters", json!("é".repeat(max + 1))));
        }
        Kind::Token => {
            v.extend(wrong_string_types());
            v.push(("too long", json!("t".repeat(201))));
            v.push(("too short", json!("1234567")));
            v.push(("space", json!("abcd efgh")));
            v.push(("non-ASCII", json!("tokenéééé")));
        }
        Kind::Id => {
            v.extend(wrong_integer_types());
            v.push(("zero", json!(0)));
            v.push(("negative", json!(-1)));
        }
        Kind::Int(min, max) => {
            v.extend(wrong_integer_types());
            v.push(("below range", json!(min - 1)));
            v.push(("above range", json!(max + 1)));
        }
        Kind::Decimal => {
            v.extend([
                ("bool", json!(true)),
                ("object", json!({"a": 1})),
                ("array", json!(["1"])),
                ("empty", json!("")),
                ("text", json!("abc")),
                ("7 fraction digits", json!("1.0000001")),
                ("7 fraction digits as a number", json!(1.000_000_1)),
                ("negative", json!(-1)),
                ("negative string", json!("-1")),
                ("1e30", json!(1e30)),
                ("exponent string", json!("1e5")),
                ("13 integer digits", json!("1234567890123")),
                ("bare fraction", json!(".5")),
                ("bare point", json!("1.")),
            ]);
        }
        Kind::Decimals => {
            v.extend([
                ("string", json!("0.5")),
                ("number", json!(0.5)),
                ("bool", json!(true)),
                ("object", json!({"a": 1})),
                ("empty array", json!([])),
                ("11 levels", json!(vec![0.01; 11])),
                ("item over 1", json!([1.5])),
                ("sum over 1", json!([0.7, "0.4"])),
                ("text item", json!(["x"])),
                ("nested array", json!([[0.1]])),
                ("7 fraction digits", json!(["0.0000001"])),
                ("negative item", json!([-0.1])),
                ("1e30 item", json!([1e30])),
            ]);
        }
        Kind::Currency => {
            v.extend(wrong_string_types());
            v.extend([
                ("lowercase", json!("usd")),
                ("4 letters", json!("EURO")),
                ("2 letters", json!("US")),
                ("digits", json!("123")),
            ]);
        }
        Kind::Url | Kind::Destination => {
            v.extend(wrong_string_types());
            v.extend([
                ("2049 characters", json!(long_url())),
                ("ftp", json!("ftp://m.example/")),
                ("relative", json!("/landing")),
                ("no host", json!("https:///x")),
                ("space", json!("https://m.example/a b")),
                ("no scheme", json!("m.example/x")),
            ]);
            if matches!(kind, Kind::Destination) {
                v.push(("unknown macro", json!("https://m.example/?x={bogus}")));
                v.push(("unclosed macro", json!("https://m.example/?x={click_id")));
            }
        }
        Kind::Slug => {
            v.extend(wrong_string_types());
            v.extend([
                ("129 characters", json!("s".repeat(129))),
                ("bad characters", json!("bad slug!")),
                ("slash", json!("a/b")),
                ("non-ASCII", json!("äbc")),
            ]);
        }
        Kind::RedirectCode => {
            v.extend(wrong_integer_types());
            v.extend([
                ("303", json!(303)),
                ("200", json!(200)),
                ("999", json!(999)),
            ]);
        }
        Kind::Choice => {
            v.extend(wrong_string_types());
            v.push(("unknown", json!("bogus")));
            v.push(("too long", json!("x".repeat(65))));
        }
    }
    v
}

/// A POST or PATCH endpoint: a body it accepts and its fields.
struct Endpoint {
    method: &'static str,
    path: String,
    /// Accepted as is (PATCH: a field is added to `{}`).
    base: Value,
    /// (field, kind, required)
    fields: Vec<(&'static str, Kind, bool)>,
}

/// Every field of `e`: absent and null (when required), each bad value,
/// plus an unknown field. Returns the mismatches.
fn refuse_fields(admin: &Admin, e: &Endpoint, fresh: &mut dyn FnMut(&mut Value)) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |body: Value, want: &str, case: &str| {
        let (status, v) = admin.send(e.method, &e.path, &body);
        if let Err(why) = refusal(status, &v, 422, Some(want)) {
            failures.push(format!(
                "{} {} [{want}: {case}] {}: {why}",
                e.method,
                e.path,
                short(&body.to_string())
            ));
        }
    };
    for &(field, kind, required) in &e.fields {
        if required {
            let mut body = e.base.clone();
            fresh(&mut body);
            body.as_object_mut()
                .expect("base is an object")
                .remove(field);
            check(body, field, "missing");
            let mut body = e.base.clone();
            fresh(&mut body);
            body[field] = Value::Null;
            check(body, field, "null");
        }
        for (case, value) in bad_values(kind) {
            let mut body = e.base.clone();
            fresh(&mut body);
            body[field] = value;
            check(body, field, case);
        }
    }
    let mut body = e.base.clone();
    fresh(&mut body);
    body["bogus_field"] = json!(1);
    check(body, "bogus_field", "unknown field");
    failures
}

/// Bodies refused before any field is read: 400 or 413, `field` null.
fn refuse_bodies(admin: &Admin, method: &str, path: &str) -> Vec<String> {
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(70 * 1024));
    let cases: Vec<(Option<&str>, u16)> = vec![
        (None, 400),
        (Some("{\"name\":"), 400),
        (Some("not json"), 400),
        (Some("[]"), 400),
        (Some("[{\"name\": \"x\"}]"), 400),
        (Some("\"x\""), 400),
        (Some("5"), 400),
        (Some("null"), 400),
        (Some("true"), 400),
        (Some(&big), 413),
    ];
    let mut failures = Vec::new();
    for (body, want) in cases {
        let (status, v) = admin.call(method, path, body);
        if let Err(why) = refusal(status, &v, want, None) {
            failures.push(format!(
                "{method} {path} body {}: {why}",
                short(body.unwrap_or("<none>"))
            ));
        }
    }
    failures
}

// ---------------------------------------------------------------- tests

#[test]
fn auth_openapi_and_refusals() {
    let stack = Stack::new("admin_refuse");
    let redis = Redis::start();
    let c = collector(&stack, &redis);
    let admin = Admin::new(&c);

    // One of each resource, so item routes have something to find.
    let net = admin.create(
        "/api/v1/networks",
        json!({"name": "Net", "postback_token": "net-token-0001"}),
    );
    let offer = admin.create(
        "/api/v1/offers",
        json!({"name": "Offer", "network_id": id(&net), "payout": "10",
               "currency": "USD", "commission_levels": ["0.5", "0.1"]}),
    );
    let aff = admin.create("/api/v1/affiliates", json!({"name": "Aff"}));
    let link = admin.create(
        "/api/v1/links",
        json!({"offer_id": id(&offer), "affiliate_id": id(&aff),
               "destination": "https://m.example/?c={click_id}", "slug": "given-slug"}),
    );
    let item_id = |template: &str| -> i64 {
        match template.split('/').nth(3) {
            Some("networks") => id(&net),
            Some("offers") => id(&offer),
            Some("affiliates") => id(&aff),
            Some("links") => id(&link),
            _ => 1,
        }
    };
    let concrete = |template: &str| template.replace("{id}", &item_id(template).to_string());

    // --- 401 on every route, before anything else is looked at.
    let same_length_wrong: String = {
        let mut t: Vec<char> = ADMIN_TOKEN.chars().collect();
        let last = t.last_mut().expect("token is not empty");
        *last = if *last == 'x' { 'y' } else { 'x' };
        t.into_iter().collect()
    };
    let wrong_tokens: Vec<(&str, Option<&str>)> = vec![
        ("no token", None),
        ("wrong token", Some("wrong")),
        ("same length, one character off", Some(&same_length_wrong)),
        ("longer", Some("test-admin-token-0123456789-and-more")),
        (
            "prefix of the token",
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        ),
        ("empty", Some("")),
    ];
    for &(method, template, with_token) in ROUTES {
        let path = concrete(template);
        let body = (method != "GET").then_some("{}");
        for (why, token) in &wrong_tokens {
            let (status, v) = admin.call_as(*token, method, &path, body);
            refusal(status, &v, 401, None)
                .unwrap_or_else(|e| panic!("{method} {path} with {why}: {e}"));
        }
        // Another scheme carrying the right token is not a bearer token.
        let basic = format!("Basic {ADMIN_TOKEN}");
        let r = Client::connect(admin.addr).request(
            method,
            &path,
            &[
                ("Authorization", &basic),
                ("Content-Type", "application/json"),
            ],
            body.unwrap_or("").as_bytes(),
        );
        assert_eq!(
            r.status,
            401,
            "{method} {path} with Basic: {}",
            r.body_str()
        );
        assert_eq!(
            r.header("WWW-Authenticate"),
            Some("Bearer"),
            "{method} {path}"
        );
        // And the right token reaches the route.
        let (status, v) = admin.call(method, &path, body);
        assert_eq!(status, with_token, "{method} {path} with the token: {v}");
        if status == 404 {
            assert_eq!(
                v["error"], "conversion not found",
                "{method} {path} is routed"
            );
        }
    }
    // Unknown paths say nothing without a token either.
    for path in ["/api/v1/nope", "/nope", "/api/v2/networks"] {
        let (status, v) = admin.call_as(None, "GET", path, None);
        refusal(status, &v, 401, None).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    }

    // --- The OpenAPI document: no token, 3.0.3, every route, and exactly
    // the fields the answers carry.
    let (status, doc) = admin.call_as(None, "GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200, "openapi.json without a token: {doc}");
    assert_eq!(doc["openapi"], "3.0.3", "OpenAPI version");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"],
        json!({"type": "http", "scheme": "bearer",
               "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}),
        "bearer security scheme"
    );
    for &(method, template, _) in ROUTES {
        let op = &doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "openapi.json has no {method} {template}");
        assert!(
            op["responses"]["401"].is_object(),
            "{method} {template} documents 401"
        );
    }
    let (_, healthz) = admin.call_as(None, "GET", "/healthz", None);
    assert_eq!(healthz["status"], "ok", "admin /healthz without a token");
    for (schema, answer) in [
        ("NetworkCreated", &net),
        ("Offer", &offer),
        ("Affiliate", &aff),
        ("Link", &link),
        (
            "Network",
            &admin.ok(&format!("/api/v1/networks/{}", id(&net))),
        ),
        ("Page", &admin.ok("/api/v1/links")),
        ("Page", &admin.ok("/api/v1/conversions")),
    ] {
        assert_eq!(
            keys_of(answer),
            schema_props(&doc, schema),
            "openapi.json's {schema} lists exactly the fields of {answer}"
        );
    }
    assert!(
        admin
            .ok(&format!("/api/v1/networks/{}", id(&net)))
            .get("postback_token")
            .is_none(),
        "a network's token is returned only on creation"
    );
    assert!(
        admin.ok("/api/v1/networks")["items"][0]
            .get("postback_token")
            .is_none(),
        "nor in the collection"
    );

    // --- Every field of every POST and PATCH endpoint refused by name.
    let mut n = 0u32;
    let mut unique_token = |body: &mut Value| {
        if body.get("postback_token").is_some() {
            n += 1;
            body["postback_token"] = json!(format!("refusal-token-{n:06}"));
        }
    };
    let endpoints = [
        Endpoint {
            method: "POST",
            path: "/api/v1/networks".into(),
            base: json!({"name": "N", "postback_token": "x"}),
            fields: vec![
                ("name", Kind::Text(200), true),
                ("postback_token", Kind::Token, true),
            ],
        },
        Endpoint {
            method: "POST",
            path: "/api/v1/offers".into(),
            base: json!({"name": "O", "network_id": id(&net), "payout": "1.5",
                         "currency": "EUR", "commission_levels": [0.5]}),
            fields: vec![
                ("name", Kind::Text(200), true),
                ("network_id", Kind::Id, true),
                ("payout", Kind::Decimal, true),
                ("currency", Kind::Currency, true),
                ("commission_levels", Kind::Decimals, true),
                ("daily_cap", Kind::Int(1, i64::from(i32::MAX)), false),
                ("attribution_window_days", Kind::Int(1, 3650), false),
                ("fallback_url", Kind::Url, false),
            ],
        },
        Endpoint {
            method: "PATCH",
            path: format!("/api/v1/offers/{}", id(&offer)),
            base: json!({}),
            fields: vec![
                ("status", Kind::Choice, false),
                ("fallback_url", Kind::Url, false),
            ],
        },
        Endpoint {
            method: "POST",
            path: "/api/v1/affiliates".into(),
            base: json!({"name": "A"}),
            fields: vec![
                ("name", Kind::Text(200), true),
                ("parent_id", Kind::Id, false),
                ("postback_url", Kind::Url, false),
            ],
        },
        Endpoint {
            method: "POST",
            path: "/api/v1/links".into(),
            base: json!({"offer_id": id(&offer), "affiliate_id": id(&aff),
                         "destination": "https://m.example/"}),
            fields: vec![
                ("offer_id", Kind::Id, true),
                ("affiliate_id", Kind::Id, true),
                ("destination", Kind::Destination, true),
                ("slug", Kind::Slug, false),
                ("redirect_code", Kind::RedirectCode, false),
            ],
        },
        Endpoint {
            method: "PATCH",
            path: format!("/api/v1/links/{}", id(&link)),
            base: json!({}),
            fields: vec![
                ("status", Kind::Choice, false),
                ("destination", Kind::Destination, false),
            ],
        },
    ];
    let mut failures = Vec::new();
    for e in &endpoints {
        failures.extend(refuse_fields(&admin, e, &mut unique_token));
        failures.extend(refuse_bodies(&admin, e.method, &e.path));
    }
    // A PATCH that changes nothing is a 400, not a silent 200.
    for e in endpoints.iter().filter(|e| e.method == "PATCH") {
        for body in ["{}", "{\"status\": null}"] {
            let (status, v) = admin.call("PATCH", &e.path, Some(body));
            if let Err(why) = refusal(status, &v, 400, None) {
                failures.push(format!("PATCH {} {body}: {why}", e.path));
            }
        }
    }
    // GET takes no body.
    let (status, v) = admin.call("GET", "/api/v1/networks", Some("{}"));
    if let Err(why) = refusal(status, &v, 400, None) {
        failures.push(format!("GET /api/v1/networks with a body: {why}"));
    }

    // --- Query parameters, on every collection.
    let mut queries: Vec<(String, &str)> = Vec::new();
    for coll in ["networks", "offers", "affiliates", "links", "conversions"] {
        for (q, field) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=abc", "limit"),
            ("limit=", "limit"),
            ("limit=1.5", "limit"),
            ("limit=99999999999999999999999", "limit"),
            ("limit=1&limit=2", "limit"),
            ("after=-1", "after"),
            ("after=x", "after"),
            ("bogus=1", "bogus"),
            ("limit=5&zzz", "zzz"),
        ] {
            queries.push((format!("/api/v1/{coll}?{q}"), field));
        }
    }
    let long_click = "c".repeat(65);
    for (q, field) in [
        ("affiliate_id=x", "affiliate_id"),
        ("affiliate_id=0", "affiliate_id"),
        ("offer_id=-3", "offer_id"),
        ("offer_id=", "offer_id"),
        ("status=bogus", "status"),
        ("status=", "status"),
        ("click_id=", "click_id"),
        (&format!("click_id={long_click}") as &str, "click_id"),
        ("click_id=a%00b", "click_id"),
        ("network_id=1", "network_id"),
    ] {
        queries.push((format!("/api/v1/conversions?{q}"), field));
    }
    queries.push(("/api/v1/networks?status=active".into(), "status"));
    queries.push(("/api/v1/links?affiliate_id=1".into(), "affiliate_id"));
    for (path, field) in &queries {
        let (status, v) = admin.get(path);
        if let Err(why) = refusal(status, &v, 422, Some(field)) {
            failures.push(format!("GET {path}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} refusals were not as documented:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // --- Limits are inclusive: the longest accepted values are accepted.
    let longest_url = format!("https://m.example/{}", "a".repeat(2048 - 18));
    assert_eq!(longest_url.len(), 2048);
    admin.create(
        "/api/v1/networks",
        json!({"name": "n".repeat(200), "postback_token": "t".repeat(200)}),
    );
    admin.create(
        "/api/v1/offers",
        json!({"name": "é".repeat(200), "network_id": id(&net), "payout": "999999999999.999999",
               "currency": "USD", "commission_levels": vec!["0.1"; 10],
               "daily_cap": i32::MAX, "attribution_window_days": 3650, "fallback_url": longest_url}),
    );
    admin.create(
        "/api/v1/links",
        json!({"offer_id": id(&offer), "affiliate_id": id(&aff), "destination": longest_url,
               "slug": "s".repeat(128), "redirect_code": 308}),
    );

    // --- 404: unknown ids and paths.
    let mut not_found: Vec<(&str, String, Option<String>)> = Vec::new();
    for coll in ["networks", "offers", "affiliates", "links", "conversions"] {
        for bad in ["999999", "0", "-1", "abc", "1.0", "99999999999999999999"] {
            not_found.push(("GET", format!("/api/v1/{coll}/{bad}"), None));
        }
    }
    not_found.extend([
        (
            "PATCH",
            "/api/v1/links/999999".into(),
            Some(r#"{"status":"paused"}"#.into()),
        ),
        (
            "PATCH",
            "/api/v1/offers/999999".into(),
            Some(r#"{"status":"paused"}"#.into()),
        ),
        (
            "PATCH",
            "/api/v1/links/abc".into(),
            Some(r#"{"status":"paused"}"#.into()),
        ),
        ("GET", "/api/v1/nope".into(), None),
        ("GET", "/api/v1/nope/1".into(), None),
        ("POST", "/api/v1/nope".into(), Some("{}".into())),
        ("GET", format!("/api/v1/links/{}/extra", id(&link)), None),
        ("GET", "/api/v1".into(), None),
        ("GET", "/api/v1/".into(), None),
        ("GET", "/api/v2/networks".into(), None),
        ("GET", "/nope".into(), None),
    ]);
    for (method, path, body) in &not_found {
        let (status, v) = admin.call(method, path, body.as_deref());
        refusal(status, &v, 404, None).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }

    // --- 405: known paths, methods they do not take.
    for (method, path) in [
        ("DELETE", "/api/v1/networks".to_string()),
        ("PUT", "/api/v1/networks".into()),
        ("PATCH", "/api/v1/networks".into()),
        ("PATCH", format!("/api/v1/networks/{}", id(&net))),
        ("DELETE", format!("/api/v1/offers/{}", id(&offer))),
        ("POST", format!("/api/v1/offers/{}", id(&offer))),
        ("PATCH", format!("/api/v1/affiliates/{}", id(&aff))),
        ("PUT", format!("/api/v1/links/{}", id(&link))),
        ("DELETE", format!("/api/v1/links/{}", id(&link))),
        ("POST", "/api/v1/conversions".into()),
        ("PATCH", "/api/v1/conversions/1".into()),
    ] {
        let (status, v) = admin.call(method, &path, Some("{}"));
        refusal(status, &v, 405, None).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }

    // --- 409: unique values, named.
    let (status, v) = admin.send(
        "POST",
        "/api/v1/networks",
        &json!({"name": "Copy", "postback_token": "net-token-0001"}),
    );
    refusal(status, &v, 409, Some("postback_token"))
        .unwrap_or_else(|e| panic!("duplicate token: {e}"));
    let (status, v) = admin.send(
        "POST",
        "/api/v1/links",
        &json!({"offer_id": id(&offer), "affiliate_id": id(&aff),
                "destination": "https://m.example/", "slug": "given-slug"}),
    );
    refusal(status, &v, 409, Some("slug")).unwrap_or_else(|e| panic!("duplicate slug: {e}"));

    // --- 422: references to rows that do not exist.
    for (path, body, field) in [
        (
            "/api/v1/offers",
            json!({"name": "O", "network_id": 999999, "payout": "1",
                   "currency": "USD", "commission_levels": [0.5]}),
            "network_id",
        ),
        (
            "/api/v1/affiliates",
            json!({"name": "A", "parent_id": 999999}),
            "parent_id",
        ),
        (
            "/api/v1/links",
            json!({"offer_id": 999999, "affiliate_id": id(&aff), "destination": "https://m.example/"}),
            "offer_id",
        ),
        (
            "/api/v1/links",
            json!({"offer_id": id(&offer), "affiliate_id": 999999, "destination": "https://m.example/"}),
            "affiliate_id",
        ),
    ] {
        let (status, v) = admin.send("POST", path, &body);
        refusal(status, &v, 422, Some(field)).unwrap_or_else(|e| panic!("POST {path} {body}: {e}"));
    }

    // --- Still serving after all of it, and nothing was a 5xx.
    let page = admin.ok("/api/v1/networks?limit=1000");
    assert!(
        page["items"].as_array().is_some_and(|i| i.len() >= 2),
        "networks still listed: {page}"
    );
    admin.create(
        "/api/v1/affiliates",
        json!({"name": "After the storm", "parent_id": id(&aff)}),
    );
    admin.assert_no_5xx();
}

#[test]
fn slugs_pages_decimals_and_redis() {
    let stack = Stack::new("admin_redis");
    let mut redis = Redis::start();
    let c = collector(&stack, &redis);
    let admin = Admin::new(&c);
    let mut conn = redis.conn();

    // --- Pagination: 7 networks in pages of 3.
    let tokens: Vec<String> = (0..7).map(|i| format!("page-token-{i:04}")).collect();
    let mut net_ids = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let n = admin.create(
            "/api/v1/networks",
            json!({"name": format!("Net {i}"), "postback_token": t}),
        );
        assert_eq!(
            n["postback_token"],
            json!(t),
            "the token comes back once, on creation"
        );
        net_ids.push(id(&n));
    }
    let walk = |coll: &str, limit: usize| -> Vec<i64> {
        let mut seen = Vec::new();
        let mut after: Option<i64> = None;
        for _ in 0..1000 {
            let path = match after {
                Some(a) => format!("/api/v1/{coll}?limit={limit}&after={a}"),
                None => format!("/api/v1/{coll}?limit={limit}"),
            };
            let page = admin.ok(&path);
            let items = page["items"]
                .as_array()
                .unwrap_or_else(|| panic!("{path}: {page}"));
            assert!(items.len() <= limit, "{path}: more than limit: {page}");
            let ids: Vec<i64> = items.iter().map(id).collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "{path}: ids ascend: {ids:?}"
            );
            seen.extend(&ids);
            match page["next_after"].as_i64() {
                Some(next) => {
                    assert_eq!(ids.len(), limit, "{path}: only a full page has a next page");
                    assert_eq!(Some(&next), ids.last(), "{path}: next_after is the last id");
                    after = Some(next);
                }
                None => {
                    assert!(page["next_after"].is_null(), "{path}: {page}");
                    assert!(ids.len() < limit, "{path}: a full page says where to go on");
                    return seen;
                }
            }
        }
        panic!("paging {coll} did not end");
    };
    let paged = walk("networks", 3);
    assert_eq!(paged, net_ids, "every network exactly once, in id order");
    let all = admin.ok("/api/v1/networks");
    assert_eq!(
        all["items"].as_array().map(Vec::len),
        Some(7),
        "default limit holds 7: {all}"
    );
    assert!(all["next_after"].is_null(), "one page is the last: {all}");
    // A page of exactly `limit` items points on; the next one is empty.
    let seven = admin.ok("/api/v1/networks?limit=7");
    assert_eq!(seven["next_after"], json!(net_ids[6]), "{seven}");
    let empty = admin.ok(&format!("/api/v1/networks?limit=7&after={}", net_ids[6]));
    assert_eq!(empty, json!({"items": [], "next_after": null}));
    for page in paged_items(&admin, "networks") {
        assert!(
            page.get("postback_token").is_none(),
            "no token in a listing: {page}"
        );
    }

    // --- Decimals: strings or numbers in, strings out.
    let net = net_ids[0];
    for (payout, want) in [
        (json!("12.5"), "12.5"),
        (json!(12.5), "12.5"),
        (json!("12.50"), "12.5"),
        (json!("0.000001"), "0.000001"),
        (json!(3), "3"),
        (json!("0"), "0"),
    ] {
        let o = admin.create(
            "/api/v1/offers",
            json!({"name": "D", "network_id": net, "payout": payout, "currency": "USD",
                   "commission_levels": [0.7, "0.1"]}),
        );
        assert_eq!(o["payout"], json!(want), "payout {payout}");
        assert_eq!(
            o["commission_levels"],
            json!(["0.7", "0.1"]),
            "levels of {o}"
        );
        let again = admin.ok(&format!("/api/v1/offers/{}", id(&o)));
        assert_eq!(
            again["payout"],
            json!(want),
            "GET keeps payout {payout} as a string"
        );
        assert_eq!(again["commission_levels"], json!(["0.7", "0.1"]));
    }
    let full = admin.create(
        "/api/v1/offers",
        json!({"name": "Full", "network_id": net, "payout": 1, "currency": "USD",
               "commission_levels": ["0.5", 0.3, "0.2"]}),
    );
    assert_eq!(
        full["commission_levels"],
        json!(["0.5", "0.3", "0.2"]),
        "summing to exactly 1"
    );
    for levels in [json!([0.7, "0.4"]), json!(["0.5", "0.5", "0.000001"])] {
        let (status, v) = admin.send(
            "POST",
            "/api/v1/offers",
            &json!({"name": "Over", "network_id": net, "payout": 1, "currency": "USD",
                    "commission_levels": levels}),
        );
        refusal(status, &v, 422, Some("commission_levels"))
            .unwrap_or_else(|e| panic!("levels {levels} sum over 1: {e}"));
    }

    // --- Slugs: generated when absent, validated when given.
    let offer = admin.create(
        "/api/v1/offers",
        json!({"name": "Linked", "network_id": net, "payout": "5", "currency": "EUR",
               "commission_levels": ["0.8"], "fallback_url": "https://fallback.example/"}),
    );
    let aff = admin.create("/api/v1/affiliates", json!({"name": "Root"}));
    let child = admin.create(
        "/api/v1/affiliates",
        json!({"name": "Child", "parent_id": id(&aff), "postback_url": "https://aff.example/pb"}),
    );
    assert_eq!(
        child["path"],
        json!(format!("{}.{}", id(&aff), id(&child))),
        "{child}"
    );
    assert_eq!(child["parent_id"], json!(id(&aff)));
    let new_link = |body: Value| {
        let mut b = json!({"offer_id": id(&offer), "affiliate_id": id(&child),
                           "destination": "https://m.example/?c={click_id}&s={sub1}"});
        for (k, v) in body.as_object().expect("an object") {
            b[k] = v.clone();
        }
        admin.create("/api/v1/links", b)
    };
    let mut slugs = HashSet::new();
    let mut link_ids = Vec::new();
    for _ in 0..50 {
        let l = new_link(json!({}));
        let slug = l["slug"]
            .as_str()
            .unwrap_or_else(|| panic!("no slug in {l}"))
            .to_string();
        assert_eq!(slug.len(), 8, "generated slug {slug}");
        assert!(
            slug.chars().all(|ch| SLUG_ALPHABET.contains(ch)),
            "generated slug {slug} uses only {SLUG_ALPHABET}"
        );
        assert_eq!(
            (l["status"].as_str(), l["redirect_code"].as_i64()),
            (Some("active"), Some(302))
        );
        assert_eq!(l["version"], json!(1));
        assert!(slugs.insert(slug.clone()), "slug {slug} generated twice");
        link_ids.push(id(&l));
    }
    let given = new_link(json!({"slug": "My-Slug_1.x", "redirect_code": 301}));
    assert_eq!(
        given["slug"], "My-Slug_1.x",
        "a given slug is kept as given"
    );
    link_ids.push(id(&given));
    for bad in ["bad slug", "bad/slug", "ä", "x?y", ""] {
        let (status, v) = admin.send(
            "POST",
            "/api/v1/links",
            &json!({"offer_id": id(&offer), "affiliate_id": id(&child),
                    "destination": "https://m.example/", "slug": bad}),
        );
        refusal(status, &v, 422, Some("slug")).unwrap_or_else(|e| panic!("slug {bad:?}: {e}"));
    }
    assert_eq!(
        walk("links", 20),
        link_ids,
        "every link exactly once over pages of 20"
    );

    // --- Redis: the link, the token and the offer, as the edges read them.
    let hgetall = |conn: &mut redis::Connection, key: &str| -> HashMap<String, String> {
        redis::cmd("HGETALL")
            .arg(key)
            .query(conn)
            .unwrap_or_default()
    };
    let link_key = "affgate:link:My-Slug_1.x";
    let want_link = |version: &str, destination: &str, status: &str| -> HashMap<String, String> {
        [
            ("link_id", id(&given).to_string()),
            ("destination", destination.to_string()),
            ("status", status.to_string()),
            ("redirect_code", "301".to_string()),
            ("offer_id", id(&offer).to_string()),
            ("affiliate_id", id(&child).to_string()),
            ("network_id", net.to_string()),
            // The offer's fallback, as DESIGN.md's link hash carries it.
            ("fallback_url", "https://fallback.example/".to_string()),
            ("version", version.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let first = want_link("1", "https://m.example/?c={click_id}&s={sub1}", "active");
    wait_for("the new link in redis", DEADLINE, || {
        (hgetall(&mut conn, link_key) == first).then_some(())
    });
    for (i, t) in tokens.iter().enumerate() {
        let key = format!("affgate:token:{}", token_hash(&keys(), t));
        let want = net_ids[i].to_string();
        wait_for(
            &format!("token key of network {}", net_ids[i]),
            DEADLINE,
            || {
                let got: Option<String> = redis::cmd("GET").arg(&key).query(&mut conn).ok()?;
                (got.as_deref() == Some(want.as_str())).then_some(())
            },
        );
    }
    let raw_tokens: Vec<String> = redis::cmd("KEYS")
        .arg("affgate:*")
        .query(&mut conn)
        .expect("KEYS");
    for t in &tokens {
        assert!(
            !raw_tokens.iter().any(|k| k.contains(t.as_str())),
            "Redis holds only hashes of tokens: {raw_tokens:?}"
        );
    }
    let offer_key = format!("affgate:offer:{}", id(&offer));
    wait_for("the offer in redis", DEADLINE, || {
        let h = hgetall(&mut conn, &offer_key);
        (h.get("status").map(String::as_str) == Some("active")
            && h.get("fallback_url").map(String::as_str) == Some("https://fallback.example/"))
        .then_some(())
    });

    // PATCH bumps the version, in the answer and in Redis.
    let link_path = format!("/api/v1/links/{}", id(&given));
    let (status, patched) = admin.send(
        "PATCH",
        &link_path,
        &json!({"destination": "https://m.example/v2?c={click_id}"}),
    );
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["version"], json!(2), "{patched}");
    assert_eq!(patched["slug"], "My-Slug_1.x");
    let second = want_link("2", "https://m.example/v2?c={click_id}", "active");
    wait_for("the patched destination in redis", DEADLINE, || {
        (hgetall(&mut conn, link_key) == second).then_some(())
    });
    let (status, patched) = admin.send("PATCH", &link_path, &json!({"status": "shadow_banned"}));
    assert_eq!(
        (status, patched["version"].as_i64()),
        (200, Some(3)),
        "{patched}"
    );
    let third = want_link("3", "https://m.example/v2?c={click_id}", "shadow_banned");
    wait_for("the shadow ban in redis", DEADLINE, || {
        (hgetall(&mut conn, link_key) == third).then_some(())
    });
    assert_eq!(
        admin.ok(&link_path),
        patched,
        "GET shows what PATCH answered"
    );
    let (status, o) = admin.send(
        "PATCH",
        &format!("/api/v1/offers/{}", id(&offer)),
        &json!({"status": "paused"}),
    );
    assert_eq!((status, o["status"].as_str()), (200, Some("paused")), "{o}");
    wait_for("the paused offer in redis", DEADLINE, || {
        (hgetall(&mut conn, &offer_key)
            .get("status")
            .map(String::as_str)
            == Some("paused"))
        .then_some(())
    });

    // --- Catch-up: Redis flushed, everything is published again.
    wait_for("the marker of a full publication", DEADLINE, || {
        let n: i64 = redis::cmd("EXISTS")
            .arg("affgate:control:synced")
            .query(&mut conn)
            .ok()?;
        (n == 1).then_some(())
    });
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    wait_for("the flushed link back in redis", DEADLINE, || {
        (hgetall(&mut conn, link_key) == third).then_some(())
    });
    let token_key = format!("affgate:token:{}", token_hash(&keys(), &tokens[0]));
    wait_for("the flushed token back in redis", DEADLINE, || {
        let got: Option<String> = redis::cmd("GET").arg(&token_key).query(&mut conn).ok()?;
        (got == Some(net.to_string())).then_some(())
    });

    // --- Redis down: the API still answers, and Redis catches up later.
    redis.kill();
    let during = new_link(json!({"slug": "made-while-down"}));
    let (status, v) = admin.send("PATCH", &link_path, &json!({"status": "paused"}));
    assert_eq!(
        (status, v["version"].as_i64()),
        (200, Some(4)),
        "PATCH with Redis down: {v}"
    );
    redis.restart();
    let mut conn = redis.conn();
    wait_for("the link made while Redis was down", DEADLINE, || {
        let h = hgetall(&mut conn, "affgate:link:made-while-down");
        (h.get("link_id") == Some(&id(&during).to_string())).then_some(())
    });
    let fourth = want_link("4", "https://m.example/v2?c={click_id}", "paused");
    wait_for("the change made while Redis was down", DEADLINE, || {
        (hgetall(&mut conn, link_key) == fourth).then_some(())
    });
    admin.assert_no_5xx();
}

/// Every item of a collection, over pages of 1000.
fn paged_items(admin: &Admin, coll: &str) -> Vec<Value> {
    let page = admin.ok(&format!("/api/v1/{coll}?limit=1000"));
    assert!(page["next_after"].is_null(), "fewer than 1000 {coll}");
    page["items"].as_array().cloned().unwrap_or_default()
}
