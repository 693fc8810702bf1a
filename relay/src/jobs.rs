//! What the event loop, the workers and the store's notifications tell
//! each other: the one vocabulary both sides of the server share.

use mio::Token;

use crate::handler::SessionState;
use crate::limits::Origin;
use crate::store::QueueRef;

pub(crate) const LISTENER: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);

/// Work for the pool.
pub(crate) enum Job {
    /// A session's first message.
    Handshake {
        token: usize,
        serial: u32,
        origin: Origin,
        msg1: Vec<u8>,
    },
    /// Frames that arrived, and subscriptions to serve.
    Process {
        token: usize,
        serial: u32,
        state: Box<SessionState>,
        messages: Vec<Vec<u8>>,
        wakes: Vec<(QueueRef, bool)>,
    },
}

/// What the other threads tell the event loop.
pub(crate) enum LoopEvent {
    /// `None`: the handshake failed; the connection is closed.
    Handshaken {
        token: usize,
        serial: u32,
        result: Option<(Box<SessionState>, Vec<u8>)>,
    },
    Processed {
        token: usize,
        serial: u32,
        state: Box<SessionState>,
        messages: Vec<Vec<u8>>,
        close: bool,
    },
    /// A queue subscribed by session `ticket` got a message, or is `gone`.
    Wake {
        ticket: u64,
        queue: QueueRef,
        gone: bool,
    },
}

/// Identifies one connection to the subscription registry.
pub(crate) fn ticket(token: usize, serial: u32) -> u64 {
    ((token as u64) << 32) | u64::from(serial)
}

pub(crate) fn unticket(t: u64) -> (usize, u32) {
    ((t >> 32) as usize, t as u32)
}
