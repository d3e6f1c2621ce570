//! The delivery core: which ring records go in which datagram, to which
//! collector, when to send them again, and which ring locations an ack frees
//! (docs/delivery.md, "Edge: the flusher").
//!
//! [`Outbox`] is a plain struct: no sockets, no runtime, no clock and no
//! randomness of its own. The shell (`flush/udp.rs`, `flush/quic.rs`) feeds
//! it ring records ([`Outbox::push`]), the current time and a jitter factor
//! ([`Outbox::set_jitter`]), drains sealed datagrams
//! ([`Outbox::poll_datagram`]) until `None`, hands it ack bodies
//! ([`Outbox::on_ack`]) and sleeps until [`Outbox::next_deadline`].
//!
//! # Invariants
//!
//! - Every record pushed is, from then on, either in flight (held here,
//!   sent or due to be sent) or its [`Location`] has been returned by
//!   [`Outbox::on_ack`], exactly once, ever. A push of a record whose
//!   payload is not a decodable `Event` is refused with [`Undecodable`] and
//!   never held (see below).
//! - A record is in flight until an ack covers its seq: nothing is dropped
//!   for age, attempt count or collector health. Resends never stop.
//! - Every datagram is one sealed `Batch` (`header || body || mac`) whose
//!   entries are in ascending seq, at most `max_datagram_bytes` long in
//!   total, unless it holds a single record that alone does not fit
//!   ([`Outgoing::oversize`]). Each datagram gets the next nonce.
//! - A poll loop always ends: every `Some` from `poll_datagram` either moves
//!   records from due to a deadline strictly after `now`, or moves the probe
//!   deadline past `now` (durations are clamped to at least 1 ms).
//!
//! # Packing
//!
//! Due records (new, or past their resend deadline) are packed in ascending
//! seq, greedily: the first due record always goes, the next ones while the
//! sealed size stays within the limit; the first that does not fit starts
//! the next datagram (no skipping ahead, so entries stay in seq order).
//! Sizes are computed, not guessed: a ring payload is a single-segment
//! `Event` message (`affgate_schema::event`), validated at push by a full
//! traversal with Cap'n Proto's bounds checks; its event takes the
//! segment's words minus the root pointer. A single-segment `Batch` is then
//! `8 (segment table) + 8 * (4 + Σ (2 + event words))` bytes, sealed adds
//! 31. The encoded result is checked anyway, and the last entry dropped back
//! while it is over the limit.
//!
//! Packing copies each event's segment verbatim (see [`pack_batch`]):
//! Cap'n Proto pointers are relative, so the event's words stay valid
//! wherever they land, and only the `Entry.event` pointer is computed. This
//! is the same message a Cap'n Proto deep copy builds, up to the order of
//! an event's objects, at a tenth of the cost; the tests decode both and
//! compare.
//!
//! # Padding
//!
//! With [`OutboxConfig::pad_full`], a datagram that is closed because the
//! next due record did not fit (more due records follow it in the same
//! poll loop) is padded with zero bytes, after the `Batch` message and
//! inside the MAC, to exactly `max_datagram_bytes`; the last datagram of a
//! burst and oversize ones are not. A burst is then a run of equal-sized
//! datagrams and one shorter: what UDP segmentation offload (`UDP_SEGMENT`)
//! sends in one system call (`flush/udp.rs`). Receivers read the message by
//! its segment table and ignore the bytes after it, as Cap'n Proto's flat
//! slice reader does.
//!
//! # Undecodable payloads
//!
//! A ring record that passed its checksum but is not a Cap'n Proto `Event`
//! (a writer bug) would be resent forever and occupy a slot of the in-flight
//! window for good. [`Outbox::push`] therefore refuses it with
//! [`Undecodable`], counted in [`OutboxStats::undecodable`]: the shell logs
//! it once at ERROR (data lost) and acks its location in the ring. Only
//! structure is checked here (pointers, bounds, union tag); text encoding and
//! field semantics are the collector's to judge.
//!
//! # Backoff
//!
//! After the k-th send of a record (k >= 1), its resend deadline is
//! `now + min(first * 2^(k-1), resend_max) * jitter`, jitter being the
//! factor last given to [`Outbox::set_jitter`] (0.8..=1.2, default 1.0).
//! The shell draws a fresh uniform factor before each poll; all records of a
//! datagram share it (they share their fate on the wire anyway).
//!
//! `first` is `resend_initial`, or the measured round trip's timeout when
//! that is longer: `srtt + 4 * rttvar` (RFC 6298's estimator), capped at
//! `resend_max`. The round trip includes the collector's insert, which
//! grows with its window; a fixed 500 ms would resend whole windows that
//! are only slow, not lost. Samples follow Karn's rule: only records sent
//! once are timed (a resent record's ack cannot tell which send it
//! answers), and each ack gives one sample, its slowest such record's
//! `now - sent`. Before the first sample `first` is `resend_unmeasured`
//! (1 s, RFC 6298's initial timeout): an edge starting on a backlog sends a
//! whole in-flight bound at once, and its first acks wait for the
//! collector's first, largest inserts.
//!
//! # Failover
//!
//! Records go to one collector at a time, `current`, first index 0. Each
//! record remembers which collector it was last sent to and when the run of
//! sends to that collector began (resends to the same collector do not
//! restart it). With `T = max(earliest such start among records waiting on
//! current, last ack from current, when current became current)`, the
//! Outbox fails over at `T + failover_after`: current becomes
//! `(current + 1) % collectors`, every in-flight record is due at once, and
//! [`OutboxStats::failovers`] counts it. In words: records have waited on
//! this collector for `failover_after` and it has been silent all that time.
//! While current is not 0, a probe (an empty `Batch`) goes to collector 0
//! every `probe_every`, first `probe_every` after leaving it; any valid ack
//! from collector 0 (the probe's empty answer, or a late real one) makes 0
//! current again. An ack from any collector, current or not, acknowledges
//! what it names: a late ack is a real commit. With one collector there is
//! no failover and no probe; resends continue.
//!
//! # Acks
//!
//! [`Outbox::on_ack`] takes the body of an Ack datagram the shell already
//! opened (MAC checked). It decodes it as hostile input, refuses it whole
//! (nothing acknowledged) if it is for another edge id or its ranges are
//! not ascending and disjoint with `first <= last`, and otherwise returns
//! the locations of every in-flight record in the ranges. Seqs not in
//! flight (acked before, or never pushed) are ignored.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use affgate_schema::affgate_capnp::{ack, event};
use affgate_schema::datagram::{self, HEADER_LEN, Kind, MAC_LEN};
use affgate_schema::keys::Keys;
use capnp::Word;
use capnp::message::ReaderOptions;
use foldhash::fast::RandomState;

use crate::ring::{Location, Record};

/// First resend after at least this long (docs/delivery.md).
pub const RESEND_INITIAL: Duration = Duration::from_millis(500);
/// First resend before any round trip was measured.
pub const RESEND_UNMEASURED: Duration = Duration::from_secs(1);
/// Resend backoff doubles up to this.
pub const RESEND_MAX: Duration = Duration::from_secs(10);
/// Fail over after records waited this long on a silent collector.
pub const FAILOVER_AFTER: Duration = Duration::from_secs(1);
/// While failed over, probe collector 0 this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Default bound on records held (sent and not yet acknowledged).
pub const MAX_IN_FLIGHT: usize = 65_536;
/// Bounds of the jitter factor [`Outbox::set_jitter`] accepts.
pub const JITTER_MIN: f64 = 0.8;
pub const JITTER_MAX: f64 = 1.2;

/// Durations are clamped to at least this, so a poll loop always ends.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// Backoff beyond this is clamped (and keeps `Instant` arithmetic finite).
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The segment table of a single-segment message: segment count - 1 and
/// the segment's size, two u32.
const SEGMENT_TABLE_BYTES: usize = 8;
/// Root pointer, `Batch` (one data word for `edgeId`, one pointer), and
/// the tag word of the entries list.
const BATCH_FIXED_WORDS: usize = 4;
/// A probe: root pointer and `Batch`, entries left null (reads as empty).
const PROBE_WORDS: usize = 3;
/// One `Entry` in the list: one data word (`seq`), one pointer (`event`).
const ENTRY_WORDS: usize = 2;

/// Sealed bytes of a single-segment `Batch` message of `words` words.
fn sealed_len(words: usize) -> usize {
    HEADER_LEN + SEGMENT_TABLE_BYTES + 8 * words + MAC_LEN
}

/// What the Outbox needs to know; see the module docs for the rules.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// This edge's id, in datagram headers and `Batch.edgeId`; acks for
    /// another edge id are refused.
    pub edge_id: u16,
    /// Number of collectors (`[delivery] collectors`), indexed from 0 in
    /// configuration order. At least 1 (0 is treated as 1).
    pub collectors: usize,
    /// Largest sealed datagram, bytes (`[delivery] max_datagram_bytes`).
    pub max_datagram_bytes: usize,
    /// First resend delay, the floor under the measured round trip's
    /// timeout (default 500 ms; at least 1 ms).
    pub resend_initial: Duration,
    /// First resend delay before any round trip was measured (default 1 s;
    /// at least 1 ms).
    pub resend_unmeasured: Duration,
    /// Cap of the doubling resend delay, before jitter (default 10 s;
    /// clamped to `resend_initial..=1 h`).
    pub resend_max: Duration,
    /// Silence of the current collector that triggers a failover (default
    /// 1 s; at least 1 ms).
    pub failover_after: Duration,
    /// Probe interval towards collector 0 while failed over (default 2 s; at
    /// least 1 ms).
    pub probe_every: Duration,
    /// Bound [`Outbox::room`] reports against (default 65536).
    pub max_in_flight: usize,
    /// Pad a datagram to exactly `max_datagram_bytes` when more due records
    /// follow it (see "Padding"); default off. The edge sets it when its
    /// transport sends with segmentation offload (UDP with `UDP_SEGMENT`).
    pub pad_full: bool,
}

impl OutboxConfig {
    /// The documented defaults for everything but the three site-specific
    /// values.
    pub fn new(edge_id: u16, collectors: usize, max_datagram_bytes: usize) -> OutboxConfig {
        OutboxConfig {
            edge_id,
            collectors,
            max_datagram_bytes,
            resend_initial: RESEND_INITIAL,
            resend_unmeasured: RESEND_UNMEASURED,
            resend_max: RESEND_MAX,
            failover_after: FAILOVER_AFTER,
            probe_every: PROBE_EVERY,
            max_in_flight: MAX_IN_FLIGHT,
            pad_full: false,
        }
    }
}

/// One sealed datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Index of the collector to send it to.
    pub collector: usize,
    /// `header || body || mac`, ready for the wire.
    pub bytes: Vec<u8>,
    /// Entries in the batch (0 for a probe).
    pub records: usize,
    /// A single record too large for `max_datagram_bytes`: `bytes` is
    /// longer than that. UDP sends it anyway (IP fragments it); QUIC should
    /// use a unidirectional stream.
    pub oversize: bool,
    /// An empty batch probing collector 0 while failed over.
    pub probe: bool,
}

/// Counters and gauges for metrics. Counters count since [`Outbox::new`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records held: sent or due, not yet acknowledged.
    pub in_flight: usize,
    /// Of those, records due now (new, resend deadline passed, failover).
    pub due: usize,
    /// Datagrams returned by `poll_datagram`, probes included.
    pub sent_datagrams: u64,
    /// Records sent, first sends and resends.
    pub sent_records: u64,
    /// Record sends after the first.
    pub resent_records: u64,
    /// Records acknowledged (locations returned by `on_ack`).
    pub acked_records: u64,
    /// Probes sent.
    pub probes: u64,
    /// Oversize datagrams sent.
    pub oversize_datagrams: u64,
    /// Failovers to the next collector.
    pub failovers: u64,
    /// Pushes refused as [`Undecodable`].
    pub undecodable: u64,
    /// Acks refused by `on_ack`.
    pub bad_acks: u64,
    /// Collector index records go to now.
    pub current_collector: usize,
    /// Smoothed round trip from send to ack (`None` before the first sample).
    pub srtt: Option<Duration>,
    /// Delay before a record's first resend (see "Backoff").
    pub first_resend: Duration,
    /// Ring timestamp of the oldest record held (the delivery lag's start).
    pub oldest_in_flight_ts_ms: Option<u64>,
}

/// Why a record's payload is not a sendable `Event`.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("malformed event message: {error}")]
    Capnp { error: capnp::Error },
    #[error("trailing bytes after event message")]
    TrailingBytes,
    #[error("unknown event kind")]
    UnknownKind,
    #[error("not a single-segment message")]
    NotOneSegment,
}

impl From<capnp::Error> for PayloadError {
    fn from(error: capnp::Error) -> PayloadError {
        PayloadError::Capnp { error }
    }
}

/// A pushed record whose payload does not decode. The shell logs it once
/// (ERROR: the event is lost) and acks `loc` in the ring so it is freed.
/// The message carries the cause's text itself (not `#[source]`), so `%e`
/// is the whole story.
#[derive(Debug, thiserror::Error)]
#[error("ring record seq {seq} at {loc:?} is not a decodable event: {error}")]
pub struct Undecodable {
    pub seq: u64,
    pub loc: Location,
    pub error: PayloadError,
}

/// Why an ack body was refused. Whatever the reason, the caller drops it and
/// counts it by [`AckError::reason`]; nothing was acknowledged, and the
/// records it may have named are resent (harmless: stores are idempotent).
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("ack from collector index {from}, only {collectors} configured")]
    UnknownCollector { from: usize, collectors: usize },
    #[error("malformed ack: {error}")]
    Decode { error: capnp::Error },
    #[error("trailing bytes after ack message")]
    TrailingBytes,
    #[error("ack is for edge {got}, this is edge {want}")]
    EdgeId { got: u16, want: u16 },
    #[error("ack ranges not ascending and disjoint at {first}..={last}")]
    Ranges { first: u64, last: u64 },
}

impl AckError {
    /// Closed set, for a metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            AckError::UnknownCollector { .. } => "collector",
            AckError::Decode { .. } | AckError::TrailingBytes => "decode",
            AckError::EdgeId { .. } => "edge_id",
            AckError::Ranges { .. } => "ranges",
        }
    }
}

impl From<capnp::Error> for AckError {
    fn from(error: capnp::Error) -> AckError {
        AckError::Decode { error }
    }
}

/// A record held by the Outbox.
#[derive(Debug)]
struct Slot {
    rec: Record,
    /// Words its `Event` takes once copied into an `Entry` (measured at push).
    event_words: usize,
    /// Sends so far.
    attempts: u32,
    /// When it is next due (its key in `timers`), or `None` while in `due`.
    deadline: Option<Instant>,
    /// The collector it was last sent to, and when the run of sends to that
    /// collector began (its key in `waiting[collector]` when there are two
    /// or more collectors). Also times the round trip (see "Backoff").
    sent: Option<(usize, Instant)>,
}

/// The pure delivery core; see the module docs.
pub struct Outbox {
    cfg: OutboxConfig,
    keys: Keys,
    /// Every record in flight, by seq. A hash map, not an ordered one: it
    /// is looked up several times per record sent, and what needs seq order
    /// (`due`, `timers`, ack ranges) has it elsewhere. Seqs come from this
    /// edge's own ring, so foldhash (seeded per process) is enough.
    slots: HashMap<u64, Slot, RandomState>,
    /// Seqs due now, packed from the lowest.
    due: BTreeSet<u64>,
    /// Earliest time a record in `due` became due (for `next_deadline`).
    due_since: Option<Instant>,
    /// `(deadline, seq)` of every held record not in `due`.
    timers: BTreeSet<(Instant, u64)>,
    /// Per collector: `(start of the run of sends, seq)` of the records
    /// last sent to it. Only kept with two or more collectors: it serves
    /// failover alone.
    waiting: Vec<BTreeSet<(Instant, u64)>>,
    /// Per collector: when its last valid ack arrived.
    last_ack: Vec<Option<Instant>>,
    current: usize,
    /// When `current` last changed (`None`: never, since start).
    current_since: Option<Instant>,
    /// Next probe to collector 0, while `current != 0`.
    next_probe: Option<Instant>,
    jitter: f64,
    nonce: u64,
    /// Round-trip estimate from acks (see "Backoff").
    rtt: Option<Rtt>,
    stats: OutboxStats,
    /// Scratch, reused: an aligned copy of unaligned input, the encoded
    /// body, the seqs of the batch being built or of the ack range being
    /// applied.
    aligned: Vec<Word>,
    body: Vec<u8>,
    packing: Vec<u64>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("cfg", &self.cfg)
            .field("in_flight", &self.slots.len())
            .field("due", &self.due.len())
            .field("current", &self.current)
            .field("next_probe", &self.next_probe)
            .field("jitter", &self.jitter)
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// An empty Outbox sending to collector 0, first nonce 0, jitter 1.0.
    /// Out-of-range config values are clamped (see [`OutboxConfig`]).
    pub fn new(mut cfg: OutboxConfig, keys: Keys) -> Outbox {
        cfg.collectors = cfg.collectors.max(1);
        cfg.resend_initial = cfg.resend_initial.clamp(MIN_DURATION, MAX_BACKOFF);
        cfg.resend_unmeasured = cfg.resend_unmeasured.clamp(MIN_DURATION, MAX_BACKOFF);
        cfg.resend_max = cfg.resend_max.clamp(cfg.resend_initial, MAX_BACKOFF);
        cfg.failover_after = cfg.failover_after.max(MIN_DURATION);
        cfg.probe_every = cfg.probe_every.max(MIN_DURATION);
        let n = cfg.collectors;
        Outbox {
            cfg,
            keys,
            slots: HashMap::default(),
            due: BTreeSet::new(),
            due_since: None,
            timers: BTreeSet::new(),
            waiting: vec![BTreeSet::new(); n],
            last_ack: vec![None; n],
            current: 0,
            current_since: None,
            next_probe: None,
            jitter: 1.0,
            nonce: 0,
            rtt: None,
            stats: OutboxStats::default(),
            aligned: Vec::new(),
            body: Vec::new(),
            packing: Vec::new(),
        }
    }

    /// Start datagram nonces at `nonce` (then +1 per datagram, wrapping).
    /// The shell passes something that differs across restarts (e.g. boot
    /// time in ms), so datagrams of two runs are told apart.
    pub fn with_first_nonce(mut self, nonce: u64) -> Outbox {
        self.nonce = nonce;
        self
    }

    /// The jitter factor for resend deadlines of the records sent from now
    /// on; the shell draws it uniformly from `0.8..=1.2` before each poll.
    /// Clamped to that range; NaN means 1.0.
    pub fn set_jitter(&mut self, factor: f64) {
        self.jitter = if factor.is_nan() {
            1.0
        } else {
            factor.clamp(JITTER_MIN, JITTER_MAX)
        };
    }

    /// How many more records may be pushed before `max_in_flight` is
    /// reached. Advisory: `push` does not refuse beyond it, the shell stops
    /// polling the ring instead (the rest waits in the ring or spills).
    pub fn room(&self) -> usize {
        self.cfg.max_in_flight.saturating_sub(self.slots.len())
    }

    /// Take a record polled from the ring; it is due at `now`. A seq already
    /// in flight is ignored (a re-polled duplicate: same record, same place).
    /// A payload that is not a decodable `Event` is refused and not held.
    pub fn push(&mut self, rec: Record, now: Instant) -> Result<(), Undecodable> {
        if self.slots.contains_key(&rec.seq) {
            return Ok(());
        }
        let event_words = match measure_event(&rec.payload, &mut self.aligned) {
            Ok(w) => w,
            Err(error) => {
                self.stats.undecodable += 1;
                return Err(Undecodable {
                    seq: rec.seq,
                    loc: rec.loc,
                    error,
                });
            }
        };
        // Due at once: straight into `due` (as `poll_datagram` would move
        // it from `timers` at `now`), two ordered-set operations fewer.
        self.due.insert(rec.seq);
        self.due_since = Some(self.due_since.map_or(now, |d| d.min(now)));
        self.slots.insert(
            rec.seq,
            Slot {
                rec,
                event_words,
                attempts: 0,
                deadline: None,
                sent: None,
            },
        );
        Ok(())
    }

    /// The next datagram to send and where, or `None` when nothing is due
    /// at `now`. Call it in a loop until `None`. In order: fail over if due,
    /// then the probe if due, then the lowest due records packed into one
    /// batch (see the module docs).
    pub fn poll_datagram(&mut self, now: Instant) -> Option<Outgoing> {
        if self.failover_at().is_some_and(|t| t <= now) {
            self.fail_over(now);
        }
        if let Some(t) = self.next_probe
            && t <= now
        {
            self.next_probe = Some(now + self.cfg.probe_every);
            self.stats.probes += 1;
            return Some(self.seal_batch(0, &[], PROBE_WORDS, true));
        }
        while let Some(&(t, seq)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(slot) = self.slots.get_mut(&seq) {
                slot.deadline = None;
            }
            self.due.insert(seq);
            self.due_since = Some(self.due_since.map_or(t, |d| d.min(t)));
        }
        if self.due.is_empty() {
            return None;
        }

        // Greedy: the first due record always, then while it fits.
        let mut seqs = std::mem::take(&mut self.packing);
        seqs.clear();
        let mut words = BATCH_FIXED_WORDS;
        for &seq in &self.due {
            let w = words + ENTRY_WORDS + self.slot(seq).event_words;
            if !seqs.is_empty() && sealed_len(w) > self.cfg.max_datagram_bytes {
                break;
            }
            seqs.push(seq);
            words = w;
            if sealed_len(w) > self.cfg.max_datagram_bytes {
                break; // a lone oversize record
            }
        }
        let current = self.current;
        // More due records than go in this datagram: others follow it in
        // this poll loop, so it is padded to full size (see "Padding").
        let body_len = if self.cfg.pad_full && self.due.len() > seqs.len() {
            self.cfg
                .max_datagram_bytes
                .saturating_sub(HEADER_LEN + MAC_LEN)
        } else {
            0
        };
        let mut out = self.seal_batch_to(current, &seqs, words, false, body_len);
        // The size above is exact for canonical events; should an event copy
        // come out larger, drop entries back until it fits.
        while out.bytes.len() > self.cfg.max_datagram_bytes && seqs.len() > 1 {
            let seq = seqs.pop().expect("batch has more than one entry");
            words -= ENTRY_WORDS + self.slot(seq).event_words;
            out = self.seal_batch_to(current, &seqs, words, false, body_len);
        }
        out.oversize = out.bytes.len() > self.cfg.max_datagram_bytes;
        if out.oversize {
            self.stats.oversize_datagrams += 1;
        }
        let first = self.first_resend();
        for &seq in &seqs {
            self.mark_sent(seq, now, first);
        }
        if self.due.is_empty() {
            self.due_since = None;
        }
        self.packing = seqs;
        Some(out)
    }

    /// An Ack body (opened and MAC-checked by the caller) from collector
    /// `from`. Returns the ring locations it acknowledges, each exactly once
    /// ever; the shell acks them in the ring. A refused body acknowledges
    /// nothing and changes nothing.
    pub fn on_ack(
        &mut self,
        from: usize,
        body: &[u8],
        now: Instant,
    ) -> Result<Vec<Location>, AckError> {
        let mut scratch = std::mem::take(&mut self.aligned);
        let r = self.apply_ack(from, body, now, &mut scratch);
        self.aligned = scratch;
        if r.is_err() {
            self.stats.bad_acks += 1;
        }
        r
    }

    fn apply_ack(
        &mut self,
        from: usize,
        body: &[u8],
        now: Instant,
        scratch: &mut Vec<Word>,
    ) -> Result<Vec<Location>, AckError> {
        if from >= self.cfg.collectors {
            return Err(AckError::UnknownCollector {
                from,
                collectors: self.cfg.collectors,
            });
        }
        let bytes = aligned(body, scratch);
        let mut options = ReaderOptions::new();
        // The ranges are read twice (check, then apply).
        options
            .traversal_limit_in_words(Some(2 * (bytes.len() / 8) + 64))
            .nesting_limit(8);
        let mut rest = bytes;
        let message = capnp::serialize::read_message_from_flat_slice_no_alloc(&mut rest, options)?;
        if !rest.is_empty() {
            return Err(AckError::TrailingBytes);
        }
        let root = message.get_root::<ack::Reader<'_>>()?;
        if root.get_edge_id() != self.cfg.edge_id {
            return Err(AckError::EdgeId {
                got: root.get_edge_id(),
                want: self.cfg.edge_id,
            });
        }
        let ranges = root.get_ranges()?;
        let mut prev_last: Option<u64> = None;
        for r in ranges {
            let (first, last) = (r.get_first(), r.get_last());
            if first > last || prev_last.is_some_and(|p| first <= p) {
                return Err(AckError::Ranges { first, last });
            }
            prev_last = Some(last);
        }
        // Checked as a whole: now apply.
        let mut locs = Vec::new();
        let mut sample: Option<Duration> = None;
        let mut seqs = std::mem::take(&mut self.packing);
        for r in ranges {
            let (first, last) = (r.get_first(), r.get_last());
            // Held seqs in `first..=last`, ascending: a range no longer than
            // what is held is walked seq by seq; a longer one (a collector
            // acking far more than this edge holds) by the held seqs instead.
            seqs.clear();
            if last - first < self.slots.len() as u64 {
                seqs.extend((first..=last).filter(|s| self.slots.contains_key(s)));
            } else {
                seqs.extend(self.slots.keys().filter(|&&s| first <= s && s <= last));
                seqs.sort_unstable();
            }
            for &seq in &seqs {
                let slot = self.remove(seq);
                if slot.attempts == 1
                    && let Some((_, sent)) = slot.sent
                {
                    let rtt = now.saturating_duration_since(sent);
                    sample = Some(sample.map_or(rtt, |s| s.max(rtt)));
                }
                locs.push(slot.rec.loc);
            }
        }
        self.packing = seqs;
        if let Some(rtt) = sample {
            self.rtt = Some(self.rtt.map_or_else(|| Rtt::first(rtt), |e| e.update(rtt)));
        }
        if self.due.is_empty() {
            self.due_since = None;
        }
        self.stats.acked_records += locs.len() as u64;
        self.last_ack[from] = Some(now);
        if from == 0 && self.current != 0 {
            self.current = 0;
            self.current_since = Some(now);
            self.next_probe = None;
        }
        Ok(locs)
    }

    /// When `poll_datagram` should next be called: the earliest of a due
    /// record (possibly in the past: poll now), a resend deadline, the
    /// failover check and the probe. `None`: nothing to do until a push or
    /// an ack.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.due_since.filter(|_| !self.due.is_empty()),
            self.timers.first().map(|&(t, _)| t),
            self.failover_at(),
            self.next_probe,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The collector index data goes to now.
    pub fn current_collector(&self) -> usize {
        self.current
    }

    /// A snapshot; `oldest_in_flight_ts_ms` walks every held record (O(n),
    /// fine at scrape rate).
    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            in_flight: self.slots.len(),
            due: self.due.len(),
            current_collector: self.current,
            oldest_in_flight_ts_ms: self.slots.values().map(|s| s.rec.ts_ms).min(),
            srtt: self.rtt.map(|r| r.srtt),
            first_resend: self.first_resend(),
            ..self.stats.clone()
        }
    }

    /// Delay before a record's first resend: `resend_initial`, or the
    /// round trip's timeout when longer (`resend_unmeasured` before the
    /// first sample), at most `resend_max`.
    fn first_resend(&self) -> Duration {
        let rto = self.rtt.map_or(self.cfg.resend_unmeasured, Rtt::timeout);
        self.cfg.resend_initial.max(rto).min(self.cfg.resend_max)
    }

    fn slot(&self, seq: u64) -> &Slot {
        self.slots
            .get(&seq)
            .expect("due, timers and waiting only hold seqs of held records")
    }

    /// Two or more collectors: failover, and the `waiting` sets it reads,
    /// are in play.
    fn fails_over(&self) -> bool {
        self.cfg.collectors > 1
    }

    /// When the current collector will have been silent for
    /// `failover_after` with records waiting on it; `None` with one
    /// collector or nothing waiting.
    fn failover_at(&self) -> Option<Instant> {
        if !self.fails_over() {
            return None;
        }
        let &(oldest, _) = self.waiting[self.current].first()?;
        let start = [
            Some(oldest),
            self.last_ack[self.current],
            self.current_since,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(oldest);
        Some(start + self.cfg.failover_after)
    }

    fn fail_over(&mut self, now: Instant) {
        self.current = (self.current + 1) % self.cfg.collectors;
        self.current_since = Some(now);
        self.stats.failovers += 1;
        for (_, seq) in std::mem::take(&mut self.timers) {
            if let Some(slot) = self.slots.get_mut(&seq) {
                slot.deadline = None;
            }
            self.due.insert(seq);
        }
        if !self.due.is_empty() {
            self.due_since = Some(self.due_since.map_or(now, |d| d.min(now)));
        }
        if self.current == 0 {
            self.next_probe = None;
        } else if self.next_probe.is_none() {
            self.next_probe = Some(now + self.cfg.probe_every);
        }
    }

    /// Bookkeeping after `seq` went out to the current collector; `first`
    /// is [`Outbox::first_resend`], the same for every record of a datagram.
    fn mark_sent(&mut self, seq: u64, now: Instant, first: Duration) {
        self.due.remove(&seq);
        let current = self.current;
        let (max, jitter) = (self.cfg.resend_max, self.jitter);
        let slot = self
            .slots
            .get_mut(&seq)
            .expect("only held records are packed");
        self.stats.sent_records += 1;
        if slot.attempts > 0 {
            self.stats.resent_records += 1;
        }
        slot.attempts = slot.attempts.saturating_add(1);
        let deadline = now + resend_delay(first, max, slot.attempts, jitter);
        slot.deadline = Some(deadline);
        self.timers.insert((deadline, seq));
        match slot.sent {
            Some((c, _)) if c == current => {}
            previous => {
                slot.sent = Some((current, now));
                if self.fails_over() {
                    if let Some(key) = previous {
                        self.waiting[key.0].remove(&(key.1, seq));
                    }
                    self.waiting[current].insert((now, seq));
                }
            }
        }
    }

    /// Forget an acknowledged record everywhere it is indexed.
    fn remove(&mut self, seq: u64) -> Slot {
        let slot = self
            .slots
            .remove(&seq)
            .expect("called with a seq just found in slots");
        match slot.deadline {
            Some(t) => {
                self.timers.remove(&(t, seq));
            }
            None => {
                self.due.remove(&seq);
            }
        }
        if let Some((c, since)) = slot.sent
            && self.fails_over()
        {
            self.waiting[c].remove(&(since, seq));
        }
        slot
    }

    /// Encode `Batch { edgeId, entries }` for `seqs` (none: a probe), `words`
    /// words long, and seal it with the next nonce.
    fn seal_batch(
        &mut self,
        collector: usize,
        seqs: &[u64],
        words: usize,
        probe: bool,
    ) -> Outgoing {
        self.seal_batch_to(collector, seqs, words, probe, 0)
    }

    /// Encode and seal; the body is zero-padded to at least `body_len` bytes.
    fn seal_batch_to(
        &mut self,
        collector: usize,
        seqs: &[u64],
        words: usize,
        probe: bool,
        body_len: usize,
    ) -> Outgoing {
        let slots = &self.slots;
        pack_batch(
            self.cfg.edge_id,
            seqs.iter().map(|seq| {
                let slot = slots.get(seq).expect("only held records are packed");
                (*seq, slot.rec.payload.as_slice())
            }),
            words,
            &mut self.body,
        );
        if self.body.len() < body_len {
            self.body.resize(body_len, 0);
        }
        let mut bytes = Vec::new();
        datagram::seal(
            &self.keys,
            Kind::Batch,
            self.cfg.edge_id,
            self.nonce,
            &self.body,
            &mut bytes,
        );
        self.nonce = self.nonce.wrapping_add(1);
        self.stats.sent_datagrams += 1;
        Outgoing {
            collector,
            bytes,
            records: seqs.len(),
            oversize: false,
            probe,
        }
    }
}

/// Struct pointer word: `offset` words after the pointer's own end, with
/// the given data and pointer section sizes (Cap'n Proto encoding).
fn struct_pointer(offset: i32, data_words: u16, pointers: u16) -> u64 {
    u64::from((offset as u32) << 2) | u64::from(data_words) << 32 | u64::from(pointers) << 48
}

/// Encode a single-segment `Batch { edgeId, entries }` message (segment
/// table included) into `out` (cleared first), `words` words long: the root
/// pointer, the `Batch` struct, and for entries the list tag, the entries
/// and each event's segment copied verbatim after them. `entries` are
/// `(seq, payload)` with payloads that passed [`measure_event`] (one
/// segment, an `Event` root); `words` is what the packing arithmetic
/// computed from them. Without entries: a probe, `entries` left null.
///
/// ```text
/// w0 root → w1 | w1 Batch.edgeId | w2 Batch.entries → w3, INLINE_COMPOSITE, 2n words
/// w3 tag: n elements of (1 data, 1 pointer) | w4.. n × [seq][event →] | events...
/// ```
pub(crate) fn pack_batch<'a>(
    edge_id: u16,
    entries: impl ExactSizeIterator<Item = (u64, &'a [u8])> + Clone,
    words: usize,
    out: &mut Vec<u8>,
) {
    let n = entries.len();
    out.clear();
    out.reserve(SEGMENT_TABLE_BYTES + 8 * words);
    let push = |out: &mut Vec<u8>, w: u64| out.extend_from_slice(&w.to_le_bytes());
    // Segment table: one segment (count - 1 = 0) of `words` words.
    let seg_words = u32::try_from(words).expect("a datagram is far below 2^32 words");
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&seg_words.to_le_bytes());
    push(out, struct_pointer(0, 1, 1));
    push(out, u64::from(edge_id));
    if n == 0 {
        push(out, 0);
        debug_assert_eq!(out.len(), SEGMENT_TABLE_BYTES + 8 * words);
        return;
    }
    let list_words = u64::try_from(ENTRY_WORDS * n).expect("usize fits u64");
    // List pointer: kind 1, offset 0, element size 7 (inline composite), word count.
    push(out, 1 | 7 << 32 | list_words << 35);
    // Tag: a struct pointer whose offset field is the element count.
    push(
        out,
        struct_pointer(
            i32::try_from(n).expect("a batch holds far fewer than 2^29 entries"),
            1,
            1,
        ),
    );
    // Where the next event's segment words land, counted from w0.
    let mut at = BATCH_FIXED_WORDS + ENTRY_WORDS * n;
    for (i, (seq, payload)) in entries.clone().enumerate() {
        let (root, seg) = split_event(payload);
        push(out, seq);
        let ptr_at = BATCH_FIXED_WORDS + ENTRY_WORDS * i + 1;
        let ptr = if root == 0 {
            0 // a null root reads as a default Event, and so does a null pointer
        } else {
            // The root points (offset o) at word 1 + o of its segment, which
            // lands at `at + o`; offsets count from the end of the pointer.
            let o = ((root as u32) as i32) >> 2;
            let target = at as i64 + i64::from(o);
            let rel = target - (ptr_at as i64 + 1);
            struct_pointer(
                i32::try_from(rel).expect("offsets within one datagram fit"),
                (root >> 32) as u16,
                (root >> 48) as u16,
            )
        };
        push(out, ptr);
        at += seg.len() / 8;
    }
    for (_, payload) in entries {
        out.extend_from_slice(split_event(payload).1);
    }
    debug_assert_eq!(out.len(), SEGMENT_TABLE_BYTES + 8 * words);
}

/// A checked payload's root pointer word and its segment's words after it.
fn split_event(payload: &[u8]) -> (u64, &[u8]) {
    let seg = &payload[SEGMENT_TABLE_BYTES..];
    let root = u64::from_le_bytes(seg[..8].try_into().expect("8 bytes"));
    (root, &seg[8..])
}

/// RFC 6298's round-trip estimator (alpha 1/8, beta 1/4, K 4), without
/// its clock granularity term (ours is far finer than the round trip).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rtt {
    srtt: Duration,
    rttvar: Duration,
}

impl Rtt {
    fn first(sample: Duration) -> Rtt {
        Rtt {
            srtt: sample,
            rttvar: sample / 2,
        }
    }

    fn update(self, sample: Duration) -> Rtt {
        let err = self.srtt.abs_diff(sample);
        Rtt {
            rttvar: (self.rttvar * 3 + err) / 4,
            srtt: (self.srtt * 7 + sample) / 8,
        }
    }

    /// `srtt + 4 * rttvar`, at most [`MAX_BACKOFF`].
    fn timeout(self) -> Duration {
        self.srtt
            .saturating_add(self.rttvar.saturating_mul(4))
            .min(MAX_BACKOFF)
    }
}

/// `min(initial * 2^(attempts-1), max) * jitter`.
fn resend_delay(initial: Duration, max: Duration, attempts: u32, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let base = initial
        .checked_mul(1u32 << doublings)
        .map_or(max, |d| d.min(max));
    Duration::try_from_secs_f64(base.as_secs_f64() * jitter).unwrap_or(base)
}

/// `bytes`, or an aligned copy of it in `scratch` (capnp reads words).
fn aligned<'a>(bytes: &'a [u8], scratch: &'a mut Vec<Word>) -> &'a [u8] {
    if (bytes.as_ptr() as usize).is_multiple_of(8) {
        return bytes;
    }
    scratch.clear();
    scratch.resize(bytes.len().div_ceil(8), capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
    let copy = &mut Word::words_to_bytes_mut(scratch)[..bytes.len()];
    copy.copy_from_slice(bytes);
    copy
}

/// Runs `f` on the `Event` root of a framed payload. The limits are fixed
/// by the payload alone, so the same bytes always give the same outcome.
fn with_event<R>(
    payload: &[u8],
    scratch: &mut Vec<Word>,
    f: impl FnOnce(event::Reader<'_>) -> capnp::Result<R>,
) -> Result<R, PayloadError> {
    let bytes = aligned(payload, scratch);
    let mut options = ReaderOptions::new();
    // A well-formed event reads each word once per pass; we make two
    // (`which`, then `total_size`). The slack covers defaults read through nulls.
    options
        .traversal_limit_in_words(Some(2 * (bytes.len() / 8) + 64))
        .nesting_limit(16);
    let mut rest = bytes;
    let message = capnp::serialize::read_message_from_flat_slice_no_alloc(&mut rest, options)?;
    if !rest.is_empty() {
        return Err(PayloadError::TrailingBytes);
    }
    let root = message.get_root::<event::Reader<'_>>()?;
    if root.which().is_err() {
        return Err(PayloadError::UnknownKind);
    }
    f(root).map_err(PayloadError::from)
}

/// Validate a payload and return the words its event takes inside a
/// `Batch`: it must be one framed single-segment message without trailing
/// bytes whose root is an `Event` with a known union member, and every
/// pointer in it must pass Cap'n Proto's bounds checks (a full traversal,
/// `total_size`). Then [`pack_batch`] can copy its segment verbatim.
fn measure_event(payload: &[u8], scratch: &mut Vec<Word>) -> Result<usize, PayloadError> {
    with_event(payload, scratch, |ev| ev.total_size())?;
    // A valid message without trailing bytes (checked above) whose segment
    // table says one segment (count - 1 = 0) of the remaining words.
    let single = payload.len() >= SEGMENT_TABLE_BYTES + 8
        && payload[..4] == [0, 0, 0, 0]
        && u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]) as usize * 8
            == payload.len() - SEGMENT_TABLE_BYTES;
    if !single {
        return Err(PayloadError::NotOneSegment);
    }
    // Minus the root pointer; an Entry's `event` pointer takes its place.
    Ok((payload.len() - SEGMENT_TABLE_BYTES) / 8 - 1)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::{IpAddr, Ipv4Addr};

    use affgate_schema::affgate_capnp::batch;
    use affgate_schema::event::{
        ClickRef, Event, PostbackRef, Status, decode_event, encode_click, encode_postback,
        event_from_reader,
    };
    use affgate_schema::keys::{KeyRing, Secret};
    use proptest::prelude::*;

    use super::*;

    const EDGE: u16 = 7;

    fn keys() -> Keys {
        Keys::derive(&Secret::from_bytes([3; 32]))
    }

    /// The defaults, but a fresh Outbox resends after 500 ms like a
    /// measured one (most tests are about what follows the first resend).
    fn cfg(collectors: usize, max_datagram_bytes: usize) -> OutboxConfig {
        OutboxConfig {
            resend_unmeasured: RESEND_INITIAL,
            ..OutboxConfig::new(EDGE, collectors, max_datagram_bytes)
        }
    }

    fn loc(seq: u64) -> Location {
        Location::Ring { pos: seq * 1000 }
    }

    /// A click record whose payload grows with `ua_len`.
    fn record(seq: u64, ua_len: usize) -> Record {
        let ua = "u".repeat(ua_len);
        let click_id = format!("click-{seq}");
        let mut payload = Vec::new();
        encode_click(
            &ClickRef {
                click_id: &click_id,
                ts_ms: 1_000 + seq,
                edge_id: EDGE,
                link_id: seq,
                offer_id: 2,
                affiliate_id: 3,
                slug: "s",
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                user_agent: &ua,
                referer: "",
                subs: ["a", "", "", "", ""],
                quarantined: false,
                fallback: false,
            },
            &mut payload,
        );
        Record {
            seq,
            kind: crate::KIND_CLICK,
            ts_ms: 1_000 + seq,
            loc: loc(seq),
            payload,
        }
    }

    /// What a collector sees in a datagram: (collector-visible nonce, seq, event).
    fn open_batch(bytes: &[u8]) -> (u64, Vec<(u64, Event)>) {
        let (nonce, entries, padding) = open_padded_batch(bytes);
        assert_eq!(padding, 0, "no bytes after the message");
        (nonce, entries)
    }

    /// [`open_batch`] for a datagram that may be padded: also how many zero
    /// bytes follow the message.
    fn open_padded_batch(bytes: &[u8]) -> (u64, Vec<(u64, Event)>, usize) {
        let (h, body) = datagram::open(&KeyRing::new(keys()), 0, bytes).expect("mac checks");
        assert_eq!((h.kind, h.edge_id), (Kind::Batch, EDGE));
        let mut words = Vec::new();
        let body = aligned(body, &mut words);
        let mut rest = body;
        let msg = capnp::serialize::read_message_from_flat_slice(&mut rest, ReaderOptions::new())
            .expect("batch decodes");
        assert!(rest.iter().all(|&b| b == 0), "padding is zeros");
        let padding = rest.len();
        let b = msg.get_root::<batch::Reader<'_>>().unwrap();
        assert_eq!(b.get_edge_id(), EDGE);
        let entries = b
            .get_entries()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e.get_seq(),
                    event_from_reader(e.get_event().unwrap()).unwrap(),
                )
            })
            .collect();
        (h.nonce, entries, padding)
    }

    fn ack_body(edge_id: u16, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        let mut a = msg.init_root::<ack::Builder<'_>>();
        a.set_edge_id(edge_id);
        let mut rs = a.init_ranges(ranges.len() as u32);
        for (i, &(first, last)) in ranges.iter().enumerate() {
            let mut r = rs.reborrow().get(i as u32);
            r.set_first(first);
            r.set_last(last);
        }
        let mut out = Vec::new();
        capnp::serialize::write_message(&mut out, &msg).unwrap();
        out
    }

    /// Contiguous runs of sorted seqs as ack ranges.
    fn ranges_of(seqs: &[u64]) -> Vec<(u64, u64)> {
        let mut v: Vec<u64> = seqs.to_vec();
        v.sort_unstable();
        v.dedup();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for s in v {
            match out.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => out.push((s, s)),
            }
        }
        out
    }

    fn drain(ob: &mut Outbox, now: Instant) -> Vec<Outgoing> {
        std::iter::from_fn(|| ob.poll_datagram(now)).collect()
    }

    #[test]
    fn packs_due_records_in_seq_order_into_one_sealed_batch() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 1400), keys()).with_first_nonce(41);
        assert_eq!(ob.next_deadline(), None, "nothing held");
        let recs: Vec<Record> = [3, 1, 2].iter().map(|&s| record(s, 20)).collect();
        for r in &recs {
            ob.push(r.clone(), t0).unwrap();
        }
        assert_eq!(ob.next_deadline(), Some(t0), "new records are due at once");
        let out = drain(&mut ob, t0);
        assert_eq!(out.len(), 1, "three small records fit one datagram");
        let d = &out[0];
        assert_eq!(
            (d.collector, d.records, d.oversize, d.probe),
            (0, 3, false, false)
        );
        assert!(d.bytes.len() <= 1400);
        let (nonce, entries) = open_batch(&d.bytes);
        assert_eq!(nonce, 41);
        let seqs: Vec<u64> = entries.iter().map(|e| e.0).collect();
        assert_eq!(seqs, [1, 2, 3], "ascending seq");
        for (seq, ev) in &entries {
            let r = recs.iter().find(|r| r.seq == *seq).unwrap();
            assert_eq!(
                ev,
                &decode_event(&r.payload).unwrap(),
                "event copied intact"
            );
        }
        assert_eq!(ob.next_deadline(), Some(t0 + RESEND_INITIAL));
        let s = ob.stats();
        assert_eq!(
            (
                s.in_flight,
                s.due,
                s.sent_datagrams,
                s.sent_records,
                s.resent_records
            ),
            (3, 0, 1, 3, 0)
        );
        assert_eq!(s.oldest_in_flight_ts_ms, Some(1_001));
    }

    /// The packing this module replaced, as the reference: a Cap'n Proto
    /// deep copy of each event into a built `Batch`.
    fn capnp_batch(edge_id: u16, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut b = message.init_root::<batch::Builder<'_>>();
        b.set_edge_id(edge_id);
        if !entries.is_empty() {
            let mut list = b.init_entries(entries.len() as u32);
            for (i, (seq, payload)) in (0u32..).zip(entries) {
                let mut e = list.reborrow().get(i);
                e.set_seq(*seq);
                let mut rest = payload.as_slice();
                let msg =
                    capnp::serialize::read_message_from_flat_slice(&mut rest, ReaderOptions::new())
                        .unwrap();
                e.set_event(msg.get_root::<event::Reader<'_>>().unwrap())
                    .unwrap();
            }
        }
        let mut out = Vec::new();
        capnp::serialize::write_message(&mut out, &message).unwrap();
        out
    }

    /// (edge id, entries) of a framed Batch body, decoded as the collector does.
    fn decode_batch(body: &[u8]) -> (u16, Vec<(u64, Event)>) {
        let mut words = Vec::new();
        let mut rest = aligned(body, &mut words);
        let mut opts = ReaderOptions::new();
        opts.traversal_limit_in_words(Some(body.len() / 8 + 64));
        let msg = capnp::serialize::read_message_from_flat_slice(&mut rest, opts).unwrap();
        assert!(rest.is_empty(), "no trailing bytes");
        let b = msg.get_root::<batch::Reader<'_>>().unwrap();
        let entries = if b.has_entries() {
            b.get_entries()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e.get_seq(),
                        event_from_reader(e.get_event().unwrap()).unwrap(),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        (b.get_edge_id(), entries)
    }

    fn postback_payload(txid: &str) -> Vec<u8> {
        let mut payload = Vec::new();
        encode_postback(
            &PostbackRef {
                ts_ms: 5,
                edge_id: EDGE,
                network_id: 9,
                click_id: "cid",
                txid,
                event: "conversion",
                status: Status::Reversed,
                payout_micros: Some(1_500_000),
                currency: "EUR",
                request_id: "rid",
            },
            &mut payload,
        );
        payload
    }

    /// Raw packing of `entries`, checked against the deep copy.
    fn assert_packs_like_a_deep_copy(entries: &[(u64, Vec<u8>)]) {
        let mut scratch = Vec::new();
        let words = BATCH_FIXED_WORDS
            + entries
                .iter()
                .map(|(_, p)| ENTRY_WORDS + measure_event(p, &mut scratch).unwrap())
                .sum::<usize>();
        let words = if entries.is_empty() {
            PROBE_WORDS
        } else {
            words
        };
        let mut raw = Vec::new();
        pack_batch(
            EDGE,
            entries.iter().map(|(s, p)| (*s, p.as_slice())),
            words,
            &mut raw,
        );
        let copy = capnp_batch(EDGE, entries);
        assert_eq!(raw.len(), SEGMENT_TABLE_BYTES + 8 * words, "exact size");
        assert_eq!(raw.len(), copy.len(), "as long as the deep copy");
        let want: Vec<(u64, Event)> = entries
            .iter()
            .map(|(s, p)| (*s, decode_event(p).unwrap()))
            .collect();
        assert_eq!(
            decode_batch(&raw),
            (EDGE, want.clone()),
            "raw packing decodes"
        );
        assert_eq!(decode_batch(&copy), (EDGE, want), "reference decodes");
    }

    #[test]
    fn a_burst_is_padded_to_full_datagrams_but_its_last_one() {
        let t0 = Instant::now();
        let mut plain = Outbox::new(cfg(1, 1200), keys());
        let mut padded = Outbox::new(
            OutboxConfig {
                pad_full: true,
                ..cfg(1, 1200)
            },
            keys(),
        );
        let recs: Vec<Record> = (1..=40)
            .map(|s| record(s, 60 + (s as usize * 7) % 50))
            .collect();
        for r in &recs {
            plain.push(r.clone(), t0).unwrap();
            padded.push(r.clone(), t0).unwrap();
        }
        let plain = drain(&mut plain, t0);
        let padded = drain(&mut padded, t0);
        assert!(padded.len() > 2, "a burst of several datagrams");
        assert_eq!(padded.len(), plain.len(), "padding moves no record");
        let (last, full) = padded.split_last().unwrap();
        assert!(
            full.iter().all(|d| d.bytes.len() == 1200),
            "full size but the last"
        );
        assert!(last.bytes.len() < 1200, "the last is not padded");
        for (p, q) in padded.iter().zip(&plain) {
            let (_, pe, padding) = open_padded_batch(&p.bytes);
            let (_, qe) = open_batch(&q.bytes);
            assert_eq!(pe, qe, "same entries, same events");
            assert_eq!(padding, p.bytes.len() - q.bytes.len(), "only zeros added");
            assert_eq!(p.records, q.records);
        }
    }

    #[test]
    fn raw_packing_matches_a_capnp_deep_copy() {
        assert_packs_like_a_deep_copy(&[]);
        assert_packs_like_a_deep_copy(&[(1, record(1, 0).payload)]);
        assert_packs_like_a_deep_copy(&[
            (3, record(3, 17).payload),
            (4, postback_payload("T-1")),
            (9, record(9, 300).payload),
            (10, postback_payload("")),
        ]);
    }

    #[test]
    fn multi_segment_payloads_are_refused() {
        // A valid Event message that Cap'n Proto spread over several segments.
        let one = record(1, 3).payload;
        let mut rest = one.as_slice();
        let msg = capnp::serialize::read_message_from_flat_slice(&mut rest, ReaderOptions::new())
            .unwrap();
        let mut b = capnp::message::Builder::new(
            capnp::message::HeapAllocator::new()
                .first_segment_words(2)
                .allocation_strategy(capnp::message::AllocationStrategy::FixedSize),
        );
        b.set_root(msg.get_root::<event::Reader<'_>>().unwrap())
            .unwrap();
        assert!(b.get_segments_for_output().len() > 1);
        let mut p = Vec::new();
        capnp::serialize::write_message(&mut p, &b).unwrap();
        assert!(decode_event(&p).is_ok(), "a valid message");
        let mut scratch = Vec::new();
        assert!(matches!(
            measure_event(&p, &mut scratch),
            Err(PayloadError::NotOneSegment)
        ));
    }

    #[test]
    fn size_arithmetic_is_exact() {
        let t0 = Instant::now();
        for ua in [0, 1, 7, 8, 9, 100, 1000] {
            let mut ob = Outbox::new(cfg(1, 100_000), keys());
            let r = record(1, ua);
            ob.push(r.clone(), t0).unwrap();
            let ew = ob.slot(1).event_words;
            assert_eq!(
                ew,
                r.payload.len() / 8 - 2,
                "canonical event: payload minus table and root"
            );
            let d = ob.poll_datagram(t0).unwrap();
            assert_eq!(
                d.bytes.len(),
                sealed_len(BATCH_FIXED_WORDS + ENTRY_WORDS + ew)
            );
        }
        let mut ob = Outbox::new(cfg(2, 100), keys());
        ob.fail_over(Instant::now());
        ob.next_probe = Some(t0);
        let p = ob.poll_datagram(t0).unwrap();
        assert!(p.probe);
        assert_eq!(p.bytes.len(), sealed_len(PROBE_WORDS));
    }

    #[test]
    fn lone_record_over_the_limit_goes_alone_flagged_oversize() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 300), keys());
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(2, 2000), t0).unwrap();
        ob.push(record(3, 10), t0).unwrap();
        let out = drain(&mut ob, t0);
        let shape: Vec<(usize, bool)> = out.iter().map(|d| (d.records, d.oversize)).collect();
        assert_eq!(shape, [(1, false), (1, true), (1, false)], "seq order kept");
        assert!(out[1].bytes.len() > 300);
        assert_eq!(open_batch(&out[1].bytes).1[0].0, 2);
        assert_eq!(ob.stats().oversize_datagrams, 1);
    }

    #[test]
    fn undecodable_payloads_are_refused_with_their_location() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        let mut bad = record(5, 10);
        bad.payload = vec![0xff; 24];
        let e = ob.push(bad, t0).unwrap_err();
        assert_eq!((e.seq, e.loc), (5, loc(5)));
        let mut trailing = record(6, 10);
        trailing.payload.extend_from_slice(&[0; 8]);
        let e = ob.push(trailing, t0).unwrap_err();
        assert!(matches!(e.error, PayloadError::TrailingBytes), "{e}");
        let mut empty = record(7, 0);
        empty.payload.clear();
        assert!(ob.push(empty, t0).is_err());
        let s = ob.stats();
        assert_eq!((s.in_flight, s.undecodable), (0, 3));
        assert_eq!(ob.poll_datagram(t0), None);
    }

    #[test]
    fn duplicate_pushes_and_unknown_acks_are_ignored_and_acks_free_once() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(2, 10), t0).unwrap();
        assert_eq!(ob.stats().in_flight, 2);
        assert_eq!(drain(&mut ob, t0)[0].records, 2);
        let got = ob
            .on_ack(0, &ack_body(EDGE, &[(0, 1), (9, 20)]), t0)
            .unwrap();
        assert_eq!(got, [loc(1)]);
        let got = ob.on_ack(0, &ack_body(EDGE, &[(1, 2)]), t0).unwrap();
        assert_eq!(got, [loc(2)], "1 was acked before");
        assert_eq!(ob.on_ack(0, &ack_body(EDGE, &[(1, 2)]), t0).unwrap(), []);
        let s = ob.stats();
        assert_eq!((s.in_flight, s.acked_records), (0, 2));
        assert_eq!(ob.next_deadline(), None);
    }

    #[test]
    fn ack_ranges_free_held_records_in_seq_order_whatever_their_length() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        // Pushed out of seq order, as ring records and older spilled ones are.
        for seq in [9, 3, 7, 5, 11, 1] {
            ob.push(record(seq, 10), t0).unwrap();
        }
        assert_eq!(
            drain(&mut ob, t0).iter().map(|d| d.records).sum::<usize>(),
            6
        );
        // Shorter than what is held (walked seq by seq): 4..=6 holds only 5.
        assert_eq!(
            ob.on_ack(0, &ack_body(EDGE, &[(4, 6)]), t0).unwrap(),
            [loc(5)]
        );
        // 0..=3 is walked again; 8..=u64::MAX is longer than what is held
        // (5 records), so the held seqs are sorted instead.
        let got = ob
            .on_ack(0, &ack_body(EDGE, &[(0, 3), (8, u64::MAX)]), t0)
            .unwrap();
        assert_eq!(got, [loc(1), loc(3), loc(9), loc(11)]);
        assert_eq!(ob.stats().in_flight, 1);
        assert_eq!(
            ob.on_ack(0, &ack_body(EDGE, &[(7, 7)]), t0).unwrap(),
            [loc(7)]
        );
        assert_eq!(ob.stats().in_flight, 0);
    }

    #[test]
    fn bad_acks_are_refused_whole() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(2, 1400), keys());
        for s in 1..=4 {
            ob.push(record(s, 10), t0).unwrap();
        }
        drain(&mut ob, t0);
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (2, ack_body(EDGE, &[(1, 1)]), "collector"),
            (0, ack_body(EDGE + 1, &[(1, 1)]), "edge_id"),
            (0, ack_body(EDGE, &[(1, 1), (3, 2)]), "ranges"),
            (0, ack_body(EDGE, &[(3, 4), (1, 2)]), "ranges"),
            (0, ack_body(EDGE, &[(1, 3), (3, 4)]), "ranges"),
            (
                0,
                ack_body(EDGE, &[(1, u64::MAX), (u64::MAX, u64::MAX)]),
                "ranges",
            ),
            (0, vec![], "decode"),
            (0, vec![1, 2, 3], "decode"),
            (
                0,
                [ack_body(EDGE, &[(1, 1)]), vec![0; 8]].concat(),
                "decode",
            ),
        ];
        for (from, body, reason) in cases {
            let e = ob.on_ack(from, &body, t0).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
        }
        let s = ob.stats();
        assert_eq!(
            (s.in_flight, s.bad_acks, s.acked_records),
            (4, 9, 0),
            "nothing acknowledged"
        );
        let got = ob.on_ack(1, &ack_body(EDGE, &[(1, u64::MAX)]), t0).unwrap();
        assert_eq!(
            got.len(),
            4,
            "a late ack from a non-current collector counts"
        );
    }

    #[test]
    fn backoff_doubles_to_the_max_within_jitter_bounds() {
        for (jitter, expect) in [
            (1.0, 1.0),
            (0.8, 0.8),
            (1.2, 1.2),
            (3.0, 1.2),
            (0.1, 0.8),
            (f64::NAN, 1.0),
        ] {
            let t0 = Instant::now();
            let mut ob = Outbox::new(cfg(1, 1400), keys());
            ob.set_jitter(jitter);
            ob.push(record(1, 10), t0).unwrap();
            let mut now = t0;
            let mut gaps = Vec::new();
            for _ in 0..8 {
                let d = ob.poll_datagram(now).expect("due");
                assert_eq!(d.records, 1);
                assert_eq!(ob.poll_datagram(now), None, "one send per deadline");
                let next = ob.next_deadline().unwrap();
                gaps.push(next - now);
                assert_eq!(
                    ob.poll_datagram(next - Duration::from_micros(1)),
                    None,
                    "not before"
                );
                now = next;
            }
            let want: Vec<Duration> = [500u64, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
                .iter()
                .map(|&ms| Duration::from_millis(ms).mul_f64(expect))
                .collect();
            for (g, w) in gaps.iter().zip(&want) {
                assert!(
                    g.abs_diff(*w) < Duration::from_micros(2),
                    "jitter {jitter}: {gaps:?}"
                );
            }
            assert_eq!(ob.stats().resent_records, 7);
            assert_eq!(ob.stats().failovers, 0, "one collector never fails over");
        }
    }

    #[test]
    fn fails_over_after_a_silent_second_and_back_after_a_probe_is_answered() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(cfg(2, 1400), keys());
        ob.push(record(1, 10), t0).unwrap();
        assert_eq!(ob.poll_datagram(t0).unwrap().collector, 0);
        assert_eq!(ob.next_deadline(), Some(t0 + ms(500)), "resend first");
        assert_eq!(ob.poll_datagram(t0 + ms(500)).unwrap().collector, 0);
        assert_eq!(
            ob.next_deadline(),
            Some(t0 + ms(1000)),
            "a resend to the same collector does not restart the failover clock"
        );
        assert_eq!(ob.poll_datagram(t0 + ms(999)), None);
        let d = ob.poll_datagram(t0 + ms(1000)).unwrap();
        assert_eq!(
            (d.collector, d.records, d.probe),
            (1, 1, false),
            "failed over, resent at once"
        );
        assert_eq!(ob.current_collector(), 1);
        assert_eq!(ob.stats().failovers, 1);
        // Collector 1 commits it.
        assert_eq!(
            ob.on_ack(1, &ack_body(EDGE, &[(1, 1)]), t0 + ms(1010))
                .unwrap(),
            [loc(1)]
        );
        assert_eq!(
            ob.next_deadline(),
            Some(t0 + ms(3000)),
            "only the probe is left"
        );
        let p = ob.poll_datagram(t0 + ms(3000)).unwrap();
        assert_eq!((p.collector, p.records, p.probe), (0, 0, true));
        assert!(
            open_batch(&p.bytes).1.is_empty(),
            "a probe is an empty batch"
        );
        assert_eq!(ob.next_deadline(), Some(t0 + ms(5000)), "probes repeat");
        // Collector 0 answers with an empty ack.
        assert_eq!(
            ob.on_ack(0, &ack_body(EDGE, &[]), t0 + ms(3005)).unwrap(),
            []
        );
        assert_eq!(ob.current_collector(), 0);
        assert_eq!(ob.next_deadline(), None, "no probe once back");
        ob.push(record(2, 10), t0 + ms(3100)).unwrap();
        assert_eq!(ob.poll_datagram(t0 + ms(3100)).unwrap().collector, 0);
        assert_eq!(ob.stats().failovers, 1);
    }

    #[test]
    fn acks_from_the_current_collector_hold_off_failover() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(cfg(3, 1400), keys());
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(2, 10), t0).unwrap();
        drain(&mut ob, t0);
        ob.on_ack(0, &ack_body(EDGE, &[(1, 1)]), t0 + ms(900))
            .unwrap();
        drain(&mut ob, t0 + ms(1000));
        assert_eq!(ob.current_collector(), 0, "heard from 0 at 900 ms");
        assert_eq!(ob.poll_datagram(t0 + ms(1899)), None);
        assert_eq!(ob.poll_datagram(t0 + ms(1900)).unwrap().collector, 1);
        // Collector 1 is silent too: on to 2 one second later, then around to 0.
        drain(&mut ob, t0 + ms(2899));
        assert_eq!(ob.current_collector(), 1);
        assert_eq!(ob.poll_datagram(t0 + ms(2900)).unwrap().collector, 2);
        drain(&mut ob, t0 + ms(3900));
        assert_eq!(ob.current_collector(), 0);
        assert_eq!(ob.stats().failovers, 3);
        assert_eq!(ob.next_probe, None, "no probes while on collector 0");
    }

    /// Push `seq`, send it at `sent`, ack it at `acked`: the datagrams
    /// sent and the locations the ack freed.
    fn send_then_ack(ob: &mut Outbox, seq: u64, sent: Instant, acked: Instant) -> (usize, usize) {
        ob.push(record(seq, 10), sent).unwrap();
        let datagrams = drain(ob, sent).len();
        let freed = ob
            .on_ack(0, &ack_body(EDGE, &[(seq, seq)]), acked)
            .unwrap()
            .len();
        (datagrams, freed)
    }

    #[test]
    fn the_first_resend_waits_out_a_slow_but_steady_round_trip() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        assert_eq!((ob.stats().srtt, ob.stats().first_resend), (None, ms(500)));
        // Ten records, each acknowledged 800 ms after its only send: a
        // collector whose inserts are slow, not one that loses datagrams.
        let mut now = t0;
        for seq in 1..=10u64 {
            assert_eq!(send_then_ack(&mut ob, seq, now, now + ms(800)), (1, 1));
            now += ms(800);
        }
        let s = ob.stats();
        assert_eq!(s.srtt, Some(ms(800)));
        assert!(
            s.first_resend > ms(800) && s.first_resend < ms(1000),
            "srtt + 4 rttvar, the variance decayed: {:?}",
            s.first_resend
        );
        // The next record is not resent at 500 ms, nor at 800.
        ob.push(record(11, 10), now).unwrap();
        drain(&mut ob, now);
        assert_eq!(ob.next_deadline(), Some(now + s.first_resend));
        assert_eq!(ob.poll_datagram(now + ms(800)), None);
        assert!(
            ob.poll_datagram(now + s.first_resend).is_some(),
            "then it is"
        );
        assert_eq!(ob.stats().resent_records, 1);
        // Backoff doubles from there.
        let again = now + s.first_resend;
        assert_eq!(ob.next_deadline(), Some(again + s.first_resend * 2));
    }

    #[test]
    fn before_any_ack_the_first_resend_waits_a_second() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(OutboxConfig::new(EDGE, 1, 1400), keys());
        assert_eq!(ob.stats().first_resend, ms(1000));
        ob.push(record(1, 10), t0).unwrap();
        drain(&mut ob, t0);
        assert_eq!(ob.poll_datagram(t0 + ms(999)), None);
        assert!(ob.poll_datagram(t0 + ms(1000)).is_some());
        // A fast ack (of the resend: not timed) changes nothing; one of a
        // record sent once brings the floor back.
        ob.on_ack(0, &ack_body(EDGE, &[(1, 1)]), t0 + ms(1010))
            .unwrap();
        assert_eq!(ob.stats().first_resend, ms(1000));
        send_then_ack(&mut ob, 2, t0 + ms(1100), t0 + ms(1105));
        assert_eq!(ob.stats().first_resend, ms(500));
    }

    #[test]
    fn fast_acks_keep_the_floor_and_resent_records_are_not_timed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        // Sent, resent at 500 ms, acked at 2.9 s: which send does the ack
        // answer? Karn's rule: no sample.
        ob.push(record(1, 10), t0).unwrap();
        drain(&mut ob, t0);
        assert_eq!(drain(&mut ob, t0 + ms(500)).len(), 1);
        ob.on_ack(0, &ack_body(EDGE, &[(1, 1)]), t0 + ms(2900))
            .unwrap();
        assert_eq!(ob.stats().srtt, None);
        // Acks within 5 ms: the 500 ms floor holds.
        let mut now = t0 + ms(3000);
        for seq in 2..=20u64 {
            send_then_ack(&mut ob, seq, now, now + ms(5));
            now += ms(5);
        }
        assert_eq!(ob.stats().srtt, Some(ms(5)));
        assert_eq!(ob.stats().first_resend, ms(500));
    }

    #[test]
    fn one_ack_is_one_sample_its_slowest_record() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        ob.push(record(1, 10), t0).unwrap();
        drain(&mut ob, t0);
        ob.push(record(2, 10), t0 + ms(300)).unwrap();
        drain(&mut ob, t0 + ms(300));
        ob.on_ack(0, &ack_body(EDGE, &[(1, 2)]), t0 + ms(400))
            .unwrap();
        let s = ob.stats();
        assert_eq!(
            s.srtt,
            Some(ms(400)),
            "record 1 waited 400 ms, record 2 only 100"
        );
        assert_eq!(
            s.first_resend,
            ms(400) + ms(200) * 4,
            "first sample: rttvar = srtt / 2"
        );
    }

    #[test]
    fn one_collector_keeps_resending_without_failover() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(cfg(1, 1400), keys());
        ob.push(record(1, 10), t0).unwrap();
        let mut now = t0;
        let mut sends = 0;
        while now < t0 + Duration::from_secs(60) {
            for d in drain(&mut ob, now) {
                assert!(!d.probe && d.collector == 0);
                sends += 1;
            }
            now = ob.next_deadline().unwrap();
        }
        assert!(sends >= 8, "{sends}");
        assert_eq!((ob.stats().failovers, ob.current_collector()), (0, 0));
    }

    #[test]
    fn room_tracks_max_in_flight() {
        let t0 = Instant::now();
        let mut c = cfg(1, 1400);
        c.max_in_flight = 3;
        let mut ob = Outbox::new(c, keys());
        assert_eq!(ob.room(), 3);
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(2, 10), t0).unwrap();
        assert_eq!(ob.room(), 1);
        ob.push(record(3, 10), t0).unwrap();
        assert_eq!(ob.room(), 0);
        drain(&mut ob, t0);
        assert_eq!(ob.room(), 0, "sent is still in flight");
        ob.on_ack(0, &ack_body(EDGE, &[(2, 2)]), t0).unwrap();
        assert_eq!(ob.room(), 1);
    }

    #[test]
    fn degenerate_durations_cannot_spin_a_poll_loop() {
        let t0 = Instant::now();
        let mut c = cfg(0, 10);
        c.resend_initial = Duration::ZERO;
        c.resend_max = Duration::ZERO;
        c.failover_after = Duration::ZERO;
        c.probe_every = Duration::ZERO;
        let mut ob = Outbox::new(c, keys());
        ob.push(record(1, 10), t0).unwrap();
        assert_eq!(drain(&mut ob, t0).len(), 1);
        let mut c = cfg(2, 10);
        c.failover_after = Duration::ZERO;
        c.probe_every = Duration::ZERO;
        let mut ob = Outbox::new(c, keys());
        ob.push(record(1, 10), t0).unwrap();
        ob.push(record(2, 10), t0).unwrap();
        assert_eq!(drain(&mut ob, t0).len(), 2, "oversize, one each");
        let later = t0 + Duration::from_millis(5);
        assert!(drain(&mut ob, later).len() < 10, "bounded");
    }

    /// A tiny deterministic generator for the channel model.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, p: f64) -> bool {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
        }
    }

    proptest! {
        #[test]
        fn packing_respects_the_limit_greedily(
            sizes in prop::collection::vec(0usize..3000, 1..40),
            max in 80usize..4000,
        ) {
            let t0 = Instant::now();
            let mut ob = Outbox::new(cfg(1, max), keys());
            for (i, &ua) in sizes.iter().enumerate() {
                ob.push(record(i as u64, ua), t0).unwrap();
            }
            let lone: Vec<usize> = (0..sizes.len() as u64)
                .map(|s| sealed_len(BATCH_FIXED_WORDS + ENTRY_WORDS + ob.slot(s).event_words))
                .collect();
            let out = drain(&mut ob, t0);
            let mut seen = Vec::new();
            for (i, d) in out.iter().enumerate() {
                let entries = open_batch(&d.bytes).1;
                prop_assert_eq!(entries.len(), d.records);
                let first = entries[0].0 as usize;
                if d.oversize {
                    prop_assert_eq!(d.records, 1);
                    prop_assert!(lone[first] > max);
                    prop_assert_eq!(d.bytes.len(), lone[first]);
                } else {
                    prop_assert!(d.bytes.len() <= max, "{} > {}", d.bytes.len(), max);
                }
                if let Some(next) = out.get(i + 1) {
                    let next_first = open_batch(&next.bytes).1[0].0 as usize;
                    // Greedy: the next datagram's first record did not fit here.
                    let with_next = d.bytes.len() + lone[next_first] - sealed_len(BATCH_FIXED_WORDS);
                    prop_assert!(with_next > max, "could have packed {}", next_first);
                }
                seen.extend(entries.iter().map(|e| e.0));
            }
            let want: Vec<u64> = (0..sizes.len() as u64).collect();
            prop_assert_eq!(seen, want, "each record once, ascending");
        }

        #[test]
        fn garbage_ack_bodies_are_errors_not_panics(
            body in prop::collection::vec(any::<u8>(), 0..200),
            offset in 0usize..8,
        ) {
            let t0 = Instant::now();
            let mut ob = Outbox::new(cfg(2, 1400), keys());
            ob.push(record(1, 10), t0).unwrap();
            // Unaligned too: the shell hands over a slice of the datagram.
            let mut buf = vec![0u8; offset];
            buf.extend_from_slice(&body);
            let _ = ob.on_ack(0, &buf[offset..], t0);
            let _ = ob.on_ack(1, &body, t0);
        }

        #[test]
        fn raw_packing_matches_a_deep_copy_for_any_clicks(
            uas in prop::collection::vec(0usize..400, 1..6),
            with_postback in any::<bool>(),
        ) {
            let mut entries: Vec<(u64, Vec<u8>)> = uas
                .iter()
                .enumerate()
                .map(|(i, ua)| (i as u64 + 1, record(i as u64 + 1, *ua).payload))
                .collect();
            if with_postback {
                entries.push((100, postback_payload("tx")));
            }
            assert_packs_like_a_deep_copy(&entries);
        }

        #[test]
        fn garbage_payloads_are_refused_not_panics(
            payload in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let t0 = Instant::now();
            let mut ob = Outbox::new(cfg(1, 1400), keys());
            let mut r = record(1, 0);
            r.payload = payload;
            if ob.push(r, t0).is_ok() {
                // Structurally valid by chance: it must pack without panicking.
                let d = ob.poll_datagram(t0).unwrap();
                prop_assert_eq!(d.records, 1);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Every pushed record's location comes back from `on_ack` exactly
        /// once, and nothing else does, over a channel that drops,
        /// duplicates and reorders both ways, with collectors going down.
        #[test]
        fn delivered_exactly_once_in_ack_terms_over_a_bad_channel(
            seed: u64,
            n in 1u64..60,
            collectors in 1usize..=3,
            drop_p in 0.0f64..0.3,
            dup_p in 0.0f64..0.3,
            max_delay_ms in 0u64..400,
            max_in_flight in 1usize..30,
            max in 150usize..2000,
            downs in prop::collection::vec((0u64..6_000, 0u64..10_000), 3),
        ) {
            let mut rng = Rng(seed);
            let t0 = Instant::now();
            let ms = Duration::from_millis;
            let mut c = cfg(collectors, max);
            c.max_in_flight = max_in_flight;
            let mut ob = Outbox::new(c, keys());
            let ring = KeyRing::new(keys());
            let recs: Vec<Record> = (0..n).map(|s| record(100 + s, rng.below(600) as usize)).collect();
            let expect: HashMap<Location, u64> = recs.iter().map(|r| (r.loc, r.seq)).collect();
            let down = |c: usize, at: Instant| {
                let (from, len) = downs[c];
                at >= t0 + ms(from) && at < t0 + ms(from + len)
            };
            let mut to_collector: Vec<(Instant, usize, Vec<u8>)> = Vec::new();
            let mut to_edge: Vec<(Instant, usize, Vec<u8>)> = Vec::new();
            let mut acked: HashSet<Location> = HashSet::new();
            let mut pushed = 0usize;
            let mut now = t0;
            for _ in 0..40_000 {
                while pushed < recs.len() && ob.room() > 0 && rng.chance(0.6) {
                    ob.push(recs[pushed].clone(), now).unwrap();
                    pushed += 1;
                }
                ob.set_jitter(0.8 + rng.below(401) as f64 / 1000.0);
                while let Some(d) = ob.poll_datagram(now) {
                    prop_assert!(d.bytes.len() <= max || (d.oversize && d.records == 1));
                    prop_assert!(d.collector < collectors);
                    let copies = if rng.chance(drop_p) { 0 } else { 1 } + usize::from(rng.chance(dup_p));
                    for _ in 0..copies {
                        to_collector.push((now + ms(rng.below(max_delay_ms + 1)), d.collector, d.bytes.clone()));
                    }
                }
                // Collectors: open, decode, commit, ack what the batch held.
                let (arrived, later): (Vec<_>, Vec<_>) = to_collector.drain(..).partition(|m| m.0 <= now);
                to_collector = later;
                for (_, c, bytes) in arrived {
                    if down(c, now) {
                        continue;
                    }
                    let (h, body) = datagram::open(&ring, 0, &bytes).expect("our own datagram");
                    prop_assert_eq!(h.edge_id, EDGE);
                    let mut words = Vec::new();
                    let mut rest = aligned(body, &mut words);
                    let msg = capnp::serialize::read_message_from_flat_slice(&mut rest, ReaderOptions::new()).unwrap();
                    let b = msg.get_root::<batch::Reader<'_>>().unwrap();
                    let mut seqs = Vec::new();
                    for e in b.get_entries().unwrap() {
                        let ev = event_from_reader(e.get_event().unwrap()).unwrap();
                        prop_assert_eq!(ev.ts_ms(), 1_000 + e.get_seq(), "entry carries its own event");
                        prop_assert!(seqs.last().is_none_or(|&l| l < e.get_seq()), "ascending");
                        seqs.push(e.get_seq());
                    }
                    let body = ack_body(EDGE, &ranges_of(&seqs));
                    let copies = if rng.chance(drop_p) { 0 } else { 1 } + usize::from(rng.chance(dup_p));
                    for _ in 0..copies {
                        to_edge.push((now + ms(rng.below(max_delay_ms + 1)), c, body.clone()));
                    }
                }
                let (arrived, later): (Vec<_>, Vec<_>) = to_edge.drain(..).partition(|m| m.0 <= now);
                to_edge = later;
                for (_, c, body) in arrived {
                    for l in ob.on_ack(c, &body, now).expect("well-formed ack") {
                        prop_assert!(expect.contains_key(&l), "unknown location {:?}", l);
                        prop_assert!(acked.insert(l), "location {:?} returned twice", l);
                    }
                }
                if acked.len() == recs.len() {
                    break;
                }
                now += ms(1 + rng.below(250));
            }
            prop_assert_eq!(acked.len(), recs.len(), "all delivered; stats {:?}", ob.stats());
            let s = ob.stats();
            prop_assert_eq!((s.in_flight, s.acked_records), (0, n));
            prop_assert_eq!(s.oldest_in_flight_ts_ms, None);
        }
    }
}
