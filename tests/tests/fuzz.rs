//! Fuzz-style robustness of the edge's HTTP surface against the real binary.
//!
//! A bounded loop (count and time) sends random request targets after `/c/`
//! and `/postback?`, random header values, random POST bodies and raw
//! garbage on fresh TCP connections. The contract (DESIGN.md): never a 5xx
//! for bad input, and the edge keeps serving. A connection the server closes
//! without an answer is fine; an answer with a 5xx status, a request that is
//! framed but never answered, or a dead process is not.
//!
//! The seed is fixed so a failure reproduces; every assertion prints it, and
//! `EDGE_FUZZ_SEED=<n>` runs another one (not `AFFGATE_*`: the edge child
//! inherits the environment and would read that as a config key).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use affgate_tests::{Client, EdgeOpts, EdgeProc, Resp, click_id_in};

const ITERATIONS: usize = 3000;
/// The loop stops early after this long, so a slow machine still finishes.
const TIME_BUDGET: Duration = Duration::from_secs(60);
const DEFAULT_SEED: u64 = 0x00af_f9a7_e5ee_d001;
const TOKEN: &str = "fuzz-network-token";
const SLUGS: [&str; 3] = ["fz", "fz-301", "fz-paused"];

const LINKS: &str = "\
slug,link_id,destination,status,redirect_code
fz,101,https://m.example/f?cid={click_id}&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&l={link_id},,
fz-301,102,https://m.example/g?cid={click_id}&s1={sub1},,301
fz-paused,103,https://m.example/p?cid={click_id},paused,
";

const PARAM_NAMES: [&str; 22] = [
    "click_id",
    "clickid",
    "subid",
    "cid",
    "transaction_id",
    "txid",
    "tid",
    "order_id",
    "action_id",
    "event",
    "status",
    "payout",
    "amount",
    "sum",
    "revenue",
    "currency",
    "token",
    "security_token",
    "sub1",
    "other",
    "",
    "click_id[]",
];

fn seed() -> u64 {
    std::env::var("EDGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// Bytes for a failure message: escaped, cut to a readable length.
fn show(bytes: &[u8]) -> String {
    let s = bytes.escape_ascii().to_string();
    if s.len() > 600 {
        format!("{}… ({} bytes)", &s[..600], bytes.len())
    } else {
        s
    }
}

/// Random bytes, length drawn from `len`; CR and LF only when `allow_crlf`.
fn random_bytes(rng: &mut fastrand::Rng, len: std::ops::Range<usize>, allow_crlf: bool) -> Vec<u8> {
    let len = rng.usize(len);
    (0..len)
        .map(|_| {
            loop {
                let b = rng.u8(..);
                if allow_crlf || (b != b'\r' && b != b'\n') {
                    break b;
                }
            }
        })
        .collect()
}

/// Text that looks like a URL part and mostly parses as one, so it reaches
/// the edge's own code rather than hyper's request-line check: unreserved
/// and reserved characters, escapes (valid, broken, of any byte, of UTF-8),
/// long runs, and now and then a character a URI may not hold.
fn urlish(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
    const ALPHA: &[u8] = b"abcxyzABCXYZ0189-._~!$&'()*+,;=:@/?%";
    const ODD: &[u8] = b"#[]{}|\\^`\"<> \x7f\x00\xff";
    let len = rng.usize(0..=max);
    // One string in five may hold what a URI may not.
    let odd_ok = rng.u8(0..5) == 0;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match rng.u8(0..40) {
            0..=3 => out.extend_from_slice(format!("%{:02X}", rng.u8(..)).as_bytes()),
            4 => out.extend_from_slice(b"%"),
            5 => out.extend_from_slice(b"%e"),
            6 => out.extend_from_slice(b"%C3%A9%E2%9C%93"),
            7 => out.extend_from_slice(b"%F0%9F"),
            8 => out.extend(std::iter::repeat_n(b'a', rng.usize(0..300))),
            9 if odd_ok => out.push(ODD[rng.usize(0..ODD.len())]),
            10 if odd_ok => out.extend_from_slice("é".as_bytes()),
            _ => out.push(ALPHA[rng.usize(0..ALPHA.len())]),
        }
    }
    out
}

/// A header value: mostly visible ASCII, spaces, tabs and obs-text (what
/// HTTP allows), sometimes any byte but CR and LF.
fn header_value(rng: &mut fastrand::Rng, len: std::ops::Range<usize>) -> Vec<u8> {
    if rng.u8(0..5) == 0 {
        return random_bytes(rng, len, false);
    }
    let len = rng.usize(len);
    (0..len)
        .map(|_| match rng.u8(0..20) {
            0 => b'\t',
            1 => rng.u8(0x80..=0xff),
            _ => rng.u8(0x20..=0x7e),
        })
        .collect()
}

/// A slug-like path segment: mostly slug characters, sometimes not.
fn slugish(rng: &mut fastrand::Rng) -> Vec<u8> {
    const SLUG: &[u8] = b"abcfzAZ09-_.";
    match rng.u8(0..6) {
        0 => SLUGS[rng.usize(0..SLUGS.len())].as_bytes().to_vec(),
        1 => {
            let mut s = SLUGS[rng.usize(0..SLUGS.len())].as_bytes().to_vec();
            s.extend(urlish(rng, 8));
            s
        }
        2 => vec![b'a'; rng.usize(120..140)],
        3 => urlish(rng, 60),
        _ => (0..rng.usize(0..20))
            .map(|_| SLUG[rng.usize(0..SLUG.len())])
            .collect(),
    }
}

/// A value for a postback parameter: often valid, often nearly so.
fn param_value(rng: &mut fastrand::Rng, cid: &str) -> Vec<u8> {
    match rng.u8(0..12) {
        0 | 1 => cid.as_bytes().to_vec(),
        2 => {
            let mut b = cid.as_bytes().to_vec();
            let i = rng.usize(0..b.len());
            b[i] = b"AZaz09-_"[rng.usize(0..8)];
            b
        }
        3 => TOKEN.as_bytes().to_vec(),
        4 => [
            "approved", "pending", "rejected", "reversed", "PENDING", "done",
        ][rng.usize(0..6)]
        .as_bytes()
        .to_vec(),
        5 => [
            "0",
            "12.5",
            "999999999999.999999",
            "1e3",
            "-1",
            "1.",
            ".5",
            "1.1234567",
            "0x10",
        ][rng.usize(0..9)]
        .as_bytes()
        .to_vec(),
        6 => ["USD", "eur", "E1R", "EURO", ""][rng.usize(0..5)]
            .as_bytes()
            .to_vec(),
        7 => vec![b'x'; rng.usize(100..400)],
        _ => urlish(rng, 40),
    }
}

/// `name=value&…` with random names (aliases, duplicates, junk) and values.
fn params(rng: &mut fastrand::Rng, cid: &str) -> Vec<u8> {
    let mut out = Vec::new();
    // A third start from a postback that would be accepted.
    let valid = rng.u8(0..3) == 0;
    if valid {
        out.extend_from_slice(format!("click_id={cid}&token={TOKEN}").as_bytes());
    }
    for i in 0..rng.usize(0..8) {
        if i > 0 || valid {
            out.push(if rng.u8(0..10) == 0 { b';' } else { b'&' });
        }
        out.extend_from_slice(PARAM_NAMES[rng.usize(0..PARAM_NAMES.len())].as_bytes());
        if rng.u8(0..10) != 0 {
            out.push(b'=');
        }
        out.extend(param_value(rng, cid));
    }
    out
}

fn head(method: &str, target: &[u8], headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: edge\r\n");
    for (k, v) in headers {
        req.extend_from_slice(k);
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// One fuzz case: the bytes to send, whether the answer is to a HEAD, and a
/// name for failure messages.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    head: bool,
}

fn case(rng: &mut fastrand::Rng, cid: &str) -> Case {
    let slug = SLUGS[rng.usize(0..SLUGS.len())];
    match rng.u8(0..9) {
        0 => {
            let mut t = b"/c/".to_vec();
            if rng.u8(0..4) == 0 {
                t.extend(random_bytes(rng, 0..80, false));
            } else {
                t.extend(slugish(rng));
            }
            if rng.bool() {
                t.push(b'?');
                t.extend(urlish(rng, 100));
            }
            Case {
                name: "click target",
                bytes: head("GET", &t, &[]),
                head: false,
            }
        }
        1 => {
            let mut t = format!("/c/{slug}?").into_bytes();
            if rng.bool() {
                let mut q = Vec::new();
                for i in 1..=rng.usize(1..7) {
                    q.extend_from_slice(format!("sub{}=", i % 6).as_bytes());
                    q.extend(urlish(rng, 400));
                    q.push(b'&');
                }
                t.extend(q);
            } else {
                t.extend(random_bytes(rng, 0..200, false));
            }
            let method = if rng.u8(0..4) == 0 { "HEAD" } else { "GET" };
            Case {
                name: "click query",
                bytes: head(method, &t, &[]),
                head: method == "HEAD",
            }
        }
        2 => {
            let mut t = b"/postback?".to_vec();
            if rng.u8(0..3) == 0 {
                t.extend(random_bytes(rng, 0..300, false));
            } else {
                t.extend(urlish(rng, 300));
            }
            Case {
                name: "postback raw query",
                bytes: head("GET", &t, &[]),
                head: false,
            }
        }
        3 => {
            let mut t = b"/postback?".to_vec();
            t.extend(params(rng, cid));
            Case {
                name: "postback params",
                bytes: head("GET", &t, &[]),
                head: false,
            }
        }
        4 => {
            let body = match rng.u8(0..4) {
                0 => random_bytes(rng, 0..2000, true),
                1 => random_bytes(rng, 16_000..20_000, true),
                _ => params(rng, cid),
            };
            let ct: Vec<u8> = match rng.u8(0..6) {
                0 => header_value(rng, 0..60),
                1 => b"application/json".to_vec(),
                2 => b"application/x-www-form-urlencoded; charset=utf-8".to_vec(),
                _ => b"application/x-www-form-urlencoded".to_vec(),
            };
            let mut target = b"/postback".to_vec();
            if rng.bool() {
                target.push(b'?');
                target.extend(params(rng, cid));
            }
            let mut headers = vec![(
                b"Content-Length".to_vec(),
                body.len().to_string().into_bytes(),
            )];
            if rng.u8(0..8) != 0 {
                headers.push((b"Content-Type".to_vec(), ct));
            }
            let mut bytes = head("POST", &target, &headers);
            bytes.extend(body);
            Case {
                name: "postback POST",
                bytes,
                head: false,
            }
        }
        5 => {
            const NAMES: [&str; 8] = [
                "User-Agent",
                "Referer",
                "X-Request-Id",
                "X-Forwarded-For",
                "Cookie",
                "Accept",
                "Content-Type",
                "X-Fuzz",
            ];
            let mut headers = Vec::new();
            for _ in 0..rng.usize(1..6) {
                let name = NAMES[rng.usize(0..NAMES.len())].as_bytes().to_vec();
                let len = if rng.u8(0..8) == 0 {
                    1000..12_000
                } else {
                    0..200
                };
                headers.push((name, header_value(rng, len)));
            }
            let target = if rng.bool() {
                format!("/c/{slug}?sub1=h").into_bytes()
            } else {
                format!("/postback?click_id={cid}&token={TOKEN}").into_bytes()
            };
            Case {
                name: "header values",
                bytes: head("GET", &target, &headers),
                head: false,
            }
        }
        6 => {
            let mut bytes = random_bytes(rng, 0..400, true);
            // Blank lines alone are skipped while the server waits for a
            // request line (RFC 9112 2.2): no answer is due to those.
            if bytes.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                bytes.push(b'X');
            }
            bytes.extend_from_slice(b"\r\n\r\n");
            Case {
                name: "raw garbage",
                bytes,
                head: false,
            }
        }
        7 => {
            let target = if rng.bool() {
                format!("/c/{slug}?sub1=a&sub2=b")
            } else {
                format!("/postback?click_id={cid}&txid=m&token={TOKEN}")
            };
            let mut h = head(
                "GET",
                target.as_bytes(),
                &[(b"User-Agent".to_vec(), b"fuzz/1".to_vec())],
            );
            h.truncate(h.len() - 4);
            for _ in 0..rng.usize(1..5) {
                if h.is_empty() {
                    break;
                }
                let i = rng.usize(0..h.len());
                match rng.u8(0..3) {
                    0 => h[i] = rng.u8(..),
                    1 => h.insert(i, rng.u8(..)),
                    _ => {
                        h.remove(i);
                    }
                }
            }
            h.extend_from_slice(b"\r\n\r\n");
            Case {
                name: "mutated request",
                bytes: h,
                head: false,
            }
        }
        _ => {
            const METHODS: [&str; 10] = [
                "GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "HEAD", "FOO", "G-E_T",
            ];
            const PATHS: [&str; 8] = [
                "/c/fz",
                "/postback",
                "/healthz",
                "/readyz",
                "/",
                "*",
                "/metrics",
                "/c/",
            ];
            const VERSIONS: [&str; 5] =
                ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "http/1.1"];
            let method = METHODS[rng.usize(0..METHODS.len())];
            let line = format!(
                "{method} {} {}\r\nHost: edge\r\n\r\n",
                PATHS[rng.usize(0..PATHS.len())],
                VERSIONS[rng.usize(0..VERSIONS.len())]
            );
            Case {
                name: "method, path, version",
                bytes: line.into_bytes(),
                head: method == "HEAD",
            }
        }
    }
}

/// Send one case on a fresh connection. Ok(None): the server closed the
/// connection without an answer, which is fine for input this bad.
fn exchange(addr: SocketAddr, c: &Case, seed: u64, i: usize) -> Option<Resp> {
    let mut client = Client::try_connect(addr).unwrap_or_else(|e| {
        panic!("seed {seed} iteration {i}: cannot connect, is the edge gone? {e}")
    });
    if client.send_raw(&c.bytes).is_err() {
        // The server may close before reading everything we send.
        return None;
    }
    match client.read_response(c.head) {
        Ok(r) => Some(r),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
            "seed {seed} iteration {i} ({}): no answer and no close within the client's read timeout; sent `{}`",
            c.name,
            show(&c.bytes)
        ),
        Err(_) => None,
    }
}

fn opts() -> EdgeOpts {
    EdgeOpts {
        links_csv: LINKS.into(),
        networks_csv: format!("network_id,name,postback_token\n9,Fuzz Net,{TOKEN}\n"),
        size_mb: 16,
        ..EdgeOpts::default()
    }
}

fn valid_click(e: &EdgeProc, seed: u64) -> String {
    let r = e.get("/c/fz?sub1=after");
    assert_eq!(
        r.status, 302,
        "seed {seed}: a valid click is still a 302: {r:?}"
    );
    let loc = r.header("location").unwrap_or_default().to_string();
    click_id_in(&loc).unwrap_or_else(|| panic!("seed {seed}: no click id in `{loc}`"))
}

#[test]
fn random_input_never_gets_a_5xx_and_the_edge_keeps_serving() {
    let seed = seed();
    eprintln!("fuzz seed {seed} (set EDGE_FUZZ_SEED to change it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut e = EdgeProc::start(&opts());
    let cid = valid_click(&e, seed);

    let started = Instant::now();
    let (mut answered, mut closed, mut ran, mut reached_edge) = (0usize, 0usize, 0usize, 0usize);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut by_case = std::collections::BTreeMap::<(&str, u16), usize>::new();
    for i in 0..ITERATIONS {
        if started.elapsed() > TIME_BUDGET {
            break;
        }
        ran += 1;
        let c = case(&mut rng, &cid);
        match exchange(e.http, &c, seed, i) {
            Some(r) => {
                answered += 1;
                *statuses.entry(r.status).or_default() += 1;
                *by_case.entry((c.name, r.status)).or_default() += 1;
                // The edge's own answers carry X-Request-Id; hyper's refusals of
                // malformed HTTP do not.
                if r.header("x-request-id").is_some() {
                    reached_edge += 1;
                }
                assert!(
                    r.status < 500,
                    "seed {seed} iteration {i} ({}): status {} for `{}`: {}",
                    c.name,
                    r.status,
                    show(&c.bytes),
                    r.body_str()
                );
            }
            None => closed += 1,
        }
        if i % 250 == 0 {
            assert!(
                matches!(e.child.try_wait(), Ok(None)),
                "seed {seed} iteration {i}: the edge exited; stderr:\n{}",
                e.stderr()
            );
        }
    }
    eprintln!(
        "fuzz: {ran} cases, {answered} answered ({reached_edge} by the edge's handlers), {closed} closed unanswered; statuses {statuses:?}"
    );
    eprintln!("fuzz: by case {by_case:?}");
    assert!(
        ran >= 100,
        "seed {seed}: only {ran} cases ran within {TIME_BUDGET:?}"
    );
    assert!(
        answered * 2 > ran,
        "seed {seed}: most fuzz requests should get an answer ({answered} of {ran})"
    );
    assert!(
        reached_edge * 2 > answered,
        "seed {seed}: most answers should come from the edge's handlers, not hyper's parser ({reached_edge} of {answered})"
    );
    for code in [200, 301, 302, 400, 403, 404, 405, 413, 415] {
        assert!(
            statuses.contains_key(&code),
            "seed {seed}: the loop should reach {code} at least once: {statuses:?}"
        );
    }

    // Still serving, and the process is alive.
    let fresh = valid_click(&e, seed);
    let r = e.get(&format!(
        "/postback?click_id={fresh}&txid=after-fuzz&token={TOKEN}"
    ));
    assert_eq!(
        r.status, 200,
        "seed {seed}: a valid postback after the loop: {r:?}"
    );
    let r = e.get("/readyz");
    assert_eq!(
        r.status, 200,
        "seed {seed}: still ready after the loop: {r:?}"
    );
    assert!(
        matches!(e.child.try_wait(), Ok(None)),
        "seed {seed}: the edge exited; stderr:\n{}",
        e.stderr()
    );
    // The edge's own count agrees: no 5xx on any route, even for answers we did not read.
    let metrics = e.metrics_text();
    let fives: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("affgate_edge_http_requests_total{") && l.contains("status=\"5xx\"")
        })
        .collect();
    assert_eq!(fives.len(), 4, "one 5xx series per route:\n{metrics}");
    for l in fives {
        assert!(l.ends_with(" 0"), "seed {seed}: `{l}`");
    }
    let stderr = e.stderr();
    assert!(
        !stderr.contains("panicked"),
        "seed {seed}: a request handler panicked:\n{stderr}"
    );
}
