//! Delivery from the ring to collectors (docs/delivery.md).
//!
//! - `outbox.rs`: the pure core: what to send, when to resend, where to,
//!   and what an ack frees. No sockets, no clock.

//! - `shell.rs`: the task that moves records from the ring into the Outbox
//!   and datagrams between the Outbox and a [`shell::Transport`].
//! - `udp.rs`: the UDP transport.
//! - `quic.rs`: the QUIC transport (datagrams, streams for oversize batches).

pub mod outbox;
pub mod quic;
pub mod shell;
pub mod udp;
