//! Click id mint and verify, and the click event encode, against a baseline
//! that formats the same fields with no MAC (what an unsigned id would cost).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use affgate_schema::click_id::ClickId;
use affgate_schema::event::{ClickRef, encode_click};
use affgate_schema::keys::{KeyRing, Keys, Secret};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let keys = Keys::derive(&Secret::from_bytes([9; 32]));
    let ring = KeyRing::new(keys.clone());
    let id = ClickId::mint(&keys, 3, 1_763_900_000_000, 12345, 77).expect("mint");
    let id_str = id.as_str().to_string();

    let mut g = c.benchmark_group("click_id");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mint", |b| {
        let mut seq = 0u32;
        b.iter(|| {
            seq = seq.wrapping_add(1);
            black_box(ClickId::mint(
                &keys,
                3,
                black_box(1_763_900_000_000),
                12345,
                seq,
            ))
        })
    });
    g.bench_function("verify", |b| {
        b.iter(|| {
            black_box(ClickId::verify(
                black_box(&id_str),
                &ring,
                1_763_900_000_000,
            ))
        })
    });
    g.bench_function("baseline_unsigned_format", |b| {
        let mut seq = 0u32;
        b.iter(|| {
            seq = seq.wrapping_add(1);
            black_box(format!(
                "{:04x}{:012x}{:010x}{:08x}",
                3u16,
                black_box(1_763_900_000_000u64),
                12345u64,
                seq
            ))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("event");
    g.throughput(Throughput::Elements(1));
    let ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";
    let click = ClickRef {
        click_id: id.as_str(),
        ts_ms: 1_763_900_000_000,
        edge_id: 3,
        link_id: 12345,
        offer_id: 7,
        affiliate_id: 9,
        slug: "summer-sale",
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        user_agent: ua,
        referer: "https://news.example/article/42",
        subs: ["newsletter", "", "", "", ""],
        quarantined: false,
        fallback: false,
    };
    let mut buf = Vec::with_capacity(1024);
    g.bench_function("encode_click", |b| {
        b.iter(|| {
            encode_click(black_box(&click), &mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
