//! Read-only view of a ring file and its spill directory, for
//! `affgate-edge ring inspect`. Takes no lock and writes nothing, so it
//! works on the ring of a live edge as well as a dead one.
//!
//! It reads with `pread`, not a mapping: a snapshot of a live ring may
//! catch a record mid-write or a region being freed and reused; the walk
//! (shared with recovery) sees those as unsound and skips them, so the view
//! is of records committed when it was taken, possibly missing some that
//! moved meanwhile, never showing garbage.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::layout::{HEADER_PAGE, HeaderPage, lap_rest};
use super::recover::{Piece, walk};
use super::{Location, Record, RingError, RingStats, spill};

/// What `inspect` saw.
#[derive(Clone, Debug, Default)]
pub struct Inspection {
    /// `spilled_total` is 0: it counts per process and lives in memory.
    pub stats: RingStats,
    pub head: u64,
    pub tail: u64,
    /// Every unacked committed record: ring (in order), then spill segments.
    pub records: Vec<Record>,
}

/// Look at the ring at `path` and the spill segments in `spill_dir`.
pub fn inspect(path: &Path, spill_dir: &Path) -> Result<Inspection, RingError> {
    let open_err = |error| RingError::Open {
        path: path.to_owned(),
        error,
    };
    let file = File::open(path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    if len < HEADER_PAGE {
        return Err(RingError::Truncated {
            path: path.to_owned(),
            len,
            expected: HEADER_PAGE,
        });
    }
    let hp = read_header(&file, path)?;
    let cap = hp.capacity;
    if len < HEADER_PAGE + cap {
        return Err(RingError::Truncated {
            path: path.to_owned(),
            len,
            expected: HEADER_PAGE + cap,
        });
    }
    let data = read_used(&file, path, cap, hp.tail, hp.head)?;

    let mut records = Vec::new();
    walk(&data, hp.tail, hp.head, |piece| {
        if let Piece::Committed { hdr, payload } = piece {
            records.push(Record {
                seq: hdr.seq,
                kind: hdr.kind,
                ts_ms: hdr.ts_ms,
                loc: Location::Ring { pos: hdr.pos },
                payload: payload.to_vec(),
            });
        }
    });
    let ring_records = records.len() as u64;
    let (spilled, spill_bytes) = spill::inspect_dir(spill_dir)?;
    let spilled_records = spilled.len() as u64;
    // Oldest: the first of the ring and the first of the spill.
    let firsts = [records.first(), spilled.first()].into_iter().flatten();
    let oldest_unacked_seq = firsts.clone().map(|r| r.seq).min();
    let oldest_unacked_ts_ms = firsts.map(|r| r.ts_ms).min();
    records.extend(spilled);
    Ok(Inspection {
        stats: RingStats {
            capacity_bytes: cap,
            used_bytes: hp.head - hp.tail,
            unacked_records: ring_records + spilled_records,
            oldest_unacked_ts_ms,
            oldest_unacked_seq,
            spilled_records,
            spill_bytes,
            spilled_total: 0,
            next_seq: hp.next_seq,
        },
        head: hp.head,
        tail: hp.tail,
        records,
    })
}

/// Read and check the header page. A live edge moves head and tail while
/// we read; retry a few times until they are consistent.
fn read_header(file: &File, path: &Path) -> Result<HeaderPage, RingError> {
    let mut page = [0u8; HEADER_PAGE as usize];
    let mut why = String::new();
    for _ in 0..10 {
        file.read_exact_at(&mut page, 0)
            .map_err(|error| RingError::Open {
                path: path.to_owned(),
                error,
            })?;
        let hp = HeaderPage::from_bytes(&page);
        hp.check().map_err(|what| RingError::Format {
            path: path.to_owned(),
            what,
        })?;
        match hp.check_cursors() {
            Ok(()) => return Ok(hp),
            Err(w) => why = w,
        }
    }
    Err(RingError::Format {
        path: path.to_owned(),
        what: why,
    })
}

/// The data area with `[tail, head)` filled in from the file (the rest left
/// zero; the allocation is lazy, so an idle ring costs little).
fn read_used(
    file: &File,
    path: &Path,
    cap: u64,
    tail: u64,
    head: u64,
) -> Result<Vec<u8>, RingError> {
    let mut data = vec![
        0u8;
        usize::try_from(cap).map_err(|_| RingError::Format {
            path: path.to_owned(),
            what: format!("capacity {cap} does not fit in memory"),
        })?
    ];
    let mut p = tail;
    while p < head {
        let n = lap_rest(p, cap).min(head - p);
        let off = (p % cap) as usize;
        file.read_exact_at(&mut data[off..off + n as usize], HEADER_PAGE + p % cap)
            .map_err(|error| RingError::Open {
                path: path.to_owned(),
                error,
            })?;
        p += n;
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::super::{Ring, test_cfg};
    use super::*;

    #[test]
    fn inspect_sees_a_live_ring_and_its_spill() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 1024);
        let ring = Ring::open(&cfg).unwrap();
        for _ in 1..=6 {
            let seq = ring.next_seq();
            ring.append(seq, (seq % 2 + 1) as u8, seq * 1000, &[seq as u8; 200])
                .unwrap();
        }
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        c.poll(2, &mut out).unwrap();
        c.ack(out[1].loc).unwrap();

        let ins = inspect(&cfg.path, &cfg.spill_dir).unwrap();
        let seqs: Vec<u64> = ins.records.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            [1, 3, 4, 5, 6],
            "acked record 2 is not shown; ring then spill"
        );
        assert!(
            ins.records
                .iter()
                .all(|r| r.payload == vec![r.seq as u8; 200] && r.ts_ms == r.seq * 1000)
        );
        assert_eq!(ins.stats.unacked_records, 5);
        assert_eq!(ins.stats.spilled_records, 2);
        assert_eq!(ins.stats.oldest_unacked_seq, Some(1));
        assert_eq!(ins.stats.next_seq, 7, "lifted past the seqs appended");
        let live = ring.stats();
        assert_eq!((ins.head, ins.tail), (992, 0));
        assert_eq!(ins.stats.used_bytes, live.used_bytes);
        assert_eq!(ins.stats.unacked_records, live.unacked_records);
        assert_eq!(ins.stats.spill_bytes, live.spill_bytes);
        // It took no lock: the live ring keeps working.
        ring.append(7, 1, 0, b"after").unwrap();
    }

    #[test]
    fn inspect_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.ring");
        let e = inspect(&path, dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("open ring {}: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, b"short").unwrap();
        let e = inspect(&path, dir.path()).unwrap_err();
        assert!(matches!(e, RingError::Truncated { len: 5, .. }), "{e}");
    }
}
