//! What a relay session does: the handshake, then frames of commands in and
//! frames of replies and pushed messages out.
//!
//! No sockets here, and the clock is a parameter, so every rule (TTL,
//! quotas, windows, limits) is testable without a network. The server runs
//! [`Handler::process`] on worker threads, one job per session at a time, with
//! the session's state moved into the job: the frames that arrived since the
//! last job, and the queues that got messages (or went away) meanwhile.
//!
//! Commands of one job run as two steps: every command is checked and its
//! write submitted to the store, then every write is waited for; so a frame
//! of many SENDs costs one commit, not one each.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand_core::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tern_wire::command::SESSION_HASH_LEN;
use tern_wire::delivery::{delivery_open, delivery_seal, queue_secret};
use tern_wire::frame::{parse_commands, FrameBuilder};
use tern_wire::session::ServerHandshake;
use tern_wire::{
    Command, ErrorCode, Id, RelayInfo, Reply, Request, Session, SessionError, DELIVERED_LEN,
};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::config::AccessKey;
use crate::hooks::{
    DeliverAction, DeliverView, RelayHooks, RequestView, ResponseAction, ResponseView, SendAction,
    SendView, Upload,
};
use crate::limits::{Bucket, CreateLimits, Origin, Rate};
use crate::log::error;
use crate::store::{
    day_of, expired_upto, AckOutcome, CreateOutcome, DeleteOutcome, NewMessage, NewQueue, Pending,
    QueueRef, QueueRow, SecureOutcome, SendAuth, SendOutcome, Store, StoreError,
};
use crate::waiters::{Waiters, WakeFn};

/// The session version this relay speaks.
pub const VERSION: u8 = tern_wire::session::SESSION_VERSION;

/// The relay's policy as the handler applies it.
#[derive(Clone)]
pub struct Policy {
    pub access_keys: Vec<AccessKey>,
    pub ttl_secs: u32,
    pub max_pending: u32,
    pub max_data_bytes: u64,
    pub max_open_queues: u64,
    pub unsecured_days: u32,
    pub create_rate_connection: Rate,
    pub create_rate_address: Rate,
    pub max_subscriptions: u16,
    pub max_window: u16,
    pub session_push_budget: usize,
}

/// One subscription of a session.
struct Sub {
    queue: QueueRef,
    /// Kept only when hooks are set (they may re-seal what is pushed).
    hook_secret: Option<Zeroizing<[u8; 32]>>,
    /// FIFO position of the last message pushed.
    cursor: i64,
    /// Pushed and not yet acknowledged on this session: (position, id).
    pushed: VecDeque<(i64, Id)>,
    window: usize,
    /// IDLE was sent and nothing was pushed since.
    idle_sent: bool,
    /// Worth a look for messages to push.
    dirty: bool,
}

/// Everything a session holds between jobs.
pub struct SessionState {
    session: Session,
    ticket: u64,
    origin: Origin,
    creates: Bucket,
    subs: HashMap<u32, Sub>,
    by_queue: HashMap<QueueRef, u32>,
    /// Messages pushed and not yet acknowledged, all subscriptions together.
    in_flight: usize,
}

impl SessionState {
    pub fn has_subscriptions(&self) -> bool {
        !self.subs.is_empty()
    }

    /// The session's handshake hash.
    pub fn hash(&self) -> &[u8; SESSION_HASH_LEN] {
        self.session.hash()
    }
}

/// What one job produced.
pub struct Processed {
    /// WebSocket messages to send, in order.
    pub messages: Vec<Vec<u8>>,
    /// The session must end (after `messages` are sent).
    pub close: bool,
}

pub struct Handler {
    identity_secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    store: Store,
    policy: Policy,
    waiters: Arc<Waiters>,
    creates: CreateLimits,
    /// The database size last measured plus what was stored since.
    data_bytes: AtomicU64,
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

/// The answer to a failed store operation: "temporarily unavailable" while
/// the database is unreachable or asked for a retry (the store logs that
/// once, not per request), an internal error otherwise.
fn internal(e: StoreError) -> ErrorCode {
    if e.is_unavailable() {
        return ErrorCode::Unavailable;
    }
    error!("database operation failed: {e}");
    ErrorCode::Internal
}

/// A key's id in the store: a hash, so the database never holds the key.
fn key_id(key: &str) -> i64 {
    let d = Sha256::digest(key.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes")) >> 1
}

/// A command whose write was submitted and not yet waited for.
enum Later {
    Ready(Reply),
    Create(Pending<CreateOutcome>, Reply),
    Secure(Pending<SecureOutcome>),
    Send(Pending<SendOutcome>, QueueRef),
    Ack {
        pending: Pending<AckOutcome>,
        queue: QueueRef,
        msg_id: Id,
        upto: bool,
    },
    Delete(Pending<DeleteOutcome>, QueueRef),
}

type Result<T> = std::result::Result<T, ErrorCode>;

impl Handler {
    /// `wake` is called with a session's ticket when a queue it subscribes
    /// to got a message or went away.
    pub fn new(
        identity_secret: Zeroizing<[u8; 32]>,
        store: Store,
        policy: Policy,
        wake: WakeFn,
    ) -> Self {
        let public = PublicKey::from(&StaticSecret::from(*identity_secret)).to_bytes();
        let dummy_key = SigningKey::from_bytes(&[0x5a; 32])
            .verifying_key()
            .to_bytes();
        let creates = CreateLimits::new(policy.create_rate_address);
        let waiters = Arc::new(Waiters::new(wake));
        // Other relay nodes on the same database wake our subscriptions too.
        store.listen(Arc::clone(&waiters));
        Self {
            identity_secret,
            public,
            store,
            policy,
            waiters,
            creates,
            data_bytes: AtomicU64::new(0),
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
        self.public
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn info(&self) -> RelayInfo {
        RelayInfo {
            min_version: VERSION,
            max_version: VERSION,
            open: self.policy.access_keys.is_empty(),
            max_pending: self.policy.max_pending,
            ttl_secs: self.policy.ttl_secs,
            max_window: self.policy.max_window,
            max_subscriptions: self.policy.max_subscriptions,
            unsecured_ttl_secs: self.policy.unsecured_days.saturating_mul(86_400),
        }
    }

    /// Answers a session's first message: the session state and message 2.
    pub fn handshake(
        &self,
        msg1: &[u8],
        ticket: u64,
        origin: Origin,
    ) -> std::result::Result<(Box<SessionState>, Vec<u8>), SessionError> {
        let (session, msg2, _hello) =
            ServerHandshake::respond(&self.identity_secret, msg1, &self.info(), &mut OsRng)?;
        let state = SessionState {
            session,
            ticket,
            origin,
            creates: Bucket::full(self.policy.create_rate_connection),
            subs: HashMap::new(),
            by_queue: HashMap::new(),
            in_flight: 0,
        };
        Ok((Box::new(state), msg2))
    }

    /// Forgets a session's subscriptions (it ended).
    pub fn end_session(&self, st: &SessionState) {
        for q in st.by_queue.keys() {
            self.waiters.cancel(*q, st.ticket);
        }
    }

    /// Number of registered subscriptions, all sessions together.
    pub fn subscriptions(&self) -> usize {
        self.waiters.len()
    }

    /// Runs one job of a session: the WebSocket `messages` that arrived, and
    /// `wakes` (queue, gone) for its subscriptions.
    pub fn process(
        &self,
        st: &mut SessionState,
        messages: &[Vec<u8>],
        wakes: &[(QueueRef, bool)],
        now_ms: u64,
    ) -> Processed {
        let mut replies: Vec<(u32, Reply, &'static str)> = Vec::new();
        let mut requests = Vec::new();
        let mut close = false;
        for m in messages {
            let frame = st.session.open(m).ok();
            let parsed = frame.as_deref().map(parse_commands);
            if let Some(h) = &self.hooks {
                let commands = match &parsed {
                    Some(Ok(reqs)) => reqs.iter().map(|r| r.command.name()).collect(),
                    _ => Vec::new(),
                };
                h.on_request(&RequestView {
                    message: m,
                    frame: frame.as_deref(),
                    commands,
                });
            }
            match parsed {
                Some(Ok(reqs)) => requests.extend(reqs),
                // A frame that does not open or parse ends the session: the
                // counter nonces mean nothing after it can be trusted.
                _ => {
                    close = true;
                    break;
                }
            }
        }
        for &(queue, gone) in wakes {
            let Some(&tag) = st.by_queue.get(&queue) else {
                continue;
            };
            if gone {
                self.drop_sub(st, tag);
                replies.push((tag, Reply::Ended, "SUB"));
            } else if let Some(sub) = st.subs.get_mut(&tag) {
                sub.dirty = true;
            }
        }
        self.execute(st, requests, now_ms, &mut replies);
        self.push(st, now_ms, &mut replies);
        let (messages, rejected) = self.seal(st, replies);
        Processed {
            messages,
            close: close || rejected,
        }
    }

    fn expired_upto(&self, now_ms: u64) -> i64 {
        expired_upto(now_ms / 1000, u64::from(self.policy.ttl_secs))
    }

    fn drop_sub(&self, st: &mut SessionState, tag: u32) {
        if let Some(sub) = st.subs.remove(&tag) {
            st.by_queue.remove(&sub.queue);
            st.in_flight -= sub.pushed.len();
            self.waiters.cancel(sub.queue, st.ticket);
        }
    }

    fn execute(
        &self,
        st: &mut SessionState,
        requests: Vec<Request>,
        now_ms: u64,
        replies: &mut Vec<(u32, Reply, &'static str)>,
    ) {
        let hash = *st.session.hash();
        let mut later = Vec::with_capacity(requests.len());
        for req in requests {
            let name = req.command.name();
            let step = self
                .prepare(st, &req, &hash, now_ms)
                .unwrap_or_else(|code| Later::Ready(Reply::Error(code)));
            later.push((req.tag, name, step));
        }
        let mut freed = false;
        for (tag, name, step) in later {
            let reply = match step {
                Later::Ready(r) => r,
                Later::Create(p, queue_reply) => match p.wait() {
                    Ok(CreateOutcome::Created(_)) => queue_reply,
                    Ok(CreateOutcome::Quota) => Reply::Error(ErrorCode::Quota),
                    // Two random 128-bit ids colliding: not in this universe.
                    Ok(CreateOutcome::Collision) => Reply::Error(ErrorCode::Internal),
                    Err(e) => Reply::Error(internal(e)),
                },
                Later::Secure(p) => match p.wait() {
                    Ok(SecureOutcome::Secured) => Reply::Ok,
                    Ok(SecureOutcome::Auth) => Reply::Error(ErrorCode::Auth),
                    Err(e) => Reply::Error(internal(e)),
                },
                Later::Send(p, queue) => match p.wait() {
                    Ok(SendOutcome::Stored) => {
                        self.data_bytes
                            .fetch_add(DELIVERED_LEN as u64 + 64, Ordering::Relaxed);
                        self.waiters.notify(queue);
                        Reply::Ok
                    }
                    Ok(SendOutcome::Auth) => Reply::Error(ErrorCode::Auth),
                    Ok(SendOutcome::QueueFull) => Reply::Error(ErrorCode::QueueFull),
                    Err(e) => Reply::Error(internal(e)),
                },
                Later::Ack {
                    pending,
                    queue,
                    msg_id,
                    upto,
                } => {
                    let outcome = pending.wait();
                    // Acknowledged (or already gone): it no longer counts
                    // against this session's windows either way.
                    if let Some(&sub_tag) = st.by_queue.get(&queue) {
                        let full = st.in_flight >= self.policy.session_push_budget;
                        if let Some(sub) = st.subs.get_mut(&sub_tag) {
                            let before = sub.pushed.len();
                            if let Some(i) = sub.pushed.iter().position(|(_, id)| *id == msg_id) {
                                if upto {
                                    sub.pushed.drain(..=i);
                                } else {
                                    sub.pushed.remove(i);
                                }
                            }
                            st.in_flight -= before - sub.pushed.len();
                            sub.dirty = true;
                        }
                        freed |= full;
                    }
                    match outcome {
                        Ok(AckOutcome::Deleted) => Reply::Ok,
                        Ok(AckOutcome::NoMessage) => Reply::Error(ErrorCode::NoMessage),
                        Err(e) => Reply::Error(internal(e)),
                    }
                }
                Later::Delete(p, queue) => match p.wait() {
                    Ok(DeleteOutcome::Deleted) => {
                        if let Some(&sub_tag) = st.by_queue.get(&queue) {
                            self.drop_sub(st, sub_tag);
                            replies.push((sub_tag, Reply::Ended, "SUB"));
                        }
                        self.waiters.notify_gone(queue);
                        Reply::Ok
                    }
                    Ok(DeleteOutcome::NotEmpty) => Reply::Error(ErrorCode::NotEmpty),
                    Err(e) => Reply::Error(internal(e)),
                },
            };
            replies.push((tag, reply, name));
        }
        if freed {
            // The session's push budget had run out: every subscription may
            // have something to push now.
            for sub in st.subs.values_mut() {
                sub.dirty = true;
            }
        }
    }

    /// Checks a command and submits its write; errors are answered at once.
    fn prepare(
        &self,
        st: &mut SessionState,
        req: &Request,
        hash: &[u8; SESSION_HASH_LEN],
        now_ms: u64,
    ) -> Result<Later> {
        let today = day_of(now_ms / 1000);
        Ok(match &req.command {
            Command::Info => Later::Ready(Reply::Info(self.info())),
            Command::Create {
                access_key,
                recipient_auth,
                recipient_dh,
            } => self.create(
                st,
                req,
                hash,
                access_key.as_deref(),
                recipient_auth,
                recipient_dh,
                today,
            )?,
            Command::Secure {
                recipient_id,
                sender_auth,
            } => {
                let q = self.recipient_queue(req, hash, recipient_id)?;
                Later::Secure(self.store.secure(q.queue, *sender_auth, today))
            }
            Command::Send { sender_id, message } => {
                self.send(req, hash, sender_id, message, now_ms)?
            }
            Command::Subscribe {
                recipient_id,
                window,
            } => {
                let q = self.recipient_queue(req, hash, recipient_id)?;
                if let Some(&old) = st.by_queue.get(&q.queue) {
                    // A second SUB for the same queue replaces the first.
                    self.drop_sub(st, old);
                } else if st.subs.len() >= usize::from(self.policy.max_subscriptions) {
                    return Err(ErrorCode::Limit);
                }
                if st.subs.contains_key(&req.tag) {
                    return Err(ErrorCode::BadRequest);
                }
                // Registered before the first look: see the waiters module.
                self.waiters.register(q.queue, st.ticket);
                if q.day < today {
                    // Not waited for: losing it to a crash only makes the
                    // queue look a day older.
                    drop(self.store.touch(q.queue, today));
                }
                st.by_queue.insert(q.queue, req.tag);
                st.subs.insert(
                    req.tag,
                    Sub {
                        queue: q.queue,
                        hook_secret: self.hooks.as_ref().map(|_| q.queue_secret.clone()),
                        cursor: 0,
                        pushed: VecDeque::new(),
                        window: usize::from((*window).clamp(1, self.policy.max_window)),
                        idle_sent: false,
                        dirty: true,
                    },
                );
                Later::Ready(Reply::Ok)
            }
            Command::Unsubscribe { sub_tag } => {
                self.drop_sub(st, *sub_tag);
                Later::Ready(Reply::Ok)
            }
            Command::Ack {
                recipient_id,
                msg_id,
            }
            | Command::AckUpTo {
                recipient_id,
                msg_id,
            } => {
                let q = self.recipient_queue(req, hash, recipient_id)?;
                let upto = matches!(req.command, Command::AckUpTo { .. });
                let pending = if upto {
                    self.store.ack_up_to(q.queue, *msg_id)
                } else {
                    self.store.ack(q.queue, *msg_id)
                };
                Later::Ack {
                    pending,
                    queue: q.queue,
                    msg_id: *msg_id,
                    upto,
                }
            }
            Command::Delete {
                recipient_id,
                if_empty,
            } => {
                let q = self.recipient_queue(req, hash, recipient_id)?;
                Later::Delete(
                    self.store
                        .delete_queue(q.queue, *if_empty, self.expired_upto(now_ms)),
                    q.queue,
                )
            }
            Command::Check { recipient_id } => {
                let q = self
                    .store
                    .queue_by_recipient(&sha256(recipient_id))
                    .map_err(internal)?
                    .ok_or(ErrorCode::Auth)?;
                let n = self
                    .store
                    .count_live(q.queue, self.expired_upto(now_ms))
                    .map_err(internal)?;
                Later::Ready(Reply::Count(n))
            }
        })
    }

    /// Verifies the signature against `key`, or against the dummy key when
    /// there is none, so both failures do the same work and give the same
    /// answer.
    fn authorise(
        &self,
        req: &Request,
        hash: &[u8; SESSION_HASH_LEN],
        row: Option<QueueRow>,
        key: impl Fn(&QueueRow) -> Option<[u8; 32]>,
    ) -> Result<QueueRow> {
        let k = row.as_ref().and_then(key);
        let valid = req.verify(hash, k.as_ref().unwrap_or(&self.dummy_key));
        match row {
            Some(r) if valid && k.is_some() => Ok(r),
            _ => Err(ErrorCode::Auth),
        }
    }

    /// The queue named by `recipient_id`, if the command is signed by its
    /// recipient key.
    fn recipient_queue(
        &self,
        req: &Request,
        hash: &[u8; SESSION_HASH_LEN],
        recipient_id: &Id,
    ) -> Result<QueueRow> {
        let row = self
            .store
            .queue_by_recipient(&sha256(recipient_id))
            .map_err(internal)?;
        self.authorise(req, hash, row, |q| Some(q.recipient_auth))
    }

    fn over_high_water(&self) -> bool {
        self.data_bytes.load(Ordering::Relaxed) > self.policy.max_data_bytes
    }

    /// The database size measured now (the maintenance thread's job).
    pub fn measure(&self) -> std::result::Result<u64, StoreError> {
        let n = self.store.size_bytes()?;
        self.data_bytes.store(n, Ordering::Relaxed);
        Ok(n)
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        st: &mut SessionState,
        req: &Request,
        hash: &[u8; SESSION_HASH_LEN],
        access_key: Option<&str>,
        recipient_auth: &[u8; 32],
        recipient_dh: &[u8; 32],
        today: i64,
    ) -> Result<Later> {
        let (key_id, max_queues) = if self.policy.access_keys.is_empty() {
            (None, self.policy.max_open_queues)
        } else {
            let given = access_key.unwrap_or("").as_bytes();
            // Every key is compared, in constant time, whichever matches.
            let mut found = None;
            for k in &self.policy.access_keys {
                if bool::from(k.key.as_bytes().ct_eq(given)) {
                    found = Some(k);
                }
            }
            let k = found.ok_or(ErrorCode::Access)?;
            (Some(key_id(&k.key)), k.max_queues)
        };
        let now = Instant::now();
        if !st.creates.take(self.policy.create_rate_connection, now)
            || !self.creates.allow(st.origin)
        {
            return Err(ErrorCode::RateLimited);
        }
        if !req.verify(hash, recipient_auth) {
            return Err(ErrorCode::Auth);
        }
        if self.over_high_water() {
            return Err(ErrorCode::Unavailable);
        }
        let relay_secret = StaticSecret::random_from_rng(OsRng);
        let relay_dh = PublicKey::from(&relay_secret).to_bytes();
        let secret =
            queue_secret(&relay_secret, recipient_dh).map_err(|_| ErrorCode::BadRequest)?;
        let recipient_id = random_id();
        let sender_id = random_id();
        let pending = self.store.create_queue(NewQueue {
            recipient_hash: sha256(&recipient_id),
            sender_hash: sha256(&sender_id),
            recipient_auth: *recipient_auth,
            queue_secret: secret,
            key_id,
            max_queues,
            day: today,
        });
        Ok(Later::Create(
            pending,
            Reply::Queue {
                recipient_id,
                sender_id,
                relay_dh,
            },
        ))
    }

    fn send(
        &self,
        req: &Request,
        hash: &[u8; SESSION_HASH_LEN],
        sender_id: &Id,
        message: &[u8],
        now_ms: u64,
    ) -> Result<Later> {
        let row = self
            .store
            .queue_by_sender(&sha256(sender_id))
            .map_err(internal)?;
        let (row, auth) = if req.signature.is_some() {
            // Not secured yet is said as such, so that a sender tells "wait"
            // from "gone" (Auth): only holders of the sender id can ask, and
            // an unsecured queue's existence is no secret to them.
            if row.as_ref().is_some_and(|r| r.sender_auth.is_none()) {
                return Err(ErrorCode::NotSecured);
            }
            let row = self.authorise(req, hash, row, |q| q.sender_auth)?;
            let key = row.sender_auth.ok_or(ErrorCode::Auth)?;
            (row, SendAuth::Signed(key))
        } else {
            // The one unsigned message (the first handshake message) is
            // allowed only before the queue is secured. Checked again on commit.
            match row {
                Some(r) if r.sender_auth.is_none() && !r.unsigned_used => (r, SendAuth::Unsigned),
                _ => return Err(ErrorCode::Auth),
            }
        };
        if self.over_high_water() {
            return Err(ErrorCode::Unavailable);
        }
        if let Some(h) = &self.hooks {
            let action = h.on_send(&SendView {
                queue: row.queue,
                sender_id,
                signed: req.signature.is_some(),
                message,
            });
            if let SendAction::Replace(uploads) = action {
                self.hooked_store(&row, auth, uploads, now_ms)?;
                return Ok(Later::Ready(Reply::Ok));
            }
        }
        let msg_id = random_id();
        // Re-encrypted for the recipient before it touches the disk: what was
        // uploaded and what is stored or pushed share no bytes.
        let body = delivery_seal(&row.queue_secret, &msg_id, message);
        let pending = self
            .store
            .send(self.new_message(row.queue, auth, msg_id, body, now_ms));
        Ok(Later::Send(pending, row.queue))
    }

    fn new_message(
        &self,
        queue: QueueRef,
        auth: SendAuth,
        msg_id: Id,
        body: Vec<u8>,
        now_ms: u64,
    ) -> NewMessage {
        NewMessage {
            queue,
            auth,
            msg_id,
            received_hour: i64::try_from(now_ms / 3_600_000).unwrap_or(i64::MAX),
            body,
            max_pending: self.policy.max_pending,
            expired_upto: self.expired_upto(now_ms),
            day: day_of(now_ms / 1000),
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
    ) -> Result<()> {
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
            let body = delivery_seal(secret, &msg_id, &u.message);
            let outcome = self
                .store
                .send(self.new_message(queue, auth, msg_id, body, now_ms))
                .wait()
                .map_err(internal)?;
            if outcome == SendOutcome::Stored {
                self.waiters.notify(queue);
            }
        }
        Ok(())
    }

    /// Pushes what the dirty subscriptions have room for, and IDLE where a
    /// queue has nothing more for now.
    fn push(
        &self,
        st: &mut SessionState,
        now_ms: u64,
        replies: &mut Vec<(u32, Reply, &'static str)>,
    ) {
        let expired = self.expired_upto(now_ms);
        let budget = self.policy.session_push_budget;
        let mut tags: Vec<u32> = st
            .subs
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(t, _)| *t)
            .collect();
        tags.sort_unstable();
        for tag in tags {
            let in_flight = st.in_flight;
            let Some(sub) = st.subs.get_mut(&tag) else {
                continue;
            };
            sub.dirty = false;
            let room = sub
                .window
                .saturating_sub(sub.pushed.len())
                .min(budget.saturating_sub(in_flight));
            if room == 0 {
                // Window or budget full: an acknowledgement looks again.
                continue;
            }
            // FIFO positions restart when a queue empties, so the cursor only
            // means something while a pushed message is still there: with
            // nothing outstanding, every live message is one not pushed yet.
            if sub.pushed.is_empty() {
                sub.cursor = 0;
            }
            let look = |cursor| self.store.messages_after(sub.queue, cursor, expired, room);
            let mut found = look(sub.cursor);
            let outstanding_gone = |sub: &Sub| {
                sub.pushed.back().is_some_and(|(_, id)| {
                    matches!(self.store.has_message(sub.queue, id), Ok(false))
                })
            };
            if matches!(&found, Ok(f) if f.len() < room) && outstanding_gone(sub) {
                // Everything pushed was acknowledged elsewhere (another
                // session of the recipient) or expired, and the queue may
                // have been renumbered since: start over from its head.
                st.in_flight -= sub.pushed.len();
                sub.pushed.clear();
                sub.cursor = 0;
                found = look(0);
            }
            let found = match found {
                Ok(m) => m,
                Err(e) => {
                    // While the database is away the store has said so once;
                    // the subscription looks again when it is back.
                    if !e.is_unavailable() {
                        error!("reading a queue failed: {e}");
                    }
                    sub.dirty = true;
                    continue;
                }
            };
            let drained = found.len() < room;
            let mut pushed = 0;
            let mut phantom = false;
            for m in found {
                let stored_id = m.msg_id;
                let msg = match &self.hooks {
                    None => Some((m.msg_id, m.body)),
                    Some(h) => hooked_delivery(
                        h.as_ref(),
                        sub.queue,
                        sub.hook_secret.as_deref(),
                        m.msg_id,
                        m.received_hour,
                        m.body,
                    ),
                };
                let Some((msg_id, body)) = msg else {
                    sub.cursor = m.seq;
                    continue;
                };
                if body.len() != DELIVERED_LEN {
                    error!("a stored message has the wrong length; the database may be damaged");
                    sub.cursor = m.seq;
                    continue;
                }
                if msg_id != stored_id {
                    // A hook pushed a message of its own in front of the
                    // stored one (tests only): the stored one stays next,
                    // for the look after the recipient's answer.
                    phantom = true;
                    replies.push((
                        tag,
                        Reply::Message {
                            msg_id,
                            received_at: u64::try_from(m.received_hour.saturating_mul(3600))
                                .unwrap_or(0),
                            body,
                        },
                        "SUB",
                    ));
                    break;
                }
                sub.cursor = m.seq;
                sub.pushed.push_back((m.seq, msg_id));
                pushed += 1;
                replies.push((
                    tag,
                    Reply::Message {
                        msg_id,
                        received_at: u64::try_from(m.received_hour.saturating_mul(3600))
                            .unwrap_or(0),
                        body,
                    },
                    "SUB",
                ));
            }
            st.in_flight += pushed;
            if pushed > 0 || phantom {
                sub.idle_sent = false;
            }
            if drained && !phantom && !sub.idle_sent {
                sub.idle_sent = true;
                replies.push((tag, Reply::Idle, "SUB"));
            }
        }
    }

    /// Encodes the replies into frames and seals them; `true` if a hook
    /// asked to close the session instead.
    fn seal(
        &self,
        st: &mut SessionState,
        replies: Vec<(u32, Reply, &'static str)>,
    ) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        let mut frames = FrameBuilder::new();
        let mut rejected = false;
        let flush = |frames: FrameBuilder, st: &mut SessionState, out: &mut Vec<Vec<u8>>| {
            for f in frames.finish() {
                match st.session.seal(&f) {
                    Ok(m) => out.push(m),
                    Err(e) => error!("could not seal a frame: {e}"),
                }
            }
        };
        for (tag, reply, command) in replies {
            let action = self.hooks.as_ref().map(|h| {
                h.on_response(&ResponseView {
                    command: Some(command),
                    tag,
                    reply: &reply,
                })
            });
            match action {
                None | Some(ResponseAction::Pass) => {
                    frames.push_with(tern_wire::command::MAX_REPLY_LEN, |buf| {
                        reply.encode(tag, buf)
                    });
                }
                Some(ResponseAction::Delay(d)) => {
                    std::thread::sleep(d);
                    frames.push_with(tern_wire::command::MAX_REPLY_LEN, |buf| {
                        reply.encode(tag, buf)
                    });
                }
                Some(ResponseAction::Plaintext(record)) => {
                    if !record.is_empty()
                        && record[0] != 0
                        && record.len() <= tern_wire::frame::MAX_FRAME_LEN
                    {
                        frames.push(&record);
                    }
                }
                Some(ResponseAction::Replace(bytes)) => {
                    flush(std::mem::take(&mut frames), st, &mut out);
                    out.push(bytes);
                }
                Some(ResponseAction::Reject) => {
                    rejected = true;
                    break;
                }
            }
        }
        flush(frames, st, &mut out);
        (out, rejected)
    }

    /// Deletes expired messages, and queues that expired (never secured for
    /// `unsecured_days`, or unused for the TTL); returns how many of each.
    pub fn purge(&self, now_ms: u64) -> std::result::Result<(usize, usize), StoreError> {
        let messages = self.store.purge_expired(self.expired_upto(now_ms))?;
        let today = day_of(now_ms / 1000);
        let unsecured_before = if self.policy.unsecured_days == 0 {
            i64::MIN
        } else {
            today - i64::from(self.policy.unsecured_days)
        };
        let idle_before = today - i64::from(self.policy.ttl_secs.div_ceil(86_400));
        let gone = self.store.expire_queues(unsecured_before, idle_before)?;
        for q in &gone {
            self.waiters.notify_gone(*q);
        }
        Ok((messages, gone.len()))
    }

    /// Truncates the store's WAL (see [`Store::checkpoint`]).
    pub fn checkpoint(&self) -> std::result::Result<(), StoreError> {
        self.store.checkpoint()
    }
}

/// A push as the hooks rewrote it (as stored when they pass it); `None`
/// to push nothing.
fn hooked_delivery(
    h: &dyn RelayHooks,
    queue: QueueRef,
    secret: Option<&[u8; 32]>,
    msg_id: Id,
    received_hour: i64,
    body: Vec<u8>,
) -> Option<(Id, Vec<u8>)> {
    let secret = secret?;
    let received_at = u64::try_from(received_hour.saturating_mul(3600)).unwrap_or(0);
    let opened = delivery_open(secret, &msg_id, &body).ok();
    let action = h.on_deliver(&DeliverView {
        queue,
        msg_id: &msg_id,
        received_at,
        delivered: &body,
        message: opened.as_deref(),
        queue_secret: secret,
    });
    match action {
        DeliverAction::Pass => Some((msg_id, body)),
        DeliverAction::Hide => None,
        DeliverAction::Replace { msg_id, message } => {
            Some((msg_id, delivery_seal(secret, &msg_id, &message)))
        }
        DeliverAction::Raw { msg_id, delivered } => Some((msg_id, delivered)),
    }
}
