//! Starting queue rotations: on request (`tern rotate`), when the peer asks,
//! and automatically every few days with per-contact jitter so that
//! contacts do not rotate in lockstep (which would let relays pair them up).

use rand::rngs::OsRng;
use rand::Rng;

use super::events::Event;
use super::jobs::{push_actions, JobReport};
use super::model::{Contact, Job};
use super::records::RotationFacts;
use super::{now, Client, ClientError};
use crate::proto::connection::ConnState;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// When the next automatic rotation is due: `days` from now plus up to a
/// quarter of that again, at random.
pub fn next_due(now_ms: u64, days: u32) -> u64 {
    let base = u64::from(days) * DAY_MS;
    now_ms + base + OsRng.gen_range(0..=base / 4)
}

/// A fixed value in `0..=max` drawn from a random hex id.
fn stable_jitter(id: &str, max: u64) -> u64 {
    let n = u64::from_str_radix(&id[..id.len().min(15)], 16).unwrap_or(0);
    n % (max + 1)
}

/// Whether a rotation of contact `id` is due at `now_ms` (by the schedule
/// of every `days`, or because the peer asked), for a connection that may
/// rotate now ([`Contact::rotation_facts`]).
pub(crate) fn due(f: &RotationFacts, id: &str, days: u32, now_ms: u64) -> bool {
    let scheduled = days > 0 && {
        let at = if f.next_ms > 0 {
            f.next_ms
        } else {
            // Before the first rotation: jitter from the contact's random
            // id, so connections made together do not first rotate
            // together.
            let base = u64::from(days) * DAY_MS;
            f.last_rotated_ms + base + stable_jitter(id, base / 4)
        };
        now_ms >= at
    };
    f.wanted || scheduled
}

impl Client {
    /// Moves contact `id`'s receiving queues to fresh ones on our current
    /// relays; with `both`, also asks the contact to move theirs.
    pub fn rotate(&mut self, id: &str, both: bool) -> Result<JobReport, ClientError> {
        let contact = self.contact(id)?;
        if contact.conn.state != ConnState::Connected {
            return Err(ClientError::Invalid(format!(
                "{} is not connected yet: nothing to rotate",
                contact.name
            )));
        }
        let days = self.settings()?.rotate_days;
        let queues = self.create_queues()?;
        let t = now();
        let touched = self.update_contact(id, |tx, c| {
            let before = super::devices::queue_ids(c);
            let (actions, abandoned) = c.conn.start_rotation(queues, t, &mut OsRng)?;
            push_actions(c, actions, t);
            for q in abandoned {
                c.jobs.push(Job::DeleteQueue {
                    recipient_id: q.recipient_id,
                    generation: c.generation,
                });
                c.conn.retired_queues.push(q);
            }
            if both {
                let ask = c.conn.request_rotation(t, &mut OsRng)?;
                push_actions(c, vec![ask], t);
            }
            c.rotation_wanted = false;
            c.next_rotation_ms = next_due(t, days.max(1));
            // Our other devices must know the new queues to cut this one
            // off if it is ever removed.
            super::devices::announce_if_changed(tx, c, &before, t)
        })?;
        let report = self.run_jobs(id)?;
        for d in touched {
            let _ = self.run_jobs(&d);
        }
        Ok(report)
    }

    /// Rotations that are due (by the schedule, or because the peer asked).
    /// Failures are reported, not fatal: the next command tries again.
    pub fn rotate_due(
        &mut self,
        only: Option<&str>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let contacts = match only {
            Some(id) => vec![self.contact(id)?],
            None => self.contacts()?,
        };
        self.rotate_those(contacts, on_event).map(|_| ())
    }

    /// [`Client::rotate_due`] for just these contacts (those that received
    /// something, say), without reading every contact record.
    pub fn rotate_due_of(
        &mut self,
        ids: &[String],
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let contacts = ids.iter().filter_map(|id| self.contact(id).ok()).collect();
        self.rotate_those(contacts, on_event).map(|_| ())
    }

    /// Starts the rotations that are due among `contacts`; true if any was
    /// (their records have changed since).
    pub(crate) fn rotate_those(
        &mut self,
        contacts: Vec<Contact>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<bool, ClientError> {
        let days = self.settings()?.rotate_days;
        let t = now();
        let due: Vec<(String, String)> = contacts
            .into_iter()
            .filter(|c| c.rotation_facts().is_some_and(|f| due(&f, &c.id, days, t)))
            .map(|c| (c.id, c.name))
            .collect();
        let any = !due.is_empty();
        for (id, name) in due {
            match self.rotate(&id, false) {
                Ok(report) => {
                    for e in report.errors {
                        on_event(Event::Warning(format!("rotating {name}'s queues: {e}")));
                    }
                }
                Err(e) => on_event(Event::Warning(format!(
                    "could not rotate {name}'s queues yet: {e}"
                ))),
            }
        }
        Ok(any)
    }
}
