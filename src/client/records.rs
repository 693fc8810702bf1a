//! Contact records and their summaries: the one place that reads, writes
//! and deletes `contact/<id>`.
//!
//! A contact record is big (its ratchet states, remembered envelope hashes:
//! about 15 KiB), and a plain `tern recv` with nothing new needs very little
//! of it: which queues to ask, whether anything is waiting to be sent,
//! whether an invitation expires or a rotation is due. Each record has a
//! small sealed summary beside it, `summary/<id>`, holding just that,
//! written by [`save`] in the same transaction as every write of the
//! record, and deleted with it ([`delete`]). The summary carries the
//! record's [`Stamp`] (what changes with every write of a row, readable
//! without opening it): a summary whose stamp is not the record's — a
//! record written by a tern from before summaries, re-keyed, or anything
//! else — is not used; the record is read instead ([`glance_all`]) and the
//! summary written again.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tern_wire::address::RelayAddress;
use tern_wire::Id;

use super::model::{Contact, IndexEntry, INDEX};
use crate::proto::connection::{ConnState, RecvQueue};
use crate::proto::keys::{b64, Secret32};
use crate::store::{ReadTx, Stamp, Store, StoreError, Tx};

/// Bumped whenever [`Summary`] changes meaning: a summary of another
/// version is not used (the record is read instead).
pub const SUMMARY_VERSION: u32 = 1;

fn contact_key(id: &str) -> String {
    format!("contact/{id}")
}

fn summary_key(id: &str) -> String {
    format!("summary/{id}")
}

/// The contact record `id`, if there is one.
pub fn load(tx: &ReadTx<'_>, id: &str) -> Result<Option<Contact>, StoreError> {
    tx.get::<Contact>(&contact_key(id))
}

/// Writes contact record `c` and its summary (the only way a contact
/// record is written).
pub fn save(tx: &Tx<'_>, c: &Contact) -> Result<(), StoreError> {
    let stamp = tx.put_stamped(&contact_key(&c.id), c)?;
    tx.put(&summary_key(&c.id), &Summary::of(c, stamp))
}

/// Deletes contact record `id` and its summary.
pub fn delete(tx: &Tx<'_>, id: &str) -> Result<(), StoreError> {
    tx.delete(&contact_key(id))?;
    tx.delete(&summary_key(id))
}

/// One receiving queue, as [`super::fetch`] needs it to CHECK and
/// subscribe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryQueue {
    #[serde(with = "crate::proto::connection::address_text")]
    pub relay: RelayAddress,
    #[serde(with = "b64")]
    pub recipient_id: Id,
    pub auth: Secret32,
    pub queue_secret: Secret32,
}

/// What decides whether an automatic rotation is due, for a connection
/// that may rotate now (connected, not rotating, not removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFacts {
    /// The peer asked for one.
    pub wanted: bool,
    /// [`Contact::next_rotation_ms`].
    pub next_ms: u64,
    /// When the connection last rotated.
    pub last_rotated_ms: u64,
}

/// What a plain `tern recv` needs of a contact record to decide whether to
/// read it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub v: u32,
    /// The contact's id (summaries are read by bucket, not by name).
    pub id: String,
    /// The stamp of the record this summarises.
    pub stamp: Stamp,
    /// Every receiving queue, as [`super::fetch`] lists them.
    pub queues: Vec<SummaryQueue>,
    /// [`Contact::has_work`].
    pub has_work: bool,
    /// When [`Contact::expired`] becomes true, if it ever does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// `None`: no rotation can start now ([`Contact::rotation_facts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationFacts>,
}

impl Summary {
    /// The receiving queues a `tern recv` asks for contact `c`: every
    /// connection's (current, rotating, retired; the one a re-key
    /// replaced; re-key invitations').
    pub fn queues_of(c: &Contact) -> impl Iterator<Item = &RecvQueue> {
        let old = c.old.iter().flat_map(|o| o.conn.all_recv_queues());
        let rekey = c.rekeys.iter().flat_map(|r| r.recv_queues.iter());
        c.conn.all_recv_queues().chain(old).chain(rekey)
    }

    pub fn of(c: &Contact, stamp: Stamp) -> Summary {
        let queues = Summary::queues_of(c)
            .map(|q| SummaryQueue {
                relay: q.relay.clone(),
                recipient_id: q.recipient_id,
                auth: q.auth.clone(),
                queue_secret: q.queue_secret.clone(),
            })
            .collect();
        Summary {
            v: SUMMARY_VERSION,
            id: c.id.clone(),
            stamp,
            queues,
            has_work: c.has_work(),
            expires_ms: c.expires_at(),
            rotation: c.rotation_facts(),
        }
    }

    /// [`Contact::expired`] of the record summarised.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| now_ms >= at)
    }

    /// Whether [`super::Client::rotate_those`] would start a rotation of
    /// the record summarised.
    pub fn rotation_due(&self, id: &str, days: u32, now_ms: u64) -> bool {
        self.rotation
            .is_some_and(|f| super::rotate::due(&f, id, days, now_ms))
    }
}

/// A contact as a plain `tern recv` first sees it.
pub struct Glance {
    pub id: String,
    pub summary: Summary,
}

/// Every contact of the index with a record, by its summary; a summary that
/// is missing or not the record's is made again from the record (and
/// written, best effort, for the next run). The summaries are read in one
/// pass over their bucket, and each is checked against its record's row
/// with one lookup: no name is hashed and no record opened for a contact
/// whose summary is current.
pub fn glance_all(store: &mut Store) -> Result<Vec<Glance>, StoreError> {
    let mut stale = Vec::new();
    let out = store.read(|tx| {
        let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let mut summaries: HashMap<String, Summary> = tx
            .bucket_values::<Summary>("summary/")?
            .into_iter()
            // One that does not open or decode is as good as missing.
            .filter_map(Result::ok)
            .filter(|s| s.v == SUMMARY_VERSION)
            .map(|s| (s.id.clone(), s))
            .collect();
        let mut out = Vec::with_capacity(index.len());
        for e in index {
            let summary = match summaries.remove(&e.id) {
                Some(s) if tx.is_current(&s.stamp)? => s,
                // Anything but a summary of this very write of the record
                // means reading the record, as before summaries.
                _ => {
                    let Some(stamp) = tx.stamp(&contact_key(&e.id))? else {
                        continue;
                    };
                    let Some(c) = load(tx, &e.id)? else { continue };
                    stale.push(out.len());
                    Summary::of(&c, stamp)
                }
            };
            out.push(Glance { id: e.id, summary });
        }
        Ok(out)
    })?;
    if !stale.is_empty() {
        // Only over the write of the record it was made from: a record
        // written again meanwhile gets its summary from the next run.
        let _ = store.transaction(|tx| {
            for &i in &stale {
                let g = &out[i];
                if tx.is_current(&g.summary.stamp)? {
                    tx.put(&summary_key(&g.id), &g.summary)?;
                }
            }
            Ok(())
        });
    }
    Ok(out)
}

/// Whether the summary of contact record `id` is the one [`save`] writes
/// with it now: of its current write, and saying what the record says.
/// `None`: there is no such record. For tests and checks.
pub fn summary_agrees(tx: &ReadTx<'_>, id: &str) -> Result<Option<bool>, StoreError> {
    let Some(stamp) = tx.stamp(&contact_key(id))? else {
        return Ok(None);
    };
    let Some(c) = load(tx, id)? else {
        return Ok(None);
    };
    let want = Summary::of(&c, stamp);
    Ok(Some(matches!(
        tx.get::<Summary>(&summary_key(id)),
        Ok(Some(s)) if s == want
    )))
}

/// The ids of summaries whose contact record is gone.
pub fn orphan_summaries(tx: &ReadTx<'_>) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for k in tx.keys("summary/")? {
        let id = &k["summary/".len()..];
        if tx.stamp(&contact_key(id))?.is_none() {
            out.push(id.to_string());
        }
    }
    Ok(out)
}

impl Contact {
    /// Whether [`super::Client::run_jobs`] has anything to do for this
    /// contact.
    pub fn has_work(&self) -> bool {
        !self.jobs.is_empty()
            || !self.receipts_owed.is_empty()
            || !self.device_jobs.is_empty()
            || (self.conn.state == ConnState::Connected && !self.outbox.is_empty())
    }

    /// When [`Contact::expired`] becomes true, if it ever does as the
    /// record stands.
    pub fn expires_at(&self) -> Option<u64> {
        (self.expires_ms != 0
            && !self.removed
            && (self.conn.state == ConnState::Invited
                || (self.is_pending_link() && !self.link_confirmed)))
            .then_some(self.expires_ms)
    }

    /// What decides an automatic rotation, if one may start now.
    pub fn rotation_facts(&self) -> Option<RotationFacts> {
        let may = self.conn.state == ConnState::Connected && !self.conn.rotating() && !self.removed;
        may.then_some(RotationFacts {
            wanted: self.rotation_wanted,
            next_ms: self.next_rotation_ms,
            last_rotated_ms: self.conn.last_rotated_ms,
        })
    }
}
