//! Ring append (the hot path's one write) with the consumer draining and
//! acknowledging behind it, so the ring stays in steady state. Baseline:
//! copying the same bytes into a Vec (the cost of the memcpy alone).

use std::hint::black_box;

use affgate_edge::ring::{Ring, RingConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCH: usize = 1024;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Ring::open(&RingConfig {
        path: dir.path().join("bench.ring"),
        size_bytes: 64 << 20,
        spill_dir: dir.path().join("spill"),
    })
    .expect("open ring");
    let payload = vec![0x5au8; 320]; // a typical encoded click
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("append_then_drain_1024x320B", |b| {
        let mut consumer = ring.consumer().expect("one consumer");
        let mut polled = Vec::with_capacity(BATCH);
        b.iter(|| {
            for _ in 0..BATCH {
                let seq = ring.next_seq();
                black_box(
                    ring.append(seq, 1, 1_763_900_000_000, black_box(&payload))
                        .expect("append"),
                );
            }
            polled.clear();
            while polled.len() < BATCH {
                consumer.poll(BATCH, &mut polled).expect("poll");
            }
            for r in polled.drain(..) {
                consumer.ack(r.loc).expect("ack");
            }
        })
    });
    g.bench_function("baseline_vec_copy_1024x320B", |b| {
        let mut v: Vec<u8> = Vec::with_capacity(BATCH * 352);
        b.iter(|| {
            v.clear();
            for _ in 0..BATCH {
                v.extend_from_slice(black_box(&payload));
            }
            black_box(v.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
