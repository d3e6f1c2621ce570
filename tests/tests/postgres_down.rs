//! PostgreSQL stopped for a minute under clicks and postbacks: the edge
//! answers every one, the collector's windows fail and stay
//! unacknowledged (the events wait in the edge's ring), the admin API
//! answers 503, and once PostgreSQL is back every postback becomes exactly
//! one conversion with exactly its commissions.
//!
//! This stops the SHARED PostgreSQL with `deploy/services.sh stop
//! postgres`, so it is the only test in this binary (cargo runs test
//! binaries one after another), and a guard starts it again however the
//! test ends.

use std::time::{Duration, Instant};

use affgate_tests::plane::{Plane, commissions};
use affgate_tests::{PG_ADMIN_DB, api, psql, services_sh, wait_for};
use serde_json::json;

/// How long PostgreSQL stays down.
const DOWN_FOR: Duration = Duration::from_secs(60);
/// One click and one postback this often while it is down.
const EVERY: Duration = Duration::from_millis(1500);

fn postgres_up() -> bool {
    psql(PG_ADMIN_DB, "SELECT 1").is_ok()
}

/// Starts the shared PostgreSQL again on drop, panic or not.
struct RestartPostgres;

impl Drop for RestartPostgres {
    fn drop(&mut self) {
        if !postgres_up() && !services_sh("start", "postgres") {
            eprintln!("could not start postgres again: run `deploy/services.sh start postgres`");
        }
    }
}

#[test]
fn postgres_down_for_a_minute_loses_nothing() {
    let p = Plane::start("pgdown");
    let token = "pg-down-network-token";
    let (_, offer_id, chain) = p.offer_with_tree(
        token,
        json!({"name": "o", "payout": "10", "currency": "EUR", "commission_levels": [0.6, 0.3]}),
        2,
    );
    let (_, slug) = p.link(offer_id, chain[1], "https://m.example/?cid={click_id}");
    // Dropped before `p`: PostgreSQL is back before the test database is dropped.
    let _guard = RestartPostgres;

    assert!(services_sh("stop", "postgres"), "stop postgres");
    assert!(!postgres_up(), "postgres is down");
    let (status, v) = api(p.admin(), "GET", "/api/v1/offers", None);
    assert_eq!(
        status, 503,
        "the admin api says the database is unavailable: {v}"
    );
    assert!(v["error"].is_string());

    let started = Instant::now();
    let mut clicks = Vec::new();
    while started.elapsed() < DOWN_FOR {
        let click = p.click(&slug);
        let r = p.postback(&[
            ("click_id", &click),
            ("txid", &format!("down-{}", clicks.len())),
            ("token", token),
        ]);
        assert_eq!(
            r.status, 200,
            "the edge answers postbacks with postgres down"
        );
        clicks.push(click);
        std::thread::sleep(EVERY.min(DOWN_FOR.saturating_sub(started.elapsed())));
    }
    assert!(clicks.len() >= 30, "traffic kept flowing: {}", clicks.len());
    assert!(services_sh("start", "postgres"), "start postgres");

    let n = clicks.len();
    wait_for(
        "every postback recorded after postgres came back",
        Duration::from_secs(90),
        || {
            let done = p
                .stack
                .pg("SELECT count(*) FROM conversions WHERE status = 'approved'");
            (done.trim() == n.to_string()).then_some(())
        },
    );
    assert_eq!(
        p.stack.pg("SELECT count(*) FROM postback_inbox").trim(),
        n.to_string()
    );
    assert_eq!(
        p.stack.pg("SELECT count(*) FROM conversion_events").trim(),
        n.to_string()
    );
    let paid = p.stack.pg(
        "SELECT count(*)::text || ' ' || sum(amount)::text FROM commissions WHERE status = 'approved'",
    );
    assert_eq!(
        paid.trim(),
        format!("{} {}.000000", 2 * n, 9 * n),
        "6 + 3 per conversion"
    );
    for click in [&clicks[0], &clicks[n - 1]] {
        let c = &p.conversions(click)[0];
        assert_eq!(
            commissions(c),
            vec![
                (chain[1], "6".into(), "approved".into()),
                (chain[0], "3".into(), "approved".into())
            ]
        );
    }
    // Clicks too: every one in ClickHouse once.
    let ids = clicks
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(",");
    wait_for("every click in clickhouse", Duration::from_secs(60), || {
        let got = p.stack.ch(&format!(
            "SELECT uniqExact(click_id) FROM {}.clicks WHERE click_id IN ({ids})",
            p.stack.name
        ));
        (got.trim() == n.to_string()).then_some(())
    });
}
