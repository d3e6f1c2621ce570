//! The ring against a model, and under concurrent load.
//!
//! - `ring_matches_a_vecdeque_model`: random appends (tiny to larger than
//!   the ring, so it wraps and spills), polls, out-of-order acks, new
//!   consumers and reopens; after every step the ring and a `VecDeque` of
//!   unacked records agree on what is unacked, its payloads and the stats.
//! - `concurrent_appends_are_each_polled_once`: 4 writer threads and a
//!   consumer acking out of order through a small ring that spills.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{Consumer, Location, Placement, Ring, RingStats, Tuning, test_cfg};

const CAP: u64 = 4096;

fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Poll(usize),
    /// Ack the i-th (mod count) polled, unacked record.
    Ack(usize),
    AckAll,
    NewConsumer,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        6 => 0usize..300,
        2 => 300usize..1500,
        1 => (CAP as usize - 200)..=(CAP as usize - 48), // near capacity: fits only an empty lap
        1 => (CAP as usize)..(CAP as usize + 100),        // never fits: always spills
    ];
    prop_oneof![
        8 => len.prop_map(Op::Append),
        4 => (1usize..8).prop_map(Op::Poll),
        4 => (0usize..64).prop_map(Op::Ack),
        1 => Just(Op::AckAll),
        1 => Just(Op::NewConsumer),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    /// Unacked records in append order: (seq, payload, placement).
    unacked: VecDeque<(u64, Vec<u8>, Placement)>,
}

impl Model {
    fn check_stats(&self, s: &RingStats, spilled_since_open: u64) {
        assert_eq!(
            s.unacked_records,
            self.unacked.len() as u64,
            "unacked count: {s:?}"
        );
        let spilled = self
            .unacked
            .iter()
            .filter(|r| r.2 == Placement::Spilled)
            .count() as u64;
        assert_eq!(s.spilled_records, spilled, "spilled unacked: {s:?}");
        assert_eq!(s.spilled_total, spilled_since_open, "spill counter: {s:?}");
        assert_eq!(
            s.oldest_unacked_seq,
            self.unacked.front().map(|r| r.0),
            "oldest seq: {s:?}"
        );
        assert_eq!(
            s.oldest_unacked_ts_ms,
            self.unacked.front().map(|r| r.0 * 10),
            "oldest ts: {s:?}"
        );
        assert!(s.used_bytes <= s.capacity_bytes, "{s:?}");
        assert_eq!(s.capacity_bytes, CAP);
        if spilled == 0 {
            assert_eq!(s.spill_bytes, 0, "fully acked segments are deleted: {s:?}");
        }
    }
}

/// Ack `held[i]` on the ring and in the model.
fn ack(c: &mut Consumer<'_>, model: &mut Model, held: &mut Vec<(u64, Location)>, i: usize) {
    let (seq, loc) = held.swap_remove(i);
    c.ack(loc).expect("ack");
    let at = model
        .unacked
        .iter()
        .position(|r| r.0 == seq)
        .expect("acked record is in the model");
    model.unacked.remove(at);
}

/// On a fresh consumer: every unacked record is polled once, and acking
/// them all leaves an empty ring and spill directory.
fn drain(ring: &Ring, model: &Model) {
    let mut c = ring.consumer().expect("consumer");
    let mut out = Vec::new();
    while c.poll(7, &mut out).expect("poll") > 0 {}
    let mut got: Vec<u64> = out.iter().map(|r| r.seq).collect();
    got.sort_unstable();
    let want: Vec<u64> = model.unacked.iter().map(|r| r.0).collect();
    assert_eq!(got, want, "drain polls exactly the unacked records");
    for r in &out {
        c.ack(r.loc).expect("ack");
    }
    let s = ring.stats();
    assert_eq!(
        (s.unacked_records, s.used_bytes, s.spill_bytes),
        (0, 0, 0),
        "{s:?}"
    );
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_cfg(dir.path(), CAP);
    let tuning = Tuning {
        spill_segment_bytes: 3000,
    };
    let mut model = Model {
        unacked: VecDeque::new(),
    };
    let mut ops = ops.into_iter();
    'reopen: loop {
        let ring = Ring::open_tuned(&cfg, tuning).expect("open");
        let rec = ring.recovery();
        assert_eq!(
            rec.unacked_records + rec.spill.unacked_records,
            model.unacked.len() as u64,
            "recovery finds every unacked record: {rec:?}"
        );
        assert_eq!(
            (rec.discarded_uncommitted, rec.discarded_corrupt),
            (0, 0),
            "clean shutdowns discard nothing"
        );
        let mut spilled_since_open = 0;
        model.check_stats(&ring.stats(), spilled_since_open);
        'consumer: loop {
            let mut c = ring.consumer().expect("consumer");
            // Polled by this consumer: all of them, and those not yet acked.
            let mut seen: HashSet<u64> = HashSet::new();
            let mut held: Vec<(u64, Location)> = Vec::new();
            loop {
                let Some(op) = ops.next() else {
                    drop(c);
                    drain(&ring, &model);
                    return;
                };
                match op {
                    Op::Append(len) => {
                        let seq = ring.next_seq();
                        let p = payload(seq, len);
                        let placed = ring
                            .append(seq, (seq % 2 + 1) as u8, seq * 10, &p)
                            .expect("append");
                        if placed == Placement::Spilled {
                            spilled_since_open += 1;
                        }
                        model.unacked.push_back((seq, p, placed));
                    }
                    Op::Poll(max) => {
                        let mut out = Vec::new();
                        let n = c.poll(max, &mut out).expect("poll");
                        assert_eq!(n, out.len());
                        assert!(n <= max);
                        for r in out {
                            assert!(
                                seen.insert(r.seq),
                                "seq {} polled twice by one consumer",
                                r.seq
                            );
                            let m = model
                                .unacked
                                .iter()
                                .find(|m| m.0 == r.seq)
                                .expect("polled record is unacked");
                            assert_eq!(r.payload, m.1, "payload of seq {}", r.seq);
                            assert_eq!((r.kind, r.ts_ms), ((r.seq % 2 + 1) as u8, r.seq * 10));
                            let in_spill = matches!(r.loc, Location::Spill { .. });
                            assert_eq!(
                                in_spill,
                                m.2 == Placement::Spilled,
                                "location of seq {}",
                                r.seq
                            );
                            held.push((r.seq, r.loc));
                        }
                        if n < max {
                            let missing: Vec<u64> = model
                                .unacked
                                .iter()
                                .map(|m| m.0)
                                .filter(|s| !seen.contains(s))
                                .collect();
                            assert!(
                                missing.is_empty(),
                                "a short poll leaves nothing behind: {missing:?}"
                            );
                        }
                    }
                    Op::Ack(i) => {
                        if !held.is_empty() {
                            let i = i % held.len();
                            ack(&mut c, &mut model, &mut held, i);
                        }
                    }
                    Op::AckAll => {
                        while !held.is_empty() {
                            let i = held.len() / 2;
                            ack(&mut c, &mut model, &mut held, i);
                        }
                    }
                    Op::NewConsumer => {
                        drop(c);
                        model.check_stats(&ring.stats(), spilled_since_open);
                        continue 'consumer;
                    }
                    Op::Reopen => {
                        drop(c);
                        drop(ring);
                        continue 'reopen;
                    }
                }
                model.check_stats(&ring.stats(), spilled_since_open);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ring_matches_a_vecdeque_model(ops in prop::collection::vec(op(), 1..200)) {
        run(ops);
    }
}

#[test]
fn model_regression_wrap_spill_reopen() {
    // A fixed sequence that wraps, spills, rotates segments, reopens with
    // records in both places, and drains.
    let mut ops = Vec::new();
    for i in 0..30 {
        ops.push(Op::Append(100 + i * 37));
    }
    ops.extend([
        Op::Poll(5),
        Op::Ack(3),
        Op::Ack(0),
        Op::Reopen,
        Op::Poll(7),
        Op::Ack(6),
        Op::AckAll,
    ]);
    for i in 0..30 {
        ops.push(Op::Append(4000 - i * 100));
        ops.push(Op::Poll(2));
        ops.push(Op::Ack(i));
    }
    ops.extend([Op::NewConsumer, Op::Poll(3), Op::Reopen]);
    run(ops);
}

#[test]
fn concurrent_appends_are_each_polled_once() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 20_000;
    let total = THREADS * PER_THREAD;
    let len_of = |seq: u64| 150 + (seq * 7919 % 551) as usize;

    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Arc::new(
        Ring::open_tuned(
            &test_cfg(dir.path(), 64 * 1024),
            Tuning {
                spill_segment_bytes: 256 * 1024,
            },
        )
        .expect("open"),
    );
    let consumer = {
        let ring = Arc::clone(&ring);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut c = ring.consumer().expect("consumer");
            let mut seen: HashMap<u64, ()> = HashMap::with_capacity(total as usize);
            let mut out = Vec::new();
            let mut batch = 0u64;
            while (seen.len() as u64) < total {
                assert!(
                    Instant::now() < deadline,
                    "consumer saw {} of {total} before the deadline",
                    seen.len()
                );
                out.clear();
                if c.poll(512, &mut out).expect("poll") == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                for r in &out {
                    assert!(
                        seen.insert(r.seq, ()).is_none(),
                        "seq {} polled twice",
                        r.seq
                    );
                    assert_eq!(
                        r.payload,
                        payload(r.seq, len_of(r.seq)),
                        "payload of seq {}",
                        r.seq
                    );
                }
                // Ack out of order: alternate batches are acked back to front.
                batch += 1;
                if batch.is_multiple_of(2) {
                    out.reverse();
                }
                for r in &out {
                    c.ack(r.loc).expect("ack");
                }
            }
            let mut extra = Vec::new();
            assert_eq!(
                c.poll(10, &mut extra).expect("poll"),
                0,
                "nothing beyond what was appended"
            );
            seen.len() as u64
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|_| {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                let mut spilled = 0u64;
                for _ in 0..PER_THREAD {
                    let seq = ring.next_seq();
                    if ring
                        .append(seq, 1, seq, &payload(seq, len_of(seq)))
                        .expect("append")
                        == Placement::Spilled
                    {
                        spilled += 1;
                    }
                }
                spilled
            })
        })
        .collect();
    let spilled: u64 = writers
        .into_iter()
        .map(|w| w.join().expect("writer thread"))
        .sum();
    assert_eq!(consumer.join().expect("consumer thread"), total);
    let s = ring.stats();
    assert_eq!(s.spilled_total, spilled);
    assert_eq!(
        (
            s.unacked_records,
            s.used_bytes,
            s.spilled_records,
            s.spill_bytes
        ),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.next_seq, total + 1);
}
