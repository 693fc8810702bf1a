//! Carrying out stored jobs: securing our queues and uploading messages to
//! every queue of the peer. Results are written back in a transaction, so a
//! job interrupted by a crash or an outage is simply run again later (the
//! receiver drops the copies).
//!
//! Each job names the connection it belongs to by generation: after a
//! re-key, the old connection's jobs still go out through the old queues.

use std::collections::{HashMap, HashSet};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_wire::address::RelayAddress;
use tern_wire::{Command, ErrorCode, Id, Reply};

use super::model::{Contact, Job, Queued};
use super::{Client, ClientError};
use crate::net::{Call, NetError, Targeted};
use crate::proto::connection::{Action, ConnState};

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
    /// Permanent failures, said once: the peer's queues are gone.
    pub notices: Vec<String>,
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
        if super::receipts::receipts_ready(&contact) {
            // The receipts owed become one upload, stored before it goes.
            let now = super::now();
            contact = self.update_contact(id, |_, c| {
                super::receipts::encrypt_owed(c, now);
                Ok(c.clone())
            })?;
        }
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
        // First every command of every job, then all of them at once: one
        // round trip per relay session, however many jobs there are.
        let mut ops: Vec<Op> = Vec::new();
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
                    ops.push(Op {
                        relay: q.relay.clone(),
                        queue: q.recipient_id,
                        command: Command::Secure {
                            recipient_id: q.recipient_id,
                            sender_auth,
                        },
                        key: Some(q.signing_key()),
                        kind: OpKind::Secure {
                            generation,
                            recipient_id: *recipient_id,
                        },
                    });
                }
                Job::DeleteQueue { recipient_id, .. } => {
                    let Some(q) = conn.recv_queue(recipient_id) else {
                        done_queue_jobs.push((generation, *recipient_id));
                        continue;
                    };
                    // Deleted only if empty, checked by the relay in one
                    // step: a message still there is received first.
                    ops.push(Op {
                        relay: q.relay.clone(),
                        queue: q.recipient_id,
                        command: Command::Delete {
                            recipient_id: q.recipient_id,
                            if_empty: true,
                        },
                        key: Some(q.signing_key()),
                        kind: OpKind::Delete {
                            generation,
                            recipient_id: *recipient_id,
                        },
                    });
                }
                Job::Deliver {
                    envelope_id,
                    payload,
                    signed,
                    raw,
                    pending,
                    ..
                } => {
                    delivered.entry((generation, *envelope_id)).or_default();
                    for &i in pending {
                        let Some(q) = conn.peer_queues.get(i) else {
                            continue;
                        };
                        let message = if *raw {
                            payload.clone()
                        } else {
                            match conn.queue_message(i, payload, &mut OsRng) {
                                Ok(m) => m,
                                Err(_) => continue,
                            }
                        };
                        ops.push(Op {
                            relay: q.relay.clone(),
                            queue: q.sender_id,
                            command: Command::Send {
                                sender_id: q.sender_id,
                                message,
                            },
                            key: signed.then(|| q.signing_key()),
                            kind: OpKind::Deliver {
                                generation,
                                envelope_id: *envelope_id,
                                sender_id: q.sender_id,
                                signed: *signed,
                            },
                        });
                    }
                }
            }
        }
        let results = self.execute(&ops);
        // Per (generation, envelope id): queues tried, and refused because
        // the queue is gone.
        let mut tried: HashMap<(u32, [u8; 16]), (usize, usize)> = HashMap::new();
        for (op, result) in ops.iter().zip(results) {
            match &op.kind {
                // A failure does not hold back the jobs after it: the peer's
                // signed sends to this queue are refused until it is
                // secured (this job is retried), and reach us through the
                // other queues meanwhile; one relay that is down must not
                // stall the conversation.
                OpKind::Secure {
                    generation,
                    recipient_id,
                } => match result {
                    Ok(_) => done_queue_jobs.push((*generation, *recipient_id)),
                    Err(e) => report.errors.push(e),
                },
                OpKind::Delete {
                    generation,
                    recipient_id,
                } => match result {
                    // Gone already counts as done (an earlier run's answer
                    // was lost).
                    Ok(_)
                    | Err(NetError::Refused {
                        code: ErrorCode::Auth,
                        ..
                    }) => {
                        done_queue_jobs.push((*generation, *recipient_id));
                        forget.push((*generation, *recipient_id));
                    }
                    Err(e) if e.code() == Some(ErrorCode::NotEmpty) => {}
                    Err(e) => report.errors.push(e),
                },
                OpKind::Deliver {
                    generation,
                    envelope_id,
                    sender_id,
                    signed,
                } => {
                    let key = (*generation, *envelope_id);
                    let count = tried.entry(key).or_default();
                    count.0 += 1;
                    let done = delivered.entry(key).or_default();
                    match result {
                        Ok(_) => {
                            done.push(*sender_id);
                            accepted.insert(key);
                        }
                        // Refused: an unsigned upload finds the queue used
                        // (our earlier try, whose answer was lost) or gone;
                        // a signed one finds it gone (the relay says
                        // NotSecured for a queue not secured yet). Either
                        // way retrying cannot help.
                        Err(NetError::Refused {
                            code: ErrorCode::Auth,
                            ..
                        }) => {
                            // An unsigned upload is not needed there (our
                            // earlier try took the slot, or the queue was
                            // secured); a signed one stays, tried again.
                            if !*signed {
                                done.push(*sender_id);
                            }
                            count.1 += 1;
                        }
                        Err(e) => report.errors.push(e),
                    }
                }
            }
        }
        // Whether the peer's queues (of the current connection) are gone:
        // Some(true) when every delivery of this run was refused as to a
        // queue that does not exist, Some(false) when one got through.
        let mut gone: Option<bool> = None;
        for job in &contact.jobs {
            let Job::Deliver {
                envelope_id,
                signed,
                delivered_any,
                generation,
                ..
            } = job
            else {
                continue;
            };
            let key = (*generation, *envelope_id);
            let Some(&(n, refused)) = tried.get(&key) else {
                continue;
            };
            if *signed && *generation == contact.generation && n > 0 {
                // Every queue of the peer refused it as unknown: the peer
                // deleted the connection (forgot us, or was removed).
                let all_refused = refused == n && !accepted.contains(&key);
                gone = Some(gone.unwrap_or(true) && all_refused);
            }
            if n > 0 && refused == n && !*delivered_any && !accepted.contains(&key) && !*signed {
                report.refused.push(*envelope_id);
            }
        }
        if gone == Some(true) && !contact.peer_gone {
            report.notices.push(format!(
                "{} deleted this connection: nothing you send reaches them any more                  (`tern forget {}` removes them here)",
                contact.name, contact.name
            ));
        }
        let now = super::now();
        // What the relays took: lost only to a power cut before the next
        // commit, and then the jobs run again, which the relays and the
        // peer take as the repeats they are (as after a kill between the
        // upload and this commit). A send is two commits, and this is the
        // one its caller need not wait for.
        let waiting = self.update_contact_lazily(id, |_, c| {
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
            // Said once; the deliveries are kept and tried again quietly, so
            // that a relay that lied (or a peer that comes back through a
            // restored relay) costs nothing.
            if let Some(g) = gone {
                c.peer_gone = g;
            }
            settle_old_connection(c, now)?;
            Ok(c.jobs.len())
        })?;
        report.waiting = waiting;
        // A removed device's record, once the news of its removal went out.
        self.forget_if_removed(id)?;
        Ok(report)
    }

    /// Runs the commands, one round trip per relay session.
    fn execute(&self, ops: &[Op]) -> Vec<Result<Reply, NetError>> {
        self.net.run_all(
            ops.iter()
                .map(|op| Targeted {
                    relay: &op.relay,
                    queue: Some(op.queue),
                    call: Call {
                        command: op.command.clone(),
                        key: op.key.as_ref(),
                    },
                })
                .collect(),
        )
    }
}

/// One relay command of a job run.
struct Op {
    relay: RelayAddress,
    /// The queue it is for: with `--isolate`, its own session.
    queue: Id,
    command: Command,
    key: Option<SigningKey>,
    kind: OpKind,
}

enum OpKind {
    Secure {
        generation: u32,
        recipient_id: Id,
    },
    Delete {
        generation: u32,
        recipient_id: Id,
    },
    Deliver {
        generation: u32,
        envelope_id: [u8; 16],
        sender_id: Id,
        signed: bool,
    },
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
