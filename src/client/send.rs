//! Sending: a message is encrypted and stored as a job (or, before the
//! connection is up, kept in the outbox) in one transaction, then uploaded.

use rand::rngs::OsRng;

use super::devices::{copy_to_devices, record_history};
use super::jobs::{flush_outbox, push_actions, reached_a_relay, JobReport};
use super::model::{Direction, HistoryEntry, Queued};
use super::records;
use super::{abort, now, random_id, unwrap_abort, Client, ClientError};
use crate::proto::connection::ConnState;
use crate::proto::envelope::{Kind, MAX_BODY_LEN};

#[derive(Debug)]
pub struct SendOutcome {
    pub id: [u8; 16],
    /// At least one of the contact's relays has it.
    pub delivered: bool,
    /// Waiting for the handshake to complete.
    pub awaiting_connection: bool,
    /// Every connection of the contact refused it as gone: the contact
    /// deleted the conversation (see [`Contact::peer_gone`]).
    pub gone: bool,
    pub report: JobReport,
    /// The relays of the contact's queues (of every device of theirs).
    pub relays: std::collections::BTreeSet<String>,
}

impl Client {
    /// Queues a message of `kind` for the contact of connection `id` — for
    /// every device of that contact, with one message id — adds text to the
    /// history and copies it to our other devices, then tries to deliver
    /// everything pending.
    pub fn send(
        &mut self,
        id: &str,
        kind: Kind,
        body: Vec<u8>,
    ) -> Result<SendOutcome, ClientError> {
        if body.len() > MAX_BODY_LEN {
            return Err(crate::proto::ProtoError::TooLong {
                len: body.len(),
                max: MAX_BODY_LEN,
            }
            .into());
        }
        if let Some(e) = self.removed_error()? {
            return Err(e);
        }
        let msg_id = random_id();
        let t = now();
        let members = self.group_members(id)?;
        let (connected, devices) = self
            .store
            .transaction(|tx| {
                let mut connected = false;
                let mut group = None;
                for m in &members {
                    let Some(mut c) = records::load(tx, m)? else {
                        continue;
                    };
                    group.get_or_insert_with(|| c.group().to_string());
                    c.outbox.push(Queued {
                        kind,
                        id: msg_id,
                        body: body.clone(),
                        created_ms: t,
                    });
                    flush_outbox(&mut c, t).map_err(abort)?;
                    c.last_activity_ms = t;
                    connected |= c.conn.state == ConnState::Connected;
                    records::save(tx, &c)?;
                }
                let mut devices = Vec::new();
                if let (Kind::Text, Some(group)) = (kind, group) {
                    let entry = HistoryEntry {
                        dir: Direction::Out,
                        id: msg_id,
                        text: String::from_utf8_lossy(&body).into_owned(),
                        sent_at_ms: t,
                        received_at_ms: None,
                        device: None,
                    };
                    record_history(tx, &group, &entry)?;
                    devices = copy_to_devices(tx, "", &group, &entry, None, t)?;
                }
                Ok((connected, devices))
            })
            .map_err(unwrap_abort)?;
        let mut report = JobReport::default();
        let mut delivered = false;
        let mut gone = !members.is_empty();
        let mut relays = std::collections::BTreeSet::new();
        for m in &members {
            let r = self.run_jobs(m)?;
            let c = self.contact(m)?;
            relays.extend(c.conn.peer_queues.iter().map(|q| q.relay.label()));
            delivered |= reached_a_relay(&c, &msg_id);
            gone &= c.peer_gone;
            report.waiting += r.waiting;
            report.errors.extend(r.errors);
            report.refused.extend(r.refused);
            report.notices.extend(r.notices);
        }
        for d in devices {
            // Copies for our other devices: best effort now, retried later.
            let _ = self.run_jobs(&d);
        }
        // Opportunistic: a rotation that is due rides along with sending.
        let mut notes = Vec::new();
        self.rotate_due(Some(id), &mut |e| notes.push(e))?;
        Ok(SendOutcome {
            id: msg_id,
            delivered: connected && delivered,
            awaiting_connection: !connected,
            gone,
            report,
            relays,
        })
    }

    /// Sends a profile update to every connected contact (and queues it for
    /// those still connecting, who get the current profile in the handshake
    /// anyway — so only connected ones).
    pub fn broadcast_profile(
        &mut self,
        profile_bytes: &[u8],
    ) -> Result<Vec<JobReport>, ClientError> {
        let ids: Vec<String> = self
            .contacts()?
            .into_iter()
            .filter(|c| c.conn.state == ConnState::Connected && !c.device)
            .map(|c| c.id)
            .collect();
        let mut reports = Vec::new();
        for id in ids {
            let t = now();
            self.update_contact(&id, |_, c| {
                let action = c.conn.encrypt(
                    Kind::Profile,
                    random_id(),
                    profile_bytes.to_vec(),
                    t,
                    &mut OsRng,
                )?;
                push_actions(c, vec![action], t);
                Ok(())
            })?;
            reports.push(self.run_jobs(&id)?);
        }
        // Our other devices show the same profile to their contacts.
        for id in super::devices::sync_settings(self)? {
            let _ = self.run_jobs(&id);
        }
        Ok(reports)
    }
}
