//! The protocol core: pure functions and state machines, no I/O.
//!
//! Randomness comes in as a `RngCore + CryptoRng` argument and time as a
//! number, so every function here is deterministic under test. See
//! PROTOCOL.md for the byte layouts; each module's docs name its section.

pub mod connection;
pub mod device;
pub mod envelope;
pub mod error;
pub mod file;
pub mod handshake;
pub mod hello;
pub mod invitation;
pub mod keys;
pub mod queue_msg;
pub mod ratchet;
pub mod receipt;
pub mod rekey;
pub mod resync;
pub mod rotation;
pub mod security_code;
pub mod text;

pub use error::ProtoError;

/// The protocol version this implementation speaks (PROTOCOL.md §Versioning).
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest version it still accepts.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
