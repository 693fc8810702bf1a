//! Delivery receipts (PROTOCOL.md §7.6): telling a contact which of its
//! messages this device stored, and recording what the contact's devices
//! say they stored of ours.
//!
//! Sending: the receiving loop collects the ids of the texts and file
//! offers each batch stored, and in the same transaction notes them as
//! owed on every connected device of that contact. When that connection's
//! jobs next run, what it owes is encrypted into one receipt (not one per
//! message or per batch) and goes out as an ordinary upload: none is ever
//! sent for a message that is not durably stored, and a crash after the
//! commit still sends them (the ids, then the upload, are stored).
//!
//! Receiving: a receipt is the contact's word only. Each id marks a
//! message only if this profile sent it to that contact (the message has an
//! [`Outgoing`] record in the contact's group), once per device of the
//! contact; anything else in it is ignored.

use std::collections::HashMap;

use rand::rngs::OsRng;

use super::events::Event;
use super::jobs::push_actions;
use super::model::{
    no_receipts_key, outgoing_key, Contact, DeliveredTo, Direction, HistoryEntry, IndexEntry, Job,
    Outgoing, ReceiptId, Settings, INDEX, MAX_DELIVERED_DEVICES, SETTINGS,
};
use super::{random_id, Client, ClientError};
use crate::proto::connection::ConnState;
use crate::proto::envelope::Kind;
use crate::proto::receipt::{receipts_for, Receipt};
use crate::store::{StoreError, Tx};

/// The most receipt ids one connection keeps owing (the oldest go first:
/// receipts are best effort, and a connection that cannot take them for
/// that long has bigger problems).
const MAX_RECEIPTS_OWED: usize = 4096;

/// Notes, inside the batch's transaction, that receipts are owed for the
/// messages in `stored` (connection id, envelope id), on every connected
/// device of that contact. Returns the records that now owe receipts: their
/// jobs encrypt one receipt for everything owed ([`encrypt_owed`]) and
/// upload it, after the batch commits, so none is ever sent for a message
/// that is not durably stored, and a crash after the commit still sends
/// them. A batch adds only ids to the record, however many batches come
/// before the uploads run.
pub(crate) fn send_receipts(
    tx: &Tx<'_>,
    stored: &[(String, [u8; 16])],
) -> Result<Vec<String>, StoreError> {
    if stored.is_empty() {
        return Ok(Vec::new());
    }
    let on = tx
        .get::<Settings>(SETTINGS)?
        .map(|s| s.receipts)
        .unwrap_or(true);
    if !on {
        return Ok(Vec::new());
    }
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let by_id: HashMap<&str, &IndexEntry> = index.iter().map(|e| (e.id.as_str(), e)).collect();
    // Group → ids, in the order they came.
    let mut groups: Vec<(String, Vec<[u8; 16]>)> = Vec::new();
    for (cid, id) in stored {
        let Some(e) = by_id.get(cid.as_str()) else {
            continue;
        };
        if e.device {
            continue;
        }
        let g = e.group().to_string();
        match groups.iter_mut().find(|(x, _)| *x == g) {
            Some((_, ids)) => ids.push(*id),
            None => groups.push((g, vec![*id])),
        }
    }
    let mut changed = Vec::new();
    for (group, ids) in groups {
        if tx.get::<bool>(&no_receipts_key(&group))?.unwrap_or(false) {
            continue;
        }
        for m in index.iter().filter(|e| e.group() == group && !e.device) {
            let Some(mut c) = super::records::load(tx, &m.id)? else {
                continue;
            };
            if c.conn.state != ConnState::Connected || c.peer_gone || c.removed {
                continue;
            }
            c.receipts_owed.extend(ids.iter().copied().map(ReceiptId));
            let over = c.receipts_owed.len().saturating_sub(MAX_RECEIPTS_OWED);
            c.receipts_owed.drain(..over);
            super::records::save(tx, &c)?;
            changed.push(m.id.clone());
        }
    }
    Ok(changed)
}

/// Whether [`encrypt_owed`] would encrypt anything for `c` now.
pub(crate) fn receipts_ready(c: &Contact) -> bool {
    // While our resync offer is out (PROTOCOL.md §6.7) the ratchet we would
    // encrypt with is the one that lost step: the peer could not read the
    // receipt and would start a resync of its own. They wait till it ends.
    !c.receipts_owed.is_empty()
        && c.conn.state == ConnState::Connected
        && !c.peer_gone
        && !c.removed
        && c.conn.resync.is_none()
}

/// Encrypts what `c` owes into receipts (as few as hold the ids) and
/// stores them as uploads; the caller commits `c` before uploading.
pub(crate) fn encrypt_owed(c: &mut Contact, now: u64) {
    if !receipts_ready(c) {
        return;
    }
    let ids: Vec<[u8; 16]> = c.receipts_owed.drain(..).map(|r| r.0).collect();
    let Ok(bodies) = receipts_for(&ids)
        .iter()
        .map(Receipt::encode)
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let mut actions = Vec::new();
    for body in bodies {
        if let Ok(a) = c
            .conn
            .encrypt(Kind::Receipt, random_id(), body, now, &mut OsRng)
        {
            actions.push(a);
        }
    }
    push_actions(c, actions, now);
}

/// Records a receipt that came on connection `c`; an event for each
/// message it newly marks delivered.
pub(crate) fn apply_receipt(
    tx: &Tx<'_>,
    c: &Contact,
    receipt: &Receipt,
    now: u64,
) -> Result<Vec<Event>, StoreError> {
    if c.device {
        // Our own devices never send them: they see what we store.
        return Ok(vec![Event::Refused {
            contact: c.name.clone(),
            what: "delivery receipt",
            reason: "it came from one of your own devices, which never send them".into(),
        }]);
    }
    let device = c.device_label();
    let group = c.group();
    let mut events = Vec::new();
    for id in &receipt.ids {
        let key = outgoing_key(group, id);
        // Not sent to this contact (or unknown, or from before receipts):
        // nothing to mark.
        let Some(mut o) = tx.get::<Outgoing>(&key)? else {
            continue;
        };
        if o.delivered.iter().any(|d| d.device == device)
            || o.delivered.len() >= MAX_DELIVERED_DEVICES
        {
            continue;
        }
        o.delivered.push(DeliveredTo {
            device: device.clone(),
            at_ms: now,
        });
        tx.put(&key, &o)?;
        events.push(Event::Delivered {
            contact: c.name.clone(),
            id: *id,
            device: device.clone(),
            at_ms: now,
        });
    }
    Ok(events)
}

/// How far a message we sent got, as `tern log` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    /// Written; no relay has confirmed it yet (or, for what another device
    /// of ours sent, not known here).
    Sent,
    /// At least one relay of the contact took it.
    OnRelay,
    /// Stored by these devices of the contact.
    Delivered(Vec<DeliveredTo>),
}

impl MessageState {
    pub fn word(&self) -> &'static str {
        match self {
            MessageState::Sent => "sent",
            MessageState::OnRelay => "on-relay",
            MessageState::Delivered(_) => "delivered",
        }
    }
}

/// Whether some connection still holds `id` unsent: in its outbox, or in
/// an upload no relay has taken yet.
fn still_waiting(members: &[Contact], id: &[u8; 16]) -> bool {
    members.iter().any(|c| {
        c.outbox.iter().any(|q| &q.id == id)
            || c.jobs.iter().any(|j| {
                matches!(j, Job::Deliver { envelope_id, delivered_any: false, .. } if envelope_id == id)
            })
    })
}

impl Client {
    /// The delivery state of each entry of `group`'s history (`None` for
    /// incoming messages): one small record read per message.
    pub fn message_states(
        &self,
        group: &str,
        entries: &[HistoryEntry],
    ) -> Result<Vec<Option<MessageState>>, ClientError> {
        let members: Vec<Contact> = self
            .index()?
            .into_iter()
            .filter(|e| e.group() == group && !e.device)
            .filter_map(|e| self.contact(&e.id).ok())
            .collect();
        let records: Vec<Option<Outgoing>> = self.store.read(|tx| {
            entries
                .iter()
                .map(|e| match e.dir {
                    Direction::Out => tx.get::<Outgoing>(&outgoing_key(group, &e.id)),
                    Direction::In => Ok(None),
                })
                .collect()
        })?;
        Ok(entries
            .iter()
            .zip(records)
            .map(|(e, o)| {
                if e.dir == Direction::In {
                    return None;
                }
                let delivered = o.map(|o| o.delivered).unwrap_or_default();
                Some(if !delivered.is_empty() {
                    MessageState::Delivered(delivered)
                } else if e.device.is_some() || still_waiting(&members, &e.id) {
                    MessageState::Sent
                } else {
                    MessageState::OnRelay
                })
            })
            .collect())
    }

    /// The devices of the contact of connection `contact_id` that confirmed
    /// message `id`.
    pub fn delivered_to(
        &self,
        contact_id: &str,
        id: &[u8; 16],
    ) -> Result<Vec<DeliveredTo>, ClientError> {
        let group = self.contact(contact_id)?.group().to_string();
        Ok(self
            .store
            .read(|tx| tx.get::<Outgoing>(&outgoing_key(&group, id)))?
            .map(|o| o.delivered)
            .unwrap_or_default())
    }

    /// Turns receipts to the contact of connection `contact_id` on or off.
    pub fn set_contact_receipts(&mut self, contact_id: &str, on: bool) -> Result<(), ClientError> {
        let group = self.contact(contact_id)?.group().to_string();
        self.store.transaction(|tx| {
            let key = no_receipts_key(&group);
            if on {
                tx.delete(&key)
            } else {
                tx.put(&key, &true)
            }
        })?;
        Ok(())
    }

    /// Whether receipts go to the contact of connection `contact_id`
    /// (the profile's setting aside).
    pub fn contact_receipts(&self, contact_id: &str) -> Result<bool, ClientError> {
        let group = self.contact(contact_id)?.group().to_string();
        Ok(!self
            .store
            .read(|tx| tx.get::<bool>(&no_receipts_key(&group)))?
            .unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::proto::connection::tests::queues;
    use crate::proto::connection::Connection;
    use crate::proto::hello::Channel;
    use crate::store::{NewKey, Store};

    fn contact(rng: &mut StdRng, id: &str, group: &str, device: bool) -> Contact {
        let (conn, _) = Connection::invite(queues(rng, 1, 1), Channel::Shared, rng);
        let mut c = Contact::new(id.into(), id.into(), false, conn, 0);
        c.group = group.into();
        c.device = device;
        c
    }

    /// A receipt is the contact's word only: it marks what we sent to that
    /// contact, once per device, and nothing else.
    #[test]
    fn hostile_receipts_mark_only_messages_sent_to_that_contact() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("p"), NewKey::Unprotected).unwrap();
        let mut rng = StdRng::seed_from_u64(16);
        let bob = contact(&mut rng, "bob-1", "g-bob", false);
        let mine = contact(&mut rng, "laptop", "", true);
        let (sent_to_bob, sent_to_carol, from_bob, unknown) =
            ([1u8; 16], [2u8; 16], [3u8; 16], [4u8; 16]);
        let receipt =
            Receipt::delivered(vec![unknown, from_bob, sent_to_carol, sent_to_bob]).unwrap();
        let (first, again, on_device) = store
            .transaction(|tx| {
                tx.put(&outgoing_key("g-bob", &sent_to_bob), &Outgoing::default())?;
                tx.put(
                    &outgoing_key("g-carol", &sent_to_carol),
                    &Outgoing::default(),
                )?;
                let first = apply_receipt(tx, &bob, &receipt, 10)?;
                let again = apply_receipt(tx, &bob, &receipt, 20)?;
                let on_device = apply_receipt(tx, &mine, &receipt, 30)?;
                Ok((first, again, on_device))
            })
            .unwrap();
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(matches!(
            &first[0],
            Event::Delivered { id, device, at_ms: 10, .. } if *id == sent_to_bob && *device == bob.device_label()
        ));
        assert!(again.is_empty(), "a repeated receipt changes nothing");
        assert!(matches!(on_device[..], [Event::Refused { .. }]));
        let (bob_rec, carol_rec, none) = store
            .read(|tx| {
                Ok((
                    tx.get::<Outgoing>(&outgoing_key("g-bob", &sent_to_bob))?,
                    tx.get::<Outgoing>(&outgoing_key("g-carol", &sent_to_carol))?,
                    tx.get::<Outgoing>(&outgoing_key("g-bob", &from_bob))?,
                ))
            })
            .unwrap();
        assert_eq!(bob_rec.unwrap().delivered.len(), 1);
        assert!(
            carol_rec.unwrap().delivered.is_empty(),
            "another contact's message"
        );
        assert!(none.is_none(), "no record is made for ids never sent");
    }

    /// Never more devices per message than the bound, however many
    /// connections a hostile group claims.
    #[test]
    fn devices_per_message_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("p"), NewKey::Unprotected).unwrap();
        let mut rng = StdRng::seed_from_u64(17);
        let id = [9u8; 16];
        let receipt = Receipt::delivered(vec![id]).unwrap();
        let marked = store
            .transaction(|tx| {
                tx.put(&outgoing_key("g", &id), &Outgoing::default())?;
                let mut n = 0;
                for i in 0..MAX_DELIVERED_DEVICES + 5 {
                    let c = contact(&mut rng, &format!("c{i}"), "g", false);
                    n += apply_receipt(tx, &c, &receipt, 1)?.len();
                }
                Ok(n)
            })
            .unwrap();
        assert_eq!(marked, MAX_DELIVERED_DEVICES);
    }

    /// Measurement, not a check (NOTES-receipts.md): what recording one
    /// receipt costs with a short and a long history.
    /// `cargo test --release --lib receipt_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn receipt_cost_does_not_grow_with_history() {
        use crate::client::model::{history_log, HistoryEntry};
        // Each measured receipt marks ids not marked before (a write), so
        // the smallest history still has more than the 1,200 ids used.
        for n in [2_000usize, 20_000, 200_000] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::create(&dir.path().join("p"), NewKey::Unprotected).unwrap();
            let mut rng = StdRng::seed_from_u64(18);
            let bob = contact(&mut rng, "bob-1", "g", false);
            let ids: Vec<[u8; 16]> = (0..n as u32)
                .map(|i| {
                    let mut id = [0u8; 16];
                    id[..4].copy_from_slice(&i.to_be_bytes());
                    id
                })
                .collect();
            for chunk in ids.chunks(5000) {
                store
                    .transaction(|tx| {
                        for id in chunk {
                            let e = HistoryEntry {
                                dir: Direction::Out,
                                id: *id,
                                text: "x".repeat(200),
                                sent_at_ms: 1,
                                received_at_ms: None,
                                device: None,
                            };
                            tx.append(&history_log("g"), &e)?;
                            tx.put(&outgoing_key("g", id), &Outgoing::default())?;
                        }
                        Ok(())
                    })
                    .unwrap();
            }
            // Receipts of 3 ids each, one transaction each, as batches: 200
            // first (the commits after the bulk insert also checkpoint its
            // WAL), then 200 measured.
            let mut per_receipt = Vec::new();
            for round in 0..2 {
                let started = std::time::Instant::now();
                for k in 0..200 {
                    let at = (round * 600 + k * 3) % (n - 3);
                    let r = Receipt::delivered(ids[at..][..3].to_vec()).unwrap();
                    store
                        .transaction(|tx| apply_receipt(tx, &bob, &r, 1))
                        .unwrap();
                }
                per_receipt.push(started.elapsed().as_secs_f64() * 1000.0 / 200.0);
            }
            println!(
                "history {n:>6}: {:.3} ms per receipt (first 200: {:.3} ms)",
                per_receipt[1], per_receipt[0]
            );
        }
    }
}
