//! Generated slugs: 8 characters from an alphabet without look-alikes
//! (no `0 o 1 l i`), lowercase only, so a slug read aloud or retyped from
//! print survives. 31^8 ≈ 8.5 × 10^11 slugs: a collision is rare, and the
//! caller retries on the unique constraint when one happens.

/// The alphabet of generated slugs.
pub const ALPHABET: &[u8; 31] = b"23456789abcdefghjkmnpqrstuvwxyz";
pub const LEN: usize = 8;

/// A random slug from `rng`.
pub fn generate(rng: &mut fastrand::Rng) -> String {
    (0..LEN)
        .map(|_| char::from(ALPHABET[rng.usize(..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_short_valid_and_unambiguous() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = generate(&mut rng);
            assert_eq!(s.len(), LEN);
            assert!(affgate_schema::link::valid_slug(&s));
            assert!(!s.contains(['0', 'o', '1', 'l', 'i']), "{s}");
            seen.insert(s);
        }
        assert_eq!(seen.len(), 10_000, "no collision in 10k draws");
    }
}
