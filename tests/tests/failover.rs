//! Collector failover end to end: one real `affgate-edge` delivering over
//! UDP to two real `affgate-collector`s, `[delivery] collectors = [A, B]`,
//! both writing to this test's own ClickHouse and PostgreSQL databases.
//!
//! docs/delivery.md: the edge sends to one collector at a time, the first
//! in the list while it answers; after 1 s without an ack from the current
//! one it moves to the next, and while not on the first it probes the first
//! every 2 s and moves back once a probe is answered.
//!
//! The scenario, under a bounded, paced load: A commits clicks while the
//! edge is on collector 0; A is killed with SIGKILL; the edge moves to B
//! (`current_collector` 1, a failover counted) and B commits clicks; A is
//! restarted on the same port; the edge moves back (`current_collector` 0)
//! and the new A commits clicks. Then: every click id a client got in a 302
//! is in `clicks FINAL` exactly once and nothing else is there, every
//! distinct postback is in the inbox once, and the ring drains.
//!
//! Waits poll with deadlines; the deadlines are failure bounds, not
//! measurements.

use std::net::SocketAddr;
use std::time::Duration;

use affgate_tests::{
    DeliveryLink, EdgeOpts, EdgeProc, Sent, Stack, Traffic, TrafficSpec, Transport,
    assert_exactly_once, metric_value, wait_for_every, wait_ring_drained,
};

const TOKEN: &str = "failover-network-token";
/// Longest wait for every answered event to reach the stores.
const DELIVERED: Duration = Duration::from_secs(60);
/// Longest wait for the ring to drain once the stores have everything.
const DRAINED: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

const CURRENT: &str = "affgate_edge_delivery_current_collector";
const FAILOVERS: &str = "affgate_edge_delivery_failovers_total";
const WRITTEN: &str = "affgate_collector_clicks_written_total";

fn edge_opts(link: &DeliveryLink, collectors: &[SocketAddr]) -> EdgeOpts {
    link.edge_opts(
        collectors,
        EdgeOpts {
            edge_id: 5,
            links_csv: "slug,link_id,destination\nload,93,https://m.example/l?cid={click_id}\n"
                .into(),
            networks_csv: format!("network_id,name,postback_token\n9,Failover,{TOKEN}\n"),
            size_mb: 4,
            ..EdgeOpts::default()
        },
    )
}

/// One series of the edge's `/metrics`, `None` if it is not there yet.
fn edge_metric(e: &EdgeProc, name: &str) -> Option<f64> {
    metric_value(&e.metrics_text(), name)
}

/// What the edge's failover gauges say right now, for failure messages.
fn edge_state(e: &EdgeProc) -> String {
    let text = e.metrics_text();
    format!(
        "current_collector {:?}, failovers {:?}",
        metric_value(&text, CURRENT),
        metric_value(&text, FAILOVERS)
    )
}

/// Every client was served to the end, every answer as expected.
fn assert_served(sent: &Sent, what: &str) {
    assert!(
        sent.unexpected.is_empty(),
        "{what}: unexpected answers: {:?}",
        &sent.unexpected[..sent.unexpected.len().min(5)]
    );
    assert_eq!(
        sent.cut_off, 0,
        "{what}: clients cut off: {:?}",
        sent.errors
    );
}

#[test]
fn edge_fails_over_to_the_second_collector_and_back_udp() {
    let link = DeliveryLink::new(Transport::Udp);
    let stack = Stack::new("failover_udp");
    let (mut a, at_a) = link.start_collector(&stack);
    let (b, at_b) = link.start_collector(&stack);
    let edge = EdgeProc::start(&edge_opts(&link, &[at_a, at_b]));

    let threads = 2;
    // Paced so the load outlasts both moves; bounded in requests and time
    // anyway, and stopped once the edge is back on A.
    let load = Traffic::start(
        edge.http,
        &TrafficSpec {
            threads,
            max_requests: 40_000,
            max_time: Duration::from_secs(30),
            pace: Some(Duration::from_millis(2)),
            token: TOKEN.into(),
            ..TrafficSpec::default()
        },
    );

    // Phase 1: on A.
    wait_for_every(
        "A to commit clicks while the edge is on collector 0",
        Duration::from_secs(15),
        POLL,
        || (a.metric(WRITTEN)? > 0.0 && edge_metric(&edge, CURRENT)? == 0.0).then_some(()),
    );
    let b_before = b.metric(WRITTEN).unwrap_or(0.0);
    assert_eq!(
        load.alive(),
        threads,
        "every client is still sending when A is killed"
    );

    // Phase 2: A dies, the edge moves to B.
    a.kill9();
    wait_for_every(
        "the edge on collector 1 (a failover counted) and B committing clicks",
        Duration::from_secs(15),
        POLL,
        || {
            let on_b = edge_metric(&edge, CURRENT)? == 1.0;
            let failovers = edge_metric(&edge, FAILOVERS)?;
            let b_written = b.metric(WRITTEN)?;
            (on_b && failovers >= 1.0 && b_written > b_before).then_some(())
        },
    );
    let failovers_on_b = edge_metric(&edge, FAILOVERS).expect("failovers metric");
    eprintln!(
        "on B: {}, B wrote {} clicks",
        edge_state(&edge),
        b.metric(WRITTEN).unwrap_or(0.0)
    );
    assert_eq!(
        load.alive(),
        threads,
        "every client is still sending when A is restarted"
    );

    // Phase 3: A is back on the same port; a probe is answered and the
    // edge moves back to it. The restarted A counts from 0.
    a.restart();
    wait_for_every(
        "the edge back on collector 0 and the restarted A committing clicks",
        Duration::from_secs(20),
        POLL,
        || {
            let on_a = edge_metric(&edge, CURRENT)? == 0.0;
            (on_a && a.metric(WRITTEN)? > 0.0).then_some(())
        },
    );
    eprintln!(
        "back on A: {}, A wrote {} clicks since its restart, B {} in all",
        edge_state(&edge),
        a.metric(WRITTEN).unwrap_or(0.0),
        b.metric(WRITTEN).unwrap_or(0.0)
    );
    assert_eq!(
        load.alive(),
        threads,
        "the load was still running when the edge moved back to A"
    );
    assert!(
        edge_metric(&edge, FAILOVERS).expect("failovers metric") >= failovers_on_b,
        "the failover counter never goes down"
    );

    load.stop();
    let sent = load.join();
    assert_served(&sent, "the load");
    assert!(
        !sent.postbacks.is_empty(),
        "the load fired postbacks as well as clicks"
    );

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    // Nothing arrived late, and whatever both collectors wrote (a batch A
    // committed but could not ack before it died, resent to B) collapsed.
    let n: usize = stack
        .ch(&format!("SELECT count() FROM {}.clicks FINAL", stack.name))
        .trim()
        .parse()
        .expect("count() is a number");
    assert_eq!(n, ids.len(), "clicks FINAL changed after the ring drained");
    let uniq: usize = stack
        .ch(&format!(
            "SELECT uniqExact(click_id) FROM {}.clicks",
            stack.name
        ))
        .trim()
        .parse()
        .expect("uniqExact is a number");
    assert_eq!(uniq, n, "every click id's copies collapse under FINAL");
}
