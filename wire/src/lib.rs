//! The tern relay wire protocol, version 2, without any I/O: relay
//! addresses, the session handshake and frames, commands and replies, and
//! delivery encryption. Used by the relay server and by the client alike;
//! bytes and state in, bytes and state out (PROTOCOL.md §3).
#![forbid(unsafe_code)]

pub mod address;
pub mod codec;
pub mod command;
pub mod delivery;
pub mod frame;
pub mod session;

pub use address::{RelayAddress, Transport};
pub use command::{
    Command, ErrorCode, Id, RelayInfo, Reply, Request, WireError, DELIVERED_LEN, ID_LEN,
    QUEUE_MSG_LEN,
};
pub use session::{ClientHandshake, ServerHandshake, Session, SessionError};
