//! ClickHouse stopped under load: the edge answers every click, the
//! collector's windows fail and stay unacknowledged (the records wait in the
//! edge's ring), and once ClickHouse is back everything lands exactly once.
//!
//! This stops the SHARED ClickHouse with `deploy/services.sh stop
//! clickhouse`, so it is the only test in this binary (cargo runs test
//! binaries one after another), and a guard starts ClickHouse again however
//! the test ends.

use std::time::{Duration, Instant};

use affgate_tests::{
    CollectorProc, EdgeOpts, EdgeProc, Stack, Traffic, TrafficSpec, assert_exactly_once,
    clickhouse_up, delivery_toml, services_sh, wait_for_every, wait_ring_drained,
};

const TOKEN: &str = "ch-down-network-token";
const POLL: Duration = Duration::from_millis(100);
/// How long clicks keep coming while ClickHouse is down.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Starts the shared ClickHouse again on drop, panic or not.
struct RestartClickHouse;

impl Drop for RestartClickHouse {
    fn drop(&mut self) {
        if !clickhouse_up() && !services_sh("start", "clickhouse") {
            eprintln!(
                "could not start clickhouse again: run `deploy/services.sh start clickhouse`"
            );
        }
    }
}

fn paced(max_time: Duration) -> TrafficSpec {
    TrafficSpec {
        threads: 2,
        max_requests: 20_000,
        max_time,
        postback_every: 10,
        token: TOKEN.into(),
        pace: Some(Duration::from_millis(5)),
        ..TrafficSpec::default()
    }
}

#[test]
fn clickhouse_down_then_back_loses_and_doubles_nothing() {
    // Declared first, dropped last: the databases go after ClickHouse is back.
    let stack = Stack::new("chdown");
    let collector = CollectorProc::start(&stack);
    let edge = EdgeProc::start(&EdgeOpts {
        edge_id: 4,
        links_csv: "slug,link_id,destination\nload,92,https://m.example/l?cid={click_id}\n".into(),
        networks_csv: format!("network_id,name,postback_token\n9,Down,{TOKEN}\n"),
        extra_toml: delivery_toml(&[collector.udp]),
        ..EdgeOpts::default()
    });

    let t0 = Instant::now();
    // Clicks flowing and committing, then ClickHouse stops under them.
    let before = Traffic::start(edge.http, &paced(Duration::from_secs(30)));
    wait_for_every(
        "clicks committed before the stop",
        Duration::from_secs(20),
        POLL,
        || (collector.metric("affgate_collector_clicks_written_total")? > 0.0).then_some(()),
    );
    let _restart = RestartClickHouse;
    assert!(
        services_sh("stop", "clickhouse"),
        "deploy/services.sh stop clickhouse"
    );
    eprintln!("{:?}: clickhouse stopped", t0.elapsed());
    before.stop();
    let mut sent = before.join();
    assert_eq!(sent.cut_off, 0, "no client was cut off: {:?}", sent.errors);

    // ~10 s of clicks with ClickHouse down; the edge must answer each one.
    let down = Traffic::start(edge.http, &paced(DOWN_FOR));
    let errors = wait_for_every(
        "the collector to count failed clickhouse inserts",
        Duration::from_secs(20),
        POLL,
        || {
            collector
                .metric("affgate_collector_insert_errors_total{store=\"clickhouse\"}")
                .filter(|n| *n > 0.0)
        },
    );
    let unacked: u64 = edge
        .inspect(false)
        .value("unacked_records")
        .and_then(|v| v.parse().ok())
        .expect("unacked_records in ring inspect");
    let still_down = !clickhouse_up();
    let during = down.join();
    assert!(still_down, "clickhouse stayed down while the ring was read");
    assert!(
        unacked > 0,
        "the ring holds unacknowledged records while clickhouse is down"
    );
    assert!(
        during.unexpected.is_empty(),
        "every click and postback is answered with clickhouse down: {:?}",
        &during.unexpected[..during.unexpected.len().min(5)]
    );
    assert_eq!(
        during.cut_off, 0,
        "no client was cut off: {:?}",
        during.errors
    );
    assert!(
        during.clicks.len() > 100,
        "clicks kept coming while clickhouse was down ({} answered)",
        during.clicks.len()
    );
    eprintln!(
        "clickhouse down: {} clicks answered, {errors} failed inserts, {unacked} unacked records",
        during.clicks.len()
    );
    sent.extend(during);
    assert!(
        sent.unexpected.is_empty(),
        "unexpected answers: {:?}",
        sent.unexpected
    );

    assert!(
        services_sh("start", "clickhouse"),
        "deploy/services.sh start clickhouse"
    );
    eprintln!("{:?}: clickhouse started", t0.elapsed());
    let ids = assert_exactly_once(&stack, &sent, 0, Duration::from_secs(60));
    wait_ring_drained(&edge.config, Duration::from_secs(30));
    eprintln!("{:?}: delivered and drained", t0.elapsed());
    let n: usize = stack
        .ch(&format!("SELECT count() FROM {}.clicks FINAL", stack.name))
        .trim()
        .parse()
        .expect("count() is a number");
    assert_eq!(n, ids.len(), "clicks FINAL is stable once the ring drained");
}
