//! Recovery when a ring is opened, and the walk it shares with `inspect`.
//!
//! The walk goes from tail to head over the reservations (layout invariant
//! 2) and classifies each piece. Recovery then repairs what a dead process
//! left behind, so that the live consumer only ever meets sound records:
//!
//! - a free interrupted between `freeing` and `tail` is finished;
//! - a reservation whose writer died before committing (its request was
//!   never answered) becomes a PAD: with a sound header its extent is known;
//!   without one, the walk scans forward 8 bytes at a time to the next sound
//!   header or the lap end (safe: invariant 3 says such a region holds only
//!   zeros and header bytes, no payload);
//! - a committed record whose payload fails its crc (bit rot, a stray
//!   write) becomes a PAD too, logged at ERROR: that is lost data;
//! - a head that points inside slack or into a sub-header remnant (only
//!   possible with a damaged header page) is pulled back.

use std::path::Path;
use std::sync::atomic::{Ordering, compiler_fence};

use super::RingError;
use super::layout::{
    HEADER_PAGE, HeaderPage, Mapping, OFF_FREEING, OFF_HEAD, OFF_TAIL, REC_HDR, RecordHeader,
    STATE_ACKED, STATE_COMMITTED, STATE_PAD, lap_rest,
};
use super::spill::SpillRecovery;

/// One piece of `[tail, head)`, as the walk found it.
#[derive(Debug)]
pub(crate) enum Piece<'a> {
    /// Under 48 bytes before the lap end: nothing there by design (or, if
    /// `len` is short of the lap end, head points into it).
    Slack {
        pos: u64,
        len: u64,
    },
    Committed {
        hdr: RecordHeader,
        payload: &'a [u8],
    },
    Acked {
        hdr: RecordHeader,
    },
    Pad,
    /// Sound header, state not published: the writer died mid-append.
    Uncommitted {
        hdr: RecordHeader,
    },
    /// Committed, but the payload fails its crc.
    Corrupt {
        hdr: RecordHeader,
    },
    /// No sound header at `pos`; the next one (or the lap end, or head) is
    /// at `pos + len`.
    Garbage {
        pos: u64,
        len: u64,
    },
}

/// The sound header at `p`, if there is one that fits before the lap end
/// and head. `data` is the whole data area.
fn sound_header(data: &[u8], p: u64, head: u64) -> Option<RecordHeader> {
    let cap = data.len() as u64;
    let off = (p % cap) as usize;
    let h = RecordHeader::from_slice(data.get(off..)?)?;
    let fits = h.extent() <= lap_rest(p, cap) && p + h.extent() <= head;
    (h.is_sound_at(p) && fits).then_some(h)
}

/// Walk `[tail, head)` of `data` (the whole data area, indexed by
/// `pos % data.len()`), calling `visit` on each piece in order.
pub(crate) fn walk<'a>(data: &'a [u8], tail: u64, head: u64, mut visit: impl FnMut(Piece<'a>)) {
    let cap = data.len() as u64;
    let mut p = tail;
    while p < head {
        let rest = lap_rest(p, cap);
        if rest < REC_HDR {
            let len = rest.min(head - p);
            visit(Piece::Slack { pos: p, len });
            p += len;
            continue;
        }
        if let Some(hdr) = sound_header(data, p, head) {
            let piece = match hdr.state {
                STATE_PAD => Piece::Pad,
                STATE_ACKED => Piece::Acked { hdr },
                STATE_COMMITTED => {
                    let start = (p % cap) as usize + REC_HDR as usize;
                    let payload = &data[start..start + hdr.len as usize];
                    if crc32fast::hash(payload) == hdr.pcrc {
                        Piece::Committed { hdr, payload }
                    } else {
                        Piece::Corrupt { hdr }
                    }
                }
                _ => Piece::Uncommitted { hdr },
            };
            visit(piece);
            p += hdr.extent();
            continue;
        }
        // A dead reservation is at least one header long, so the next sound
        // header is no closer than that.
        let limit = (p + rest).min(head);
        let mut q = p + REC_HDR;
        while q < limit && (lap_rest(q, cap) < REC_HDR || sound_header(data, q, head).is_none()) {
            q += 8;
        }
        let q = q.min(limit);
        visit(Piece::Garbage { pos: p, len: q - p });
        p = q;
    }
}

/// What recovery found and did; also logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Committed, unacked records kept in the ring.
    pub unacked_records: u64,
    /// Acked records not yet freed (they stay until the tail passes them).
    pub acked_records: u64,
    /// Reservations whose writer died before committing (never answered to
    /// a client), turned into padding.
    pub discarded_uncommitted: u64,
    /// Committed records whose payload failed its checksum: lost data.
    pub discarded_corrupt: u64,
    /// Bytes of the two kinds above.
    pub discarded_bytes: u64,
    /// Bytes zeroed to finish a free the consumer had begun.
    pub finished_free_bytes: u64,
    /// The largest sequence number still stored in the ring.
    pub max_seq: Option<u64>,
    /// What the spill directory held.
    pub spill: SpillRecovery,
}

enum Fix {
    /// Cover `[pos, pos + extent)` with a PAD record.
    Pad { pos: u64, extent: u64 },
    /// Zero `[pos, head)` and move head back to `pos`.
    CutHead { pos: u64 },
}

/// Largest single PAD recovery writes; a longer discarded region (only
/// possible in a huge, damaged ring) gets several.
const MAX_PAD_EXTENT: u64 = 1 << 30;

/// Cover `[pos, pos + extent)` (within one lap, multiple of 8, >= 48) with
/// PAD records of at most `max_pad` bytes (>= 3 headers) each.
fn pad_over(map: &Mapping, pos: u64, extent: u64, max_pad: u64) {
    let end = pos + extent;
    let mut p = pos;
    while p < end {
        let mut n = (end - p).min(max_pad);
        if end - p - n > 0 && end - p - n < REC_HDR {
            n -= 2 * REC_HDR; // leave room for one more whole PAD
        }
        map.store_header(p, &RecordHeader::pad(p, n));
        p += n;
    }
}

/// Walk and repair the ring; the caller has just mapped it and holds the
/// file lock, and no other thread has the mapping yet.
pub(crate) fn recover_ring(map: &Mapping, path: &Path) -> Result<RecoveryReport, RingError> {
    let cap = map.capacity();
    let word = |o| map.u64_at(o).load(Ordering::Acquire);
    let hp = HeaderPage {
        magic: [0; 8],
        version: 0,
        header_len: HEADER_PAGE as u32,
        capacity: cap,
        head: word(OFF_HEAD),
        tail: word(OFF_TAIL),
        freeing: word(OFF_FREEING),
        next_seq: 0,
        next_segment: 0,
    };
    hp.check_cursors().map_err(|what| RingError::Format {
        path: path.to_owned(),
        what,
    })?;
    let (mut tail, mut head) = (hp.tail, hp.head);
    let mut report = RecoveryReport::default();

    if hp.freeing > tail && hp.freeing <= head && hp.freeing.is_multiple_of(8) {
        // SAFETY: we hold the file lock and the mapping is not shared yet;
        // `[tail, freeing)` is within one capacity (freeing <= head).
        unsafe { map.zero(tail, hp.freeing) };
        report.finished_free_bytes = hp.freeing - tail;
        tail = hp.freeing;
        map.tail().store(tail, Ordering::Release);
    }

    let mut fixes = Vec::new();
    {
        // SAFETY: nothing writes the mapping while this slice lives: the
        // fixes are collected and applied after it is dropped, and no other
        // thread has the mapping yet.
        let data = unsafe { map.data() };
        walk(data, tail, head, |piece| match piece {
            Piece::Slack { pos, len } => {
                if len < lap_rest(pos, cap) {
                    fixes.push(Fix::CutHead { pos });
                }
            }
            Piece::Committed { hdr, .. } => {
                report.unacked_records += 1;
                report.max_seq = report.max_seq.max(Some(hdr.seq));
            }
            Piece::Acked { hdr } => {
                report.acked_records += 1;
                report.max_seq = report.max_seq.max(Some(hdr.seq));
            }
            Piece::Pad => {}
            Piece::Uncommitted { hdr } => {
                report.discarded_uncommitted += 1;
                report.discarded_bytes += hdr.extent();
                fixes.push(Fix::Pad {
                    pos: hdr.pos,
                    extent: hdr.extent(),
                });
            }
            Piece::Corrupt { hdr } => {
                report.discarded_corrupt += 1;
                report.discarded_bytes += hdr.extent();
                tracing::error!(
                    path = %path.display(),
                    pos = hdr.pos,
                    seq = hdr.seq,
                    "ring record fails its checksum, discarding it: data lost"
                );
                fixes.push(Fix::Pad {
                    pos: hdr.pos,
                    extent: hdr.extent(),
                });
            }
            Piece::Garbage { pos, len } => {
                report.discarded_uncommitted += 1;
                report.discarded_bytes += len;
                if len >= REC_HDR {
                    fixes.push(Fix::Pad { pos, extent: len });
                } else {
                    // Only a head pointing into a remnant leaves less than
                    // a header before the next sound record or lap end.
                    fixes.push(Fix::CutHead { pos });
                }
            }
        });
    }
    for fix in fixes {
        match fix {
            Fix::Pad { pos, extent } => pad_over(map, pos, extent, MAX_PAD_EXTENT),
            Fix::CutHead { pos } => {
                // SAFETY: exclusive access (see above); `[pos, head)` is
                // within the used region, so within one capacity.
                unsafe { map.zero(pos, head) };
                head = pos;
                map.head().store(head, Ordering::Release);
            }
        }
    }
    compiler_fence(Ordering::SeqCst);

    if report.discarded_uncommitted > 0 {
        tracing::warn!(
            path = %path.display(),
            regions = report.discarded_uncommitted,
            bytes = report.discarded_bytes,
            "ring recovery discarded appends whose writer died before committing (never acknowledged to a client)"
        );
    }
    if report.discarded_corrupt > 0 {
        tracing::error!(
            path = %path.display(),
            records = report.discarded_corrupt,
            "ring recovery discarded corrupt committed records"
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::{Ring, test_cfg};
    use super::*;

    /// A data area with records laid out as a writer would.
    struct Area {
        data: Vec<u8>,
        head: u64,
    }

    impl Area {
        fn new(cap: usize) -> Area {
            Area {
                data: vec![0; cap],
                head: 0,
            }
        }
        fn put(&mut self, hdr: RecordHeader, payload: &[u8]) -> u64 {
            let cap = self.data.len() as u64;
            let rest = lap_rest(self.head, cap);
            if rest < hdr.extent() {
                if rest >= REC_HDR {
                    let pad = RecordHeader::pad(self.head, rest);
                    let off = (self.head % cap) as usize;
                    self.data[off..off + 48].copy_from_slice(&pad.to_bytes());
                }
                self.head += rest;
            }
            let pos = self.head;
            let h = hdr.at(pos);
            let off = (pos % cap) as usize;
            self.data[off..off + 48].copy_from_slice(&h.to_bytes());
            self.data[off + 48..off + 48 + payload.len()].copy_from_slice(payload);
            self.head += h.extent();
            pos
        }
        fn pieces(&self, tail: u64) -> Vec<String> {
            let mut v = Vec::new();
            walk(&self.data, tail, self.head, |p| {
                v.push(match p {
                    Piece::Slack { len, .. } => format!("slack{len}"),
                    Piece::Committed { hdr, .. } => format!("rec{}", hdr.seq),
                    Piece::Acked { hdr } => format!("acked{}", hdr.seq),
                    Piece::Pad => "pad".to_string(),
                    Piece::Uncommitted { hdr } => format!("uncommitted{}", hdr.seq),
                    Piece::Corrupt { hdr } => format!("corrupt{}", hdr.seq),
                    Piece::Garbage { len, .. } => format!("garbage{len}"),
                })
            });
            v
        }
    }

    #[test]
    fn walk_classifies_each_kind() {
        let mut a = Area::new(1024);
        a.put(RecordHeader::record(1, 1, 0, &[1; 100]), &[1; 100]);
        let p2 = a.put(RecordHeader::record(2, 1, 0, &[2; 100]), &[2; 100]);
        let p3 = a.put(RecordHeader::record(3, 1, 0, &[3; 100]), &[3; 100]);
        let p4 = a.put(RecordHeader::record(4, 1, 0, &[4; 100]), &[4; 100]);
        a.put(RecordHeader::record(5, 1, 0, &[5; 8]), &[5; 8]);
        a.data[p2 as usize..p2 as usize + 4].copy_from_slice(&STATE_ACKED.to_le_bytes());
        a.data[p3 as usize + 60] ^= 1; // payload flip
        a.data[p4 as usize..p4 as usize + 4].fill(0); // never committed
        assert_eq!(
            a.pieces(0),
            ["rec1", "acked2", "corrupt3", "uncommitted4", "rec5"]
        );
    }

    #[test]
    fn walk_skips_slack_and_pads_across_laps() {
        let mut a = Area::new(1024);
        // 3 x 304 = 912; a 304-byte record does not fit in the 112 left.
        for seq in 1..=4 {
            a.put(RecordHeader::record(seq, 1, 0, &[0; 256]), &[0; 256]);
        }
        // rec4 at 1024 overwrote rec1, so the tail is past it; from 0 the
        // stale lap is refused (pos mismatch).
        assert_eq!(a.pieces(304), ["rec2", "rec3", "pad", "rec4"]);
        assert_eq!(a.pieces(0)[0], "garbage304");
        // A remainder under 48 bytes is slack with no header.
        let mut a = Area::new(1024);
        a.put(RecordHeader::record(1, 1, 0, &[0; 952]), &[0; 952]); // extent 1000
        a.put(RecordHeader::record(2, 1, 0, &[0; 8]), &[0; 8]);
        assert_eq!(a.pieces(1000), ["slack24", "rec2"]);
    }

    #[test]
    fn walk_scans_past_a_headerless_dead_reservation() {
        let mut a = Area::new(4096);
        a.put(RecordHeader::record(1, 1, 0, &[1; 50]), &[1; 50]);
        let dead = a.put(RecordHeader::record(2, 1, 0, &[2; 300]), &[0; 300]);
        a.put(RecordHeader::record(3, 1, 0, &[3; 50]), &[3; 50]);
        // The dead writer had stored only part of its header.
        let d = dead as usize;
        a.data[d..d + 48].fill(0);
        a.data[d + 16..d + 24].copy_from_slice(&2u64.to_le_bytes());
        assert_eq!(a.pieces(0), ["rec1", "garbage352", "rec3"]);
        // ... and when it was the last reservation, up to head.
        let mut b = Area::new(4096);
        b.put(RecordHeader::record(1, 1, 0, &[1; 50]), &[1; 50]);
        b.head += 352;
        assert_eq!(b.pieces(0), ["rec1", "garbage352"]);
    }

    #[test]
    fn recovery_pads_dead_reservations_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        {
            let ring = Ring::open(&cfg).unwrap();
            ring.append(1, 1, 0, b"first").unwrap();
            // A writer that reserved and died before writing anything.
            let r = ring.reserve(48 + 64).expect("room");
            assert_eq!(r.pad, 0);
            // One that wrote its header but not its state.
            let r2 = ring.reserve(48 + 8).expect("room");
            let h = RecordHeader::record(3, 1, 0, b"x").at(r2.pos);
            ring.map.store_header_fields(r2.pos, &h);
            ring.append(4, 1, 0, b"fourth").unwrap();
        }
        let ring = Ring::open(&cfg).unwrap();
        let rep = ring.recovery();
        assert_eq!(rep.unacked_records, 2);
        assert_eq!(rep.discarded_uncommitted, 2, "{rep:?}");
        assert_eq!(rep.discarded_bytes, 112 + 56);
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        c.poll(10, &mut out).unwrap();
        let got: Vec<_> = out.iter().map(|r| (r.seq, r.payload.clone())).collect();
        assert_eq!(got, [(1, b"first".to_vec()), (4, b"fourth".to_vec())]);
        for r in &out {
            c.ack(r.loc).unwrap();
        }
        assert_eq!(
            ring.stats().used_bytes,
            0,
            "pads are freed with their neighbours"
        );
        drop(c);
        drop(ring);
        let ring = Ring::open(&cfg).unwrap();
        assert_eq!(
            ring.recovery().discarded_uncommitted,
            0,
            "repairs are persistent"
        );
    }

    #[test]
    fn long_discarded_regions_get_several_pads_that_tile_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        for extent in (48..=4096).step_by(8) {
            pad_over(&ring.map, 0, extent, 200);
            let mut pieces = 0;
            // SAFETY: single-threaded test, nothing writes meanwhile.
            walk(unsafe { ring.map.data() }, 0, extent, |p| {
                assert!(matches!(p, Piece::Pad), "extent {extent}: {p:?}");
                pieces += 1;
            });
            assert!(pieces >= extent / 200, "extent {extent}: {pieces} pads");
        }
    }

    #[test]
    fn recovery_cuts_a_trailing_dead_reservation_shorter_than_a_header() {
        // Only a damaged header page can produce this; recovery must still
        // leave a ring the consumer can drain.
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        {
            let ring = Ring::open(&cfg).unwrap();
            ring.append(1, 1, 0, b"one").unwrap();
            ring.map.head().fetch_add(16, Ordering::Relaxed);
        }
        let ring = Ring::open(&cfg).unwrap();
        assert_eq!(ring.recovery().unacked_records, 1);
        assert_eq!(
            ring.map.head().load(Ordering::Relaxed),
            56,
            "head pulled back to the last record"
        );
    }

    #[test]
    fn recovery_finishes_an_interrupted_free() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        {
            let ring = Ring::open(&cfg).unwrap();
            for seq in 1..=3 {
                ring.append(seq, 1, 0, &[seq as u8; 40]).unwrap();
            }
            // The consumer acked 1 and 2, announced the free, and died.
            let p2 = 88;
            ring.map.store_state(0, STATE_ACKED);
            ring.map.store_state(p2, STATE_ACKED);
            ring.map.u64_at(OFF_FREEING).store(176, Ordering::Relaxed);
        }
        let ring = Ring::open(&cfg).unwrap();
        assert_eq!(ring.recovery().finished_free_bytes, 176);
        assert_eq!(ring.map.tail().load(Ordering::Relaxed), 176);
        assert_eq!(ring.recovery().unacked_records, 1);
        // SAFETY: single-threaded test, nothing writes the mapping meanwhile.
        let data = unsafe { ring.map.data() };
        assert!(
            data[..176].iter().all(|&b| b == 0),
            "freed space is zero again"
        );
    }

    #[test]
    fn recovery_rejects_impossible_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        {
            let ring = Ring::open(&cfg).unwrap();
            ring.map.tail().store(64, Ordering::Relaxed);
        }
        let e = Ring::open(&cfg).unwrap_err();
        assert!(matches!(e, RingError::Format { .. }), "{e}");
        assert!(e.to_string().contains("impossible cursors"), "{e}");
    }
}
