//! placeholder; see docs/delivery.md
