//! Receiving: fetch from every queue of every contact, store what arrives in
//! a store transaction, and only then acknowledge it to its relay.
//!
//! Network work happens on worker threads (one per queue while long-polling,
//! a small pool otherwise); all store work happens on the calling thread, so
//! the store sees a single writer per process. A worker reads a run of up to
//! [`READ_AHEAD`] messages of its queue (FETCH, then PEEK after each), the
//! calling thread stores every run waiting for it in one transaction, each
//! message in a savepoint of its own, and the worker then acknowledges the
//! stored part of its run in one request (ACK_UPTO). A long queue therefore
//! costs one commit and one acknowledgement per run, not per message.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::address::RelayAddress;
use tern_relay::seal::delivery_open;
use tern_relay::wire::{Command, ErrorCode, Id, Reply};

use super::jobs::{
    flush_outbox, peer_left_old_connection, push_actions, push_actions_for, settle_old_connection,
};
use super::model::{
    contact_key, deferred_log, seen_set, Contact, Deferred, Direction, HistoryEntry, Job, Settings,
    SETTINGS,
};
use super::{abort, unwrap_abort, Client, ClientError};
use crate::net::{NetError, RelayClient};
use crate::proto::connection::{ConnState, Incoming};
use crate::proto::envelope::ChainStatus;
use crate::proto::keys::Secret32;
use crate::proto::ProtoError;
use crate::store::{StoreError, Tx};

/// Longest single long-poll asked of a relay; relays cap it too.
const POLL_SLICE_MS: u32 = 25_000;
/// Queues fetched at once when draining without waiting.
const DRAIN_THREADS: usize = 8;
/// In `--follow`, how often to look for new contacts and pending jobs.
const RESCAN: Duration = Duration::from_secs(5);

/// Something the user should hear about.
#[derive(Debug, Clone)]
pub enum Event {
    Message {
        contact: String,
        entry: HistoryEntry,
        chain: ChainStatus,
    },
    Connected {
        contact: String,
    },
    ProfileUpdated {
        contact: String,
    },
    Unsupported {
        contact: String,
        kind: u8,
    },
    Warning(String),
    /// Progress worth a line on stderr (a handshake step, say).
    Notice(String),
    /// Internal: this record has new work to upload (not shown).
    Pending(String),
}

#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Long-poll up to this long for the first message.
    pub wait: Option<Duration>,
    /// Keep receiving until interrupted.
    pub follow: bool,
    /// Only this contact's queues.
    pub contact_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct FetchSummary {
    pub messages: usize,
    /// Connections that completed.
    pub connected: usize,
    /// Contacts that received something since their jobs last ran.
    touched: HashSet<String>,
    /// Queues that could not be fetched.
    pub errors: Vec<NetError>,
    pub queues: usize,
}

/// One queue to fetch from.
struct QueueRef {
    contact_id: String,
    relay: RelayAddress,
    recipient_id: Id,
    signer: SigningKey,
    queue_secret: Secret32,
}

impl QueueRef {
    fn key(&self) -> (String, Id) {
        (self.contact_id.clone(), self.recipient_id)
    }
}

enum FromWorker {
    /// A run of messages from one queue, oldest first, to store together.
    Delivery(Vec<Delivered>),
    Failed {
        error: NetError,
    },
    /// Something the jobs thread has to say.
    Event(Event),
    /// The queue's relay delivered too many unusable messages in a row.
    Flooded {
        queue: Arc<QueueRef>,
    },
    Done,
}

/// What the main thread made of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Stored or acted on.
    Used,
    /// Dropped: a copy already seen, junk, a replay.
    Useless,
    /// Not stored (the store failed): must not be acknowledged.
    NotStored,
}

/// A delivered message waiting to be stored, and its worker waiting to hear
/// whether to acknowledge it.
struct Delivered {
    queue: Arc<QueueRef>,
    msg_id: Id,
    body: Vec<u8>,
    ack: Sender<Verdict>,
}

/// Most messages a worker reads ahead of its acknowledgement (with PEEK),
/// to be stored in one commit and acknowledged with one ACK_UPTO. At 16 KiB
/// each, a run costs at most 1 MiB of memory.
const READ_AHEAD: usize = 64;

/// Messages read ahead with PEEK and not yet acknowledged, across all the
/// workers of this process: 8 MiB at most, however many queues a `recv
/// --follow` watches and however long their backlogs.
static READ_AHEAD_BUDGET: AtomicUsize = AtomicUsize::new(512);

/// Places taken from [`READ_AHEAD_BUDGET`], given back when dropped.
struct ReadAhead(usize);

impl ReadAhead {
    fn take_one(&mut self) -> bool {
        let taken = READ_AHEAD_BUDGET
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        self.0 += usize::from(taken);
        taken
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        READ_AHEAD_BUDGET.fetch_add(self.0, Ordering::AcqRel);
    }
}

/// Beyond this many messages in a batch, no more runs are added to it, so
/// that no message waits long for the others' commit.
const MAX_BATCH: usize = 64;

/// Unusable messages in a row after which a queue is left alone for the
/// rest of the run. Legitimate traffic never comes close: copies arrive once
/// per queue, and handshake or rotation steps are a handful.
const MAX_USELESS_IN_A_ROW: u32 = 64;

#[derive(Clone, Copy)]
struct Mode {
    wait_ms: u32,
    keep_polling: bool,
}

fn worker(
    net: &RelayClient,
    q: Arc<QueueRef>,
    mode: Mode,
    stop: &AtomicBool,
    out: &Sender<FromWorker>,
) {
    let fetch = |wait_ms| {
        net.call(
            &q.relay,
            &Command::Fetch {
                recipient_id: q.recipient_id,
                wait_ms,
            },
            Some(&q.signer),
        )
    };
    let mut reply = fetch(mode.wait_ms);
    let mut backoff = Duration::from_millis(500);
    let mut useless_in_a_row = 0;
    // Until the relay shows that it predates PEEK (it answers BadRequest).
    let mut can_peek = true;
    loop {
        match reply {
            Ok(Reply::Message { msg_id, body, .. }) => {
                // Read ahead, so that the run is stored in one commit and
                // acknowledged in one request instead of one of each per
                // message. (Handing it over in chunks, to store one while
                // reading the next, measured no faster on two cores: the
                // same wall time with chunks of 8, 16 or 32, and more CPU
                // for the extra commits.)
                // Whatever stops the reading (nothing more yet, an error
                // the next request will meet again) ends the run there.
                let first = msg_id;
                let mut run = vec![(msg_id, body)];
                // Held until the run is acknowledged (or abandoned).
                let mut held = ReadAhead(0);
                if can_peek {
                    std::thread::scope(|s| {
                        // Each PEEK waits for the relay; meanwhile a helper
                        // on the other core sets up the next one's HPKE
                        // context. It stops when `contexts` is dropped.
                        let (ready, contexts) = mpsc::sync_channel(1);
                        let relay = &q.relay;
                        s.spawn(move || {
                            while let Some(p) = net.prepare(relay) {
                                if ready.send(p).is_err() {
                                    break;
                                }
                            }
                        });
                        while run.len() < READ_AHEAD
                            && !stop.load(Ordering::Relaxed)
                            && held.take_one()
                        {
                            let peek = Command::Peek {
                                recipient_id: q.recipient_id,
                                after: run[run.len() - 1].0,
                            };
                            let prepared = contexts.recv().ok();
                            match net.call_prepared(&q.relay, &peek, Some(&q.signer), prepared) {
                                Ok(Reply::Message { msg_id, body, .. }) => run.push((msg_id, body)),
                                // A relay that predates PEEK: one message at a time.
                                Err(e) if e.code() == Some(ErrorCode::BadRequest) => {
                                    can_peek = false;
                                    break;
                                }
                                _ => break,
                            }
                        }
                    });
                }
                let mut verdicts = Vec::with_capacity(run.len());
                let batch = run
                    .into_iter()
                    .map(|(msg_id, body)| {
                        let (ack, verdict) = mpsc::channel();
                        verdicts.push((msg_id, verdict));
                        Delivered {
                            queue: q.clone(),
                            msg_id,
                            body,
                            ack,
                        }
                    })
                    .collect();
                if out.send(FromWorker::Delivery(batch)).is_err() {
                    return;
                }
                // The ACK waits for the main thread's commit; meanwhile, on
                // the other core, set up the HPKE context it will be sealed
                // with.
                let prepared = net.prepare(&q.relay);
                // What is acknowledged ends before the first message that
                // was not stored, or that makes one useless message too many.
                let mut last = None;
                let mut stop_here = false;
                let mut flooded = false;
                for (msg_id, verdict) in verdicts {
                    match verdict.recv() {
                        Ok(Verdict::Used) => useless_in_a_row = 0,
                        Ok(Verdict::Useless) => useless_in_a_row += 1,
                        Ok(Verdict::NotStored) | Err(_) => {
                            stop_here = true;
                            break;
                        }
                    }
                    if useless_in_a_row > MAX_USELESS_IN_A_ROW {
                        flooded = true;
                        break;
                    }
                    last = Some(msg_id);
                }
                if let Some(last) = last {
                    // ACK_UPTO only after a PEEK succeeded, so an old relay
                    // never sees it.
                    let ack = if last == first {
                        Command::Ack {
                            recipient_id: q.recipient_id,
                            msg_id: last,
                        }
                    } else {
                        Command::AckUpTo {
                            recipient_id: q.recipient_id,
                            msg_id: last,
                        }
                    };
                    reply = net.call_prepared(&q.relay, &ack, Some(&q.signer), prepared);
                } else {
                    reply = Ok(Reply::Empty);
                }
                if flooded {
                    // A relay that feeds junk or replays without end must
                    // not keep `tern recv` (or a cron job) running for ever.
                    let _ = out.send(FromWorker::Flooded { queue: q.clone() });
                    let _ = out.send(FromWorker::Done);
                    return;
                }
                if stop_here {
                    return;
                }
                if matches!(&reply, Err(e) if e.code() == Some(ErrorCode::NoMessage)) {
                    // Acknowledged meanwhile by another tern process.
                    reply = fetch(0);
                }
            }
            Ok(_) => {
                if mode.keep_polling && !stop.load(Ordering::Relaxed) {
                    reply = fetch(mode.wait_ms);
                } else {
                    let _ = out.send(FromWorker::Done);
                    return;
                }
            }
            // The queue is gone: deleted by a rotation or re-key that another
            // tern process completed after this list was made.
            Err(error) if error.code() == Some(ErrorCode::Auth) => {
                let _ = out.send(FromWorker::Done);
                return;
            }
            Err(error) => {
                let retry =
                    mode.keep_polling && error.is_transient() && !stop.load(Ordering::Relaxed);
                let _ = out.send(FromWorker::Failed { error });
                if !retry {
                    let _ = out.send(FromWorker::Done);
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                reply = fetch(mode.wait_ms);
            }
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
            let old = c.old.iter().flat_map(|o| o.conn.all_recv_queues());
            let rekey = c.rekeys.iter().flat_map(|r| r.recv_queues.iter());
            for q in c.conn.all_recv_queues().chain(old).chain(rekey) {
                out.push(Arc::new(QueueRef {
                    contact_id: c.id.clone(),
                    relay: q.relay.clone(),
                    recipient_id: q.recipient_id,
                    signer: q.signing_key(),
                    queue_secret: q.queue_secret.clone(),
                }));
            }
        }
        Ok(out)
    }

    /// Fetches, stores and acknowledges messages, reporting each through
    /// `on_event` as soon as it is stored.
    pub fn fetch(
        &mut self,
        opts: &FetchOptions,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<FetchSummary, ClientError> {
        let mut summary = FetchSummary::default();
        let only = opts.contact_id.as_deref();
        let waiting = opts.follow || opts.wait.is_some();
        if let Some(e) = self.removed_error()? {
            // Nothing new can come; finish deleting what it still holds.
            self.run_all_jobs(only, on_event)?;
            return Err(e);
        }
        // Invitations and device links past their time are void.
        self.withdraw_expired(on_event)?;
        if !waiting {
            // Work left over from earlier commands (outbox, handshake
            // steps), and queue rotations that are due. (When waiting, a
            // thread of its own does this, so that receiving never waits
            // for an upload to a slow relay.)
            self.run_all_jobs(only, on_event)?;
            self.rotate_due(only, on_event)?;
        }

        let queues = self.queue_refs(only)?;
        summary.queues = queues.len();
        if waiting {
            // A long-poll answers at once when something is waiting, so no
            // separate first pass: it would hold everything up for as long
            // as the slowest relay takes to answer.
            if !queues.is_empty() {
                self.long_poll(opts, queues, &mut summary, on_event)?;
            }
            self.run_all_jobs(only, on_event)?;
            // A peer may have asked for a rotation in what just arrived.
            self.rotate_due(only, on_event)?;
        } else {
            self.drain(&queues, &mut summary, on_event)?;
            // Everything else ran before the drain: only the contacts that
            // just received something can have new work (a handshake step,
            // a rotation the peer asked for). No need to read every record.
            let touched: Vec<String> = std::mem::take(&mut summary.touched).into_iter().collect();
            self.run_jobs_of(&touched, on_event)?;
            self.rotate_due_of(&touched, on_event)?;
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

    fn run_all_jobs(
        &mut self,
        only: Option<&str>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let ids: Vec<String> = self
            .contacts()?
            .into_iter()
            .filter(|c| only.is_none_or(|id| id == c.id))
            .map(|c| c.id)
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
            if !c.jobs.is_empty()
                || !c.device_jobs.is_empty()
                || (c.conn.state == ConnState::Connected && !c.outbox.is_empty())
            {
                pending.push(c.id);
            }
        }
        for id in pending {
            self.update_contact(&id, |_, c| flush_outbox(c, super::now()))?;
            let report = self.run_jobs(&id)?;
            for e in report.errors {
                on_event(Event::Warning(format!("could not deliver yet: {e}")));
            }
        }
        Ok(())
    }

    /// Empties every queue once, without waiting.
    fn drain(
        &mut self,
        queues: &[Arc<QueueRef>],
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let todo = Mutex::new(queues.to_vec());
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        let threads = queues.len().min(DRAIN_THREADS);
        let net = self.net.clone();
        std::thread::scope(|s| -> Result<(), ClientError> {
            for _ in 0..threads {
                let tx = tx.clone();
                let (todo, stop, net) = (&todo, &stop, &net);
                s.spawn(move || loop {
                    let next = todo.lock().ok().and_then(|mut t| t.pop());
                    let Some(q) = next else { break };
                    worker(
                        net,
                        q,
                        Mode {
                            wait_ms: 0,
                            keep_polling: false,
                        },
                        stop,
                        &tx,
                    );
                });
            }
            drop(tx);
            let result = self.consume(&rx, None, summary, on_event);
            stop.store(true, Ordering::Relaxed);
            // Unblock workers waiting for an answer: dropping the receiver
            // makes their sends fail.
            drop(rx);
            result
        })
    }

    /// Long-polls every queue, one thread each, until the first message
    /// (`--wait`) or forever (`--follow`).
    fn long_poll(
        &mut self,
        opts: &FetchOptions,
        mut queues: Vec<Arc<QueueRef>>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let deadline = opts
            .wait
            .filter(|_| !opts.follow)
            .map(|w| Instant::now() + w);
        let wait_ms = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(POLL_SLICE_MS as u128) as u32,
            None => POLL_SLICE_MS,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut started: HashSet<(String, Id)> = HashSet::new();
        let shared_net = self.net.clone();
        let spawn = |q: Arc<QueueRef>, started: &mut HashSet<_>| {
            if !started.insert(q.key()) {
                return;
            }
            let (net, stop, tx) = (shared_net.clone(), stop.clone(), tx.clone());
            let mode = Mode {
                wait_ms,
                keep_polling: opts.follow,
            };
            // Detached on purpose: a `--wait` that got its message returns
            // without waiting for the other long-polls to time out. A message
            // such a poll receives afterwards is not acknowledged, so the
            // relay delivers it again next time.
            std::thread::spawn(move || worker(&net, q, mode, &stop, &tx));
        };
        for q in queues.drain(..) {
            spawn(q, &mut started);
        }
        // Uploads and rotations run beside the receiving, on their own store
        // handle: told which contacts just received something, and on every
        // rescan tick for everything else.
        let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<String>>();
        let mut jobs_client = self.another_handle()?;
        let (only, events_tx) = (opts.contact_id.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut emit = |e: Event| {
                let _ = events_tx.send(FromWorker::Event(e));
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
        let before = summary.messages + summary.connected;
        let result = loop {
            let limit = if opts.follow {
                Some(RESCAN)
            } else {
                deadline.map(|d| d.saturating_duration_since(Instant::now()))
            };
            match self.consume_one(&rx, limit, summary, on_event) {
                Ok(true) => {
                    if !opts.follow && summary.messages + summary.connected > before {
                        // Collect what arrives right behind the first message.
                        let _ =
                            self.consume(&rx, Some(Duration::from_millis(300)), summary, on_event);
                        break Ok(());
                    }
                }
                Ok(false) => {
                    if !opts.follow {
                        break Ok(());
                    }
                    // Pick up contacts made meanwhile by other tern commands,
                    // and new queues from rotations.
                    for q in self.queue_refs(opts.contact_id.as_deref())? {
                        spawn(q, &mut started);
                    }
                }
                Err(e) => break Err(e),
            }
            let touched: Vec<String> = std::mem::take(&mut summary.touched).into_iter().collect();
            if !touched.is_empty() {
                let _ = jobs_tx.send(touched);
            }
        };
        stop.store(true, Ordering::Relaxed);
        result
    }

    /// Handles worker messages until all workers are done, or until nothing
    /// arrived for `idle`.
    fn consume(
        &mut self,
        rx: &Receiver<FromWorker>,
        idle: Option<Duration>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        while self.consume_one(rx, idle, summary, on_event)? {}
        Ok(())
    }

    /// Handles one worker message; `false` when the channel closed or `idle` passed.
    fn consume_one(
        &mut self,
        rx: &Receiver<FromWorker>,
        idle: Option<Duration>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<bool, ClientError> {
        let msg = match idle {
            Some(d) => match rx.recv_timeout(d) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return Ok(false)
                }
            },
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return Ok(false),
            },
        };
        let FromWorker::Delivery(_) = msg else {
            self.handle_other(msg, summary, on_event);
            return Ok(true);
        };
        // Whatever else has already been delivered (other queues' workers
        // kept fetching while the last batch was stored) goes into the same
        // transaction: one commit, one fsync, for all of them.
        let mut batch = Vec::new();
        let mut others = Vec::new();
        let mut next = Some(msg);
        while let Some(m) = next.take() {
            match m {
                FromWorker::Delivery(run) => batch.extend(run),
                other => others.push(other),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let result = self.store_batch(batch, summary, on_event);
        for m in others {
            self.handle_other(m, summary, on_event);
        }
        result.map(|()| true)
    }

    /// Stores a batch of delivered messages in one transaction, each in a
    /// savepoint of its own, then tells each worker whether to acknowledge
    /// its message and reports what arrived. A message whose storing failed
    /// changes nothing and is not acknowledged; the others are committed and
    /// acknowledged as usual, and the first failure is returned afterwards.
    fn store_batch(
        &mut self,
        batch: Vec<Delivered>,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let now = super::now();
        // Decrypting needs no store: done before taking the write lock.
        let opened: Vec<Option<Vec<u8>>> = batch
            .iter()
            .map(|d| delivery_open(d.queue.queue_secret.as_bytes(), &d.msg_id, &d.body).ok())
            .collect();
        let linking = self.linking.clone();
        let committed = self.store.transaction(|tx| {
            Ok(batch
                .iter()
                .zip(&opened)
                .map(|(d, message)| match message {
                    Some(m) => tx.savepoint(|tx| process(tx, &d.queue, m, now, linking.as_deref())),
                    None => Ok(vec![Event::Warning(format!(
                        "relay {} delivered a message that does not decrypt; dropped",
                        d.queue.relay.label()
                    ))]),
                })
                .collect::<Vec<_>>())
        });
        let outcomes = match committed {
            Ok(o) => o,
            Err(e) => {
                // Nothing was stored, so nothing is acknowledged: the relays
                // keep every message of the batch.
                for d in &batch {
                    let _ = d.ack.send(Verdict::NotStored);
                }
                return Err(unwrap_abort(e));
            }
        };
        let mut first_error = None;
        for (d, outcome) in batch.iter().zip(outcomes) {
            summary.touched.insert(d.queue.contact_id.clone());
            match outcome {
                Ok(events) => {
                    let useless = events.iter().all(|e| matches!(e, Event::Warning(_)));
                    let _ = d.ack.send(if useless {
                        Verdict::Useless
                    } else {
                        Verdict::Used
                    });
                    for e in events {
                        match e {
                            Event::Message { .. } => summary.messages += 1,
                            // `--wait` also ends when a connection completes:
                            // that is what `tern invite` tells people to wait for.
                            Event::Connected { .. } => summary.connected += 1,
                            Event::Pending(id) => {
                                summary.touched.insert(id);
                                continue;
                            }
                            _ => {}
                        }
                        on_event(e);
                    }
                }
                Err(e) => {
                    // Not stored, so not acknowledged: the relay keeps it.
                    let _ = d.ack.send(Verdict::NotStored);
                    first_error.get_or_insert(unwrap_abort(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn handle_other(
        &mut self,
        msg: FromWorker,
        summary: &mut FetchSummary,
        on_event: &mut dyn FnMut(Event),
    ) {
        match msg {
            // Handled by `store_batch`.
            FromWorker::Delivery(_) => {}
            FromWorker::Event(e) => on_event(e),
            FromWorker::Flooded { queue } => on_event(Event::Warning(format!(
                "relay {} keeps delivering messages that cannot be used (junk or replays); \
                 stopped reading that queue for now",
                queue.relay.label()
            ))),
            FromWorker::Failed { error } => {
                on_event(Event::Warning(error.to_string()));
                summary.errors.push(error);
            }
            FromWorker::Done => {}
        }
    }
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
    let q = QueueRef {
        contact_id: contact_id.to_string(),
        relay: queue.relay.clone(),
        recipient_id: queue.recipient_id,
        signer: queue.signing_key(),
        queue_secret: queue.queue_secret.clone(),
    };
    process(tx, &q, message, now, linking)
}

/// Stores one delivered (and decrypted) message inside `tx`; `Ok` means it
/// may be acknowledged once `tx` has committed. Runs in a savepoint of its
/// own: an `Err` leaves no trace of it. `linking` is the device link this
/// process may complete (see [`Client::linking`]).
fn process(
    tx: &Tx<'_>,
    q: &QueueRef,
    message: &[u8],
    now: u64,
    linking: Option<&str>,
) -> Result<Vec<Event>, StoreError> {
    let id = q.contact_id.clone();
    let settings: Settings = tx.get(SETTINGS)?.ok_or_else(|| {
        abort(ClientError::Invalid(
            "the profile has no settings: it was not fully initialised".into(),
        ))
    })?;
    let Some(mut c) = tx.get::<Contact>(&contact_key(&id))? else {
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
            tx.put(&contact_key(&id), &c)?;
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
        Incoming::Unsupported { kind } => events.push(Event::Unsupported {
            contact: c.name.clone(),
            kind,
        }),
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
    tx.put(&contact_key(&id), &c)?;
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
