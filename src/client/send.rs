//! Sending: a message is encrypted and stored as a job (or, before the
//! connection is up, kept in the outbox) in one transaction, then uploaded.

use rand::rngs::OsRng;

use super::jobs::{flush_outbox, push_actions, reached_a_relay, JobReport};
use super::model::{history_log, Direction, HistoryEntry, Queued};
use super::{now, random_id, Client, ClientError};
use crate::proto::connection::ConnState;
use crate::proto::envelope::{Kind, MAX_BODY_LEN};

#[derive(Debug)]
pub struct SendOutcome {
    pub id: [u8; 16],
    /// At least one of the contact's relays has it.
    pub delivered: bool,
    /// Waiting for the handshake to complete.
    pub awaiting_connection: bool,
    pub report: JobReport,
}

impl Client {
    /// Queues a message of `kind` for contact `id` (text is also added to the
    /// history) and tries to deliver everything pending for that contact.
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
        let msg_id = random_id();
        let t = now();
        let connected = self.update_contact(id, |tx, c| {
            if kind == Kind::Text {
                let entry = HistoryEntry {
                    dir: Direction::Out,
                    id: msg_id,
                    text: String::from_utf8_lossy(&body).into_owned(),
                    sent_at_ms: t,
                    received_at_ms: None,
                };
                tx.append(&history_log(&c.id), &entry)?;
            }
            c.outbox.push(Queued {
                kind,
                id: msg_id,
                body,
            });
            flush_outbox(c, t)?;
            c.last_activity_ms = t;
            Ok(c.conn.state == ConnState::Connected)
        })?;
        let report = self.run_jobs(id)?;
        let contact = self.contact(id)?;
        // Opportunistic: a rotation that is due rides along with sending.
        let mut notes = Vec::new();
        self.rotate_due(Some(id), &mut |e| notes.push(e))?;
        Ok(SendOutcome {
            id: msg_id,
            delivered: connected && reached_a_relay(&contact, &msg_id),
            awaiting_connection: !connected,
            report,
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
            .filter(|c| c.conn.state == ConnState::Connected)
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
        Ok(reports)
    }
}
