//! Delivery from the ring to collectors (docs/delivery.md).
//!
//! - `outbox.rs`: the pure core: what to send, when to resend, where to,
//!   and what an ack frees. No sockets, no clock.

pub mod outbox;
