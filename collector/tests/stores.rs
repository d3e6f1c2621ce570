//! The migrations and the store writers against real ClickHouse and
//! PostgreSQL, as `deploy/services.sh start` leaves them:
//! ClickHouse at `AFFGATE_TEST_CLICKHOUSE_URL` (default
//! `http://127.0.0.1:8123`), PostgreSQL at `AFFGATE_TEST_POSTGRES_URL`
//! (default `postgres://affgate:affgate@127.0.0.1:5432/affgate`, a role
//! allowed to create databases).
//!
//! Each test works in a ClickHouse database and a PostgreSQL database of its
//! own, named with a random suffix, and drops both when it ends, failed or
//! not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use affgate_collector::config::{ClickHouseConfig, PostgresConfig};
use affgate_collector::conversions::Processor;
use affgate_collector::conversions::mirror::Mirror;
use affgate_collector::migrate;
use affgate_collector::store::clickhouse::{ClickStore, client};
use affgate_collector::store::postgres::{Inbox, pool};
use affgate_collector::store::{Store, StoreError};
use affgate_schema::{Click, ClickId, DedupKey, KeyRing, Keys, Postback, Secret, Status};
use sqlx::PgPool;

fn clickhouse_url() -> String {
    std::env::var("AFFGATE_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

fn postgres_url() -> String {
    std::env::var("AFFGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://affgate:affgate@127.0.0.1:5432/affgate".into())
}

/// `postgres://u:p@h:5432/affgate?x=y` with the database replaced.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("postgres url has a scheme");
    let rest = rest.split('?').next().unwrap_or(rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{db}")
}

/// A ClickHouse database and a PostgreSQL database for one test.
struct TestDbs {
    name: String,
    ch: ClickHouseConfig,
    pool: PgPool,
}

impl TestDbs {
    /// Creates both databases (empty: no migrations).
    async fn new() -> TestDbs {
        let name = format!("affgate_test_{:016x}", fastrand::u64(..));
        let ch = ClickHouseConfig {
            url: clickhouse_url(),
            database: name.clone(),
            user: "default".into(),
            password: String::new(),
        };
        let one: u8 = client(&ch, None)
            .query("SELECT 1")
            .fetch_one()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "ClickHouse unreachable at {}: {e}; start it with deploy/services.sh start",
                    ch.url
                )
            });
        assert_eq!(one, 1);
        client(&ch, None)
            .query(&format!("CREATE DATABASE {name}"))
            .execute()
            .await
            .expect("create clickhouse test database");

        let admin = pool(&PostgresConfig {
            url: postgres_url(),
        })
        .expect("postgres url parses");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a PostgreSQL database via {}: {e}; start it with deploy/services.sh start",
                    postgres_url()
                )
            });
        admin.close().await;
        let pool = pool(&PostgresConfig {
            url: with_database(&postgres_url(), &name),
        })
        .expect("postgres url parses");
        TestDbs { name, ch, pool }
    }

    /// Creates both databases and applies the migrations.
    async fn migrated() -> TestDbs {
        let dbs = TestDbs::new().await;
        migrate::clickhouse(&dbs.ch)
            .await
            .expect("clickhouse migrations apply");
        migrate::postgres(&dbs.pool)
            .await
            .expect("postgres migrations apply");
        dbs
    }

    fn ch(&self) -> clickhouse::Client {
        client(&self.ch, Some(&self.name))
    }

    async fn ch_count(&self, sql: &str) -> u64 {
        self.ch()
            .query(sql)
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDbs {
    /// Drops both databases from a thread of its own (Drop cannot await,
    /// and the test's runtime may be the one dropping us).
    fn drop(&mut self) {
        let name = self.name.clone();
        let ch = self.ch.clone();
        let admin_url = postgres_url();
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                let ch_result = client(&ch, None)
                    .query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute()
                    .await;
                let admin = pool(&PostgresConfig { url: admin_url }).expect("postgres url");
                // WITH (FORCE) ends the test's own pool connections too.
                let pg_result =
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                admin.close().await;
                (ch_result.err(), pg_result.err())
            })
        })
        .join();
        match result {
            Ok((None, None)) => {}
            Ok((ch, pg)) => eprintln!(
                "cleanup of {}: clickhouse {ch:?}, postgres {pg:?}",
                self.name
            ),
            Err(_) => eprintln!("cleanup of {} panicked", self.name),
        }
    }
}

/// Noon UTC on 2023-11-14, on an hour boundary.
const T0_MS: u64 = 1_699_963_200_000;

fn click(n: u64) -> Click {
    Click {
        click_id: format!("click-{n:04}"),
        // Two hours: clicks 0..100 in the first, the rest in the second.
        ts_ms: T0_MS + if n < 100 { n * 1000 } else { 3_600_000 + n },
        edge_id: 3,
        link_id: 1 + n % 3,
        offer_id: 10 + n % 3,
        affiliate_id: 20 + n % 3,
        slug: format!("slug{}", n % 3),
        ip: if n.is_multiple_of(2) {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, (n % 250) as u8))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n as u16))
        },
        user_agent: "Mozilla/5.0 (test)".into(),
        referer: if n.is_multiple_of(5) {
            String::new()
        } else {
            "https://ref.example/".into()
        },
        subs: [
            format!("s1-{n}"),
            String::new(),
            "ünïcödé".into(),
            String::new(),
            "s5".into(),
        ],
        quarantined: n.is_multiple_of(7),
        fallback: n.is_multiple_of(11),
    }
}

#[tokio::test]
async fn migrate_twice_changes_nothing() {
    let dbs = TestDbs::new().await;

    let first = migrate::clickhouse(&dbs.ch)
        .await
        .expect("first clickhouse run");
    assert_eq!(
        first.applied,
        [
            "0001_clicks.sql",
            "0002_conversions.sql",
            "0003_clicks_hourly.sql",
            "0004_clicks_hourly_flags.sql"
        ],
        "a new database gets every file"
    );
    let second = migrate::clickhouse(&dbs.ch)
        .await
        .expect("second clickhouse run");
    assert!(
        second.applied.is_empty(),
        "nothing left to apply: {second:?}"
    );
    assert_eq!(second.already.len(), 4);
    assert_eq!(
        dbs.ch_count("SELECT count() FROM affgate_migrations FINAL")
            .await,
        4,
        "one bookkeeping row per file"
    );

    let tables: Vec<String> = dbs
        .ch()
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(dbs.name.as_str())
        .fetch_all()
        .await
        .expect("list tables");
    for t in [
        "affgate_migrations",
        "clicks",
        "clicks_hourly",
        "clicks_hourly_mv",
        "clicks_hourly_totals",
        "conversions",
    ] {
        assert!(tables.iter().any(|n| n == t), "{t} exists: {tables:?}");
    }

    let first = migrate::postgres(&dbs.pool)
        .await
        .expect("first postgres run");
    assert_eq!(first.applied, ["0001_inbox.sql", "0002_control_plane.sql"]);
    let second = migrate::postgres(&dbs.pool)
        .await
        .expect("second postgres run");
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.already, ["0001_inbox.sql", "0002_control_plane.sql"]);

    // A file whose recorded checksum differs was edited after it was
    // applied: refused, naming the file.
    dbs.ch()
        .query(
            "INSERT INTO affgate_migrations (version, name, checksum, applied_at) \
             VALUES (2, '0002_conversions.sql', 'edited', now())",
        )
        .execute()
        .await
        .expect("tamper with the bookkeeping");
    let err = migrate::clickhouse(&dbs.ch).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("0002_conversions.sql") && msg.contains("changed"),
        "{msg}"
    );
}

/// `clicks_hourly_totals` against a model of `clicks` (distinct click ids
/// per hour and link, and how many of them were quarantined or fell back).
async fn assert_hourly_totals(dbs: &TestDbs, clicks: &[Click]) {
    let mut want: Vec<(u32, u64, u64, u64, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in clicks.iter().filter(|c| seen.insert(c.click_id.clone())) {
        let hour = (c.ts_ms / 1000 / 3600 * 3600) as u32;
        match want.iter_mut().find(|w| w.0 == hour && w.1 == c.link_id) {
            Some(w) => {
                w.2 += 1;
                w.3 += u64::from(c.quarantined);
                w.4 += u64::from(c.fallback);
            }
            None => want.push((
                hour,
                c.link_id,
                1,
                u64::from(c.quarantined),
                u64::from(c.fallback),
            )),
        }
    }
    want.sort();
    let got: Vec<(u32, u64, u64, u64, u64)> = dbs
        .ch()
        .query(
            "SELECT toUInt32(hour), link_id, clicks, quarantined, fallbacks \
             FROM clicks_hourly_totals ORDER BY hour, link_id",
        )
        .fetch_all()
        .await
        .expect("read totals");
    assert_eq!(got, want, "hourly totals per link");
}

/// A database as release 0003 left it, its rollup already counting clicks,
/// upgraded by `0004_clicks_hourly_flags.sql`: the rollup is rebuilt from
/// clicks with the same totals, in its new shape, and the new view counts
/// what is inserted afterwards, once, including clicks it already had.
#[tokio::test]
async fn the_rollup_rebuilt_by_0004_keeps_every_click() {
    let dbs = TestDbs::new().await;
    let old = migrate::clickhouse_files(&dbs.ch, &migrate::CLICKHOUSE[..4])
        .await
        .expect("migrations up to 0003");
    assert_eq!(
        old.applied.last().map(String::as_str),
        Some("0003_clicks_hourly.sql")
    );
    let store = ClickStore::new(&dbs.ch);
    let clicks: Vec<Click> = (0..200).map(click).collect();
    store
        .insert(&clicks[..150], T0_MS + 5_000)
        .await
        .expect("insert before the upgrade");
    store
        .insert(&clicks[100..150], T0_MS + 6_000)
        .await
        .expect("redelivered before the upgrade");
    assert_eq!(
        dbs.ch_count("SELECT uniqExactIfMerge(quarantined) FROM clicks_hourly")
            .await,
        22,
        "the old rollup's shape, counting: 22 of clicks 0..150 are multiples of 7"
    );

    let upgrade = migrate::clickhouse(&dbs.ch).await.expect("upgrade");
    assert_eq!(upgrade.applied, ["0004_clicks_hourly_flags.sql"]);
    assert_hourly_totals(&dbs, &clicks[..150]).await;
    let mut columns: Vec<(String, String)> = dbs
        .ch()
        .query(
            "SELECT name, type FROM system.columns WHERE database = ? AND table = 'clicks_hourly'",
        )
        .bind(dbs.name.as_str())
        .fetch_all()
        .await
        .expect("rollup columns");
    columns.sort();
    let mut want: Vec<(String, String)> = [
        ("hour", "DateTime('UTC')"),
        ("link_id", "UInt64"),
        ("offer_id", "UInt64"),
        ("affiliate_id", "UInt64"),
        ("quarantined", "UInt8"),
        ("fallback", "UInt8"),
        ("clicks", "AggregateFunction(uniqExact, String)"),
    ]
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .to_vec();
    want.sort();
    assert_eq!(columns, want, "the rollup in its new shape");

    // Clicks 120..150 again (already counted by the backfill) and 150..200.
    store
        .insert(&clicks[120..], T0_MS + 7_000)
        .await
        .expect("insert after the upgrade");
    assert_hourly_totals(&dbs, &clicks).await;
    assert_eq!(
        dbs.ch_count("SELECT uniqExactMerge(clicks) FROM clicks_hourly")
            .await,
        200
    );
}

#[tokio::test]
async fn redelivered_clicks_collapse_and_the_rollup_counts_each_once() {
    let dbs = TestDbs::migrated().await;
    let store = ClickStore::new(&dbs.ch);
    let clicks: Vec<Click> = (0..200).map(click).collect();

    // As redelivery does: everything, a window's worth again, everything again.
    store.insert(&clicks, T0_MS + 5_000).await.expect("insert");
    store
        .insert(&clicks[50..120], T0_MS + 6_000)
        .await
        .expect("insert again");
    store
        .insert(&clicks, T0_MS + 7_000)
        .await
        .expect("insert a third time");
    store
        .insert(&[], T0_MS)
        .await
        .expect("an empty window is no request");

    assert_eq!(
        dbs.ch_count("SELECT count() FROM clicks FINAL").await,
        200,
        "FINAL shows one row per click id"
    );
    assert_eq!(
        dbs.ch_count("SELECT uniqExactMerge(clicks) FROM clicks_hourly")
            .await,
        200,
        "the rollup counts distinct click ids despite 470 inserted rows"
    );

    assert_hourly_totals(&dbs, &clicks).await;

    // Merged for real, the duplicates are gone from the table itself.
    for t in ["clicks", "clicks_hourly"] {
        dbs.ch()
            .query(&format!("OPTIMIZE TABLE {t} FINAL"))
            .execute()
            .await
            .expect("optimize");
    }
    assert_eq!(dbs.ch_count("SELECT count() FROM clicks").await, 200);
    assert_eq!(
        dbs.ch_count("SELECT uniqExactMerge(clicks) FROM clicks_hourly")
            .await,
        200
    );

    // Every column lands where it belongs.
    #[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
    struct Back {
        click_id: String,
        ts: u32,
        ts_ms: u64,
        edge_id: u16,
        link_id: u64,
        offer_id: u64,
        affiliate_id: u64,
        slug: String,
        ip: String,
        referer: String,
        sub3: String,
    }
    for n in [1u64, 2, 150] {
        let c = click(n);
        let back: Back = dbs
            .ch()
            .query(
                "SELECT click_id, toUInt32(ts), ts_ms, edge_id, link_id, offer_id, affiliate_id, \
                 slug, IPv6NumToString(ip), referer, sub3 \
                 FROM clicks FINAL WHERE click_id = ?",
            )
            .bind(c.click_id.as_str())
            .fetch_one()
            .await
            .expect("read a click back");
        let ip = match c.ip {
            IpAddr::V4(v4) => format!("::ffff:{v4}"),
            IpAddr::V6(v6) => v6.to_string(),
        };
        let want = Back {
            click_id: c.click_id.clone(),
            ts: (c.ts_ms / 1000) as u32,
            ts_ms: c.ts_ms,
            edge_id: c.edge_id,
            link_id: c.link_id,
            offer_id: c.offer_id,
            affiliate_id: c.affiliate_id,
            slug: c.slug.clone(),
            ip,
            referer: c.referer.clone(),
            sub3: c.subs[2].clone(),
        };
        assert_eq!(back, want, "click {n} reads back");
    }
    let (q, f, lag): (u8, u8, u64) = dbs
        .ch()
        .query("SELECT quarantined, fallback, received_ms - ts_ms FROM clicks FINAL WHERE click_id = 'click-0077'")
        .fetch_one()
        .await
        .expect("flags");
    assert_eq!((q, f), (1, 1), "click 77 is quarantined and a fallback");
    assert!(lag > 0, "received_ms is the collector's time");
    assert_eq!(
        dbs.ch_count("SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'clicks' AND active AND partition != '202311'").await,
        0,
        "partitioned by month"
    );
}

fn postback(n: u64, status: Status) -> Postback {
    Postback {
        ts_ms: T0_MS + n * 10 + 7,
        edge_id: 4,
        network_id: 1 + n % 2,
        click_id: format!("click-{n:04}"),
        txid: format!("T-{n}"),
        event: "conversion".into(),
        status,
        payout_micros: if n.is_multiple_of(3) {
            None
        } else {
            Some(12_500_000 + n as i64)
        },
        currency: "USD".into(),
        request_id: format!("req-{n}"),
    }
}

#[tokio::test]
async fn the_inbox_keeps_one_row_per_dedup_key() {
    let dbs = TestDbs::migrated().await;
    let inbox = Inbox::new(dbs.pool.clone());

    let mut rows: Vec<(u16, u64, Postback)> = (0..50)
        .map(|n| (4, 1000 + n, postback(n, Status::Pending)))
        .collect();
    // A status change is a new event; the same postback twice in one window is one.
    rows.push((4, 2000, postback(7, Status::Approved)));
    rows.push((4, 2001, postback(7, Status::Approved)));
    // A NUL from a network's query string: stored as U+FFFD, keyed on the original.
    let mut nul = postback(60, Status::Approved);
    nul.txid = "T\0NUL".into();
    rows.push((4, 2002, nul.clone()));

    let new = inbox.insert(&rows).await.expect("first insert");
    assert_eq!(
        new, 52,
        "50 pending, 1 approved, 1 with a NUL; the repeat is skipped"
    );
    let again = inbox.insert(&rows).await.expect("redelivered window");
    assert_eq!(again, 0, "a redelivered window adds nothing");
    let half = inbox
        .insert(&rows[10..30])
        .await
        .expect("partial redelivery");
    assert_eq!(half, 0);
    assert_eq!(inbox.insert(&[]).await.expect("empty"), 0);

    let (count, unprocessed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE processed_at IS NULL) FROM postback_inbox",
    )
    .fetch_one(&dbs.pool)
    .await
    .expect("count");
    assert_eq!((count, unprocessed), (52, 52));

    // Every column, for a postback with a payout and one without.
    type Back = (
        i32,
        i64,
        i64,
        String,
        String,
        String,
        String,
        Option<String>,
        String,
        String,
        i64,
    );
    for (seq, p) in [
        (1001u64, postback(1, Status::Pending)),
        (1003, postback(3, Status::Pending)),
    ] {
        let key = DedupKey::for_postback(p.network_id, &p.click_id, &p.txid, &p.event, p.status);
        let back: Back = sqlx::query_as(
            "SELECT edge_id, seq, network_id, click_id, txid, event, status, payout::text, \
             currency, request_id, (extract(epoch FROM ts) * 1000)::bigint \
             FROM postback_inbox WHERE dedup_key = $1",
        )
        .bind(key.0.to_vec())
        .fetch_one(&dbs.pool)
        .await
        .expect("row by dedup key");
        let want: Back = (
            4,
            seq as i64,
            p.network_id as i64,
            p.click_id.clone(),
            p.txid.clone(),
            p.event.clone(),
            "pending".into(),
            p.payout_micros
                .map(|m| format!("{}.{:06}", m / 1_000_000, m % 1_000_000)),
            "USD".into(),
            p.request_id.clone(),
            p.ts_ms as i64,
        );
        assert_eq!(back, want, "postback {seq} reads back");
    }
    let key = DedupKey::for_postback(
        nul.network_id,
        &nul.click_id,
        &nul.txid,
        &nul.event,
        nul.status,
    );
    let txid: String = sqlx::query_scalar("SELECT txid FROM postback_inbox WHERE dedup_key = $1")
        .bind(key.0.to_vec())
        .fetch_one(&dbs.pool)
        .await
        .expect("the NUL row, by the key of the original text");
    assert_eq!(txid, "T\u{fffd}NUL");
}

#[tokio::test]
async fn bad_rows_are_rejected_and_a_missing_schema_retries() {
    let dbs = TestDbs::new().await; // no migrations yet
    let store = ClickStore::new(&dbs.ch);
    let inbox = Inbox::new(dbs.pool.clone());

    let err = store.insert(&[click(1)], T0_MS).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Retry {
                store: Store::ClickHouse,
                ..
            }
        ),
        "no clicks table yet: an operator runs migrate, the rows wait: {err}"
    );
    let err = inbox
        .insert(&[(1, 1, postback(1, Status::Approved))])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Retry {
                store: Store::Postgres,
                ..
            }
        ),
        "no inbox table yet: {err}"
    );

    migrate::clickhouse(&dbs.ch)
        .await
        .expect("migrate clickhouse");
    migrate::postgres(&dbs.pool)
        .await
        .expect("migrate postgres");
    store
        .insert(&[click(1)], T0_MS)
        .await
        .expect("now it works");

    let mut long_currency = postback(2, Status::Approved);
    long_currency.currency = "DOLLARS".into();
    let err = inbox
        .insert(&[(1, 1, postback(1, Status::Approved)), (1, 2, long_currency)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Reject {
                store: Store::Postgres,
                ..
            }
        ),
        "a value that does not fit is the data's fault: {err}"
    );
    let mut negative = postback(3, Status::Approved);
    negative.payout_micros = Some(-1);
    let err = inbox.insert(&[(1, 3, negative)]).await.unwrap_err();
    assert!(!err.is_retry(), "a negative payout violates a check: {err}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM postback_inbox")
        .fetch_one(&dbs.pool)
        .await
        .expect("count");
    assert_eq!(count, 0, "a rejected window leaves nothing behind");
}

#[tokio::test]
async fn unreachable_stores_retry() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let ch = ClickHouseConfig {
        url: "http://127.0.0.1:1".into(),
        database: "affgate".into(),
        user: "default".into(),
        password: String::new(),
    };
    let err = ClickStore::new(&ch)
        .insert(&[click(1)], T0_MS)
        .await
        .unwrap_err();
    assert!(err.is_retry(), "{err}");

    let pg = pool(&PostgresConfig {
        url: "postgres://affgate:affgate@127.0.0.1:1/affgate".into(),
    })
    .expect("url parses");
    // Gives up after the pool's acquire timeout (5 s).
    let err = Inbox::new(pg)
        .insert(&[(1, 1, postback(1, Status::Approved))])
        .await
        .unwrap_err();
    assert!(err.is_retry(), "{err}");
}

/// A network, a two-level offer (10 EUR, 60 % and 30 %), an affiliate
/// under a parent and one link; returns the key ring its click ids use.
async fn ledger_with_one_link(pool: &PgPool) -> KeyRing {
    for sql in [
        "INSERT INTO networks (id, name, postback_token) VALUES (1, 'n', 'token-123456')",
        "INSERT INTO offers (id, name, network_id, payout, currency, commission_levels)
         VALUES (1, 'o', 1, 10, 'EUR', '{0.6,0.3}')",
        "INSERT INTO affiliates (id, name, path) VALUES (1, 'parent', '1')",
        "INSERT INTO affiliates (id, name, parent_id, path) VALUES (2, 'child', 1, '1.2')",
        "INSERT INTO links (id, slug, offer_id, affiliate_id, destination)
         VALUES (1, 'l1', 1, 2, 'https://example.com/')",
    ] {
        sqlx::query(sql).execute(pool).await.expect(sql);
    }
    KeyRing::new(Keys::derive(&Secret::from_bytes([7; 32])))
}

/// A postback for click `n` of link 1, clicked a minute before `now`.
fn conversion_postback(keys: &KeyRing, n: u32, now: u64, ts_ms: u64, status: Status) -> Postback {
    let click = ClickId::mint(keys.current(), 4, now - 60_000, 1, n).expect("link id fits");
    Postback {
        ts_ms,
        edge_id: 4,
        network_id: 1,
        click_id: click.as_str().to_owned(),
        txid: format!("T-{n}"),
        event: "sale".into(),
        status,
        payout_micros: None,
        currency: "EUR".into(),
        request_id: format!("req-{n}-{}", status.as_str()),
    }
}

async fn outcomes(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT request_id, coalesce(outcome, 'unprocessed') FROM postback_inbox ORDER BY ts, request_id",
    )
    .fetch_all(pool)
    .await
    .expect("inbox outcomes")
}

/// Inbox rows are processed in batches, one transaction each: a clean
/// batch commits together (one `processed_at`), two events of one
/// conversion in the same batch both apply, and a row the ledger refuses
/// rolls the batch back, after which only that row is marked `error` and
/// every other row is recorded exactly once.
#[tokio::test]
async fn a_batch_commits_together_and_a_refused_row_spoils_only_itself() {
    let dbs = TestDbs::migrated().await;
    let keys = ledger_with_one_link(&dbs.pool).await;
    let inbox = Inbox::new(dbs.pool.clone());
    let processor = Processor::new(dbs.pool.clone(), keys.clone(), None, None);
    let now = now_ms();

    // Nine approved conversions, and one pending then approved.
    let mut rows: Vec<(u16, u64, Postback)> = (0..9)
        .map(|n| {
            (
                4,
                u64::from(n),
                conversion_postback(&keys, n, now, now + u64::from(n), Status::Approved),
            )
        })
        .collect();
    rows.push((
        4,
        9,
        conversion_postback(&keys, 9, now, now + 20, Status::Pending),
    ));
    rows.push((
        4,
        10,
        conversion_postback(&keys, 9, now, now + 21, Status::Approved),
    ));
    assert_eq!(inbox.insert(&rows).await.expect("inbox"), 11);

    assert_eq!(processor.drain().await.expect("drain"), 11);
    let one: (i64, i64, i64, i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversions),
                (SELECT count(*) FROM conversions WHERE status = 'approved'),
                (SELECT count(*) FROM conversion_events),
                (SELECT count(*) FROM commissions WHERE status = 'approved'),
                (SELECT sum(amount)::text FROM commissions)",
    )
    .fetch_one(&dbs.pool)
    .await
    .expect("ledger");
    assert_eq!(
        one,
        (10, 10, 11, 20, "90.000000".into()),
        "ten approved conversions, 6 + 3 EUR each"
    );
    // The batch's new conversions are written together: each event and
    // each commission row must still name its own conversion.
    let levels: Vec<(i16, i64, String, i64)> = sqlx::query_as(
        "SELECT level, affiliate_id, amount::text, count(DISTINCT conversion_id)
         FROM commissions GROUP BY 1, 2, 3 ORDER BY 1",
    )
    .fetch_all(&dbs.pool)
    .await
    .expect("commission levels");
    assert_eq!(
        levels,
        [(0, 2, "6.000000".into(), 10), (1, 1, "3.000000".into(), 10)],
        "every conversion: the child 60 %, its parent 30 %"
    );
    let astray: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversion_events e
         JOIN conversions c ON c.id = e.conversion_id
         JOIN postback_inbox p ON p.dedup_key = e.dedup_key
         WHERE p.txid <> c.txid OR p.click_id <> c.click_id",
    )
    .fetch_one(&dbs.pool)
    .await
    .expect("events");
    assert_eq!(
        astray, 0,
        "every event belongs to its postback's conversion"
    );
    let commits: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT processed_at) FROM postback_inbox")
            .fetch_one(&dbs.pool)
            .await
            .expect("processed_at");
    assert_eq!(commits, 1, "one batch, one transaction");
    assert!(
        outcomes(&dbs.pool)
            .await
            .iter()
            .all(|(_, o)| o == "recorded")
    );

    // The ledger refuses one row of the next batch.
    sqlx::query(
        "ALTER TABLE conversion_events ADD CONSTRAINT refuse_one CHECK (request_id <> 'poison')",
    )
    .execute(&dbs.pool)
    .await
    .expect("constraint");
    let mut rows: Vec<(u16, u64, Postback)> = (10..16)
        .map(|n| {
            (
                4,
                u64::from(n) + 10,
                conversion_postback(&keys, n, now, now + 100 + u64::from(n), Status::Approved),
            )
        })
        .collect();
    rows[2].2.request_id = "poison".into();
    assert_eq!(inbox.insert(&rows).await.expect("inbox"), 6);

    assert_eq!(
        processor.drain().await.expect("drain past a refused row"),
        6
    );
    let got = outcomes(&dbs.pool).await;
    let refused: Vec<&str> = got
        .iter()
        .filter(|(_, o)| o != "recorded")
        .map(|(r, o)| {
            assert_eq!(o, "error", "{r}");
            r.as_str()
        })
        .collect();
    assert_eq!(refused, ["poison"]);
    let two: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversions),
                (SELECT count(*) FROM conversion_events),
                (SELECT count(*) FROM commissions)",
    )
    .fetch_one(&dbs.pool)
    .await
    .expect("ledger");
    assert_eq!(
        two,
        (15, 16, 30),
        "five more, and nothing of the refused row"
    );
    assert_eq!(processor.stats.recorded.load(Ordering::Relaxed), 16);
    assert_eq!(processor.stats.refused.load(Ordering::Relaxed), 1);
    assert_eq!(processor.drain().await.expect("empty inbox"), 0);
}

/// A batch reads what its rows need up front (events, links, quarantined
/// clicks, conversions) and still settles each row on its own: in one
/// batch, a row already recorded as an event is a duplicate, a forged
/// click id and an unknown link are refused, a quarantined click's
/// conversion earns nothing, an existing conversion is approved and a new
/// one recorded, all in one transaction. An existing conversion named
/// by one row of the batch is locked by the batch's read; one named by two
/// rows is locked by each row in turn.
#[tokio::test]
async fn a_batch_reads_up_front_and_still_settles_each_row() {
    let dbs = TestDbs::migrated().await;
    let keys = ledger_with_one_link(&dbs.pool).await;
    let inbox = Inbox::new(dbs.pool.clone());
    let processor = Processor::new(dbs.pool.clone(), keys.clone(), None, None);
    let now = now_ms();

    // First batch: click 20's and click 23's conversions, pending.
    let first = [20, 23].map(|n| conversion_postback(&keys, n, now, now, Status::Pending));
    let first: Vec<(u16, u64, Postback)> =
        first.into_iter().zip(0..).map(|(p, s)| (4, s, p)).collect();
    assert_eq!(inbox.insert(&first).await.expect("inbox"), 2);
    assert_eq!(processor.drain().await.expect("drain"), 2);

    // Second batch. Click 20's pending row taken again (as after a restore
    // of the inbox): its event is already in the ledger.
    sqlx::query(
        "UPDATE postback_inbox SET processed_at = NULL, outcome = NULL
         WHERE request_id = 'req-20-pending'",
    )
    .execute(&dbs.pool)
    .await
    .expect("reopen the row");
    let approve = conversion_postback(&keys, 20, now, now + 1, Status::Approved);
    let mut forged = conversion_postback(&keys, 30, now, now + 2, Status::Approved);
    let last = if forged.click_id.ends_with('A') {
        "B"
    } else {
        "A"
    };
    forged
        .click_id
        .replace_range(forged.click_id.len() - 1.., last);
    forged.request_id = "forged".into();
    let mut unknown = conversion_postback(&keys, 31, now, now + 3, Status::Approved);
    unknown.click_id = ClickId::mint(keys.current(), 4, now - 60_000, 2, 31)
        .expect("link id fits")
        .as_str()
        .to_owned();
    unknown.request_id = "unknown".into();
    let quarantined = conversion_postback(&keys, 21, now, now + 4, Status::Approved);
    sqlx::query("INSERT INTO quarantined_clicks (click_id, ts) VALUES ($1, now())")
        .bind(&quarantined.click_id)
        .execute(&dbs.pool)
        .await
        .expect("quarantine click 21");
    let fresh = conversion_postback(&keys, 22, now, now + 5, Status::Approved);
    let approve_once = conversion_postback(&keys, 23, now, now + 6, Status::Approved);
    let rows: Vec<(u16, u64, Postback)> =
        [approve, forged, unknown, quarantined, fresh, approve_once]
            .into_iter()
            .zip(2..)
            .map(|(p, seq)| (4, seq, p))
            .collect();
    assert_eq!(inbox.insert(&rows).await.expect("inbox"), 6);
    assert_eq!(processor.drain().await.expect("drain"), 7);

    let got = outcomes(&dbs.pool).await;
    let want: Vec<(String, String)> = [
        ("req-20-pending", "duplicate"),
        ("req-23-pending", "recorded"),
        ("req-20-approved", "recorded"),
        ("forged", "bad_click_id"),
        ("unknown", "unknown_link"),
        ("req-21-approved", "recorded"),
        ("req-22-approved", "recorded"),
        ("req-23-approved", "recorded"),
    ]
    .iter()
    .map(|(r, o)| (r.to_string(), o.to_string()))
    .collect();
    assert_eq!(got, want);
    let commits: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT processed_at) FROM postback_inbox")
            .fetch_one(&dbs.pool)
            .await
            .expect("processed_at");
    assert_eq!(
        commits, 2,
        "the first batch, then the seven rows in one transaction"
    );
    let ledger: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT c.txid, c.status, (SELECT sum(amount)::text FROM commissions m
                                   WHERE m.conversion_id = c.id AND m.status = 'approved')
         FROM conversions c ORDER BY c.txid",
    )
    .fetch_all(&dbs.pool)
    .await
    .expect("ledger");
    assert_eq!(
        ledger,
        [
            ("T-20".into(), "approved".into(), Some("9.000000".into())),
            ("T-21".into(), "quarantined".into(), None),
            ("T-22".into(), "approved".into(), Some("9.000000".into())),
            ("T-23".into(), "approved".into(), Some("9.000000".into())),
        ]
    );
    // Events are written in the rows' order: their ids (which the mirror
    // follows) are in claim order.
    let events: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT request_id, status_before, status_after FROM conversion_events ORDER BY id",
    )
    .fetch_all(&dbs.pool)
    .await
    .expect("events");
    let ev =
        |r: &str, b: Option<&str>, a: &str| (r.to_string(), b.map(str::to_string), a.to_string());
    assert_eq!(
        events,
        [
            ev("req-20-pending", None, "pending"),
            ev("req-23-pending", None, "pending"),
            ev("req-20-approved", Some("pending"), "approved"),
            ev("req-21-approved", None, "quarantined"),
            ev("req-22-approved", None, "approved"),
            ev("req-23-approved", Some("pending"), "approved"),
        ],
        "pending and approved of T-20 and T-23, T-21, T-22, in claim order"
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Poll `done` every 20 ms until it holds; panic naming `what` after 30 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a partial page the mirror lingers: the events of several batches
/// processed meanwhile reach ClickHouse in one insert, each exactly once.
/// (The linger is 5 s here so that a slow machine still records the three
/// batches inside it; without a linger each batch's wake is an insert.)
#[tokio::test]
async fn the_mirror_lingers_so_a_trickle_of_batches_is_one_insert() {
    let dbs = TestDbs::migrated().await;
    let keys = ledger_with_one_link(&dbs.pool).await;
    let inbox = Inbox::new(dbs.pool.clone());
    let mirror =
        Arc::new(Mirror::new(dbs.pool.clone(), &dbs.ch).with_linger(Duration::from_secs(5)));
    let processor = Processor::new(
        dbs.pool.clone(),
        keys.clone(),
        None,
        Some(mirror.wake.clone()),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(mirror.clone().run(stopped));
    let now = now_ms();
    let record = |n: u32| {
        let row = (
            4,
            u64::from(n),
            conversion_postback(&keys, n, now, now + u64::from(n), Status::Approved),
        );
        let (inbox, processor) = (&inbox, &processor);
        async move {
            assert_eq!(inbox.insert(&[row]).await.expect("inbox"), 1);
            assert_eq!(processor.drain().await.expect("drain"), 1);
        }
    };
    let mirrored = || mirror.stats.mirrored.load(Ordering::Relaxed);

    record(0).await;
    until("the first event in clickhouse", || mirrored() == 1).await;
    assert_eq!(mirror.stats.inserts.load(Ordering::Relaxed), 1);

    for n in 1..4 {
        record(n).await;
    }
    until("three more events in clickhouse", || mirrored() == 4).await;
    assert_eq!(
        mirror.stats.inserts.load(Ordering::Relaxed),
        2,
        "three batches recorded inside the linger: one insert"
    );
    assert_eq!(dbs.ch_count("SELECT count() FROM conversions").await, 4);
    let unmirrored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversion_events WHERE mirrored_at IS NULL")
            .fetch_one(&dbs.pool)
            .await
            .expect("outbox");
    assert_eq!(unmirrored, 0);
    assert_eq!(mirror.stats.errors.load(Ordering::Relaxed), 0);
    stop.send(true).expect("mirror task listens");
    task.await.expect("mirror task ends");
}

/// The inbox lag on `/metrics` comes from `oldest_claimed_ts_ms`: while a
/// backlog is worked through it is the event time of the oldest row of
/// each claim (rising, within the backlog's times), and 0 once a claim
/// finds the inbox drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_lag_follows_the_backlog_and_clears_when_drained() {
    let dbs = TestDbs::migrated().await;
    let keys = ledger_with_one_link(&dbs.pool).await;
    let inbox = Inbox::new(dbs.pool.clone());
    let processor = Arc::new(Processor::new(dbs.pool.clone(), keys.clone(), None, None));
    let now = now_ms();
    let first = now - 30_000;
    let rows: Vec<(u16, u64, Postback)> = (0..1000)
        .map(|n| {
            let ts = first + u64::from(n);
            (
                4,
                u64::from(n),
                conversion_postback(&keys, n, now, ts, Status::Approved),
            )
        })
        .collect();
    assert_eq!(inbox.insert(&rows).await.expect("inbox"), 1000);
    let lag = || processor.stats.oldest_claimed_ts_ms.load(Ordering::Relaxed);
    assert_eq!(lag(), 0, "nothing claimed yet");

    let drain = tokio::spawn({
        let p = processor.clone();
        async move { p.drain().await }
    });
    let mut seen: Vec<u64> = Vec::new();
    while !drain.is_finished() {
        let v = lag();
        if v != 0 && seen.last() != Some(&v) {
            seen.push(v);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(drain.await.expect("drain task").expect("drain"), 1000);
    assert!(!seen.is_empty(), "a claim of the backlog was seen");
    assert!(
        seen.iter().all(|t| (first..first + 1000).contains(t)),
        "each claim's oldest row is one of the backlog: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "claims go oldest first: {seen:?}"
    );
    assert_eq!(lag(), 0, "drained");
}
