//! The ring's byte format, and the only code that touches the mapping.
//!
//! # File layout (all integers little-endian)
//!
//! ```text
//! ring file = header page (4096 B) ++ data area (capacity B)
//!
//! header page
//!   off   size  field
//!     0     8   magic "AFFRING1"            written last at creation
//!     8     4   version = 1
//!    12     4   header page length = 4096
//!    16     8   capacity (data area bytes, multiple of 8)
//!   128     8   head      AtomicU64  absolute reserve cursor (bytes ever reserved)
//!   136     8   reserved  AtomicU64  records reserved since this process opened the
//!                                    ring; scratch, reset at open, shares head's line
//!                                    so counting costs no extra cache-line transfer
//!   256     8   tail      AtomicU64  absolute position of the oldest unfreed byte
//!   264     8   freeing   AtomicU64  end of a free in progress (see "Freeing")
//!   384     8   next_seq  AtomicU64  next per-edge sequence number (starts at 1)
//!   512     8   next_spill_segment AtomicU64
//!   (head, tail, next_seq each own a 128-byte line: writers hammer head,
//!    the consumer hammers tail.)
//!
//! data area: absolute position p lives at byte 4096 + p % capacity.
//!
//! record (8-aligned, never straddles the end of the data area)
//!   off   size  field
//!     0     4   state   AtomicU32: 0 empty | "RCMT" committed | "RACK" acked | "RPAD" pad
//!     4     4   len     payload bytes (pad: body bytes)
//!     8     8   pos     absolute position of this record (rejects stale laps)
//!    16     8   seq
//!    24     8   ts_ms
//!    32     4   kind    (u8 in the low byte, upper bytes zero)
//!    36     4   pcrc    crc32 of the payload (0 for pad)
//!    40     4   hcrc    crc32 of bytes 4..40 (so it covers pcrc too)
//!    44     4   zero
//!    48   len   payload, then zeros up to the next multiple of 8
//!   extent = 48 + align8(len)
//! ```
//!
//! A spill segment (`spill.rs`) is a 16-byte file header (`"AFFSPIL1"`,
//! version u32, zero u32) followed by records in this same framing, with
//! `pos` = the record's byte offset in the file.
//!
//! # Invariants
//!
//! 1. `tail <= head <= tail + capacity`, both multiples of 8. `[tail, head)`
//!    is a gapless sequence of reservations; everything in
//!    `[head, tail + capacity)` (the free space) is zero bytes.
//! 2. A reservation is either one record, or a *lap remainder* followed by
//!    one record at the start of the next lap, reserved in the same CAS.
//!    A lap remainder of at least 48 bytes carries a PAD record; a shorter
//!    one ("slack") carries nothing, and every walker skips a position whose
//!    distance to the lap end is under 48 bytes.
//! 3. A writer stores the header fields (all but `state`), then the
//!    payload, then `state = COMMITTED` with Release. A compiler fence sits
//!    between header and payload, so a process killed mid-append leaves
//!    either a header with a valid `hcrc` (extent known) or zeros plus part of
//!    a header; never attacker-chosen payload bytes without a header before
//!    them. That is what makes recovery's forward scan safe.
//! 4. Only the consumer changes a committed record's `state` (to ACKED, or to
//!    PAD when its payload is found corrupt), and only the consumer frees.
//!
//! # Freeing
//!
//! The consumer frees a run `[tail, t')` of ACKED/PAD records by storing
//! `freeing = t'`, zeroing the run, then storing `tail = t'` (Release). A
//! crash in between leaves `freeing > tail`; recovery finishes the zeroing.
//! Writers load `tail` with Acquire before checking for room, so they only
//! ever write into zeroed bytes.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::MmapRaw;

pub(crate) const MAGIC: [u8; 8] = *b"AFFRING1";
pub(crate) const VERSION: u32 = 1;
/// Bytes before the data area.
pub(crate) const HEADER_PAGE: u64 = 4096;

pub(crate) const OFF_MAGIC: u64 = 0;
pub(crate) const OFF_VERSION: u64 = 8;
pub(crate) const OFF_HEADER_LEN: u64 = 12;
pub(crate) const OFF_CAPACITY: u64 = 16;
pub(crate) const OFF_HEAD: u64 = 128;
pub(crate) const OFF_RESERVED: u64 = 136;
pub(crate) const OFF_TAIL: u64 = 256;
pub(crate) const OFF_FREEING: u64 = 264;
pub(crate) const OFF_NEXT_SEQ: u64 = 384;
pub(crate) const OFF_NEXT_SEGMENT: u64 = 512;

/// Record header bytes.
pub(crate) const REC_HDR: u64 = 48;
/// Largest payload an append accepts.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Smallest data area `Ring::open` accepts.
pub(crate) const MIN_CAPACITY: u64 = 1024;

pub(crate) const STATE_EMPTY: u32 = 0;
pub(crate) const STATE_COMMITTED: u32 = u32::from_le_bytes(*b"RCMT");
pub(crate) const STATE_ACKED: u32 = u32::from_le_bytes(*b"RACK");
pub(crate) const STATE_PAD: u32 = u32::from_le_bytes(*b"RPAD");

pub(crate) fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

/// Bytes from `pos` to the end of its lap.
pub(crate) fn lap_rest(pos: u64, cap: u64) -> u64 {
    cap - pos % cap
}

/// One record header, decoded. `state` is whatever was loaded; the other
/// fields are only meaningful when [`RecordHeader::is_sound_at`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub state: u32,
    pub len: u32,
    pub pos: u64,
    pub seq: u64,
    pub ts_ms: u64,
    pub kind: u8,
    /// Bytes 33..36 (the kind word's upper bytes): zero when written, kept
    /// as read so that `hcrc` covers them.
    pub kind_rsvd: u32,
    pub pcrc: u32,
    pub hcrc: u32,
}

impl RecordHeader {
    /// A committed record for `payload`, not yet placed (`pos` 0, `hcrc`
    /// unsealed). The payload crc is computed here, outside any contended
    /// section.
    pub(crate) fn record(seq: u64, kind: u8, ts_ms: u64, payload: &[u8]) -> RecordHeader {
        let len =
            u32::try_from(payload.len()).expect("payload length was checked against MAX_PAYLOAD");
        RecordHeader {
            state: STATE_COMMITTED,
            len,
            pos: 0,
            seq,
            ts_ms,
            kind,
            kind_rsvd: 0,
            pcrc: crc32fast::hash(payload),
            hcrc: 0,
        }
    }

    /// A pad covering `extent` bytes (>= 48, multiple of 8) at `pos`.
    pub(crate) fn pad(pos: u64, extent: u64) -> RecordHeader {
        debug_assert!(extent >= REC_HDR && extent.is_multiple_of(8));
        let len = u32::try_from(extent - REC_HDR)
            .expect("pads are at most a lap remainder (< 64 KiB) or MAX_PAD_EXTENT (recovery)");
        RecordHeader {
            state: STATE_PAD,
            len,
            pos,
            seq: 0,
            ts_ms: 0,
            kind: 0,
            kind_rsvd: 0,
            pcrc: 0,
            hcrc: 0,
        }
        .sealed()
    }

    /// This header placed at `pos`, with its `hcrc` computed.
    pub(crate) fn at(mut self, pos: u64) -> RecordHeader {
        self.pos = pos;
        self.sealed()
    }

    fn sealed(mut self) -> RecordHeader {
        self.hcrc = self.compute_hcrc();
        self
    }

    pub(crate) fn compute_hcrc(&self) -> u32 {
        let b = self.to_bytes();
        crc32fast::hash(&b[4..40])
    }

    pub(crate) fn extent(&self) -> u64 {
        REC_HDR + align8(u64::from(self.len))
    }

    /// Self-consistent and claims to sit at `at`. States are not checked:
    /// an EMPTY state with a sound header is a writer that died mid-append.
    pub(crate) fn is_sound_at(&self, at: u64) -> bool {
        self.pos == at
            && self.hcrc == self.compute_hcrc()
            && (self.state == STATE_PAD || self.len as usize <= MAX_PAYLOAD)
    }

    pub(crate) fn to_bytes(self) -> [u8; REC_HDR as usize] {
        let mut b = [0u8; REC_HDR as usize];
        b[0..4].copy_from_slice(&self.state.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.pos.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.ts_ms.to_le_bytes());
        b[32..36].copy_from_slice(&(u32::from(self.kind) | self.kind_rsvd << 8).to_le_bytes());
        b[36..40].copy_from_slice(&self.pcrc.to_le_bytes());
        b[40..44].copy_from_slice(&self.hcrc.to_le_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8; REC_HDR as usize]) -> RecordHeader {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        RecordHeader {
            state: u32_at(0),
            len: u32_at(4),
            pos: u64_at(8),
            seq: u64_at(16),
            ts_ms: u64_at(24),
            kind: b[32],
            kind_rsvd: u32_at(32) >> 8,
            pcrc: u32_at(36),
            hcrc: u32_at(40),
        }
    }

    /// Decode the first 48 bytes of `bytes`, if there are that many.
    pub(crate) fn from_slice(bytes: &[u8]) -> Option<RecordHeader> {
        let b: &[u8; REC_HDR as usize] = bytes.get(..REC_HDR as usize)?.try_into().ok()?;
        Some(RecordHeader::from_bytes(b))
    }
}

/// The shared mapping of a ring file: header page plus data area.
///
/// Every access goes through raw pointers (memmap2's `MmapRaw` never hands
/// out references): header words and record header words as atomics,
/// payloads by `copy_nonoverlapping` into or out of a region the caller owns
/// by the reservation protocol (module docs).
#[derive(Debug)]
pub(crate) struct Mapping {
    /// Owns the mapping; only `base` is used to reach it.
    _map: MmapRaw,
    base: NonNull<u8>,
    len: u64,
    cap: u64,
}

// SAFETY: `base` points into `map`, which is Send + Sync and lives as long as
// `self`; all shared accesses go through atomics or disjoint reserved
// regions (see the module docs), so sharing `Mapping` across threads is as
// safe as sharing `MmapRaw`.
unsafe impl Send for Mapping {}
// SAFETY: as for Send above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Wrap a mapping of exactly `HEADER_PAGE + cap` bytes.
    pub(crate) fn new(map: MmapRaw, cap: u64) -> Mapping {
        let len = map.len() as u64;
        assert_eq!(
            len,
            HEADER_PAGE + cap,
            "mapping covers header page and data area"
        );
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap never returns a null mapping");
        Mapping {
            _map: map,
            base,
            len,
            cap,
        }
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.cap
    }

    /// Pointer to byte `off` of the mapping, for an access of `n` bytes.
    fn ptr(&self, off: u64, n: u64) -> *mut u8 {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len),
            "access {off}+{n} outside the {}-byte mapping",
            self.len
        );
        let off = usize::try_from(off).expect("mapping length fits usize");
        // SAFETY: `off + n <= len`, the mapping's length, so the result stays
        // inside the same allocation (the mapping).
        unsafe { self.base.as_ptr().add(off) }
    }

    /// The 8-aligned word at mapping offset `off`.
    pub(crate) fn u64_at(&self, off: u64) -> &AtomicU64 {
        assert_eq!(off % 8, 0, "u64 word at {off} is not 8-aligned");
        let p = self.ptr(off, 8).cast::<u64>();
        // SAFETY: the mapping is page-aligned and `off` is a multiple of 8, so
        // `p` is aligned for AtomicU64; it is valid for reads and writes for
        // as long as `self` (the mapping) lives; every concurrent access to
        // these bytes is atomic, and non-atomic ones (zeroing of freed space,
        // recovery before sharing) happen-before them (module docs).
        unsafe { AtomicU64::from_ptr(p) }
    }

    /// The 4-aligned word at mapping offset `off`.
    pub(crate) fn u32_at(&self, off: u64) -> &AtomicU32 {
        assert_eq!(off % 4, 0, "u32 word at {off} is not 4-aligned");
        let p = self.ptr(off, 4).cast::<u32>();
        // SAFETY: as in `u64_at`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(p) }
    }

    pub(crate) fn head(&self) -> &AtomicU64 {
        self.u64_at(OFF_HEAD)
    }

    pub(crate) fn tail(&self) -> &AtomicU64 {
        self.u64_at(OFF_TAIL)
    }

    /// Mapping offset of absolute data position `pos`.
    pub(crate) fn data_off(&self, pos: u64) -> u64 {
        HEADER_PAGE + pos % self.cap
    }

    /// The state word of the record at `pos`.
    pub(crate) fn state(&self, pos: u64) -> &AtomicU32 {
        self.u32_at(self.data_off(pos))
    }

    /// Load the record header at `pos`: state with Acquire (so a committed
    /// record's other fields and payload are visible), the rest Relaxed.
    pub(crate) fn load_header(&self, pos: u64) -> RecordHeader {
        let d = self.data_off(pos);
        let state = self.u32_at(d).load(Ordering::Acquire);
        let w64 = |o| u64::from_le(self.u64_at(d + o).load(Ordering::Relaxed));
        let w32 = |o| u32::from_le(self.u32_at(d + o).load(Ordering::Relaxed));
        RecordHeader {
            state: u32::from_le(state),
            len: w32(4),
            pos: w64(8),
            seq: w64(16),
            ts_ms: w64(24),
            kind: (w32(32) & 0xff) as u8,
            kind_rsvd: w32(32) >> 8,
            pcrc: w32(36),
            hcrc: w32(40),
        }
    }

    /// Store every header field but `state` (Relaxed; the state store that
    /// follows publishes them).
    pub(crate) fn store_header_fields(&self, pos: u64, h: &RecordHeader) {
        let d = self.data_off(pos);
        let w64 = |o, v: u64| self.u64_at(d + o).store(v.to_le(), Ordering::Relaxed);
        let w32 = |o, v: u32| self.u32_at(d + o).store(v.to_le(), Ordering::Relaxed);
        w32(4, h.len);
        w64(8, h.pos);
        w64(16, h.seq);
        w64(24, h.ts_ms);
        w32(32, u32::from(h.kind) | h.kind_rsvd << 8);
        w32(36, h.pcrc);
        w32(40, h.hcrc);
        w32(44, 0);
    }

    /// Publish the record at `pos` with `state` (Release).
    pub(crate) fn store_state(&self, pos: u64, state: u32) {
        self.state(pos).store(state.to_le(), Ordering::Release);
    }

    /// Write a whole header (fields, then state) at `pos`.
    pub(crate) fn store_header(&self, pos: u64, h: &RecordHeader) {
        self.store_header_fields(pos, h);
        self.store_state(pos, h.state);
    }

    /// Copy `payload` into the body of the record at `pos`.
    ///
    /// # Safety
    /// The caller owns `[pos + 48, pos + 48 + payload.len())`: it reserved it
    /// and has not published the record, or it has exclusive access to the
    /// ring (recovery); no other thread reads or writes those bytes now.
    pub(crate) unsafe fn write_payload(&self, pos: u64, payload: &[u8]) {
        let dst = self.ptr(self.data_off(pos) + REC_HDR, payload.len() as u64);
        // SAFETY: `dst` is in bounds for `payload.len()` bytes (checked by
        // `ptr`); the source is a Rust slice, the destination is inside the
        // mapping, so they cannot overlap; the caller guarantees no one else
        // touches the destination meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), dst, payload.len()) }
    }

    /// Append the `len`-byte body of the record at `pos` to `out`.
    ///
    /// # Safety
    /// The record is published (its state was loaded with Acquire and is
    /// COMMITTED) and nobody writes its body while this runs: only the
    /// consumer, the caller, could (by freeing it).
    pub(crate) unsafe fn read_payload(&self, pos: u64, len: u32, out: &mut Vec<u8>) {
        let len = len as usize;
        let src = self.ptr(self.data_off(pos) + REC_HDR, len as u64);
        out.reserve(len);
        let start = out.len();
        // SAFETY: `src` is in bounds for `len` bytes; `out` has room for `len`
        // more bytes after `reserve`; a Vec's buffer never overlaps the
        // mapping; the caller guarantees the source is not being written.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(start), len);
            out.set_len(start + len);
        }
    }

    /// Zero the absolute range `[from, to)` (at most one capacity long).
    ///
    /// # Safety
    /// Nobody else accesses these bytes now: they are freed records not yet
    /// released to writers (tail not yet advanced past them), or the caller
    /// has exclusive access (recovery).
    pub(crate) unsafe fn zero(&self, from: u64, to: u64) {
        assert!(
            from <= to && to - from <= self.cap,
            "zero range {from}..{to}"
        );
        let mut p = from;
        while p < to {
            let n = lap_rest(p, self.cap).min(to - p);
            let dst = self.ptr(self.data_off(p), n);
            // SAFETY: in bounds (checked by `ptr`; `n` stops at the lap end);
            // the caller guarantees exclusive access to these bytes.
            unsafe { std::ptr::write_bytes(dst, 0, n as usize) };
            p += n;
        }
    }

    /// The data area as a byte slice.
    ///
    /// # Safety
    /// No thread of this process writes the mapping while the slice lives
    /// (recovery, before the ring is shared). Other processes only read it
    /// (we hold the file's exclusive lock).
    pub(crate) unsafe fn data(&self) -> &[u8] {
        let p = self.ptr(HEADER_PAGE, self.cap);
        // SAFETY: `p..p+cap` is in bounds and initialised (file-backed
        // memory); the caller guarantees no concurrent writes for the
        // slice's lifetime.
        unsafe { std::slice::from_raw_parts(p, self.cap as usize) }
    }

    /// Write a fresh header page: version, capacity, cursors, then the magic
    /// last, so a process killed mid-creation leaves an all-zero header page
    /// that the next open re-initialises.
    pub(crate) fn init_header(&self) {
        let h32 = |o, v: u32| self.u32_at(o).store(v.to_le(), Ordering::Relaxed);
        let h64 = |o, v: u64| self.u64_at(o).store(v.to_le(), Ordering::Relaxed);
        h32(OFF_VERSION, VERSION);
        h32(OFF_HEADER_LEN, HEADER_PAGE as u32);
        h64(OFF_CAPACITY, self.cap);
        h64(OFF_HEAD, 0);
        h64(OFF_RESERVED, 0);
        h64(OFF_TAIL, 0);
        h64(OFF_FREEING, 0);
        h64(OFF_NEXT_SEQ, 1);
        h64(OFF_NEXT_SEGMENT, 0);
        self.u64_at(OFF_MAGIC)
            .store(u64::from_ne_bytes(MAGIC), Ordering::Release);
    }
}

/// The header page fields as read from a file (`inspect`, and `open` before
/// mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderPage {
    pub magic: [u8; 8],
    pub version: u32,
    pub header_len: u32,
    pub capacity: u64,
    pub head: u64,
    pub tail: u64,
    pub freeing: u64,
    pub next_seq: u64,
    pub next_segment: u64,
}

impl HeaderPage {
    pub(crate) fn from_bytes(b: &[u8; HEADER_PAGE as usize]) -> HeaderPage {
        let u64_at = |o: u64| {
            let o = o as usize;
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |o: u64| {
            let o = o as usize;
            u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        HeaderPage {
            magic,
            version: u32_at(OFF_VERSION),
            header_len: u32_at(OFF_HEADER_LEN),
            capacity: u64_at(OFF_CAPACITY),
            head: u64_at(OFF_HEAD),
            tail: u64_at(OFF_TAIL),
            freeing: u64_at(OFF_FREEING),
            next_seq: u64_at(OFF_NEXT_SEQ),
            next_segment: u64_at(OFF_NEXT_SEGMENT),
        }
    }

    /// Why this is not a header page of ours, if it is not.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.magic != MAGIC {
            return Err(format!(
                "bad magic {:?}",
                String::from_utf8_lossy(&self.magic)
            ));
        }
        if self.version != VERSION {
            return Err(format!("unsupported version {}", self.version));
        }
        if u64::from(self.header_len) != HEADER_PAGE {
            return Err(format!(
                "header length {}, expected {HEADER_PAGE}",
                self.header_len
            ));
        }
        if self.capacity < MIN_CAPACITY || !self.capacity.is_multiple_of(8) {
            return Err(format!(
                "capacity {} is not a multiple of 8 of at least {MIN_CAPACITY}",
                self.capacity
            ));
        }
        Ok(())
    }

    /// Why the cursors are impossible, if they are (invariant 1).
    pub(crate) fn check_cursors(&self) -> Result<(), String> {
        let (h, t) = (self.head, self.tail);
        if !h.is_multiple_of(8) || !t.is_multiple_of(8) || t > h || h - t > self.capacity {
            return Err(format!(
                "impossible cursors: head {h}, tail {t}, capacity {}",
                self.capacity
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_seals() {
        let h = RecordHeader::record(42, 2, 1_700_000_000_000, b"hello").at(4096 * 3 + 8);
        let back = RecordHeader::from_bytes(&h.to_bytes());
        assert_eq!(back, h, "bytes round trip");
        assert!(
            back.is_sound_at(4096 * 3 + 8),
            "sealed header is sound at its position"
        );
        assert!(
            !back.is_sound_at(8),
            "a header from another position is rejected"
        );
        assert_eq!(h.extent(), 48 + 8, "5-byte payload pads to 8");
        assert_eq!(h.state, STATE_COMMITTED);
    }

    #[test]
    fn any_field_flip_breaks_hcrc() {
        let h = RecordHeader::record(7, 1, 99, &[1, 2, 3]).at(64);
        let bytes = h.to_bytes();
        for i in 4..40 {
            let mut b = bytes;
            b[i] ^= 0x10;
            let bad = RecordHeader::from_bytes(&b);
            assert!(
                !bad.is_sound_at(64),
                "flip of header byte {i} must be detected"
            );
        }
        // The state word is deliberately outside the crc: acks rewrite it.
        let mut b = bytes;
        b[0..4].copy_from_slice(&STATE_ACKED.to_le_bytes());
        assert!(
            RecordHeader::from_bytes(&b).is_sound_at(64),
            "state change keeps the header sound"
        );
    }

    #[test]
    fn pad_is_sound_and_covers_its_extent() {
        let p = RecordHeader::pad(800, 96);
        assert!(p.is_sound_at(800));
        assert_eq!(p.extent(), 96);
        assert_eq!(p.state, STATE_PAD);
    }

    #[test]
    fn oversized_len_is_unsound_for_records() {
        let mut h = RecordHeader::record(1, 1, 1, b"x");
        h.len = MAX_PAYLOAD as u32 + 8;
        let h = h.at(0);
        assert!(
            !h.is_sound_at(0),
            "len above MAX_PAYLOAD is rejected even with a matching crc"
        );
    }

    #[test]
    fn states_are_distinct_and_nonzero() {
        let s = [STATE_COMMITTED, STATE_ACKED, STATE_PAD];
        assert!(s.iter().all(|&x| x != STATE_EMPTY));
        assert!(s[0] != s[1] && s[1] != s[2] && s[0] != s[2]);
    }

    #[test]
    fn header_page_checks() {
        let mut b = [0u8; HEADER_PAGE as usize];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_PAGE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&4096u64.to_le_bytes());
        let hp = HeaderPage::from_bytes(&b);
        assert_eq!(hp.check(), Ok(()));
        assert_eq!(hp.check_cursors(), Ok(()));
        let mut bad = hp;
        bad.head = 8;
        bad.tail = 16;
        assert!(bad.check_cursors().is_err(), "tail past head");
        bad.head = 4096 + 16 + 8;
        assert!(bad.check_cursors().is_err(), "more used than capacity");
        bad.magic = *b"AFFRING2";
        assert!(bad.check().is_err());
    }
}
