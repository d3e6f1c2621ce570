//! Delivery end to end: real `affgate-edge` and `affgate-collector`
//! binaries, and this test's own ClickHouse and PostgreSQL databases on the
//! shared servers (`deploy/services.sh start`). Each scenario runs over both
//! transports, `[delivery] transport = "udp"` and `"quic"` (a certificate
//! made with `openssl`, see [`DeliveryLink`]): `x_udp` and `x_quic` call the
//! same scenario function.
//!
//! Every test ends with the same check: each click id a client received in a
//! 302 is in `clicks FINAL` exactly once and nothing else is there; each
//! distinct postback (click id, txid, status) answered 200 is in the inbox
//! exactly once, however often it was fired; and the edge's ring drains
//! (nothing unacknowledged, nothing spilled). The faults on the way: none;
//! a collector and then an edge killed with SIGKILL mid-stream and
//! restarted; a relay losing, duplicating and reordering datagrams both
//! ways (over QUIC the relay forwards QUIC packets); a collector that is not
//! there yet while a 1 MiB ring spills.
//!
//! Loads are bounded in requests and time; waits poll with deadlines.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use affgate_tests::{
    CollectorProc, DeliveryLink, EdgeOpts, EdgeProc, Relay, RelayOpts, Sent, Stack, Traffic,
    TrafficSpec, Transport, assert_exactly_once, big_clicks, metric_value, wait_for,
    wait_for_every, wait_ring_drained,
};

const TOKEN: &str = "delivery-network-token";
/// Longest wait for every answered event to reach the stores.
const DELIVERED: Duration = Duration::from_secs(60);
/// Longest wait for the ring to drain once the stores have everything.
const DRAINED: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

fn edge_opts(link: &DeliveryLink, collector: SocketAddr, size_mb: u64) -> EdgeOpts {
    link.edge_opts(
        &[collector],
        EdgeOpts {
            edge_id: 3,
            links_csv: "slug,link_id,destination\nload,91,https://m.example/l?cid={click_id}\n"
                .into(),
            networks_csv: format!("network_id,name,postback_token\n9,Delivery,{TOKEN}\n"),
            size_mb,
            ..EdgeOpts::default()
        },
    )
}

fn spec(max_requests: u64) -> TrafficSpec {
    TrafficSpec {
        max_requests,
        token: TOKEN.into(),
        ..TrafficSpec::default()
    }
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

fn collector_metric(c: &CollectorProc, name: &str) -> f64 {
    c.metric(name)
        .unwrap_or_else(|| panic!("collector /metrics has no `{name}`"))
}

fn edge_metric(e: &EdgeProc, name: &str) -> f64 {
    metric_value(&e.metrics_text(), name).unwrap_or_else(|| panic!("edge /metrics has no `{name}`"))
}

fn inspect_u64(e: &EdgeProc, key: &str) -> u64 {
    let ins = e.inspect(false);
    ins.value(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{key}:` in ring inspect:\n{}", ins.text))
}

/// After the stores have everything and the ring drained: `count() FINAL`
/// still equals the click ids found (nothing arrived late), and every copy
/// that did arrive twice collapsed under FINAL.
fn assert_settled(stack: &Stack, ids: &[String]) {
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

fn tag(what: &str, link: &DeliveryLink) -> String {
    match link.transport {
        Transport::Udp => format!("{what}_udp"),
        Transport::Quic => format!("{what}_quic"),
    }
}

#[test]
fn every_answered_event_lands_exactly_once_udp() {
    every_answered_event_lands_exactly_once(Transport::Udp);
}

#[test]
fn every_answered_event_lands_exactly_once_quic() {
    every_answered_event_lands_exactly_once(Transport::Quic);
}

fn every_answered_event_lands_exactly_once(transport: Transport) {
    let link = DeliveryLink::new(transport);
    let stack = Stack::new(&tag("happy", &link));
    let (collector, at) = link.start_collector(&stack);
    let edge = EdgeProc::start(&edge_opts(&link, at, 4));

    let sent = Traffic::start(edge.http, &spec(3_000)).join();
    assert_served(&sent, "the load");
    let distinct_postbacks = sent.postback_set().len();
    assert!(
        sent.postbacks.len() > distinct_postbacks && distinct_postbacks > 0,
        "some postbacks were fired more than once: {} requests, {} distinct",
        sent.postbacks.len(),
        distinct_postbacks
    );

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    assert_settled(&stack, &ids);
    assert_eq!(
        collector_metric(&collector, "affgate_collector_postbacks_new_total") as usize,
        distinct_postbacks,
        "the inbox took each distinct postback once, the repeats were no-ops"
    );
    // The gauge is refreshed on the flusher's next tick.
    wait_for_every(
        "the edge's in-flight gauge to reach 0",
        Duration::from_secs(10),
        POLL,
        || (edge_metric(&edge, "affgate_edge_delivery_in_flight_records") == 0.0).then_some(()),
    );
    if transport == Transport::Udp {
        assert_segmented_bursts(&edge, &collector);
    }
}

/// Where the kernel has UDP segmentation offload the edge uses it for the
/// load's bursts, and the collector's receive offload reads such runs
/// whole; what landed above shows nothing was lost doing so.
fn assert_segmented_bursts(edge: &EdgeProc, collector: &CollectorProc) {
    if edge_metric(edge, "affgate_edge_delivery_segmentation_offload") == 0.0 {
        eprintln!("no UDP segmentation offload on this kernel; segmented sends not checked");
        return;
    }
    let sends = edge_metric(edge, "affgate_edge_delivery_segmented_sends_total");
    let datagrams = edge_metric(edge, "affgate_edge_delivery_segmented_datagrams_total");
    assert!(
        sends > 0.0 && datagrams >= 2.0 * sends,
        "bursts went out segmented: {sends} sends, {datagrams} datagrams"
    );
    assert!(
        collector_metric(collector, "affgate_collector_udp_coalesced_reads_total") > 0.0,
        "the collector read some segmented runs whole"
    );
}

#[test]
fn collector_and_edge_killed_mid_stream_lose_and_double_nothing_udp() {
    collector_and_edge_killed_mid_stream_lose_and_double_nothing(Transport::Udp);
}

#[test]
fn collector_and_edge_killed_mid_stream_lose_and_double_nothing_quic() {
    collector_and_edge_killed_mid_stream_lose_and_double_nothing(Transport::Quic);
}

/// Alongside the load, one client sends clicks too large for one datagram
/// (over QUIC: each on a stream of its own) through both kills.
fn collector_and_edge_killed_mid_stream_lose_and_double_nothing(transport: Transport) {
    let link = DeliveryLink::new(transport);
    let stack = Stack::new(&tag("kill", &link));
    let (mut collector, at) = link.start_collector(&stack);
    let opts = edge_opts(&link, at, 4);
    let mut first = EdgeProc::start(&opts);
    let threads = 2;
    let load_spec = TrafficSpec {
        threads,
        max_requests: 20_000,
        max_time: Duration::from_secs(30),
        // Paced so the load outlasts the kills below (bounded anyway).
        pace: Some(Duration::from_millis(1)),
        ..spec(0)
    };
    let load = Traffic::start(first.http, &load_spec);
    let big = big_clicks(first.http, 400, Duration::from_millis(20));

    wait_for_every(
        "the first collector to commit clicks",
        Duration::from_secs(20),
        POLL,
        || (collector.metric("affgate_collector_clicks_written_total")? > 0.0).then_some(()),
    );
    collector.kill9();
    let at_kill = load.responses();
    wait_for(
        "clicks answered while the collector is down",
        Duration::from_secs(20),
        || (load.responses() >= at_kill + 300 || load.alive() < threads).then_some(()),
    );
    collector.restart();
    // Over QUIC the edge may first wait out its old connection.
    wait_for_every(
        "the restarted collector to commit clicks",
        Duration::from_secs(30),
        POLL,
        || (collector.metric("affgate_collector_clicks_written_total")? > 0.0).then_some(()),
    );
    let before_edge_kill = load.responses();
    wait_for(
        "more clicks before the edge is killed",
        Duration::from_secs(20),
        || (load.responses() >= before_edge_kill + 300 || load.alive() < threads).then_some(()),
    );
    assert_eq!(
        load.alive(),
        threads,
        "every client is still sending when the edge is killed"
    );
    assert!(
        edge_metric(&first, "affgate_edge_delivery_oversize_datagrams_total") > 0.0,
        "big clicks went as oversize batches before the edge is killed"
    );
    first.kill9();
    let mut sent = load.join();
    let big = big.join().expect("big-click client panicked");
    assert!(
        sent.unexpected.is_empty() && big.unexpected.is_empty(),
        "unexpected answers before the edge kill: {:?} {:?}",
        sent.unexpected,
        big.unexpected
    );
    assert_eq!(
        sent.cut_off, threads,
        "every client was cut off by the kill: {:?}",
        sent.errors
    );
    // The big-click client may have finished before the kill.
    assert!(big.cut_off <= 1, "big clicks: {:?}", big.errors);
    assert!(!big.clicks.is_empty(), "big clicks were answered");
    sent.extend(big);
    let unanswered = sent.cut_off;

    // Same directory, same ring; `first` keeps the temp dir alive.
    let second = EdgeProc::start_in(&first.dir, &opts);
    let more = Traffic::start(
        second.http,
        &TrafficSpec {
            threads,
            ..spec(1_000)
        },
    )
    .join();
    assert_served(&more, "the load on the restarted edge");
    let first_lifetime = sent.clicks.len();
    sent.extend(more);
    assert!(
        sent.clicks.len() > first_lifetime,
        "the restarted edge answered clicks too"
    );

    let ids = assert_exactly_once(&stack, &sent, unanswered, DELIVERED);
    wait_ring_drained(&second.config, DRAINED);
    assert_settled(&stack, &ids);
}

#[test]
fn lossy_duplicating_reordering_path_delivers_exactly_once_udp() {
    lossy_duplicating_reordering_path_delivers_exactly_once(Transport::Udp);
}

#[test]
fn lossy_duplicating_reordering_path_delivers_exactly_once_quic() {
    lossy_duplicating_reordering_path_delivers_exactly_once(Transport::Quic);
}

fn lossy_duplicating_reordering_path_delivers_exactly_once(transport: Transport) {
    let link = DeliveryLink::new(transport);
    let stack = Stack::new(&tag("lossy", &link));
    let (collector, at) = link.start_collector(&stack);
    let relay = Relay::start(
        at,
        RelayOpts {
            drop: 0.2,
            duplicate: 0.1,
            delay: 0.15,
            max_delay: Duration::from_millis(40),
            seed: 0xaff6a7e,
        },
    );
    let edge = EdgeProc::start(&edge_opts(&link, relay.addr, 4));
    let sent = Traffic::start(
        edge.http,
        &TrafficSpec {
            threads: 2,
            pace: Some(Duration::from_millis(2)),
            ..spec(2_000)
        },
    )
    .join();
    assert_served(&sent, "the load");

    // Stay lossy until loss, duplication and delay happened both ways and
    // the edge resent; then stop dropping (duplicates and delays go on) so
    // the tail drains within one capped backoff instead of a long
    // geometric tail of 10 s resends.
    wait_for_every(
        "loss both ways, duplicates, delays and resends",
        Duration::from_secs(30),
        POLL,
        || {
            let c = relay.counts();
            let resent = metric_value(
                &edge.metrics_text(),
                "affgate_edge_delivery_records_resent_total",
            )?;
            (c.dropped_up > 0
                && c.dropped_down > 0
                && c.duplicated > 0
                && c.delayed > 0
                && resent > 0.0)
                .then_some(())
        },
    );
    relay.set_drop(0.0);

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    assert_settled(&stack, &ids);

    let c = relay.counts();
    let resent = edge_metric(&edge, "affgate_edge_delivery_records_resent_total");
    let events = (sent.clicks.len() + sent.postbacks.len()) as f64;
    let entries = collector_metric(&collector, "affgate_collector_entries_total");
    eprintln!("{transport:?} relay: {c:?}, resent {resent}, entries {entries} for {events} events");
    assert!(
        c.dropped_up > 0 && c.dropped_down > 0 && c.duplicated > 0 && c.delayed > 0,
        "the relay really lost, duplicated and delayed datagrams: {c:?}"
    );
    // Over QUIC too: QUIC does not retransmit datagrams, the Outbox does.
    assert!(resent > 0.0, "the edge resent records");
    // Over QUIC the relay's duplicate packets are discarded by QUIC itself;
    // the repeats the collector sees are the Outbox's resends (of batches
    // whose ack, not the batch, was lost).
    assert!(
        entries > events,
        "the collector received some entries more than once ({entries} entries for {events} events)"
    );
}

#[test]
fn spilled_ring_is_delivered_once_the_collector_comes_udp() {
    spilled_ring_is_delivered_once_the_collector_comes(Transport::Udp);
}

#[test]
fn spilled_ring_is_delivered_once_the_collector_comes_quic() {
    spilled_ring_is_delivered_once_the_collector_comes(Transport::Quic);
}

fn spilled_ring_is_delivered_once_the_collector_comes(transport: Transport) {
    let link = DeliveryLink::new(transport);
    let stack = Stack::new(&tag("spill", &link));
    let (mut collector, at) = link.unstarted_collector(&stack);
    let edge = EdgeProc::start(&edge_opts(&link, at, 1));
    // ~800 bytes a record: a 1 MiB ring spills after about 1300 of them.
    let sent = Traffic::start(
        edge.http,
        &TrafficSpec {
            sub1: "s".repeat(250),
            user_agent: format!("delivery-test/{}", "u".repeat(480)),
            ..spec(3_000)
        },
    )
    .join();
    assert_served(&sent, "the load with no collector");
    let events = (sent.clicks.len() + sent.postbacks.len()) as u64;
    assert!(
        inspect_u64(&edge, "spilled_records") > 0,
        "the ring spilled:\n{}",
        edge.inspect(false).text
    );
    assert_eq!(
        inspect_u64(&edge, "unacked_records"),
        events,
        "with no collector every answered event is held, ring and spill"
    );

    let started = Instant::now();
    collector.restart();
    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    let ins = wait_ring_drained(&edge.config, DRAINED);
    eprintln!(
        "delivered and drained {:?} after the collector started",
        started.elapsed()
    );
    assert_settled(&stack, &ids);
    assert_eq!(
        ins.value("spill_bytes").as_deref(),
        Some("0"),
        "the spill files hold no records:\n{}",
        ins.text
    );
}
