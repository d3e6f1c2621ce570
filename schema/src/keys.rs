//! The cluster secret and the keys derived from it.
//!
//! One 32-byte secret (hex in config) is shared by every edge and collector.
//! Each purpose gets its own key via `blake3::derive_key` with a distinct
//! context string, so a MAC for one purpose is never valid for another, and
//! a 4-bit key id (also derived) travels in click ids and datagram headers so
//! the receiver knows which key to try.
//!
//! Rotation: a [`KeyRing`] holds the current keys and previous keys, each
//! accepted until a unix-ms deadline. Key ids are only 4 bits, so two secrets
//! may share an id; [`KeyRing::candidates`] therefore yields every matching
//! key and the caller tries each MAC in turn.

use std::fmt;
use std::str::FromStr;

const CTX_CLICK_MAC: &str = "affgate 2026-11 click-id mac v1";
const CTX_DATAGRAM_MAC: &str = "affgate 2026-11 datagram mac v1";
const CTX_TOKEN: &str = "affgate 2026-11 postback token v1";
const CTX_KEY_ID: &str = "affgate 2026-11 key id v1";

/// The 32-byte cluster secret. Its `Debug` never prints the bytes.
#[derive(Clone)]
pub struct Secret([u8; 32]);

/// Why a configured secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("secret must be 64 hex characters (32 bytes)")]
    Length,
    #[error("secret is not hex")]
    NotHex,
}

impl Secret {
    /// Parses 64 hex characters (either case).
    pub fn from_hex(s: &str) -> Result<Secret, KeyError> {
        if s.len() != 64 {
            return Err(KeyError::Length);
        }
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| KeyError::NotHex)?;
        Ok(Secret(b))
    }

    pub fn from_bytes(b: [u8; 32]) -> Secret {
        Secret(b)
    }
}

impl FromStr for Secret {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Secret, KeyError> {
        Secret::from_hex(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Per-purpose keys derived from one [`Secret`]. `Debug` shows only the key id.
#[derive(Clone)]
pub struct Keys {
    key_id: u8,
    click_mac: [u8; 32],
    datagram_mac: [u8; 32],
    token: [u8; 32],
}

impl Keys {
    pub fn derive(secret: &Secret) -> Keys {
        let id = blake3::derive_key(CTX_KEY_ID, &secret.0);
        Keys {
            key_id: id[0] & 0x0f,
            click_mac: blake3::derive_key(CTX_CLICK_MAC, &secret.0),
            datagram_mac: blake3::derive_key(CTX_DATAGRAM_MAC, &secret.0),
            token: blake3::derive_key(CTX_TOKEN, &secret.0),
        }
    }

    /// 0..=15; carried in click ids and datagram headers.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    pub fn click_mac_key(&self) -> &[u8; 32] {
        &self.click_mac
    }

    pub fn datagram_mac_key(&self) -> &[u8; 32] {
        &self.datagram_mac
    }

    pub fn token_key(&self) -> &[u8; 32] {
        &self.token
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The current keys plus previous keys still accepted during a rotation.
#[derive(Clone, Debug)]
pub struct KeyRing {
    current: Keys,
    /// (keys, accepted while `now_ms <= deadline`).
    previous: Vec<(Keys, u64)>,
}

impl KeyRing {
    pub fn new(current: Keys) -> KeyRing {
        KeyRing {
            current,
            previous: Vec::new(),
        }
    }

    /// The ring of a configuration: keys derived from the current secret,
    /// and from each previous secret with the unix-ms time it is accepted until.
    pub fn from_secrets(current: &Secret, previous: &[(Secret, u64)]) -> KeyRing {
        previous
            .iter()
            .fold(KeyRing::new(Keys::derive(current)), |ring, (s, until)| {
                ring.with_previous(Keys::derive(s), *until)
            })
    }

    /// Also accept `previous` until `accept_until_ms` (inclusive, unix ms).
    pub fn with_previous(mut self, previous: Keys, accept_until_ms: u64) -> KeyRing {
        self.previous.push((previous, accept_until_ms));
        self
    }

    /// The keys used to mint and seal.
    pub fn current(&self) -> &Keys {
        &self.current
    }

    /// Keys to try for a given key id at time now_ms: current first (if ids
    /// match), then unexpired previous ones with that id.
    pub fn candidates(&self, key_id: u8, now_ms: u64) -> impl Iterator<Item = &Keys> {
        let current = (self.current.key_id == key_id).then_some(&self.current);
        let previous = self
            .previous
            .iter()
            .filter(move |(k, until)| k.key_id == key_id && now_ms <= *until)
            .map(|(k, _)| k);
        current.into_iter().chain(previous)
    }
}

/// Lowercase hex of `blake3::keyed_hash(token_key, token)`: the name under
/// which a postback token is stored in Redis (`affgate:token:{hash}`), so a
/// Redis dump does not reveal usable tokens. 64 characters.
pub fn token_hash(keys: &Keys, token: &str) -> String {
    blake3::keyed_hash(&keys.token, token.as_bytes())
        .to_hex()
        .to_string()
}

/// Equality of two MACs without an early exit, so timing does not reveal how
/// many leading bytes of a forged MAC were right.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(b: u8) -> Keys {
        Keys::derive(&Secret::from_bytes([b; 32]))
    }

    #[test]
    fn hex_parsing() {
        let s: Secret = "00".repeat(32).parse().unwrap();
        assert_eq!(s.0, [0; 32]);
        assert_eq!(Secret::from_hex(&"AB".repeat(32)).unwrap().0, [0xab; 32]);
        assert_eq!(Secret::from_hex("00").unwrap_err(), KeyError::Length);
        assert_eq!(
            Secret::from_hex(&"zz".repeat(32)).unwrap_err(),
            KeyError::NotHex
        );
        assert_eq!(
            Secret::from_hex(&"é".repeat(32)).unwrap_err(),
            KeyError::NotHex
        );
    }

    #[test]
    fn debug_hides_key_bytes() {
        let s = Secret::from_bytes([0xab; 32]);
        assert!(!format!("{s:?}").contains("ab"), "secret debug leaks bytes");
        let k = Keys::derive(&s);
        let d = format!("{k:?}");
        assert!(!d.contains(&hex::encode(k.click_mac_key())), "{d}");
        assert!(!d.contains(&format!("{:?}", k.click_mac_key()[0..4].to_vec())));
    }

    #[test]
    fn purposes_get_distinct_keys() {
        let k = keys(7);
        assert_ne!(k.click_mac_key(), k.datagram_mac_key());
        assert_ne!(k.click_mac_key(), k.token_key());
        assert_ne!(k.datagram_mac_key(), k.token_key());
        assert!(k.key_id() < 16);
        assert_ne!(keys(7).click_mac_key(), keys(8).click_mac_key());
        assert_eq!(keys(7).click_mac_key(), k.click_mac_key(), "deterministic");
    }

    #[test]
    fn token_hash_is_keyed_hex() {
        let h = token_hash(&keys(1), "tok");
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(h, token_hash(&keys(2), "tok"));
        assert_ne!(h, token_hash(&keys(1), "tok2"));
    }

    #[test]
    fn candidates_order_and_expiry() {
        let cur = keys(1);
        // Find a previous secret with the same key id, and one with another.
        let same = (2..=255u8)
            .map(keys)
            .find(|k| k.key_id() == cur.key_id())
            .unwrap();
        let other = (2..=255u8)
            .map(keys)
            .find(|k| k.key_id() != cur.key_id())
            .unwrap();
        let ring = KeyRing::new(cur.clone())
            .with_previous(same.clone(), 100)
            .with_previous(other.clone(), 100);
        let got: Vec<_> = ring.candidates(cur.key_id(), 100).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].click_mac_key(), cur.click_mac_key(), "current first");
        assert_eq!(got[1].click_mac_key(), same.click_mac_key());
        assert_eq!(ring.candidates(cur.key_id(), 101).count(), 1, "expired");
        let got: Vec<_> = ring.candidates(other.key_id(), 50).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].click_mac_key(), other.click_mac_key());
        assert_eq!(ring.candidates(other.key_id(), 101).count(), 0);
        assert_eq!(ring.current().click_mac_key(), cur.click_mac_key());
    }
}
