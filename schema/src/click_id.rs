//! Click ids: minted by the edge, verified anywhere with no lookup.
//!
//! A click id is 30 bytes written as exactly 40 base64url characters (no
//! padding; 30 bytes = 240 bits = 40 x 6 bits, so there are no spare
//! trailing bits and every id has exactly one spelling):
//!
//! ```text
//!  byte  0        1..=2     3..=8       9..=13      14..=17   18..=29
//!       +--------+---------+-----------+-----------+---------+----------------+
//!       |ver|kid | edge_id |  ts_ms    |  link_id  |   seq   |      mac       |
//!       |4b | 4b | u16 BE  |  u48 BE   |  u40 BE   | u32 BE  | 12 bytes       |
//!       +--------+---------+-----------+-----------+---------+----------------+
//! ```
//!
//! - `ver` (high nibble) is 1; `kid` (low nibble) is the key id
//!   of the keys that minted it, so verifiers pick the key during rotation.
//! - `ts_ms` is unix milliseconds mod 2^48 (good until the year 10889).
//! - `mac` is the first 12 bytes of `blake3::keyed_hash(click_mac_key,
//!   bytes[0..18])`, compared in constant time. 96 bits make a forged or
//!   mistyped id acceptable with probability 2^-96.
//!
//! Uniqueness: `(edge_id, ts_ms, seq)` never repeats. Edge ids are unique in
//! the cluster; within one edge, `seq` is a per-edge counter persisted in the
//! edge's ring, so it keeps counting across restarts, and 2^32 ids would
//! have to be minted in one millisecond for it to wrap onto itself. The link
//! id is carried for lookup-free attribution, not for uniqueness.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::keys::{KeyRing, Keys, ct_eq};

/// Length of a click id in characters (and bytes: it is ASCII).
pub const CLICK_ID_LEN: usize = 40;
/// Largest link id a click id can carry (40 bits).
pub const MAX_LINK_ID: u64 = (1 << 40) - 1;

/// Layout version in the high nibble of byte 0.
const VERSION: u8 = 1;
const RAW_LEN: usize = 30;
const SIGNED_LEN: usize = 18;
const MAC_LEN: usize = RAW_LEN - SIGNED_LEN;
const TS_MASK: u64 = (1 << 48) - 1;

/// The fields a click id carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClickIdFields {
    pub key_id: u8,
    pub edge_id: u16,
    /// Unix milliseconds mod 2^48.
    pub ts_ms: u64,
    pub link_id: u64,
    pub seq: u32,
}

/// A minted or verified click id: always 40 ASCII base64url characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClickId([u8; CLICK_ID_LEN]);

/// Why a click id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClickIdError {
    #[error("click id must be 40 characters")]
    Length,
    #[error("click id is not base64url")]
    Alphabet,
    #[error("click id has an unknown version")]
    Version,
    #[error("link id too large")]
    LinkId,
    #[error("click id signature mismatch")]
    Mac,
}

fn mac(keys: &Keys, signed: &[u8]) -> [u8; MAC_LEN] {
    let h = blake3::keyed_hash(keys.click_mac_key(), signed);
    let mut m = [0u8; MAC_LEN];
    m.copy_from_slice(&h.as_bytes()[..MAC_LEN]);
    m
}

fn decode_raw(s: &str) -> Result<[u8; RAW_LEN], ClickIdError> {
    if s.len() != CLICK_ID_LEN {
        return Err(ClickIdError::Length);
    }
    let mut raw = [0u8; RAW_LEN];
    match URL_SAFE_NO_PAD.decode_slice(s.as_bytes(), &mut raw) {
        Ok(RAW_LEN) => Ok(raw),
        _ => Err(ClickIdError::Alphabet),
    }
}

fn fields(raw: &[u8; RAW_LEN]) -> Result<ClickIdFields, ClickIdError> {
    if raw[0] >> 4 != VERSION {
        return Err(ClickIdError::Version);
    }
    let be =
        |r: std::ops::Range<usize>| raw[r].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    Ok(ClickIdFields {
        key_id: raw[0] & 0x0f,
        edge_id: u16::from_be_bytes([raw[1], raw[2]]),
        ts_ms: be(3..9),
        link_id: be(9..14),
        seq: u32::from_be_bytes([raw[14], raw[15], raw[16], raw[17]]),
    })
}

impl ClickId {
    /// ts_ms is taken mod 2^48, link_id must be <= MAX_LINK_ID (else
    /// Err(ClickIdError::LinkId)), key id from keys.
    pub fn mint(
        keys: &Keys,
        edge_id: u16,
        ts_ms: u64,
        link_id: u64,
        seq: u32,
    ) -> Result<ClickId, ClickIdError> {
        if link_id > MAX_LINK_ID {
            return Err(ClickIdError::LinkId);
        }
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION << 4 | (keys.key_id() & 0x0f);
        raw[1..3].copy_from_slice(&edge_id.to_be_bytes());
        raw[3..9].copy_from_slice(&(ts_ms & TS_MASK).to_be_bytes()[2..]);
        raw[9..14].copy_from_slice(&link_id.to_be_bytes()[3..]);
        raw[14..18].copy_from_slice(&seq.to_be_bytes());
        let m = mac(keys, &raw[..SIGNED_LEN]);
        raw[SIGNED_LEN..].copy_from_slice(&m);
        let mut out = [0u8; CLICK_ID_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("30 bytes encode to exactly 40 base64 characters");
        debug_assert_eq!(n, CLICK_ID_LEN);
        Ok(ClickId(out))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a click id is ASCII base64url by construction")
    }

    /// Decode and verify the MAC against the key ring. Any malformed input is
    /// an Err, never a panic.
    pub fn verify(
        s: &str,
        keys: &KeyRing,
        now_ms: u64,
    ) -> Result<(ClickId, ClickIdFields), ClickIdError> {
        let raw = decode_raw(s)?;
        let f = fields(&raw)?;
        let ok = keys
            .candidates(f.key_id, now_ms)
            .any(|k| ct_eq(&mac(k, &raw[..SIGNED_LEN]), &raw[SIGNED_LEN..]));
        if !ok {
            return Err(ClickIdError::Mac);
        }
        let mut id = [0u8; CLICK_ID_LEN];
        id.copy_from_slice(s.as_bytes());
        Ok((ClickId(id), f))
    }

    /// Decode without verifying (for inspection/tools only).
    pub fn decode_unverified(s: &str) -> Result<ClickIdFields, ClickIdError> {
        fields(&decode_raw(s)?)
    }
}

impl fmt::Display for ClickId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ClickId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClickId({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Secret;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    fn keys(b: u8) -> Keys {
        Keys::derive(&Secret::from_bytes([b; 32]))
    }

    fn ring(b: u8) -> KeyRing {
        KeyRing::new(keys(b))
    }

    #[test]
    fn known_fields_round_trip() {
        let k = keys(1);
        let id = ClickId::mint(&k, 0xabcd, 1_790_000_000_123, MAX_LINK_ID, u32::MAX).unwrap();
        assert_eq!(id.as_str().len(), CLICK_ID_LEN);
        assert_eq!(id.to_string(), id.as_str());
        assert!(format!("{id:?}").contains(id.as_str()));
        let (back, f) = ClickId::verify(id.as_str(), &ring(1), 0).unwrap();
        assert_eq!(back, id);
        assert_eq!(
            f,
            ClickIdFields {
                key_id: k.key_id(),
                edge_id: 0xabcd,
                ts_ms: 1_790_000_000_123,
                link_id: MAX_LINK_ID,
                seq: u32::MAX
            }
        );
        assert_eq!(ClickId::decode_unverified(id.as_str()).unwrap(), f);
    }

    #[test]
    fn link_id_limit_and_ts_wrap() {
        let k = keys(1);
        assert_eq!(
            ClickId::mint(&k, 1, 1, MAX_LINK_ID + 1, 1).unwrap_err(),
            ClickIdError::LinkId
        );
        let id = ClickId::mint(&k, 1, (1 << 48) + 5, 1, 1).unwrap();
        assert_eq!(ClickId::decode_unverified(id.as_str()).unwrap().ts_ms, 5);
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let r = ring(3);
        let id = ClickId::mint(r.current(), 42, 1_790_000_000_000, 12345, 678).unwrap();
        let s = id.as_str().as_bytes().to_vec();
        for pos in 0..CLICK_ID_LEN {
            for b in 0u8..=127 {
                if b == s[pos] {
                    continue;
                }
                let mut t = s.clone();
                t[pos] = b;
                let t = String::from_utf8(t).unwrap();
                let err = ClickId::verify(&t, &r, 0).unwrap_err();
                if !ALPHABET.contains(&b) {
                    assert_eq!(err, ClickIdError::Alphabet, "pos {pos} byte {b}");
                }
            }
        }
    }

    #[test]
    fn wrong_version_is_refused() {
        let r = ring(3);
        let id = ClickId::mint(r.current(), 1, 1, 1, 1).unwrap();
        let mut raw = decode_raw(id.as_str()).unwrap();
        raw[0] = 2 << 4 | (raw[0] & 0x0f);
        let s = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            ClickId::verify(&s, &r, 0).unwrap_err(),
            ClickIdError::Version
        );
        assert_eq!(
            ClickId::decode_unverified(&s).unwrap_err(),
            ClickIdError::Version
        );
    }

    #[test]
    fn truncation_and_extension_are_refused() {
        let r = ring(3);
        let id = ClickId::mint(r.current(), 1, 2, 3, 4).unwrap();
        let s = id.as_str();
        for n in 0..CLICK_ID_LEN {
            assert_eq!(
                ClickId::verify(&s[..n], &r, 0).unwrap_err(),
                ClickIdError::Length
            );
        }
        for ext in ["A", "=", "AAAA", " "] {
            assert_eq!(
                ClickId::verify(&format!("{s}{ext}"), &r, 0).unwrap_err(),
                ClickIdError::Length
            );
        }
        // Multi-byte characters that make 40 bytes are refused, not sliced.
        let uni = format!("é{}", &s[2..]);
        assert_eq!(uni.len(), CLICK_ID_LEN);
        assert_eq!(
            ClickId::verify(&uni, &r, 0).unwrap_err(),
            ClickIdError::Alphabet
        );
    }

    #[test]
    fn different_key_is_refused() {
        let id = ClickId::mint(&keys(1), 1, 2, 3, 4).unwrap();
        assert_eq!(
            ClickId::verify(id.as_str(), &ring(2), 0).unwrap_err(),
            ClickIdError::Mac
        );
        // Same key id but a different secret: the MAC still decides.
        let k1 = keys(1);
        let twin = (2..=255u8)
            .map(keys)
            .find(|k| k.key_id() == k1.key_id())
            .unwrap();
        assert_eq!(
            ClickId::verify(id.as_str(), &KeyRing::new(twin), 0).unwrap_err(),
            ClickIdError::Mac
        );
    }

    #[test]
    fn previous_key_accepted_until_deadline() {
        let old = keys(1);
        let new = keys(2);
        let id = ClickId::mint(&old, 1, 2, 3, 4).unwrap();
        let r = KeyRing::new(new).with_previous(old, 1_000);
        assert!(ClickId::verify(id.as_str(), &r, 999).is_ok());
        assert!(ClickId::verify(id.as_str(), &r, 1_000).is_ok());
        assert_eq!(
            ClickId::verify(id.as_str(), &r, 1_001).unwrap_err(),
            ClickIdError::Mac
        );
        // Also when old and new share a key id (4-bit ids collide).
        let old = keys(1);
        let twin = (2..=255u8)
            .map(keys)
            .find(|k| k.key_id() == old.key_id())
            .unwrap();
        let r = KeyRing::new(twin).with_previous(old, 1_000);
        assert!(ClickId::verify(id.as_str(), &r, 1_000).is_ok());
        assert!(ClickId::verify(id.as_str(), &r, 1_001).is_err());
    }

    #[test]
    fn concurrent_minting_never_collides() {
        let k = Arc::new(keys(5));
        let seq = Arc::new(AtomicU32::new(0));
        let ts = 1_790_000_000_000;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (k, seq) = (k.clone(), seq.clone());
                std::thread::spawn(move || {
                    (0..5_000)
                        .map(|_| {
                            let n = seq.fetch_add(1, Ordering::Relaxed);
                            ClickId::mint(&k, 7, ts, 99, n).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(all.insert(id), "duplicate click id {id}");
            }
        }
        assert_eq!(all.len(), 20_000);
    }

    #[test]
    fn different_edges_never_collide() {
        let k = keys(5);
        let mut all = HashSet::new();
        for edge in 0..64u16 {
            for seq in 0..64u32 {
                // Same time, link and seq on every edge.
                assert!(all.insert(ClickId::mint(&k, edge, 1, 1, seq).unwrap()));
            }
        }
    }

    proptest! {
        #[test]
        fn mint_verify_round_trip(
            secret: [u8; 32], edge_id: u16, ts_ms in 0u64..(1 << 48),
            link_id in 0..=MAX_LINK_ID, seq: u32,
        ) {
            let r = KeyRing::new(Keys::derive(&Secret::from_bytes(secret)));
            let id = ClickId::mint(r.current(), edge_id, ts_ms, link_id, seq).unwrap();
            prop_assert!(id.as_str().bytes().all(|b| ALPHABET.contains(&b)));
            let (back, f) = ClickId::verify(id.as_str(), &r, 0).unwrap();
            prop_assert_eq!(back, id);
            prop_assert_eq!(f, ClickIdFields { key_id: r.current().key_id(), edge_id, ts_ms, link_id, seq });
        }

        #[test]
        fn verify_never_panics(s in ".{0,60}") {
            let _ = ClickId::verify(&s, &ring(1), 0);
            let _ = ClickId::decode_unverified(&s);
        }

        #[test]
        fn verify_never_panics_on_base64ish(s in "[A-Za-z0-9_=+/-]{38,42}") {
            let _ = ClickId::verify(&s, &ring(1), 0);
            let _ = ClickId::decode_unverified(&s);
        }
    }
}
