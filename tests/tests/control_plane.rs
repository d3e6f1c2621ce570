//! Issue 5's end-to-end checks: through the admin API, a real edge reading
//! Redis, a real collector, PostgreSQL, Redis and ClickHouse. Money is
//! checked to the micro-unit; every wait polls a condition with a deadline.

use std::time::{Duration, Instant};

use affgate_tests::plane::{DEADLINE, Plane, commissions};
use affgate_tests::{api, wait_for};
use serde_json::json;

const DEST: &str = "https://merchant.example/p?cid={click_id}";
const OFFER_FALLBACK: &str = "https://offer-fallback.example/";

fn offer(levels: serde_json::Value) -> serde_json::Value {
    json!({
        "name": "offer",
        "payout": "100",
        "currency": "USD",
        "commission_levels": levels,
        "fallback_url": OFFER_FALLBACK,
    })
}

#[test]
fn a_three_level_tree_earns_exactly_the_split() {
    let p = Plane::start("cp_tree");
    let token = "tree-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(token, offer(json!([0.7, "0.1", "0.05"])), 3);
    let (root, mid, leaf) = (chain[0], chain[1], chain[2]);
    let (_, slug) = p.link(offer_id, leaf, DEST);
    let click = p.click(&slug);
    // The offer's payout applies when the network sends none.
    let r = p.postback(&[("click_id", &click), ("txid", "t1"), ("token", token)]);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let c = p.conversion_until(&click, "the approved conversion", |c| {
        c["status"] == "approved"
    });
    assert_eq!(c["payout"], "100");
    assert_eq!(
        commissions(&c),
        vec![
            (leaf, "70".into(), "approved".into()),
            (mid, "10".into(), "approved".into()),
            (root, "5".into(), "approved".into()),
        ],
        "{c}"
    );
    // The network's amount, split to the micro-unit and rounded down.
    let click2 = p.click(&slug);
    let r = p.postback(&[
        ("click_id", &click2),
        ("txid", "t2"),
        ("payout", "33.33"),
        ("token", token),
    ]);
    assert_eq!(r.status, 200);
    let c2 = p.conversion_until(&click2, "the second conversion", |c| {
        c["status"] == "approved"
    });
    assert_eq!(c2["payout"], "33.33");
    let amounts: Vec<String> = commissions(&c2).into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(amounts, vec!["23.331", "3.333", "1.6665"], "{c2}");
    // Every conversion event reaches ClickHouse's mirror, once.
    wait_for("the conversion mirror in clickhouse", DEADLINE, || {
        let n = p.stack.ch(&format!(
            "SELECT count() FROM {}.conversions FINAL WHERE click_id IN ('{click}', '{click2}')",
            p.stack.name
        ));
        (n.trim() == "2").then_some(())
    });
}

#[test]
fn five_identical_postbacks_make_one_conversion() {
    let p = Plane::start("cp_dup");
    let token = "dup-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(token, offer(json!(["0.5"])), 1);
    let (_, slug) = p.link(offer_id, chain[0], DEST);
    let click = p.click(&slug);
    for _ in 0..5 {
        let r = p.postback(&[
            ("click_id", &click),
            ("txid", "same"),
            ("payout", "10"),
            ("token", token),
        ]);
        assert_eq!(r.status, 200);
    }
    let c = p.conversion_until(&click, "the conversion", |c| c["status"] == "approved");
    assert_eq!(
        commissions(&c),
        vec![(chain[0], "5".into(), "approved".into())]
    );
    wait_for("the inbox to be processed", DEADLINE, || {
        (p.inbox_backlog() == 0).then_some(())
    });
    assert_eq!(
        p.stack.pg("SELECT count(*) FROM postback_inbox").trim(),
        "1"
    );
    assert_eq!(
        p.stack.pg("SELECT count(*) FROM conversion_events").trim(),
        "1"
    );
    assert_eq!(p.stack.pg("SELECT count(*) FROM conversions").trim(), "1");
    assert_eq!(p.conversions(&click).len(), 1);
}

#[test]
fn pending_approved_reversed_nets_zero() {
    let p = Plane::start("cp_rev");
    let token = "rev-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(token, offer(json!([0.6, 0.2])), 2);
    let (_, slug) = p.link(offer_id, chain[1], DEST);
    let click = p.click(&slug);
    let send = |status: &str| {
        let r = p.postback(&[
            ("click_id", &click),
            ("txid", "order-7"),
            ("status", status),
            ("amount", "50"),
            ("token", token),
        ]);
        assert_eq!(r.status, 200, "{status}");
    };
    send("pending");
    let c = p.conversion_until(&click, "pending", |c| c["status"] == "pending");
    assert_eq!(
        commissions(&c),
        vec![
            (chain[1], "30".into(), "pending".into()),
            (chain[0], "10".into(), "pending".into())
        ]
    );
    send("approved");
    p.conversion_until(&click, "approved", |c| {
        c["status"] == "approved" && commissions(c).iter().all(|(_, _, s)| s == "approved")
    });
    send("reversed");
    let c = p.conversion_until(&click, "reversed", |c| c["status"] == "reversed");
    assert!(
        commissions(&c).iter().all(|(_, _, s)| s == "reversed"),
        "{c}"
    );
    let earned = p
        .stack
        .pg("SELECT coalesce(sum(amount), 0)::text FROM commissions WHERE status = 'approved'");
    assert_eq!(earned.trim(), "0", "zero net commission after the reversal");
    // A late rejection does not move a reversed conversion (a repeat of an
    // earlier status would be the same postback, deduplicated in the inbox).
    send("rejected");
    wait_for("the late postback processed", DEADLINE, || {
        (p.stack.pg("SELECT count(*) FROM conversion_events").trim() == "4").then_some(())
    });
    assert_eq!(p.conversions(&click)[0]["status"], "reversed");
    assert_eq!(
        p.stack
            .pg("SELECT count(*) FROM conversion_events WHERE NOT applied")
            .trim(),
        "1"
    );
}

#[test]
fn a_cap_of_three_caps_the_fourth_and_sends_clicks_to_the_fallback() {
    let p = Plane::start("cp_cap");
    let token = "cap-network-token";
    let mut o = offer(json!([0.5]));
    o["daily_cap"] = json!(3);
    let (_, offer_id, chain) = p.offer_with_tree(token, o, 1);
    let (_, slug) = p.link(offer_id, chain[0], DEST);
    // Four clicks first: once capped, the link no longer redirects to the merchant.
    let clicks: Vec<String> = (0..4).map(|_| p.click(&slug)).collect();
    for (i, click) in clicks.iter().enumerate() {
        let txid = format!("cap-{i}");
        let r = p.postback(&[("click_id", click), ("txid", &txid), ("token", token)]);
        assert_eq!(r.status, 200);
        // One at a time, so "the 4th" is well defined.
        p.conversion_until(click, "the conversion", |_| true);
    }
    let statuses: Vec<String> = clicks
        .iter()
        .map(|c| {
            p.conversions(c)[0]["status"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(statuses, vec!["approved", "approved", "approved", "capped"]);
    assert!(commissions(&p.conversions(&clicks[3])[0]).is_empty());
    let (_, o) = api(
        p.admin(),
        "GET",
        &format!("/api/v1/offers/{offer_id}"),
        None,
    );
    assert_eq!(o["capped"], true, "{o}");
    let mut conn = p.redis.conn();
    let status: String = redis::cmd("HGET")
        .arg(format!("affgate:offer:{offer_id}"))
        .arg("status")
        .query(&mut conn)
        .expect("offer hash");
    assert_eq!(status, "capped");
    wait_for(
        "the link's next click to go to the offer's fallback",
        DEADLINE,
        || {
            let r = p.edge.get(&format!("/c/{slug}"));
            (r.header("location") == Some(OFFER_FALLBACK)).then_some(())
        },
    );
    // The next UTC day (the cap's day moved into the past): the collector
    // reopens the offer and the link redirects to the merchant again.
    p.stack.pg(&format!(
        "UPDATE offers SET capped_on = capped_on - 1 WHERE id = {offer_id}"
    ));
    wait_for("the offer reopened on the next day", DEADLINE, || {
        let r = p.edge.get(&format!("/c/{slug}"));
        r.header("location")
            .is_some_and(|l| l.starts_with("https://merchant.example/"))
            .then_some(())
    });
    let (_, o) = api(
        p.admin(),
        "GET",
        &format!("/api/v1/offers/{offer_id}"),
        None,
    );
    assert_eq!(o["capped"], false, "{o}");
}

#[test]
fn a_destination_change_is_served_within_a_second() {
    let p = Plane::start("cp_prop");
    let (_, offer_id, chain) = p.offer_with_tree("prop-network-token", offer(json!([0.5])), 1);
    let (link_id, slug) = p.link(offer_id, chain[0], DEST);
    let changed_to = "https://changed.example/landing?cid={click_id}";
    let started = Instant::now();
    let (status, v) = api(
        p.admin(),
        "PATCH",
        &format!("/api/v1/links/{link_id}"),
        Some(&json!({"destination": changed_to}).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    // DESIGN.md's contract: a change is visible to every edge within one second.
    wait_for(
        "the edge to serve the new destination",
        Duration::from_secs(1),
        || {
            let r = p.edge.get(&format!("/c/{slug}"));
            r.header("location")
                .is_some_and(|l| l.starts_with("https://changed.example/landing?cid="))
                .then_some(())
        },
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // Pausing the link sends its clicks to the offer's fallback.
    let (status, _) = api(
        p.admin(),
        "PATCH",
        &format!("/api/v1/links/{link_id}"),
        Some(r#"{"status": "paused"}"#),
    );
    assert_eq!(status, 200);
    wait_for(
        "the paused link to redirect to the fallback",
        DEADLINE,
        || {
            let r = p.edge.get(&format!("/c/{slug}"));
            (r.header("location") == Some(OFFER_FALLBACK)).then_some(())
        },
    );
    // A new offer fallback reaches the link's hash and the edge.
    let (status, _) = api(
        p.admin(),
        "PATCH",
        &format!("/api/v1/offers/{offer_id}"),
        Some(r#"{"fallback_url": "https://new-fallback.example/"}"#),
    );
    assert_eq!(status, 200);
    let fallback: String = redis::cmd("HGET")
        .arg(format!("affgate:link:{slug}"))
        .arg("fallback_url")
        .query(&mut p.redis.conn())
        .expect("link hash");
    assert_eq!(fallback, "https://new-fallback.example/");
    wait_for("the paused link to use the new fallback", DEADLINE, || {
        let r = p.edge.get(&format!("/c/{slug}"));
        (r.header("location") == Some("https://new-fallback.example/")).then_some(())
    });
}

#[test]
fn a_bad_token_is_403_and_records_nothing() {
    let p = Plane::start("cp_tok");
    let token = "good-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(token, offer(json!([0.5])), 1);
    let (_, slug) = p.link(offer_id, chain[0], DEST);
    let click = p.click(&slug);
    for bad in [Some("wrong-token-123"), None] {
        let mut params = vec![("click_id", click.as_str()), ("txid", "x")];
        if let Some(t) = bad {
            params.push(("token", t));
        }
        assert_eq!(p.postback(&params).status, 403, "token {bad:?}");
    }
    // A good postback afterwards lands; the refused ones left no trace.
    assert_eq!(
        p.postback(&[("click_id", &click), ("txid", "y"), ("token", token)])
            .status,
        200
    );
    p.conversion_until(&click, "the good conversion", |c| c["txid"] == "y");
    assert_eq!(
        p.stack.pg("SELECT count(*) FROM postback_inbox").trim(),
        "1"
    );
    assert_eq!(p.stack.pg("SELECT count(*) FROM conversions").trim(), "1");
}

#[test]
fn a_network_cannot_convert_another_networks_click() {
    let p = Plane::start("cp_net");
    let (_, offer_id, chain) = p.offer_with_tree("owner-network-token", offer(json!([0.5])), 1);
    let other = p.create(
        "networks",
        json!({"name": "other", "postback_token": "other-network-token"}),
    );
    assert!(other["id"].as_i64().is_some());
    let (_, slug) = p.link(offer_id, chain[0], DEST);
    let click = p.click(&slug);
    // The edge knows the other network's token (200), the collector refuses
    // the attribution: the offer belongs to another network.
    wait_for("the edge to know the other token", DEADLINE, || {
        (p.postback(&[
            ("click_id", &click),
            ("txid", "n"),
            ("token", "other-network-token"),
        ])
        .status
            == 200)
            .then_some(())
    });
    wait_for("the inbox row processed", DEADLINE, || {
        (p.inbox_backlog() == 0 && p.stack.pg("SELECT count(*) FROM postback_inbox").trim() == "1")
            .then_some(())
    });
    assert_eq!(
        p.stack.pg("SELECT outcome FROM postback_inbox").trim(),
        "network_mismatch"
    );
    assert!(p.conversions(&click).is_empty());
}

#[test]
fn a_shadow_banned_links_conversion_is_quarantined() {
    let p = Plane::start("cp_quar");
    let token = "quar-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(token, offer(json!([0.5])), 1);
    let (link_id, slug) = p.link(offer_id, chain[0], DEST);
    let (status, _) = api(
        p.admin(),
        "PATCH",
        &format!("/api/v1/links/{link_id}"),
        Some(r#"{"status": "shadow_banned"}"#),
    );
    assert_eq!(status, 200);
    // Wait until the edge marks clicks quarantined (it still redirects).
    let click = wait_for("a quarantined click", DEADLINE, || {
        let c = p.click(&slug);
        let quarantined = wait_for("the click in clickhouse", DEADLINE, || {
            let q = p.stack.ch(&format!(
                "SELECT toString(quarantined) FROM {}.clicks WHERE click_id = '{c}'",
                p.stack.name
            ));
            let q = q.trim().to_string();
            (!q.is_empty()).then_some(q)
        });
        (quarantined == "1").then_some(c)
    });
    // Un-ban the link: the click was quarantined, so it still earns nothing.
    let (status, _) = api(
        p.admin(),
        "PATCH",
        &format!("/api/v1/links/{link_id}"),
        Some(r#"{"status": "active"}"#),
    );
    assert_eq!(status, 200);
    assert_eq!(
        p.postback(&[("click_id", &click), ("txid", "q"), ("token", token)])
            .status,
        200
    );
    let c = p.conversion_until(&click, "the quarantined conversion", |c| {
        c["status"] == "quarantined"
    });
    assert!(commissions(&c).is_empty(), "{c}");
}

#[test]
fn redis_flushed_or_down_catches_up() {
    let mut p = Plane::start("cp_redis");
    let (_, offer_id, chain) = p.offer_with_tree("redis-network-token", offer(json!([0.5])), 1);
    let (_, slug) = p.link(offer_id, chain[0], DEST);
    let key = format!("affgate:link:{slug}");
    // Flushed: the collector notices and publishes everything again.
    let mut conn = p.redis.conn();
    redis::cmd("FLUSHALL")
        .query::<()>(&mut conn)
        .expect("FLUSHALL");
    wait_for("the link republished after FLUSHALL", DEADLINE, || {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut conn)
            .unwrap_or(false);
        exists.then_some(())
    });
    // Down: the API still works, and the change reaches Redis and the edge
    // once Redis is back.
    p.redis.kill();
    let l = p.create(
        "links",
        json!({"offer_id": offer_id, "affiliate_id": chain[0], "destination": DEST, "slug": "made-while-down"}),
    );
    assert_eq!(l["slug"], "made-while-down");
    p.redis.restart();
    wait_for(
        "the edge to serve the link made while redis was down",
        DEADLINE,
        || (p.edge.get("/c/made-while-down").status == 302).then_some(()),
    );
    assert_eq!(p.edge.get(&format!("/c/{slug}")).status, 302);
}

#[test]
fn two_collectors_processing_the_same_events_never_double_count() {
    use affgate_tests::plane::{edge_for, id, postback};
    use affgate_tests::{CollectorOpts, CollectorProc, Redis, Stack};

    const CLICKS: usize = 60;
    let redis = Redis::start();
    let stack = Stack::new("cp_two");
    let opts = CollectorOpts {
        admin_redis: Some(redis.url()),
        ..CollectorOpts::default()
    };
    let mut a = CollectorProc::start_with(&stack, &opts);
    let mut b = CollectorProc::unstarted_with(&stack, &opts);
    let admin = a.admin.expect("admin api");
    let post = |what: &str, body: serde_json::Value| {
        let (s, v) = api(
            admin,
            "POST",
            &format!("/api/v1/{what}"),
            Some(&body.to_string()),
        );
        assert_eq!(s, 201, "{what}: {v}");
        v
    };
    let token = "two-collectors-token";
    let network = id(&post(
        "networks",
        json!({"name": "n", "postback_token": token}),
    ));
    let mut o = offer(json!(["0.5", "0.25"]));
    o["network_id"] = json!(network);
    let offer_id = id(&post("offers", o));
    let parent = id(&post("affiliates", json!({"name": "parent"})));
    let child = id(&post(
        "affiliates",
        json!({"name": "child", "parent_id": parent}),
    ));
    let slug = post(
        "links",
        json!({"offer_id": offer_id, "affiliate_id": child, "destination": DEST}),
    )["slug"]
        .as_str()
        .expect("slug")
        .to_string();
    // Edge 1 delivers to collector A, edge 2 to collector B; a network
    // fires every postback at both edges (as retrying networks do).
    let e1 = edge_for(&redis, &[a.udp], 1);
    let e2 = edge_for(&redis, &[b.udp], 2);
    wait_for("edge 1 serves the link", DEADLINE, || {
        (e1.get(&format!("/c/{slug}")).status == 302).then_some(())
    });
    let clicks: Vec<String> = (0..CLICKS)
        .map(|_| {
            let r = e1.get(&format!("/c/{slug}"));
            affgate_tests::click_id_in(r.header("location").unwrap_or_default()).expect("click id")
        })
        .collect();
    wait_for("edge 2 knows the token", DEADLINE, || {
        (postback(
            &e2,
            &[
                ("click_id", &clicks[0]),
                ("txid", "warm"),
                ("token", "nope-nope"),
            ],
        )
        .status
            == 403)
            .then_some(())
    });
    // Both collectors down while the postbacks pile up in the edges' rings,
    // then both start at once and drain them concurrently.
    a.kill9();
    for (i, click) in clicks.iter().enumerate() {
        let txid = format!("order-{i}");
        for status in ["pending", "approved"] {
            for e in [&e1, &e2] {
                let r = postback(
                    e,
                    &[
                        ("click_id", click),
                        ("txid", &txid),
                        ("status", status),
                        ("amount", "10"),
                        ("token", token),
                    ],
                );
                assert_eq!(r.status, 200);
            }
        }
    }
    a.restart();
    b.restart();
    wait_for_long("every postback processed", || {
        let rows = stack.pg("SELECT count(*) FROM postback_inbox WHERE processed_at IS NOT NULL");
        (rows.trim() == (2 * CLICKS).to_string()).then_some(())
    });
    assert_eq!(
        stack
            .pg("SELECT count(*) FROM conversions WHERE status = 'approved'")
            .trim(),
        CLICKS.to_string()
    );
    assert_eq!(
        stack.pg("SELECT count(*) FROM conversion_events").trim(),
        (2 * CLICKS).to_string()
    );
    assert_eq!(
        stack
            .pg(&format!(
                "SELECT count(*)::text || ' ' || (sum(amount) = {CLICKS} * 7.5)::text
                 FROM commissions WHERE status = 'approved'"
            ))
            .trim(),
        format!("{} true", 2 * CLICKS),
        "each conversion paid 5 + 2.5 exactly once"
    );
    let processed = |c: &CollectorProc| -> f64 {
        ["recorded", "not_applied", "refused"]
            .iter()
            .map(|o| {
                c.metric(&format!(
                    "affgate_collector_postbacks_processed_total{{outcome=\"{o}\"}}"
                ))
                .unwrap_or(0.0)
            })
            .sum()
    };
    let (pa, pb) = (processed(&a), processed(&b));
    assert_eq!(pa + pb, (2 * CLICKS) as f64, "a {pa} + b {pb}");
    for (name, c) in [("a", &a), ("b", &b)] {
        wait_for(
            &format!("collector {name}: inbox lag 0 once drained"),
            DEADLINE,
            || (c.metric("affgate_collector_inbox_lag_seconds")? == 0.0).then_some(()),
        );
    }
    eprintln!("collector a processed {pa} postbacks, collector b {pb}");
}

fn wait_for_long<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for(what, Duration::from_secs(60), f)
}

#[test]
fn a_postback_after_the_attribution_window_is_expired() {
    use affgate_schema::click_id::ClickId;
    let p = Plane::start("cp_window");
    let token = "window-network-token";
    let mut o = offer(json!([0.5]));
    o["attribution_window_days"] = json!(7);
    let (_, offer_id, chain) = p.offer_with_tree(token, o, 1);
    let (link_id, _) = p.link(offer_id, chain[0], DEST);
    // A genuine click id of this link, minted 8 days ago (as an edge would
    // have then): it verifies, but the offer's window is 7 days.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let old = ClickId::mint(
        &affgate_tests::keys(),
        9,
        now_ms - 8 * 86_400_000,
        link_id as u64,
        1,
    )
    .expect("mint");
    let young = ClickId::mint(
        &affgate_tests::keys(),
        9,
        now_ms - 6 * 86_400_000,
        link_id as u64,
        2,
    )
    .expect("mint");
    for (click, txid) in [(old.as_str(), "late"), (young.as_str(), "in-time")] {
        let r = p.postback(&[("click_id", click), ("txid", txid), ("token", token)]);
        assert_eq!(r.status, 200, "{}", r.body_str());
    }
    let c = p.conversion_until(old.as_str(), "the expired conversion", |c| {
        c["status"] == "expired"
    });
    assert!(commissions(&c).is_empty(), "{c}");
    p.conversion_until(young.as_str(), "the in-time conversion", |c| {
        c["status"] == "approved"
    });
}
