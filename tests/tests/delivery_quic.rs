//! Delivery end to end over QUIC, what only QUIC has: batches that do not
//! fit a QUIC datagram go on unidirectional streams. The scenarios both
//! transports share (faults included) are in `delivery.rs`, each run over
//! UDP and over QUIC.
//!
//! Some clicks carry the longest User-Agent, Referer and sub values the
//! edge keeps, so their records do not fit a QUIC datagram. The test ends
//! with: each click id a client received in a 302 is in `clicks FINAL`
//! exactly once and nothing else is there, each distinct postback answered
//! 200 in the inbox once, and the ring drains.

use std::net::SocketAddr;
use std::time::Duration;

use affgate_tests::{
    DeliveryLink, EdgeOpts, EdgeProc, Sent, Stack, Traffic, TrafficSpec, Transport,
    assert_exactly_once, big_clicks, clickhouse_up, metric_value, wait_for, wait_ring_drained,
};

const TOKEN: &str = "quic-network-token";
/// Longest wait for every answered event to reach the stores.
const DELIVERED: Duration = Duration::from_secs(60);
/// Longest wait for the ring to drain once the stores have everything.
const DRAINED: Duration = Duration::from_secs(30);

fn edge_opts(link: &DeliveryLink, collector: SocketAddr) -> EdgeOpts {
    link.edge_opts(
        &[collector],
        EdgeOpts {
            edge_id: 4,
            links_csv: "slug,link_id,destination\nload,92,https://m.example/l?cid={click_id}\n"
                .into(),
            networks_csv: format!("network_id,name,postback_token\n9,Quic,{TOKEN}\n"),
            size_mb: 4,
            ..EdgeOpts::default()
        },
    )
}

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
fn oversize_batches_go_on_streams_and_land_exactly_once_over_quic() {
    wait_for(
        "clickhouse to answer (deploy/services.sh start)",
        Duration::from_secs(60),
        || clickhouse_up().then_some(()),
    );
    let link = DeliveryLink::new(Transport::Quic);
    let stack = Stack::new("quic_oversize");
    let (_collector, at) = link.start_collector(&stack);
    let edge = EdgeProc::start(&edge_opts(&link, at));

    let big = big_clicks(edge.http, 60, Duration::from_millis(5));
    let mut sent = Traffic::start(
        edge.http,
        &TrafficSpec {
            threads: 3,
            max_requests: 3_000,
            token: TOKEN.into(),
            ..TrafficSpec::default()
        },
    )
    .join();
    let big = big.join().expect("big-click client panicked");
    assert_served(&sent, "the load");
    assert_served(&big, "the big clicks");
    assert_eq!(big.clicks.len(), 60, "every big click was answered");
    sent.extend(big);

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    let n: usize = stack
        .ch(&format!("SELECT count() FROM {}.clicks FINAL", stack.name))
        .trim()
        .parse()
        .expect("count() is a number");
    assert_eq!(n, ids.len(), "clicks FINAL changed after the ring drained");
    let oversize = metric_value(
        &edge.metrics_text(),
        "affgate_edge_delivery_oversize_datagrams_total",
    )
    .expect("edge /metrics has affgate_edge_delivery_oversize_datagrams_total");
    assert!(
        oversize >= 60.0,
        "every big click went as an oversize batch (on a stream): {oversize}"
    );
}
