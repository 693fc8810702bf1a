//! Receiving: subscribe to every queue, store what the relays push in store
//! transactions, and only then acknowledge it.
//!
//! One session per relay (per queue with `--isolate`) carries every
//! subscription to that relay; the relays push messages as they arrive and
//! say IDLE when a queue has nothing more for now. Everything pushed that
//! is waiting is stored in one transaction, each message in a savepoint of
//! its own, and each queue's stored run is acknowledged with one ACK_UPTO.
//! Without `--wait` or `--follow`, queues are first asked how much they
//! hold (CHECK, unsigned and cheap), and only those holding something are
//! subscribed: the cost of a `tern recv` grows with what arrived, not with
//! the number of contacts.
//!
//! A message counts as delivered to the caller only once the caller says it
//! was written out: every new message goes into an inbox log in the same
//! transaction that stores it, and leaves it when shown. What a broken pipe
//! or a full disk kept from being shown is shown by the next run.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use tern_wire::address::RelayAddress;
use tern_wire::delivery::delivery_open;
use tern_wire::{Command, ErrorCode, Id, Reply};

pub use super::events::{Event, Shown};
use super::jobs::{
    flush_outbox, peer_left_old_connection, push_actions, push_actions_for, settle_old_connection,
};
use super::model::{
    deferred_log, seen_set, Contact, Deferred, Direction, HistoryEntry, Job, Settings, SETTINGS,
};
use super::records;
use super::{abort, unwrap_abort, Client, ClientError};
use crate::net::{Call, NetError, SubEvent, SubSpec, Subscription, Targeted};
use crate::proto::connection::{ConnState, Incoming};
use crate::proto::envelope::ChainStatus;
use crate::proto::keys::Secret32;
use crate::proto::ProtoError;
use crate::store::{StoreError, Tx};

/// Messages pushed to one subscription before it waits for an
/// acknowledgement: a run stored in one commit. At 16 KiB each, 1 MiB.
const WINDOW: u16 = 64;
/// In `--wait` and `--follow`, how often to look for new contacts, new
/// queues and pending jobs.
const RESCAN: Duration = Duration::from_secs(5);
/// Beyond this many messages in a batch, no more are added to it, so that
/// no message waits long for the others' commit.
const MAX_BATCH: usize = 128;
/// Unusable messages in a row after which a queue is left alone for the
/// rest of the run. Legitimate traffic never comes close: copies arrive once
/// per queue, and handshake or rotation steps are a handful.
const MAX_USELESS_IN_A_ROW: u32 = 64;
/// Reconnecting to a relay that went away: first after this, doubling up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Without `--wait`, how long the relays may say nothing before the run
/// ends without them (what one command may take).
const QUIET_LIMIT: Duration = Duration::from_secs(15);
/// The log of messages stored but not yet shown to the caller.
pub const INBOX: &str = "inbox";

/// A message stored and not yet shown, as the inbox keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Undelivered {
    contact_id: String,
    entry: HistoryEntry,
    chain: ChainStatus,
}

#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Wait up to this long for the first message (or connection).
    pub wait: Option<Duration>,
    /// Keep receiving until interrupted.
    pub follow: bool,
    /// Only this contact's queues.
    pub contact_id: Option<String>,
    /// With `wait`: receive until a delivery receipt for this message
    /// arrives (or `wait` passes), not just until the first message;
    /// what arrives meanwhile is stored and stays in the inbox unless the
    /// caller shows it (`tern send --wait-delivered`).
    pub until_delivered: Option<[u8; 16]>,
}

#[derive(Debug, Default)]
pub struct FetchSummary {
    pub messages: usize,
    /// Connections that completed.
    pub connected: usize,
    /// Contacts that received something in this run, and since the
    /// receiving loop last looked.
    touched: HashSet<String>,
    recent: HashSet<String>,
    /// Relays that could not be reached, and other failures.
    pub errors: Vec<NetError>,
    pub queues: usize,
    /// Distinct relays the queues are on, and how many of them failed.
    pub relays: usize,
    failed_relays: HashSet<String>,
    /// The caller could not show an event: receiving stopped there.
    pub output_failed: bool,
    /// [`FetchOptions::until_delivered`]: the first device of the contact
    /// that confirmed it, once one has.
    pub delivered: Option<super::model::DeliveredTo>,
    until_delivered: Option<[u8; 16]>,
}

/// One queue to receive from.
struct QueueRef {
    contact_id: String,
    relay: RelayAddress,
    recipient_id: Id,
    /// The recipient key's seed; the key itself is derived (a base-point
    /// multiplication) only for the queues a run signs for, not for every
    /// queue it merely CHECKs.
    auth: Secret32,
    signer: std::sync::OnceLock<SigningKey>,
    queue_secret: Secret32,
}

impl QueueRef {
    fn new(contact_id: &str, q: &crate::proto::connection::RecvQueue) -> Self {
        QueueRef {
            contact_id: contact_id.to_string(),
            relay: q.relay.clone(),
            recipient_id: q.recipient_id,
            auth: q.auth.clone(),
            signer: std::sync::OnceLock::new(),
            queue_secret: q.queue_secret.clone(),
        }
    }

    fn signer(&self) -> &SigningKey {
        self.signer
            .get_or_init(|| SigningKey::from_bytes(self.auth.as_bytes()))
    }
}

/// What names the session a queue's subscription rides on: its relay, and
/// the queue itself with `--isolate`.
type SessionKey = (String, Option<Id>);

/// What the main thread made of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Stored or acted on.
    Used,
    /// Dropped: a copy already seen, junk, a replay.
    Useless,
}

/// A pushed message waiting to be stored.
struct Delivered {
    token: usize,
    msg_id: Id,
    body: Vec<u8>,
}

/// Every queue being received from, and the sessions they ride on.
struct Watch {
    queues: Vec<Arc<QueueRef>>,
    by_queue: HashMap<(String, Id), usize>,
    /// Per token: pushed everything for now (IDLE), or done for this run.
    idle: Vec<bool>,
    done: Vec<bool>,
    useless: Vec<u32>,
    session_of: Vec<SessionKey>,
    sessions: HashMap<SessionKey, Subscription>,
    /// Sessions lost, with when to try again and how long to wait after.
    lost: HashMap<SessionKey, (Instant, Duration)>,
    /// Relays said to be unreachable, so that it is said once.
    warned: HashSet<String>,
    events: Sender<SubEvent>,
    /// Lost sessions are reconnected (`--wait`, `--follow`); otherwise
    /// their queues are done for this run.
    retry: bool,
}

fn session_key(q: &QueueRef, isolate: bool) -> SessionKey {
    (
        q.relay.without_access_key().to_string(),
        isolate.then_some(q.recipient_id),
    )
}

impl FetchSummary {
    /// Every relay failed (and so nothing could be received).
    pub fn all_relays_failed(&self) -> bool {
        self.relays > 0 && self.failed_relays.len() >= self.relays
    }

    fn failed(&mut self, relay: &RelayAddress, e: NetError) {
        self.failed_relays.insert(relay.label());
        self.errors.push(e);
    }
}

impl Watch {
    fn new(events: Sender<SubEvent>, retry: bool) -> Self {
        Self {
            queues: Vec::new(),
            by_queue: HashMap::new(),
            idle: Vec::new(),
            done: Vec::new(),
            useless: Vec::new(),
            session_of: Vec::new(),
            sessions: HashMap::new(),
            lost: HashMap::new(),
            warned: HashSet::new(),
            events,
            retry,
        }
    }

    /// Adds queues not watched yet; returns their tokens.
    fn add(&mut self, queues: Vec<Arc<QueueRef>>, isolate: bool) -> Vec<usize> {
        let mut added = Vec::new();
        // Most queues share a handful of relays: each relay's part of the
        // session key is made once.
        let mut relays: Vec<(RelayAddress, String)> = Vec::new();
        for q in queues {
            let key = (q.contact_id.clone(), q.recipient_id);
            if self.by_queue.contains_key(&key) {
                continue;
            }
            let token = self.queues.len();
            self.by_queue.insert(key, token);
            let relay = match relays.iter().find(|(r, _)| *r == q.relay) {
                Some((_, k)) => k.clone(),
                None => {
                    let k = session_key(&q, false).0;
                    relays.push((q.relay.clone(), k.clone()));
                    k
                }
            };
            self.session_of
                .push((relay, isolate.then_some(q.recipient_id)));
            self.queues.push(q);
            self.idle.push(false);
            self.done.push(false);
            self.useless.push(0);
            added.push(token);
        }
        added
    }

    /// Subscribes `tokens`, grouped by session; a relay that cannot be
    /// reached is reported and, when `retry`, tried again later.
    fn subscribe(
        &mut self,
        client: &Client,
        tokens: &[usize],
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) {
        let retry = self.retry;
        let mut groups: HashMap<SessionKey, Vec<usize>> = HashMap::new();
        for &t in tokens {
            groups
                .entry(self.session_of[t].clone())
                .or_default()
                .push(t);
        }
        for (key, group) in groups {
            let specs: Vec<SubSpec> = group
                .iter()
                .map(|&t| SubSpec {
                    token: t,
                    recipient_id: self.queues[t].recipient_id,
                    key: self.queues[t].signer().clone(),
                    window: WINDOW,
                })
                .collect();
            let relay = self.queues[group[0]].relay.clone();
            let result = match self.sessions.get(&key).filter(|s| !s.is_lost()) {
                Some(s) => s.add(specs, &self.events).map(|()| None),
                None => client
                    .net
                    .subscribe(&relay, key.1.as_ref(), specs, &self.events)
                    .map(Some),
            };
            match result {
                Ok(Some(sub)) => {
                    self.sessions.insert(key.clone(), sub);
                    self.back_again(&relay, on_event);
                }
                Ok(None) => {}
                Err(e) => {
                    self.unreachable(&relay, &e, on_event);
                    if retry && e.is_transient() {
                        let backoff = self.lost.get(&key).map_or(FIRST_BACKOFF, |(_, b)| *b);
                        self.lost.insert(
                            key,
                            (Instant::now() + backoff, (backoff * 2).min(MAX_BACKOFF)),
                        );
                    } else {
                        for &t in &group {
                            self.done[t] = true;
                        }
                    }
                    summary.failed(&relay, e);
                }
            }
        }
    }

    /// Says once that a relay is unreachable, with the time.
    fn unreachable(&mut self, relay: &RelayAddress, e: &NetError, on_event: &mut dyn FnMut(Event)) {
        if self.warned.insert(relay.label()) {
            on_event(Event::Warning(format!(
                "{e} (at {}); still trying",
                crate::time::rfc3339(super::now())
            )));
        }
    }

    /// Says that a relay said to be unreachable is back.
    fn back_again(&mut self, relay: &RelayAddress, on_event: &mut dyn FnMut(Event)) {
        if self.warned.remove(&relay.label()) {
            on_event(Event::Notice(format!(
                "relay {} is reachable again (at {})",
                relay.label(),
                crate::time::rfc3339(super::now())
            )));
        }
    }

    /// Every live token is idle or done.
    fn settled(&self) -> bool {
        (0..self.queues.len()).all(|t| self.idle[t] || self.done[t])
    }

    fn ack(&mut self, token: usize, msg_id: Id) {
        let q = &self.queues[token];
        if let Some(sub) = self.sessions.get(&self.session_of[token]) {
            // A session gone meanwhile: the queue gets the message again on
            // the next one, and the seen-set drops it.
            let _ = sub.ack_upto(q.recipient_id, msg_id, q.signer());
        }
    }
}

impl Client {
    fn queue_refs(&self, only: Option<&str>) -> Result<Vec<Arc<QueueRef>>, ClientError> {
        let mut out = Vec::new();
        for c in self.contacts()? {
            if only.is_some_and(|id| id != c.id) {
                continue;
            }
            out.extend(contact_queue_refs(&c));
        }
        Ok(out)
    }

    /// The queues of these contacts only.
    fn queue_refs_of(&self, ids: &[String]) -> Result<Vec<Arc<QueueRef>>, ClientError> {
        let mut out = Vec::new();
        for id in ids {
            if let Ok(c) = self.contact(id) {
                out.extend(contact_queue_refs(&c));
            }
        }
        Ok(out)
    }

    /// Messages stored by an earlier run and never shown (`only`: of one
    /// contact), oldest first.
    fn undelivered(&self, only: Option<&str>) -> Result<Vec<Event>, ClientError> {
        let entries: Vec<(u64, Undelivered)> =
            self.store.read(|tx| tx.head_after(INBOX, 0, usize::MAX))?;
        let mut out = Vec::new();
        for (seq, u) in entries {
            if only.is_some_and(|id| id != u.contact_id) {
                continue;
            }
            let contact = match self.contact(&u.contact_id) {
                Ok(c) => c.name,
                // Forgotten since: still show what it sent.
                Err(_) => "(forgotten contact)".to_string(),
            };
            out.push(Event::Message {
                contact,
                entry: u.entry,
                chain: u.chain,
                delivery: Some(seq),
            });
        }
        Ok(out)
    }

    /// Every message stored and not yet shown, oldest first (as `fetch`
    /// shows them first): the daemon reads them before it takes clients.
    pub fn inbox(&self) -> Result<Vec<Event>, ClientError> {
        self.undelivered(None)
    }

    /// Forgets inbox entries that were shown (by their sequence numbers,
    /// [`Event::Message`]'s `delivery`): the daemon calls it when a client
    /// took a message that `fetch` was told it would show later.
    pub fn delivered(&mut self, seqs: &[u64]) -> Result<(), ClientError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.store
            .transaction(|tx| tx.remove_log_entries(INBOX, seqs))?;
        Ok(())
    }

    /// Receives, stores and acknowledges messages, showing each through
    /// `on_event` as soon as it is stored.
    pub fn fetch(
        &mut self,
        opts: &FetchOptions,
        on_event: &mut dyn FnMut(Event) -> Shown,
    ) -> Result<FetchSummary, ClientError> {
        let mut summary = FetchSummary {
            until_delivered: opts.until_delivered,
            ..FetchSummary::default()
        };
        let only = opts.contact_id.as_deref();
        let waiting = opts.follow || opts.wait.is_some();
        if let Some(e) = self.removed_error()? {
            // Nothing new can come; finish deleting what it still holds.
            self.run_all_jobs(only, &mut |e| {
                let _ = on_event(e);
            })?;
            return Err(e);
        }
        // A plain `recv` of everything reads every contact's summary once
        // (records::Summary: its queues, whether it has work, when it
        // expires or rotates), and the decisions below (expired? jobs?
        // rotation due? which queues?) are all made from that one read; a
        // contact's record is read only when its summary says there is
        // something to do, and summaries are read again only after
        // something changed. (Reading every record is most of what a
        // `recv` with many contacts and nothing new would cost.)
        let mut snapshot = if only.is_none() && !waiting {
            Some(records::glance_all(&mut self.store)?)
        } else {
            None
        };
        let mut changed = false;
        // Invitations and device links past their time are void.
        match &snapshot {
            Some(gs) => {
                let t = super::now();
                let expired = self.records_of(gs, |g| g.summary.expired(t))?;
                changed |= self.withdraw_expired_in(&expired, &mut |e| {
                    let _ = on_event(e);
                })?
            }
            None => self.withdraw_expired(&mut |e| {
                let _ = on_event(e);
            })?,
        }
        // First what an earlier run stored and could not show.
        let mut shown = Vec::new();
        for e in self.undelivered(only)? {
            let seq = match &e {
                Event::Message { delivery, .. } => *delivery,
                _ => None,
            };
            match on_event(e) {
                Shown::Yes => shown.extend(seq),
                Shown::Later => {}
                Shown::Failed => {
                    summary.output_failed = true;
                    self.delivered(&shown)?;
                    return Ok(summary);
                }
            }
        }
        self.delivered(&shown)?;
        let mut unchanged_refs = None;
        if !waiting {
            // Work left over from earlier commands (outbox, handshake
            // steps), and queue rotations that are due. (When waiting, a
            // thread of its own does this, so that receiving never waits
            // for an upload to a slow relay.)
            if let Some(gs) = snapshot.take() {
                let gs = if changed {
                    records::glance_all(&mut self.store)?
                } else {
                    gs
                };
                let working = self.records_of(&gs, |g| g.summary.has_work)?;
                changed |= self.run_jobs_for(&working, &mut |e| {
                    let _ = on_event(e);
                })?;
                let gs = if changed {
                    records::glance_all(&mut self.store)?
                } else {
                    gs
                };
                let refs: Vec<Arc<QueueRef>> = gs.iter().flat_map(glance_queue_refs).collect();
                let days = self.settings()?.rotate_days;
                let t = super::now();
                let due = self.records_of(&gs, |g| g.summary.rotation_due(&g.id, days, t))?;
                changed |= self.rotate_those(due, &mut |e| {
                    let _ = on_event(e);
                })?;
                if !changed {
                    unchanged_refs = Some(refs);
                }
            } else {
                self.run_all_jobs(only, &mut |e| {
                    let _ = on_event(e);
                })?;
                self.rotate_due(only, &mut |e| {
                    let _ = on_event(e);
                })?;
            }
        }
        let queues = match unchanged_refs {
            Some(refs) => refs,
            None => self.queue_refs(only)?,
        };
        summary.queues = queues.len();
        summary.relays = queues
            .iter()
            .map(|q| &q.relay)
            .collect::<HashSet<_>>()
            .iter()
            .map(|r| r.label())
            .collect::<HashSet<_>>()
            .len();
        self.receive(opts, queues, &mut summary, on_event)?;
        if waiting {
            self.run_all_jobs(only, &mut |e| {
                let _ = on_event(e);
            })?;
            // A peer may have asked for a rotation in what just arrived.
            self.rotate_due(only, &mut |e| {
                let _ = on_event(e);
            })?;
        } else {
            // Everything else ran before: only the contacts that just
            // received something can have new work (a handshake step, a
            // rotation the peer asked for). No need to read every record.
            let touched: Vec<String> = std::mem::take(&mut summary.touched).into_iter().collect();
            self.run_jobs_of(&touched, &mut |e| {
                let _ = on_event(e);
            })?;
            self.rotate_due_of(&touched, &mut |e| {
                let _ = on_event(e);
            })?;
        }
        if let Some(e) = self.removed_error()? {
            return Err(e);
        }
        Ok(summary)
    }

    /// The permanent error of a device that was removed from the profile.
    pub(crate) fn removed_error(&self) -> Result<Option<ClientError>, ClientError> {
        Ok(self
            .settings()?
            .removed
            .map(|r| ClientError::DeviceRemoved {
                by: r.by,
                at: crate::time::rfc3339(r.at_ms),
            }))
    }

    /// The records of the contacts whose summary says `pick`, as they are
    /// now (the few a plain `recv` has something to do with).
    fn records_of(
        &self,
        glances: &[records::Glance],
        pick: impl Fn(&records::Glance) -> bool,
    ) -> Result<Vec<Contact>, ClientError> {
        let ids: Vec<&str> = glances
            .iter()
            .filter(|g| pick(g))
            .map(|g| g.id.as_str())
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.store.read(|tx| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.extend(records::load(tx, id)?);
            }
            Ok(out)
        })?)
    }

    fn run_all_jobs(
        &mut self,
        only: Option<&str>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let ids: Vec<String> = self
            .index()?
            .into_iter()
            .filter(|e| only.is_none_or(|id| id == e.id))
            .map(|e| e.id)
            .collect();
        self.run_jobs_of(&ids, on_event)
    }

    /// Flushes the outbox and runs the jobs of each of these contacts that
    /// has any.
    fn run_jobs_of(
        &mut self,
        ids: &[String],
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let mut pending = Vec::new();
        for id in ids {
            let Ok(c) = self.contact(id) else { continue };
            if c.has_work() {
                pending.push(c.id);
            }
        }
        self.run_pending_jobs(pending, on_event)
    }

    /// [`Client::run_jobs_of`] deciding from records already read; true if
    /// any contact had work (its record has changed since).
    fn run_jobs_for(
        &mut self,
        contacts: &[Contact],
        on_event: &mut dyn FnMut(Event),
    ) -> Result<bool, ClientError> {
        let pending: Vec<String> = contacts
            .iter()
            .filter(|c| c.has_work())
            .map(|c| c.id.clone())
            .collect();
        let any = !pending.is_empty();
        self.run_pending_jobs(pending, on_event)?;
        Ok(any)
    }

    fn run_pending_jobs(
        &mut self,
        pending: Vec<String>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        for id in pending {
            self.update_contact(&id, |_, c| flush_outbox(c, super::now()))?;
            let report = self.run_jobs(&id)?;
            for e in report.errors {
                on_event(Event::Warning(format!("could not deliver yet: {e}")));
            }
            for n in report.notices {
                on_event(Event::Warning(n));
            }
        }
        Ok(())
    }

    /// Asks each relay, in one round trip, which of these queues hold
    /// anything; returns those that do. A queue the relay does not know is
    /// gone (deleted by another tern process, or expired) and left out.
    fn holding(
        &self,
        queues: Vec<Arc<QueueRef>>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Vec<Arc<QueueRef>> {
        let calls = queues
            .iter()
            .map(|q| Targeted {
                relay: &q.relay,
                queue: Some(q.recipient_id),
                call: Call {
                    command: Command::Check {
                        recipient_id: q.recipient_id,
                    },
                    key: None,
                },
            })
            .collect();
        let replies = self.net.run_all(calls);
        let mut out = Vec::new();
        let mut failed_relays = HashSet::new();
        for (q, r) in queues.into_iter().zip(replies) {
            match r {
                Ok(Reply::Count(0)) => {}
                Ok(Reply::Count(_)) => out.push(q),
                Ok(_)
                | Err(NetError::Refused {
                    code: ErrorCode::Auth,
                    ..
                }) => {}
                Err(e) => {
                    if failed_relays.insert(q.relay.label()) {
                        on_event(Event::Warning(e.to_string()));
                        summary.failed(&q.relay, e);
                    }
                }
            }
        }
        out
    }

    /// The receiving loop itself.
    fn receive(
        &mut self,
        opts: &FetchOptions,
        queues: Vec<Arc<QueueRef>>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event) -> Shown,
    ) -> Result<(), ClientError> {
        let waiting = opts.follow || opts.wait.is_some();
        let deadline = opts
            .wait
            .filter(|_| !opts.follow)
            // Beyond a century a wait is for ever (and a larger one would
            // overflow the clock).
            .map(|w| Instant::now() + w.min(Duration::from_secs(u32::MAX.into())));
        let isolate = self.net.isolates();
        let (tx, rx) = mpsc::channel();
        let mut watch = Watch::new(tx, waiting);
        // Every queue is known to the watch, so that only queues made during
        // the run count as new; without waiting, only those holding
        // something are subscribed.
        let all = watch.add(queues.clone(), isolate);
        let tokens = if waiting {
            all
        } else {
            let holding: HashSet<(String, Id)> = self
                .holding(queues, summary, &mut |e| {
                    let _ = on_event(e);
                })
                .into_iter()
                .map(|q| (q.contact_id.clone(), q.recipient_id))
                .collect();
            let (hold, empty): (Vec<usize>, Vec<usize>) = all.into_iter().partition(|&t| {
                let q = &watch.queues[t];
                holding.contains(&(q.contact_id.clone(), q.recipient_id))
            });
            for t in empty {
                watch.done[t] = true;
            }
            hold
        };
        watch.subscribe(self, &tokens, summary, &mut |e| {
            let _ = on_event(e);
        });
        // Uploads and rotations run beside the receiving, on their own store
        // handle: told which contacts just received something, and on every
        // rescan tick for everything else.
        let said = Arc::new(Mutex::new(Vec::new()));
        let jobs = if waiting {
            Some(self.jobs_thread(opts.contact_id.clone(), said.clone())?)
        } else {
            None
        };
        let mut next_rescan = Instant::now() + RESCAN;
        let before = summary.messages + summary.connected;
        let result = loop {
            let now = Instant::now();
            let progress = summary.messages + summary.connected > before;
            if !waiting && watch.settled() {
                break Ok(());
            }
            if waiting
                && !opts.follow
                && progress
                && watch.settled()
                && opts.until_delivered.is_none()
            {
                break Ok(());
            }
            if summary.delivered.is_some() {
                break Ok(());
            }
            if deadline.is_some_and(|d| now >= d) {
                break Ok(());
            }
            let mut limit = [Some(next_rescan), deadline]
                .into_iter()
                .flatten()
                .chain(watch.lost.values().map(|(t, _)| *t))
                .min()
                .map(|t| t.saturating_duration_since(now));
            if !waiting {
                // Everything subscribed answers IDLE at once: a relay quiet
                // for as long as a command may take is given up for this run.
                limit = Some(QUIET_LIMIT);
            }
            let first = match limit {
                Some(d) => match rx.recv_timeout(d) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break Ok(()),
                },
                None => rx.recv().ok(),
            };
            if first.is_none() && !waiting {
                // Nothing from relays that should answer at once.
                for t in 0..watch.queues.len() {
                    watch.done[t] = true;
                }
                break Ok(());
            }
            let mut batch = Vec::new();
            let mut others = Vec::new();
            let mut next = first;
            while let Some(e) = next.take() {
                match e {
                    SubEvent::Message {
                        token,
                        msg_id,
                        body,
                        ..
                    } => batch.push(Delivered {
                        token,
                        msg_id,
                        body,
                    }),
                    other => others.push(other),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                if let Err(e) = self.store_batch(&mut watch, batch, summary, on_event) {
                    break Err(e);
                }
                if summary.output_failed {
                    break Ok(());
                }
            }
            for e in others {
                self.on_sub_event(&mut watch, e, summary, &mut |e| {
                    let _ = on_event(e);
                });
            }
            for e in std::mem::take(&mut *said.lock().unwrap_or_else(PoisonError::into_inner)) {
                let _ = on_event(e);
            }
            // (summary.touched keeps them all: the jobs after a plain
            // receive run for every contact that received something.)
            let touched: Vec<String> = std::mem::take(&mut summary.recent).into_iter().collect();
            if !touched.is_empty() {
                if let Some(j) = &jobs {
                    let _ = j.send(touched.clone());
                }
                // A handshake step or a rotation may have made new queues:
                // receive from them at once (they are not on the list yet).
                if let Ok(refs) = self.queue_refs_of(&touched) {
                    let new = watch.add(refs, isolate);
                    watch.subscribe(self, &new, summary, &mut |e| {
                        let _ = on_event(e);
                    });
                }
            }
            let now = Instant::now();
            let retry: Vec<SessionKey> = watch
                .lost
                .iter()
                .filter(|(_, (t, _))| *t <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for key in retry {
                let tokens: Vec<usize> = (0..watch.queues.len())
                    .filter(|&t| watch.session_of[t] == key && !watch.done[t])
                    .collect();
                watch.sessions.remove(&key);
                watch.subscribe(self, &tokens, summary, &mut |e| {
                    let _ = on_event(e);
                });
                if !watch.sessions.contains_key(&key) {
                    continue;
                }
                watch.lost.remove(&key);
            }
            if waiting && now >= next_rescan {
                next_rescan = now + RESCAN;
                // Contacts made meanwhile by other tern commands, and new
                // queues of jobs that ran on the jobs thread.
                if let Ok(refs) = self.queue_refs(opts.contact_id.as_deref()) {
                    let new = watch.add(refs, isolate);
                    watch.subscribe(self, &new, summary, &mut |e| {
                        let _ = on_event(e);
                    });
                }
            }
        };
        // The last acknowledgements are out before the run ends (a process
        // that exits first would leave them unsent: harmless, but each would
        // come again): one answered command behind them on each session.
        let barriers: Vec<_> = watch
            .sessions
            .values()
            .filter_map(Subscription::barrier)
            .collect();
        for rx in barriers {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
        drop(jobs);
        result
    }

    /// Starts the thread that runs uploads and rotations while receiving;
    /// what it has to say waits in `said` for the receiving loop.
    fn jobs_thread(
        &self,
        only: Option<String>,
        said: Arc<Mutex<Vec<Event>>>,
    ) -> Result<Sender<Vec<String>>, ClientError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<String>>();
        let mut jobs_client = self.another_handle()?;
        std::thread::spawn(move || {
            let mut emit = |e: Event| {
                said.lock().unwrap_or_else(PoisonError::into_inner).push(e);
            };
            let mut everything = true;
            loop {
                let result = if everything {
                    jobs_client
                        .run_all_jobs(only.as_deref(), &mut emit)
                        .and_then(|()| jobs_client.rotate_due(only.as_deref(), &mut emit))
                } else {
                    Ok(())
                };
                if let Err(e) = result {
                    emit(Event::Warning(format!(
                        "could not send pending work yet: {e}"
                    )));
                }
                match jobs_rx.recv_timeout(RESCAN) {
                    Ok(ids) => {
                        everything = false;
                        if let Err(e) = jobs_client.run_jobs_of(&ids, &mut emit) {
                            emit(Event::Warning(format!(
                                "could not send pending work yet: {e}"
                            )));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => everything = true,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Ok(jobs_tx)
    }

    fn on_sub_event(
        &mut self,
        watch: &mut Watch,
        e: SubEvent,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) {
        match e {
            SubEvent::Message { .. } => {}
            SubEvent::Subscribed { .. } => {}
            SubEvent::Idle { token } => watch.idle[token] = true,
            // The queue was deleted (by a rotation or re-key, here or in
            // another tern process): nothing more comes from it.
            SubEvent::Ended { token } => watch.done[token] = true,
            SubEvent::Refused { token, reply } => {
                watch.done[token] = true;
                // Auth: the queue is gone already, as above.
                if reply != Reply::Error(ErrorCode::Auth) {
                    on_event(Event::Warning(format!(
                        "relay {} refused to deliver a queue: {reply:?}",
                        watch.queues[token].relay.label()
                    )));
                }
            }
            SubEvent::Lost { token, error } => {
                let key = watch.session_of[token].clone();
                if watch.lost.contains_key(&key) || !watch.sessions.contains_key(&key) {
                    return;
                }
                watch.sessions.remove(&key);
                let relay = watch.queues[token].relay.clone();
                let e = NetError::Unreachable {
                    relay: relay.label(),
                    reason: error,
                };
                watch.unreachable(&relay, &e, on_event);
                let tokens: Vec<usize> = (0..watch.queues.len())
                    .filter(|&t| watch.session_of[t] == key)
                    .collect();
                for t in tokens {
                    watch.idle[t] = false;
                    if !watch.retry {
                        watch.done[t] = true;
                    }
                }
                if watch.retry {
                    watch
                        .lost
                        .insert(key, (Instant::now() + FIRST_BACKOFF, FIRST_BACKOFF * 2));
                }
                summary.failed(&relay, e);
            }
        }
    }

    /// Stores a batch of pushed messages in one transaction, each in a
    /// savepoint of its own, puts new texts in the inbox, acknowledges each
    /// queue's stored run, and shows what arrived. A failure to store
    /// changes nothing and acknowledges nothing: the relays keep every
    /// message of the batch.
    fn store_batch(
        &mut self,
        watch: &mut Watch,
        batch: Vec<Delivered>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event) -> Shown,
    ) -> Result<(), ClientError> {
        let now = super::now();
        // Decrypting needs no store: done before taking the write lock.
        let opened: Vec<Option<Vec<u8>>> = batch
            .iter()
            .map(|d| {
                let q = &watch.queues[d.token];
                delivery_open(q.queue_secret.as_bytes(), &d.msg_id, &d.body).ok()
            })
            .collect();
        let queues = &watch.queues;
        let linking = self.linking.clone();
        let (outcomes, with_receipts) = self
            .store
            .transaction(|tx| {
                let mut out = Vec::with_capacity(batch.len());
                // Texts and file offers stored: receipts for them below.
                let mut stored: Vec<(String, [u8; 16])> = Vec::new();
                for (d, message) in batch.iter().zip(&opened) {
                    let q = &queues[d.token];
                    let mut events = match message {
                        Some(m) => tx.savepoint(|tx| {
                            let mut ids = Vec::new();
                            let events =
                                process_inner(tx, q, m, now, linking.as_deref(), &mut ids)?;
                            // Only once its savepoint holds: an error leaves
                            // no trace of the message, and no receipt.
                            stored.extend(ids.into_iter().map(|i| (q.contact_id.clone(), i)));
                            Ok(events)
                        })?,
                        None => vec![Event::Warning(format!(
                            "relay {} delivered a message that does not decrypt; dropped",
                            q.relay.label()
                        ))],
                    };
                    // New texts wait in the inbox until they are shown.
                    for e in &mut events {
                        if let Event::Message {
                            entry,
                            chain,
                            delivery,
                            ..
                        } = e
                        {
                            let seq = tx.append(
                                INBOX,
                                &Undelivered {
                                    contact_id: q.contact_id.clone(),
                                    entry: entry.clone(),
                                    chain: *chain,
                                },
                            )?;
                            *delivery = Some(seq);
                        }
                    }
                    out.push(events);
                }
                // Receipts owed for what the batch stored, committed with
                // it; encrypted and uploaded by the jobs after the commit.
                let with_receipts = super::receipts::send_receipts(tx, &stored)?;
                Ok((out, with_receipts))
            })
            .map_err(unwrap_abort)?;
        for id in with_receipts {
            summary.touched.insert(id.clone());
            summary.recent.insert(id);
        }
        // Committed: acknowledge each queue's run with one command, after
        // the last message of it.
        let mut last: HashMap<usize, Id> = HashMap::new();
        let mut shown = Vec::new();
        for (d, events) in batch.iter().zip(outcomes) {
            summary
                .touched
                .insert(watch.queues[d.token].contact_id.clone());
            summary
                .recent
                .insert(watch.queues[d.token].contact_id.clone());
            let useless = events.iter().all(|e| matches!(e, Event::Warning(_)));
            let verdict = if useless {
                Verdict::Useless
            } else {
                Verdict::Used
            };
            match verdict {
                Verdict::Used => watch.useless[d.token] = 0,
                Verdict::Useless => watch.useless[d.token] += 1,
            }
            last.insert(d.token, d.msg_id);
            for e in events {
                match &e {
                    Event::Message { .. } => summary.messages += 1,
                    // `--wait` also ends when a connection completes: that
                    // is what `tern invite` tells people to wait for.
                    Event::Connected { .. } => summary.connected += 1,
                    Event::Delivered {
                        id, device, at_ms, ..
                    } if summary.until_delivered == Some(*id) && summary.delivered.is_none() => {
                        summary.delivered = Some(super::model::DeliveredTo {
                            device: device.clone(),
                            at_ms: *at_ms,
                        });
                    }
                    Event::Pending(id) => {
                        summary.touched.insert(id.clone());
                        summary.recent.insert(id.clone());
                        continue;
                    }
                    _ => {}
                }
                let seq = match &e {
                    Event::Message { delivery, .. } => *delivery,
                    _ => None,
                };
                if summary.output_failed {
                    continue;
                }
                match on_event(e) {
                    Shown::Yes => shown.extend(seq),
                    Shown::Later => {}
                    Shown::Failed => summary.output_failed = true,
                }
            }
        }
        for (token, msg_id) in last {
            watch.ack(token, msg_id);
            if watch.useless[token] > MAX_USELESS_IN_A_ROW && !watch.done[token] {
                // A relay that feeds junk or replays without end must not
                // keep `tern recv` (or a cron job) running for ever.
                watch.done[token] = true;
                let _ = on_event(Event::Warning(format!(
                    "relay {} keeps delivering messages that cannot be used (junk or replays); \
                     stopped reading that queue for now",
                    watch.queues[token].relay.label()
                )));
            }
        }
        self.delivered(&shown)
    }
}

/// The receiving queues of one contact: every connection's (current,
/// rotating, retired; the one a re-key replaced; re-key invitations'), as
/// its summary lists them.
fn contact_queue_refs(c: &Contact) -> Vec<Arc<QueueRef>> {
    records::Summary::queues_of(c)
        .map(|q| Arc::new(QueueRef::new(&c.id, q)))
        .collect()
}

/// [`contact_queue_refs`] from a contact's summary.
fn glance_queue_refs(g: &records::Glance) -> Vec<Arc<QueueRef>> {
    g.summary
        .queues
        .iter()
        .map(|q| {
            Arc::new(QueueRef {
                contact_id: g.id.clone(),
                relay: q.relay.clone(),
                recipient_id: q.recipient_id,
                auth: q.auth.clone(),
                signer: std::sync::OnceLock::new(),
                queue_secret: q.queue_secret.clone(),
            })
        })
        .collect()
}

/// Processes a device link request kept by [`super::devices::hold_request`]
/// (for `tern device confirm`), as if it had just arrived on `queue`.
pub(crate) fn process_held(
    tx: &Tx<'_>,
    contact_id: &str,
    queue: &crate::proto::connection::RecvQueue,
    message: &[u8],
    now: u64,
    linking: Option<&str>,
) -> Result<Vec<Event>, StoreError> {
    process_inner(
        tx,
        &QueueRef::new(contact_id, queue),
        message,
        now,
        linking,
        &mut Vec::new(),
    )
}

/// Stores one delivered (and decrypted) message inside `tx`; `Ok` means it
/// may be acknowledged once `tx` has committed. Runs in a savepoint of its
/// own: an `Err` leaves no trace of it. `linking` is the device link this
/// process may complete (see [`Client::linking`]). The ids of the texts and
/// file offers from a contact it stored go to `stored` (for receipts).
fn process_inner(
    tx: &Tx<'_>,
    q: &QueueRef,
    message: &[u8],
    now: u64,
    linking: Option<&str>,
    stored: &mut Vec<[u8; 16]>,
) -> Result<Vec<Event>, StoreError> {
    let id = q.contact_id.clone();
    let settings: Settings = tx.get(SETTINGS)?.ok_or_else(|| {
        abort(ClientError::Invalid(
            "the profile has no settings: it was not fully initialised".into(),
        ))
    })?;
    let Some(mut c) = records::load(tx, &id)? else {
        // Forgotten meanwhile.
        return Ok(Vec::new());
    };
    let seen = seen_set(&id);
    let rid = &q.recipient_id;
    let which = if c.conn.recv_queue(rid).is_some() {
        Which::Current
    } else if c
        .old
        .as_ref()
        .is_some_and(|o| o.conn.recv_queue(rid).is_some())
    {
        Which::Old
    } else if let Some(i) = c.rekeys.iter().position(|r| r.recv_queue(rid).is_some()) {
        Which::Rekey(i)
    } else {
        // A queue this contact no longer uses.
        return Ok(Vec::new());
    };
    let queues_before = super::devices::queue_ids(&c);
    let conn = match which {
        Which::Current => &mut c.conn,
        Which::Old => &mut c.old.as_mut().expect("checked").conn,
        Which::Rekey(i) => &mut c.rekeys[i],
    };
    if let Some(d) = conn.digest_of(rid, message) {
        if tx.seen(&seen, &d)? {
            return Ok(Vec::new());
        }
    }
    let state_before = conn.state;
    // Our other devices know this device by its name alone.
    let profile = if c.device {
        super::devices::device_profile(&settings)
    } else {
        settings.profile.clone()
    };
    if which == Which::Current && state_before == ConnState::Invited {
        if c.expired(now) {
            // A late answer to an invitation or link whose time is up.
            super::devices::withdraw(&mut c);
            records::save(tx, &c)?;
            return Ok(vec![
                Event::Warning(format!(
                    "refused an answer to {} {}: it had expired; it is withdrawn now",
                    if c.device {
                        "device link"
                    } else {
                        "the invitation for"
                    },
                    c.name
                )),
                Event::Pending(id),
            ]);
        }
        if c.is_pending_link() && !c.removed {
            if linking != Some(id.as_str()) {
                // No linking command runs (a cron job's recv): keep it for
                // the user to confirm.
                return super::devices::hold_request(tx, &mut c, rid, message, &profile, now)
                    .map_err(abort);
            }
            if let (Some(h), Some(d)) = (c.held.first(), c.conn.digest_of(rid, message)) {
                if h.digest != d {
                    return super::devices::device_link_copied(tx, &mut c).map_err(abort);
                }
            }
            c.held.clear();
            c.link_confirmed = true;
        }
    }
    let conn = match which {
        Which::Current => &mut c.conn,
        Which::Old => &mut c.old.as_mut().expect("checked").conn,
        Which::Rekey(i) => &mut c.rekeys[i],
    };
    let received = match conn.receive(rid, message, &profile, now, &mut OsRng) {
        Ok(r) => r,
        Err(ProtoError::Duplicate) => return Ok(Vec::new()),
        Err(ProtoError::InvitationReused) => {
            // Once per request, not once per relay copy.
            if let Some(d) = c.conn.digest_of(rid, message) {
                tx.mark_seen(&seen, &d)?;
            }
            if c.device {
                return super::devices::device_link_copied(tx, &mut c).map_err(abort);
            }
            return Ok(vec![Event::Warning(format!(
                "refused a second request for the one-time invitation you made for {}: \
                 someone may have copied the invitation on its way (or a relay made \
                 the request up); compare security codes with `tern verify`",
                c.name
            ))]);
        }
        Err(ProtoError::UnsupportedVersion(v)) => {
            // Kept, not dropped: a newer tern can read it later.
            if let Some(d) = conn.digest_of(rid, message) {
                tx.mark_seen(&seen, &d)?;
            }
            tx.append(
                &deferred_log(&id),
                &Deferred {
                    recipient_id: *rid,
                    message: message.to_vec(),
                    received_at_ms: now,
                },
            )?;
            return Ok(vec![Event::Warning(format!(
                "{} sent a message that needs a newer tern (protocol version {v}); \
                 it is kept for when you upgrade",
                c.name
            ))]);
        }
        Err(e) => {
            return Ok(vec![Event::Warning(format!(
                "dropped a message for {} that could not be accepted: {e}",
                c.name
            ))])
        }
    };
    let was_connected = which != Which::Current || state_before == ConnState::Connected;
    tx.mark_seen(&seen, &received.digest)?;
    c.last_activity_ms = now;
    // The peer is there after all (its relays refused our messages for a
    // while): deliveries go on.
    c.peer_gone = false;
    let mut events = Vec::new();
    // Other records this message made work for (device messages).
    let mut others: Vec<String> = Vec::new();
    if which == Which::Current && state_before == ConnState::Invited {
        if c.device {
            events.push(Event::Notice(
                "a new device took up your device link".to_string(),
            ));
        } else if !c.introduced {
            events.push(Event::Notice(format!(
                "{} took up your invitation; the connection completes when they next run `tern recv`",
                c.name
            )));
        }
    }
    match which {
        Which::Current => push_actions(&mut c, received.actions, now),
        Which::Old => {
            let generation = c.old.as_ref().map_or(0, |o| o.generation);
            push_actions_for(&mut c, generation, received.actions, now);
        }
        Which::Rekey(i) => {
            // The contact accepted one of our re-key invitations:
            // its connection takes over, the old one drains, and
            // the other invitations are void: their queues join
            // the old connection's, drained and deleted with it.
            let new = c.rekeys.remove(i);
            for q in std::mem::take(&mut c.rekeys)
                .into_iter()
                .flat_map(|r| r.recv_queues)
            {
                c.jobs.push(Job::DeleteQueue {
                    recipient_id: q.recipient_id,
                    generation: c.generation,
                });
                c.conn.retired_queues.push(q);
            }
            c.replace_connection(new);
            push_actions(&mut c, received.actions, now);
            events.push(Event::Notice(format!(
                "{} accepted the re-key invitation: new keys and queues",
                c.name
            )));
        }
    }
    match received.incoming {
        Incoming::Text {
            envelope,
            text,
            chain,
        } => {
            let entry = HistoryEntry {
                dir: Direction::In,
                id: envelope.id,
                text,
                sent_at_ms: envelope.sent_at_ms,
                received_at_ms: Some(now),
                device: None,
            };
            let group = c.group().to_string();
            let new = super::devices::record_history(tx, &group, &entry)?;
            if !c.device {
                // Stored here, new or not (another device of ours may have
                // copied it first): the contact hears this device has it.
                stored.push(envelope.id);
            }
            if new && !c.device {
                // Answered ADDs are remembered a week: late messages sent
                // before the answer may still come.
                c.add_watch.retain(|w| {
                    w.boundary.is_none()
                        || now.saturating_sub(w.since_ms) < super::devices::WATCH_KEEP_MS
                });
                others.extend(super::devices::copy_to_devices(
                    tx,
                    &id,
                    &group,
                    &entry,
                    Some((&c, envelope.seq)),
                    now,
                )?);
            }
            if let ChainStatus::Gap { missing } = chain {
                events.push(Event::Warning(format!(
                    "{missing} earlier message(s) from {} have not arrived (yet)",
                    c.name
                )));
            }
            if new {
                events.push(Event::Message {
                    contact: c.name.clone(),
                    entry,
                    chain,
                    delivery: None,
                });
            } else {
                // Another device of ours copied it here first.
                others.push(id.clone());
            }
        }
        Incoming::Connected { profile } => {
            if c.provisional_name && !profile.name.trim().is_empty() {
                let name = Client::unique_name(tx, profile.name.trim(), &c.id)?;
                Client::rename_in(tx, &mut c, name)?;
                c.provisional_name = false;
            }
            flush_outbox(&mut c, now).map_err(abort)?;
            if c.introduced && which == Which::Current {
                events.push(Event::Notice(super::devices::gained_device(tx, &c)?));
            }
            events.push(Event::Connected {
                contact: c.name.clone(),
            });
        }
        Incoming::ProfileUpdated { .. } => events.push(Event::ProfileUpdated {
            contact: c.name.clone(),
        }),
        Incoming::Refused { what, reason } => events.push(Event::Refused {
            contact: c.name.clone(),
            what,
            reason: reason.to_string(),
        }),
        Incoming::Unsupported { kind } => events.push(Event::Unsupported {
            contact: c.name.clone(),
            kind,
        }),
        Incoming::File { envelope, offer } => {
            events.extend(super::files::receive_offer(tx, &c, &envelope, &offer, now)?);
            if !c.device {
                stored.push(envelope.id);
            }
        }
        Incoming::Receipt { receipt } => {
            events.extend(super::receipts::apply_receipt(tx, &c, &receipt, now)?);
        }
        Incoming::Device { body, seq } => {
            // Authentic (it decrypted), so never counted as junk.
            others.push(id.clone());
            others.extend(
                super::devices::on_device_message(
                    tx,
                    &mut c,
                    &settings,
                    &body,
                    seq,
                    now,
                    &mut events,
                )
                .map_err(abort)?,
            )
        }
        Incoming::ResyncStarted { reason } => events.push(Event::Warning(format!(
            "a message from {} did not fit the conversation ({reason}): the two sides' \
             encryption lost step, as it does when a profile is restored from a backup or \
             copied; restarting it with them",
            c.name
        ))),
        Incoming::Resynced(r) if r.forked => events.push(Event::Warning(format!(
            "another copy of this profile (a restored backup, a VM snapshot or a copied home) \
             sent messages to {} in your name, so your side of the conversation forked; \
             encryption with them was restarted and {} of your messages sent again. Use each \
             profile from one place only (`tern device link` adds a device)",
            c.name, r.resent
        ))),
        Incoming::Resynced(r) => events.push(Event::Notice(format!(
            "encryption with {} was restarted after it lost step; {} message(s) sent again",
            c.name, r.resent
        ))),
        Incoming::RotationRequested => c.rotation_wanted = true,
        Incoming::RotationStep => {}
        // The retired queues' deletion came as actions.
        Incoming::PeerSwitched => {}
        Incoming::PeerLeftPrevious => {
            if which == Which::Current {
                peer_left_old_connection(&mut c);
            }
        }
        Incoming::Nothing => {}
    }
    let just_connected = which == Which::Current
        && state_before != ConnState::Connected
        && c.conn.state == ConnState::Connected;
    if just_connected {
        others.extend(
            super::devices::on_connected(tx, &mut c, &settings, now, &mut events).map_err(abort)?,
        );
    }
    if !was_connected && c.conn.state == ConnState::Connected {
        // Connected without a Confirm (its copy was lost or is
        // late): the first message of the peer proved it.
        flush_outbox(&mut c, now).map_err(abort)?;
        if !events.iter().any(|e| matches!(e, Event::Connected { .. })) {
            events.insert(
                0,
                Event::Connected {
                    contact: c.name.clone(),
                },
            );
        }
    }
    settle_old_connection(&mut c, now).map_err(abort)?;
    if !just_connected {
        // Rotation steps and re-keys move our queues.
        others.extend(
            super::devices::announce_if_changed(tx, &mut c, &queues_before, now).map_err(abort)?,
        );
    }
    records::save(tx, &c)?;
    events.extend(others.into_iter().map(Event::Pending));
    Ok(events)
}

/// Which of a contact's connections a queue belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    /// The one a re-key replaced, draining.
    Old,
    /// A re-key invitation we made (its index), not yet accepted.
    Rekey(usize),
}
