//! Money as `i64` micro-units: 1 currency unit = 1_000_000 micros, the same
//! scale as ClickHouse `Decimal(18,6)` and PostgreSQL `numeric(18,6)`.
//!
//! Accepted text is deliberately narrow, because it comes from networks'
//! postbacks: ASCII digits, at most 12 significant integer digits, then
//! optionally `.` and 1 to 6 fraction digits. No sign, exponent, whitespace,
//! or bare `.5` / `1.`; negative amounts are refused (a reversal is a status,
//! not a negative payout). [`format_micros`] writes the shortest form that
//! [`parse_micros`] reads back to the same value.

/// Why an amount was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecimalError {
    #[error("amount is empty")]
    Empty,
    #[error("amount is not a decimal number")]
    Syntax,
    #[error("amount has more than 6 fraction digits")]
    TooManyFractionDigits,
    #[error("amount is too large")]
    TooLarge,
    #[error("amount is negative")]
    Negative,
}

const SCALE: i64 = 1_000_000;
const MAX_UNITS: i64 = 999_999_999_999;

/// Parses `"12"`, `"12.5"`, `"0.000001"` into micros (see the module doc).
pub fn parse_micros(s: &str) -> Result<i64, DecimalError> {
    let b = s.as_bytes();
    match b.first() {
        None => return Err(DecimalError::Empty),
        Some(b'-') => return Err(DecimalError::Negative),
        Some(_) => {}
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.as_bytes(), Some(f.as_bytes())),
        None => (b, None),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
        return Err(DecimalError::Syntax);
    }
    let mut units: i64 = 0;
    for d in int {
        units = units * 10 + i64::from(d - b'0');
        if units > MAX_UNITS {
            return Err(DecimalError::TooLarge);
        }
    }
    let mut micros: i64 = 0;
    if let Some(f) = frac {
        if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
            return Err(DecimalError::Syntax);
        }
        if f.len() > 6 {
            return Err(DecimalError::TooManyFractionDigits);
        }
        for i in 0..6 {
            micros = micros * 10 + f.get(i).map_or(0, |d| i64::from(d - b'0'));
        }
    }
    Ok(units * SCALE + micros)
}

/// Shortest decimal text for `v` micros: `"12"`, `"12.5"`, `"0.000001"`.
/// Negative values (never produced by [`parse_micros`]) get a leading `-`.
pub fn format_micros(v: i64) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let a = v.unsigned_abs();
    let (units, micros) = (a / SCALE as u64, a % SCALE as u64);
    if micros == 0 {
        return format!("{sign}{units}");
    }
    let frac = format!("{micros:06}");
    format!("{sign}{units}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepted() {
        assert_eq!(parse_micros("12"), Ok(12_000_000));
        assert_eq!(parse_micros("12.5"), Ok(12_500_000));
        assert_eq!(parse_micros("0.000001"), Ok(1));
        assert_eq!(parse_micros("0"), Ok(0));
        assert_eq!(parse_micros("007.10"), Ok(7_100_000));
        assert_eq!(
            parse_micros("999999999999.999999"),
            Ok(999_999_999_999_999_999)
        );
    }

    #[test]
    fn refused() {
        use DecimalError::*;
        for (s, e) in [
            ("", Empty),
            ("-1", Negative),
            ("-0", Negative),
            ("+", Syntax),
            ("+1", Syntax),
            ("1e5", Syntax),
            (".5", Syntax),
            ("1.", Syntax),
            (".", Syntax),
            (" 1", Syntax),
            ("1 ", Syntax),
            ("1.2.3", Syntax),
            ("1,5", Syntax),
            ("١", Syntax),
            ("1.0000001", TooManyFractionDigits),
            ("1.5000000", TooManyFractionDigits),
            ("1000000000000", TooLarge),
            ("99999999999999999999999999", TooLarge),
        ] {
            assert_eq!(parse_micros(s), Err(e), "{s:?}");
        }
    }

    #[test]
    fn formats_minimally() {
        assert_eq!(format_micros(12_000_000), "12");
        assert_eq!(format_micros(12_500_000), "12.5");
        assert_eq!(format_micros(1), "0.000001");
        assert_eq!(format_micros(0), "0");
        assert_eq!(format_micros(-1_500_000), "-1.5");
        assert_eq!(format_micros(i64::MIN), "-9223372036854.775808");
    }

    proptest! {
        #[test]
        fn round_trip(v in 0i64..=999_999_999_999_999_999) {
            prop_assert_eq!(parse_micros(&format_micros(v)), Ok(v));
        }

        #[test]
        fn never_panics(s in ".{0,30}") {
            let _ = parse_micros(&s);
        }

        #[test]
        fn never_panics_digits(s in "[0-9.]{0,30}") {
            let _ = parse_micros(&s);
        }
    }
}
