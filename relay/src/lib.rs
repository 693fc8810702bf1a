//! The tern relay and the wire protocol it shares with clients.
//!
//! The sans-IO part ([`address`], [`codec`], [`seal`], [`wire`]) turns bytes into
//! bytes and is used by both sides; the server part holds queues durably and
//! answers HTTP.
#![forbid(unsafe_code)]

pub mod address;
pub mod codec;
pub mod seal;
pub mod wire;

pub use address::{RelayAddress, Transport};
