//! The single consumer: polls committed records, acknowledges them (in any
//! order), and frees acknowledged space at the tail.
//!
//! The consumer's cursor only moves over records it has seen published, and
//! it stops at a reserved but uncommitted record: that writer is mid-copy,
//! and skipping it would lose the record. Frees follow the protocol in
//! `layout.rs` ("Freeing").

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::PoisonError;
use std::sync::atomic::{Ordering, compiler_fence};

use super::layout::{
    OFF_FREEING, REC_HDR, STATE_ACKED, STATE_COMMITTED, STATE_EMPTY, STATE_PAD, lap_rest,
};
use super::spill::FILE_HDR;
use super::{Location, Record, Ring, RingError};

/// The one reader of a [`Ring`], borrowed from it ([`Ring::consumer`]).
/// It is `Send`, so a flusher task can own it together with its
/// `Arc<Ring>`.
#[derive(Debug)]
pub struct Consumer<'a> {
    ring: &'a Ring,
    /// Absolute ring position of the next record to poll.
    cursor: u64,
    /// `(segment, offset)` of the next spilled record to poll.
    spill_cursor: (u64, u64),
    /// Open spill segment files, for reads and ack writes.
    handles: BTreeMap<u64, File>,
}

impl Drop for Consumer<'_> {
    fn drop(&mut self) {
        self.ring.consumer_taken.store(false, Ordering::Release);
    }
}

impl<'a> Consumer<'a> {
    pub(crate) fn new(ring: &'a Ring) -> Consumer<'a> {
        Consumer {
            ring,
            cursor: ring.map.tail().load(Ordering::Acquire),
            spill_cursor: (0, FILE_HDR),
            handles: BTreeMap::new(),
        }
    }

    /// Copy up to `max` committed records not yet polled by this consumer
    /// into `out` (ring first, then spill segments, each in append order).
    /// Returns how many were added. A new consumer (and so every open of
    /// the ring) polls every unacked record again once.
    pub fn poll(&mut self, max: usize, out: &mut Vec<Record>) -> Result<usize, RingError> {
        let mut n = self.poll_ring(max, out)?;
        if n < max {
            n += self
                .ring
                .spill
                .poll(&mut self.spill_cursor, &mut self.handles, max - n, out)?;
        }
        self.free();
        Ok(n)
    }

    fn poll_ring(&mut self, max: usize, out: &mut Vec<Record>) -> Result<usize, RingError> {
        let map = &self.ring.map;
        let cap = map.capacity();
        let head = map.head().load(Ordering::Acquire);
        let mut n = 0;
        while self.cursor < head && n < max {
            let p = self.cursor;
            let rest = lap_rest(p, cap);
            if rest < REC_HDR {
                self.cursor += rest;
                continue;
            }
            let h = map.load_header(p);
            match h.state {
                // Reserved, not yet committed: its writer is copying.
                STATE_EMPTY => break,
                STATE_COMMITTED | STATE_ACKED | STATE_PAD => {}
                _ => return Err(self.corrupt(p, "unknown record state")),
            }
            // After recovery every record here was written by this process,
            // so an unsound header means something else wrote the mapping.
            if !h.is_sound_at(p) || h.extent() > rest || p + h.extent() > head {
                return Err(self.corrupt(p, "unsound record header"));
            }
            if h.state == STATE_COMMITTED {
                let mut payload = Vec::new();
                // SAFETY: the state was loaded with Acquire and is
                // COMMITTED, so the writer is done with the body; only this
                // consumer changes or frees it afterwards.
                unsafe { map.read_payload(p, h.len, &mut payload) };
                if crc32fast::hash(&payload) == h.pcrc {
                    out.push(Record {
                        seq: h.seq,
                        kind: h.kind,
                        ts_ms: h.ts_ms,
                        loc: Location::Ring { pos: p },
                        payload,
                    });
                    n += 1;
                } else {
                    // Its extent is known (sound header): drop just this one,
                    // so the tail can move past it.
                    tracing::error!(
                        path = %self.ring.path.display(),
                        pos = p,
                        seq = h.seq,
                        "ring record fails its checksum, dropping it: data lost"
                    );
                    map.store_state(p, STATE_PAD);
                    self.ring.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.cursor = p + h.extent();
        }
        Ok(n)
    }

    fn corrupt(&self, pos: u64, what: &'static str) -> RingError {
        RingError::Corrupt {
            path: self.ring.path.clone(),
            pos,
            what,
        }
    }

    /// Acknowledge a polled record: persist ACKED in its state word (ring)
    /// or file (spill), free acked space at the tail, delete fully acked
    /// spill segments. Acking a record twice is a no-op. Only locations
    /// polled by this consumer are accepted.
    pub fn ack(&mut self, loc: Location) -> Result<(), RingError> {
        match loc {
            Location::Ring { pos } => self.ack_ring(pos)?,
            Location::Spill { segment, offset } => {
                self.ring.spill.ack(segment, offset, &mut self.handles)?
            }
        }
        Ok(())
    }

    fn ack_ring(&mut self, pos: u64) -> Result<(), RingError> {
        let map = &self.ring.map;
        let unknown = RingError::UnknownRecord {
            loc: Location::Ring { pos },
        };
        let tail = map.tail().load(Ordering::Relaxed);
        if pos < tail {
            return Ok(()); // acked before, and already freed
        }
        if pos >= self.cursor || !pos.is_multiple_of(8) || lap_rest(pos, map.capacity()) < REC_HDR {
            return Err(unknown);
        }
        let h = map.load_header(pos);
        if !h.is_sound_at(pos) {
            return Err(unknown);
        }
        match h.state {
            STATE_ACKED => return Ok(()),
            STATE_COMMITTED => {}
            _ => return Err(unknown),
        }
        map.store_state(pos, STATE_ACKED);
        self.ring.acked.fetch_add(1, Ordering::Relaxed);
        self.free();
        Ok(())
    }

    /// Free the run of acked records and pads at the tail (up to the
    /// cursor). O(1) when the tail record is still unacked.
    fn free(&mut self) {
        let map = &self.ring.map;
        let cap = map.capacity();
        let tail = map.tail().load(Ordering::Relaxed);
        let mut p = tail;
        while p < self.cursor {
            let rest = lap_rest(p, cap);
            if rest < REC_HDR {
                p += rest;
                continue;
            }
            let h = map.load_header(p);
            if h.state != STATE_ACKED && h.state != STATE_PAD {
                break;
            }
            p += h.extent();
        }
        if p == tail {
            return;
        }
        let _g = self
            .ring
            .free_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.u64_at(OFF_FREEING).store(p, Ordering::Release);
        // The announcement must precede the zeroing in program order, so a
        // crash in between is finished by recovery (layout "Freeing").
        compiler_fence(Ordering::SeqCst);
        // SAFETY: `[tail, p)` holds only acked records and pads below our
        // cursor: no writer may touch it until the tail store below, no
        // other reader exists (we are the consumer, and `stats` waits on
        // `free_lock`).
        unsafe { map.zero(tail, p) };
        map.tail().store(p, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::RecordHeader;
    use super::super::{Placement, test_cfg};
    use super::*;

    #[test]
    fn poll_stops_at_a_reserved_uncommitted_record_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        ring.append(1, 1, 0, b"one").unwrap();
        // A writer in the middle of its copy.
        let r = ring.reserve(48 + 8).unwrap();
        ring.append(3, 1, 0, b"three").unwrap();
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        assert_eq!(
            c.poll(10, &mut out).unwrap(),
            1,
            "must not skip past the writer in progress"
        );
        assert_eq!(c.poll(10, &mut out).unwrap(), 0);
        let h = RecordHeader::record(2, 1, 0, b"two").at(r.pos);
        ring.map.store_header_fields(r.pos, &h);
        // SAFETY: the reservation is ours and unpublished.
        unsafe { ring.map.write_payload(r.pos, b"two") };
        ring.map.store_state(r.pos, STATE_COMMITTED);
        assert_eq!(c.poll(10, &mut out).unwrap(), 2);
        let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn out_of_order_acks_free_only_contiguous_space() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        for seq in 1..=4 {
            ring.append(seq, 1, seq, &[0; 40]).unwrap(); // extent 88
        }
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        c.poll(10, &mut out).unwrap();
        c.ack(out[1].loc).unwrap();
        c.ack(out[3].loc).unwrap();
        let s = ring.stats();
        assert_eq!(
            s.used_bytes,
            4 * 88,
            "nothing freed while the first is unacked"
        );
        assert_eq!(
            (
                s.unacked_records,
                s.oldest_unacked_seq,
                s.oldest_unacked_ts_ms
            ),
            (2, Some(1), Some(1))
        );
        c.ack(out[0].loc).unwrap();
        let s = ring.stats();
        assert_eq!(s.used_bytes, 2 * 88, "first two freed");
        assert_eq!(s.oldest_unacked_seq, Some(3));
        c.ack(out[0].loc).unwrap(); // freed already: a no-op
        c.ack(out[1].loc).unwrap();
        c.ack(out[2].loc).unwrap();
        assert_eq!(ring.stats().used_bytes, 0);
    }

    #[test]
    fn acks_of_unpolled_or_bogus_locations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        ring.append(1, 1, 0, &[0; 40]).unwrap();
        ring.append(2, 1, 0, &[0; 40]).unwrap();
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        c.poll(1, &mut out).unwrap();
        let e = c.ack(Location::Ring { pos: 88 }).unwrap_err();
        assert!(
            matches!(e, RingError::UnknownRecord { .. }),
            "not polled yet: {e}"
        );
        c.poll(1, &mut out).unwrap();
        let e = c.ack(Location::Ring { pos: 8 }).unwrap_err();
        assert!(
            matches!(e, RingError::UnknownRecord { .. }),
            "not a record boundary: {e}"
        );
        c.ack(Location::Ring { pos: 88 }).unwrap();
    }

    #[test]
    fn wraps_around_many_laps() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 1024)).unwrap();
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        for seq in 1..=500u64 {
            let len = (seq * 37 % 300) as usize;
            let payload = vec![seq as u8; len];
            assert_eq!(
                ring.append(seq, 1, 0, &payload).unwrap(),
                Placement::Ring,
                "acked as we go: never full"
            );
            out.clear();
            assert_eq!(c.poll(10, &mut out).unwrap(), 1);
            assert_eq!((out[0].seq, &out[0].payload), (seq, &payload));
            c.ack(out[0].loc).unwrap();
        }
        assert!(
            ring.map.head().load(Ordering::Relaxed) > 50 * 1024,
            "many laps"
        );
        assert_eq!(ring.stats().used_bytes, 0);
    }

    #[test]
    fn a_corrupted_live_record_is_dropped_not_wedged() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        ring.append(1, 1, 0, &[1; 40]).unwrap();
        ring.append(2, 1, 0, &[2; 40]).unwrap();
        // A stray write into the first payload.
        // SAFETY: single-threaded; nothing else touches these bytes.
        unsafe { ring.map.write_payload(0, &[9]) };
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        assert_eq!(c.poll(10, &mut out).unwrap(), 1);
        assert_eq!(out[0].seq, 2);
        c.ack(out[0].loc).unwrap();
        let s = ring.stats();
        assert_eq!((s.used_bytes, s.unacked_records), (0, 0), "{s:?}");
    }
}
