//! The request handler: a sealed block in, a sealed block out (or "wait").
//!
//! No sockets here, and the clock is a parameter, so every rule (freshness,
//! TTL, quotas, long-poll deadlines) is testable without sleeping. The server
//! calls [`Handler::handle`] from worker threads; a FETCH that finds nothing
//! comes back as [`Outcome::Wait`], which the server parks until
//! [`Handler::resume`] is due: on a wake from a SEND, or at the deadline.

use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand_core::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::hooks::{
    DeliverAction, DeliverView, RelayHooks, RequestView, ResponseAction, ResponseView, SendAction,
    SendView, Upload,
};
use crate::log::error;
use crate::replay::ReplayCache;
use crate::seal::{self, RelayIdentity, ResponseKey};
use crate::store::{
    expired_upto, NewMessage, NewQueue, QueueRef, QueueRow, SecureOutcome, SendAuth, SendOutcome,
    Store, StoreError, StoredMessage,
};
use crate::waiters::{Waiters, WakeFn};
use crate::wire::{Command, ErrorCode, Id, RelayInfo, Reply, Request, Response, DELIVERED_LEN};

/// A request's time may differ from the relay's by at most this much.
pub const FRESHNESS_MS: u64 = 60_000;

/// The relay's policy as the handler applies it.
#[derive(Clone)]
pub struct Policy {
    pub access_key: Option<String>,
    pub ttl_secs: u32,
    pub max_pending: u32,
    pub max_wait_ms: u32,
}

/// What to do with a request.
pub enum Outcome {
    /// The block could not be opened: nothing can be sealed back, so the
    /// server answers with a bare HTTP 400.
    Reject,
    /// A sealed response block of `BLOCK_LEN` bytes.
    Reply(Vec<u8>),
    /// A FETCH found nothing: park it and call [`Handler::resume`] when woken
    /// or at the deadline.
    Wait(Wait),
}

/// A parked FETCH. Holds only what is needed to answer it later.
pub struct Wait {
    queue: QueueRef,
    key: ResponseKey,
    deadline_ms: u64,
    /// The queue's delivery secret, kept only when hooks are set (they may
    /// re-seal what is delivered).
    hook_secret: Option<Zeroizing<[u8; 32]>>,
}

impl Wait {
    /// When the wait ends, in milliseconds since the Unix epoch.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }
}

/// The step a command takes, before sealing.
enum Step {
    Reply(Reply),
    Wait {
        queue: QueueRef,
        deadline_ms: u64,
        hook_secret: Option<Zeroizing<[u8; 32]>>,
    },
}

type Result<T> = std::result::Result<T, ErrorCode>;

pub struct Handler {
    identity: RelayIdentity,
    store: Store,
    policy: Policy,
    start_ms: u64,
    replay: Mutex<ReplayCache>,
    waiters: Waiters,
    /// Verified against when a queue does not exist, so that an unknown queue
    /// costs the same as a wrong signature.
    dummy_key: [u8; 32],
    /// Adversarial test instrument; `None` outside tests (see [`crate::hooks`]).
    hooks: Option<Arc<dyn RelayHooks>>,
}

fn sha256(id: &Id) -> [u8; 32] {
    Sha256::digest(id).into()
}

fn random_id() -> Id {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    id
}

fn internal(e: StoreError) -> ErrorCode {
    error!("database operation failed: {e}");
    ErrorCode::Internal
}

impl Handler {
    /// `start_ms` is when the relay started: requests older than that are
    /// refused, since the replay cache does not survive a restart. `wake` is
    /// called with the ticket of a parked FETCH whose queue got a message.
    pub fn new(
        identity: RelayIdentity,
        store: Store,
        policy: Policy,
        start_ms: u64,
        wake: WakeFn,
    ) -> Self {
        let dummy_key = SigningKey::from_bytes(&[0x5a; 32])
            .verifying_key()
            .to_bytes();
        Self {
            identity,
            store,
            policy,
            start_ms,
            replay: Mutex::new(ReplayCache::new()),
            waiters: Waiters::new(wake),
            dummy_key,
            hooks: None,
        }
    }

    /// Installs adversarial test hooks (see [`crate::hooks`]); `None` keeps
    /// the relay honest.
    pub fn with_hooks(mut self, hooks: Option<Arc<dyn RelayHooks>>) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.identity.public()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Handles one request block received at `now_ms`. `ticket` identifies
    /// the request to [`WakeFn`] should it have to wait.
    pub fn handle(&self, block: &[u8], now_ms: u64, ticket: u64) -> Outcome {
        let opened = seal::open_request(&self.identity, block);
        let command = self.hooks.as_ref().and_then(|h| {
            let plaintext = opened.as_ref().ok().map(|o| &o.plaintext[..]);
            let command = plaintext
                .and_then(|p| Request::decode(p).ok())
                .map(|r| r.command.name());
            h.on_request(&RequestView {
                block,
                plaintext,
                command,
            });
            command
        });
        let Ok(opened) = opened else {
            return Outcome::Reject;
        };
        let step = match self.dispatch(&opened.plaintext, &opened.enc, now_ms, ticket) {
            Ok(s) => s,
            Err(code) => Step::Reply(Reply::Error(code)),
        };
        self.finish(step, opened.response_key, now_ms, command)
    }

    /// Looks again for a message for a parked FETCH. With `last` (deadline
    /// reached, or the relay shutting down) it answers whatever it finds.
    pub fn resume(&self, wait: Wait, now_ms: u64, ticket: u64, last: bool) -> Outcome {
        let secret = wait.hook_secret.as_deref();
        let step = match self.poll(wait.queue, secret, now_ms, ticket, wait.deadline_ms, last) {
            Ok(s) => s,
            Err(code) => Step::Reply(Reply::Error(code)),
        };
        self.finish(step, wait.key, now_ms, Some("FETCH"))
    }

    /// Forgets a parked FETCH whose connection went away.
    pub fn cancel(&self, wait: &Wait, ticket: u64) {
        self.waiters.cancel(wait.queue, ticket);
    }

    /// Deletes messages that have expired at `now_ms`; returns how many.
    pub fn purge(&self, now_ms: u64) -> std::result::Result<usize, StoreError> {
        self.store.purge_expired(self.expired_upto(now_ms))
    }

    /// Truncates the store's WAL (see [`Store::checkpoint`]).
    pub fn checkpoint(&self) -> std::result::Result<(), StoreError> {
        self.store.checkpoint()
    }

    /// Number of parked FETCH requests.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    fn finish(
        &self,
        step: Step,
        key: ResponseKey,
        now_ms: u64,
        command: Option<&'static str>,
    ) -> Outcome {
        match step {
            Step::Wait {
                queue,
                deadline_ms,
                hook_secret,
            } => Outcome::Wait(Wait {
                queue,
                key,
                deadline_ms,
                hook_secret,
            }),
            Step::Reply(reply) => {
                if let Some(h) = &self.hooks {
                    match h.on_response(&ResponseView {
                        command,
                        reply: &reply,
                    }) {
                        ResponseAction::Pass => {}
                        ResponseAction::Delay(d) => std::thread::sleep(d),
                        ResponseAction::Replace(body) => return Outcome::Reply(body),
                        ResponseAction::Reject => return Outcome::Reject,
                        ResponseAction::Plaintext(p) => {
                            return key
                                .seal_response(&p)
                                .map_or(Outcome::Reject, Outcome::Reply)
                        }
                    }
                }
                let plaintext = Response {
                    time_ms: now_ms,
                    reply,
                }
                .encode();
                match key.seal_response(&plaintext) {
                    Ok(block) => Outcome::Reply(block),
                    // Unreachable: encode always yields RESPONSE_LEN bytes.
                    Err(e) => {
                        error!("could not seal a response: {e}");
                        Outcome::Reject
                    }
                }
            }
        }
    }

    fn expired_upto(&self, now_ms: u64) -> i64 {
        expired_upto(now_ms / 1000, u64::from(self.policy.ttl_secs))
    }

    /// Valid iff within the freshness window, not before the relay started,
    /// and never seen before.
    fn fresh(&self, time_ms: u64, enc: &[u8; 32], now_ms: u64) -> bool {
        let lower = now_ms.saturating_sub(FRESHNESS_MS).max(self.start_ms);
        let upper = now_ms.saturating_add(FRESHNESS_MS);
        if time_ms < lower || time_ms > upper {
            return false;
        }
        // The block stays acceptable until now reaches time_ms + FRESHNESS_MS.
        let forget_at = time_ms.saturating_add(FRESHNESS_MS + 1);
        self.replay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*enc, forget_at, now_ms)
    }

    fn dispatch(&self, plaintext: &[u8], enc: &[u8; 32], now_ms: u64, ticket: u64) -> Result<Step> {
        let req = Request::decode(plaintext).map_err(|_| ErrorCode::BadRequest)?;
        if !self.fresh(req.time_ms, enc, now_ms) {
            return Err(ErrorCode::Stale);
        }
        let signed = Signed {
            req: &req,
            plaintext,
            enc,
        };
        let reply = match &req.command {
            Command::Info => Reply::Info(RelayInfo {
                min_version: 1,
                max_version: 1,
                open: self.policy.access_key.is_none(),
                max_pending: self.policy.max_pending,
                ttl_secs: self.policy.ttl_secs,
                max_wait_ms: self.policy.max_wait_ms,
            }),
            Command::Create {
                access_key,
                recipient_auth,
                recipient_dh,
            } => self.create(&signed, access_key.as_deref(), recipient_auth, recipient_dh)?,
            Command::Secure {
                recipient_id,
                sender_auth,
            } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                match self.store.secure(q.queue, *sender_auth).map_err(internal)? {
                    SecureOutcome::Secured => Reply::Ok,
                    SecureOutcome::Auth => return Err(ErrorCode::Auth),
                }
            }
            Command::Send { sender_id, message } => {
                self.send(&signed, sender_id, message, now_ms)?
            }
            Command::Fetch {
                recipient_id,
                wait_ms,
            } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                let wait = (*wait_ms).min(self.policy.max_wait_ms);
                let deadline_ms = now_ms.saturating_add(u64::from(wait));
                let secret = self.hooks.as_ref().map(|_| &*q.queue_secret);
                return self.poll(q.queue, secret, now_ms, ticket, deadline_ms, false);
            }
            Command::Ack {
                recipient_id,
                msg_id,
            } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                let outcome = self
                    .store
                    .ack(q.queue, *msg_id, self.expired_upto(now_ms))
                    .map_err(internal)?;
                self.next_message(&q, outcome.next(), "ACK")?
            }
            Command::Delete { recipient_id } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                self.store.delete_queue(q.queue).map_err(internal)?;
                Reply::Ok
            }
            Command::Peek {
                recipient_id,
                after,
            } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                let next = self
                    .store
                    .message_after(q.queue, *after, self.expired_upto(now_ms))
                    .map_err(internal)?;
                self.next_message(&q, next, "PEEK")?
            }
            Command::AckUpTo {
                recipient_id,
                msg_id,
            } => {
                let q = self.recipient_queue(&signed, recipient_id)?;
                let outcome = self
                    .store
                    .ack_up_to(q.queue, *msg_id, self.expired_upto(now_ms))
                    .map_err(internal)?;
                self.next_message(&q, outcome.next(), "ACK_UPTO")?
            }
        };
        Ok(Step::Reply(reply))
    }

    /// Verifies the signature against `key`, or against the dummy key when
    /// there is none, so both failures do the same work and give the same
    /// answer.
    fn authorise(
        &self,
        s: &Signed<'_>,
        row: Option<QueueRow>,
        key: impl Fn(&QueueRow) -> Option<[u8; 32]>,
    ) -> Result<QueueRow> {
        let k = row.as_ref().and_then(key);
        let valid = s
            .req
            .verify(s.plaintext, s.enc, k.as_ref().unwrap_or(&self.dummy_key));
        match row {
            Some(r) if valid && k.is_some() => Ok(r),
            _ => Err(ErrorCode::Auth),
        }
    }

    /// The queue named by `recipient_id`, if the request is signed by its
    /// recipient key.
    fn recipient_queue(&self, s: &Signed<'_>, recipient_id: &Id) -> Result<QueueRow> {
        let row = self
            .store
            .queue_by_recipient(&sha256(recipient_id))
            .map_err(internal)?;
        self.authorise(s, row, |q| Some(q.recipient_auth))
    }

    fn create(
        &self,
        s: &Signed<'_>,
        access_key: Option<&str>,
        recipient_auth: &[u8; 32],
        recipient_dh: &[u8; 32],
    ) -> Result<Reply> {
        if let Some(required) = &self.policy.access_key {
            let given = access_key.unwrap_or("");
            if !bool::from(required.as_bytes().ct_eq(given.as_bytes())) {
                return Err(ErrorCode::Access);
            }
        }
        if !s.req.verify(s.plaintext, s.enc, recipient_auth) {
            return Err(ErrorCode::Auth);
        }
        let relay_secret = StaticSecret::random_from_rng(OsRng);
        let relay_dh = PublicKey::from(&relay_secret).to_bytes();
        let queue_secret =
            seal::queue_secret(&relay_secret, recipient_dh).map_err(|_| ErrorCode::BadRequest)?;
        // Random 128-bit ids do not collide in practice; retrying covers the
        // impossible case instead of failing it.
        for _ in 0..3 {
            let recipient_id = random_id();
            let sender_id = random_id();
            let created = self
                .store
                .create_queue(NewQueue {
                    recipient_hash: sha256(&recipient_id),
                    sender_hash: sha256(&sender_id),
                    recipient_auth: *recipient_auth,
                    queue_secret: queue_secret.clone(),
                })
                .map_err(internal)?;
            if created.is_some() {
                return Ok(Reply::Queue {
                    recipient_id,
                    sender_id,
                    relay_dh,
                });
            }
        }
        Err(ErrorCode::Internal)
    }

    fn send(&self, s: &Signed<'_>, sender_id: &Id, message: &[u8], now_ms: u64) -> Result<Reply> {
        let row = self
            .store
            .queue_by_sender(&sha256(sender_id))
            .map_err(internal)?;
        let (row, auth) = if s.req.signature.is_some() {
            let row = self.authorise(s, row, |q| q.sender_auth)?;
            let key = row.sender_auth.ok_or(ErrorCode::Auth)?;
            (row, SendAuth::Signed(key))
        } else {
            // The one unsigned message (the connection request) is allowed
            // only before the queue is secured. Checked again on commit.
            match row {
                Some(r) if r.sender_auth.is_none() && !r.unsigned_used => (r, SendAuth::Unsigned),
                _ => return Err(ErrorCode::Auth),
            }
        };
        if let Some(h) = &self.hooks {
            let action = h.on_send(&SendView {
                queue: row.queue,
                sender_id,
                signed: s.req.signature.is_some(),
                message,
            });
            if let SendAction::Replace(uploads) = action {
                return self.hooked_store(&row, auth, uploads, now_ms);
            }
        }
        let msg_id = random_id();
        // Re-encrypted for the recipient before it touches the disk: what was
        // uploaded and what is stored or delivered share no bytes.
        let body = seal::delivery_seal(&row.queue_secret, &msg_id, message);
        let outcome = self
            .store
            .send(NewMessage {
                queue: row.queue,
                auth,
                msg_id,
                received_hour: i64::try_from(now_ms / 3_600_000).unwrap_or(i64::MAX),
                body,
                max_pending: self.policy.max_pending,
                expired_upto: self.expired_upto(now_ms),
            })
            .map_err(internal)?;
        match outcome {
            SendOutcome::Stored => {
                self.waiters.notify(row.queue);
                Ok(Reply::Ok)
            }
            SendOutcome::Auth => Err(ErrorCode::Auth),
            SendOutcome::QueueFull => Err(ErrorCode::QueueFull),
        }
    }

    /// The oldest message, or a wait until `deadline_ms`.
    fn poll(
        &self,
        queue: QueueRef,
        hook_secret: Option<&[u8; 32]>,
        now_ms: u64,
        ticket: u64,
        deadline_ms: u64,
        last: bool,
    ) -> Result<Step> {
        let may_wait = !last && deadline_ms > now_ms;
        // Register before looking (see the waiters module for why).
        if may_wait {
            self.waiters.register(queue, ticket);
        }
        let found = self.store.oldest_message(queue, self.expired_upto(now_ms));
        if !(may_wait && matches!(found, Ok(None))) {
            // Answering now: drop this ticket, including one left registered
            // by an earlier look of the same parked FETCH.
            self.waiters.cancel(queue, ticket);
        }
        match found.map_err(internal)? {
            Some(m) => match hook_secret {
                Some(secret) => Ok(Step::Reply(
                    self.hooked_delivery(queue, secret, m, "FETCH")?,
                )),
                None => Ok(Step::Reply(message_reply(m)?)),
            },
            None if may_wait => Ok(Step::Wait {
                queue,
                deadline_ms,
                hook_secret: hook_secret.map(|s| Zeroizing::new(*s)),
            }),
            None => Ok(Step::Reply(Reply::Empty)),
        }
    }

    /// A SEND as the hooks rewrote it: stores each upload like an honest
    /// SEND would (own message id, delivery encryption, authorisation and
    /// quota re-checked on commit) and answers OK whatever became of them.
    fn hooked_store(
        &self,
        row: &QueueRow,
        auth: SendAuth,
        uploads: Vec<Upload>,
        now_ms: u64,
    ) -> Result<Reply> {
        for u in uploads {
            let target = match u.to {
                None => None,
                Some(sid) => match self
                    .store
                    .queue_by_sender(&sha256(&sid))
                    .map_err(internal)?
                {
                    Some(r) => Some(r),
                    None => continue,
                },
            };
            let (queue, secret, auth) = match &target {
                None => (row.queue, &row.queue_secret, auth),
                Some(r) => (
                    r.queue,
                    &r.queue_secret,
                    r.sender_auth.map_or(SendAuth::Unsigned, SendAuth::Signed),
                ),
            };
            let msg_id = random_id();
            let outcome = self
                .store
                .send(NewMessage {
                    queue,
                    auth,
                    msg_id,
                    received_hour: i64::try_from(now_ms / 3_600_000).unwrap_or(i64::MAX),
                    body: seal::delivery_seal(secret, &msg_id, &u.message),
                    max_pending: self.policy.max_pending,
                    expired_upto: self.expired_upto(now_ms),
                })
                .map_err(internal)?;
            if outcome == SendOutcome::Stored {
                self.waiters.notify(queue);
            }
        }
        Ok(Reply::Ok)
    }

    /// The answer of a command that hands over the next message: `next` is
    /// `None` when the message named does not exist, `Some(None)` when the
    /// queue has nothing after it.
    fn next_message(
        &self,
        q: &QueueRow,
        next: Option<Option<StoredMessage>>,
        command: &'static str,
    ) -> Result<Reply> {
        match next {
            None => Err(ErrorCode::NoMessage),
            Some(Some(m)) => self.hooked_delivery(q.queue, &q.queue_secret, m, command),
            Some(None) => Ok(Reply::Empty),
        }
    }

    /// A delivery as the hooks rewrote it (as stored when there are none).
    fn hooked_delivery(
        &self,
        queue: QueueRef,
        secret: &[u8; 32],
        m: StoredMessage,
        command: &'static str,
    ) -> Result<Reply> {
        let Some(h) = &self.hooks else {
            return message_reply(m);
        };
        let received_at = u64::try_from(m.received_hour.saturating_mul(3600)).unwrap_or(0);
        let opened = seal::delivery_open(secret, &m.msg_id, &m.body).ok();
        let action = h.on_deliver(&DeliverView {
            queue,
            command,
            msg_id: &m.msg_id,
            received_at,
            delivered: &m.body,
            message: opened.as_deref(),
            queue_secret: secret,
        });
        let (msg_id, body) = match action {
            DeliverAction::Pass => return message_reply(m),
            DeliverAction::Hide => return Ok(Reply::Empty),
            DeliverAction::Replace { msg_id, message } => {
                (msg_id, seal::delivery_seal(secret, &msg_id, &message))
            }
            DeliverAction::Raw { msg_id, delivered } => (msg_id, delivered),
        };
        if body.len() != DELIVERED_LEN {
            error!("a hook delivered a message of the wrong length");
            return Err(ErrorCode::Internal);
        }
        Ok(Reply::Message {
            msg_id,
            received_at,
            body,
        })
    }
}

/// A decoded request with what its signature covers.
struct Signed<'a> {
    req: &'a Request,
    plaintext: &'a [u8],
    enc: &'a [u8; 32],
}

fn message_reply(m: StoredMessage) -> Result<Reply> {
    if m.body.len() != DELIVERED_LEN {
        error!("a stored message has the wrong length; the database may be damaged");
        return Err(ErrorCode::Internal);
    }
    Ok(Reply::Message {
        msg_id: m.msg_id,
        received_at: u64::try_from(m.received_hour.saturating_mul(3600)).unwrap_or(0),
        body: m.body,
    })
}
