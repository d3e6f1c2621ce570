//! Delivery end to end over QUIC: the checks of `delivery.rs` with
//! `[delivery] transport = "quic"`. A certificate for `affgate-collector`
//! is made with `openssl` into a temp dir (as docs/delivery.md tells an
//! operator to); the collector serves QUIC on a port of its own (kept
//! across restarts), the edge trusts that certificate.
//!
//! Some clicks carry the longest User-Agent, Referer and sub values the
//! edge keeps, so their records do not fit a QUIC datagram: those batches
//! go on unidirectional streams. The fault: the collector killed with
//! SIGKILL mid-stream and restarted on the same address (the edge's old
//! connection dies, at the latest by its 10 s idle timeout, and the edge
//! dials again).
//!
//! Every test ends with: each click id a client received in a 302 is in
//! `clicks FINAL` exactly once and nothing else is there, each distinct
//! postback answered 200 in the inbox once, and the ring drains.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use affgate_tests::{
    Client, CollectorOpts, CollectorProc, EdgeOpts, EdgeProc, Sent, Stack, Traffic, TrafficSpec,
    assert_exactly_once, click_id_in, clickhouse_up, enc, free_udp_port, metric_value, wait_for,
    wait_for_every, wait_ring_drained,
};

const TOKEN: &str = "quic-network-token";
/// Longest wait for every answered event to reach the stores.
const DELIVERED: Duration = Duration::from_secs(60);
/// Longest wait for the ring to drain once the stores have everything.
const DRAINED: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// One test at a time: each runs an edge, a collector and client threads.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A self-signed end-entity certificate for `affgate-collector` and its key.
fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("collector.pem"), dir.join("collector.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=affgate-collector"])
        .args(["-addext", "subjectAltName=DNS:affgate-collector"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A collector serving QUIC (and the harness's UDP, unused here) on `stack`.
fn quic_collector(stack: &Stack, cert: &Path, key: &Path) -> (CollectorProc, SocketAddr) {
    let quic: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("a socket address");
    let opts = CollectorOpts {
        env: vec![
            ("AFFGATE_INGEST_QUIC_LISTEN".into(), quic.to_string()),
            (
                "AFFGATE_INGEST_QUIC_CERT".into(),
                cert.display().to_string(),
            ),
            ("AFFGATE_INGEST_QUIC_KEY".into(), key.display().to_string()),
        ],
        ..CollectorOpts::default()
    };
    (CollectorProc::start_with(stack, &opts), quic)
}

fn edge_opts(collector: SocketAddr, ca: &Path) -> EdgeOpts {
    EdgeOpts {
        edge_id: 4,
        links_csv: "slug,link_id,destination\nload,92,https://m.example/l?cid={click_id}\n".into(),
        networks_csv: format!("network_id,name,postback_token\n9,Quic,{TOKEN}\n"),
        size_mb: 4,
        env: vec![
            ("AFFGATE_DELIVERY_TRANSPORT".into(), "quic".into()),
            ("AFFGATE_DELIVERY_QUIC_CA".into(), ca.display().to_string()),
            (
                "AFFGATE_DELIVERY_COLLECTORS".into(),
                format!("[\"{collector}\"]"),
            ),
        ],
        ..EdgeOpts::default()
    }
}

fn spec(max_requests: u64) -> TrafficSpec {
    TrafficSpec {
        threads: 3,
        max_requests,
        token: TOKEN.into(),
        ..TrafficSpec::default()
    }
}

/// One keep-alive client sending `n` clicks whose records are as large as
/// the edge makes them (five 256-byte subs, 512-byte User-Agent, 1 KiB
/// Referer): each is an oversize batch of its own. Paced so the kills of a
/// test fall among them.
fn big_clicks(addr: SocketAddr, n: usize, pace: Duration) -> JoinHandle<Sent> {
    std::thread::spawn(move || {
        let pad = |c: char, len: usize| std::iter::repeat_n(c, len).collect::<String>();
        let subs: String = (1..=5)
            .map(|i| format!("sub{i}={}", enc(&pad(char::from(b'a' + i), 256))))
            .collect::<Vec<_>>()
            .join("&");
        let ua = format!("Mozilla/5.0 {}", pad('u', 600));
        let referer = format!("https://ref.example/{}", pad('r', 1100));
        let mut sent = Sent::default();
        let mut client = Client::connect(addr);
        for i in 0..n {
            let target = format!("/c/load?{subs}&n={i}");
            let headers = [("User-Agent", ua.as_str()), ("Referer", referer.as_str())];
            match client.try_request("GET", &target, &headers, b"") {
                Ok(r) => match (r.status == 302)
                    .then(|| r.header("location").and_then(click_id_in))
                    .flatten()
                {
                    Some(cid) => sent.clicks.push(cid),
                    None => sent.unexpected.push(format!("big click {}", r.status)),
                },
                Err(e) => {
                    sent.cut_off += 1;
                    sent.errors.push(e.to_string());
                    return sent;
                }
            }
            std::thread::sleep(pace);
        }
        sent
    })
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

fn edge_metric(e: &EdgeProc, name: &str) -> f64 {
    metric_value(&e.metrics_text(), name).unwrap_or_else(|| panic!("edge /metrics has no `{name}`"))
}

/// After the ring drained: `count() FINAL` equals the click ids found.
fn assert_settled(stack: &Stack, ids: &[String]) {
    let n: usize = stack
        .ch(&format!("SELECT count() FROM {}.clicks FINAL", stack.name))
        .trim()
        .parse()
        .expect("count() is a number");
    assert_eq!(n, ids.len(), "clicks FINAL changed after the ring drained");
}

fn services() {
    wait_for(
        "clickhouse to answer (deploy/services.sh start)",
        Duration::from_secs(60),
        || clickhouse_up().then_some(()),
    );
}

#[test]
fn every_answered_event_lands_exactly_once_over_quic() {
    let _g = heavy();
    services();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path());
    let stack = Stack::new("quic_happy");
    let (collector, quic) = quic_collector(&stack, &cert, &key);
    let edge = EdgeProc::start(&edge_opts(quic, &cert));

    let big = big_clicks(edge.http, 60, Duration::from_millis(5));
    let mut sent = Traffic::start(edge.http, &spec(3_000)).join();
    let big = big.join().expect("big-click client panicked");
    assert_served(&sent, "the load");
    assert_served(&big, "the big clicks");
    sent.extend(big);

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    assert_settled(&stack, &ids);
    assert!(
        edge_metric(&edge, "affgate_edge_delivery_oversize_datagrams_total") >= 60.0,
        "every big click went as an oversize batch (on a stream)"
    );
    drop(collector);
}

#[test]
fn collector_killed_mid_stream_over_quic_loses_and_doubles_nothing() {
    let _g = heavy();
    services();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(tmp.path());
    let stack = Stack::new("quic_kill");
    let (mut collector, quic) = quic_collector(&stack, &cert, &key);
    let edge = EdgeProc::start(&edge_opts(quic, &cert));
    let threads = 3;
    let load = Traffic::start(
        edge.http,
        &TrafficSpec {
            max_requests: 20_000,
            max_time: Duration::from_secs(40),
            // Paced so the load outlasts the kill below (bounded anyway).
            pace: Some(Duration::from_millis(2)),
            ..spec(0)
        },
    );
    let big = big_clicks(edge.http, 150, Duration::from_millis(40));

    let written = |c: &CollectorProc| c.metric("affgate_collector_clicks_written_total");
    wait_for_every(
        "the first collector to commit clicks",
        Duration::from_secs(20),
        POLL,
        || (written(&collector)? > 0.0).then_some(()),
    );
    assert_eq!(
        load.alive(),
        threads,
        "the clients are sending when the collector is killed"
    );
    collector.kill9();
    let at_kill = load.responses();
    wait_for(
        "clicks answered while the collector is down",
        Duration::from_secs(20),
        || (load.responses() >= at_kill + 300 || load.alive() < threads).then_some(()),
    );
    collector.restart();
    wait_for_every(
        "the restarted collector to commit clicks",
        Duration::from_secs(30),
        POLL,
        || (written(&collector)? > 0.0).then_some(()),
    );
    let after = load.responses();
    wait_for(
        "clicks answered by the restarted collector's edge",
        Duration::from_secs(20),
        || (load.responses() >= after + 300 || load.alive() < threads).then_some(()),
    );
    load.stop();
    let mut sent = load.join();
    let big = big.join().expect("big-click client panicked");
    assert_served(&sent, "the load");
    assert_served(&big, "the big clicks");
    sent.extend(big);

    let ids = assert_exactly_once(&stack, &sent, 0, DELIVERED);
    wait_ring_drained(&edge.config, DRAINED);
    assert_settled(&stack, &ids);
    assert!(
        edge_metric(&edge, "affgate_edge_delivery_oversize_datagrams_total") >= 150.0,
        "every big click went as an oversize batch (on a stream)"
    );
}
