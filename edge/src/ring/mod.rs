//! The edge's crash-surviving event ring: every click and postback is
//! appended here before the HTTP response is written, and stays until the
//! flusher acknowledges it.
//!
//! - `layout.rs` owns the byte format (header page, record framing, the
//!   invariants) and is the only code that touches the shared mapping.
//! - `recover.rs` walks and repairs the ring when it is opened, and holds
//!   the walk that `inspect` shares.
//! - `spill.rs` owns the overflow segments in `spill_dir` (a full ring never
//!   refuses an append).
//! - `consumer.rs` is the single reader: poll, ack, free.
//! - `inspect.rs` is the read-only view behind `affgate-edge ring inspect`.
//!
//! # Concurrency
//!
//! Writers (HTTP worker threads) take no lock in the normal case: one CAS on
//! the mapped `head` reserves space, the record is written into that
//! disjoint region, and a Release store of its state word publishes it. The
//! consumer loads state words with Acquire and stops at a reserved but
//! uncommitted record (its writer is mid-copy). A full ring sends the record
//! to a spill segment under a mutex. One consumer at a time
//! ([`Ring::consumer`]); it alone acknowledges and frees.
//!
//! # What survives what
//!
//! An append that returned survives `kill -9` of the process: the mapping
//! and the spill file live in the page cache. Nothing here calls `msync` or
//! `fsync`: a ring on tmpfs (the default, `/dev/shm`) is lost with the
//! machine, and spill segments not yet written back by the kernel are lost
//! on power failure.

mod consumer;
mod inspect;
mod layout;
mod recover;
mod spill;

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod model_tests;

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, compiler_fence};
use std::sync::{Mutex, PoisonError};

use memmap2::MmapOptions;

pub use consumer::Consumer;
pub use inspect::{Inspection, inspect};
pub use layout::MAX_PAYLOAD;
pub use recover::RecoveryReport;
pub use spill::SpillRecovery;

use layout::{
    HEADER_PAGE, HeaderPage, MIN_CAPACITY, Mapping, OFF_NEXT_SEGMENT, OFF_NEXT_SEQ, OFF_RESERVED,
    REC_HDR, RecordHeader, STATE_ACKED, STATE_COMMITTED, STATE_PAD, lap_rest,
};
use spill::Spill;

/// Where the ring lives and how big it is (`[buffer]` in the edge config).
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// The ring file, normally on tmpfs (`/dev/shm/...`).
    pub path: PathBuf,
    /// Data area in bytes (the file is 4 KiB larger). A multiple of 8, at
    /// least 1024; must match an existing ring's.
    pub size_bytes: u64,
    /// Directory for spill segments; created if missing.
    pub spill_dir: PathBuf,
}

/// What went wrong, shaped by what the caller does next: `Open`, `Locked`,
/// `CapacityMismatch`, `Truncated`, `Format`, `Config` and `SpillDir` stop
/// start-up (an operator must act); `SpillWrite` fails one append (answer
/// 503, the event is not stored); `SpillRead` and `Corrupt` fail one poll
/// (retry later; the data stays where it is); `TooLarge` and
/// `UnknownRecord` are caller bugs.
///
/// Messages carry the underlying I/O error text themselves (the `error`
/// fields are deliberately not `#[source]`), so `%e` in a log line is the
/// whole story and `{:#}` does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("open ring {}: {error}", .path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error("ring {} is locked by another process", .path.display())]
    Locked { path: PathBuf },
    #[error("ring {} has capacity {found}, config says {configured}", .path.display())]
    CapacityMismatch {
        path: PathBuf,
        found: u64,
        configured: u64,
    },
    #[error("ring {} is truncated: {len} bytes, expected {expected}", .path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("ring {} is not a usable ring file: {what}", .path.display())]
    Format { path: PathBuf, what: String },
    #[error("ring {}: {what}", .path.display())]
    Config { path: PathBuf, what: String },
    #[error(
        "ring {}: its filesystem has no room for its {bytes} bytes; lower [buffer] size_mb or give the filesystem more space",
        .path.display()
    )]
    NoSpace { path: PathBuf, bytes: u64 },
    #[error("ring {} is corrupt at position {pos}: {what}", .path.display())]
    Corrupt {
        path: PathBuf,
        pos: u64,
        what: &'static str,
    },
    #[error("spill dir {}: {error}", .path.display())]
    SpillDir { path: PathBuf, error: io::Error },
    #[error("spill write {}: {error}", .path.display())]
    SpillWrite { path: PathBuf, error: io::Error },
    #[error("spill read {}: {error}", .path.display())]
    SpillRead { path: PathBuf, error: io::Error },
    #[error("record payload of {len} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: usize },
    #[error("ack of a record this consumer does not hold: {loc:?}")]
    UnknownRecord { loc: Location },
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Ring,
    Spilled,
}

/// A snapshot for metrics and `ring inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Data area bytes.
    pub capacity_bytes: u64,
    /// Reserved and not yet freed (`head - tail`), including padding.
    pub used_bytes: u64,
    /// Records not yet acknowledged, ring and spill (including appends in
    /// flight).
    pub unacked_records: u64,
    /// Timestamp of the oldest unacked record (the first one in the ring,
    /// or the first one in the oldest spill segment, whichever is older).
    pub oldest_unacked_ts_ms: Option<u64>,
    /// Sequence number of the oldest unacked record, chosen the same way.
    pub oldest_unacked_seq: Option<u64>,
    /// Spilled records not yet acked (on disk).
    pub spilled_records: u64,
    /// Bytes in spill segments on disk.
    pub spill_bytes: u64,
    /// Records spilled since this process opened the ring (a counter).
    pub spilled_total: u64,
    /// The sequence number `next_seq` hands out next.
    pub next_seq: u64,
}

/// One record as the consumer (or `inspect`) sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: u8,
    pub ts_ms: u64,
    pub loc: Location,
    pub payload: Vec<u8>,
}

/// Where a record lives, for [`Consumer::ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Absolute position of the record header in the ring.
    Ring { pos: u64 },
    /// Spill segment number and byte offset of the record in its file.
    Spill { segment: u64, offset: u64 },
}

/// Knobs tests turn; production uses the defaults.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// A spill segment is closed once the next record would take it past this.
    pub spill_segment_bytes: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            spill_segment_bytes: spill::DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// The ring, shared as `Arc<Ring>` by every worker thread.
pub struct Ring {
    path: PathBuf,
    map: Mapping,
    /// Holds the exclusive lock on the ring file for the process lifetime.
    _file: File,
    spill: Spill,
    consumer_taken: AtomicBool,
    /// Taken by the consumer while it zeroes freed space and advances the
    /// tail, and by `stats` while it reads the record at the tail.
    free_lock: Mutex<()>,
    /// Unacked ring records found by recovery.
    recovered_unacked: u64,
    /// Ring records acked since open (consumer only).
    acked: AtomicU64,
    /// Ring records the consumer found corrupt and dropped since open.
    dropped: AtomicU64,
    recovery: RecoveryReport,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("path", &self.path)
            .field("capacity", &self.map.capacity())
            .field("head", &self.map.head().load(Ordering::Relaxed))
            .field("tail", &self.map.tail().load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A successful reservation: `pad` bytes of lap remainder at `start` (0 if
/// none), then the record at `pos`.
struct Reserved {
    start: u64,
    pad: u64,
    pos: u64,
}

impl Ring {
    /// Create (zero-filled, header written) or reopen and recover the ring.
    /// Takes an exclusive lock on the ring file for the life of the `Ring`.
    pub fn open(cfg: &RingConfig) -> Result<Ring, RingError> {
        Ring::open_tuned(cfg, Tuning::default())
    }

    pub(crate) fn open_tuned(cfg: &RingConfig, tuning: Tuning) -> Result<Ring, RingError> {
        let path = cfg.path.clone();
        let cap = cfg.size_bytes;
        if cap < MIN_CAPACITY || !cap.is_multiple_of(8) {
            return Err(RingError::Config {
                path,
                what: format!(
                    "size {cap} bytes: must be a multiple of 8 and at least {MIN_CAPACITY}"
                ),
            });
        }
        let open_err = |error| RingError::Open {
            path: path.clone(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open_err)?;
        lock_briefly(&file).map_err(|e| match e {
            TryLockError::WouldBlock => RingError::Locked { path: path.clone() },
            TryLockError::Error(error) => open_err(error),
        })?;
        let fresh = prepare_file(&file, &path, cap)?;
        // Every page mapped now (the blocks are already allocated, see
        // `reserve`): no first-touch page fault on an append.
        let map = MmapOptions::new()
            .populate()
            .len(
                usize::try_from(HEADER_PAGE + cap).map_err(|_| RingError::Config {
                    path: path.clone(),
                    what: format!("size {cap} bytes does not fit this platform's address space"),
                })?,
            )
            .map_raw(&file)
            .map_err(open_err)?;
        let map = Mapping::new(map, cap);
        if fresh {
            map.init_header();
        }
        let next_segment = map.u64_at(OFF_NEXT_SEGMENT);
        let mut ring_rec = recover::recover_ring(&map, &path)?;
        let (spill, spill_rec) =
            Spill::recover(&cfg.spill_dir, tuning.spill_segment_bytes, next_segment)?;
        let max_seq = ring_rec.max_seq.max(spill_rec.max_seq);
        if let Some(max_seq) = max_seq {
            map.u64_at(OFF_NEXT_SEQ)
                .fetch_max(max_seq + 1, Ordering::Relaxed);
        }
        map.u64_at(OFF_RESERVED).store(0, Ordering::Relaxed);
        ring_rec.spill = spill_rec;
        tracing::info!(
            path = %path.display(),
            capacity = cap,
            fresh,
            ring_unacked = ring_rec.unacked_records,
            spill_unacked = ring_rec.spill.unacked_records,
            "ring opened"
        );
        Ok(Ring {
            path,
            recovered_unacked: ring_rec.unacked_records,
            map,
            _file: file,
            spill,
            consumer_taken: AtomicBool::new(false),
            free_lock: Mutex::new(()),
            acked: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            recovery: ring_rec,
        })
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What recovery found when this ring was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Allocate the next per-edge sequence number. It lives in the mapped
    /// header, so it keeps growing across restarts (recovery also lifts it
    /// past every sequence number still stored).
    pub fn next_seq(&self) -> u64 {
        self.map
            .u64_at(OFF_NEXT_SEQ)
            .fetch_add(1, Ordering::Relaxed)
    }

    /// Append one record. Returns once it survives the death of this
    /// process: in the mapping, or written to a spill segment. Fails only
    /// for an oversized payload or a spill write error.
    pub fn append(
        &self,
        seq: u64,
        kind: u8,
        ts_ms: u64,
        payload: &[u8],
    ) -> Result<Placement, RingError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RingError::TooLarge { len: payload.len() });
        }
        let hdr = RecordHeader::record(seq, kind, ts_ms, payload);
        let Some(r) = self.reserve(hdr.extent()) else {
            self.spill
                .append(self.map.u64_at(OFF_NEXT_SEGMENT), &hdr, payload)?;
            return Ok(Placement::Spilled);
        };
        if r.pad >= REC_HDR {
            self.map
                .store_header(r.start, &RecordHeader::pad(r.start, r.pad));
        }
        let hdr = hdr.at(r.pos);
        self.map.store_header_fields(r.pos, &hdr);
        // Layout invariant 3: the header is in memory before any payload
        // byte, as seen by whoever reads the mapping after we are killed.
        compiler_fence(Ordering::SeqCst);
        // SAFETY: `reserve` handed us `[r.pos, r.pos + extent)` exclusively:
        // the CAS on head made it ours, no other writer's reservation
        // overlaps it, and the consumer does not read it until the state
        // store below publishes it.
        unsafe { self.map.write_payload(r.pos, payload) };
        self.map.store_state(r.pos, STATE_COMMITTED);
        Ok(Placement::Ring)
    }

    /// Reserve `extent` bytes (plus any lap remainder) with a CAS on head,
    /// or `None` if the ring has no room.
    fn reserve(&self, extent: u64) -> Option<Reserved> {
        let cap = self.map.capacity();
        if extent > cap {
            return None;
        }
        let head = self.map.head();
        let tail = self.map.tail();
        let mut h = head.load(Ordering::Relaxed);
        loop {
            // Acquire: the consumer zeroed freed space before its Release
            // store of tail; our writes into that space must come after.
            let t = tail.load(Ordering::Acquire);
            if t > h {
                // `h` is older than the tail we saw; a fresh load cannot be.
                h = head.load(Ordering::Relaxed);
                continue;
            }
            let rest = lap_rest(h, cap);
            let pad = if rest >= extent { 0 } else { rest };
            let pos = h + pad;
            let end = pos + extent;
            if end - t > cap {
                return None;
            }
            // Relaxed is enough: the region's contents are published by the
            // state word, and a stale tail only makes us spill early.
            match head.compare_exchange_weak(h, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    // Same cache line as head, which this core owns right now.
                    self.map
                        .u64_at(OFF_RESERVED)
                        .fetch_add(1, Ordering::Relaxed);
                    return Some(Reserved { start: h, pad, pos });
                }
                Err(now) => h = now,
            }
        }
    }

    /// Current counters; cheap enough for every metrics scrape.
    pub fn stats(&self) -> RingStats {
        let (tail, head, ring_oldest) = {
            let _g = self
                .free_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Tail first: the consumer stored it after loading a head at
            // least this large, so the head we load next is >= tail.
            let tail = self.map.tail().load(Ordering::Acquire);
            let head = self.map.head().load(Ordering::Acquire);
            (tail, head, self.oldest_in_ring(tail, head))
        };
        let reserved = self.map.u64_at(OFF_RESERVED).load(Ordering::Relaxed);
        let ring_unacked = (self.recovered_unacked + reserved).saturating_sub(
            self.acked.load(Ordering::Relaxed) + self.dropped.load(Ordering::Relaxed),
        );
        let sp = self.spill.stats();
        let oldest = [ring_oldest, sp.oldest].into_iter().flatten();
        RingStats {
            capacity_bytes: self.map.capacity(),
            used_bytes: head.saturating_sub(tail),
            unacked_records: ring_unacked + sp.unacked,
            oldest_unacked_ts_ms: oldest.clone().map(|o| o.1).min(),
            oldest_unacked_seq: oldest.map(|o| o.0).min(),
            spilled_records: sp.unacked,
            spill_bytes: sp.bytes,
            spilled_total: sp.total,
            next_seq: self.map.u64_at(OFF_NEXT_SEQ).load(Ordering::Relaxed),
        }
    }

    /// `(seq, ts_ms)` of the first committed record at or after the tail,
    /// looking past a few acked records and pads. Caller holds `free_lock`,
    /// so nothing in `[tail, head)` is being zeroed; header words are read
    /// atomically, payloads not at all.
    fn oldest_in_ring(&self, tail: u64, head: u64) -> Option<(u64, u64)> {
        let cap = self.map.capacity();
        let mut p = tail;
        for _ in 0..64 {
            if p >= head {
                return None;
            }
            let rest = lap_rest(p, cap);
            if rest < REC_HDR {
                p += rest;
                continue;
            }
            let h = self.map.load_header(p);
            if !h.is_sound_at(p) {
                return None; // being written
            }
            match h.state {
                STATE_COMMITTED => return Some((h.seq, h.ts_ms)),
                STATE_ACKED | STATE_PAD => p += h.extent(),
                _ => return None,
            }
        }
        None
    }

    /// The single consumer (borrowing the ring). `None` while another
    /// `Consumer` is alive. A new consumer starts over: it polls every
    /// unacked record again, ring first, then spill.
    pub fn consumer(&self) -> Option<Consumer<'_>> {
        self.consumer_taken
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        Some(Consumer::new(self))
    }
}

/// Take the ring file's exclusive lock, waiting up to [`LOCK_WAIT`] for a
/// holder that is going away: a previous edge still exiting, or a copy of
/// the descriptor a child process holds between fork and exec (its
/// close-on-exec closes it a moment later).
fn lock_briefly(file: &File) -> Result<(), TryLockError> {
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Err(TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// How long [`Ring::open`] waits for another holder of the lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Check an existing ring file against the config, or size a new one.
/// Returns whether the header page must be written.
fn prepare_file(file: &File, path: &Path, cap: u64) -> Result<bool, RingError> {
    let open_err = |error| RingError::Open {
        path: path.to_owned(),
        error,
    };
    let expected = HEADER_PAGE + cap;
    let len = file.metadata().map_err(open_err)?.len();
    let fresh = if len == 0 {
        true
    } else if len < HEADER_PAGE {
        return Err(RingError::Truncated {
            path: path.to_owned(),
            len,
            expected,
        });
    } else {
        let mut page = [0u8; HEADER_PAGE as usize];
        file.read_exact_at(&mut page, 0).map_err(open_err)?;
        if page.iter().all(|&b| b == 0) {
            // A process killed while creating the file (the magic goes last).
            tracing::warn!(path = %path.display(), "ring file has an empty header page, initialising it");
            true
        } else {
            let hp = HeaderPage::from_bytes(&page);
            hp.check().map_err(|what| RingError::Format {
                path: path.to_owned(),
                what,
            })?;
            if hp.capacity != cap {
                return Err(RingError::CapacityMismatch {
                    path: path.to_owned(),
                    found: hp.capacity,
                    configured: cap,
                });
            }
            if len < expected {
                return Err(RingError::Truncated {
                    path: path.to_owned(),
                    len,
                    expected,
                });
            }
            if len > expected {
                return Err(RingError::Format {
                    path: path.to_owned(),
                    what: format!("file is {len} bytes, header says {expected}"),
                });
            }
            false
        }
    };
    if fresh {
        // Extending with set_len zero-fills; `reserve` then allocates it.
        file.set_len(0).map_err(open_err)?;
        file.set_len(expected).map_err(open_err)?;
    }
    reserve(file, path, expected)?;
    Ok(fresh)
}

/// Allocate every block of the ring file, fresh or not (a file left sparse
/// by an older edge gets its holes filled; data is untouched). A write to
/// an unbacked page of a shared mapping on a full filesystem is a SIGBUS in
/// the middle of an append, not an error; this way a ring that does not fit
/// fails at start, with a clear error. A filesystem without `fallocate`
/// keeps the file sparse, with a warning.
fn reserve(file: &File, path: &Path, len: u64) -> Result<(), RingError> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};
    let off_len = i64::try_from(len).map_err(|_| RingError::Config {
        path: path.to_owned(),
        what: format!("size {len} bytes does not fit a file offset"),
    })?;
    match fallocate(file, FallocateFlags::empty(), 0, off_len) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => {
            tracing::warn!(
                path = %path.display(),
                "the ring's filesystem cannot allocate it up front (no fallocate): it stays sparse, and a full filesystem would stop the edge mid-append"
            );
            Ok(())
        }
        Err(Errno::ENOSPC) => Err(RingError::NoSpace {
            path: path.to_owned(),
            bytes: len,
        }),
        Err(errno) => Err(RingError::Open {
            path: path.to_owned(),
            error: io::Error::from(errno),
        }),
    }
}

/// A test config: the ring and its spill directory inside `dir`.
#[cfg(test)]
pub(crate) fn test_cfg(dir: &Path, size_bytes: u64) -> RingConfig {
    RingConfig {
        path: dir.join("edge.ring"),
        size_bytes,
        spill_dir: dir.join("spill"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
    }

    #[test]
    fn append_poll_ack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 64 * 1024)).unwrap();
        let mut c = ring.consumer().expect("first consumer");
        assert!(
            ring.consumer().is_none(),
            "a second consumer is refused while the first lives"
        );
        for _ in 0..10 {
            let seq = ring.next_seq();
            assert_eq!(
                ring.append(seq, 1, seq * 10, &payload(seq, 200)).unwrap(),
                Placement::Ring
            );
        }
        let mut out = Vec::new();
        assert_eq!(c.poll(100, &mut out).unwrap(), 10);
        assert_eq!(c.poll(100, &mut out).unwrap(), 0, "nothing is polled twice");
        for r in &out {
            assert_eq!(r.payload, payload(r.seq, 200));
            assert_eq!(r.ts_ms, r.seq * 10);
            assert_eq!(r.kind, 1);
        }
        let s = ring.stats();
        assert_eq!(s.unacked_records, 10);
        assert_eq!(s.oldest_unacked_seq, Some(out[0].seq));
        for r in out.iter().rev() {
            c.ack(r.loc).unwrap();
        }
        let s = ring.stats();
        assert_eq!(s.unacked_records, 0);
        assert_eq!(s.used_bytes, 0, "everything acked is freed");
        assert_eq!(s.oldest_unacked_seq, None);
        drop(c);
        assert!(
            ring.consumer().is_some(),
            "consumer is available again once dropped"
        );
    }

    #[test]
    fn next_seq_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        let ring = Ring::open(&cfg).unwrap();
        assert_eq!(ring.next_seq(), 1);
        assert_eq!(ring.next_seq(), 2);
        drop(ring);
        let ring = Ring::open(&cfg).unwrap();
        assert_eq!(ring.next_seq(), 3, "sequence keeps growing across restarts");
    }

    #[test]
    fn the_ring_file_is_allocated_whole_even_when_left_sparse() {
        use nix::fcntl::{FallocateFlags, fallocate};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 1 << 20);
        let allocated = || {
            let m = std::fs::metadata(&cfg.path).unwrap();
            (m.blocks() * 512, m.len())
        };
        let ring = Ring::open(&cfg).unwrap();
        let seq = ring.next_seq();
        ring.append(seq, 1, 7, &payload(seq, 200)).unwrap();
        drop(ring);
        let (blocks, len) = allocated();
        assert_eq!(len, HEADER_PAGE + (1 << 20));
        assert!(
            blocks >= len,
            "a fresh ring has {blocks} of its {len} bytes allocated"
        );

        // Sparse, as edges before `reserve` left it: the data area's tail
        // punched out.
        let f = OpenOptions::new().write(true).open(&cfg.path).unwrap();
        let keep = HEADER_PAGE + 64 * 1024;
        fallocate(
            &f,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            keep as i64,
            (len - keep) as i64,
        )
        .unwrap();
        drop(f);
        assert!(allocated().0 < len, "the hole was punched");

        let ring = Ring::open(&cfg).unwrap();
        let (blocks, len) = allocated();
        assert!(blocks >= len, "reopened: {blocks} of {len} bytes allocated");
        let mut c = ring.consumer().expect("consumer");
        let mut out = Vec::new();
        assert_eq!(c.poll(10, &mut out).unwrap(), 1, "the record survived");
        assert_eq!(out[0].payload, payload(seq, 200));
    }

    #[test]
    fn second_open_is_locked_and_capacity_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path(), 4096);
        let ring = Ring::open(&cfg).unwrap();
        let e = Ring::open(&cfg).unwrap_err();
        assert!(matches!(e, RingError::Locked { .. }), "{e}");
        assert!(
            e.to_string().contains(&cfg.path.display().to_string()),
            "{e}"
        );
        drop(ring);
        let e = Ring::open(&RingConfig {
            size_bytes: 8192,
            ..cfg.clone()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "ring {} has capacity 4096, config says 8192",
                cfg.path.display()
            )
        );
        let e = Ring::open(&RingConfig {
            size_bytes: 1000,
            ..cfg
        })
        .unwrap_err();
        assert!(matches!(e, RingError::Config { .. }), "{e}");
    }

    #[test]
    fn full_ring_spills_and_spill_is_polled_after_ring() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 1024)).unwrap();
        let mut placements = Vec::new();
        for seq in 1..=10 {
            placements.push(ring.append(seq, 2, 0, &payload(seq, 200)).unwrap());
        }
        assert_eq!(
            placements.iter().filter(|p| **p == Placement::Ring).count(),
            4,
            "4 x 248 bytes fit in 1024"
        );
        let s = ring.stats();
        assert_eq!(s.spilled_records, 6);
        assert_eq!(s.spilled_total, 6);
        assert_eq!(s.unacked_records, 10);
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();
        c.poll(100, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (1..=10).collect::<Vec<_>>(),
            "ring first, then spill in order"
        );
        assert!(matches!(out[4].loc, Location::Spill { .. }));
        for r in &out {
            c.ack(r.loc).unwrap();
        }
        let s = ring.stats();
        assert_eq!(
            (s.unacked_records, s.spilled_records, s.spill_bytes),
            (0, 0, 0),
            "{s:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("spill")).unwrap().count(),
            0,
            "acked segments are deleted"
        );
    }

    #[test]
    fn oversized_payload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Ring::open(&test_cfg(dir.path(), 4096)).unwrap();
        let e = ring.append(1, 1, 0, &vec![0; MAX_PAYLOAD + 1]).unwrap_err();
        assert!(matches!(e, RingError::TooLarge { .. }));
        // A maximal payload bigger than the ring goes to spill.
        assert_eq!(
            ring.append(1, 1, 0, &vec![7; MAX_PAYLOAD]).unwrap(),
            Placement::Spilled
        );
    }

    #[test]
    fn ring_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        fn assert_send<T: Send>() {}
        assert_send_sync::<Ring>();
        assert_send::<Consumer<'static>>();
    }
}
