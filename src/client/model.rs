//! What the client keeps in its encrypted store, and under which names.
//!
//! Record names are opaque: contacts are known by random ids, never by the
//! names people give them (those live inside the encrypted values).
//! Contact records (`contact/<id>`) are read and written only through
//! [`super::records`], which keeps a summary of each beside it.

use serde::{Deserialize, Serialize};
use tern_wire::address::RelayAddress;
use tern_wire::Id;

use crate::proto::connection::Connection;
use crate::proto::envelope::Kind;
use crate::proto::hello::Profile;
use crate::proto::keys::{b64, b64vec};

pub const SETTINGS: &str = "settings";
/// Re-key invitations of one contact kept open at once.
pub const MAX_PENDING_REKEYS: usize = 3;
pub const INDEX: &str = "contacts";
/// The ids of our connections with our other devices (a subset of the index).
pub const DEVICES: &str = "devices";

pub fn history_log(id: &str) -> String {
    format!("history/{id}")
}
pub fn seen_set(id: &str) -> String {
    format!("seen/{id}")
}
pub fn deferred_log(id: &str) -> String {
    format!("deferred/{id}")
}
/// Message ids already in a group's history (copies from other devices).
pub fn group_seen(group: &str) -> String {
    format!("group-seen/{group}")
}
/// A group's name, known to a new device before it has a connection in it.
pub fn group_name_key(group: &str) -> String {
    format!("group-name/{group}")
}
/// Which of our devices introduced a group (contact) here, if one did.
pub fn group_info_key(group: &str) -> String {
    format!("group-info/{group}")
}

/// What we know of one message we (or another device of ours) sent to the
/// contact of `group`: which of the contact's devices confirmed storing it.
/// A record of its own per message, so that a receipt costs one small read
/// and write whatever the length of the history; its existence is also
/// what says the message went to that contact (a receipt naming any other
/// id is ignored).
pub fn outgoing_key(group: &str, id: &[u8; 16]) -> String {
    format!("out/{group}/{}", data_encoding::HEXLOWER.encode(id))
}
/// Present (true): this device sends no delivery receipts to the contact
/// of `group` (`tern contacts receipts NAME off`).
pub fn no_receipts_key(group: &str) -> String {
    format!("no-receipts/{group}")
}

/// The most devices of a contact recorded per message: a group has a
/// handful of connections (each ADD is bounded), so this only bounds what a
/// hostile contact could make us store.
pub const MAX_DELIVERED_DEVICES: usize = 32;

/// See [`outgoing_key`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outgoing {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<DeliveredTo>,
}

/// One of the contact's devices stored the message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveredTo {
    /// The connection with that device, as [`Contact::device_label`] names it.
    pub device: String,
    /// When its receipt was stored here (our clock, ms).
    pub at_ms: u64,
}

/// A contact (group) another device of ours told us about (GROUP), kept
/// from the moment we hear of it: it decides who may add to it later.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Our connection with the device whose GROUP made it known here.
    pub introduced_by: String,
}

/// This device was removed from the profile by another one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Removal {
    /// The name of the device that removed it.
    pub by: String,
    pub at_ms: u64,
}

/// A message this version could not read (from a newer version), kept so
/// that a newer tern can.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deferred {
    #[serde(with = "b64")]
    pub recipient_id: Id,
    #[serde(with = "b64vec")]
    pub message: Vec<u8>,
    pub received_at_ms: u64,
}

/// The profile and its preferences.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub profile: Profile,
    /// Our relays, each possibly with our access key.
    pub relays: Vec<String>,
    /// A fresh TCP connection per request.
    #[serde(default)]
    pub isolate: bool,
    /// Rotate each connection's queues about this often (0: never).
    #[serde(default = "default_rotate_days")]
    pub rotate_days: u32,
    pub created_ms: u64,
    /// This device's name among the person's devices (`tern device`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_name: String,
    /// The device on which the profile was last changed, when not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_changed_on: Option<String>,
    /// Set once another device removed this one from the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removal>,
    /// Send delivery receipts (PROTOCOL.md §7.6); on unless turned off
    /// with `tern profile --receipts off`. Per device.
    #[serde(default = "yes")]
    pub receipts: bool,
}

fn yes() -> bool {
    true
}

impl Settings {
    pub fn relay_addresses(&self) -> Vec<RelayAddress> {
        self.relays.iter().filter_map(|r| r.parse().ok()).collect()
    }
}

fn default_rotate_days() -> u32 {
    7
}

/// One line of the contact index: enough to find a contact by name without
/// decrypting every contact record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: String,
    pub name: String,
    /// The contact (person) the connection belongs to; empty: its own id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// A connection to another device of ours, not a contact.
    #[serde(default, skip_serializing_if = "is_false")]
    pub device: bool,
}

impl IndexEntry {
    pub fn group(&self) -> &str {
        if self.group.is_empty() {
            &self.id
        } else {
            &self.group
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The security code a contact is known by, for connections that another
/// device introduced (and so have a code nobody compared in person).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootCode {
    pub code: String,
    pub verified: bool,
}

/// A receiving queue of another device of ours, deletable by us once that
/// device is removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantedQueue {
    #[serde(with = "crate::proto::connection::address_text")]
    pub relay: RelayAddress,
    #[serde(with = "b64")]
    pub recipient_id: Id,
    pub auth: crate::proto::keys::Secret32,
}

/// One connection of another device of ours, as it announced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announced {
    /// The contact it is with; `None`: with another device of ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(with = "b64")]
    pub fingerprint: [u8; 32],
    pub queues: Vec<GrantedQueue>,
}

/// An ADD we forwarded to a contact for another device of ours: until the
/// contact answers ADDED, what it sends us is copied to that device; after,
/// only what it sent before (by its chain position).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddWatch {
    #[serde(with = "b64")]
    pub tag: [u8; 32],
    /// Our connection with that device.
    pub device: String,
    /// The chain position of the contact's ADDED, once it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boundary: Option<u64>,
    pub since_ms: u64,
}

/// A [`DeviceJob`] with what lets two tern processes on one profile never
/// both carry it out (each would make its own connection).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceTask {
    #[serde(with = "b64")]
    pub id: [u8; 16],
    /// A process is carrying it out until then (ms); 0: nobody. A process
    /// killed meanwhile leaves it to be taken up again once this passes.
    #[serde(default)]
    pub claimed_until_ms: u64,
    /// The process holding the claim: once it is gone (killed), the claim
    /// is void at once rather than at `claimed_until_ms`.
    #[serde(default)]
    pub claimed_by: u32,
    pub job: DeviceJob,
}

/// Device work that needs relays, kept until done (PROTOCOL.md §12).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum DeviceJob {
    /// Make an invitation and send it, as OFFER over this connection, for
    /// the linking device to forward through its connection `via`.
    Offer {
        #[serde(with = "b64")]
        via: [u8; 16],
        /// The group (contact) the new connection joins, or `None` for a
        /// connection to another device of ours named `name`.
        group: Option<String>,
        name: String,
        code: Option<RootCode>,
        introduce: bool,
    },
    /// Accept an invitation that came in an ADD over this connection.
    Accept {
        #[serde(with = "b64vec")]
        invitation: Vec<u8>,
        name: String,
        introduce: bool,
    },
    /// Delete the queues of a removed device, or of a dropped connection.
    DeleteQueues { queues: Vec<GrantedQueue> },
}

/// Work that must reach a relay; kept in the store so a crash or an outage
/// delays it but never loses it. Run in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Job {
    /// SECURE our receiving queue with the sender key the peer gave us.
    Secure {
        #[serde(with = "b64")]
        recipient_id: Id,
        #[serde(default)]
        generation: u32,
    },
    /// DELETE a retired receiving queue once it is empty (queue rotation).
    DeleteQueue {
        #[serde(with = "b64")]
        recipient_id: Id,
        #[serde(default)]
        generation: u32,
    },
    /// Upload to every peer queue still in `pending`.
    Deliver {
        #[serde(with = "b64")]
        envelope_id: [u8; 16],
        /// A ratchet message, or (when `raw`) a whole queue message.
        #[serde(with = "b64vec")]
        payload: Vec<u8>,
        signed: bool,
        raw: bool,
        pending: Vec<usize>,
        created_ms: u64,
        /// Some relay already holds it: after a queue switch the peer drains
        /// the old queues, so it need not be re-sent.
        #[serde(default)]
        delivered_any: bool,
        /// Which connection of the contact (see [`Contact::generation`]).
        #[serde(default)]
        generation: u32,
    },
}

impl Job {
    pub fn generation(&self) -> u32 {
        match self {
            Job::Secure { generation, .. }
            | Job::DeleteQueue { generation, .. }
            | Job::Deliver { generation, .. } => *generation,
        }
    }
}

/// The connection a re-key replaced, kept until the peer has switched and
/// its queues are drained and deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OldConnection {
    pub generation: u32,
    pub conn: Connection,
    /// We told the peer we send nothing more on it.
    #[serde(default)]
    pub told_peer: bool,
    /// The peer told us the same.
    #[serde(default)]
    pub peer_done: bool,
}

/// Something to send once the connection is up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Queued {
    pub kind: Kind,
    #[serde(with = "b64")]
    pub id: [u8; 16],
    #[serde(with = "b64vec")]
    pub body: Vec<u8>,
    /// When it was written: its sent time, however late it goes out (all
    /// devices of the contact must show one time). 0: at sending.
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contact {
    pub id: String,
    pub name: String,
    /// True while the name is a placeholder to replace with the peer's
    /// profile name once connected.
    #[serde(default)]
    pub provisional_name: bool,
    pub conn: Connection,
    pub created_ms: u64,
    pub last_activity_ms: u64,
    #[serde(default)]
    pub jobs: Vec<Job>,
    #[serde(default)]
    pub outbox: Vec<Queued>,
    /// Ids of the contact's messages this device stored and has not sent a
    /// receipt for yet: encrypted into one receipt when the jobs next run
    /// (not one stored upload per batch received, which made a record
    /// that grows by a padded message per batch until the uploads ran).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receipts_owed: Vec<ReceiptId>,
    /// When automatic rotation is next due (jittered per contact).
    #[serde(default)]
    pub next_rotation_ms: u64,
    /// The peer asked us to rotate; done by the next command that can.
    #[serde(default)]
    pub rotation_wanted: bool,
    /// Counts re-keys: jobs name the connection they belong to by it.
    #[serde(default)]
    pub generation: u32,
    /// The connection a re-key replaced, while it drains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<OldConnection>,
    /// Inviter side of a re-key: the connections of re-key invitations not
    /// yet accepted (newest last, at most [`MAX_PENDING_REKEYS`]); the first
    /// one the contact accepts replaces the current connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rekeys: Vec<Connection>,
    /// The contact (person) this connection belongs to: all connections
    /// with that person's devices share it, as do all our devices. Empty:
    /// the record's own id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// A connection to another device of ours, not a contact.
    #[serde(default, skip_serializing_if = "is_false")]
    pub device: bool,
    /// Made by the user (invite/accept/link), as opposed to by devices
    /// introducing each other: such a connection, once up, is introduced to
    /// our other devices.
    #[serde(default, skip_serializing_if = "is_false")]
    pub introduced: bool,
    /// Made by `tern device link`: once up, the new device gets the profile,
    /// contacts and history.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync_on_connect: bool,
    /// For introduced connections: the code the contact is known by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_code: Option<RootCode>,
    /// Device records: groups that device has no connection in yet; what
    /// those contacts send is copied to it meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_groups: Vec<String>,
    /// Device records: that device's connections, as it announced them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announced: Vec<Announced>,
    /// Device records: removed; kept until its queues are deleted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub removed: bool,
    /// The peer deleted this connection: every queue of it refuses our
    /// messages. Shown as "gone"; nothing more is sent.
    #[serde(default, skip_serializing_if = "is_false")]
    pub peer_gone: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_jobs: Vec<DeviceTask>,
    /// Connections with a contact's device: ADDs forwarded for our other
    /// devices, to know which messages of the contact those devices miss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_watch: Vec<AddWatch>,
    /// Device records: that device was linked before this one. Only elder
    /// devices learn our queue keys (ANNOUNCE) and may remove us.
    #[serde(default, skip_serializing_if = "is_false")]
    pub elder: bool,
    /// Device records made by `tern device link`: invitations (OFFERs) the
    /// new device still owes us, one per GROUP member and SIBLING sent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub awaiting_offers: u32,
    /// Device records: the connections we named to that device (GROUP
    /// members, SIBLING devices) that it may still answer with one OFFER
    /// each; an OFFER through any other connection is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offer_slots: Vec<String>,
    /// Our device connection whose word this connection rests on: the
    /// device that introduced it (GROUP, SIBLING, ADD on a device
    /// connection), directly or through a contact's ADD on a connection
    /// that rests on it. It goes with that device's removal unless it was
    /// verified here. `None`: made here, or added by the contact over such
    /// a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introduced_by: Option<String>,
    /// Made from a contact's ADD: the connection the ADD came on. Dropped
    /// with it (DROP), since only its word stands behind this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_via: Option<String>,
    /// Invitations and device links: void after this time (ms; 0: never).
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub expires_ms: u64,
    /// Device links: requests that came while no `tern device link` or
    /// `tern device confirm` ran, kept for the user to confirm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldRequest>,
    /// Device links: the user accepted the device that answered (by
    /// running the linking command, or `tern device confirm`); only then
    /// does it get the profile, contacts and history.
    #[serde(default, skip_serializing_if = "is_false")]
    pub link_confirmed: bool,
    /// On a new device: the record of the device whose link it joined.
    #[serde(default, skip_serializing_if = "is_false")]
    pub linked_us: bool,
    /// On a new device: that device is still sending the link (SETTINGS,
    /// GROUP, HISTORY, SIBLING); over when its own ANNOUNCE comes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub linking: bool,
}

/// A request for one of our device links, not yet acted on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldRequest {
    #[serde(with = "b64")]
    pub recipient_id: Id,
    #[serde(with = "b64vec")]
    pub message: Vec<u8>,
    #[serde(with = "b64")]
    pub digest: [u8; 32],
    /// The device name its Hello gave.
    pub name: String,
    pub received_ms: u64,
}

fn is_zero64(n: &u64) -> bool {
    *n == 0
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Contact {
    pub fn new(
        id: String,
        name: String,
        provisional_name: bool,
        conn: Connection,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            name,
            provisional_name,
            conn,
            created_ms: now_ms,
            last_activity_ms: now_ms,
            jobs: Vec::new(),
            outbox: Vec::new(),
            receipts_owed: Vec::new(),
            next_rotation_ms: 0,
            rotation_wanted: false,
            generation: 0,
            old: None,
            rekeys: Vec::new(),
            group: String::new(),
            device: false,
            introduced: false,
            sync_on_connect: false,
            root_code: None,
            pending_groups: Vec::new(),
            announced: Vec::new(),
            peer_gone: false,
            removed: false,
            device_jobs: Vec::new(),
            elder: false,
            add_watch: Vec::new(),
            awaiting_offers: 0,
            offer_slots: Vec::new(),
            introduced_by: None,
            added_via: None,
            expires_ms: 0,
            held: Vec::new(),
            link_confirmed: false,
            linked_us: false,
            linking: false,
        }
    }

    /// Adds device work, to run after the current transaction.
    pub fn push_device_job(&mut self, job: DeviceJob) {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        self.device_jobs.push(DeviceTask {
            id,
            claimed_until_ms: 0,
            claimed_by: 0,
            job,
        });
    }

    /// The group (contact) this connection belongs to.
    pub fn group(&self) -> &str {
        if self.group.is_empty() {
            &self.id
        } else {
            &self.group
        }
    }

    pub fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            id: self.id.clone(),
            name: self.name.clone(),
            group: self.group.clone(),
            device: self.device,
        }
    }

    /// The fingerprint naming this connection to both its ends (§12).
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        self.conn
            .keys
            .as_ref()
            .map(|k| crate::proto::device::fingerprint(&k.transcript()))
    }

    /// How the device at the other end of this connection is named in
    /// delivery states: the start of the connection's fingerprint, which
    /// the contact's device can compute too (their device names are never
    /// sent to us). The record id before the handshake gave keys.
    pub fn device_label(&self) -> String {
        match self.fingerprint() {
            Some(f) => data_encoding::HEXLOWER.encode(&f[..4]),
            None => self.id.clone(),
        }
    }

    /// This connection's own security code, and whether it was compared
    /// here. (A code another device sent, kept by older versions in
    /// `root_code`, is never used: PROTOCOL.md §12.7.)
    pub fn code(&self) -> Option<RootCode> {
        self.conn.security_code().map(|code| RootCode {
            code,
            verified: self.conn.verified,
        })
    }

    /// A device link still waiting: not yet answered, or answered and not
    /// yet sent the profile.
    pub fn is_pending_link(&self) -> bool {
        self.device && self.sync_on_connect && !self.removed
    }

    /// An invitation or link whose time is up and that nobody used yet.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at().is_some_and(|at| now_ms >= at)
    }

    /// Every receiving queue of this contact record: the connection's, the
    /// one a re-key replaced, and those of open re-key invitations.
    pub fn all_recv_queues(&self) -> impl Iterator<Item = &crate::proto::connection::RecvQueue> {
        self.conn
            .all_recv_queues()
            .chain(self.old.iter().flat_map(|o| o.conn.all_recv_queues()))
            .chain(self.rekeys.iter().flat_map(|r| r.all_recv_queues()))
    }

    /// Device records: until that device has its own connection with the
    /// contact of `group`, what the contact sends is copied to it.
    pub fn await_group(&mut self, group: &str) {
        if !self.pending_groups.iter().any(|g| g == group) {
            self.pending_groups.push(group.to_string());
        }
    }

    /// Our receiving queues of this connection, as grants for our devices.
    pub fn queue_grants(&self) -> Vec<GrantedQueue> {
        self.all_recv_queues()
            .map(|q| GrantedQueue {
                relay: q.relay.clone(),
                recipient_id: q.recipient_id,
                auth: q.auth.clone(),
            })
            .collect()
    }

    /// The connection jobs of `generation` belong to.
    pub fn conn_for(&self, generation: u32) -> Option<&Connection> {
        if generation == self.generation {
            Some(&self.conn)
        } else {
            self.old
                .as_ref()
                .filter(|o| o.generation == generation)
                .map(|o| &o.conn)
        }
    }

    /// Undoes [`Contact::replace_connection`] when the new connection's
    /// request was refused everywhere (a withdrawn re-key invitation):
    /// the previous connection is current again, untouched.
    pub fn restore_old_connection(&mut self) {
        let Some(old) = self.old.take() else { return };
        let abandoned = self.generation;
        self.conn = old.conn;
        self.generation = old.generation;
        self.jobs.retain(|j| j.generation() != abandoned);
    }

    /// Replaces the connection (re-key), keeping the old one to drain.
    pub fn replace_connection(&mut self, new: Connection) {
        let old = std::mem::replace(&mut self.conn, new);
        self.old = Some(OldConnection {
            generation: self.generation,
            conn: old,
            told_peer: false,
            peer_done: false,
        });
        self.generation += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// One message in the local history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryEntry {
    pub dir: Direction,
    #[serde(with = "b64")]
    pub id: [u8; 16],
    pub text: String,
    pub sent_at_ms: u64,
    /// For incoming messages: when this device stored it.
    #[serde(default)]
    pub received_at_ms: Option<u64>,
    /// Came as a copy (COPY, HISTORY) from another device of ours: its
    /// name. `None`: this device sent or received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A message id a receipt is owed for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiptId(#[serde(with = "b64")] pub [u8; 16]);
