//! Dedup keys: 32-byte blake3 hashes that name one event.
//!
//! Each kind of key has its own derive-key context, so a click key can never
//! equal a postback or conversion key. Variable-length fields are prefixed
//! with their length (u64 little-endian), so no two different field tuples
//! hash the same bytes (`("ab","c")` vs `("a","bc")`); integers are fixed
//! width. The same postback fired twice gets the same key; a status change
//! (pending -> approved -> reversed) is a new postback key but the same
//! conversion key.

use std::fmt;

use crate::event::Status;

const CTX_CLICK: &str = "affgate 2026-11 dedup click v1";
const CTX_POSTBACK: &str = "affgate 2026-11 dedup postback v1";
const CTX_CONVERSION: &str = "affgate 2026-11 dedup conversion v1";

/// 32-byte name of one event (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(pub [u8; 32]);

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

impl DedupKey {
    /// The key of a click, derived from its click id.
    pub fn for_click(click_id: &str) -> DedupKey {
        let mut h = blake3::Hasher::new_derive_key(CTX_CLICK);
        field(&mut h, click_id.as_bytes());
        DedupKey(*h.finalize().as_bytes())
    }

    /// Names one postback event: same postback fired twice -> same key; any
    /// field differs -> different key.
    pub fn for_postback(
        network_id: u64,
        click_id: &str,
        txid: &str,
        event: &str,
        status: Status,
    ) -> DedupKey {
        let mut h = blake3::Hasher::new_derive_key(CTX_POSTBACK);
        conversion_fields(&mut h, network_id, click_id, txid, event);
        field(&mut h, status.as_str().as_bytes());
        DedupKey(*h.finalize().as_bytes())
    }

    /// Names the conversion (without status), for the conversions table's
    /// uniqueness.
    pub fn for_conversion(network_id: u64, click_id: &str, txid: &str, event: &str) -> DedupKey {
        let mut h = blake3::Hasher::new_derive_key(CTX_CONVERSION);
        conversion_fields(&mut h, network_id, click_id, txid, event);
        DedupKey(*h.finalize().as_bytes())
    }

    /// 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

fn conversion_fields(
    h: &mut blake3::Hasher,
    network_id: u64,
    click_id: &str,
    txid: &str,
    event: &str,
) {
    h.update(&network_id.to_le_bytes());
    field(h, click_id.as_bytes());
    field(h, txid.as_bytes());
    field(h, event.as_bytes());
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DedupKey({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STATUSES: [Status; 4] = [
        Status::Approved,
        Status::Pending,
        Status::Rejected,
        Status::Reversed,
    ];

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(STATUSES.to_vec())
    }

    #[test]
    fn concatenation_is_not_ambiguous() {
        assert_ne!(
            DedupKey::for_postback(1, "ab", "c", "", Status::Approved),
            DedupKey::for_postback(1, "a", "bc", "", Status::Approved)
        );
        assert_ne!(
            DedupKey::for_conversion(1, "", "ab", "c"),
            DedupKey::for_conversion(1, "", "a", "bc")
        );
        assert_ne!(
            DedupKey::for_conversion(1, "x", "", ""),
            DedupKey::for_conversion(1, "", "x", "")
        );
    }

    #[test]
    fn kinds_are_separated() {
        assert_ne!(
            DedupKey::for_conversion(1, "c", "t", "e"),
            DedupKey::for_postback(1, "c", "t", "e", Status::Approved)
        );
        assert_ne!(
            DedupKey::for_click("c"),
            DedupKey::for_conversion(0, "c", "", "")
        );
    }

    #[test]
    fn hex_and_debug() {
        let k = DedupKey::for_click("abc");
        assert_eq!(k.to_hex().len(), 64);
        assert_eq!(format!("{k:?}"), format!("DedupKey({})", k.to_hex()));
    }

    proptest! {
        #[test]
        fn same_inputs_same_key(n: u64, c in ".*", t in ".*", e in ".*", s in status()) {
            prop_assert_eq!(DedupKey::for_click(&c), DedupKey::for_click(&c));
            prop_assert_eq!(
                DedupKey::for_postback(n, &c, &t, &e, s),
                DedupKey::for_postback(n, &c, &t, &e, s)
            );
            prop_assert_eq!(
                DedupKey::for_conversion(n, &c, &t, &e),
                DedupKey::for_conversion(n, &c, &t, &e)
            );
        }

        #[test]
        fn any_field_change_changes_the_key(
            a in (any::<u64>(), ".{0,8}", ".{0,8}", ".{0,8}", status()),
            b in (any::<u64>(), ".{0,8}", ".{0,8}", ".{0,8}", status()),
        ) {
            let pa = DedupKey::for_postback(a.0, &a.1, &a.2, &a.3, a.4);
            let pb = DedupKey::for_postback(b.0, &b.1, &b.2, &b.3, b.4);
            prop_assert_eq!(pa == pb, a == b);
            let ca = DedupKey::for_conversion(a.0, &a.1, &a.2, &a.3);
            let cb = DedupKey::for_conversion(b.0, &b.1, &b.2, &b.3);
            prop_assert_eq!(ca == cb, (&a.0, &a.1, &a.2, &a.3) == (&b.0, &b.1, &b.2, &b.3));
            prop_assert_eq!(DedupKey::for_click(&a.1) == DedupKey::for_click(&b.1), a.1 == b.1);
        }

        #[test]
        fn each_single_field_change_changes_the_key(
            n: u64, c in ".{0,8}", t in ".{0,8}", e in ".{0,8}", s in status(), which in 0..5usize,
        ) {
            let base = DedupKey::for_postback(n, &c, &t, &e, s);
            let changed = match which {
                0 => DedupKey::for_postback(n ^ 1, &c, &t, &e, s),
                1 => DedupKey::for_postback(n, &format!("{c}x"), &t, &e, s),
                2 => DedupKey::for_postback(n, &c, &format!("{t}x"), &e, s),
                3 => DedupKey::for_postback(n, &c, &t, &format!("{e}x"), s),
                _ => {
                    let other = STATUSES[(STATUSES.iter().position(|x| *x == s).unwrap() + 1) % 4];
                    DedupKey::for_postback(n, &c, &t, &e, other)
                }
            };
            prop_assert_ne!(base, changed);
        }
    }
}
