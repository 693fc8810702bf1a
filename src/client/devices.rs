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
use tern_relay::wire::{Command, ErrorCode};

use super::fetch::Event;
use super::jobs::{flush_outbox, push_request};
use super::model::{
    contact_key, group_name_key, group_seen, history_log, AddWatch, Announced, Contact, DeviceJob,
    Direction, GrantedQueue, HistoryEntry, IndexEntry, Queued, RootCode, Settings, DEVICES, INDEX,
    SETTINGS,
};
use super::{abort, new_contact_id, now, random_id, unwrap_abort, Client, ClientError};
use crate::proto::connection::{ConnState, Connection};
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
        let Some(mut other) = tx.get::<Contact>(&contact_key(&id))? else {
            continue;
        };
        if f(&mut other).map_err(abort)? {
            tx.put(&contact_key(&id), &other)?;
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
    let Some(msg) = group_message(
        &c.name,
        c.group(),
        c.code(),
        introduce,
        vec![id_bytes(&c.id)],
    ) else {
        return Ok(Vec::new());
    };
    send_to_devices(tx, &c.id, &msg, now, |d| {
        d.await_group(c.group());
        true
    })
}

fn is_live_device(c: &Contact) -> bool {
    c.device && !c.removed && c.conn.state == ConnState::Connected
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
pub(crate) fn queue_ids(c: &Contact) -> Vec<tern_relay::wire::Id> {
    c.all_recv_queues().map(|q| q.recipient_id).collect()
}

/// Announces connection `c` again to our other devices (and, for a device
/// connection, to that device) when its receiving queues changed since
/// `before`: rotations must not leave a removed device a queue we cannot
/// delete. Returns the other records changed.
pub(crate) fn announce_if_changed(
    tx: &Tx<'_>,
    c: &mut Contact,
    before: &[tern_relay::wire::Id],
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
    code: Option<RootCode>,
    introduce: bool,
    members: Vec<[u8; 16]>,
) -> Option<DeviceMsg> {
    let code = code.unwrap_or(RootCode {
        code: String::new(),
        verified: false,
    });
    Some(DeviceMsg::Group {
        group: group_bytes(group)?,
        name: name.to_string(),
        code: code.code,
        verified: code.verified,
        introduce,
        members,
    })
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
        // The other device learns all our connections, this one included.
        let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let mut others: Vec<Contact> = Vec::new();
        for e in index.iter().filter(|e| e.id != c.id) {
            if let Some(o) = tx.get::<Contact>(&contact_key(&e.id))? {
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
            for o in others.iter().filter(|o| !o.device) {
                match groups.iter_mut().find(|(g, _)| g == o.group()) {
                    Some((_, v)) => v.push(o),
                    None => groups.push((o.group().to_string(), vec![o])),
                }
            }
            let mut contacts = 0;
            for (group, members) in &groups {
                let live: Vec<[u8; 16]> = members
                    .iter()
                    .filter(|m| m.conn.state == ConnState::Connected)
                    .map(|m| id_bytes(&m.id))
                    .collect();
                let first = members[0];
                if !live.is_empty() {
                    let code = members.iter().find_map(|m| m.code());
                    let owed = live.len() as u32;
                    if let Some(m) = group_message(&first.name, group, code, false, live) {
                        c.awaiting_offers += owed;
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
    } else if !c.introduced {
        // A contact made here: our other devices connect to it too, through
        // this connection (introduce: §12.4).
        changed.extend(introduce_to_devices(tx, c, c.conn.inviter, now).map_err(unwrap_abort)?);
    }
    Ok(changed)
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
/// removed): it is deleted here and its queues on the relays by `carrier`'s
/// next job run.
fn drop_connection(tx: &Tx<'_>, carrier: &mut Contact, victim: &Contact) -> Result<(), StoreError> {
    let mut queues = victim.queue_grants();
    if victim.device {
        queues.extend(victim.announced.iter().flat_map(|a| a.queues.clone()));
    }
    if !queues.is_empty() {
        carrier.push_device_job(DeviceJob::DeleteQueues { queues });
    }
    Client::remove_member_in(tx, &victim.id)
}

/// Acts on a device message that came over connection `c` (being processed,
/// saved by the caller). Returns other records changed.
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
    match msg {
        DeviceMsg::Added { tag } => {
            if let Some(w) = c.add_watch.iter_mut().find(|w| w.tag == tag) {
                w.boundary.get_or_insert(seq);
                w.since_ms = now;
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
                let Some(victim) = tx.get::<Contact>(&contact_key(&e.id))? else {
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
                {
                    drop_connection(tx, c, &victim)?;
                    events.push(Event::Notice(format!(
                        "{} removed one of their devices",
                        c.name
                    )));
                }
            }
        }
        DeviceMsg::Removed { fingerprints } => {
            let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
            let own = c.id.clone();
            for e in index.iter().filter(|e| e.id != own && e.device) {
                let Some(victim) = tx.get::<Contact>(&contact_key(&e.id))? else {
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
        DeviceMsg::Group {
            group,
            name,
            code,
            verified,
            introduce,
            members,
        } => {
            let group = HEXLOWER.encode(&group);
            tx.put(&group_name_key(&group), &name)?;
            let code = (!code.is_empty()).then_some(RootCode { code, verified });
            for via in members {
                c.push_device_job(DeviceJob::Offer {
                    via,
                    group: Some(group.clone()),
                    name: name.clone(),
                    code: code.clone(),
                    introduce,
                });
            }
        }
        DeviceMsg::Sibling { device, name } => {
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
            c.awaiting_offers = c.awaiting_offers.saturating_sub(1);
            let via = HEXLOWER.encode(&via);
            let Some(mut target) = tx.get::<Contact>(&contact_key(&via))? else {
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
                tx.put(&contact_key(&target.id), &target)?;
                changed.push(target.id.clone());
            }
        }
        DeviceMsg::History { group, entries } => {
            let group = HEXLOWER.encode(&group);
            for e in &entries {
                record_history(tx, &group, &history_of(e))?;
            }
        }
        DeviceMsg::Copy { group, entry } => {
            let group = HEXLOWER.encode(&group);
            let entry = history_of(&entry);
            if record_history(tx, &group, &entry)? {
                let name = group_name(tx, &group)?;
                events.push(Event::Message {
                    contact: name,
                    entry,
                    chain: crate::proto::envelope::ChainStatus::InOrder,
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
    }
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

/// Sends our current settings (profile, relays) to our other devices, after
/// the profile changed; returns the records with work to upload.
pub(crate) fn sync_settings(client: &mut Client) -> Result<Vec<String>, ClientError> {
    let t = now();
    client
        .store
        .transaction(|tx| {
            let settings: Settings = tx
                .get(SETTINGS)?
                .ok_or_else(|| abort(ClientError::Invalid("the profile has no settings".into())))?;
            let msg = DeviceMsg::Settings {
                profile: settings.profile.to_bytes(),
                relays: settings.relay_addresses(),
                rotate_days: settings.rotate_days,
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
    let queues = c.queue_grants();
    c.removed = true;
    c.sync_on_connect = false;
    c.jobs.clear();
    c.outbox.clear();
    c.device_jobs.clear();
    c.push_device_job(DeviceJob::DeleteQueues { queues });
    tx.put(&contact_key(&c.id), &*c)?;
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

/// What `tern device remove` did.
#[derive(Debug, Default)]
pub struct RemoveReport {
    /// Contacts told to drop the device's connections.
    pub contacts_told: usize,
    /// Queues of the device still to delete (a relay was unreachable).
    pub queues_left: usize,
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

    /// `tern device link`: a one-time device link over new queues; returns
    /// the link and the id of the connection it will become.
    pub fn link_device(&mut self, channel: Channel) -> Result<(String, String), ClientError> {
        let queues = self.create_queues()?;
        let (conn, invitation) = Connection::invite(queues, channel, &mut OsRng);
        let id = new_contact_id();
        let name = format!("new-device-{}", &id[..6]);
        let mut record = Contact::new(id, name.clone(), true, conn, now());
        record.device = true;
        record.sync_on_connect = true;
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
        let (conn, request) = Connection::accept(
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
        // The device that made the link was there first.
        record.elder = true;
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
        // A removed device's record goes once its queues are gone.
        if let Ok(c) = self.contact(id) {
            if c.removed && c.device_jobs.is_empty() {
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
            match self.net.call(
                &q.relay,
                &Command::Delete {
                    recipient_id: q.recipient_id,
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
        match group {
            Some(g) => {
                record.group = g.to_string();
                record.root_code = code;
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
                let key = contact_key(carrier);
                let mut c: Contact = tx
                    .get(&key)?
                    .ok_or_else(|| abort(ClientError::UnknownContact(carrier.into())))?;
                if !c.device_jobs.iter().any(|j| j.id == task) {
                    // Done meanwhile by a process whose claim had expired.
                    return Ok(());
                }
                Client::add_contact_in(tx, &record)?;
                send_on(&mut c, &offer, t).map_err(abort)?;
                c.device_jobs.retain(|j| j.id != task);
                tx.put(&key, &c)?;
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
            record.device = true;
            record.name = if name.trim().is_empty() {
                UNNAMED_DEVICE.to_string()
            } else {
                name.trim().to_string()
            };
        } else {
            record.group = c.group().to_string();
            record.root_code = c.code();
        }
        push_request(&mut record, request, t);
        let mut touched = Vec::new();
        let done = self
            .store
            .transaction(|tx| {
                let key = contact_key(carrier);
                let Some(mut c) = tx.get::<Contact>(&key)? else {
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
                    send_on(&mut c, &DeviceMsg::Added { tag }, t).map_err(abort)?;
                }
                tx.put(&key, &c)?;
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
    /// if it never cooperates.
    pub fn remove_device(&mut self, id: &str) -> Result<RemoveReport, ClientError> {
        let t = now();
        let mut report = RemoveReport::default();
        let touched = self
            .store
            .transaction(|tx| {
                let key = contact_key(id);
                let mut r: Contact = tx
                    .get(&key)?
                    .ok_or_else(|| abort(ClientError::UnknownContact(id.into())))?;
                if r.elder {
                    return Err(abort(ClientError::Invalid(format!(
                        "{} was linked before this device, so this device cannot remove it \
                         (it could do the same to this one): remove it from the device that \
                         linked this one, or from the first device",
                        r.name
                    ))));
                }
                let mut fingerprints: Vec<[u8; 32]> =
                    r.announced.iter().map(|a| a.fingerprint).collect();
                if let Some(f) = r.fingerprint() {
                    fingerprints.push(f);
                }
                let announced = r.announced.clone();
                let mut told = 0;
                let changed = for_each_other(tx, id, |o| {
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
                let mut queues = r.queue_grants();
                queues.extend(announced.iter().flat_map(|a| a.queues.clone()));
                r.removed = true;
                r.jobs.clear();
                r.outbox.clear();
                r.device_jobs.clear();
                r.push_device_job(DeviceJob::DeleteQueues { queues });
                tx.put(&key, &r)?;
                Ok(changed)
            })
            .map_err(unwrap_abort)?;
        // The queues first: that is what stops the device at once.
        self.run_device_jobs(id)?;
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
        Ok(report)
    }
}
