//! Clicks into ClickHouse: one `INSERT ... FORMAT RowBinary` per write
//! window through the `clickhouse` crate's HTTP client.
//!
//! The row type [`ClickRow`] names its columns (the crate sends
//! `INSERT INTO clicks(click_id, ts, ...)`), so its field names and types
//! must match `migrations/clickhouse/0001_clicks.sql`; its field order is
//! the table's, to keep the two easy to compare. Validation of the row
//! against the table (`RowBinaryWithNamesAndTypes`) is off because
//! ClickHouse 18.16 lacks that format; `tests/stores.rs` checks the match
//! against a real server instead.
//!
//! One insert is atomic per partition (month): a window spanning a month
//! boundary writes two parts, and a failure between them leaves one. That is
//! harmless: the window is not acknowledged, the edges resend, and the
//! copies collapse.

use std::net::IpAddr;
use std::time::Duration;

use affgate_schema::Click;
use clickhouse::Client;

use super::{Store, StoreError};
use crate::config::ClickHouseConfig;

/// Longest time to push one chunk of rows to the socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time for the server to commit an insert, materialized views included.
const END_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for `cfg`'s server, user and database.
///
/// `database` is `None` for statements that must run before the database
/// exists (`CREATE DATABASE`).
pub fn client(cfg: &ClickHouseConfig, database: Option<&str>) -> Client {
    let client = Client::default()
        .with_url(&cfg.url)
        .with_user(&cfg.user)
        .with_password(&cfg.password)
        // 18.16 has no RowBinaryWithNamesAndTypes, which validation needs.
        .with_validation(false);
    match database {
        Some(db) => client.with_database(db),
        None => client,
    }
}

/// One row of `clicks`, in the table's column order.
#[derive(Debug, clickhouse::Row, serde::Serialize)]
pub struct ClickRow<'a> {
    pub click_id: &'a str,
    /// `DateTime('UTC')`: Unix seconds.
    pub ts: u32,
    pub ts_ms: u64,
    pub edge_id: u16,
    pub link_id: u64,
    pub offer_id: u64,
    pub affiliate_id: u64,
    pub slug: &'a str,
    /// `FixedString(16)`: serde writes a byte array as its 16 bytes, no length.
    pub ip: [u8; 16],
    pub user_agent: &'a str,
    pub referer: &'a str,
    pub sub1: &'a str,
    pub sub2: &'a str,
    pub sub3: &'a str,
    pub sub4: &'a str,
    pub sub5: &'a str,
    pub quarantined: u8,
    pub fallback: u8,
    pub received_ms: u64,
}

impl<'a> ClickRow<'a> {
    pub fn new(c: &'a Click, received_ms: u64) -> ClickRow<'a> {
        ClickRow {
            click_id: &c.click_id,
            // Past 2106 a DateTime cannot hold it; clamp rather than wrap.
            ts: u32::try_from(c.ts_ms / 1000).unwrap_or(u32::MAX),
            ts_ms: c.ts_ms,
            edge_id: c.edge_id,
            link_id: c.link_id,
            offer_id: c.offer_id,
            affiliate_id: c.affiliate_id,
            slug: &c.slug,
            ip: ip_bytes(c.ip),
            user_agent: &c.user_agent,
            referer: &c.referer,
            sub1: &c.subs[0],
            sub2: &c.subs[1],
            sub3: &c.subs[2],
            sub4: &c.subs[3],
            sub5: &c.subs[4],
            quarantined: u8::from(c.quarantined),
            fallback: u8::from(c.fallback),
            received_ms,
        }
    }
}

/// IPv4 mapped into IPv6, as the schema's wire encoding does; what
/// ClickHouse's `IPv6NumToString` reads.
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Writes clicks to `clicks` in the configured database.
#[derive(Clone)]
pub struct ClickStore {
    client: Client,
}

impl std::fmt::Debug for ClickStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickStore").finish_non_exhaustive()
    }
}

impl ClickStore {
    pub fn new(cfg: &ClickHouseConfig) -> ClickStore {
        ClickStore {
            client: client(cfg, Some(&cfg.database)),
        }
    }

    /// Inserts `clicks` in one `INSERT`, stamped with the collector's
    /// `received_ms` (Unix milliseconds). Nothing to insert: no request.
    pub async fn insert(&self, clicks: &[Click], received_ms: u64) -> Result<(), StoreError> {
        if clicks.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<ClickRow<'_>>("clicks")
            .await
            .map_err(classify)?
            .with_timeouts(Some(SEND_TIMEOUT), Some(END_TIMEOUT));
        for c in clicks {
            insert
                .write(&ClickRow::new(c, received_ms))
                .await
                .map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }
}

/// Server error codes that a value itself causes, so the same rows fail
/// again: `ARGUMENT_OUT_OF_BOUND` (69), `CANNOT_CONVERT_TYPE` (70),
/// `INCORRECT_DATA` (117), `TOO_LARGE_STRING_SIZE` (131).
///
/// Parse errors of the row stream (27, 33, ...) are deliberately not here:
/// rows are typed, so those mean the table and [`ClickRow`] disagree (a
/// migration not applied), which an operator fixes; the rows stay with the
/// edges meanwhile.
const REJECT_CODES: &[u32] = &[69, 70, 117, 131];

/// Sorts a client error into retry or reject (see [`StoreError`]).
pub fn classify(e: clickhouse::error::Error) -> StoreError {
    use clickhouse::error::Error as E;
    let reject = match &e {
        // Our rows did not serialize: they never will.
        E::Custom(_) | E::DataFormat(_) | E::SequenceMustHaveLength => true,
        E::BadResponse(body) => exception_code(body).is_some_and(|c| REJECT_CODES.contains(&c)),
        _ => false,
    };
    let message = e.to_string();
    if reject {
        StoreError::Reject {
            store: Store::ClickHouse,
            message,
        }
    } else {
        StoreError::Retry {
            store: Store::ClickHouse,
            message,
        }
    }
}

/// The number in `Code: 60, e.displayText() = ...` (18.16) or
/// `Code: 60. DB::Exception: ...` (current releases).
pub fn exception_code(body: &str) -> Option<u32> {
    let rest = &body[body.find("Code:")? + "Code:".len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn exception_codes_of_old_and_new_servers() {
        assert_eq!(
            exception_code(
                "Code: 60, e.displayText() = DB::Exception: Table x.clicks doesn't exist., e.what() = DB::Exception"
            ),
            Some(60)
        );
        assert_eq!(
            exception_code("Code: 131. DB::Exception: String too long. (TOO_LARGE_STRING_SIZE)"),
            Some(131)
        );
        assert_eq!(exception_code("502 Bad Gateway"), None);
        assert_eq!(exception_code("Code: x"), None);
    }

    #[test]
    fn classification() {
        use clickhouse::error::Error as E;
        assert!(classify(E::TimedOut).is_retry(), "timeouts retry");
        assert!(
            classify(E::Network("connection refused".into())).is_retry(),
            "network errors retry"
        );
        assert!(
            classify(E::BadResponse("500 Internal Server Error".into())).is_retry(),
            "a bare 5xx retries"
        );
        assert!(
            classify(E::BadResponse(
                "Code: 60, e.displayText() = DB::Exception: Table doesn't exist".into()
            ))
            .is_retry(),
            "a missing table waits for an operator"
        );
        assert!(
            classify(E::BadResponse(
                "Code: 27, e.displayText() = DB::Exception: Cannot parse input".into()
            ))
            .is_retry(),
            "a row/table mismatch waits for an operator"
        );
        assert!(
            !classify(E::BadResponse(
                "Code: 131. DB::Exception: String too long".into()
            ))
            .is_retry(),
            "a value the server refuses is rejected"
        );
        assert!(
            !classify(E::Custom("bad value".into())).is_retry(),
            "serialization errors are rejected"
        );
    }

    #[test]
    fn ips_are_mapped_like_the_wire_encoding() {
        assert_eq!(
            ip_bytes(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]
        );
        assert_eq!(
            ip_bytes(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Ipv6Addr::LOCALHOST.octets()
        );
    }
}
