//! The write window: the pure core of ingest. It gathers the entries of
//! opened batches until it is due (time or rows), then hands out what to
//! write and, once the caller has committed that, what to acknowledge.
//!
//! Invariants:
//! - an entry is acknowledged only through a window whose rows were all
//!   committed (the caller calls [`Window::take`], writes, and sends the
//!   acks only if every write succeeded);
//! - within one window a `(edge, seq)` is written once, however many
//!   copies of it arrived;
//! - an entry whose event does not decode is acknowledged without being
//!   written (it would fail the same way forever) and counted;
//! - a probe (an empty batch) is answered in the next window only while the
//!   stores are healthy, so an edge never fails back to a collector that
//!   cannot commit.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use affgate_schema::affgate_capnp::{ack, batch};
use affgate_schema::event::{Click, Event, Postback, event_from_reader};

/// Who sent a batch: the edge and where to send its ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    pub edge_id: u16,
    pub route: Route,
}

/// Where a batch came from, so its ack goes back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// A UDP datagram from this address: the ack goes there.
    Udp(SocketAddr),
    /// A QUIC connection (its `stable_id` on this collector's endpoint): the
    /// ack goes back on it as a datagram.
    Quic(usize),
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Udp(a) => write!(f, "udp {a}"),
            Route::Quic(id) => write!(f, "quic connection {id}"),
        }
    }
}

/// Why a batch body was refused (closed set: metric labels).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch does not decode: {0}")]
    Decode(#[from] capnp::Error),
    #[error("batch is for edge {body}, datagram header says {header}")]
    EdgeId { header: u16, body: u16 },
}

impl BatchError {
    pub fn reason(&self) -> &'static str {
        match self {
            BatchError::Decode(_) => "decode",
            BatchError::EdgeId { .. } => "edge_id",
        }
    }
}

/// What one window asks to be written and, after that, acknowledged.
#[derive(Debug, Default)]
pub struct Taken {
    pub clicks: Vec<Click>,
    /// (edge id, seq, postback)
    pub postbacks: Vec<(u16, u64, Postback)>,
    /// Per peer, ascending disjoint inclusive seq ranges (possibly empty: a probe's answer).
    pub acks: Vec<(Peer, Vec<(u64, u64)>)>,
}

impl Taken {
    pub fn rows(&self) -> usize {
        self.clicks.len() + self.postbacks.len()
    }
}

#[derive(Debug)]
pub struct Window {
    max_age: Duration,
    max_rows: usize,
    opened: Option<Instant>,
    /// `(edge_id, seq)` of this window's entries. Keys come only from
    /// batches whose MAC verified; foldhash (seeded per process) instead of
    /// SipHash, which was about 6 % of the collector's samples.
    seen: HashSet<(u16, u64), RandomState>,
    clicks: Vec<Click>,
    postbacks: Vec<(u16, u64, Postback)>,
    acks: BTreeMap<Peer, Vec<u64>>,
    /// Counters since start.
    pub batches: u64,
    pub entries: u64,
    pub duplicates: u64,
    pub undecodable: u64,
    pub probes: u64,
}

impl Window {
    pub fn new(max_age: Duration, max_rows: usize) -> Window {
        Window {
            max_age,
            max_rows: max_rows.max(1),
            opened: None,
            seen: HashSet::default(),
            clicks: Vec::new(),
            postbacks: Vec::new(),
            acks: BTreeMap::new(),
            batches: 0,
            entries: 0,
            duplicates: 0,
            undecodable: 0,
            probes: 0,
        }
    }

    /// Add an opened (MAC-verified) batch body from `peer`, received at
    /// `received`: the window's age counts from its oldest batch. `healthy`:
    /// the last commit succeeded (probes are answered only then).
    pub fn add_batch(
        &mut self,
        peer: Peer,
        body: &[u8],
        healthy: bool,
        received: Instant,
    ) -> Result<usize, BatchError> {
        let mut slice = body;
        let msg = capnp::serialize::read_message_from_flat_slice(&mut slice, reader_options())?;
        let b = msg.get_root::<batch::Reader<'_>>()?;
        if b.get_edge_id() != peer.edge_id {
            return Err(BatchError::EdgeId {
                header: peer.edge_id,
                body: b.get_edge_id(),
            });
        }
        let entries = if b.has_entries() {
            Some(b.get_entries()?)
        } else {
            None
        };
        // Decode everything first: a batch that fails half-way adds nothing.
        let mut decoded = Vec::new();
        if let Some(entries) = entries {
            decoded.reserve(entries.len() as usize);
            for e in entries.iter() {
                let seq = e.get_seq();
                let event = e.get_event().map_err(BatchError::from).and_then(|r| {
                    event_from_reader(r)
                        .map_err(|err| BatchError::Decode(capnp::Error::failed(err.to_string())))
                });
                decoded.push((seq, event.ok()));
            }
        }
        self.batches += 1;
        if decoded.is_empty() {
            self.probes += 1;
            if healthy {
                self.acks.entry(peer).or_default();
                self.open_at(received);
            }
            return Ok(0);
        }
        let mut added = 0;
        let acks = self.acks.entry(peer).or_default();
        for (seq, event) in decoded {
            self.entries += 1;
            acks.push(seq);
            if !self.seen.insert((peer.edge_id, seq)) {
                self.duplicates += 1;
                continue;
            }
            match event {
                Some(Event::Click(c)) => self.clicks.push(c),
                Some(Event::Postback(p)) => self.postbacks.push((peer.edge_id, seq, p)),
                None => {
                    self.undecodable += 1;
                    continue;
                }
            }
            added += 1;
        }
        self.open_at(received);
        Ok(added)
    }

    /// The window is as old as the oldest batch in it.
    fn open_at(&mut self, received: Instant) {
        self.opened = Some(self.opened.map_or(received, |t| t.min(received)));
    }

    /// Rows reached the bound: due whatever its age.
    pub fn is_full(&self) -> bool {
        self.clicks.len() + self.postbacks.len() >= self.max_rows
    }

    /// Time to write: rows reached the bound, or the first batch is older than max_age.
    pub fn is_due(&self, now: Instant) -> bool {
        match self.opened {
            None => false,
            Some(t) => self.is_full() || now.duration_since(t) >= self.max_age,
        }
    }

    /// When it will be due by age, if anything is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.max_age)
    }

    pub fn is_empty(&self) -> bool {
        self.opened.is_none()
    }

    /// Close the window: rows to write and acks to send once they are written.
    pub fn take(&mut self) -> Taken {
        self.opened = None;
        self.seen.clear();
        let acks = std::mem::take(&mut self.acks)
            .into_iter()
            .map(|(peer, mut seqs)| (peer, ranges(&mut seqs)))
            .collect();
        Taken {
            clicks: std::mem::take(&mut self.clicks),
            postbacks: std::mem::take(&mut self.postbacks),
            acks,
        }
    }
}

fn reader_options() -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(1 << 20)).nesting_limit(16);
    o
}

/// Sort, dedup and merge seqs into inclusive ranges.
pub fn ranges(seqs: &mut Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs.iter() {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == s => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// The capnp body of an Ack for `edge_id`.
pub fn encode_ack(edge_id: u16, ranges: &[(u64, u64)], out: &mut Vec<u8>) {
    let mut msg = capnp::message::Builder::new_default();
    {
        let mut a = msg.init_root::<ack::Builder<'_>>();
        a.set_edge_id(edge_id);
        let mut list = a.init_ranges(ranges.len() as u32);
        for (i, (first, last)) in ranges.iter().enumerate() {
            let mut r = list.reborrow().get(i as u32);
            r.set_first(*first);
            r.set_last(*last);
        }
    }
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = capnp::serialize::write_message(&mut *out, &msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use affgate_schema::affgate_capnp::{batch, event};
    use affgate_schema::event::{ClickRef, Status, encode_click};

    fn click(id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_click(
            &ClickRef {
                click_id: id,
                ts_ms: 1,
                edge_id: 1,
                link_id: 2,
                offer_id: 3,
                affiliate_id: 4,
                slug: "s",
                ip: "127.0.0.1".parse().unwrap(),
                user_agent: "ua",
                referer: "",
                subs: ["", "", "", "", ""],
                quarantined: false,
                fallback: false,
            },
            &mut out,
        );
        out
    }

    fn batch_body(edge: u16, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b = msg.init_root::<batch::Builder<'_>>();
            b.set_edge_id(edge);
            let mut list = b.init_entries(entries.len() as u32);
            for (i, (seq, ev)) in entries.iter().enumerate() {
                let mut e = list.reborrow().get(i as u32);
                e.set_seq(*seq);
                let mut s = ev.as_slice();
                let m = capnp::serialize::read_message_from_flat_slice(&mut s, Default::default())
                    .unwrap();
                e.set_event(m.get_root::<event::Reader<'_>>().unwrap())
                    .unwrap();
            }
        }
        let mut out = Vec::new();
        capnp::serialize::write_message(&mut out, &msg).unwrap();
        out
    }

    fn peer(edge: u16) -> Peer {
        Peer {
            edge_id: edge,
            route: Route::Udp("127.0.0.1:9".parse().unwrap()),
        }
    }

    #[test]
    fn duplicates_in_a_window_are_written_once_and_acked() {
        let mut w = Window::new(Duration::from_millis(10), 100);
        let now = Instant::now();
        let body = batch_body(1, &[(5, click("a")), (6, click("b"))]);
        assert_eq!(w.add_batch(peer(1), &body, true, now).unwrap(), 2);
        assert_eq!(
            w.add_batch(peer(1), &body, true, now).unwrap(),
            0,
            "second copy adds nothing"
        );
        assert!(!w.is_due(now));
        assert!(w.is_due(now + Duration::from_millis(10)));
        let t = w.take();
        assert_eq!(t.clicks.len(), 2);
        assert_eq!(t.acks, vec![(peer(1), vec![(5, 6)])]);
        assert!(w.is_empty());
        assert_eq!(w.duplicates, 2);
    }

    #[test]
    fn age_counts_from_the_oldest_receipt_and_rows_fill_it() {
        let mut w = Window::new(Duration::from_millis(10), 3);
        let t0 = Instant::now();
        // A batch received at t0 + 5 ms is added first, one received at t0
        // (it waited in the queue) second: the window is as old as t0.
        w.add_batch(
            peer(1),
            &batch_body(1, &[(2, click("b"))]),
            true,
            t0 + Duration::from_millis(5),
        )
        .unwrap();
        assert!(!w.is_due(t0 + Duration::from_millis(9)));
        w.add_batch(peer(1), &batch_body(1, &[(1, click("a"))]), true, t0)
            .unwrap();
        assert_eq!(w.deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(
            w.is_due(t0 + Duration::from_millis(10)),
            "due by the older receipt"
        );
        assert!(!w.is_full());
        w.add_batch(peer(1), &batch_body(1, &[(3, click("c"))]), true, t0)
            .unwrap();
        assert!(w.is_full(), "three rows fill a window of three");
        assert!(w.is_due(t0), "a full window is due at once");
    }

    #[test]
    fn each_route_of_an_edge_gets_the_acks_of_what_came_on_it() {
        let mut w = Window::new(Duration::from_millis(10), 100);
        let now = Instant::now();
        let quic = Peer {
            edge_id: 1,
            route: Route::Quic(7),
        };
        w.add_batch(peer(1), &batch_body(1, &[(1, click("a"))]), true, now)
            .unwrap();
        w.add_batch(quic, &batch_body(1, &[(2, click("b"))]), true, now)
            .unwrap();
        let t = w.take();
        assert_eq!(t.clicks.len(), 2);
        assert_eq!(
            t.acks,
            vec![(peer(1), vec![(1, 1)]), (quic, vec![(2, 2)])],
            "an edge that moved from UDP to QUIC mid-window hears about each batch on its own route"
        );
    }

    #[test]
    fn due_by_rows() {
        let mut w = Window::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        w.add_batch(
            peer(1),
            &batch_body(1, &[(1, click("a")), (2, click("b"))]),
            true,
            now,
        )
        .unwrap();
        assert!(w.is_due(now));
    }

    #[test]
    fn probes_are_answered_only_when_healthy() {
        let mut w = Window::new(Duration::from_millis(10), 100);
        let now = Instant::now();
        w.add_batch(peer(1), &batch_body(1, &[]), false, now)
            .unwrap();
        assert!(
            w.is_empty(),
            "an unhealthy collector does not answer probes"
        );
        w.add_batch(peer(1), &batch_body(1, &[]), true, now)
            .unwrap();
        let t = w.take();
        assert_eq!(t.acks, vec![(peer(1), vec![])]);
        assert_eq!(t.rows(), 0);
    }

    #[test]
    fn edge_id_mismatch_and_garbage_are_refused_whole() {
        let mut w = Window::new(Duration::from_millis(10), 100);
        let now = Instant::now();
        let e = w
            .add_batch(peer(2), &batch_body(1, &[(1, click("a"))]), true, now)
            .unwrap_err();
        assert_eq!(e.reason(), "edge_id");
        assert!(w.add_batch(peer(1), b"garbage!", true, now).is_err());
        assert!(w.is_empty());
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            ranges(&mut vec![5, 3, 4, 9, 9, 1]),
            vec![(1, 1), (3, 5), (9, 9)]
        );
        assert!(ranges(&mut vec![]).is_empty());
    }

    #[test]
    fn ack_round_trips() {
        let mut out = Vec::new();
        encode_ack(7, &[(1, 3), (9, 9)], &mut out);
        let mut s = out.as_slice();
        let m = capnp::serialize::read_message_from_flat_slice(&mut s, Default::default()).unwrap();
        let a = m.get_root::<ack::Reader<'_>>().unwrap();
        assert_eq!(a.get_edge_id(), 7);
        let r: Vec<(u64, u64)> = a
            .get_ranges()
            .unwrap()
            .iter()
            .map(|r| (r.get_first(), r.get_last()))
            .collect();
        assert_eq!(r, vec![(1, 3), (9, 9)]);
        let _ = Status::Approved;
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut w = Window::new(Duration::from_millis(10), 100);
            let _ = w.add_batch(peer(1), &b, true, Instant::now());
        }
    }
}
