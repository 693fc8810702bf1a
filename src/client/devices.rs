//! Several devices per profile (PROTOCOL.md §12).
//!
//! Every device has connections of its own: one with every device of every
//! contact, and one with every other device of ours. Nothing secret is
//! shared between devices except what the person owns anyway (profile,
//! contacts' names, history), so removing a device cuts it off for good: its
//! connections are dropped by the contacts and its queues deleted by us.
//!
//! The records of one contact's connections share a *group* id (the same on
//! all our devices), under which the history is kept. A device joins a group
//! by making an invitation that a device already in it forwards through its
//! own, authenticated connection: no relay ever carries an invitation in the
//! clear, and nobody but our own devices can introduce one.

use data_encoding::HEXLOWER;
use rand::rngs::OsRng;
use tern_wire::{Command, ErrorCode};

use super::events::Event;
use super::jobs::{flush_outbox, push_request};
use super::model::{
    group_info_key, group_name_key, group_seen, history_log, AddWatch, Announced, Contact,
    DeviceJob, Direction, GrantedQueue, GroupInfo, HeldRequest, HistoryEntry, IndexEntry, Queued,
    Removal, RootCode, Settings, DEVICES, INDEX, SETTINGS,
};
use super::records;
use super::{abort, new_contact_id, now, random_id, unwrap_abort, Client, ClientError};
use crate::proto::connection::{ConnState, Connection, SecurityLevel};
use crate::proto::device::{added_tag, history_messages, DeviceMsg, Entry, QueueGrant};
use crate::proto::envelope::{Kind, MAX_BODY_LEN};
use crate::proto::hello::{Channel, Profile};
use crate::proto::invitation::Invitation;
use crate::store::{StoreError, Tx};

/// Most connections one contact (group) may have here, and most devices of
/// our own: a bound on what ADD messages can make us create.
pub const MAX_DEVICES: usize = 16;

/// How long a process may hold a device job before another may take it up
/// (sooner if it is seen to be gone, [`process_alive`]).
const CLAIM_MS: u64 = 120_000;

/// Whether process `pid` still runs. Where that cannot be told, yes: the
/// claim then lasts its whole time.
fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// What another device of ours is called when it has not said.
pub const UNNAMED_DEVICE: &str = "device";

/// How this device introduces itself to our other devices: its name only.
pub fn device_profile(settings: &Settings) -> Profile {
    Profile {
        name: if settings.device_name.trim().is_empty() {
            UNNAMED_DEVICE.to_string()
        } else {
            settings.device_name.clone()
        },
        ..Profile::default()
    }
}

/// The name a device gets when none is given: the machine's host name.
pub fn default_device_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().chars().take(64).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| UNNAMED_DEVICE.to_string())
}

fn group_bytes(group: &str) -> Option<[u8; 16]> {
    HEXLOWER
        .decode(group.as_bytes())
        .ok()
        .and_then(|b| b.try_into().ok())
}

fn id_bytes(id: &str) -> [u8; 16] {
    group_bytes(id).unwrap_or_default()
}

/// The seen-set key of a message id (ids are random: no hashing needed).
fn seen_digest(id: &[u8; 16]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[..16].copy_from_slice(id);
    d
}

/// Appends `entry` to the group's history unless some device already put
/// it there; `true` if it was new.
pub(crate) fn record_history(
    tx: &Tx<'_>,
    group: &str,
    entry: &HistoryEntry,
) -> Result<bool, StoreError> {
    let seen = group_seen(group);
    let d = seen_digest(&entry.id);
    if tx.seen(&seen, &d)? {
        return Ok(false);
    }
    tx.mark_seen(&seen, &d)?;
    tx.append(&history_log(group), entry)?;
    if entry.dir == Direction::Out {
        // What delivery receipts may mark: only ids sent to this contact.
        tx.put(
            &super::model::outgoing_key(group, &entry.id),
            &super::model::Outgoing::default(),
        )?;
    }
    Ok(true)
}

/// Encrypts a device message on connection `c`, or keeps it in its outbox
/// until the connection is up.
fn send_on(c: &mut Contact, msg: &DeviceMsg, now: u64) -> Result<(), ClientError> {
    c.outbox.push(Queued {
        kind: Kind::Device,
        id: random_id(),
        body: msg.encode(),
        created_ms: now,
    });
    flush_outbox(c, now)
}

/// Runs `f` on each record of `ids` but `skip`, saving the ones it changed;
/// returns their ids (their jobs need running).
fn for_each_of(
    tx: &Tx<'_>,
    ids: impl IntoIterator<Item = String>,
    skip: &str,
    mut f: impl FnMut(&mut Contact) -> Result<bool, ClientError>,
) -> Result<Vec<String>, StoreError> {
    let mut changed = Vec::new();
    for id in ids.into_iter().filter(|id| id != skip) {
        let Some(mut other) = records::load(tx, &id)? else {
            continue;
        };
        if f(&mut other).map_err(abort)? {
            records::save(tx, &other)?;
            changed.push(id);
        }
    }
    Ok(changed)
}

/// [`for_each_of`] every record but `skip`.
fn for_each_other(
    tx: &Tx<'_>,
    skip: &str,
    f: impl FnMut(&mut Contact) -> Result<bool, ClientError>,
) -> Result<Vec<String>, StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    for_each_of(tx, index.into_iter().map(|e| e.id), skip, f)
}

/// [`for_each_other`] over our device connections only, found through the
/// short device list rather than the whole contact index: this runs for
/// every message received, and must not cost more with more contacts.
fn for_each_device(
    tx: &Tx<'_>,
    skip: &str,
    f: impl FnMut(&mut Contact) -> Result<bool, ClientError>,
) -> Result<Vec<String>, StoreError> {
    let ids = tx.get::<Vec<String>>(DEVICES)?.unwrap_or_default();
    for_each_of(tx, ids, skip, f)
}

/// Sends `msg` to each live device of ours (but `skip`) that `to` selects.
fn send_to_devices(
    tx: &Tx<'_>,
    skip: &str,
    msg: &DeviceMsg,
    now: u64,
    mut to: impl FnMut(&mut Contact) -> bool,
) -> Result<Vec<String>, StoreError> {
    for_each_device(tx, skip, |d| {
        let wanted = is_live_device(d) && to(d);
        if wanted {
            send_on(d, msg, now)?;
        }
        Ok(wanted)
    })
}

/// Asks our other devices to connect to the contact of connection `c`
/// through it (GROUP with `c` as the one member); until they have, what
/// the contact sends is copied to them.
fn introduce_to_devices(
    tx: &Tx<'_>,
    c: &Contact,
    introduce: bool,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let Some(msg) = group_message(&c.name, c.group(), introduce, vec![id_bytes(&c.id)]) else {
        return Ok(Vec::new());
    };
    send_to_devices(tx, &c.id, &msg, now, |d| {
        d.await_group(c.group());
        d.offer_slots.push(c.id.clone());
        true
    })
}

/// A device of ours that gets what we send and receive: connected, and (if
/// we linked it) sent the link once the user confirmed it.
fn is_live_device(c: &Contact) -> bool {
    c.device && !c.removed && !c.sync_on_connect && c.conn.state == ConnState::Connected
}

fn entry_of(e: &HistoryEntry) -> Entry {
    Entry {
        incoming: e.dir == Direction::In,
        id: e.id,
        sent_at_ms: e.sent_at_ms,
        received_at_ms: e.received_at_ms.unwrap_or(0),
        text: e.text.clone(),
    }
}

fn history_of(e: &Entry) -> HistoryEntry {
    HistoryEntry {
        dir: if e.incoming {
            Direction::In
        } else {
            Direction::Out
        },
        id: e.id,
        text: e.text.clone(),
        sent_at_ms: e.sent_at_ms,
        received_at_ms: (e.received_at_ms != 0).then_some(e.received_at_ms),
        device: None,
    }
}

/// How long an answered ADD is remembered: messages the contact sent
/// before answering can still arrive late (out of order) meanwhile.
pub(crate) const WATCH_KEEP_MS: u64 = 7 * 24 * 3600 * 1000;

/// Copies a message of `group` to our other devices: all of them for what
/// we sent (`from` is `None`); for what connection `from` received at chain
/// position `seq`, only the devices the contact did not send it to itself
/// (PROTOCOL.md §12.5). Returns the records changed.
pub(crate) fn copy_to_devices(
    tx: &Tx<'_>,
    skip: &str,
    group: &str,
    entry: &HistoryEntry,
    from: Option<(&Contact, u64)>,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let Some(g) = group_bytes(group) else {
        return Ok(Vec::new());
    };
    let msg = DeviceMsg::Copy {
        group: g,
        entry: entry_of(entry),
    };
    send_to_devices(tx, skip, &msg, now, |d| match from {
        None => true,
        Some((p, seq)) => match p.add_watch.iter().find(|w| w.device == d.id) {
            // The contact was asked to connect to that device: it sent
            // there itself everything after its ADDED.
            Some(w) => w.boundary.is_none_or(|b| seq < b),
            None => d.pending_groups.iter().any(|g| g == group),
        },
    })
}

/// The announcement of connection `c` to our other devices.
fn announcement(c: &Contact) -> Option<DeviceMsg> {
    Some(DeviceMsg::Announce {
        group: if c.device {
            None
        } else {
            Some(group_bytes(c.group())?)
        },
        fingerprint: c.fingerprint()?,
        queues: c
            .queue_grants()
            .into_iter()
            .map(|q| QueueGrant {
                relay: q.relay,
                recipient_id: q.recipient_id,
                auth: q.auth,
            })
            .collect(),
    })
}

/// The ids of every receiving queue of connection `c`.
pub(crate) fn queue_ids(c: &Contact) -> Vec<tern_wire::Id> {
    c.all_recv_queues().map(|q| q.recipient_id).collect()
}

/// Announces connection `c` again to our other devices (and, for a device
/// connection, to that device) when its receiving queues changed since
/// `before`: rotations must not leave a removed device a queue we cannot
/// delete. Returns the other records changed.
pub(crate) fn announce_if_changed(
    tx: &Tx<'_>,
    c: &mut Contact,
    before: &[tern_wire::Id],
    now: u64,
) -> Result<Vec<String>, ClientError> {
    if c.conn.state != ConnState::Connected || c.removed || queue_ids(c) == before {
        return Ok(Vec::new());
    }
    let Some(a) = announcement(c) else {
        return Ok(Vec::new());
    };
    if c.device {
        send_on(c, &a, now)?;
    }
    send_to_devices(tx, &c.id, &a, now, |d| d.elder).map_err(unwrap_abort)
}

/// A contact's GROUP message for another device of ours.
fn group_message(
    name: &str,
    group: &str,
    introduce: bool,
    members: Vec<[u8; 16]>,
) -> Option<DeviceMsg> {
    Some(DeviceMsg::Group {
        group: group_bytes(group)?,
        name: name.to_string(),
        introduce,
        members,
    })
}

/// The device connection a record's word rests on: `None` if it was made
/// here, added by the contact over such a connection, or verified here.
fn rests_on(c: &Contact) -> Option<&str> {
    if c.conn.verified {
        None
    } else {
        c.introduced_by.as_deref()
    }
}

/// Who may add to group `group` here (PROTOCOL.md §12.4): `None` if the
/// group is unknown here; `Some(None)` if it rests on this device alone
/// (made here, or verified here); `Some(Some(d))` if it was introduced by
/// our device connection `d`.
fn group_owner(tx: &Tx<'_>, group: &str) -> Result<Option<Option<String>>, StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let mut known = false;
    let mut owner: Option<String> = None;
    for e in index.iter().filter(|e| !e.device && e.group() == group) {
        let Some(m) = records::load(tx, &e.id)? else {
            continue;
        };
        known = true;
        match rests_on(&m) {
            None => return Ok(Some(None)),
            Some(d) => {
                owner.get_or_insert_with(|| d.to_string());
            }
        }
    }
    if known {
        return Ok(Some(owner));
    }
    Ok(tx
        .get::<GroupInfo>(&group_info_key(group))?
        .map(|g| Some(g.introduced_by)))
}

/// Whether device connection `d` may change group `group` here: an elder
/// may (it could remove this device anyway), and so may the device that
/// introduced the group; a younger device may not touch a contact that
/// does not rest on its word.
fn may_change_group(d: &Contact, owner: &Option<String>) -> bool {
    d.elder || owner.as_deref() == Some(d.id.as_str())
}

/// Deletes every connection of `group` here, its history and what we knew
/// of it; returns the receiving queues to delete on the relays.
fn forget_group_in(tx: &Tx<'_>, group: &str) -> Result<Vec<GrantedQueue>, StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let mut queues = Vec::new();
    for e in index.iter().filter(|e| !e.device && e.group() == group) {
        if let Some(m) = records::load(tx, &e.id)? {
            queues.extend(m.queue_grants());
        }
        Client::remove_member_in(tx, &e.id)?;
    }
    tx.delete(&group_info_key(group))?;
    tx.delete(&group_name_key(group))?;
    tx.remove_log(&history_log(group))?;
    tx.clear_seen(&group_seen(group))?;
    Ok(queues)
}

/// Voids an invitation or device link that nobody may use any more
/// (expired, revoked, copied): nothing more is sent on it, its queues are
/// deleted by its next job run, and the record goes with them.
pub(crate) fn withdraw(c: &mut Contact) {
    let queues = c.queue_grants();
    c.removed = true;
    c.sync_on_connect = false;
    c.held.clear();
    c.jobs.clear();
    c.outbox.clear();
    c.device_jobs.clear();
    c.push_device_job(DeviceJob::DeleteQueues { queues });
}

/// Called when connection `c` (being processed, saved by the caller)
/// completes its handshake. Returns other records changed.
pub(crate) fn on_connected(
    tx: &Tx<'_>,
    c: &mut Contact,
    settings: &Settings,
    now: u64,
    events: &mut Vec<Event>,
) -> Result<Vec<String>, ClientError> {
    let mut changed = Vec::new();
    // Our elder devices learn the new connection, so that they can cut it
    // off if this device is removed. Younger ones never hold our queue
    // keys: they could use them against us (PROTOCOL.md §12.6).
    if let Some(a) = announcement(c) {
        changed.extend(send_to_devices(tx, &c.id, &a, now, |d| d.elder).map_err(unwrap_abort)?);
    }
    if c.device {
        device_connected(tx, c, settings, now, events)?;
    } else if !c.introduced {
        // A contact made here: our other devices connect to it too, through
        // this connection (introduce: §12.4).
        changed.extend(introduce_to_devices(tx, c, c.conn.inviter, now).map_err(unwrap_abort)?);
    }
    Ok(changed)
}

/// What a device connection `c` that just completed is sent: for a device
/// we linked, the link (only once the user confirmed that device); the
/// connection's own queues always, last.
pub(crate) fn device_connected(
    tx: &Tx<'_>,
    c: &mut Contact,
    settings: &Settings,
    now: u64,
    events: &mut Vec<Event>,
) -> Result<(), ClientError> {
    if c.sync_on_connect && !c.link_confirmed {
        // Answered and connected while nobody watched (a cron job's recv):
        // the profile leaves this device only once the user says so.
        events.push(Event::Notice(format!(
            "the device that answered your device link {} is connected, but gets nothing \
             until you confirm it: `tern device confirm`",
            c.name
        )));
        return Ok(());
    }
    // The other device learns all our connections, this one included.
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let mut others: Vec<Contact> = Vec::new();
    for e in index.iter().filter(|e| e.id != c.id) {
        if let Some(o) = records::load(tx, &e.id)? {
            others.push(o);
        }
    }
    // In the order of PROTOCOL.md §12.4: what a new device needs, then
    // what every device needs to be able to remove us.
    let mut msgs: Vec<DeviceMsg> = Vec::new();
    if c.sync_on_connect {
        c.sync_on_connect = false;
        msgs.push(DeviceMsg::Settings {
            profile: settings.profile.to_bytes(),
            relays: settings.relay_addresses(),
            rotate_days: settings.rotate_days,
        });
        let mut groups: Vec<(String, Vec<&Contact>)> = Vec::new();
        for o in others.iter().filter(|o| !o.device && !o.removed) {
            match groups.iter_mut().find(|(g, _)| g == o.group()) {
                Some((_, v)) => v.push(o),
                None => groups.push((o.group().to_string(), vec![o])),
            }
        }
        let mut contacts = 0;
        for (group, members) in &groups {
            let live: Vec<&Contact> = members
                .iter()
                .copied()
                .filter(|m| m.conn.state == ConnState::Connected)
                .collect();
            let first = members[0];
            if !live.is_empty() {
                let ids = live.iter().map(|m| id_bytes(&m.id)).collect();
                if let Some(m) = group_message(&first.name, group, false, ids) {
                    c.awaiting_offers += live.len() as u32;
                    c.offer_slots.extend(live.iter().map(|m| m.id.clone()));
                    msgs.push(m);
                    contacts += 1;
                    c.await_group(group);
                }
            }
            let history: Vec<HistoryEntry> = tx
                .tail::<HistoryEntry>(&history_log(group), usize::MAX)?
                .into_iter()
                .map(|(_, e)| e)
                .collect();
            if let Some(g) = group_bytes(group) {
                msgs.extend(history_messages(
                    g,
                    history.iter().map(entry_of).collect(),
                    MAX_BODY_LEN,
                ));
            }
        }
        for o in others.iter().filter(|o| is_live_device(o)) {
            c.awaiting_offers += 1;
            c.offer_slots.push(o.id.clone());
            msgs.push(DeviceMsg::Sibling {
                device: id_bytes(&o.id),
                name: o.name.clone(),
            });
        }
        events.push(Event::Notice(format!(
            "device {} is linked: sending it the profile, {contacts} contact(s) and the history",
            c.name
        )));
    }
    // The device at the other end learns this connection's own queues
    // (always last: a new device waits for it); an elder device also
    // learns all our other connections.
    if c.elder {
        msgs.extend(
            others
                .iter()
                .filter(|o| o.conn.state == ConnState::Connected && !o.removed)
                .filter_map(announcement),
        );
    }
    msgs.extend(announcement(c));
    for m in &msgs {
        send_on(c, m, now)?;
    }
    Ok(())
}

/// Whether a DROP or REMOVED that came over connection `sender` may drop
/// connection `victim` (PROTOCOL.md §12.6). Authority follows age, so that a
/// device removed by an elder one cannot answer by removing it:
/// * with a contact's devices, only a connection introduced by ADD can be
///   dropped, by the connection made by hand or an older introduced one;
/// * among our devices, only an elder device can drop, and not an elder
///   connection older than its own.
fn may_drop(sender: &Contact, victim: &Contact) -> bool {
    if sender.device {
        sender.elder && (!victim.elder || sender.created_ms < victim.created_ms)
    } else {
        victim.introduced && (!sender.introduced || sender.created_ms < victim.created_ms)
    }
}

/// Drops connection `victim` (a device of a contact, or of ours, that was
/// removed) and every connection a contact added through it (ADD on it):
/// they are deleted here and their queues on the relays by `carrier`'s
/// next job run.
fn drop_connection(tx: &Tx<'_>, carrier: &mut Contact, victim: &Contact) -> Result<(), StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let mut gone = vec![victim.clone()];
    let mut i = 0;
    while i < gone.len() && gone.len() <= index.len() {
        let id = gone[i].id.clone();
        for e in &index {
            if gone.iter().any(|g| g.id == e.id) {
                continue;
            }
            if let Some(m) = records::load(tx, &e.id)? {
                if m.added_via.as_deref() == Some(id.as_str()) && !m.conn.verified {
                    gone.push(m);
                }
            }
        }
        i += 1;
    }
    let mut queues = Vec::new();
    for v in &gone {
        queues.extend(v.queue_grants());
        if v.device {
            queues.extend(v.announced.iter().flat_map(|a| a.queues.clone()));
        }
    }
    if !queues.is_empty() {
        carrier.push_device_job(DeviceJob::DeleteQueues { queues });
    }
    for v in &gone {
        Client::remove_member_in(tx, &v.id)?;
    }
    Ok(())
}

/// Acts on a device message that came over connection `c` (being processed,
/// saved by the caller). Returns other records changed.
///
/// Each message may change only what its sender has a say over (PROTOCOL.md
/// §12.3): a contact only its own devices' connections; the device that
/// linked this one the profile, contacts and history while linking; any
/// other device of ours what it introduced here, and what it itself sent
/// or received. Security codes and "verified" never come from another
/// device.
pub(crate) fn on_device_message(
    tx: &Tx<'_>,
    c: &mut Contact,
    settings: &Settings,
    body: &[u8],
    seq: u64,
    now: u64,
    events: &mut Vec<Event>,
) -> Result<Vec<String>, ClientError> {
    let msg = match DeviceMsg::decode(body) {
        Ok(m) => m,
        Err(e) => {
            events.push(Event::Warning(format!(
                "{} sent a device message that cannot be read ({e}); ignored",
                c.name
            )));
            return Ok(Vec::new());
        }
    };
    if !c.device && !msg.from_contact_allowed() {
        events.push(Event::Warning(format!(
            "{} sent a message meant for your own devices; ignored",
            c.name
        )));
        return Ok(Vec::new());
    }
    let mut changed = Vec::new();
    // What only the device that linked this one may send, and only while
    // it is linking: the profile with the relays, the contacts' history and
    // our other devices.
    let linking = c.linked_us && c.linking;
    let refuse = |events: &mut Vec<Event>, what: &str| {
        events.push(Event::Warning(format!(
            "device {} sent {what}, which it has no say over; ignored (if this keeps \
             happening, that device may be hostile: `tern device remove`)",
            c.name
        )));
    };
    match msg {
        DeviceMsg::Added { tag, fingerprint } => {
            let group = c.group().to_string();
            if let Some(w) = c.add_watch.iter_mut().find(|w| w.tag == tag) {
                w.boundary.get_or_insert(seq);
                w.since_ms = now;
                // The contact's new connection goes with the device it was
                // made for, even if that device never announces it.
                if let Some(mut d) = records::load(tx, &w.device)? {
                    if !d.announced.iter().any(|a| a.fingerprint == fingerprint) {
                        d.announced.push(Announced {
                            group: Some(group),
                            fingerprint,
                            queues: Vec::new(),
                        });
                        records::save(tx, &d)?;
                    }
                }
            }
        }
        DeviceMsg::Add {
            name,
            introduce,
            invitation,
        } => {
            // Each ADD costs us queues on our relays: a contact (or device)
            // must not be able to make us create them without end.
            let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
            let group = c.group().to_string();
            let members = index
                .iter()
                .filter(|e| e.device == c.device && (c.device || e.group() == group))
                .count()
                + c.device_jobs.len();
            if members >= MAX_DEVICES {
                events.push(Event::Warning(format!(
                    "{} asked to connect more than {MAX_DEVICES} devices; ignored",
                    c.name
                )));
                return Ok(changed);
            }
            c.push_device_job(DeviceJob::Accept {
                invitation,
                name,
                introduce,
            });
        }
        DeviceMsg::Drop { fingerprint } => {
            let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
            let group = c.group().to_string();
            let (own, device) = (c.id.clone(), c.device);
            for e in index
                .iter()
                .filter(|e| e.id != own && e.device == device)
                .filter(|e| device || e.group() == group)
            {
                let Some(victim) = records::load(tx, &e.id)? else {
                    continue;
                };
                if victim.fingerprint() != Some(fingerprint) {
                    continue;
                }
                if !may_drop(c, &victim) {
                    events.push(Event::Warning(format!(
                        "{} asked to drop a connection it has no say over; ignored",
                        c.name
                    )));
                    continue;
                }
                drop_connection(tx, c, &victim)?;
                events.push(Event::Notice(format!(
                    "{} removed one of their devices",
                    c.name
                )));
            }
        }
        DeviceMsg::Removed { fingerprints } => {
            if c.fingerprint().is_some_and(|f| fingerprints.contains(&f)) {
                // Naming the connection it came on: this device is the one
                // removed. Only an elder may say so.
                if !c.elder {
                    refuse(events, "a removal of this device");
                    return Ok(changed);
                }
                changed.extend(removed_here(tx, c, now, events)?);
                return Ok(changed);
            }
            let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
            let own = c.id.clone();
            for e in index.iter().filter(|e| e.id != own && e.device) {
                let Some(victim) = records::load(tx, &e.id)? else {
                    continue;
                };
                if victim
                    .fingerprint()
                    .is_some_and(|f| fingerprints.contains(&f))
                    && may_drop(c, &victim)
                {
                    drop_connection(tx, c, &victim)?;
                    if victim.elder {
                        // We announced our queues to it (it was elder):
                        // move to queues it never saw.
                        c.rotation_wanted = true;
                        changed.extend(for_each_other(tx, &c.id, |o| {
                            let live = o.conn.state == ConnState::Connected && !o.removed;
                            o.rotation_wanted |= live;
                            Ok(live)
                        })?);
                    }
                    events.push(Event::Notice(format!(
                        "device {} was removed from this profile",
                        victim.name
                    )));
                }
            }
        }
        DeviceMsg::Settings {
            profile,
            relays,
            rotate_days,
        } => {
            if !linking {
                refuse(
                    events,
                    "settings (relays, profile) outside of linking this device",
                );
                return Ok(changed);
            }
            let profile = Profile::from_bytes(&profile)?;
            let mut s = settings.clone();
            s.profile = profile;
            if !relays.is_empty() {
                s.relays = relays.iter().map(ToString::to_string).collect();
            }
            s.rotate_days = rotate_days;
            tx.put(SETTINGS, &s)?;
            events.push(Event::Notice(format!(
                "received the profile ({}) from device {}",
                s.profile.name, c.name
            )));
        }
        DeviceMsg::Profile { profile } => {
            let profile = Profile::from_bytes(&profile)?;
            if profile.validate().is_err() {
                refuse(events, "a profile that is not valid");
                return Ok(changed);
            }
            let mut s: Settings = tx.get(SETTINGS)?.unwrap_or_else(|| settings.clone());
            if s.profile != profile {
                s.profile = profile;
                s.profile_changed_on = Some(c.name.clone());
                tx.put(SETTINGS, &s)?;
                events.push(Event::Notice(format!(
                    "profile changed on device {}: now {:?}",
                    c.name, s.profile.name
                )));
            }
        }
        DeviceMsg::Group {
            group,
            name,
            introduce,
            members,
        } => {
            let group = HEXLOWER.encode(&group);
            match group_owner(tx, &group)? {
                Some(owner) => {
                    // More connections for a contact we have: only from the
                    // device it rests on, or an elder.
                    if !may_change_group(c, &owner) {
                        let known = group_name(tx, &group)?;
                        refuse(events, &format!("a new connection for {known}"));
                        return Ok(changed);
                    }
                }
                None => {
                    tx.put(
                        &group_info_key(&group),
                        &GroupInfo {
                            name: name.clone(),
                            introduced_by: c.id.clone(),
                        },
                    )?;
                    tx.put(&group_name_key(&group), &name)?;
                    if !linking {
                        events.push(Event::Notice(format!(
                            "your device {} connected with a new contact, {name:?}: this device \
                             meets them too (introduced by {}, not verified here)",
                            c.name, c.name
                        )));
                    }
                }
            }
            for via in members.into_iter().take(MAX_DEVICES) {
                c.push_device_job(DeviceJob::Offer {
                    via,
                    group: Some(group.clone()),
                    name: name.clone(),
                    code: None,
                    introduce,
                });
            }
        }
        DeviceMsg::Sibling { device, name } => {
            if !linking {
                refuse(
                    events,
                    "another device to connect to outside of linking this device",
                );
                return Ok(changed);
            }
            c.push_device_job(DeviceJob::Offer {
                via: device,
                group: None,
                name,
                code: None,
                introduce: false,
            });
        }
        DeviceMsg::Offer {
            via,
            introduce,
            invitation,
        } => {
            let via = HEXLOWER.encode(&via);
            // Only through a connection we named to that device, once: it
            // must not make us introduce whatever it likes to our contacts.
            let Some(slot) = c.offer_slots.iter().position(|s| *s == via) else {
                refuse(
                    events,
                    "an invitation to forward through a connection it was never given",
                );
                return Ok(changed);
            };
            c.offer_slots.remove(slot);
            c.awaiting_offers = c.awaiting_offers.saturating_sub(1);
            let Some(mut target) = records::load(tx, &via)? else {
                events.push(Event::Warning(format!(
                    "device {} offered a connection through one that is gone; ignored",
                    c.name
                )));
                return Ok(changed);
            };
            let add = DeviceMsg::Add {
                name: if target.device {
                    c.name.clone()
                } else {
                    String::new()
                },
                introduce,
                invitation,
            };
            if !target.device {
                c.await_group(target.group());
                if let DeviceMsg::Add { invitation, .. } = &add {
                    target.add_watch.push(AddWatch {
                        tag: added_tag(invitation),
                        device: c.id.clone(),
                        boundary: None,
                        since_ms: now,
                    });
                }
            }
            if target.id == c.id {
                send_on(c, &add, now)?;
            } else {
                send_on(&mut target, &add, now)?;
                records::save(tx, &target)?;
                changed.push(target.id.clone());
            }
        }
        DeviceMsg::History { group, entries } => {
            if !linking {
                refuse(events, "history outside of linking this device");
                return Ok(changed);
            }
            let group = HEXLOWER.encode(&group);
            for e in &entries {
                let mut entry = history_of(e);
                entry.device = Some(c.name.clone());
                record_history(tx, &group, &entry)?;
            }
        }
        DeviceMsg::Copy { group, entry } => {
            let group = HEXLOWER.encode(&group);
            // What that device itself sent or received: with a contact we
            // know, and that it is in (or joining) as far as we can tell.
            let allowed = match group_owner(tx, &group)? {
                None => false,
                Some(owner) => {
                    may_change_group(c, &owner)
                        || c.pending_groups.contains(&group)
                        || c.announced
                            .iter()
                            .any(|a| a.group.as_deref() == Some(group.as_str()))
                }
            };
            if !allowed {
                refuse(
                    events,
                    "a copy of a message with a contact it has no connection with",
                );
                return Ok(changed);
            }
            let mut entry = history_of(&entry);
            entry.device = Some(c.name.clone());
            if record_history(tx, &group, &entry)? {
                let name = group_name(tx, &group)?;
                events.push(Event::Message {
                    contact: name,
                    entry,
                    chain: crate::proto::envelope::ChainStatus::InOrder,
                    delivery: None,
                });
            }
        }
        DeviceMsg::Announce {
            group,
            fingerprint,
            queues,
        } => {
            let group = group.map(|g| HEXLOWER.encode(&g));
            if let Some(g) = &group {
                c.pending_groups.retain(|p| p != g);
            } else if linking && c.fingerprint() == Some(fingerprint) {
                // The linking device's own announcement comes last (§12.4):
                // the link is complete, and with it that device's say over
                // our settings and history.
                c.linking = false;
            }
            c.announced.retain(|a| a.fingerprint != fingerprint);
            c.announced.push(Announced {
                group,
                fingerprint,
                queues: queues
                    .into_iter()
                    .map(|q| GrantedQueue {
                        relay: q.relay,
                        recipient_id: q.recipient_id,
                        auth: q.auth,
                    })
                    .collect(),
            });
        }
        DeviceMsg::Forget { group } => {
            let group = HEXLOWER.encode(&group);
            let Some(owner) = group_owner(tx, &group)? else {
                return Ok(changed);
            };
            let name = group_name(tx, &group)?;
            if may_change_group(c, &owner) {
                let queues = forget_group_in(tx, &group)?;
                if !queues.is_empty() {
                    c.push_device_job(DeviceJob::DeleteQueues { queues });
                }
                events.push(Event::Notice(format!(
                    "{name} was forgotten on device {}: forgotten here too",
                    c.name
                )));
            } else {
                events.push(Event::Notice(format!(
                    "device {} forgot {name}; this device keeps them (that device was linked \
                     after this one): `tern forget {name}` to forget them here too",
                    c.name
                )));
            }
        }
    }
    Ok(changed)
}

/// Another device (our elder, over connection `c`) removed this one from
/// the profile: from now on it sends nothing, and it forgets its devices,
/// deleting its own queues of those connections.
fn removed_here(
    tx: &Tx<'_>,
    c: &mut Contact,
    now: u64,
    events: &mut Vec<Event>,
) -> Result<Vec<String>, ClientError> {
    let mut s: Settings = tx
        .get(SETTINGS)?
        .ok_or_else(|| ClientError::Invalid("the profile has no settings".into()))?;
    s.removed = Some(Removal {
        by: c.name.clone(),
        at_ms: now,
    });
    tx.put(SETTINGS, &s)?;
    withdraw(c);
    let changed = for_each_device(tx, &c.id, |d| {
        if d.removed {
            return Ok(false);
        }
        withdraw(d);
        Ok(true)
    })?;
    events.push(Event::Warning(format!(
        "this device was removed from the profile by device {}: it receives nothing new \
         and cannot send any more",
        c.name
    )));
    events.push(Event::Pending(c.id.clone()));
    Ok(changed)
}

/// The name of a contact by group id, even before we have a connection in it.
fn group_name(tx: &Tx<'_>, group: &str) -> Result<String, StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    if let Some(e) = index.iter().find(|e| e.group() == group && !e.device) {
        return Ok(e.name.clone());
    }
    Ok(tx
        .get::<String>(&group_name_key(group))?
        .unwrap_or_else(|| "?".to_string()))
}

/// Sends our profile to our other devices after the user changed it here
/// (PROFILE: relays and preferences stay per device once linked); returns
/// the records with work to upload.
pub(crate) fn sync_settings(client: &mut Client) -> Result<Vec<String>, ClientError> {
    let t = now();
    client
        .store
        .transaction(|tx| {
            let settings: Settings = tx
                .get(SETTINGS)?
                .ok_or_else(|| abort(ClientError::Invalid("the profile has no settings".into())))?;
            let msg = DeviceMsg::Profile {
                profile: settings.profile.to_bytes(),
            };
            send_to_devices(tx, "", &msg, t, |_| true)
        })
        .map_err(unwrap_abort)
}

/// A second, different request for a device link we made (connection `c`):
/// the link was copied on its way, and one of the two devices is not ours.
/// Before anything was sent, the link is cancelled for both; after, the
/// user is told to look at the device list (PROTOCOL.md §12.2).
pub(crate) fn device_link_copied(tx: &Tx<'_>, c: &mut Contact) -> Result<Vec<Event>, ClientError> {
    if !c.sync_on_connect {
        return Ok(vec![Event::Warning(format!(
            "a second device answered the device link that linked {}: the link was copied on \
             its way. If {} is not your device, remove it now (`tern device remove`)",
            c.name, c.name
        ))]);
    }
    withdraw(c);
    records::save(tx, &*c)?;
    Ok(vec![
        Event::Warning(
            "two devices answered your device link: it was copied on its way. Nothing was sent \
             to either and the link is cancelled; make a new one (`tern device link`) and show \
             it only to your own device"
                .to_string(),
        ),
        Event::Pending(c.id.clone()),
    ])
}

/// A request for device link `c` that came while no linking command ran
/// (a cron job's `tern recv`): checked, then kept for `tern device
/// confirm`, unanswered. A second, different one means the link was
/// copied: cancelled for both.
pub(crate) fn hold_request(
    tx: &Tx<'_>,
    c: &mut Contact,
    recipient_id: &tern_wire::Id,
    message: &[u8],
    profile: &Profile,
    now: u64,
) -> Result<Vec<Event>, ClientError> {
    let mut probe = c.conn.clone();
    let received = match probe.receive(recipient_id, message, profile, now, &mut OsRng) {
        Ok(r) => r,
        Err(e) => {
            return Ok(vec![Event::Warning(format!(
                "dropped a request for your device link {} that could not be accepted: {e}",
                c.name
            ))])
        }
    };
    if c.held.iter().any(|h| h.digest == received.digest) {
        // The same request through another of the link's relays.
        return Ok(Vec::new());
    }
    if !c.held.is_empty() {
        return device_link_copied(tx, c);
    }
    let name = probe
        .peer_profile
        .map(|p| p.name)
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| UNNAMED_DEVICE.to_string());
    c.held.push(HeldRequest {
        recipient_id: *recipient_id,
        message: message.to_vec(),
        digest: received.digest,
        name: name.clone(),
        received_ms: now,
    });
    records::save(tx, &*c)?;
    Ok(vec![Event::Notice(format!(
        "a device calling itself {name:?} answered your device link {}: it gets nothing until \
         you confirm it here with `tern device confirm` (or withdraw the link: `tern device \
         revoke {}`)",
        c.name, c.name
    ))])
}

/// The news that connection `c`, made by devices introducing each other,
/// is up: a contact (or this profile) has one more device.
pub(crate) fn gained_device(tx: &Tx<'_>, c: &Contact) -> Result<String, StoreError> {
    let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
    let through = match &c.introduced_by {
        Some(d) => match records::load(tx, d)? {
            Some(dev) => format!("introduced by your device {}", dev.name),
            None => "introduced by a device that is gone".to_string(),
        },
        None => "added by them over an existing connection".to_string(),
    };
    Ok(if c.device {
        let n = index.iter().filter(|e| e.device).count() + 1;
        format!(
            "device {} joined this profile ({n} devices now; {through})",
            c.name
        )
    } else {
        let n = index
            .iter()
            .filter(|e| !e.device && e.group() == c.group())
            .count();
        format!(
            "{} has a new device ({n} connected with you now; {through})",
            c.name
        )
    })
}

/// How far a connection's keys are known to be the contact's, from this
/// device's own knowledge only (PROTOCOL.md §12.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Introduced by another device of ours (its name) and not verified
    /// here: it rests on that device's word.
    Introduced(String),
    Level(SecurityLevel),
}

impl Trust {
    fn rank(&self) -> u8 {
        match self {
            Trust::Introduced(_) => 0,
            Trust::Level(SecurityLevel::Shared) => 1,
            Trust::Level(SecurityLevel::InPerson) => 2,
            Trust::Level(SecurityLevel::Verified) => 3,
        }
    }
}

/// The trust of connection `c`, among `all` our records: verified here, or
/// resting on one of our devices, or that of the connection a contact
/// added it through, or its own level.
pub fn connection_trust(all: &[Contact], c: &Contact) -> Trust {
    let mut c = c;
    for _ in 0..=all.len() {
        if c.conn.verified {
            return Trust::Level(SecurityLevel::Verified);
        }
        if let Some(d) = &c.introduced_by {
            let name = all
                .iter()
                .find(|o| &o.id == d)
                .map_or_else(|| "a removed device".to_string(), |o| o.name.clone());
            return Trust::Introduced(name);
        }
        match c
            .added_via
            .as_ref()
            .and_then(|v| all.iter().find(|o| &o.id == v))
        {
            Some(carrier) => c = carrier,
            None => break,
        }
    }
    Trust::Level(c.conn.security_level())
}

/// A contact's trust: that of its weakest connection, since what we send
/// goes to every one of them.
pub fn group_trust(all: &[Contact], members: &[&Contact]) -> Trust {
    let connected: Vec<&&Contact> = members
        .iter()
        .filter(|m| m.conn.state == ConnState::Connected)
        .collect();
    let pick: Vec<&Contact> = if connected.is_empty() {
        members.iter().take(1).copied().collect()
    } else {
        connected.into_iter().copied().collect()
    };
    pick.into_iter()
        .map(|m| connection_trust(all, m))
        .min_by_key(Trust::rank)
        .unwrap_or(Trust::Level(SecurityLevel::Shared))
}

/// What `tern device remove` did.
#[derive(Debug, Default)]
pub struct RemoveReport {
    /// Contacts told to drop the device's connections.
    pub contacts_told: usize,
    /// Queues of the device still to delete (a relay was unreachable).
    pub queues_left: usize,
    /// Contacts whose connections here rested on the device's word alone,
    /// dropped with it.
    pub contacts_dropped: Vec<String>,
    /// Devices it linked (or introduced), removed with it.
    pub devices_removed: Vec<String>,
}

impl Client {
    /// Our other devices (including removed ones whose queues are still
    /// being deleted).
    pub fn devices(&self) -> Result<Vec<Contact>, ClientError> {
        Ok(self.contacts()?.into_iter().filter(|c| c.device).collect())
    }

    /// Finds another device of ours by name.
    pub fn device_id(&self, name: &str) -> Result<String, ClientError> {
        self.index()?
            .into_iter()
            .find(|e| e.name == name && e.device)
            .map(|e| e.id)
            .ok_or_else(|| {
                ClientError::Invalid(format!("no device named {name:?}: see `tern device list`"))
            })
    }

    /// `tern device link`: a one-time device link over new queues, void
    /// after `expires_ms`; returns the link and the id of the connection it
    /// will become.
    pub fn link_device(
        &mut self,
        channel: Channel,
        expires_ms: u64,
    ) -> Result<(String, String), ClientError> {
        let queues = self.create_queues()?;
        let (conn, invitation) = Connection::invite_device(queues, channel, &mut OsRng);
        let id = new_contact_id();
        let name = format!("new-device-{}", &id[..6]);
        let mut record = Contact::new(id, name.clone(), true, conn, now());
        record.device = true;
        record.sync_on_connect = true;
        record.expires_ms = expires_ms;
        self.store
            .transaction(|tx| {
                let mut s: Settings = tx.get(SETTINGS)?.ok_or_else(|| {
                    abort(ClientError::Invalid("the profile has no settings".into()))
                })?;
                if s.device_name.is_empty() {
                    s.device_name = default_device_name();
                    tx.put(SETTINGS, &s)?;
                }
                Client::add_contact_in(tx, &record)
            })
            .map_err(unwrap_abort)?;
        Ok((invitation.to_device_link(), record.id.clone()))
    }

    /// `tern device join`: accepts a device link; returns the id of the
    /// connection to the linking device and whether the request went out.
    pub fn join_device(
        &mut self,
        invitation: &Invitation,
        channel: Channel,
    ) -> Result<(String, [u8; 16]), ClientError> {
        let settings = self.settings()?;
        let queues = self.create_queues()?;
        let t = now();
        let (conn, request) = Connection::accept_device(
            invitation,
            queues,
            &device_profile(&settings),
            channel,
            t,
            &mut OsRng,
        )?;
        let id = new_contact_id();
        let mut record = Contact::new(id.clone(), format!("device-{}", &id[..6]), true, conn, t);
        record.device = true;
        // The device that made the link was there first, and has a say over
        // our settings and history until it has sent the link.
        record.elder = true;
        record.linked_us = true;
        record.linking = true;
        let request_id = push_request(&mut record, request, t);
        self.add_contact(&record)?;
        Ok((id, request_id))
    }

    /// Runs the device jobs of record `id`, one at a time, each claimed in
    /// a transaction first: another tern process on the same profile skips
    /// what this one is doing, and a step that re-enters (a job run that
    /// runs jobs) finds only what is left.
    pub(crate) fn run_device_jobs(&mut self, id: &str) -> Result<(), ClientError> {
        loop {
            let t = now();
            let me = std::process::id();
            let claimed = self.update_contact(id, |_, c| {
                let Some(task) = c.device_jobs.iter_mut().find(|task| {
                    task.claimed_until_ms <= t
                        || (task.claimed_by != me && !process_alive(task.claimed_by))
                }) else {
                    return Ok(None);
                };
                task.claimed_until_ms = t + CLAIM_MS;
                task.claimed_by = me;
                Ok(Some(task.clone()))
            });
            let task = match claimed {
                Ok(Some(task)) => task,
                Ok(None) => break,
                // A removed device's record, gone with its last job.
                Err(ClientError::UnknownContact(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let result = match &task.job {
                DeviceJob::Offer {
                    via,
                    group,
                    name,
                    code,
                    introduce,
                } => self.make_offer(
                    id,
                    task.id,
                    *via,
                    group.as_deref(),
                    name,
                    code.clone(),
                    *introduce,
                ),
                DeviceJob::Accept {
                    invitation,
                    name,
                    introduce,
                } => self.accept_add(id, task.id, invitation, name, *introduce),
                DeviceJob::DeleteQueues { queues } => {
                    let left = self.delete_granted(queues);
                    self.update_contact(id, |_, c| {
                        if let Some(i) = c.device_jobs.iter().position(|j| j.id == task.id) {
                            if left.is_empty() {
                                c.device_jobs.remove(i);
                            } else {
                                c.device_jobs[i].job = DeviceJob::DeleteQueues {
                                    queues: left.clone(),
                                };
                                c.device_jobs[i].claimed_until_ms = 0;
                            }
                        }
                        Ok(())
                    })?;
                    if !left.is_empty() {
                        // Retried by the next command, not in this loop.
                        break;
                    }
                    Ok(())
                }
            };
            match result {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    self.update_contact(id, |_, c| {
                        for j in c.device_jobs.iter_mut().filter(|j| j.id == task.id) {
                            j.claimed_until_ms = 0;
                        }
                        Ok(())
                    })?;
                    return Err(e);
                }
                Err(e) => {
                    // Never retried: an invitation that cannot be used stays
                    // unusable. Say so, drop the job.
                    eprintln!(
                        "tern: warning: device step failed: {}",
                        crate::proto::text::escape_text(&e.to_string())
                    );
                    self.update_contact(id, |_, c| {
                        c.device_jobs.retain(|j| j.id != task.id);
                        Ok(())
                    })?;
                }
            }
        }
        self.forget_if_removed(id)
    }

    /// A removed (or withdrawn) record goes once its queues are gone and
    /// what it still had to send (the news of a removal) went out.
    pub(crate) fn forget_if_removed(&mut self, id: &str) -> Result<(), ClientError> {
        if let Ok(c) = self.contact(id) {
            if c.removed && c.device_jobs.is_empty() && c.jobs.is_empty() && c.outbox.is_empty() {
                self.remove_contact(id)?;
            }
        }
        Ok(())
    }

    /// Deletes granted queues; returns those a relay could not be asked to
    /// delete yet.
    fn delete_granted(&self, queues: &[GrantedQueue]) -> Vec<GrantedQueue> {
        let mut left = Vec::new();
        for q in queues {
            let signer = ed25519_dalek::SigningKey::from_bytes(q.auth.as_bytes());
            match self.net.call_for(
                &q.relay,
                Some(&q.recipient_id),
                &Command::Delete {
                    recipient_id: q.recipient_id,
                    if_empty: false,
                },
                Some(&signer),
            ) {
                Ok(_) => {}
                // Gone already (deleted by its owner or by another device).
                Err(e) if e.code() == Some(ErrorCode::Auth) => {}
                Err(_) => left.push(q.clone()),
            }
        }
        left
    }

    /// Makes an invitation for a contact's device or another device of
    /// ours, and sends it to the device that asked, to forward.
    #[allow(clippy::too_many_arguments)]
    fn make_offer(
        &mut self,
        carrier: &str,
        task: [u8; 16],
        via: [u8; 16],
        group: Option<&str>,
        name: &str,
        code: Option<RootCode>,
        introduce: bool,
    ) -> Result<(), ClientError> {
        let queues = self.create_queues()?;
        let (conn, invitation) = Connection::invite(queues, Channel::Shared, &mut OsRng);
        let t = now();
        let mut record = Contact::new(new_contact_id(), name.to_string(), false, conn, t);
        record.introduced = true;
        // It rests on the word of the device that asked for it.
        record.introduced_by = Some(carrier.to_string());
        let _ = code;
        match group {
            Some(g) => {
                record.group = g.to_string();
            }
            None => {
                // A device we are introduced to while being linked was
                // linked before us.
                record.device = true;
                record.elder = true;
            }
        }
        let offer = DeviceMsg::Offer {
            via,
            introduce,
            invitation: invitation.encode(),
        };
        self.store
            .transaction(|tx| {
                // A group's connections share the name it already has here.
                let existing = tx
                    .get::<Vec<IndexEntry>>(INDEX)?
                    .unwrap_or_default()
                    .into_iter()
                    .find(|e| group.is_some() && Some(e.group()) == group && !e.device);
                record.name = match existing {
                    Some(e) => e.name,
                    None => Client::unique_name(tx, &record.name, &record.id)?,
                };
                let mut c: Contact = records::load(tx, carrier)?
                    .ok_or_else(|| abort(ClientError::UnknownContact(carrier.into())))?;
                if !c.device_jobs.iter().any(|j| j.id == task) {
                    // Done meanwhile by a process whose claim had expired.
                    return Ok(());
                }
                Client::add_contact_in(tx, &record)?;
                send_on(&mut c, &offer, t).map_err(abort)?;
                c.device_jobs.retain(|j| j.id != task);
                records::save(tx, &c)?;
                Ok(())
            })
            .map_err(unwrap_abort)?;
        // The OFFER goes out with the carrier's other jobs, which the caller
        // (run_jobs) runs next.
        Ok(())
    }

    /// Accepts an invitation a contact (or another device of ours) sent in
    /// an ADD: a new connection in the same group as `carrier`.
    fn accept_add(
        &mut self,
        carrier: &str,
        task: [u8; 16],
        invitation: &[u8],
        name: &str,
        introduce: bool,
    ) -> Result<(), ClientError> {
        let tag = added_tag(invitation);
        let invitation = Invitation::decode(invitation)?;
        let c = self.contact(carrier)?;
        let settings = self.settings()?;
        let profile = if c.device {
            device_profile(&settings)
        } else {
            settings.profile.clone()
        };
        let queues = self.create_queues()?;
        let t = now();
        let (conn, request) = Connection::accept(
            &invitation,
            queues,
            &profile,
            Channel::Shared,
            t,
            &mut OsRng,
        )?;
        let id = new_contact_id();
        let mut record = Contact::new(id.clone(), c.name.clone(), false, conn, t);
        record.introduced = true;
        if c.device {
            // A device another device of ours introduces rests on its word.
            record.device = true;
            record.introduced_by = Some(c.id.clone());
            record.name = if name.trim().is_empty() {
                UNNAMED_DEVICE.to_string()
            } else {
                name.trim().to_string()
            };
        } else {
            // The contact's own device, added over connection `c`: it
            // rests on what `c` rests on.
            record.group = c.group().to_string();
            record.added_via = Some(c.id.clone());
            record.introduced_by = rests_on(&c).map(str::to_string);
        }
        push_request(&mut record, request, t);
        let mut touched = Vec::new();
        let done = self
            .store
            .transaction(|tx| {
                let Some(mut c) = records::load(tx, carrier)? else {
                    return Ok(false);
                };
                if !c.device_jobs.iter().any(|j| j.id == task) {
                    // Done meanwhile by a process whose claim had expired.
                    return Ok(false);
                }
                c.device_jobs.retain(|j| j.id != task);
                if !c.device {
                    // From here on the person's new device gets what we send
                    // from us directly: tell the device that forwarded it.
                    let fingerprint = record.fingerprint().unwrap_or_default();
                    send_on(&mut c, &DeviceMsg::Added { tag, fingerprint }, t).map_err(abort)?;
                }
                records::save(tx, &c)?;
                if record.device {
                    let base = record.name.clone();
                    record.name = Client::unique_name(tx, &base, &record.id)?;
                }
                Client::add_contact_in(tx, &record)?;
                if introduce && !record.device {
                    // The contact's new device must meet our other devices
                    // too; they make the invitations, the new connection
                    // carries them.
                    touched = introduce_to_devices(tx, &record, false, t)?;
                }
                Ok(true)
            })
            .map_err(unwrap_abort)?;
        if done {
            self.run_jobs(&id)?;
            for d in touched {
                self.run_jobs(&d)?;
            }
        }
        Ok(())
    }

    /// `tern device remove`: cuts device `id` off. Contacts are told to drop
    /// its connections, our other devices to forget it, and its queues are
    /// deleted with the keys it granted us, so it receives nothing new even
    /// if it never cooperates; the device itself is told (so that it knows).
    /// Everything that rests on its word alone goes with it: the devices it
    /// linked, and the connections with contacts it introduced here and
    /// that were not verified here.
    pub fn remove_device(&mut self, id: &str) -> Result<RemoveReport, ClientError> {
        let mut report = RemoveReport::default();
        let mut todo = vec![id.to_string()];
        let mut first = true;
        while let Some(next) = todo.pop() {
            let (r, dependents) = match self.remove_one_device(&next, first) {
                Ok(r) => r,
                // A dependent already gone, or one this device may not remove.
                Err(e) if !first => {
                    eprintln!("tern: warning: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !first {
                report.devices_removed.push(r.0);
            }
            first = false;
            report.contacts_told += r.1.contacts_told;
            report.queues_left += r.1.queues_left;
            report.contacts_dropped.extend(r.1.contacts_dropped);
            todo.extend(dependents);
        }
        Ok(report)
    }

    /// Removes one device; returns its name, what was done, and the devices
    /// that rest on it (to remove next).
    fn remove_one_device(
        &mut self,
        id: &str,
        refuse_elder: bool,
    ) -> Result<((String, RemoveReport), Vec<String>), ClientError> {
        let t = now();
        let mut report = RemoveReport::default();
        let (name, touched, dependents) = self
            .store
            .transaction(|tx| {
                let mut r: Contact = records::load(tx, id)?
                    .ok_or_else(|| abort(ClientError::UnknownContact(id.into())))?;
                if r.elder && refuse_elder {
                    return Err(abort(ClientError::Invalid(format!(
                        "{} was linked before this device, so this device cannot remove it \
                         (it could do the same to this one): remove it from the device that \
                         linked this one, or from the first device",
                        r.name
                    ))));
                }
                if r.removed {
                    return Err(abort(ClientError::Invalid(format!(
                        "{} is being removed already",
                        r.name
                    ))));
                }
                let mut fingerprints: Vec<[u8; 32]> =
                    r.announced.iter().map(|a| a.fingerprint).collect();
                let own = r.fingerprint();
                if let Some(f) = own {
                    fingerprints.push(f);
                }
                let announced = r.announced.clone();
                let mut told = 0;
                let mut changed = for_each_other(tx, id, |o| {
                    if o.removed || o.conn.state != ConnState::Connected {
                        return Ok(false);
                    }
                    if o.device {
                        send_on(
                            o,
                            &DeviceMsg::Removed {
                                fingerprints: fingerprints.clone(),
                            },
                            t,
                        )?;
                        return Ok(true);
                    }
                    let mut any = false;
                    let group = o.group().to_string();
                    for a in announced
                        .iter()
                        .filter(|a| a.group.as_deref() == Some(group.as_str()))
                    {
                        send_on(
                            o,
                            &DeviceMsg::Drop {
                                fingerprint: a.fingerprint,
                            },
                            t,
                        )?;
                        any = true;
                    }
                    told += usize::from(any);
                    Ok(any)
                })?;
                report.contacts_told = told;
                // What rests on its word alone goes with it.
                let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
                let mut queues = r.queue_grants();
                let mut dependents = Vec::new();
                for e in index.iter().filter(|e| e.id != id) {
                    let Some(m) = records::load(tx, &e.id)? else {
                        continue;
                    };
                    if rests_on(&m) != Some(id) {
                        continue;
                    }
                    if m.device {
                        dependents.push(m.id.clone());
                    } else {
                        queues.extend(m.queue_grants());
                        if !report.contacts_dropped.contains(&m.name) {
                            report.contacts_dropped.push(m.name.clone());
                        }
                        Client::remove_member_in(tx, &m.id)?;
                        changed.retain(|c| c != &m.id);
                    }
                }
                // Its queues, but the one of our connection with it: that
                // carries the news of its removal, and it deletes it.
                queues.extend(
                    announced
                        .iter()
                        .filter(|a| !(a.group.is_none() && Some(a.fingerprint) == own))
                        .flat_map(|a| a.queues.clone()),
                );
                r.removed = true;
                r.jobs.clear();
                r.outbox.clear();
                r.device_jobs.clear();
                r.held.clear();
                r.sync_on_connect = false;
                if let (Some(f), ConnState::Connected) = (own, r.conn.state) {
                    send_on(
                        &mut r,
                        &DeviceMsg::Removed {
                            fingerprints: vec![f],
                        },
                        t,
                    )
                    .map_err(abort)?;
                }
                r.push_device_job(DeviceJob::DeleteQueues { queues });
                records::save(tx, &r)?;
                Ok((r.name.clone(), changed, dependents))
            })
            .map_err(unwrap_abort)?;
        // The queues first: that is what stops the device at once; then the
        // news of the removal, to the device itself.
        self.run_jobs(id)?;
        report.queues_left = match self.contact(id) {
            Ok(c) => c
                .device_jobs
                .iter()
                .map(|t| match &t.job {
                    DeviceJob::DeleteQueues { queues } => queues.len(),
                    _ => 0,
                })
                .sum(),
            Err(_) => 0,
        };
        for other in touched {
            self.run_jobs(&other)?;
        }
        Ok(((name, report), dependents))
    }

    /// Withdraws device link or invitation `id` (`tern device revoke`,
    /// `tern invitations revoke`): nobody can use it from now on.
    pub fn revoke_invitation(&mut self, id: &str) -> Result<(), ClientError> {
        self.update_contact(id, |_, c| {
            let pending = c.is_pending_link()
                || (!c.device && c.conn.state == ConnState::Invited && !c.removed);
            if !pending {
                return Err(ClientError::Invalid(format!(
                    "{} is not a pending invitation or device link",
                    c.name
                )));
            }
            withdraw(c);
            Ok(())
        })?;
        self.run_jobs(id)?;
        Ok(())
    }

    /// Withdraws every invitation and device link whose time is up; tells
    /// `on_event` of each.
    pub(crate) fn withdraw_expired(
        &mut self,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ClientError> {
        let contacts = self.contacts()?;
        self.withdraw_expired_in(&contacts, on_event).map(|_| ())
    }

    /// [`Client::withdraw_expired`] deciding from records already read;
    /// true if anything was withdrawn.
    pub(crate) fn withdraw_expired_in(
        &mut self,
        contacts: &[Contact],
        on_event: &mut dyn FnMut(Event),
    ) -> Result<bool, ClientError> {
        let t = now();
        let expired: Vec<Contact> = contacts.iter().filter(|c| c.expired(t)).cloned().collect();
        let any = !expired.is_empty();
        for c in expired {
            self.update_contact(&c.id, |_, c| {
                withdraw(c);
                Ok(())
            })?;
            on_event(Event::Notice(format!(
                "{} {} expired unused: withdrawn",
                if c.device {
                    "device link"
                } else {
                    "the invitation for"
                },
                c.name
            )));
            self.run_jobs(&c.id)?;
        }
        Ok(any)
    }

    /// `tern device confirm`: the user accepts the device that answered
    /// link `id`. Its kept request is answered now; once connected it gets
    /// the link (by whichever process sees that). Returns the device's name.
    pub fn confirm_link(&mut self, id: &str) -> Result<String, ClientError> {
        let c = self.contact(id)?;
        if !c.is_pending_link() {
            return Err(ClientError::Invalid(format!(
                "{} is not a device link waiting for confirmation",
                c.name
            )));
        }
        if c.expired(now()) {
            self.revoke_invitation(id)?;
            return Err(ClientError::Invalid(format!(
                "device link {} expired before it was confirmed: withdrawn; make a new one",
                c.name
            )));
        }
        self.linking = Some(id.to_string());
        let name = c
            .held
            .first()
            .map(|h| h.name.clone())
            .or_else(|| c.conn.peer_profile.as_ref().map(|p| p.name.clone()))
            .unwrap_or_else(|| UNNAMED_DEVICE.to_string());
        if let Some(h) = c.held.first().cloned() {
            let Some(q) = c.conn.recv_queue(&h.recipient_id).cloned() else {
                return Err(ClientError::Invalid("the link's queue is gone".into()));
            };
            let events = self
                .store
                .transaction(|tx| {
                    super::fetch::process_held(tx, id, &q, &h.message, now(), Some(id))
                })
                .map_err(unwrap_abort)?;
            for e in events {
                if let Event::Warning(w) = e {
                    eprintln!("tern: warning: {w}");
                }
            }
        } else {
            let settings = self.settings()?;
            let mut events = Vec::new();
            self.store
                .transaction(|tx| {
                    let mut c: Contact = records::load(tx, id)?
                        .ok_or_else(|| abort(ClientError::UnknownContact(id.into())))?;
                    c.link_confirmed = true;
                    if c.conn.state == ConnState::Connected {
                        device_connected(tx, &mut c, &settings, now(), &mut events)
                            .map_err(abort)?;
                    }
                    records::save(tx, &c)
                })
                .map_err(unwrap_abort)?;
        }
        self.run_jobs(id)?;
        Ok(name)
    }

    /// `tern forget` for the whole profile: deletes the contact of
    /// connection `id` here (queues, keys, history) and tells our other
    /// devices to do the same (they do as far as this device has a say
    /// there, PROTOCOL.md §12.3). Returns queue deletions that failed.
    pub fn forget_contact(&mut self, id: &str) -> Result<Vec<String>, ClientError> {
        let group = self.contact(id)?.group().to_string();
        let t = now();
        let (queues, touched) = self
            .store
            .transaction(|tx| {
                let queues = forget_group_in(tx, &group)?;
                let touched = match group_bytes(&group) {
                    Some(g) => {
                        send_to_devices(tx, "", &DeviceMsg::Forget { group: g }, t, |_| true)?
                    }
                    None => Vec::new(),
                };
                Ok((queues, touched))
            })
            .map_err(unwrap_abort)?;
        let mut failed = Vec::new();
        for q in self.delete_granted(&queues) {
            failed.push(q.relay.label());
        }
        for d in touched {
            let _ = self.run_jobs(&d);
        }
        Ok(failed)
    }
}
