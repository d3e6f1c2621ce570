//! The flusher's bookkeeping per record (`flush/outbox.rs`) in steady state:
//! 65,536 records in flight (the default bound), and per iteration 4,096
//! new ones pushed (each a fresh `Record`, as the ring's poll hands them
//! over), every due datagram polled (packed and sealed), and the oldest
//! 4,096 acknowledged in one range. Baseline: what no bookkeeping can
//! avoid, the same payload bytes copied into 1,200-byte datagram bodies
//! and sealed (header + keyed blake3 MAC), no Outbox.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use affgate_edge::flush::outbox::{MAX_IN_FLIGHT, Outbox, OutboxConfig};
use affgate_edge::ring::{Location, Record};
use affgate_schema::affgate_capnp::ack;
use affgate_schema::datagram::{self, Kind};
use affgate_schema::event::{ClickRef, encode_click};
use affgate_schema::keys::{Keys, Secret};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCH: u64 = 4096;
const DATAGRAM: usize = 1200;
const EDGE: u16 = 1;

/// A click event of the size the load harnesses send (about 300 bytes).
fn payload(seq: u64) -> Vec<u8> {
    let click_id = format!("{seq:0>40}");
    let mut out = Vec::new();
    encode_click(
        &ClickRef {
            click_id: &click_id,
            ts_ms: 1_763_900_000_000 + seq,
            edge_id: EDGE,
            link_id: seq % 10_000 + 1,
            offer_id: 2,
            affiliate_id: 3,
            slug: "s1234",
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
            referer: "https://publisher.example/page",
            subs: ["x", "", "", "", ""],
            quarantined: false,
            fallback: false,
        },
        &mut out,
    );
    out
}

/// The payload of `seq`, cycling through the prepared ones.
fn payload_of(seq: u64, payloads: &[Vec<u8>]) -> &[u8] {
    &payloads[(seq % payloads.len() as u64) as usize]
}

fn record(seq: u64, payloads: &[Vec<u8>]) -> Record {
    Record {
        seq,
        kind: affgate_edge::KIND_CLICK,
        ts_ms: 1_763_900_000_000 + seq,
        loc: Location::Ring { pos: seq * 512 },
        payload: payload_of(seq, payloads).to_vec(),
    }
}

fn ack_body(first: u64, last: u64) -> Vec<u8> {
    let mut msg = capnp::message::Builder::new_default();
    let mut a = msg.init_root::<ack::Builder<'_>>();
    a.set_edge_id(EDGE);
    let mut r = a.init_ranges(1).get(0);
    r.set_first(first);
    r.set_last(last);
    let mut out = Vec::new();
    capnp::serialize::write_message(&mut out, &msg).expect("write to a Vec");
    out
}

fn bench(c: &mut Criterion) {
    let keys = Keys::derive(&Secret::from_bytes([9; 32]));
    let payloads: Vec<Vec<u8>> = (0..64).map(payload).collect();
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("push_send_ack_4096_of_65536_in_flight", |b| {
        let mut ob = Outbox::new(OutboxConfig::new(EDGE, 1, DATAGRAM), keys.clone());
        // A synthetic clock, 1 µs per iteration: no resend ever falls due.
        let t0 = Instant::now();
        let mut next = 1u64;
        let mut oldest = 1u64;
        while next <= MAX_IN_FLIGHT as u64 {
            ob.push(record(next, &payloads), t0).expect("a valid event");
            next += 1;
        }
        while ob.poll_datagram(t0).is_some() {}
        let mut tick = 0u64;
        b.iter(|| {
            tick += 1;
            let now = t0 + Duration::from_micros(tick);
            for _ in 0..BATCH {
                ob.push(record(next, &payloads), now)
                    .expect("a valid event");
                next += 1;
            }
            while let Some(d) = ob.poll_datagram(now) {
                black_box(d.bytes.len());
            }
            let locs = ob
                .on_ack(0, &ack_body(oldest, oldest + BATCH - 1), now)
                .expect("a valid ack");
            assert_eq!(locs.len() as u64, BATCH);
            oldest += BATCH;
        })
    });
    g.bench_function("baseline_copy_and_seal_4096", |b| {
        let mut body = Vec::with_capacity(DATAGRAM);
        let mut sealed = Vec::with_capacity(DATAGRAM + 64);
        let mut nonce = 0u64;
        let mut seq = 0u64;
        b.iter(|| {
            body.clear();
            for _ in 0..BATCH {
                let p = payload_of(seq, &payloads);
                seq += 1;
                if body.len() + p.len() > DATAGRAM - 64 {
                    datagram::seal(&keys, Kind::Batch, EDGE, nonce, &body, &mut sealed);
                    black_box(sealed.len());
                    nonce += 1;
                    body.clear();
                }
                body.extend_from_slice(black_box(p));
            }
            datagram::seal(&keys, Kind::Batch, EDGE, nonce, &body, &mut sealed);
            black_box(sealed.len());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
