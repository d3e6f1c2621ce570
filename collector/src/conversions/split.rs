//! The commission split: who earns what of one conversion's payout.
//!
//! An offer's `commission_levels` are rates (fractions of the payout, in
//! millionths: `700000` is 70 %), one per level: level 0 is the converting
//! affiliate, level 1 its parent, and so on up the affiliate's `ltree` path.
//! Levels deeper than the tree are not paid (that share stays with the
//! operator); so is whatever rounding leaves over.
//!
//! Rounding rule: each share is `floor(payout × rate)` in micro-units
//! (0.000001 of the currency), computed exactly in 128-bit integers. Every
//! share rounds down, so the shares never sum to more than
//! `floor(payout × Σ rates)`, which is at most the payout because the rates
//! sum to at most 1 (checked when the offer is created). The same inputs
//! always give the same shares.

/// One millionth as the unit of rates and of money.
pub const MICRO: i64 = 1_000_000;
/// At most this many levels per offer.
pub const MAX_LEVELS: usize = 10;

/// One affiliate's share of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub level: u16,
    pub affiliate_id: i64,
    /// Rate in millionths.
    pub rate: i64,
    /// Amount in micro-units of the conversion's currency.
    pub amount: i64,
}

/// Why a set of levels is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelsError {
    #[error("at least one level is required")]
    Empty,
    #[error("at most {MAX_LEVELS} levels")]
    TooMany,
    #[error("each level must be between 0 and 1")]
    OutOfRange,
    #[error("the levels must sum to at most 1")]
    SumAboveOne,
}

/// Checks rates (in millionths) as an offer's `commission_levels`.
pub fn check_levels(rates: &[i64]) -> Result<(), LevelsError> {
    if rates.is_empty() {
        return Err(LevelsError::Empty);
    }
    if rates.len() > MAX_LEVELS {
        return Err(LevelsError::TooMany);
    }
    if rates.iter().any(|r| !(0..=MICRO).contains(r)) {
        return Err(LevelsError::OutOfRange);
    }
    if rates.iter().sum::<i64>() > MICRO {
        return Err(LevelsError::SumAboveOne);
    }
    Ok(())
}

/// The affiliate ids of an `ltree` path, nearest first: `"1.5.9"` gives
/// `[9, 5, 1]` (9 converted, 5 is its parent). None if a label is not an id.
pub fn beneficiaries(path: &str) -> Option<Vec<i64>> {
    path.split('.')
        .rev()
        .map(|label| label.parse::<i64>().ok().filter(|id| *id > 0))
        .collect()
}

/// Splits `payout` (micro-units, ≥ 0) over `chain` (nearest first, from
/// [`beneficiaries`]) by `rates` (checked by [`check_levels`]). One share per
/// level that has an affiliate, zero amounts included, so the ledger shows
/// every level that was considered.
pub fn split(payout: i64, rates: &[i64], chain: &[i64]) -> Vec<Share> {
    let payout = payout.max(0);
    rates
        .iter()
        .zip(chain)
        .enumerate()
        .map(|(level, (&rate, &affiliate_id))| {
            let exact = i128::from(payout) * i128::from(rate.clamp(0, MICRO));
            // Both factors are non-negative, so division truncates = floors,
            // and the result is at most `payout`, which fits an i64.
            let amount = i64::try_from(exact / i128::from(MICRO)).unwrap_or(payout);
            Share {
                level: level as u16,
                affiliate_id,
                rate,
                amount,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn three_levels_of_a_round_payout() {
        let s = split(100 * MICRO, &[700_000, 100_000, 50_000], &[9, 5, 1]);
        let amounts: Vec<_> = s.iter().map(|s| (s.affiliate_id, s.amount)).collect();
        assert_eq!(
            amounts,
            vec![(9, 70 * MICRO), (5, 10 * MICRO), (1, 5 * MICRO)]
        );
    }

    #[test]
    fn shares_round_down_to_the_micro() {
        // 0.000003 × 1/3 each: 0.000001 each, nothing lost upwards.
        let s = split(3, &[333_333, 333_333, 333_333], &[3, 2, 1]);
        assert!(s.iter().all(|s| s.amount == 0), "{s:?}");
        let s = split(10 * MICRO, &[333_333; 3], &[3, 2, 1]);
        assert!(s.iter().all(|s| s.amount == 3_333_330), "{s:?}");
    }

    #[test]
    fn levels_deeper_than_the_tree_are_not_paid() {
        let s = split(MICRO, &[500_000, 300_000, 200_000], &[7]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].amount, 500_000);
    }

    #[test]
    fn paths_give_nearest_first() {
        assert_eq!(beneficiaries("1.5.9"), Some(vec![9, 5, 1]));
        assert_eq!(beneficiaries("4"), Some(vec![4]));
        assert_eq!(beneficiaries("1.x"), None);
        assert_eq!(beneficiaries("0"), None);
    }

    #[test]
    fn levels_are_checked() {
        assert_eq!(check_levels(&[]), Err(LevelsError::Empty));
        assert_eq!(check_levels(&[1; 11]), Err(LevelsError::TooMany));
        assert_eq!(check_levels(&[-1]), Err(LevelsError::OutOfRange));
        assert_eq!(check_levels(&[MICRO + 1]), Err(LevelsError::OutOfRange));
        assert_eq!(
            check_levels(&[600_000, 400_001]),
            Err(LevelsError::SumAboveOne)
        );
        assert_eq!(check_levels(&[600_000, 400_000]), Ok(()));
    }

    fn levels() -> impl Strategy<Value = Vec<i64>> {
        // Random rates, scaled down when their sum is above 1.
        prop::collection::vec(0..=MICRO, 1..=MAX_LEVELS).prop_map(|mut r| {
            let sum: i64 = r.iter().sum();
            if sum > MICRO {
                for x in &mut r {
                    *x = (i128::from(*x) * i128::from(MICRO) / i128::from(sum)) as i64;
                }
            }
            r
        })
    }

    /// A random tree of `n` affiliates (each parent an earlier one, or none)
    /// and the ltree path of its last node.
    fn tree_path() -> impl Strategy<Value = String> {
        prop::collection::vec(any::<prop::sample::Index>(), 1..40).prop_map(|parents| {
            let mut paths: Vec<String> = Vec::new();
            for (i, p) in parents.iter().enumerate() {
                let id = i + 1;
                let path = if i == 0 || p.index(3) == 0 {
                    id.to_string()
                } else {
                    format!("{}.{id}", paths[p.index(i)])
                };
                paths.push(path);
            }
            paths.pop().unwrap_or_else(|| "1".into())
        })
    }

    proptest! {
        #[test]
        fn never_more_than_the_payout_and_deterministic(
            payout in 0..=999_999_999_999 * MICRO,
            rates in levels(),
            path in tree_path(),
        ) {
            prop_assert_eq!(check_levels(&rates), Ok(()));
            let chain = beneficiaries(&path).expect("generated paths are ids");
            let shares = split(payout, &rates, &chain);
            let total: i128 = shares.iter().map(|s| i128::from(s.amount)).sum();
            prop_assert!(total <= i128::from(payout), "{total} > {payout}");
            prop_assert_eq!(shares.len(), rates.len().min(chain.len()));
            for (i, s) in shares.iter().enumerate() {
                prop_assert!(s.amount >= 0);
                prop_assert_eq!(s.affiliate_id, chain[i]);
                // floor(payout × rate), exactly.
                let exact = i128::from(payout) * i128::from(rates[i]);
                prop_assert!(i128::from(s.amount) * i128::from(MICRO) <= exact);
                prop_assert!((i128::from(s.amount) + 1) * i128::from(MICRO) > exact);
            }
            prop_assert_eq!(split(payout, &rates, &chain), shares);
        }
    }
}
