//! The fault test of the ring: `kill -9` the edge while four clients send
//! clicks and postbacks as fast as they can, then read the ring with
//! `ring inspect --records`. Every click id a visitor received in a 302,
//! and every postback answered 200, must be in the ring exactly once: the
//! edge appends before it answers, and the ring survives the process.
//!
//! Variants: a ring small enough to spill to disk before the kill; and a
//! restart on the same directory, whose new click ids must be new.
//!
//! The loads are bounded (20k requests or 30 s) and the tests in this file
//! run one at a time so they do not starve each other on a 2-core runner.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use affgate_schema::click_id::{ClickId, ClickIdFields};
use affgate_schema::keys::KeyRing;
use affgate_tests::{Client, EdgeOpts, EdgeProc, Inspect, click_id_in, keys, wait_for};

const TOKEN: &str = "crash-network-token";
const THREADS: usize = 4;
const MAX_REQUESTS: u64 = 20_000;
const MAX_TIME: Duration = Duration::from_secs(30);
/// Responses to see before the kill.
const BEFORE_KILL: u64 = 2_000;
const LINK_ID: u64 = 77;

/// One crash test at a time: each runs four client threads and an edge.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn opts(size_mb: u64) -> EdgeOpts {
    EdgeOpts {
        links_csv: format!(
            "slug,link_id,destination\nload,{LINK_ID},https://m.example/l?cid={{click_id}}\n"
        ),
        networks_csv: format!("network_id,name,postback_token\n5,Crash,{TOKEN}\n"),
        size_mb,
        ..EdgeOpts::default()
    }
}

// ---------------------------------------------------------------- load

#[derive(Debug, Clone, Default)]
struct Spec {
    /// Every n-th request of a thread is a postback for its last click (0: none).
    postback_every: u64,
    /// Padding carried by each click record (sub1, User-Agent): fills a small ring fast.
    sub1: String,
    user_agent: String,
    /// Stop after this many responses in all (at most MAX_REQUESTS).
    max_requests: u64,
}

/// What one client thread saw.
#[derive(Debug, Default)]
struct Seen {
    clicks: Vec<String>,
    /// (click id, txid) of every postback answered 200.
    postbacks: Vec<(String, String)>,
    /// Statuses other than 302 for a click and 200 for a postback.
    unexpected: Vec<String>,
    /// The I/O error that ended the thread (the kill), if any.
    ended_by: Option<String>,
}

#[derive(Debug)]
struct Load {
    responses: Arc<AtomicU64>,
    alive: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Seen>>,
}

impl Load {
    fn start(addr: SocketAddr, spec: &Spec) -> Load {
        let responses = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicUsize::new(THREADS));
        let started = Instant::now();
        let threads = (0..THREADS)
            .map(|i| {
                let (responses, alive, spec) = (responses.clone(), alive.clone(), spec.clone());
                std::thread::spawn(move || {
                    let seen = client_loop(i, addr, &spec, &responses, started);
                    alive.fetch_sub(1, Ordering::SeqCst);
                    seen
                })
            })
            .collect();
        Load {
            responses,
            alive,
            threads,
        }
    }

    fn responses(&self) -> u64 {
        self.responses.load(Ordering::SeqCst)
    }

    fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    fn join(self) -> Vec<Seen> {
        self.threads
            .into_iter()
            .map(|t| t.join().expect("client thread panicked"))
            .collect()
    }
}

fn client_loop(
    i: usize,
    addr: SocketAddr,
    spec: &Spec,
    responses: &AtomicU64,
    started: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let mut client = match Client::try_connect(addr) {
        Ok(c) => c,
        Err(e) => {
            seen.ended_by = Some(format!("connect: {e}"));
            return seen;
        }
    };
    let click_target = if spec.sub1.is_empty() {
        "/c/load".to_string()
    } else {
        format!("/c/load?sub1={}", spec.sub1)
    };
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if !spec.user_agent.is_empty() {
        headers.push(("User-Agent", &spec.user_agent));
    }
    let max = spec.max_requests.min(MAX_REQUESTS);
    let mut n = 0u64;
    while responses.load(Ordering::SeqCst) < max && started.elapsed() < MAX_TIME {
        n += 1;
        let last = seen.clicks.last().cloned();
        match last {
            Some(cid) if spec.postback_every > 0 && n.is_multiple_of(spec.postback_every) => {
                let txid = format!("t{i}-{n}");
                let target = format!("/postback?click_id={cid}&txid={txid}&token={TOKEN}");
                match client.try_request("GET", &target, &[], b"") {
                    Ok(r) => {
                        responses.fetch_add(1, Ordering::SeqCst);
                        if r.status == 200 {
                            seen.postbacks.push((cid, txid));
                        } else {
                            seen.unexpected.push(format!(
                                "postback {}: {}",
                                r.status,
                                r.body_str()
                            ));
                        }
                    }
                    Err(e) => {
                        seen.ended_by = Some(e.to_string());
                        break;
                    }
                }
            }
            _ => match client.try_request("GET", &click_target, &headers, b"") {
                Ok(r) => {
                    responses.fetch_add(1, Ordering::SeqCst);
                    let cid = (r.status == 302)
                        .then(|| r.header("location").and_then(click_id_in))
                        .flatten();
                    match cid {
                        Some(cid) => seen.clicks.push(cid),
                        None => seen.unexpected.push(format!(
                            "click {} {:?}",
                            r.status,
                            r.header("location")
                        )),
                    }
                }
                Err(e) => {
                    seen.ended_by = Some(e.to_string());
                    break;
                }
            },
        }
    }
    seen
}

/// Run the load until `ready` holds (at least BEFORE_KILL responses first),
/// kill -9 the edge while every client is still sending, and collect.
fn load_then_kill(e: &mut EdgeProc, spec: &Spec, ready: impl Fn(&EdgeProc) -> bool) -> Vec<Seen> {
    let load = Load::start(e.http, spec);
    wait_for(
        "the load to reach its mark before the kill",
        MAX_TIME,
        || (load.alive() < THREADS || (load.responses() >= BEFORE_KILL && ready(e))).then_some(()),
    );
    assert_eq!(
        load.alive(),
        THREADS,
        "every client must still be sending when the edge is killed (responses so far: {})",
        load.responses()
    );
    e.kill9();
    let seen = load.join();
    assert!(
        seen.iter().all(|s| s.ended_by.is_some()),
        "every client was cut off by the kill, mid-load: {:?}",
        seen.iter().map(|s| &s.ended_by).collect::<Vec<_>>()
    );
    for s in &seen {
        assert!(
            s.unexpected.is_empty(),
            "unexpected answers before the kill: {:?}",
            s.unexpected
        );
    }
    seen
}

// ---------------------------------------------------------------- checks

fn verify(cid: &str) -> ClickIdFields {
    let ring = KeyRing::new(keys());
    match ClickId::verify(cid, &ring, affgate_edge::http::now_ms()) {
        Ok((_, f)) => f,
        Err(e) => panic!("click id `{cid}` does not verify: {e}"),
    }
}

/// Every click id and every 200-answered postback in `seen` is in the ring
/// exactly once; every click id in the ring verifies.
fn assert_all_in_ring(ins: &Inspect, seen: &[Seen]) {
    let mut seqs = HashSet::new();
    for r in &ins.records {
        assert!(
            seqs.insert(r.seq),
            "seq {} appears twice in the ring",
            r.seq
        );
        assert_ne!(
            r.kind, "undecodable",
            "an undecodable record after the crash: seq {} {}",
            r.seq, r.click_id
        );
    }
    let mut clicks: HashMap<&str, usize> = HashMap::new();
    for r in ins.records.iter().filter(|r| r.kind == "click") {
        *clicks.entry(r.click_id.as_str()).or_default() += 1;
        let f = verify(&r.click_id);
        assert_eq!(
            f.link_id, LINK_ID,
            "ring click {} carries the link id",
            r.click_id
        );
        assert_eq!(
            r.link_id,
            LINK_ID.to_string(),
            "ring record's link_id column"
        );
        assert_eq!(
            u64::from(f.seq),
            r.seq,
            "the click id's seq is its record's seq"
        );
    }
    let mut postbacks: HashMap<(&str, &str), usize> = HashMap::new();
    for r in ins.records.iter().filter(|r| r.kind == "postback") {
        *postbacks
            .entry((r.click_id.as_str(), r.txid.as_str()))
            .or_default() += 1;
    }
    let (mut n_clicks, mut n_postbacks) = (0, 0);
    for s in seen {
        for cid in &s.clicks {
            verify(cid);
            let n = clicks.get(cid.as_str()).copied().unwrap_or(0);
            assert_eq!(
                n, 1,
                "click id {cid} was answered in a 302; the ring holds it {n} times"
            );
            n_clicks += 1;
        }
        for (cid, txid) in &s.postbacks {
            let n = postbacks
                .get(&(cid.as_str(), txid.as_str()))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                n, 1,
                "postback {cid}/{txid} was answered 200; the ring holds it {n} times"
            );
            n_postbacks += 1;
        }
    }
    assert!(n_clicks > 0, "the load recorded clicks");
    eprintln!(
        "ring holds {} records; {} answered clicks and {} answered postbacks all found",
        ins.records.len(),
        n_clicks,
        n_postbacks
    );
}

fn inspect_u64(ins: &Inspect, key: &str) -> u64 {
    ins.value(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{key}:` in ring inspect:\n{}", ins.text))
}

fn metric(e: &EdgeProc, name: &str) -> Option<f64> {
    e.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn spec() -> Spec {
    Spec {
        postback_every: 7,
        max_requests: MAX_REQUESTS,
        ..Spec::default()
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn kill9_under_load_loses_no_answered_click_or_postback() {
    let _g = heavy();
    let mut e = EdgeProc::start(&opts(4));
    let seen = load_then_kill(&mut e, &spec(), |_| true);
    assert!(
        seen.iter().map(|s| s.postbacks.len()).sum::<usize>() > 0,
        "postbacks were mixed in"
    );
    let ins = e.inspect(true);
    assert_all_in_ring(&ins, &seen);
    assert_eq!(
        inspect_u64(&ins, "unacked_records"),
        ins.records.len() as u64,
        "no collector: every record is unacknowledged and listed"
    );
}

#[test]
fn kill9_after_the_ring_spilled_loses_nothing() {
    let _g = heavy();
    let mut e = EdgeProc::start(&opts(1));
    // ~800 bytes a record: a 1 MiB ring spills after about a thousand clicks.
    let spec = Spec {
        sub1: "s".repeat(250),
        user_agent: format!("crash-test/{}", "u".repeat(480)),
        ..spec()
    };
    let seen = load_then_kill(&mut e, &spec, |e| {
        metric(e, "affgate_edge_spilled_records_total").unwrap_or(0.0) > 0.0
    });
    let ins = e.inspect(true);
    assert!(
        inspect_u64(&ins, "spilled_records") > 0,
        "the ring spilled before the kill:\n{}",
        ins.text
    );
    let spilled = ins.records.iter().filter(|r| r.place == "spill").count();
    assert!(spilled > 0, "some records are listed from spill files");
    assert!(
        ins.records.iter().any(|r| r.place == "ring"),
        "and some from the ring"
    );
    eprintln!(
        "{spilled} of {} records listed from spill files",
        ins.records.len()
    );
    assert_all_in_ring(&ins, &seen);
}

#[test]
fn restart_after_kill9_keeps_old_records_and_mints_new_ids() {
    let _g = heavy();
    let opts = opts(4);
    let mut first = EdgeProc::start(&opts);
    let old = load_then_kill(&mut first, &spec(), |_| true);
    let before = first.inspect(true);
    assert_all_in_ring(&before, &old);
    let next_seq_before = inspect_u64(&before, "next_seq");
    let max_old_seq = before
        .records
        .iter()
        .map(|r| r.seq)
        .max()
        .expect("records before the restart");
    assert!(
        next_seq_before > max_old_seq,
        "next_seq {next_seq_before} is past every recorded seq {max_old_seq}"
    );

    // Same directory, same ring; `first` keeps the temp dir alive.
    let mut second = EdgeProc::start_in(&first.dir, &opts);
    assert_eq!(
        second.get("/readyz").status,
        200,
        "the restarted edge is ready"
    );
    let load = Load::start(
        second.http,
        &Spec {
            max_requests: 1_000,
            ..spec()
        },
    );
    wait_for(
        "the second load to finish",
        MAX_TIME + Duration::from_secs(10),
        || (load.alive() == 0).then_some(()),
    );
    let new = load.join();
    for s in &new {
        assert!(
            s.ended_by.is_none(),
            "the restarted edge served the whole load: {:?}",
            s.ended_by
        );
        assert!(
            s.unexpected.is_empty(),
            "unexpected answers after the restart: {:?}",
            s.unexpected
        );
    }
    assert!(
        second.terminate().success(),
        "the restarted edge exits 0 on SIGTERM"
    );

    let old_ids: HashSet<String> = before.click_ids();
    let mut new_count = 0u64;
    for cid in new.iter().flat_map(|s| &s.clicks) {
        assert!(
            !old_ids.contains(cid),
            "click id {cid} was minted before the crash too"
        );
        let seq = u64::from(verify(cid).seq);
        assert!(
            seq > max_old_seq,
            "new click id {cid} has seq {seq}, not past the old {max_old_seq}"
        );
        new_count += 1;
    }
    assert!(new_count > 0, "the second load recorded clicks");

    let after = first.inspect(true);
    let all: Vec<Seen> = old.into_iter().chain(new).collect();
    assert_all_in_ring(&after, &all);
    let next_seq_after = inspect_u64(&after, "next_seq");
    assert!(
        next_seq_after >= next_seq_before + new_count,
        "next_seq kept growing: {next_seq_before} before, {next_seq_after} after {new_count} new clicks"
    );
}
