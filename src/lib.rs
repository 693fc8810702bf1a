//! tern: federated end-to-end encrypted chat with no identifiers.
//!
//! - [`proto`]: the sans-IO protocol core (invitations, handshake, double
//!   ratchet, envelopes, security codes). Bytes and state in, bytes and state out.
//! - [`store`]: the encrypted profile store.
//! - [`net`]: relay sessions; the wire protocol itself is the `tern-wire`
//!   crate, and the relay server the `tern-relay` crate (linked only for
//!   `tern relay serve`, with the `relay-server` feature).
#![forbid(unsafe_code)]

pub mod proto;
pub mod store;

pub use tern_wire as wire;
pub mod cli;
pub mod client;
pub mod net;
pub mod time;
