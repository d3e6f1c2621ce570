//! The event model (clicks and postbacks) and its Cap'n Proto encoding.
//!
//! The edge builds borrowed [`ClickRef`] / [`PostbackRef`] values on its hot
//! path and encodes each as one standalone Cap'n Proto `Event` message
//! (`capnp/affgate.capnp`): standard framing (segment table, then the
//! segment), unpacked, always a single segment. The collector and tools
//! decode into the owned [`Event`].
//!
//! Encoding invariants:
//! - IPs are 16 bytes of `Data`; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`)
//!   and decoded back to [`IpAddr::V4`]. A V6 address that is itself
//!   IPv4-mapped therefore decodes as V4 (the same host).
//! - Empty strings are written as null pointers, which read back as empty.
//! - The message size is computed before building, so the builder's one
//!   segment is carved out of a thread-local scratch buffer of exactly that
//!   size. Once warmed up, the only heap traffic per message is the small
//!   segment-table `Vec` inside capnp's builder arena (not configurable in
//!   capnp 0.21); `out` keeps its allocation when callers reuse it.
//! - Each text field must be shorter than 2^29 bytes (a Cap'n Proto limit;
//!   the edge truncates headers far below that).
//!
//! Decoding treats its input as hostile: any bytes give `Ok` or `Err`, never
//! a panic, with traversal and nesting limits set and trailing bytes refused.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv6Addr};

use capnp::Word;
use capnp::message::{ReaderOptions, ScratchSpaceHeapAllocator};
use capnp::traits::HasStructSize;

use crate::affgate_capnp::{self, click, event, postback};
use crate::dedup::DedupKey;

/// Lifecycle state of a conversion as reported by a postback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Approved,
    Pending,
    Rejected,
    Reversed,
}

impl Status {
    /// The lowercase name, as used in postback URLs and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Approved => "approved",
            Status::Pending => "pending",
            Status::Rejected => "rejected",
            Status::Reversed => "reversed",
        }
    }

    /// Parses the lowercase names, ASCII case-insensitively.
    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Approved,
            Status::Pending,
            Status::Rejected,
            Status::Reversed,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    fn to_capnp(self) -> affgate_capnp::Status {
        match self {
            Status::Approved => affgate_capnp::Status::Approved,
            Status::Pending => affgate_capnp::Status::Pending,
            Status::Rejected => affgate_capnp::Status::Rejected,
            Status::Reversed => affgate_capnp::Status::Reversed,
        }
    }

    fn from_capnp(s: affgate_capnp::Status) -> Status {
        match s {
            affgate_capnp::Status::Approved => Status::Approved,
            affgate_capnp::Status::Pending => Status::Pending,
            affgate_capnp::Status::Rejected => Status::Rejected,
            affgate_capnp::Status::Reversed => Status::Reversed,
        }
    }
}

/// Borrowed click, as built on the edge's hot path. Field meanings and
/// units are documented on `Click` in `capnp/affgate.capnp`.
#[derive(Clone, Copy, Debug)]
pub struct ClickRef<'a> {
    pub click_id: &'a str,
    /// Unix milliseconds.
    pub ts_ms: u64,
    pub edge_id: u16,
    pub link_id: u64,
    pub offer_id: u64,
    pub affiliate_id: u64,
    pub slug: &'a str,
    pub ip: IpAddr,
    pub user_agent: &'a str,
    pub referer: &'a str,
    /// sub1..sub5; empty when absent.
    pub subs: [&'a str; 5],
    pub quarantined: bool,
    pub fallback: bool,
}

/// Borrowed postback, as built on the edge's hot path. Field meanings and
/// units are documented on `Postback` in `capnp/affgate.capnp`.
#[derive(Clone, Copy, Debug)]
pub struct PostbackRef<'a> {
    /// Unix milliseconds.
    pub ts_ms: u64,
    pub edge_id: u16,
    pub network_id: u64,
    pub click_id: &'a str,
    pub txid: &'a str,
    pub event: &'a str,
    pub status: Status,
    /// Micro-units of `currency`; `None` when the network sent no payout.
    pub payout_micros: Option<i64>,
    pub currency: &'a str,
    pub request_id: &'a str,
}

/// Owned click, as decoded by tools and the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Click {
    pub click_id: String,
    pub ts_ms: u64,
    pub edge_id: u16,
    pub link_id: u64,
    pub offer_id: u64,
    pub affiliate_id: u64,
    pub slug: String,
    pub ip: IpAddr,
    pub user_agent: String,
    pub referer: String,
    pub subs: [String; 5],
    pub quarantined: bool,
    pub fallback: bool,
}

/// Owned postback, as decoded by tools and the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Postback {
    pub ts_ms: u64,
    pub edge_id: u16,
    pub network_id: u64,
    pub click_id: String,
    pub txid: String,
    pub event: String,
    pub status: Status,
    pub payout_micros: Option<i64>,
    pub currency: String,
    pub request_id: String,
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Click(Click),
    Postback(Postback),
}

impl Click {
    pub fn as_ref(&self) -> ClickRef<'_> {
        ClickRef {
            click_id: &self.click_id,
            ts_ms: self.ts_ms,
            edge_id: self.edge_id,
            link_id: self.link_id,
            offer_id: self.offer_id,
            affiliate_id: self.affiliate_id,
            slug: &self.slug,
            ip: self.ip,
            user_agent: &self.user_agent,
            referer: &self.referer,
            subs: self.subs.each_ref().map(String::as_str),
            quarantined: self.quarantined,
            fallback: self.fallback,
        }
    }
}

impl Postback {
    pub fn as_ref(&self) -> PostbackRef<'_> {
        PostbackRef {
            ts_ms: self.ts_ms,
            edge_id: self.edge_id,
            network_id: self.network_id,
            click_id: &self.click_id,
            txid: &self.txid,
            event: &self.event,
            status: self.status,
            payout_micros: self.payout_micros,
            currency: &self.currency,
            request_id: &self.request_id,
        }
    }
}

impl Event {
    /// The event's dedup key (see [`crate::dedup`]).
    pub fn dedup_key(&self) -> DedupKey {
        match self {
            Event::Click(c) => DedupKey::for_click(&c.click_id),
            Event::Postback(p) => {
                DedupKey::for_postback(p.network_id, &p.click_id, &p.txid, &p.event, p.status)
            }
        }
    }

    pub fn click_id(&self) -> &str {
        match self {
            Event::Click(c) => &c.click_id,
            Event::Postback(p) => &p.click_id,
        }
    }

    /// When the edge received it, unix milliseconds.
    pub fn ts_ms(&self) -> u64 {
        match self {
            Event::Click(c) => c.ts_ms,
            Event::Postback(p) => p.ts_ms,
        }
    }
}

/// Why bytes did not decode to an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed message: {0}")]
    Capnp(#[from] capnp::Error),
    #[error("trailing bytes after message")]
    TrailingBytes,
    #[error("unknown event kind")]
    UnknownKind,
    #[error("unknown status")]
    UnknownStatus,
    #[error("text is not utf-8")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("ip must be 16 bytes")]
    IpLength,
}

// ---- encoding ----

fn struct_words(s: capnp::private::layout::StructSize) -> usize {
    usize::from(s.data) + usize::from(s.pointers)
}

/// Words a text field occupies: bytes plus the NUL, rounded up; none if empty
/// (it stays a null pointer).
fn text_words(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        (s.len() + 1).div_ceil(8)
    }
}

const IP_WORDS: usize = 2;

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn click_words(c: &ClickRef<'_>) -> usize {
    let texts = [c.click_id, c.slug, c.user_agent, c.referer]
        .iter()
        .chain(c.subs.iter())
        .map(|s| text_words(s))
        .sum::<usize>();
    1 + struct_words(event::Builder::STRUCT_SIZE)
        + struct_words(click::Builder::STRUCT_SIZE)
        + IP_WORDS
        + texts
}

fn postback_words(p: &PostbackRef<'_>) -> usize {
    let texts = [p.click_id, p.txid, p.event, p.currency, p.request_id]
        .iter()
        .map(|s| text_words(s))
        .sum::<usize>();
    1 + struct_words(event::Builder::STRUCT_SIZE)
        + struct_words(postback::Builder::STRUCT_SIZE)
        + texts
}

thread_local! {
    /// Backing store for the builder's single segment; grows to the largest
    /// message this thread has encoded, then stays.
    static SCRATCH: RefCell<Vec<Word>> = const { RefCell::new(Vec::new()) };
    /// Aligned copy of unaligned input for decoding.
    static ALIGNED: RefCell<Vec<Word>> = const { RefCell::new(Vec::new()) };
}

/// Builds one `Event` message in a scratch segment of `words` words, fills
/// it with `fill` and writes it, framed, into `out` (cleared first).
fn encode_with(words: usize, out: &mut Vec<u8>, fill: impl FnOnce(event::Builder<'_>)) {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < words {
            scratch.resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        }
        let seg = Word::words_to_bytes_mut(&mut scratch[..words]);
        let mut message = capnp::message::Builder::new(ScratchSpaceHeapAllocator::new(seg));
        fill(message.init_root::<event::Builder<'_>>());
        out.clear();
        out.reserve(8 + words * 8);
        capnp::serialize::write_message(&mut *out, &message)
            .expect("writing into a Vec cannot fail");
    });
}

fn set_text(mut set: impl FnMut(&str), s: &str) {
    if !s.is_empty() {
        set(s);
    }
}

/// Serialize one Event message (capnp, single segment, unpacked, standard
/// framing) into `out` (cleared first).
pub fn encode_click(c: &ClickRef<'_>, out: &mut Vec<u8>) {
    encode_with(click_words(c), out, |ev| {
        let mut b = ev.init_click();
        set_text(|s| b.set_click_id(s), c.click_id);
        b.set_ts_ms(c.ts_ms);
        b.set_edge_id(c.edge_id);
        b.set_link_id(c.link_id);
        b.set_offer_id(c.offer_id);
        b.set_affiliate_id(c.affiliate_id);
        set_text(|s| b.set_slug(s), c.slug);
        b.set_ip(&ip_bytes(c.ip));
        set_text(|s| b.set_user_agent(s), c.user_agent);
        set_text(|s| b.set_referer(s), c.referer);
        set_text(|s| b.set_sub1(s), c.subs[0]);
        set_text(|s| b.set_sub2(s), c.subs[1]);
        set_text(|s| b.set_sub3(s), c.subs[2]);
        set_text(|s| b.set_sub4(s), c.subs[3]);
        set_text(|s| b.set_sub5(s), c.subs[4]);
        b.set_quarantined(c.quarantined);
        b.set_fallback(c.fallback);
    });
}

/// Serialize one Event message (capnp, single segment, unpacked, standard
/// framing) into `out` (cleared first).
pub fn encode_postback(p: &PostbackRef<'_>, out: &mut Vec<u8>) {
    encode_with(postback_words(p), out, |ev| {
        let mut b = ev.init_postback();
        b.set_ts_ms(p.ts_ms);
        b.set_edge_id(p.edge_id);
        b.set_network_id(p.network_id);
        set_text(|s| b.set_click_id(s), p.click_id);
        set_text(|s| b.set_txid(s), p.txid);
        set_text(|s| b.set_event(s), p.event);
        b.set_status(p.status.to_capnp());
        b.set_has_payout(p.payout_micros.is_some());
        b.set_payout_micros(p.payout_micros.unwrap_or(0));
        set_text(|s| b.set_currency(s), p.currency);
        set_text(|s| b.set_request_id(s), p.request_id);
    });
}

// ---- decoding ----

/// Decode one framed `Event` message. Any bytes: Ok or Err, never a panic.
pub fn decode_event(bytes: &[u8]) -> Result<Event, DecodeError> {
    if (bytes.as_ptr() as usize).is_multiple_of(8) {
        return decode_aligned(bytes);
    }
    ALIGNED.with_borrow_mut(|buf| {
        buf.clear();
        buf.resize(bytes.len().div_ceil(8), capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        let aligned = &mut Word::words_to_bytes_mut(buf)[..bytes.len()];
        aligned.copy_from_slice(bytes);
        decode_aligned(aligned)
    })
}

fn decode_aligned(bytes: &[u8]) -> Result<Event, DecodeError> {
    let mut options = ReaderOptions::new();
    // A well-formed event reads each word once; the slack covers the
    // defaults read through null pointers.
    options
        .traversal_limit_in_words(Some(bytes.len() / 8 + 64))
        .nesting_limit(8);
    let mut rest = bytes;
    let message = capnp::serialize::read_message_from_flat_slice(&mut rest, options)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    event_from_reader(message.get_root::<event::Reader<'_>>()?)
}

/// Converts a Cap'n Proto `Event` (e.g. inside a received `Batch` entry) to
/// the owned model.
pub fn event_from_reader(r: event::Reader<'_>) -> Result<Event, DecodeError> {
    match r.which().map_err(|_| DecodeError::UnknownKind)? {
        event::Which::Click(c) => click_from_reader(c?).map(Event::Click),
        event::Which::Postback(p) => postback_from_reader(p?).map(Event::Postback),
    }
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, DecodeError> {
    Ok(t?.to_str()?.to_owned())
}

fn click_from_reader(c: click::Reader<'_>) -> Result<Click, DecodeError> {
    let ip: [u8; 16] = c.get_ip()?.try_into().map_err(|_| DecodeError::IpLength)?;
    let ip = Ipv6Addr::from(ip);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    Ok(Click {
        click_id: text(c.get_click_id())?,
        ts_ms: c.get_ts_ms(),
        edge_id: c.get_edge_id(),
        link_id: c.get_link_id(),
        offer_id: c.get_offer_id(),
        affiliate_id: c.get_affiliate_id(),
        slug: text(c.get_slug())?,
        ip,
        user_agent: text(c.get_user_agent())?,
        referer: text(c.get_referer())?,
        subs: [
            text(c.get_sub1())?,
            text(c.get_sub2())?,
            text(c.get_sub3())?,
            text(c.get_sub4())?,
            text(c.get_sub5())?,
        ],
        quarantined: c.get_quarantined(),
        fallback: c.get_fallback(),
    })
}

fn postback_from_reader(p: postback::Reader<'_>) -> Result<Postback, DecodeError> {
    let status = p.get_status().map_err(|_| DecodeError::UnknownStatus)?;
    Ok(Postback {
        ts_ms: p.get_ts_ms(),
        edge_id: p.get_edge_id(),
        network_id: p.get_network_id(),
        click_id: text(p.get_click_id())?,
        txid: text(p.get_txid())?,
        event: text(p.get_event())?,
        status: Status::from_capnp(status),
        payout_micros: p.get_has_payout().then(|| p.get_payout_micros()),
        currency: text(p.get_currency())?,
        request_id: text(p.get_request_id())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn click() -> Click {
        Click {
            click_id: "AbCd".repeat(10),
            ts_ms: 1_790_000_000_123,
            edge_id: 3,
            link_id: 99,
            offer_id: 7,
            affiliate_id: 11,
            slug: "summer-sale".into(),
            ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
            user_agent: "Mozilla/5.0".into(),
            referer: String::new(),
            subs: [
                "a".into(),
                String::new(),
                "ç".into(),
                String::new(),
                "e".into(),
            ],
            quarantined: true,
            fallback: false,
        }
    }

    fn postback() -> Postback {
        Postback {
            ts_ms: 1_790_000_000_999,
            edge_id: 4,
            network_id: 12,
            click_id: "AbCd".repeat(10),
            txid: "tx-1".into(),
            event: "sale".into(),
            status: Status::Pending,
            payout_micros: Some(12_500_000),
            currency: "USD".into(),
            request_id: "req-1".into(),
        }
    }

    fn round_trip(e: &Event) -> Vec<u8> {
        let mut out = vec![1, 2, 3];
        match e {
            Event::Click(c) => encode_click(&c.as_ref(), &mut out),
            Event::Postback(p) => encode_postback(&p.as_ref(), &mut out),
        }
        assert_eq!(&out[..4], &[0, 0, 0, 0], "single segment");
        assert_eq!(decode_event(&out).unwrap(), *e);
        out
    }

    #[test]
    fn status_names() {
        for s in [
            Status::Approved,
            Status::Pending,
            Status::Rejected,
            Status::Reversed,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(Status::parse(&s.as_str().to_ascii_uppercase()), Some(s));
        }
        assert_eq!(Status::parse("Approved"), Some(Status::Approved));
        assert_eq!(Status::parse("approve"), None);
        assert_eq!(Status::parse(""), None);
        assert_eq!(Status::parse("approved "), None);
    }

    #[test]
    fn known_events_round_trip() {
        round_trip(&Event::Click(click()));
        round_trip(&Event::Postback(postback()));
        let mut p = postback();
        p.payout_micros = None;
        p.status = Status::Reversed;
        round_trip(&Event::Postback(p));
        let mut p = postback();
        p.payout_micros = Some(0);
        round_trip(&Event::Postback(p));
    }

    #[test]
    fn ipv4_comes_back_as_v4_and_v6_as_v6() {
        let mut c = click();
        c.ip = IpAddr::V6("2001:db8::1".parse().unwrap());
        round_trip(&Event::Click(c.clone()));
        c.ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        round_trip(&Event::Click(c.clone()));
        c.ip = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        round_trip(&Event::Click(c));
    }

    #[test]
    fn event_accessors() {
        let c = Event::Click(click());
        assert_eq!(c.click_id(), "AbCd".repeat(10));
        assert_eq!(c.ts_ms(), 1_790_000_000_123);
        assert_eq!(c.dedup_key(), DedupKey::for_click(&"AbCd".repeat(10)));
        let p = postback();
        assert_eq!(
            Event::Postback(p.clone()).dedup_key(),
            DedupKey::for_postback(12, &p.click_id, "tx-1", "sale", Status::Pending)
        );
        assert_eq!(Event::Postback(p).ts_ms(), 1_790_000_000_999);
    }

    #[test]
    fn unaligned_input_decodes() {
        let bytes = round_trip(&Event::Click(click()));
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode_event(&shifted[1..]).unwrap(), Event::Click(click()));
    }

    #[test]
    fn malformed_input_is_refused() {
        let bytes = round_trip(&Event::Postback(postback()));
        assert!(decode_event(&[]).is_err());
        assert!(
            decode_event(&bytes[..bytes.len() - 1]).is_err(),
            "truncated"
        );
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_event(&long),
            Err(DecodeError::TrailingBytes)
        ));
        // A message whose root is an empty Event struct: click with null ip.
        let mut m = capnp::message::Builder::new_default();
        m.init_root::<event::Builder<'_>>().init_click();
        let b = capnp::serialize::write_message_to_words(&m);
        assert!(matches!(decode_event(&b), Err(DecodeError::IpLength)));
    }

    #[test]
    fn encoding_reuses_the_output_allocation() {
        let mut out = Vec::new();
        let c = click();
        encode_click(&c.as_ref(), &mut out);
        let (ptr, cap) = (out.as_ptr(), out.capacity());
        for _ in 0..100 {
            encode_click(&c.as_ref(), &mut out);
        }
        assert_eq!((out.as_ptr(), out.capacity()), (ptr, cap));
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(b.into())),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(b.into())),
        ]
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(vec![
            Status::Approved,
            Status::Pending,
            Status::Rejected,
            Status::Reversed,
        ])
    }

    fn arb_click() -> impl Strategy<Value = Click> {
        (
            (
                ".{0,45}",
                any::<u64>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
            (".{0,20}", ip(), ".{0,200}", ".{0,100}"),
            (
                prop::array::uniform5(".{0,12}"),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (click_id, ts_ms, edge_id, link_id, offer_id, affiliate_id),
                    (slug, ip, user_agent, referer),
                    (subs, quarantined, fallback),
                )| Click {
                    click_id,
                    ts_ms,
                    edge_id,
                    link_id,
                    offer_id,
                    affiliate_id,
                    slug,
                    ip,
                    user_agent,
                    referer,
                    subs,
                    quarantined,
                    fallback,
                },
            )
    }

    fn arb_postback() -> impl Strategy<Value = Postback> {
        (
            (
                any::<u64>(),
                any::<u16>(),
                any::<u64>(),
                ".{0,45}",
                ".{0,30}",
                ".{0,10}",
            ),
            (status(), any::<Option<i64>>(), ".{0,4}", ".{0,30}"),
        )
            .prop_map(
                |(
                    (ts_ms, edge_id, network_id, click_id, txid, event),
                    (status, payout_micros, currency, request_id),
                )| Postback {
                    ts_ms,
                    edge_id,
                    network_id,
                    click_id,
                    txid,
                    event,
                    status,
                    payout_micros,
                    currency,
                    request_id,
                },
            )
    }

    proptest! {
        #[test]
        fn clicks_round_trip(mut c in arb_click()) {
            // An IPv4-mapped V6 address is the same host and comes back as V4.
            c.ip = c.ip.to_canonical();
            round_trip(&Event::Click(c));
        }

        #[test]
        fn postbacks_round_trip(p in arb_postback()) {
            round_trip(&Event::Postback(p));
        }

        #[test]
        fn mapped_v6_comes_back_as_v4(v4: [u8; 4]) {
            let mut c = click();
            c.ip = IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped());
            let mut out = Vec::new();
            encode_click(&c.as_ref(), &mut out);
            prop_assert_eq!(
                decode_event(&out).unwrap(),
                Event::Click(Click { ip: IpAddr::V4(v4.into()), ..c })
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_event(&b);
            if b.len() > 1 {
                let _ = decode_event(&b[1..]);
            }
        }

        #[test]
        fn corrupted_events_never_panic(
            c in arb_click(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut out = Vec::new();
            encode_click(&c.as_ref(), &mut out);
            for (i, v) in flips {
                let i = i.index(out.len());
                out[i] = v;
            }
            let _ = decode_event(&out);
        }
    }
}
