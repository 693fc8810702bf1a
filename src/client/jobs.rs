//! Carrying out stored jobs: securing our queues and uploading messages to
//! every queue of the peer. Results are written back in a transaction, so a
//! job interrupted by a crash or an outage is simply run again later (the
//! receiver drops the copies).

use std::collections::HashMap;

use rand::rngs::OsRng;
use tern_relay::wire::{Command, ErrorCode};

use super::model::{Contact, Job, Queued};
use super::{Client, ClientError};
use crate::net::NetError;
use crate::proto::connection::{Action, ConnState};

/// Unacknowledged work older than this is given up: the relays' own TTL has
/// passed, so the peer could not get it anyway.
const JOB_EXPIRY_MS: u64 = 21 * 24 * 3600 * 1000;

#[derive(Debug, Default)]
pub struct JobReport {
    /// Jobs still waiting after this run.
    pub waiting: usize,
    pub errors: Vec<NetError>,
}

impl JobReport {
    /// Whether every failure may go away by itself (relays down or full).
    pub fn all_transient(&self) -> bool {
        self.errors.iter().all(NetError::is_transient)
    }
}

/// Turns protocol actions into stored jobs.
pub fn push_actions(contact: &mut Contact, actions: Vec<Action>, now_ms: u64) {
    for a in actions {
        match a {
            Action::Secure { queue } => contact.jobs.push(Job::Secure { queue }),
            Action::Deliver {
                envelope_id,
                ratchet_msg,
                signed,
            } => contact.jobs.push(Job::Deliver {
                envelope_id,
                payload: ratchet_msg,
                signed,
                raw: false,
                pending: (0..contact.conn.peer_queues.len()).collect(),
                created_ms: now_ms,
            }),
        }
    }
}

/// Once connected, encrypts everything that waited in the outbox.
pub fn flush_outbox(contact: &mut Contact, now_ms: u64) -> Result<(), ClientError> {
    if contact.conn.state != ConnState::Connected || contact.outbox.is_empty() {
        return Ok(());
    }
    let queued: Vec<Queued> = std::mem::take(&mut contact.outbox);
    for q in queued {
        let action = contact
            .conn
            .encrypt(q.kind, q.id, q.body, now_ms, &mut OsRng)?;
        push_actions(contact, vec![action], now_ms);
    }
    Ok(())
}

/// Whether a job for `envelope_id` reached at least one relay (or is gone,
/// which means it reached all of them).
pub fn reached_a_relay(contact: &Contact, envelope_id: &[u8; 16]) -> bool {
    let waiting_in_outbox = contact.outbox.iter().any(|q| &q.id == envelope_id);
    let job = contact.jobs.iter().find_map(|j| match j {
        Job::Deliver {
            envelope_id: e,
            pending,
            ..
        } if e == envelope_id => Some(pending.len()),
        _ => None,
    });
    !waiting_in_outbox && job.is_none_or(|pending| pending < contact.conn.peer_queues.len())
}

impl Client {
    /// Runs the jobs of contact `id` against the relays.
    pub fn run_jobs(&mut self, id: &str) -> Result<JobReport, ClientError> {
        let contact = self.contact(id)?;
        if contact.jobs.is_empty() {
            return Ok(JobReport::default());
        }
        let mut report = JobReport::default();
        let mut secured: Vec<usize> = Vec::new();
        let mut delivered: HashMap<[u8; 16], Vec<usize>> = HashMap::new();
        for job in &contact.jobs {
            match job {
                Job::Secure { queue } => {
                    let Some(q) = contact.conn.recv_queues.get(*queue) else {
                        secured.push(*queue);
                        continue;
                    };
                    let Some(sender_auth) = q.secured_with else {
                        secured.push(*queue);
                        continue;
                    };
                    let cmd = Command::Secure {
                        recipient_id: q.recipient_id,
                        sender_auth,
                    };
                    match self.net.call(&q.relay, &cmd, Some(&q.signing_key())) {
                        Ok(_) => secured.push(*queue),
                        Err(e) => {
                            // Later deliveries may depend on this queue being
                            // secured (the handshake reply): stop here.
                            report.errors.push(e);
                            break;
                        }
                    }
                }
                Job::Deliver {
                    envelope_id,
                    payload,
                    signed,
                    raw,
                    pending,
                    ..
                } => {
                    let outcomes = self.deliver(&contact, payload, *signed, *raw, pending);
                    let done = delivered.entry(*envelope_id).or_default();
                    for (queue, outcome) in outcomes {
                        match outcome {
                            Ok(()) => done.push(queue),
                            // An unsigned upload refused: the queue already
                            // holds its one unsigned message (our earlier try,
                            // whose answer was lost) or is gone. Either way
                            // retrying cannot help.
                            Err(e) if !*signed && e.code() == Some(ErrorCode::Auth) => {
                                done.push(queue)
                            }
                            Err(e) => report.errors.push(e),
                        }
                    }
                }
            }
        }
        let now = super::now();
        let waiting = self.update_contact(id, |_, c| {
            let mut secured = secured.clone();
            c.jobs.retain_mut(|job| match job {
                Job::Secure { queue } => match secured.iter().position(|q| q == queue) {
                    Some(i) => {
                        secured.remove(i);
                        false
                    }
                    None => true,
                },
                Job::Deliver {
                    envelope_id,
                    pending,
                    created_ms,
                    ..
                } => {
                    if let Some(done) = delivered.get(envelope_id) {
                        pending.retain(|q| !done.contains(q));
                    }
                    !pending.is_empty() && now.saturating_sub(*created_ms) < JOB_EXPIRY_MS
                }
            });
            Ok(c.jobs.len())
        })?;
        report.waiting = waiting;
        Ok(report)
    }

    /// Uploads one payload to the given peer queues in parallel.
    fn deliver(
        &self,
        contact: &Contact,
        payload: &[u8],
        signed: bool,
        raw: bool,
        queues: &[usize],
    ) -> Vec<(usize, Result<(), NetError>)> {
        std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter()
                .filter_map(|&i| {
                    let q = contact.conn.peer_queues.get(i)?;
                    let message = if raw {
                        payload.to_vec()
                    } else {
                        contact.conn.queue_message(i, payload, &mut OsRng).ok()?
                    };
                    let net = &self.net;
                    Some(s.spawn(move || {
                        let key = signed.then(|| q.signing_key());
                        let cmd = Command::Send {
                            sender_id: q.sender_id,
                            message,
                        };
                        (i, net.call(&q.relay, &cmd, key.as_ref()).map(|_| ()))
                    }))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }
}
