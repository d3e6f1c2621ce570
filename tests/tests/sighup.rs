//! SIGHUP reloads the links file and the networks file (docs/links.md
//! "Links file"): a good file replaces the cache as a whole, a broken one
//! is refused as a whole with its file and line on stderr, counted in
//! `affgate_edge_links_reload_failures_total`, and the old links keep serving.

use std::time::Duration;

use affgate_tests::{EdgeOpts, EdgeProc, Resp, click_id_in, enc, signal, wait_for};

const DEADLINE: Duration = Duration::from_secs(10);
const HEADER: &str = "slug,link_id,destination,status,redirect_code\n";

fn location(r: &Resp) -> String {
    r.header("location").unwrap_or_default().to_string()
}

fn metric(e: &EdgeProc, name: &str) -> Option<f64> {
    e.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_metric(e: &EdgeProc, name: &str, want: f64) {
    wait_for(&format!("{name} to be {want}"), DEADLINE, || {
        (metric(e, name) == Some(want)).then_some(())
    });
}

fn write_links(e: &EdgeProc, body: &str) {
    std::fs::write(e.dir.join("links.csv"), format!("{HEADER}{body}")).expect("write links.csv");
}

/// (status, Location) of a click.
fn click(e: &EdgeProc, slug: &str) -> (u16, String) {
    let r = e.get(&format!("/c/{slug}"));
    (r.status, location(&r))
}

fn serves(e: &EdgeProc, slug: &str, code: u16, prefix: &str) -> bool {
    let (s, l) = click(e, slug);
    s == code && l.starts_with(prefix)
}

#[test]
fn sighup_applies_a_good_file_and_refuses_a_broken_one() {
    let e = EdgeProc::start(&EdgeOpts {
        links_csv: format!("{HEADER}a,1,https://m.example/a-v1?cid={{click_id}},active,302\n"),
        ..EdgeOpts::default()
    });
    assert!(
        serves(&e, "a", 302, "https://m.example/a-v1?cid="),
        "link from the start file"
    );
    assert_eq!(click(&e, "b").0, 404, "b is not in the file yet");
    assert_eq!(
        metric(&e, "affgate_edge_links_reloads_total"),
        Some(1.0),
        "the start load counts"
    );
    assert_eq!(
        metric(&e, "affgate_edge_links_reload_failures_total"),
        Some(0.0)
    );

    // A link added to the file is served after SIGHUP.
    write_links(
        &e,
        "a,1,https://m.example/a-v1?cid={click_id},active,302\n\
         b,2,https://m.example/b?cid={click_id},active,302\n",
    );
    signal(e.pid(), "HUP");
    wait_for("b to be served after SIGHUP", DEADLINE, || {
        serves(&e, "b", 302, "https://m.example/b?cid=").then_some(())
    });
    assert_eq!(
        metric(&e, "affgate_edge_links_reloads_total"),
        Some(2.0),
        "one more full load"
    );

    // Broken on line 3 (303 is no redirect code). Line 2 changes a, line 4
    // adds d, and b is dropped: none of it may take effect.
    write_links(
        &e,
        "a,1,https://m.example/a-v2?cid={click_id},active,302\n\
         c,3,https://m.example/c?cid={click_id},active,303\n\
         d,4,https://m.example/d?cid={click_id},active,302\n",
    );
    signal(e.pid(), "HUP");
    wait_metric(&e, "affgate_edge_links_reload_failures_total", 1.0);
    let err = wait_for("the refusal on stderr", DEADLINE, || {
        let s = e.stderr();
        s.lines().find(|l| l.contains("line 3")).map(str::to_string)
    });
    assert!(
        err.contains("links.csv line 3"),
        "the error names the file and line: `{err}`"
    );
    assert!(err.contains("303"), "the error says what is wrong: `{err}`");
    assert!(
        serves(&e, "a", 302, "https://m.example/a-v1?cid="),
        "a keeps its old destination: {:?}",
        click(&e, "a")
    );
    assert!(
        serves(&e, "b", 302, "https://m.example/b?cid="),
        "b keeps serving although the broken file dropped it"
    );
    assert_eq!(click(&e, "c").0, 404, "the broken line is not served");
    assert_eq!(
        click(&e, "d").0,
        404,
        "a valid line of a refused file is not served either"
    );
    assert_eq!(
        metric(&e, "affgate_edge_links_reloads_total"),
        Some(2.0),
        "a refused file is no reload"
    );
    assert_eq!(
        e.get("/readyz").status,
        200,
        "still ready with the old links"
    );

    // Fixed: all of it at once.
    write_links(
        &e,
        "a,1,https://m.example/a-v2?cid={click_id},active,302\n\
         c,3,https://m.example/c?cid={click_id},active,307\n\
         d,4,https://m.example/d?cid={click_id},active,302\n",
    );
    signal(e.pid(), "HUP");
    wait_for("c to be served after the fix", DEADLINE, || {
        serves(&e, "c", 307, "https://m.example/c?cid=").then_some(())
    });
    assert!(
        serves(&e, "a", 302, "https://m.example/a-v2?cid="),
        "a changed: {:?}",
        click(&e, "a")
    );
    assert!(serves(&e, "d", 302, "https://m.example/d?cid="), "d added");
    assert_eq!(click(&e, "b").0, 404, "b was dropped from the file");
    assert_eq!(metric(&e, "affgate_edge_links_reloads_total"), Some(3.0));
    assert_eq!(
        metric(&e, "affgate_edge_links_reload_failures_total"),
        Some(1.0),
        "the failure stays counted"
    );
    assert_eq!(metric(&e, "affgate_edge_links_loaded"), Some(3.0));
}

#[test]
fn sighup_reloads_the_networks_file_and_a_bad_one_keeps_old_tokens() {
    let e = EdgeProc::start(&EdgeOpts {
        links_csv: format!("{HEADER}p,9,https://m.example/p?cid={{click_id}},active,302\n"),
        networks_csv: "network_id,name,postback_token\n1,One,token-one-12345\n".into(),
        ..EdgeOpts::default()
    });
    let cid = click_id_in(&click(&e, "p").1).expect("click id");
    let postback = |txid: &str, token: &str| {
        e.get(&format!(
            "/postback?click_id={cid}&txid={txid}&token={}",
            enc(token)
        ))
        .status
    };
    assert_eq!(
        postback("1", "token-one-12345"),
        200,
        "token from the start file"
    );
    assert_eq!(
        postback("2", "token-two-12345"),
        403,
        "second network not known yet"
    );

    let networks = e.dir.join("networks.csv");
    std::fs::write(
        &networks,
        "network_id,name,postback_token\n1,One,token-one-12345\n2,Two,token-two-12345\n",
    )
    .expect("write networks.csv");
    signal(e.pid(), "HUP");
    wait_metric(&e, "affgate_edge_tokens_loaded", 2.0);
    assert_eq!(
        postback("3", "token-two-12345"),
        200,
        "token added by SIGHUP"
    );

    // Line 3 has a token too short: the whole reload (links too) is refused.
    write_links(
        &e,
        "p,9,https://m.example/p?cid={click_id},active,302\nq,10,https://m.example/q,active,302\n",
    );
    std::fs::write(
        &networks,
        "network_id,name,postback_token\n1,One,token-one-12345\n3,Three,short\n",
    )
    .expect("write networks.csv");
    signal(e.pid(), "HUP");
    wait_metric(&e, "affgate_edge_links_reload_failures_total", 1.0);
    let err = wait_for("the refusal on stderr", DEADLINE, || {
        e.stderr()
            .lines()
            .find(|l| l.contains("networks.csv line 3"))
            .map(str::to_string)
    });
    assert!(err.contains("postback_token"), "names the field: `{err}`");
    assert_eq!(
        postback("4", "token-two-12345"),
        200,
        "the old tokens keep working"
    );
    assert_eq!(
        click(&e, "q").0,
        404,
        "the links file of a refused reload is not applied either"
    );

    let ins = e.inspect(true);
    let mut pbs: Vec<_> = ins
        .records
        .iter()
        .filter(|r| r.kind == "postback")
        .collect();
    pbs.sort_by_key(|r| r.seq);
    let txids: Vec<&str> = pbs.iter().map(|r| r.txid.as_str()).collect();
    assert_eq!(
        txids,
        vec!["1", "3", "4"],
        "exactly the accepted postbacks are in the ring"
    );
}

/// The listening line is the edge's "ready" signal to supervisors and tests;
/// a SIGHUP sent right after it must reload, not kill the process.
#[test]
fn sighup_right_after_start_reloads_instead_of_killing() {
    for round in 0..25 {
        let mut e = EdgeProc::start(&EdgeOpts {
            links_csv: format!("{HEADER}a,1,https://m.example/a,active,302\n"),
            ..EdgeOpts::default()
        });
        signal(e.pid(), "HUP");
        wait_for("the early SIGHUP to be handled", DEADLINE, || {
            if let Ok(Some(status)) = e.child.try_wait() {
                panic!(
                    "round {round}: the edge died of a SIGHUP sent right after its listening line: {status}"
                );
            }
            (metric(&e, "affgate_edge_links_reloads_total") == Some(2.0)).then_some(())
        });
    }
}
