//! What the client keeps in its encrypted store, and under which names.
//!
//! Record names are opaque: contacts are known by random ids, never by the
//! names people give them (those live inside the encrypted values).

use serde::{Deserialize, Serialize};
use tern_relay::address::RelayAddress;
use tern_relay::wire::Id;

use crate::proto::connection::Connection;
use crate::proto::envelope::Kind;
use crate::proto::hello::Profile;
use crate::proto::keys::b64;

pub const SETTINGS: &str = "settings";
/// Re-key invitations of one contact kept open at once.
pub const MAX_PENDING_REKEYS: usize = 3;
pub const INDEX: &str = "contacts";

pub fn contact_key(id: &str) -> String {
    format!("contact/{id}")
}
pub fn history_log(id: &str) -> String {
    format!("history/{id}")
}
pub fn seen_set(id: &str) -> String {
    format!("seen/{id}")
}
pub fn deferred_log(id: &str) -> String {
    format!("deferred/{id}")
}

/// A message this version could not read (from a newer version), kept so
/// that a newer tern can.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deferred {
    #[serde(with = "b64")]
    pub recipient_id: Id,
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
    pub body: Vec<u8>,
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
            next_rotation_ms: 0,
            rotation_wanted: false,
            generation: 0,
            old: None,
            rekeys: Vec::new(),
        }
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
}
