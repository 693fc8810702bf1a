//! What the client engine tells its caller: events to show, and what the
//! caller made of them. Both the receiving loop and the device code produce
//! them; the CLI and the daemon show them.

use crate::client::model::HistoryEntry;
use crate::proto::envelope::ChainStatus;

/// Something the user should hear about.
#[derive(Debug, Clone)]
pub enum Event {
    Message {
        contact: String,
        entry: HistoryEntry,
        chain: ChainStatus,
        /// Its place in the inbox: once shown, it is forgotten there.
        delivery: Option<u64>,
    },
    Connected {
        contact: String,
    },
    /// A device of the contact confirmed storing a message we sent (a
    /// delivery receipt, PROTOCOL.md §7.6); recorded already.
    Delivered {
        contact: String,
        id: [u8; 16],
        /// The connection with that device ([`crate::client::model::Contact::device_label`]).
        device: String,
        at_ms: u64,
    },
    ProfileUpdated {
        contact: String,
    },
    Unsupported {
        contact: String,
        kind: u8,
    },
    Warning(String),
    /// The contact sent something authentic that breaks the protocol's
    /// rules (shown as a warning; unlike a relay's junk, it is no reason to
    /// stop reading the queue).
    Refused {
        contact: String,
        what: &'static str,
        reason: String,
    },
    /// Progress worth a line on stderr (a handshake step, say).
    Notice(String),
    /// Internal: this record has new work to upload (not shown).
    Pending(String),
}

/// What the caller made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Written out (for a message: it may leave the inbox).
    Yes,
    /// Not shown by this caller (it waits for something else): it stays in
    /// the inbox for the next run that shows messages.
    Later,
    /// Could not be written (a closed pipe, a full disk): stop receiving;
    /// what was not shown is shown next time.
    Failed,
}
