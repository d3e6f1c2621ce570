//! The edge's Redis link source against a real, private `redis-server`:
//! the full load at start, pub/sub changes, the bounded miss lookup,
//! offers and tokens, and what the edge serves while Redis is paused,
//! asleep, killed, restarted empty, or not there at all (DESIGN.md
//! "Redis layout", docs/links.md "Redis").
//!
//! Every wait polls a condition with a deadline. Tests that need a miss
//! lookup to *succeed* raise `miss_timeout_ms` to 200 so a loaded machine
//! does not turn a 404 into a fallback; tests that need it to *fail* keep
//! the default of 3 ms and stall Redis for seconds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use affgate_schema::click_id::ClickId;
use affgate_schema::keys::KeyRing;
use affgate_tests::{
    EdgeOpts, EdgeProc, Redis, Resp, enc, keys, redis_put_link, signal, token_hash, wait_for,
};

const FALLBACK: &str = "https://fallback.example/";
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// An edge reading links from `redis`; `miss_timeout_ms` None keeps the default (3 ms).
fn edge(redis: &Redis, miss_timeout_ms: Option<u64>) -> EdgeProc {
    let mut env = Vec::new();
    if let Some(ms) = miss_timeout_ms {
        env.push(("AFFGATE_LINKS_MISS_TIMEOUT_MS".to_string(), ms.to_string()));
    }
    EdgeProc::start(&EdgeOpts {
        redis_url: Some(redis.url()),
        fallback_url: Some(FALLBACK.into()),
        env,
        ..EdgeOpts::default()
    })
}

fn wait_ready(e: &EdgeProc) {
    wait_for("/readyz to answer 200", DEADLINE, || {
        (e.get("/readyz").status == 200).then_some(())
    });
}

fn location(r: &Resp) -> String {
    r.header("location").unwrap_or_default().to_string()
}

/// GET `/c/{slug}` until `ok` holds for the response; returns that response.
fn click_until(e: &EdgeProc, slug: &str, what: &str, ok: impl Fn(&Resp) -> bool) -> Resp {
    wait_for(what, DEADLINE, || {
        let r = e.get(&format!("/c/{slug}"));
        ok(&r).then_some(r)
    })
}

fn redirects_to(r: &Resp, prefix: &str) -> bool {
    r.status == 302 && location(r).starts_with(prefix)
}

fn publish(c: &mut redis::Connection, msg: &str) {
    redis::cmd("PUBLISH")
        .arg("affgate:changes")
        .arg(msg)
        .query::<i64>(c)
        .expect("PUBLISH");
}

/// One sample of a metric (name with labels, exactly as exposed).
fn metric(e: &EdgeProc, name: &str) -> Option<f64> {
    let text = e.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_metric(e: &EdgeProc, name: &str, want: f64) {
    wait_for(&format!("{name} to be {want}"), DEADLINE, || {
        (metric(e, name) == Some(want)).then_some(())
    });
}

fn link(id: &str, dest: &str) -> Vec<(&'static str, String)> {
    vec![
        ("link_id", id.to_string()),
        ("destination", dest.to_string()),
    ]
}

fn put(c: &mut redis::Connection, slug: &str, fields: &[(&'static str, String)], publish: bool) {
    let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    redis_put_link(c, slug, &f, publish);
}

fn verify(cid: &str) -> affgate_schema::click_id::ClickIdFields {
    let ring = KeyRing::new(keys());
    match ClickId::verify(cid, &ring, affgate_edge::http::now_ms()) {
        Ok((_, f)) => f,
        Err(e) => panic!("click id `{cid}` does not verify: {e}"),
    }
}

// ---------------------------------------------------------------- Redis up

#[test]
fn links_loaded_at_start_are_served_with_macros_expanded() {
    let redis = Redis::start();
    let mut c = redis.conn();
    put(
        &mut c,
        "alpha",
        &[
            ("link_id", "11".into()),
            (
                "destination",
                "https://m.example/a?cid={click_id}&l={link_id}&o={offer_id}&s={sub1}".into(),
            ),
            ("offer_id", "3".into()),
            ("affiliate_id", "4".into()),
        ],
        false,
    );
    put(
        &mut c,
        "beta",
        &[
            ("link_id", "12".into()),
            ("destination", "https://m.example/b".into()),
            ("redirect_code", "307".into()),
        ],
        false,
    );
    let e = edge(&redis, Some(200));
    wait_ready(&e);
    assert_eq!(
        metric(&e, "affgate_edge_links_loaded"),
        Some(2.0),
        "both links are in the cache after the full load"
    );

    let r = e.get(&format!("/c/alpha?sub1={}", enc("x y")));
    assert_eq!(r.status, 302, "a link loaded at start redirects");
    let loc = location(&r);
    assert!(
        loc.starts_with("https://m.example/a?cid="),
        "destination of alpha, got `{loc}`"
    );
    assert!(
        loc.ends_with("&l=11&o=3&s=x%20y"),
        "link_id, offer_id and sub1 expanded, got `{loc}`"
    );
    let cid = affgate_tests::click_id_in(&loc).expect("click id in Location");
    assert_eq!(verify(&cid).link_id, 11, "the click id carries the link id");

    let r = e.get("/c/beta");
    assert_eq!(
        (r.status, location(&r).as_str()),
        (307, "https://m.example/b"),
        "per-link redirect code"
    );

    let r = e.get("/c/nope");
    assert_eq!(
        r.status,
        404,
        "unknown slug with Redis up is 404, got Location `{}`",
        location(&r)
    );
    assert_eq!(
        metric(&e, "affgate_edge_link_misses_total{outcome=\"not_found\"}"),
        Some(1.0),
        "the miss was looked up once"
    );
}

#[test]
fn published_changes_add_change_and_delete_links() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let e = edge(&redis, Some(200));
    wait_ready(&e);

    // Added: wait until the pub/sub message put it in the cache, so the click
    // below is served from the cache and not by the miss lookup.
    put(
        &mut c,
        "fresh",
        &link("21", "https://m.example/v1?cid={click_id}"),
        true,
    );
    wait_metric(&e, "affgate_edge_links_loaded", 1.0);
    let r = e.get("/c/fresh");
    assert!(
        redirects_to(&r, "https://m.example/v1?cid="),
        "published link is served: {} `{}`",
        r.status,
        location(&r)
    );
    assert_eq!(
        metric(&e, "affgate_edge_link_misses_total{outcome=\"found\"}"),
        Some(0.0),
        "the published link came from pub/sub, not from a miss lookup"
    );

    // Changed: the cached link is only replaced by the message.
    put(
        &mut c,
        "fresh",
        &[
            ("destination", "https://m.example/v2?cid={click_id}".into()),
            ("version", "5".into()),
        ],
        true,
    );
    click_until(&e, "fresh", "the changed destination", |r| {
        redirects_to(r, "https://m.example/v2?cid=")
    });

    // An older version never replaces a newer one. Messages are applied in
    // order, so once the marker link is in, the stale change was seen.
    put(
        &mut c,
        "fresh",
        &[
            ("destination", "https://m.example/stale".into()),
            ("version", "4".into()),
        ],
        true,
    );
    put(
        &mut c,
        "marker",
        &link("22", "https://m.example/marker"),
        true,
    );
    wait_metric(&e, "affgate_edge_links_loaded", 2.0);
    let r = e.get("/c/fresh");
    assert!(
        redirects_to(&r, "https://m.example/v2?cid="),
        "version 4 must not replace version 5: `{}`",
        location(&r)
    );

    // Deleted.
    redis::cmd("DEL")
        .arg("affgate:link:fresh")
        .query::<i64>(&mut c)
        .expect("DEL");
    publish(&mut c, "link:fresh");
    click_until(&e, "fresh", "a deleted link to be 404", |r| r.status == 404);
    assert_eq!(
        metric(&e, "affgate_edge_links_loaded"),
        Some(1.0),
        "only the marker is left"
    );
    assert!(
        redirects_to(&e.get("/c/marker"), "https://m.example/marker"),
        "other links are untouched"
    );
}

#[test]
fn unpublished_link_is_found_by_one_miss_lookup() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let e = edge(&redis, Some(200));
    wait_ready(&e);

    put(
        &mut c,
        "quiet",
        &link("31", "https://m.example/quiet?cid={click_id}"),
        false,
    );
    let r = e.get("/c/quiet");
    assert!(
        redirects_to(&r, "https://m.example/quiet?cid="),
        "the miss lookup finds an unpublished link: {} `{}`",
        r.status,
        location(&r)
    );
    assert_eq!(
        metric(&e, "affgate_edge_link_misses_total{outcome=\"found\"}"),
        Some(1.0),
        "one lookup"
    );
    let r = e.get("/c/quiet");
    assert_eq!(r.status, 302, "second click");
    assert_eq!(
        metric(&e, "affgate_edge_link_misses_total{outcome=\"found\"}"),
        Some(1.0),
        "the found link was cached: the second click does not look it up again"
    );

    let r = e.get("/c/never-written");
    assert_eq!(r.status, 404, "unknown slug: {}", location(&r));
    let r = e.get("/c/never-written");
    assert_eq!(r.status, 404, "still unknown");
    assert_eq!(
        metric(&e, "affgate_edge_link_misses_total{outcome=\"not_found\"}"),
        Some(2.0),
        "a not-found slug is not cached: each click asks Redis again"
    );
}

#[test]
fn capped_offer_sends_clicks_to_its_fallback_until_active_again() {
    let redis = Redis::start();
    let mut c = redis.conn();
    put(
        &mut c,
        "offered",
        &[
            ("link_id", "41".into()),
            (
                "destination",
                "https://m.example/offer?cid={click_id}".into(),
            ),
            ("offer_id", "7".into()),
        ],
        false,
    );
    let e = edge(&redis, Some(200));
    wait_ready(&e);
    assert!(
        redirects_to(&e.get("/c/offered"), "https://m.example/offer?cid="),
        "unknown offer is open"
    );

    let set_offer = |c: &mut redis::Connection, status: &str| {
        redis::cmd("HSET")
            .arg("affgate:offer:7")
            .arg("status")
            .arg(status)
            .arg("fallback_url")
            .arg("https://capped.example/seven")
            .query::<i64>(c)
            .expect("HSET offer");
        publish(c, "offer:7");
    };
    set_offer(&mut c, "capped");
    let r = click_until(&e, "offered", "the capped offer's fallback", |r| {
        r.status == 302 && location(r) == "https://capped.example/seven"
    });
    assert!(
        affgate_tests::click_id_in(&location(&r)).is_none(),
        "the fallback is not the destination template"
    );

    set_offer(&mut c, "paused");
    // Messages are applied in order: once the marker link is in, so is the paused state.
    put(
        &mut c,
        "offer-marker",
        &link("42", "https://m.example/marker"),
        true,
    );
    wait_metric(&e, "affgate_edge_links_loaded", 2.0);
    assert_eq!(
        location(&e.get("/c/offered")),
        "https://capped.example/seven",
        "paused offer also goes to its fallback"
    );

    set_offer(&mut c, "active");
    click_until(
        &e,
        "offered",
        "the destination once the offer is active again",
        |r| redirects_to(r, "https://m.example/offer?cid="),
    );
    assert!(
        metric(&e, "affgate_edge_fallback_redirects_total").unwrap_or(0.0) >= 2.0,
        "fallback redirects are counted"
    );
}

#[test]
fn published_token_admits_postbacks_and_they_reach_the_ring() {
    let redis = Redis::start();
    let mut c = redis.conn();
    put(
        &mut c,
        "tok",
        &link("51", "https://m.example/t?cid={click_id}"),
        false,
    );
    let e = edge(&redis, Some(200));
    wait_ready(&e);
    let loc = location(&e.get("/c/tok"));
    let cid = affgate_tests::click_id_in(&loc).unwrap_or_else(|| panic!("no click id in `{loc}`"));
    let token = "net-42-postback-token";
    let postback = |txid: &str| {
        e.get(&format!(
            "/postback?click_id={cid}&txid={txid}&token={}",
            enc(token)
        ))
    };

    assert_eq!(postback("T0").status, 403, "token not in Redis yet");

    let hash = token_hash(&keys(), token);
    redis::cmd("SET")
        .arg(format!("affgate:token:{hash}"))
        .arg("42")
        .query::<String>(&mut c)
        .expect("SET token");
    publish(&mut c, &format!("token:{hash}"));
    wait_metric(&e, "affgate_edge_tokens_loaded", 1.0);

    let r = postback("T1");
    assert_eq!(
        r.status,
        200,
        "published token is accepted: {}",
        r.body_str()
    );
    assert_eq!(r.body_str().trim(), "OK");
    let r = e.get(&format!(
        "/postback?click_id={cid}&txid=T2&token={}",
        enc("some-other-token")
    ));
    assert_eq!(r.status, 403, "unknown token: {}", r.body_str());

    let ins = e.inspect(true);
    let pbs: Vec<_> = ins
        .records
        .iter()
        .filter(|r| r.kind == "postback")
        .collect();
    assert_eq!(
        pbs.len(),
        1,
        "exactly the accepted postback is in the ring:\n{}",
        ins.text
    );
    assert_eq!(
        (pbs[0].click_id.as_str(), pbs[0].txid.as_str()),
        (cid.as_str(), "T1"),
        "the ring holds its click id and txid"
    );
    assert!(
        ins.click_ids().contains(&cid),
        "the click itself is in the ring too"
    );

    // Revoked.
    redis::cmd("DEL")
        .arg(format!("affgate:token:{hash}"))
        .query::<i64>(&mut c)
        .expect("DEL token");
    publish(&mut c, &format!("token:{hash}"));
    wait_metric(&e, "affgate_edge_tokens_loaded", 0.0);
    assert_eq!(postback("T3").status, 403, "a deleted token is refused");
}

// ---------------------------------------------------------------- Redis slow

/// Send one inline command on a raw socket and wait at most `wait` for any reply byte.
fn answers_within(port: u16, cmd: &str, wait: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(wait)).ok();
    if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1))
}

/// Clicks while Redis is stalled: the cached link and an unknown slug.
/// Returns when each answer arrived, so the caller can keep only answers
/// given while the stall lasted.
fn clicks_during_stall(e: &EdgeProc) -> Vec<(Resp, Instant)> {
    [
        "/c/cached",
        "/c/not-cached-1",
        "/c/cached",
        "/c/not-cached-2",
    ]
    .iter()
    .map(|t| {
        let r = e.get(t);
        (r, Instant::now())
    })
    .collect()
}

fn check_stall_answers(answers: &[(Resp, Instant)], stall_end: Instant) -> bool {
    if answers.iter().any(|(_, at)| *at >= stall_end) {
        return false; // inconclusive: the stall ended first
    }
    for (i, (r, _)) in answers.iter().enumerate() {
        if i % 2 == 0 {
            assert!(
                redirects_to(r, "https://m.example/cached?cid="),
                "a cached link still redirects to its destination while Redis is stalled: {} `{}`",
                r.status,
                location(r)
            );
        } else {
            assert_eq!(
                (r.status, location(r).as_str()),
                (302, FALLBACK),
                "an unknown slug goes to the fallback while Redis is stalled"
            );
        }
    }
    true
}

fn edge_with_cached_link(redis: &Redis) -> EdgeProc {
    let mut c = redis.conn();
    put(
        &mut c,
        "cached",
        &link("61", "https://m.example/cached?cid={click_id}"),
        false,
    );
    let e = edge(redis, None); // default miss_timeout_ms = 3
    wait_ready(&e);
    assert!(
        redirects_to(&e.get("/c/cached"), "https://m.example/cached?cid="),
        "cached link served before the stall"
    );
    e
}

#[test]
fn client_pause_serves_cache_and_fallback_without_blocking() {
    let redis = Redis::start();
    let e = edge_with_cached_link(&redis);
    let mut conclusive = false;
    for _attempt in 0..3 {
        // Both connections exist before the pause: connecting may send commands.
        let mut ctl = redis.conn();
        let mut watcher = redis.conn();
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(3000)
            .arg("ALL")
            .query::<String>(&mut ctl)
            .expect("CLIENT PAUSE");
        // A PING sent now is held until the pause ends: its answer marks the end.
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let _: String = redis::cmd("PING")
                .query(&mut watcher)
                .expect("PING after the pause");
            let _ = tx.send(Instant::now());
        });
        let answers = clicks_during_stall(&e);
        let end = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the pause ends");
        t.join().expect("watcher thread");
        if check_stall_answers(&answers, end) {
            conclusive = true;
            break;
        }
    }
    assert!(
        conclusive,
        "no attempt got its answers while the 3 s pause lasted: the edge waits on a paused Redis"
    );
    assert!(
        metric(
            &e,
            "affgate_edge_link_misses_total{outcome=\"unreachable\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "the stalled lookups are counted as unreachable"
    );
    // After the pause, Redis answers misses again.
    click_until(
        &e,
        "not-cached-1",
        "404 for an unknown slug once the pause is over",
        |r| r.status == 404,
    );
    assert!(
        redirects_to(&e.get("/c/cached"), "https://m.example/cached?cid="),
        "cached link after the pause"
    );
}

#[test]
fn debug_sleep_serves_cache_and_fallback_without_blocking() {
    let redis = Redis::start();
    let e = edge_with_cached_link(&redis);
    let mut conclusive = false;
    for _attempt in 0..3 {
        let Some((answers, end)) = redis_asleep(&redis, || clicks_during_stall(&e)) else {
            continue;
        };
        if check_stall_answers(&answers, end) {
            conclusive = true;
            break;
        }
    }
    assert!(
        conclusive,
        "no attempt got its answers while Redis slept: the edge waits on a sleeping Redis"
    );
    click_until(
        &e,
        "not-cached-1",
        "404 for an unknown slug once Redis is awake",
        |r| r.status == 404,
    );
}

/// Stall Redis with `DEBUG SLEEP 2` from a background connection and run
/// `during` once a probe PING on a fresh connection goes unanswered (the
/// server is asleep). Returns what `during` returned and when the sleep
/// ended; None when the sleep ended before a probe caught it.
fn redis_asleep<R>(redis: &Redis, during: impl FnOnce() -> R) -> Option<(R, Instant)> {
    let port = redis.port;
    let mut sleeper = redis.conn();
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let r: redis::RedisResult<String> =
            redis::cmd("DEBUG").arg("SLEEP").arg(2).query(&mut sleeper);
        r.expect("DEBUG SLEEP (the harness starts redis with --enable-debug-command yes)");
        let _ = tx.send(Instant::now());
    });
    let caught = wait_for("DEBUG SLEEP to start or finish", DEADLINE, || {
        if rx.try_recv().is_ok() {
            return Some(false); // finished before a probe saw it asleep
        }
        (!answers_within(port, "PING", Duration::from_millis(300))).then_some(true)
    });
    let out = caught.then(|| {
        let r = during();
        let end = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("DEBUG SLEEP returns");
        (r, end)
    });
    t.join().expect("sleeper thread");
    out
}

#[test]
fn a_stall_shorter_than_the_command_timeout_keeps_the_session() {
    let redis = Redis::start();
    let mut c = redis.conn();
    put(
        &mut c,
        "kept",
        &link("91", "https://m.example/kept-v1?cid={click_id}"),
        false,
    );
    let e = edge(&redis, None);
    wait_ready(&e);
    wait_metric(&e, "affgate_edge_redis_up", 1.0);
    assert_eq!(
        metric(&e, "affgate_edge_links_reloads_total"),
        Some(1.0),
        "the start load"
    );
    // Changed without PUBLISH: only the SIGHUP re-read picks it up.
    put(
        &mut c,
        "kept",
        &[(
            "destination",
            "https://m.example/kept-v2?cid={click_id}".into(),
        )],
        false,
    );

    // The re-read starts while Redis sleeps for 2 s, well inside the
    // session's 5 s command timeout: it must wait, not drop the session.
    let caught = (0..3).any(|_| redis_asleep(&redis, || signal(e.pid(), "HUP")).is_some());
    assert!(caught, "never caught Redis asleep in three DEBUG SLEEPs");
    wait_metric(&e, "affgate_edge_links_reloads_total", 2.0);
    assert_eq!(
        metric(&e, "affgate_edge_redis_errors_total"),
        Some(0.0),
        "a 2 s stall ended the Redis session; stderr:\n{}",
        e.stderr()
    );
    assert_eq!(
        metric(&e, "affgate_edge_links_reload_failures_total"),
        Some(0.0),
        "the re-read did not fail"
    );
    assert!(
        redirects_to(&e.get("/c/kept"), "https://m.example/kept-v2?cid="),
        "the re-read applied the change"
    );
}

// ---------------------------------------------------------------- Redis gone

#[test]
fn killed_redis_serves_cache_then_restart_rereads_everything() {
    let mut redis = Redis::start();
    let mut c = redis.conn();
    put(
        &mut c,
        "old",
        &link("71", "https://m.example/old?cid={click_id}"),
        false,
    );
    put(
        &mut c,
        "both",
        &link("72", "https://m.example/both-v1?cid={click_id}"),
        false,
    );
    drop(c);
    let e = edge(&redis, Some(200));
    wait_ready(&e);
    wait_metric(&e, "affgate_edge_redis_up", 1.0);

    redis.kill();
    for _ in 0..3 {
        assert!(
            redirects_to(&e.get("/c/old"), "https://m.example/old?cid="),
            "cached link with Redis killed"
        );
        let r = e.get("/c/unknown-while-down");
        assert_eq!(
            (r.status, location(&r).as_str()),
            (302, FALLBACK),
            "unknown slug with Redis killed goes to the fallback"
        );
    }
    wait_metric(&e, "affgate_edge_redis_up", 0.0);
    let r = e.get("/c/unknown-while-down");
    assert_eq!(
        (r.status, location(&r).as_str()),
        (302, FALLBACK),
        "unknown slug once the edge knows Redis is down"
    );
    assert_eq!(
        e.get("/readyz").status,
        200,
        "links were loaded: still ready while Redis is down"
    );
    assert!(
        redirects_to(&e.get("/c/both"), "https://m.example/both-v1?cid="),
        "cached link once the edge knows Redis is down"
    );

    // Back, empty; new contents written without PUBLISH: only the re-read
    // after the reconnect can drop `old` and change `both`.
    redis.restart();
    let mut c = redis.conn();
    put(
        &mut c,
        "new",
        &link("73", "https://m.example/new?cid={click_id}"),
        false,
    );
    put(
        &mut c,
        "both",
        &link("72", "https://m.example/both-v2?cid={click_id}"),
        false,
    );
    click_until(
        &e,
        "old",
        "a link gone from the restarted Redis to be 404 after the re-read",
        |r| r.status == 404,
    );
    assert!(
        redirects_to(&e.get("/c/both"), "https://m.example/both-v2?cid="),
        "the re-read replaced a cached link"
    );
    assert!(
        redirects_to(&e.get("/c/new"), "https://m.example/new?cid="),
        "a link written after the restart is served"
    );
    wait_metric(&e, "affgate_edge_redis_up", 1.0);
    assert_eq!(e.get("/readyz").status, 200, "ready after the reconnect");

    // And the new subscription works.
    put(
        &mut c,
        "later",
        &link("74", "https://m.example/later"),
        true,
    );
    put(
        &mut c,
        "both",
        &[(
            "destination",
            "https://m.example/both-v3?cid={click_id}".into(),
        )],
        true,
    );
    click_until(&e, "both", "a change published after the reconnect", |r| {
        redirects_to(r, "https://m.example/both-v3?cid=")
    });
}

#[test]
fn edge_starts_with_redis_down_and_catches_up() {
    let mut redis = Redis::unstarted();
    let e = edge(&redis, Some(200));
    let r = e.get("/readyz");
    assert_eq!(
        r.status,
        503,
        "no links loaded yet: not ready ({})",
        r.body_str()
    );
    assert!(
        r.body_str().contains("links"),
        "the reason names the links: `{}`",
        r.body_str()
    );
    assert_eq!(e.get("/healthz").status, 200, "alive all the same");
    for slug in ["anything", "later"] {
        let r = e.get(&format!("/c/{slug}"));
        assert_eq!(
            (r.status, location(&r).as_str()),
            (302, FALLBACK),
            "with Redis never reached, {slug} goes to the fallback"
        );
    }
    assert_eq!(
        metric(&e, "affgate_edge_redis_up"),
        Some(0.0),
        "redis_up is 0"
    );

    redis.restart();
    let mut c = redis.conn();
    put(
        &mut c,
        "later",
        &link("81", "https://m.example/later?cid={click_id}"),
        false,
    );
    wait_ready(&e);
    assert!(
        redirects_to(&e.get("/c/later"), "https://m.example/later?cid="),
        "links are served once Redis is up"
    );
    let r = e.get("/c/anything");
    assert_eq!(
        r.status,
        404,
        "unknown slug with Redis up: {}",
        location(&r)
    );
}
