//! Adversarial test instrument: hooks that let a test turn this relay into a
//! malicious one.
//!
//! **Not for production.** A relay started with [`ServeConfig::hooks`] set
//! behaves however the hooks say: it can record every request, drop, replace
//! or forge stored messages, deliver another queue's message or an old one,
//! and answer with garbage or not at all. tern's claim is that such a relay
//! can deny service but cannot read, forge or silently alter a conversation;
//! the adversarial tests (`tests/adversary_*.rs`) use these hooks to check it
//! against the real client.
//!
//! With `hooks` unset (the default, and the only thing `tern relay serve`
//! does) nothing here runs: the handler tests one `Option` per request and
//! behaves exactly as without this module.
//!
//! Hook points, in the order a request meets them:
//!
//! 1. [`RelayHooks::on_request`]: every WebSocket message of a session after
//!    its handshake (also those that do not open), with the frame plaintext
//!    when it opens. See only.
//! 2. [`RelayHooks::on_send`]: a SEND the relay has authorised and is about
//!    to store. Store it, drop it silently, replace it, or store other
//!    messages too (in the same queue or in any queue named by sender id).
//! 3. [`RelayHooks::on_deliver`]: a message about to be pushed to a
//!    subscription. Pass it, replace the queue message (the relay re-seals it
//!    for the recipient under a message id of the hook's choice), replace the
//!    delivered ciphertext itself, or hide it (push nothing).
//! 4. [`RelayHooks::on_response`]: a reply record about to be sealed into a
//!    frame. Pass it, delay it, send arbitrary bytes as a WebSocket message
//!    instead, seal a record of the hook's choice instead (authentic but
//!    arbitrary), or close the session.
//!
//! Hooks run on the relay's worker threads, so they must be `Send + Sync`;
//! a hook that sleeps holds a worker (there are [`ServeConfig::workers`]).
//!
//! [`ServeConfig::hooks`]: crate::config::ServeConfig::hooks
//! [`ServeConfig::workers`]: crate::config::ServeConfig::workers

use std::time::Duration;

use tern_wire::{Id, Reply};

use crate::store::QueueRef;

/// A WebSocket message of a session, as the relay sees it.
pub struct RequestView<'a> {
    /// The message as received (normally one encrypted frame).
    pub message: &'a [u8],
    /// The frame plaintext, if the message opened.
    pub frame: Option<&'a [u8]>,
    /// The names of its commands (`"SEND"`, `"SUB"`, …) if the frame parses.
    pub commands: Vec<&'static str>,
}

/// A SEND the relay has authorised and is about to store.
pub struct SendView<'a> {
    /// The target queue's (random, relay-internal) row id.
    pub queue: QueueRef,
    /// The sender id the request named.
    pub sender_id: &'a Id,
    /// Whether the SEND was signed (false: the one unsigned message).
    pub signed: bool,
    /// The uploaded queue message (16,000 bytes), before re-encryption.
    pub message: &'a [u8],
}

/// One message the relay stores in place of (or next to) an upload.
#[derive(Clone, Debug)]
pub struct Upload {
    /// `None`: the queue of the SEND being handled. `Some(sender id)`: the
    /// queue with that sender id (the hook learns sender ids from SENDs).
    pub to: Option<Id>,
    /// A queue message; it should be 16,000 bytes (`QUEUE_MSG_LEN`), or the
    /// relay will refuse to deliver it.
    pub message: Vec<u8>,
}

impl Upload {
    /// A message for the queue of the SEND being handled.
    pub fn here(message: Vec<u8>) -> Self {
        Self { to: None, message }
    }

    /// A message for the queue whose sender id is `sender_id`.
    pub fn to(sender_id: Id, message: Vec<u8>) -> Self {
        Self {
            to: Some(sender_id),
            message,
        }
    }
}

/// What to do with a SEND.
pub enum SendAction {
    /// Store the upload as an honest relay would.
    Store,
    /// Store these instead, in this order, and answer OK whatever happens
    /// to them (an empty list drops the upload silently). Each gets its own
    /// fresh message id and delivery encryption. A target queue that is not
    /// secured accepts at most its one unsigned message, as usual; the
    /// quota applies.
    Replace(Vec<Upload>),
}

/// A message about to be pushed to a subscription.
pub struct DeliverView<'a> {
    pub queue: QueueRef,
    pub msg_id: &'a Id,
    /// Seconds since the Unix epoch, rounded down to the hour.
    pub received_at: u64,
    /// The stored, delivery-encrypted message (16,016 bytes).
    pub delivered: &'a [u8],
    /// The queue message inside `delivered` (the relay holds the key).
    pub message: Option<&'a [u8]>,
    /// The queue's delivery secret, for a hook that wants to seal by itself.
    pub queue_secret: &'a [u8; 32],
}

/// What to deliver.
pub enum DeliverAction {
    /// The stored message, unchanged.
    Pass,
    /// Deliver `message` (a 16,000-byte queue message) instead, sealed for
    /// this queue's recipient under `msg_id`. The stored message is not
    /// touched: with a fresh `msg_id` the recipient's ACK names a message
    /// that does not exist; with the stored one its ACK deletes it.
    Replace { msg_id: Id, message: Vec<u8> },
    /// Deliver these exact delivered-ciphertext bytes (normally 16,016)
    /// under `msg_id`, with no re-sealing: e.g. a flipped byte.
    Raw { msg_id: Id, delivered: Vec<u8> },
    /// Push nothing (as if the queue held no more).
    Hide,
}

/// A reply record about to be sealed into a frame and sent.
pub struct ResponseView<'a> {
    /// The command being answered (`"SUB"` for pushes), when known.
    pub command: Option<&'static str>,
    /// The tag the reply carries.
    pub tag: u32,
    pub reply: &'a Reply,
}

/// What to answer.
pub enum ResponseAction {
    /// Seal and send the reply.
    Pass,
    /// Seal and send it after this long (the worker thread sleeps).
    Delay(Duration),
    /// Send these bytes as a WebSocket message instead of the frame that
    /// would carry the reply (the client cannot open them).
    Replace(Vec<u8>),
    /// Seal this reply record instead: an authentic answer with any content
    /// the relay likes (a malformed record makes a malformed frame).
    Plaintext(Vec<u8>),
    /// Close the session instead of answering.
    Reject,
}

/// A malicious relay's behaviour. Every method has an honest default.
pub trait RelayHooks: Send + Sync + 'static {
    /// Sees every session message.
    fn on_request(&self, _request: &RequestView<'_>) {}

    /// Decides what an authorised SEND stores.
    fn on_send(&self, _send: &SendView<'_>) -> SendAction {
        SendAction::Store
    }

    /// Decides what a subscription pushes.
    fn on_deliver(&self, _delivery: &DeliverView<'_>) -> DeliverAction {
        DeliverAction::Pass
    }

    /// Decides how (and whether) a reply goes out.
    fn on_response(&self, _response: &ResponseView<'_>) -> ResponseAction {
        ResponseAction::Pass
    }
}
