//! Carrying out stored jobs: securing our queues and uploading messages to
//! every queue of the peer. Results are written back in a transaction, so a
//! job interrupted by a crash or an outage is simply run again later (the
//! receiver drops the copies).
//!
//! Each job names the connection it belongs to by generation: after a
//! re-key, the old connection's jobs still go out through the old queues.

use std::collections::{HashMap, HashSet};

use rand::rngs::OsRng;
use tern_relay::wire::{Command, ErrorCode, Id, Reply};

use super::model::{Contact, Job, Queued};
use super::{Client, ClientError};
use crate::net::NetError;
use crate::proto::connection::{Action, ConnState, Connection, RecvQueue};

/// Unacknowledged work older than this is given up: the relays' own TTL has
/// passed, so the peer could not get it anyway.
const JOB_EXPIRY_MS: u64 = 21 * 24 * 3600 * 1000;

#[derive(Debug, Default)]
pub struct JobReport {
    /// Jobs still waiting after this run.
    pub waiting: usize,
    pub errors: Vec<NetError>,
    /// Unsigned uploads (connection requests) that every queue refused and
    /// none ever took: the invitation was used up or withdrawn.
    pub refused: Vec<[u8; 16]>,
}

impl JobReport {
    /// The errors, for a message to the user.
    pub fn describe(&self) -> String {
        let all: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        all.join("; ")
    }
}

/// Turns protocol actions of the current connection into stored jobs.
pub fn push_actions(contact: &mut Contact, actions: Vec<Action>, now_ms: u64) {
    let generation = contact.generation;
    push_actions_for(contact, generation, actions, now_ms);
}

/// Turns protocol actions of connection `generation` into stored jobs.
pub fn push_actions_for(contact: &mut Contact, generation: u32, actions: Vec<Action>, now_ms: u64) {
    let peers = contact
        .conn_for(generation)
        .map_or(0, |c| c.peer_queues.len());
    for a in actions {
        match a {
            Action::Secure { recipient_id } => contact.jobs.push(Job::Secure {
                recipient_id,
                generation,
            }),
            Action::DeleteQueue { recipient_id } => contact.jobs.push(Job::DeleteQueue {
                recipient_id,
                generation,
            }),
            Action::Switched => retarget(contact, generation, peers),
            Action::Deliver {
                envelope_id,
                ratchet_msg,
                signed,
            } => contact.jobs.push(Job::Deliver {
                envelope_id,
                payload: ratchet_msg,
                signed,
                raw: false,
                pending: (0..peers).collect(),
                created_ms: now_ms,
                delivered_any: false,
                generation,
            }),
        }
    }
}

/// After the peer's queues were replaced: a delivery that some old queue
/// already holds will be drained from there; one that reached none goes to
/// the new queues instead.
fn retarget(contact: &mut Contact, generation: u32, peers: usize) {
    let all: Vec<usize> = (0..peers).collect();
    contact.jobs.retain_mut(|job| match job {
        Job::Deliver { generation: g, .. } if *g != generation => true,
        Job::Deliver {
            delivered_any: true,
            ..
        } => false,
        Job::Deliver {
            pending,
            raw: false,
            ..
        } => {
            pending.clone_from(&all);
            true
        }
        _ => true,
    });
}

/// Once connected, encrypts everything that waited in the outbox.
pub fn flush_outbox(contact: &mut Contact, now_ms: u64) -> Result<(), ClientError> {
    if contact.conn.state != ConnState::Connected || contact.outbox.is_empty() {
        return Ok(());
    }
    let queued: Vec<Queued> = std::mem::take(&mut contact.outbox);
    for q in queued {
        let sent_at = if q.created_ms > 0 {
            q.created_ms
        } else {
            now_ms
        };
        let action = contact
            .conn
            .encrypt(q.kind, q.id, q.body, sent_at, &mut OsRng)?;
        push_actions(contact, vec![action], now_ms);
    }
    Ok(())
}

/// After a re-key: once the new connection is up and nothing is left to
/// send on the old one, tell the peer; once the peer said the same and the
/// old queues are gone, drop the old connection.
pub fn settle_old_connection(contact: &mut Contact, now_ms: u64) -> Result<(), ClientError> {
    let Some(old) = &contact.old else {
        return Ok(());
    };
    let old_gen = old.generation;
    let old_jobs = contact
        .jobs
        .iter()
        .any(|j| j.generation() == old_gen && matches!(j, Job::Deliver { .. }));
    if !old.told_peer && !old_jobs && contact.conn.state == ConnState::Connected {
        let action = contact.conn.announce_retired(now_ms, &mut OsRng)?;
        push_actions(contact, vec![action], now_ms);
        if let Some(o) = contact.old.as_mut() {
            o.told_peer = true;
        }
    }
    let old = contact.old.as_ref().expect("checked above");
    let drained = old.conn.all_recv_queues().next().is_none();
    if old.told_peer
        && old.peer_done
        && drained
        && !contact.jobs.iter().any(|j| j.generation() == old_gen)
    {
        contact.old = None;
    }
    Ok(())
}

/// The peer sends nothing more to the old connection's queues: drain and
/// delete them.
pub fn peer_left_old_connection(contact: &mut Contact) {
    let Some(old) = contact.old.as_mut() else {
        return;
    };
    if old.peer_done {
        return;
    }
    old.peer_done = true;
    let generation = old.generation;
    let queues: Vec<Id> = old.conn.all_recv_queues().map(|q| q.recipient_id).collect();
    for recipient_id in queues {
        contact.jobs.push(Job::DeleteQueue {
            recipient_id,
            generation,
        });
    }
}

/// Whether a job for `envelope_id` reached at least one relay (or is gone,
/// which means it reached all of them).
pub fn reached_a_relay(contact: &Contact, envelope_id: &[u8; 16]) -> bool {
    let waiting_in_outbox = contact.outbox.iter().any(|q| &q.id == envelope_id);
    let job = contact.jobs.iter().find_map(|j| match j {
        Job::Deliver {
            envelope_id: e,
            delivered_any,
            ..
        } if e == envelope_id => Some(*delivered_any),
        _ => None,
    });
    !waiting_in_outbox && job.unwrap_or(true)
}

impl Client {
    /// Runs the jobs of contact `id` against the relays.
    pub fn run_jobs(&mut self, id: &str) -> Result<JobReport, ClientError> {
        let mut contact = self.contact(id)?;
        if !contact.device_jobs.is_empty() {
            self.run_device_jobs(id)?;
            contact = match self.contact(id) {
                Ok(c) => c,
                // A removed device's record, gone with its last job.
                Err(ClientError::UnknownContact(_)) => return Ok(JobReport::default()),
                Err(e) => return Err(e),
            };
        }
        if contact.jobs.is_empty() {
            return Ok(JobReport::default());
        }
        let mut report = JobReport::default();
        let mut done_queue_jobs: Vec<(u32, Id)> = Vec::new();
        let mut forget: Vec<(u32, Id)> = Vec::new();
        // (generation, envelope id) -> sender ids of the peer queues that took it
        let mut delivered: HashMap<(u32, [u8; 16]), Vec<Id>> = HashMap::new();
        // (generation, envelope id) that some queue took in this run
        let mut accepted: HashSet<(u32, [u8; 16])> = HashSet::new();
        for job in &contact.jobs {
            let generation = job.generation();
            let Some(conn) = contact.conn_for(generation) else {
                continue;
            };
            match job {
                Job::Secure { recipient_id, .. } => {
                    let Some(q) = conn.recv_queue(recipient_id) else {
                        done_queue_jobs.push((generation, *recipient_id));
                        continue;
                    };
                    let Some(sender_auth) = q.secured_with else {
                        done_queue_jobs.push((generation, *recipient_id));
                        continue;
                    };
                    let cmd = Command::Secure {
                        recipient_id: q.recipient_id,
                        sender_auth,
                    };
                    // A failure does not hold back the jobs after it: the peer's
                    // signed sends to this queue are refused until it is
                    // secured (this job is retried), and reach us through
                    // the other queues meanwhile; one relay that is down must
                    // not stall the conversation.
                    match self.net.call(&q.relay, &cmd, Some(&q.signing_key())) {
                        Ok(_) => done_queue_jobs.push((generation, *recipient_id)),
                        Err(e) => report.errors.push(e),
                    }
                }
                Job::DeleteQueue { recipient_id, .. } => {
                    let Some(q) = conn.recv_queue(recipient_id) else {
                        done_queue_jobs.push((generation, *recipient_id));
                        continue;
                    };
                    match self.delete_if_empty(q) {
                        Ok(true) => {
                            done_queue_jobs.push((generation, *recipient_id));
                            forget.push((generation, *recipient_id));
                        }
                        Ok(false) => {}
                        Err(e) => report.errors.push(e),
                    }
                }
                Job::Deliver {
                    envelope_id,
                    payload,
                    signed,
                    raw,
                    pending,
                    delivered_any,
                    ..
                } => {
                    let outcomes = self.deliver(conn, payload, *signed, *raw, pending);
                    let tried = outcomes.len();
                    let done = delivered.entry((generation, *envelope_id)).or_default();
                    let mut refused = 0;
                    for (sender_id, outcome) in outcomes {
                        match outcome {
                            Ok(()) => {
                                done.push(sender_id);
                                accepted.insert((generation, *envelope_id));
                            }
                            // An unsigned upload refused: the queue already
                            // holds its one unsigned message (our earlier try,
                            // whose answer was lost) or is gone. Either way
                            // retrying cannot help.
                            Err(e) if !*signed && e.code() == Some(ErrorCode::Auth) => {
                                done.push(sender_id);
                                refused += 1;
                            }
                            Err(e) => report.errors.push(e),
                        }
                    }
                    if tried > 0 && refused == tried && !*delivered_any {
                        report.refused.push(*envelope_id);
                    }
                }
            }
        }
        let now = super::now();
        let waiting = self.update_contact(id, |_, c| {
            for (generation, rid) in &forget {
                if *generation == c.generation {
                    c.conn.forget_queue(rid);
                } else if let Some(o) = c.old.as_mut().filter(|o| o.generation == *generation) {
                    o.conn.forget_queue(rid);
                }
            }
            let mut done_queue_jobs = done_queue_jobs.clone();
            let peer_ids = |c: &Contact, generation: u32| -> Vec<Id> {
                c.conn_for(generation)
                    .map(|conn| conn.peer_queues.iter().map(|q| q.sender_id).collect())
                    .unwrap_or_default()
            };
            let ids: HashMap<u32, Vec<Id>> = c
                .jobs
                .iter()
                .map(|j| j.generation())
                .map(|g| (g, peer_ids(c, g)))
                .collect();
            let live: Vec<u32> = std::iter::once(c.generation)
                .chain(c.old.as_ref().map(|o| o.generation))
                .collect();
            c.jobs.retain_mut(|job| {
                let generation = job.generation();
                if !live.contains(&generation) {
                    return false;
                }
                match job {
                    Job::Secure { recipient_id, .. } | Job::DeleteQueue { recipient_id, .. } => {
                        match done_queue_jobs
                            .iter()
                            .position(|q| *q == (generation, *recipient_id))
                        {
                            Some(i) => {
                                done_queue_jobs.remove(i);
                                false
                            }
                            None => true,
                        }
                    }
                    Job::Deliver {
                        envelope_id,
                        pending,
                        created_ms,
                        delivered_any,
                        ..
                    } => {
                        if let Some(done) = delivered.get(&(generation, *envelope_id)) {
                            // By sender id: if the peer's queues were switched
                            // meanwhile, indices now mean other queues.
                            let peers = &ids[&generation];
                            pending.retain(|&i| peers.get(i).is_none_or(|sid| !done.contains(sid)));
                            *delivered_any |= accepted.contains(&(generation, *envelope_id));
                        }
                        !pending.is_empty() && now.saturating_sub(*created_ms) < JOB_EXPIRY_MS
                    }
                }
            });
            settle_old_connection(c, now)?;
            Ok(c.jobs.len())
        })?;
        report.waiting = waiting;
        // A removed device's record, once the news of its removal went out.
        self.forget_if_removed(id)?;
        Ok(report)
    }

    /// Deletes a retired queue on its relay if nothing is waiting in it;
    /// `Ok(false)` if a message still is (the next fetch takes it first).
    fn delete_if_empty(&self, q: &RecvQueue) -> Result<bool, NetError> {
        let key = q.signing_key();
        let fetch = Command::Fetch {
            recipient_id: q.recipient_id,
            wait_ms: 0,
        };
        match self.net.call(&q.relay, &fetch, Some(&key)) {
            Ok(Reply::Empty) => {}
            Ok(_) => return Ok(false),
            // Gone already (deleted by an earlier run whose answer was lost).
            Err(e) if e.code() == Some(ErrorCode::Auth) => return Ok(true),
            Err(e) => return Err(e),
        }
        let delete = Command::Delete {
            recipient_id: q.recipient_id,
        };
        match self.net.call(&q.relay, &delete, Some(&key)) {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(ErrorCode::Auth) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Uploads one payload to the given peer queues in parallel.
    fn deliver(
        &self,
        conn: &Connection,
        payload: &[u8],
        signed: bool,
        raw: bool,
        queues: &[usize],
    ) -> Vec<(Id, Result<(), NetError>)> {
        std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter()
                .filter_map(|&i| {
                    let q = conn.peer_queues.get(i)?;
                    let message = if raw {
                        payload.to_vec()
                    } else {
                        conn.queue_message(i, payload, &mut OsRng).ok()?
                    };
                    let net = &self.net;
                    Some(s.spawn(move || {
                        let key = signed.then(|| q.signing_key());
                        let cmd = Command::Send {
                            sender_id: q.sender_id,
                            message,
                        };
                        (
                            q.sender_id,
                            net.call(&q.relay, &cmd, key.as_ref()).map(|_| ()),
                        )
                    }))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }
}

/// Stores the job that uploads a connection request (the joiner's first
/// message: unsigned, to every inviter queue) for the contact's current
/// connection; returns its id.
pub fn push_request(contact: &mut Contact, request: Vec<u8>, t: u64) -> [u8; 16] {
    let request_id = super::random_id();
    contact.jobs.push(Job::Deliver {
        envelope_id: request_id,
        pending: (0..contact.conn.peer_queues.len()).collect(),
        payload: request,
        signed: false,
        raw: true,
        created_ms: t,
        delivered_any: false,
        generation: contact.generation,
    });
    request_id
}
