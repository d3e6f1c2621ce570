//! Postback parse and validation (aliases, duplicates, click id MAC,
//! decimal) against a baseline that only splits the query into a HashMap.

use std::collections::HashMap;
use std::hint::black_box;

use affgate_edge::http::postback::parse;
use affgate_schema::click_id::ClickId;
use affgate_schema::keys::{KeyRing, Keys, Secret};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let keys = Keys::derive(&Secret::from_bytes([9; 32]));
    let ring = KeyRing::new(keys.clone());
    let id = ClickId::mint(&keys, 3, 1_763_900_000_000, 12345, 77).expect("mint");
    let query = format!(
        "clickid={}&order_id=ORD-2026-000123&status=approved&payout=12.50&currency=eur&token=net-7-postback-token&aff_sub=x",
        id.as_str()
    );
    let mut g = c.benchmark_group("postback");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_validate", |b| {
        b.iter(|| {
            black_box(parse(
                black_box(query.as_bytes()),
                b"",
                &ring,
                1_763_900_000_000,
            ))
        })
    });
    g.bench_function("baseline_split_to_hashmap", |b| {
        b.iter(|| {
            let m: HashMap<String, String> = form_urlencoded::parse(black_box(query.as_bytes()))
                .into_owned()
                .collect();
            black_box(m)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
