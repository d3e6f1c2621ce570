//! Destination macro expansion against the naive chain of `str::replace`
//! it replaces (parse once at load, expand per click).

use std::hint::black_box;

use affgate_edge::links::{Macros, Template};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const DEST: &str = "https://merchant.example/landing/product?utm_source=aff&click={click_id}&s1={sub1}&s2={sub2}&aff={affiliate_id}&o={offer_id}";

fn bench(c: &mut Criterion) {
    let t = Template::parse(DEST);
    let m = Macros {
        click_id: "AQABm5xYkgAAAAMAAAAATQ0Lq9hB8dFh3S0xRc2Y",
        subs: ["newsletter week 47", "banner&top", "", "", ""],
        link_id: 12345,
        offer_id: 7,
        affiliate_id: 9,
    };
    let mut g = c.benchmark_group("template");
    g.throughput(Throughput::Elements(1));
    let mut out = String::with_capacity(256);
    g.bench_function("expand", |b| {
        b.iter(|| {
            black_box(&t).expand_into(black_box(&m), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("baseline_str_replace", |b| {
        b.iter(|| {
            let s = black_box(DEST)
                .replace("{click_id}", m.click_id)
                .replace("{sub1}", m.subs[0])
                .replace("{sub2}", m.subs[1])
                .replace("{affiliate_id}", &m.affiliate_id.to_string())
                .replace("{offer_id}", &m.offer_id.to_string());
            black_box(s)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
