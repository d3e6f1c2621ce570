//! Framing and MAC of edge <-> collector datagrams.
//!
//! ```text
//!  0      2     3      4        5         7                15
//! +------+-----+------+--------+---------+-----------------+----------+--------+
//! | "AG" | ver | kind | key_id | edge_id |      nonce      |   body   |  mac   |
//! |  2   |  1  |  1   |   1    | u16 BE  |     u64 BE      |  n bytes |   16   |
//! +------+-----+------+--------+---------+-----------------+----------+--------+
//!  <------------------- HEADER_LEN = 15 ------------------->
//! ```
//!
//! - `ver` is [`VERSION`]; `kind` is a [`Kind`]; `key_id` (0..=15) names the
//!   keys that sealed it, so a receiver can pick them during rotation.
//! - `nonce` is chosen by the sender (e.g. a per-edge counter); this module
//!   does not interpret it, the delivery layer uses it to tell datagrams apart.
//! - `mac` is the first [`MAC_LEN`] bytes of `blake3::keyed_hash(datagram_mac_key,
//!   header || body)`. [`open`] checks it in constant time before handing
//!   out the body, so nothing unauthenticated reaches a decoder. The MAC
//!   authenticates, it does not encrypt, and it does not stop replays: the
//!   receiver must be idempotent (it is: entries carry dedup keys and seqs).

use crate::keys::{KeyRing, Keys, ct_eq};

pub const MAGIC: [u8; 2] = *b"AG";
pub const VERSION: u8 = 1;
pub const MAC_LEN: usize = 16;
pub const HEADER_LEN: usize = 15;

/// What the body of a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Edge -> collector: a Cap'n Proto `Batch`.
    Batch = 1,
    /// Collector -> edge: a Cap'n Proto `Ack`.
    Ack = 2,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Batch),
            2 => Some(Kind::Ack),
            _ => None,
        }
    }
}

/// The authenticated header of an opened datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub key_id: u8,
    pub edge_id: u16,
    pub nonce: u64,
}

/// Why a datagram was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatagramError {
    #[error("datagram too short")]
    TooShort,
    #[error("datagram has bad magic")]
    Magic,
    #[error("datagram has unknown version")]
    Version,
    #[error("datagram has unknown kind")]
    Kind,
    #[error("datagram mac mismatch")]
    Mac,
}

impl DatagramError {
    /// Closed set, for a metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            DatagramError::TooShort => "too_short",
            DatagramError::Magic => "magic",
            DatagramError::Version => "version",
            DatagramError::Kind => "kind",
            DatagramError::Mac => "mac",
        }
    }
}

fn mac(keys: &Keys, covered: &[u8]) -> [u8; MAC_LEN] {
    let h = blake3::keyed_hash(keys.datagram_mac_key(), covered);
    let mut m = [0u8; MAC_LEN];
    m.copy_from_slice(&h.as_bytes()[..MAC_LEN]);
    m
}

/// Writes header || body || MAC into `out` (cleared first), MAC = first 16
/// bytes of blake3::keyed_hash(datagram_mac_key, header||body).
pub fn seal(keys: &Keys, kind: Kind, edge_id: u16, nonce: u64, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER_LEN + body.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.push(keys.key_id());
    out.extend_from_slice(&edge_id.to_be_bytes());
    out.extend_from_slice(&nonce.to_be_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(body);
    let m = mac(keys, out);
    out.extend_from_slice(&m);
}

/// Verifies MAC (constant time) BEFORE returning anything about the body;
/// never panics on any input. Returns the header and the body.
pub fn open<'a>(
    ring: &KeyRing,
    now_ms: u64,
    bytes: &'a [u8],
) -> Result<(Header, &'a [u8]), DatagramError> {
    if bytes.len() < HEADER_LEN + MAC_LEN {
        return Err(DatagramError::TooShort);
    }
    let (covered, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let (h, body) = covered.split_at(HEADER_LEN);
    if h[0..2] != MAGIC {
        return Err(DatagramError::Magic);
    }
    if h[2] != VERSION {
        return Err(DatagramError::Version);
    }
    let kind = Kind::from_u8(h[3]).ok_or(DatagramError::Kind)?;
    let key_id = h[4];
    if !ring
        .candidates(key_id, now_ms)
        .any(|k| ct_eq(&mac(k, covered), tag))
    {
        return Err(DatagramError::Mac);
    }
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&h[7..15]);
    let header = Header {
        kind,
        key_id,
        edge_id: u16::from_be_bytes([h[5], h[6]]),
        nonce: u64::from_be_bytes(nonce),
    };
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Secret;
    use proptest::prelude::*;

    fn keys(b: u8) -> Keys {
        Keys::derive(&Secret::from_bytes([b; 32]))
    }

    #[test]
    fn round_trip_and_layout() {
        let r = KeyRing::new(keys(1));
        let mut out = vec![9; 3];
        seal(r.current(), Kind::Ack, 0x0102, 0x0a0b, b"hello", &mut out);
        assert_eq!(out.len(), HEADER_LEN + 5 + MAC_LEN);
        assert_eq!(
            &out[..HEADER_LEN - 8],
            &[b'A', b'G', 1, 2, r.current().key_id(), 1, 2]
        );
        let (h, body) = open(&r, 0, &out).unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(
            h,
            Header {
                kind: Kind::Ack,
                key_id: r.current().key_id(),
                edge_id: 0x0102,
                nonce: 0x0a0b
            }
        );
    }

    #[test]
    fn errors_and_reasons() {
        let r = KeyRing::new(keys(1));
        let mut ok = Vec::new();
        seal(r.current(), Kind::Batch, 1, 2, b"", &mut ok);
        assert_eq!(open(&r, 0, &ok).unwrap().1, b"");
        let bad = |i: usize, v: u8| {
            let mut d = ok.clone();
            d[i] = v;
            open(&r, 0, &d).unwrap_err()
        };
        assert_eq!(
            open(&r, 0, &ok[..ok.len() - 1]).unwrap_err(),
            DatagramError::TooShort
        );
        assert_eq!(bad(0, b'X'), DatagramError::Magic);
        assert_eq!(bad(2, 2), DatagramError::Version);
        assert_eq!(bad(3, 0), DatagramError::Kind);
        assert_eq!(bad(3, 3), DatagramError::Kind);
        assert_eq!(bad(4, 200), DatagramError::Mac);
        let reasons: Vec<_> = [
            DatagramError::TooShort,
            DatagramError::Magic,
            DatagramError::Version,
            DatagramError::Kind,
            DatagramError::Mac,
        ]
        .iter()
        .map(DatagramError::reason)
        .collect();
        assert_eq!(reasons, ["too_short", "magic", "version", "kind", "mac"]);
    }

    #[test]
    fn wrong_key_refused() {
        let mut d = Vec::new();
        seal(&keys(1), Kind::Batch, 1, 2, b"body", &mut d);
        assert_eq!(
            open(&KeyRing::new(keys(2)), 0, &d).unwrap_err(),
            DatagramError::Mac
        );
        let k1 = keys(1);
        let twin = (2..=255u8)
            .map(keys)
            .find(|k| k.key_id() == k1.key_id())
            .unwrap();
        assert_eq!(
            open(&KeyRing::new(twin), 0, &d).unwrap_err(),
            DatagramError::Mac
        );
    }

    #[test]
    fn previous_key_accepted_until_deadline() {
        let mut d = Vec::new();
        seal(&keys(1), Kind::Batch, 1, 2, b"body", &mut d);
        let r = KeyRing::new(keys(2)).with_previous(keys(1), 500);
        assert!(open(&r, 500, &d).is_ok());
        assert_eq!(open(&r, 501, &d).unwrap_err(), DatagramError::Mac);
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(
            secret: [u8; 32], batch: bool, edge_id: u16, nonce: u64,
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let r = KeyRing::new(Keys::derive(&Secret::from_bytes(secret)));
            let kind = if batch { Kind::Batch } else { Kind::Ack };
            let mut d = Vec::new();
            seal(r.current(), kind, edge_id, nonce, &body, &mut d);
            let (h, b) = open(&r, 0, &d).unwrap();
            prop_assert_eq!(h, Header { kind, key_id: r.current().key_id(), edge_id, nonce });
            prop_assert_eq!(b, &body[..]);
        }

        #[test]
        fn every_bit_flip_is_refused(body in prop::collection::vec(any::<u8>(), 0..40)) {
            let r = KeyRing::new(keys(1));
            let mut d = Vec::new();
            seal(r.current(), Kind::Batch, 7, 8, &body, &mut d);
            for bit in 0..d.len() * 8 {
                let mut f = d.clone();
                f[bit / 8] ^= 1 << (bit % 8);
                prop_assert!(open(&r, 0, &f).is_err(), "bit {} accepted", bit);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(d in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = open(&KeyRing::new(keys(1)), 0, &d);
        }

        #[test]
        fn arbitrary_bodies_behind_valid_header_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..60), kind in 0u8..4, key_id: u8,
        ) {
            let mut d = vec![b'A', b'G', VERSION, kind, key_id, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
            d.extend_from_slice(&tail);
            let _ = open(&KeyRing::new(keys(1)), 0, &d);
        }
    }
}
