//! Spill segments: where appends go while the ring is full.
//!
//! ```text
//! spill_dir/spill-{segment:016}.log
//!   off  size
//!     0     8  magic "AFFSPIL1"
//!     8     4  version = 1
//!    12     4  zero
//!    16        records, framed exactly as in the ring (layout.rs), with
//!              pos = the record's byte offset in this file
//! ```
//!
//! # Invariants
//!
//! - Only the newest segment is appended to, by one writer at a time (the
//!   `Spill` mutex), one positioned `write_all_at` per record, written with
//!   state COMMITTED. A segment from before a restart, or one whose write
//!   failed, is sealed: the next spill opens a new segment. So a torn record
//!   can only be the last one in a file, and only after a crash; its append
//!   never returned, so nobody was told it was stored.
//! - `Segment::end` is the offset just past the last whole record. Readers
//!   never parse past it. Recovery truncates a torn tail off the file.
//! - Acks rewrite the 4-byte state word in place (`write_all_at`, the
//!   consumer's own handle). A segment whose records are all acked is
//!   deleted.
//! - Durable against process death (the page cache), not power loss: there
//!   is no fsync, as for the tmpfs ring itself.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::layout::{REC_HDR, RecordHeader, STATE_ACKED, STATE_COMMITTED, STATE_PAD};
use super::{Location, Record, RingError};

pub(crate) const SPILL_MAGIC: [u8; 8] = *b"AFFSPIL1";
pub(crate) const SPILL_VERSION: u32 = 1;
/// Bytes before the first record of a segment.
pub(crate) const FILE_HDR: u64 = 16;
pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// How much of a segment a reader fetches per read.
const CHUNK: usize = 256 * 1024;

pub(crate) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("spill-{segment:016}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("spill-")?.strip_suffix(".log")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn file_header() -> [u8; FILE_HDR as usize] {
    let mut b = [0u8; FILE_HDR as usize];
    b[..8].copy_from_slice(&SPILL_MAGIC);
    b[8..12].copy_from_slice(&SPILL_VERSION.to_le_bytes());
    b
}

/// The oldest unacked record of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Oldest {
    pub offset: u64,
    pub seq: u64,
    pub ts_ms: u64,
}

#[derive(Debug)]
struct Segment {
    end: u64,
    unacked: u64,
    first_unacked: Option<Oldest>,
}

#[derive(Debug)]
struct Writer {
    segment: u64,
    file: File,
}

#[derive(Debug)]
struct SpillState {
    segments: BTreeMap<u64, Segment>,
    writer: Option<Writer>,
    spilled_total: u64,
    buf: Vec<u8>,
}

/// The spill directory and what it holds.
#[derive(Debug)]
pub(crate) struct Spill {
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<SpillState>,
}

/// Spill counters for `Ring::stats`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpillStats {
    pub unacked: u64,
    pub bytes: u64,
    pub total: u64,
    /// `(seq, ts_ms)` of the first unacked record of the oldest segment.
    pub oldest: Option<(u64, u64)>,
}

/// What recovery found in the spill directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpillRecovery {
    /// Segments kept (holding unacked records).
    pub segments: u64,
    /// Unacked records in them.
    pub unacked_records: u64,
    /// Fully acked (or empty) segments deleted.
    pub deleted_segments: u64,
    /// Records whose payload failed its checksum (lost data), marked PAD.
    pub discarded_corrupt: u64,
    /// Bytes of a record torn by a crash at the end of a segment, cut off.
    pub torn_bytes: u64,
    /// Bytes without a sound header in the middle of a segment (damage).
    pub garbage_bytes: u64,
    /// Files named like segments that are not, left alone.
    pub foreign_files: u64,
    /// Largest sequence number still stored.
    pub max_seq: Option<u64>,
}

/// Reads `[.., end)` of one segment in chunks.
pub(crate) struct SegmentReader<'f> {
    file: &'f File,
    end: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

/// One step of a segment scan.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// At or past `end`.
    End,
    /// A sound record of `hdr.extent()` bytes; `payload_ok` is false for a
    /// COMMITTED record whose payload fails its crc (always true otherwise,
    /// and when payloads are not checked).
    Sound { hdr: RecordHeader, payload_ok: bool },
    /// No sound header here; the next one is `len` bytes on.
    Garbage { len: u64 },
    /// Nothing whole from here to `end` (a torn last record).
    Torn { len: u64 },
}

impl<'f> SegmentReader<'f> {
    pub(crate) fn new(file: &'f File, end: u64) -> SegmentReader<'f> {
        SegmentReader {
            file,
            end,
            buf: Vec::new(),
            buf_off: 0,
        }
    }

    /// Bytes `[off, off + n)`, or `None` if they run past `end`.
    pub(crate) fn get(&mut self, off: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let Some(stop) = off.checked_add(n as u64).filter(|&s| s <= self.end) else {
            return Ok(None);
        };
        if off < self.buf_off || stop > self.buf_off + self.buf.len() as u64 {
            let want = (n.max(CHUNK) as u64).min(self.end - off) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, off)?;
            self.buf_off = off;
        }
        let start = (off - self.buf_off) as usize;
        Ok(Some(&self.buf[start..start + n]))
    }

    fn sound_at(&mut self, off: u64) -> io::Result<Option<RecordHeader>> {
        let Some(b) = self.get(off, REC_HDR as usize)? else {
            return Ok(None);
        };
        Ok(RecordHeader::from_slice(b).filter(|h| h.is_sound_at(off)))
    }

    /// Classify what starts at `off`.
    pub(crate) fn step(&mut self, off: u64, check_payload: bool) -> io::Result<Step> {
        if off >= self.end {
            return Ok(Step::End);
        }
        if let Some(hdr) = self.sound_at(off)? {
            if off + hdr.extent() > self.end {
                // Sound header, short body: the torn last record. Never scan
                // into its payload (it may hold anything a client sent).
                return Ok(Step::Torn {
                    len: self.end - off,
                });
            }
            let mut payload_ok = true;
            if check_payload && hdr.state == STATE_COMMITTED {
                let p = self
                    .get(off + REC_HDR, hdr.len as usize)?
                    .unwrap_or_default();
                payload_ok = crc32fast::hash(p) == hdr.pcrc;
            }
            return Ok(Step::Sound { hdr, payload_ok });
        }
        let mut q = off + 8;
        while q + REC_HDR <= self.end {
            if let Some(h) = self.sound_at(q)?
                && q + h.extent() <= self.end
            {
                return Ok(Step::Garbage { len: q - off });
            }
            q += 8;
        }
        Ok(Step::Torn {
            len: self.end - off,
        })
    }
}

impl Spill {
    fn lock(&self) -> MutexGuard<'_, SpillState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn path_of(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    /// Open the spill directory (creating it), check every segment, cut
    /// torn tails, delete fully acked segments, and lift `next_segment`
    /// past every number in use.
    pub(crate) fn recover(
        dir: &Path,
        segment_bytes: u64,
        next_segment: &AtomicU64,
    ) -> Result<(Spill, SpillRecovery), RingError> {
        let dir_err = |error| RingError::SpillDir {
            path: dir.to_owned(),
            error,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_segment_name) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut report = SpillRecovery::default();
        let mut segments = BTreeMap::new();
        for &n in &numbers {
            if let Some(seg) = recover_segment(&segment_path(dir, n), &mut report)? {
                report.segments += 1;
                report.unacked_records += seg.unacked;
                segments.insert(n, seg);
            }
        }
        if let Some(&last) = numbers.last() {
            next_segment.fetch_max(last + 1, Ordering::Relaxed);
        }
        if report.torn_bytes > 0 {
            tracing::warn!(
                dir = %dir.display(),
                bytes = report.torn_bytes,
                "spill recovery cut a record torn by a crash (never acknowledged to a client)"
            );
        }
        if report.discarded_corrupt > 0 || report.garbage_bytes > 0 || report.foreign_files > 0 {
            tracing::error!(
                dir = %dir.display(),
                corrupt_records = report.discarded_corrupt,
                garbage_bytes = report.garbage_bytes,
                foreign_files = report.foreign_files,
                "spill segments are damaged: data lost"
            );
        }
        let spill = Spill {
            dir: dir.to_owned(),
            segment_bytes,
            state: Mutex::new(SpillState {
                segments,
                writer: None,
                spilled_total: 0,
                buf: Vec::new(),
            }),
        };
        Ok((spill, report))
    }

    /// Append one record (header not yet placed) to the newest segment,
    /// opening a new one when there is none or it is full.
    pub(crate) fn append(
        &self,
        next_segment: &AtomicU64,
        hdr: &RecordHeader,
        payload: &[u8],
    ) -> Result<(), RingError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let extent = hdr.extent();
        let full = match &st.writer {
            None => true,
            Some(w) => st
                .segments
                .get(&w.segment)
                .is_none_or(|s| s.end > FILE_HDR && s.end + extent > self.segment_bytes),
        };
        if full {
            self.rotate(st, next_segment)?;
        }
        let w = st.writer.as_ref().expect("rotate leaves a writer");
        let segment = w.segment;
        let seg = st
            .segments
            .get_mut(&segment)
            .expect("the writer's segment is listed");
        let offset = seg.end;
        let h = hdr.at(offset);
        st.buf.clear();
        st.buf.extend_from_slice(&h.to_bytes());
        st.buf.extend_from_slice(payload);
        st.buf.resize(extent as usize, 0);
        if let Err(error) = w.file.write_all_at(&st.buf, offset) {
            // Seal it: whatever part of the record landed lies past `end`,
            // where no reader looks, and recovery cuts it.
            st.writer = None;
            return Err(RingError::SpillWrite {
                path: self.path_of(segment),
                error,
            });
        }
        seg.end += extent;
        seg.unacked += 1;
        if seg.first_unacked.is_none() {
            seg.first_unacked = Some(Oldest {
                offset,
                seq: h.seq,
                ts_ms: h.ts_ms,
            });
        }
        st.spilled_total += 1;
        Ok(())
    }

    /// Seal the current segment (deleting it if fully acked) and start a new one.
    fn rotate(&self, st: &mut SpillState, next_segment: &AtomicU64) -> Result<(), RingError> {
        if let Some(w) = st.writer.take() {
            self.delete_if_done(st, w.segment);
        }
        let (segment, file) = loop {
            let n = next_segment.fetch_add(1, Ordering::Relaxed);
            let path = self.path_of(n);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (n, f),
                // A foreign file with our name: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(RingError::SpillWrite { path, error }),
            }
        };
        if let Err(error) = file.write_all_at(&file_header(), 0) {
            let path = self.path_of(segment);
            let _ = fs::remove_file(&path);
            return Err(RingError::SpillWrite { path, error });
        }
        st.segments.insert(
            segment,
            Segment {
                end: FILE_HDR,
                unacked: 0,
                first_unacked: None,
            },
        );
        st.writer = Some(Writer { segment, file });
        Ok(())
    }

    /// Delete `segment` if it holds no unacked record and is not being written.
    fn delete_if_done(&self, st: &mut SpillState, segment: u64) -> bool {
        let writing = st.writer.as_ref().is_some_and(|w| w.segment == segment);
        if writing || st.segments.get(&segment).is_none_or(|s| s.unacked > 0) {
            return false;
        }
        st.segments.remove(&segment);
        let path = self.path_of(segment);
        if let Err(error) = fs::remove_file(&path) {
            // Its records are all acked; a leftover file is only clutter
            // (recovery deletes it next time).
            tracing::warn!(path = %path.display(), %error, "could not delete fully acked spill segment");
        }
        true
    }

    pub(crate) fn stats(&self) -> SpillStats {
        let st = self.lock();
        let mut s = SpillStats {
            total: st.spilled_total,
            ..SpillStats::default()
        };
        for seg in st.segments.values() {
            s.unacked += seg.unacked;
            s.bytes += seg.end;
            if s.oldest.is_none() && seg.unacked > 0 {
                s.oldest = seg.first_unacked.map(|o| (o.seq, o.ts_ms));
            }
        }
        s
    }

    /// `(segment, end)` of every segment numbered `from` or later.
    pub(crate) fn snapshot(&self, from: u64) -> Vec<(u64, u64)> {
        let st = self.lock();
        st.segments
            .range(from..)
            .map(|(&n, s)| (n, s.end))
            .collect()
    }

    /// Acknowledge the record at `offset` of `segment`; `handles` are the
    /// consumer's open segment files. Acking a record again, or one in a
    /// segment already deleted, is a no-op.
    pub(crate) fn ack(
        &self,
        segment: u64,
        offset: u64,
        handles: &mut BTreeMap<u64, File>,
    ) -> Result<(), RingError> {
        let unknown = || RingError::UnknownRecord {
            loc: Location::Spill { segment, offset },
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(seg) = st.segments.get_mut(&segment) else {
            return Ok(());
        };
        if offset < FILE_HDR || !offset.is_multiple_of(8) || offset + REC_HDR > seg.end {
            return Err(unknown());
        }
        let path = segment_path(&self.dir, segment);
        let file = open_handle(handles, segment, &path)?;
        let mut b = [0u8; REC_HDR as usize];
        file.read_exact_at(&mut b, offset)
            .map_err(|error| RingError::SpillRead {
                path: path.clone(),
                error,
            })?;
        let hdr = RecordHeader::from_bytes(&b);
        if !hdr.is_sound_at(offset) {
            return Err(unknown());
        }
        match hdr.state {
            STATE_ACKED => return Ok(()),
            STATE_COMMITTED => {}
            _ => return Err(unknown()),
        }
        file.write_all_at(&STATE_ACKED.to_le_bytes(), offset)
            .map_err(|error| RingError::SpillWrite {
                path: path.clone(),
                error,
            })?;
        seg.unacked -= 1;
        if seg.first_unacked.is_some_and(|o| o.offset == offset) {
            // Find the next unacked record; each record is passed over at
            // most once this way, as acks move the first one forward.
            seg.first_unacked = None;
            let mut r = SegmentReader::new(file, seg.end);
            let mut at = offset + hdr.extent();
            while seg.unacked > 0 {
                match r.step(at, false).map_err(|error| RingError::SpillRead {
                    path: path.clone(),
                    error,
                })? {
                    Step::Sound { hdr, .. } if hdr.state == STATE_COMMITTED => {
                        seg.first_unacked = Some(Oldest {
                            offset: at,
                            seq: hdr.seq,
                            ts_ms: hdr.ts_ms,
                        });
                        break;
                    }
                    Step::Sound { hdr, .. } => at += hdr.extent(),
                    Step::Garbage { len } => at += len,
                    Step::End | Step::Torn { .. } => break,
                }
            }
        }
        if seg.unacked == 0 {
            // Fully acked: delete it, sealing it first if it is the one
            // being written (rather than keep an empty file until rotation).
            if st.writer.as_ref().is_some_and(|w| w.segment == segment) {
                st.writer = None;
            }
            self.delete_if_done(st, segment);
            handles.remove(&segment);
        }
        Ok(())
    }

    /// Copy committed records from `cursor` on into `out`, up to `max`.
    /// `cursor` is `(segment, offset)` and moves past what was read.
    pub(crate) fn poll(
        &self,
        cursor: &mut (u64, u64),
        handles: &mut BTreeMap<u64, File>,
        max: usize,
        out: &mut Vec<Record>,
    ) -> Result<usize, RingError> {
        let mut n = 0;
        for (segment, end) in self.snapshot(cursor.0) {
            if n >= max {
                break;
            }
            if segment > cursor.0 {
                *cursor = (segment, FILE_HDR);
            }
            let path = self.path_of(segment);
            let read_err = |error| RingError::SpillRead {
                path: path.clone(),
                error,
            };
            let file = open_handle(handles, segment, &path)?;
            let mut r = SegmentReader::new(file, end);
            while n < max {
                let at = cursor.1;
                match r.step(at, true).map_err(read_err)? {
                    Step::End => break,
                    Step::Sound { hdr, payload_ok } => {
                        if hdr.state == STATE_COMMITTED {
                            if payload_ok {
                                let payload = r
                                    .get(at + REC_HDR, hdr.len as usize)
                                    .map_err(read_err)?
                                    .unwrap_or_default();
                                out.push(Record {
                                    seq: hdr.seq,
                                    kind: hdr.kind,
                                    ts_ms: hdr.ts_ms,
                                    loc: Location::Spill {
                                        segment,
                                        offset: at,
                                    },
                                    payload: payload.to_vec(),
                                });
                                n += 1;
                            } else {
                                // Damaged after recovery checked it; it stays
                                // unacked (and counted) until an operator acts.
                                tracing::error!(path = %path.display(), offset = at, "spilled record fails its checksum, skipping it");
                            }
                        }
                        cursor.1 = at + hdr.extent();
                    }
                    Step::Garbage { len } => cursor.1 = at + len,
                    Step::Torn { len } => cursor.1 = at + len,
                }
            }
        }
        Ok(n)
    }
}

fn open_handle<'h>(
    handles: &'h mut BTreeMap<u64, File>,
    segment: u64,
    path: &Path,
) -> Result<&'h File, RingError> {
    if let std::collections::btree_map::Entry::Vacant(v) = handles.entry(segment) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|error| RingError::SpillRead {
                path: path.to_owned(),
                error,
            })?;
        v.insert(f);
    }
    Ok(handles.get(&segment).expect("inserted above"))
}

/// Check one segment file: returns it if it holds unacked records, deletes
/// it if it holds none, leaves a foreign file alone.
fn recover_segment(path: &Path, report: &mut SpillRecovery) -> Result<Option<Segment>, RingError> {
    let read_err = |error| RingError::SpillRead {
        path: path.to_owned(),
        error,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut head = [0u8; FILE_HDR as usize];
    if len >= FILE_HDR {
        file.read_exact_at(&mut head, 0).map_err(read_err)?;
    }
    if len < FILE_HDR || head == [0; FILE_HDR as usize] {
        // Created, then killed before the file header went in.
        fs::remove_file(path).map_err(read_err)?;
        report.deleted_segments += 1;
        return Ok(None);
    }
    if head != file_header() {
        tracing::error!(path = %path.display(), "not a spill segment of this version, leaving it alone");
        report.foreign_files += 1;
        return Ok(None);
    }
    let mut seg = Segment {
        end: FILE_HDR,
        unacked: 0,
        first_unacked: None,
    };
    let mut pads = Vec::new();
    {
        let mut r = SegmentReader::new(&file, len);
        let mut at = FILE_HDR;
        loop {
            match r.step(at, true).map_err(read_err)? {
                Step::End => break,
                Step::Sound { hdr, payload_ok } => {
                    if hdr.state == STATE_COMMITTED && payload_ok {
                        seg.unacked += 1;
                        seg.first_unacked.get_or_insert(Oldest {
                            offset: at,
                            seq: hdr.seq,
                            ts_ms: hdr.ts_ms,
                        });
                    } else if hdr.state == STATE_COMMITTED {
                        report.discarded_corrupt += 1;
                        pads.push(at);
                    }
                    if hdr.state == STATE_COMMITTED || hdr.state == STATE_ACKED {
                        report.max_seq = report.max_seq.max(Some(hdr.seq));
                    }
                    at += hdr.extent();
                    seg.end = at;
                }
                Step::Garbage { len } => {
                    report.garbage_bytes += len;
                    at += len;
                }
                Step::Torn { len } => {
                    report.torn_bytes += len;
                    break;
                }
            }
        }
    }
    for at in pads {
        file.write_all_at(&STATE_PAD.to_le_bytes(), at)
            .map_err(read_err)?;
    }
    if seg.unacked == 0 {
        drop(file);
        fs::remove_file(path).map_err(read_err)?;
        report.deleted_segments += 1;
        return Ok(None);
    }
    if seg.end < len {
        // Garbage past the last sound record: a torn tail (or damage with
        // nothing sound after it). Readers stop at `end` anyway.
        file.set_len(seg.end).map_err(read_err)?;
    }
    Ok(Some(seg))
}

/// Every unacked committed record in `dir`, read-only (for `inspect`).
/// Returns the records and the bytes on disk.
pub(crate) fn inspect_dir(dir: &Path) -> Result<(Vec<Record>, u64), RingError> {
    let dir_err = |error| RingError::SpillDir {
        path: dir.to_owned(),
        error,
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(dir_err(e)),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(dir_err)?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_segment_name) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    let (mut records, mut bytes) = (Vec::new(), 0);
    for segment in numbers {
        let path = segment_path(dir, segment);
        let read_err = |error| RingError::SpillRead {
            path: path.clone(),
            error,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted by the live edge between listing and opening.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(e)),
        };
        let len = file.metadata().map_err(read_err)?.len();
        bytes += len;
        let mut r = SegmentReader::new(&file, len);
        let mut at = FILE_HDR;
        loop {
            match r.step(at, true).map_err(read_err)? {
                Step::End | Step::Torn { .. } => break,
                Step::Garbage { len } => at += len,
                Step::Sound { hdr, payload_ok } => {
                    if hdr.state == STATE_COMMITTED && payload_ok {
                        let payload = r
                            .get(at + REC_HDR, hdr.len as usize)
                            .map_err(read_err)?
                            .unwrap_or_default();
                        records.push(Record {
                            seq: hdr.seq,
                            kind: hdr.kind,
                            ts_ms: hdr.ts_ms,
                            loc: Location::Spill {
                                segment,
                                offset: at,
                            },
                            payload: payload.to_vec(),
                        });
                    }
                    at += hdr.extent();
                }
            }
        }
    }
    Ok((records, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill(dir: &Path, segment_bytes: u64, next: &AtomicU64) -> Spill {
        Spill::recover(dir, segment_bytes, next).unwrap().0
    }

    fn rec(seq: u64, len: usize) -> (RecordHeader, Vec<u8>) {
        let p = vec![seq as u8; len];
        (RecordHeader::record(seq, 1, seq * 100, &p), p)
    }

    fn poll_all(s: &Spill) -> (Vec<Record>, BTreeMap<u64, File>) {
        let mut handles = BTreeMap::new();
        let mut out = Vec::new();
        s.poll(&mut (0, FILE_HDR), &mut handles, usize::MAX, &mut out)
            .unwrap();
        (out, handles)
    }

    #[test]
    fn segment_names_round_trip() {
        let p = segment_path(Path::new("/x"), 42);
        assert_eq!(p, Path::new("/x/spill-0000000000000042.log"));
        assert_eq!(parse_segment_name("spill-0000000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("spill-42.log"), None);
        assert_eq!(parse_segment_name("spill-000000000000004x.log"), None);
    }

    #[test]
    fn segments_rotate_and_are_deleted_when_acked() {
        let dir = tempfile::tempdir().unwrap();
        let next = AtomicU64::new(0);
        let s = spill(dir.path(), 1024, &next);
        for seq in 1..=10 {
            let (h, p) = rec(seq, 200);
            s.append(&next, &h, &p).unwrap();
        }
        // 16 + 4 x 248 = 1008 per segment: 3 segments.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
        let st = s.stats();
        assert_eq!((st.unacked, st.total, st.oldest), (10, 10, Some((1, 100))));
        let (out, mut handles) = poll_all(&s);
        assert_eq!(
            out.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert!(out.iter().all(|r| r.payload == vec![r.seq as u8; 200]));
        // Ack the first segment out of order; oldest moves to the next unacked.
        for i in [1, 0, 3] {
            let Location::Spill { segment, offset } = out[i].loc else {
                panic!()
            };
            s.ack(segment, offset, &mut handles).unwrap();
        }
        assert_eq!(s.stats().oldest, Some((3, 300)));
        let Location::Spill { segment, offset } = out[2].loc else {
            panic!()
        };
        s.ack(segment, offset, &mut handles).unwrap();
        s.ack(segment, offset, &mut handles).unwrap(); // again, after deletion
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "first segment deleted"
        );
        assert_eq!(s.stats().oldest, Some((5, 500)));
        for r in &out[4..] {
            let Location::Spill { segment, offset } = r.loc else {
                panic!()
            };
            s.ack(segment, offset, &mut handles).unwrap();
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the written segment goes too once acked"
        );
        let st = s.stats();
        assert_eq!((st.unacked, st.bytes, st.oldest), (0, 0, None));
        // The next spill opens a fresh segment.
        let (h, p) = rec(11, 10);
        s.append(&next, &h, &p).unwrap();
        assert_eq!(poll_all(&s).0.len(), 1);
    }

    #[test]
    fn recovery_cuts_a_torn_tail_and_keeps_acks() {
        let dir = tempfile::tempdir().unwrap();
        let next = AtomicU64::new(0);
        let s = spill(dir.path(), 1 << 20, &next);
        for seq in 1..=3 {
            let (h, p) = rec(seq, 100);
            s.append(&next, &h, &p).unwrap();
        }
        let (out, mut handles) = poll_all(&s);
        let Location::Spill { segment, offset } = out[1].loc else {
            panic!()
        };
        s.ack(segment, offset, &mut handles).unwrap();
        drop((s, handles));
        // A crash mid-write of a fourth record: half its bytes landed.
        let path = segment_path(dir.path(), segment);
        let h = RecordHeader::record(4, 1, 0, &[4; 100]).at(16 + 3 * 152);
        let mut torn = h.to_bytes().to_vec();
        torn.extend_from_slice(&[4; 30]);
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &f, &torn).unwrap();
        drop(f);
        let (s, rep) = Spill::recover(dir.path(), 1 << 20, &next).unwrap();
        assert_eq!(rep.torn_bytes, 78);
        assert_eq!(rep.unacked_records, 2);
        assert_eq!(rep.max_seq, Some(3));
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            16 + 3 * 152,
            "torn tail cut"
        );
        let seqs: Vec<u64> = poll_all(&s).0.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3], "acked record stays acked");
        assert_eq!(next.load(Ordering::Relaxed), segment + 1);
        // New spills go to a new segment, never after an old tail.
        let (h, p) = rec(5, 10);
        s.append(&next, &h, &p).unwrap();
        assert_eq!(s.snapshot(0).len(), 2);
    }

    #[test]
    fn recovery_discards_a_corrupt_record_and_deletes_acked_segments() {
        let dir = tempfile::tempdir().unwrap();
        let next = AtomicU64::new(0);
        let s = spill(dir.path(), 400, &next);
        for seq in 1..=4 {
            let (h, p) = rec(seq, 100);
            s.append(&next, &h, &p).unwrap();
        }
        // Segments of 2 records: ack both of the first.
        let (out, mut handles) = poll_all(&s);
        for r in &out[..2] {
            let Location::Spill { segment, offset } = r.loc else {
                panic!()
            };
            s.ack(segment, offset, &mut handles).unwrap();
        }
        drop((s, handles));
        let Location::Spill { segment, offset } = out[2].loc else {
            panic!()
        };
        let path = segment_path(dir.path(), segment);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], offset + REC_HDR + 5).unwrap();
        drop(f);
        // A file that is not ours keeps its bytes and its name.
        fs::write(segment_path(dir.path(), 99), b"hello, not a segment").unwrap();
        let (s, rep) = Spill::recover(dir.path(), 400, &next).unwrap();
        assert_eq!(rep.discarded_corrupt, 1);
        assert_eq!(rep.unacked_records, 1);
        assert_eq!(rep.foreign_files, 1);
        let seqs: Vec<u64> = poll_all(&s).0.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [4]);
        assert_eq!(
            next.load(Ordering::Relaxed),
            100,
            "numbers past the foreign file"
        );
    }

    #[test]
    fn reader_skips_garbage_to_the_next_sound_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut bytes = file_header().to_vec();
        bytes.extend_from_slice(&[0xAB; 64]);
        let h = RecordHeader::record(9, 1, 0, b"abc").at(16 + 64);
        bytes.extend_from_slice(&h.to_bytes());
        bytes.extend_from_slice(b"abc\0\0\0\0\0");
        fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let mut r = SegmentReader::new(&f, bytes.len() as u64);
        assert_eq!(r.step(16, true).unwrap(), Step::Garbage { len: 64 });
        assert_eq!(
            r.step(80, true).unwrap(),
            Step::Sound {
                hdr: h,
                payload_ok: true
            }
        );
        assert_eq!(r.step(80 + 56, true).unwrap(), Step::End);
    }
}
