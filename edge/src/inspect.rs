//! `affgate-edge ring inspect`: what the ring and spill files hold, for
//! operators and tests. Read-only: safe on the ring of a running edge.
//!
//! Output: `key: value` lines, then with `--records` one tab-separated line
//! per unacknowledged record under a header:
//! `seq kind ts_ms where click_id link_id slug status txid`.

use std::fmt::Write as _;

use affgate_schema::event::{Event, decode_event};
use anyhow::Context;

use crate::config::Config;
use crate::ring::{self, Location};

pub fn report(cfg: &Config, records: bool) -> anyhow::Result<String> {
    let ins = ring::inspect(&cfg.ring_path, &cfg.spill_dir)
        .with_context(|| format!("inspect ring {}", cfg.ring_path.display()))?;
    let s = &ins.stats;
    let mut out = String::new();
    let now = crate::http::now_ms();
    let _ = writeln!(out, "ring: {}", cfg.ring_path.display());
    let _ = writeln!(out, "spill_dir: {}", cfg.spill_dir.display());
    let _ = writeln!(out, "capacity_bytes: {}", s.capacity_bytes);
    let _ = writeln!(out, "used_bytes: {}", s.used_bytes);
    let _ = writeln!(out, "unacked_records: {}", s.unacked_records);
    let _ = writeln!(out, "spilled_records: {}", s.spilled_records);
    let _ = writeln!(out, "spill_bytes: {}", s.spill_bytes);
    let _ = writeln!(out, "next_seq: {}", s.next_seq);
    match (s.oldest_unacked_seq, s.oldest_unacked_ts_ms) {
        (Some(seq), Some(ts)) => {
            let _ = writeln!(out, "oldest_unacked_seq: {seq}");
            let _ = writeln!(out, "oldest_unacked_age_ms: {}", now.saturating_sub(ts));
        }
        _ => {
            let _ = writeln!(out, "oldest_unacked_seq: -");
            let _ = writeln!(out, "oldest_unacked_age_ms: -");
        }
    }
    let (mut clicks, mut postbacks, mut other) = (0u64, 0u64, 0u64);
    let mut lines = String::new();
    for r in &ins.records {
        let place = match r.loc {
            Location::Ring { .. } => "ring",
            Location::Spill { .. } => "spill",
        };
        match decode_event(&r.payload) {
            Ok(Event::Click(c)) => {
                clicks += 1;
                if records {
                    let q = if c.quarantined {
                        "quarantined"
                    } else if c.fallback {
                        "fallback"
                    } else {
                        "-"
                    };
                    let _ = writeln!(
                        lines,
                        "{}\tclick\t{}\t{place}\t{}\t{}\t{}\t{q}\t-",
                        r.seq, r.ts_ms, c.click_id, c.link_id, c.slug
                    );
                }
            }
            Ok(Event::Postback(p)) => {
                postbacks += 1;
                if records {
                    let _ = writeln!(
                        lines,
                        "{}\tpostback\t{}\t{place}\t{}\t-\t-\t{}\t{}",
                        r.seq,
                        r.ts_ms,
                        p.click_id,
                        p.status.as_str(),
                        if p.txid.is_empty() { "-" } else { &p.txid }
                    );
                }
            }
            Err(e) => {
                other += 1;
                if records {
                    let _ = writeln!(
                        lines,
                        "{}\tundecodable\t{}\t{place}\t{e}\t-\t-\t-\t-",
                        r.seq, r.ts_ms
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "clicks: {clicks}");
    let _ = writeln!(out, "postbacks: {postbacks}");
    let _ = writeln!(out, "undecodable: {other}");
    if records {
        out.push_str("seq\tkind\tts_ms\twhere\tclick_id\tlink_id\tslug\tstatus\ttxid\n");
        out.push_str(&lines);
    }
    Ok(out)
}
