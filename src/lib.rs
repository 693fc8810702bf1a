//! tern: federated end-to-end encrypted chat with no identifiers.
//!
//! - [`proto`]: the sans-IO protocol core (invitations, handshake, double
//!   ratchet, envelopes, security codes). Bytes and state in, bytes and state out.
//! - [`store`]: the encrypted profile store.
//! - the relay and its wire protocol live in the `tern-relay` crate.
#![forbid(unsafe_code)]

pub mod proto;
pub mod store;

pub use tern_relay as relay;
pub mod cli;
pub mod client;
pub mod net;
pub mod time;
