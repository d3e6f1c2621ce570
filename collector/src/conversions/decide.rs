//! What one postback does to its conversion: the first status of a new
//! conversion, and the transitions of an existing one. No I/O: the
//! PostgreSQL shell (`conversions::process`) loads the facts, asks here,
//! and writes the answer.
//!
//! ```text
//!             ┌──────────▶ approved ──────────▶ reversed
//!  pending ───┼──────────▶ rejected
//!             └──────────▶ reversed
//! ```
//!
//! A new conversion takes the postback's status unless its click was
//! quarantined, the postback came after the offer's attribution window, or
//! (for a pending or approved postback) the offer's daily cap is already
//! reached: then it is `quarantined`, `expired` or `capped`, in that order
//! of precedence, earns nothing, and no later postback changes it.
//! `rejected` and `reversed` are final too; a postback asking for anything
//! else is recorded as an event that was not applied.

use affgate_schema::Status;

/// A conversion's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvStatus {
    Pending,
    Approved,
    Rejected,
    Reversed,
    Quarantined,
    Capped,
    Expired,
}

impl ConvStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvStatus::Pending => "pending",
            ConvStatus::Approved => "approved",
            ConvStatus::Rejected => "rejected",
            ConvStatus::Reversed => "reversed",
            ConvStatus::Quarantined => "quarantined",
            ConvStatus::Capped => "capped",
            ConvStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<ConvStatus> {
        [
            ConvStatus::Pending,
            ConvStatus::Approved,
            ConvStatus::Rejected,
            ConvStatus::Reversed,
            ConvStatus::Quarantined,
            ConvStatus::Capped,
            ConvStatus::Expired,
        ]
        .into_iter()
        .find(|s2| s2.as_str() == s)
    }

    fn from_postback(s: Status) -> ConvStatus {
        match s {
            Status::Pending => ConvStatus::Pending,
            Status::Approved => ConvStatus::Approved,
            Status::Rejected => ConvStatus::Rejected,
            Status::Reversed => ConvStatus::Reversed,
        }
    }

    /// Whether commissions exist for a conversion in this status (their
    /// status follows it). Only `approved` ones are earned.
    pub fn has_commissions(self) -> bool {
        matches!(
            self,
            ConvStatus::Pending
                | ConvStatus::Approved
                | ConvStatus::Rejected
                | ConvStatus::Reversed
        )
    }
}

/// Does a postback with this status take a slot of the offer's daily cap
/// when it creates a conversion?
pub fn takes_cap_slot(s: Status) -> bool {
    matches!(s, Status::Pending | Status::Approved)
}

/// Facts about a new conversion's click and offer.
#[derive(Debug, Clone, Copy)]
pub struct NewConversion {
    pub status: Status,
    /// The click was marked quarantined, or its link is shadow-banned now.
    pub quarantined: bool,
    /// Postback time minus click time, milliseconds (negative when the
    /// clocks disagree; that is not expiry).
    pub age_ms: i64,
    pub window_days: i64,
    /// `Some(already)` when the offer has a cap and `already` slots of the
    /// postback's day are taken; `None` when uncapped.
    pub cap: Option<(i64, i64)>,
}

/// The first status of a new conversion.
pub fn first_status(n: &NewConversion) -> ConvStatus {
    if n.quarantined {
        return ConvStatus::Quarantined;
    }
    if n.age_ms > n.window_days.saturating_mul(86_400_000) {
        return ConvStatus::Expired;
    }
    if let Some((taken, cap)) = n.cap
        && takes_cap_slot(n.status)
        && taken >= cap
    {
        return ConvStatus::Capped;
    }
    ConvStatus::from_postback(n.status)
}

/// The status an existing conversion moves to on a postback, or `None`
/// when the transition is not allowed (the event is kept, not applied).
pub fn transition(current: ConvStatus, postback: Status) -> Option<ConvStatus> {
    use ConvStatus as C;
    let next = ConvStatus::from_postback(postback);
    match (current, next) {
        (C::Pending, C::Approved | C::Rejected | C::Reversed) => Some(next),
        (C::Approved, C::Reversed) => Some(next),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(status: Status) -> NewConversion {
        NewConversion {
            status,
            quarantined: false,
            age_ms: 1000,
            window_days: 30,
            cap: None,
        }
    }

    #[test]
    fn a_plain_conversion_takes_the_postbacks_status() {
        for s in [
            Status::Pending,
            Status::Approved,
            Status::Rejected,
            Status::Reversed,
        ] {
            assert_eq!(first_status(&new(s)).as_str(), s.as_str());
        }
    }

    #[test]
    fn quarantine_then_expiry_then_cap() {
        let mut n = new(Status::Approved);
        n.cap = Some((3, 3));
        assert_eq!(first_status(&n), ConvStatus::Capped);
        n.age_ms = 31 * 86_400_000;
        assert_eq!(first_status(&n), ConvStatus::Expired);
        n.quarantined = true;
        assert_eq!(first_status(&n), ConvStatus::Quarantined);
    }

    #[test]
    fn the_cap_counts_only_pending_and_approved() {
        let mut n = new(Status::Approved);
        n.cap = Some((2, 3));
        assert_eq!(first_status(&n), ConvStatus::Approved);
        n.cap = Some((3, 3));
        n.status = Status::Rejected;
        assert_eq!(first_status(&n), ConvStatus::Rejected);
        n.age_ms = -5_000; // clock skew is not expiry
        n.status = Status::Pending;
        n.cap = None;
        assert_eq!(first_status(&n), ConvStatus::Pending);
    }

    #[test]
    fn transitions() {
        use ConvStatus as C;
        assert_eq!(transition(C::Pending, Status::Approved), Some(C::Approved));
        assert_eq!(transition(C::Approved, Status::Reversed), Some(C::Reversed));
        assert_eq!(transition(C::Pending, Status::Rejected), Some(C::Rejected));
        assert_eq!(transition(C::Approved, Status::Pending), None);
        assert_eq!(transition(C::Approved, Status::Approved), None);
        assert_eq!(transition(C::Reversed, Status::Approved), None);
        assert_eq!(transition(C::Rejected, Status::Approved), None);
        for final_ in [C::Quarantined, C::Capped, C::Expired] {
            for s in [Status::Pending, Status::Approved, Status::Reversed] {
                assert_eq!(transition(final_, s), None, "{final_:?} is final");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in [
            "pending",
            "approved",
            "rejected",
            "reversed",
            "quarantined",
            "capped",
            "expired",
        ] {
            assert_eq!(ConvStatus::parse(s).map(ConvStatus::as_str), Some(s));
        }
        assert_eq!(ConvStatus::parse("nope"), None);
    }
}
