//! The client: profile, contacts and messages on top of the store, the
//! protocol core and the relay client. The CLI is a thin shell around this.
//!
//! Order of operations is what keeps messages safe: protocol state changes
//! and the work they imply ([`model::Job`]) are committed to the store in
//! one transaction *before* anything goes to a relay, and a received message
//! is acknowledged to its relay only *after* the transaction that stores it
//! has committed.

pub mod devices;
pub mod events;
pub mod fetch;
pub mod files;
pub mod jobs;
pub mod model;
pub mod receipts;
pub mod records;
pub mod rotate;
pub mod send;

use std::path::Path;

use data_encoding::HEXLOWER;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_wire::address::RelayAddress;
use tern_wire::{Command, Reply};
use thiserror::Error;

use crate::net::{now_ms, NetError, RelayClient};
use crate::proto::connection::{QueueKeys, RecvQueue};
use crate::proto::text::name_key;
use crate::proto::ProtoError;
use crate::store::{KeySource, Store, StoreError, Tx};
use model::{Contact, IndexEntry, Settings, INDEX, SETTINGS};

/// Most relays one direction of a connection uses.
pub const MAX_RELAYS_PER_CONNECTION: usize = 3;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("no contact named {0:?}: see `tern contacts`")]
    UnknownContact(String),
    #[error("a contact named {0:?} exists already: choose another --name")]
    NameTaken(String),
    #[error("the profile has no relays: add one with `tern relays add ADDRESS`")]
    NoRelays,
    #[error("no relay could create a queue ({reasons}){}", if *.transient { "; try again later" } else { "" })]
    AllRelaysFailed { reasons: String, transient: bool },
    #[error("{0}")]
    Invalid(String),
    /// Permanent: this device is no longer part of the profile.
    #[error(
        "this device was removed from the profile by device {by} ({at}): it receives \
         nothing new and cannot send; its history stays readable with `tern log`"
    )]
    DeviceRemoved { by: String, at: String },
}

impl ClientError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Net(e) => e.is_transient(),
            ClientError::AllRelaysFailed { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// Aborts a store transaction with a client error.
pub(crate) fn abort(e: impl Into<ClientError>) -> StoreError {
    StoreError::abort(e.into())
}

/// Turns a transaction's error back into a client error when it is one.
pub(crate) fn unwrap_abort(e: StoreError) -> ClientError {
    match e {
        StoreError::Aborted(inner) => match inner.downcast::<ClientError>() {
            Ok(c) => *c,
            Err(other) => ClientError::Store(StoreError::Aborted(other)),
        },
        other => ClientError::Store(other),
    }
}

pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    id
}

/// An unlocked profile and a way to reach relays.
pub struct Client {
    pub store: Store,
    pub net: std::sync::Arc<RelayClient>,
    /// The device link this process may complete: set by `tern device
    /// link` while it runs and by `tern device confirm`. Any other process
    /// (a cron job's `tern recv`) only keeps a request for a device link,
    /// for the user to confirm (PROTOCOL.md §12.2).
    pub linking: Option<String>,
}

impl Client {
    /// Opens the profile in `home`; relay connections go through `proxy`
    /// if one is given.
    pub fn open(
        home: &Path,
        key: KeySource,
        proxy: Option<crate::net::Proxy>,
    ) -> Result<Self, ClientError> {
        let store = Store::open(home, key)?;
        let isolate = store
            .read(|tx| tx.get::<Settings>(SETTINGS))?
            .map(|s| s.isolate)
            .unwrap_or(false);
        Ok(Self {
            store,
            net: std::sync::Arc::new(RelayClient::with_proxy(isolate, proxy)),
            linking: None,
        })
    }

    /// Another client on the same profile (its own store handle, the same
    /// relay connections), for a thread of its own.
    pub fn another_handle(&self) -> Result<Client, ClientError> {
        Ok(Client {
            store: self.store.another_handle()?,
            net: self.net.clone(),
            linking: self.linking.clone(),
        })
    }

    pub fn settings(&self) -> Result<Settings, ClientError> {
        self.store
            .read(|tx| tx.get::<Settings>(SETTINGS))?
            .ok_or_else(|| ClientError::Invalid("the profile has no settings: it was not fully initialised; run `tern init` again in an empty --home".into()))
    }

    pub fn index(&self) -> Result<Vec<IndexEntry>, ClientError> {
        Ok(self
            .store
            .read(|tx| tx.get::<Vec<IndexEntry>>(INDEX))?
            .unwrap_or_default())
    }

    /// Finds a contact's id by name: the exact name, or else the one name
    /// equal to it after NFKC and white-space folding (names are unique in
    /// that form). One of its connections when the contact has several
    /// devices; see [`Client::group_members`].
    pub fn contact_id(&self, name: &str) -> Result<String, ClientError> {
        let index = self.index()?;
        let key = name_key(name);
        index
            .iter()
            .find(|e| e.name == name && !e.device)
            .or_else(|| index.iter().find(|e| !e.device && name_key(&e.name) == key))
            .map(|e| e.id.clone())
            .ok_or_else(|| ClientError::UnknownContact(name.to_string()))
    }

    /// The name of the contact of connection `id`, from the index (no
    /// contact record to open).
    pub fn name_of(&self, id: &str) -> Result<String, ClientError> {
        self.index()?
            .into_iter()
            .find(|e| e.id == id)
            .map(|e| e.name)
            .ok_or_else(|| ClientError::UnknownContact(id.to_string()))
    }

    /// The ids of every connection in the group of connection `id`: one per
    /// device of the contact.
    pub fn group_members(&self, id: &str) -> Result<Vec<String>, ClientError> {
        let index = self.index()?;
        let group = index
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.group().to_string())
            .ok_or_else(|| ClientError::UnknownContact(id.to_string()))?;
        Ok(index
            .iter()
            .filter(|e| e.group() == group)
            .map(|e| e.id.clone())
            .collect())
    }

    pub fn contact(&self, id: &str) -> Result<Contact, ClientError> {
        self.store
            .read(|tx| records::load(tx, id))?
            .ok_or_else(|| ClientError::UnknownContact(id.to_string()))
    }

    pub fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        let index = self.index()?;
        Ok(self.store.read(|tx| {
            let mut out = Vec::with_capacity(index.len());
            for e in &index {
                if let Some(c) = records::load(tx, &e.id)? {
                    out.push(c);
                }
            }
            Ok(out)
        })?)
    }

    /// Read-modify-write of one contact inside a transaction.
    pub fn update_contact<T>(
        &mut self,
        id: &str,
        f: impl FnOnce(&Tx<'_>, &mut Contact) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.store
            .transaction(|tx| change_contact(tx, id, f))
            .map_err(unwrap_abort)
    }

    /// [`Client::update_contact`] with a lazy commit: only for what may be
    /// lost to a power cut (see [`crate::store::Store::transaction_lazy`]).
    pub fn update_contact_lazily<T>(
        &mut self,
        id: &str,
        f: impl FnOnce(&Tx<'_>, &mut Contact) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.store
            .transaction_lazy(|tx| change_contact(tx, id, f))
            .map_err(unwrap_abort)
    }

    /// Creates one receiving queue on each of up to three of our relays, in
    /// parallel. Fails only if no relay could create one.
    pub fn create_queues(&self) -> Result<Vec<RecvQueue>, ClientError> {
        let relays: Vec<RelayAddress> = self.settings()?.relay_addresses();
        if relays.is_empty() {
            return Err(ClientError::NoRelays);
        }
        let chosen: Vec<RelayAddress> =
            relays.into_iter().take(MAX_RELAYS_PER_CONNECTION).collect();
        let results: Vec<Result<RecvQueue, ClientError>> = std::thread::scope(|s| {
            let handles: Vec<_> = chosen
                .iter()
                .map(|relay| {
                    let net = &*self.net;
                    s.spawn(move || create_queue(net, relay))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClientError::Invalid("queue creation panicked".into()))
                    })
                })
                .collect()
        });
        let mut queues = Vec::new();
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok(q) => queues.push(q),
                Err(e) => errors.push(e),
            }
        }
        if queues.is_empty() {
            return Err(ClientError::AllRelaysFailed {
                reasons: errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                // Worth trying later only if some relay may say yes then.
                transient: errors.iter().any(ClientError::is_transient),
            });
        }
        for e in errors {
            eprintln!(
                "tern: warning: {}",
                crate::proto::text::escape_text(&e.to_string())
            );
        }
        Ok(queues)
    }

    /// Adds a new contact record and its index entry. Names must be unique.
    pub fn add_contact(&mut self, contact: &Contact) -> Result<(), ClientError> {
        self.store
            .transaction(|tx| Client::add_contact_in(tx, contact))
            .map_err(unwrap_abort)
    }

    /// [`Client::add_contact`] inside a transaction. Connections of one
    /// group share their name.
    pub fn add_contact_in(tx: &Tx<'_>, contact: &Contact) -> Result<(), StoreError> {
        let mut index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let key = name_key(&contact.name);
        if index
            .iter()
            .any(|e| name_key(&e.name) == key && e.group() != contact.group())
        {
            return Err(abort(ClientError::NameTaken(contact.name.clone())));
        }
        index.push(contact.index_entry());
        tx.put(INDEX, &index)?;
        if contact.device {
            let mut devices = tx.get::<Vec<String>>(model::DEVICES)?.unwrap_or_default();
            devices.push(contact.id.clone());
            tx.put(model::DEVICES, &devices)?;
        }
        records::save(tx, contact)?;
        Ok(())
    }

    /// Removes one connection of a group (a device of the contact, or of
    /// ours): its record, index entry and seen-set, but not the group's
    /// history, which the other connections share.
    pub fn remove_member_in(tx: &Tx<'_>, id: &str) -> Result<(), StoreError> {
        let mut index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let group = index
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.group().to_string());
        index.retain(|e| e.id != id);
        let last = group
            .as_deref()
            .is_some_and(|g| !index.iter().any(|e| e.group() == g));
        tx.put(INDEX, &index)?;
        if let Some(mut devices) = tx.get::<Vec<String>>(model::DEVICES)? {
            if devices.iter().any(|d| d == id) {
                devices.retain(|d| d != id);
                tx.put(model::DEVICES, &devices)?;
            }
        }
        records::delete(tx, id)?;
        tx.clear_seen(&model::seen_set(id))?;
        if let (true, Some(g)) = (last, group) {
            tx.remove_log(&model::history_log(&g))?;
            tx.clear_seen(&model::group_seen(&g))?;
        }
        Ok(())
    }

    /// Deletes a connection's record, index entry and seen-set, and the
    /// group's history with its last connection (not its queues on relays:
    /// see `tern forget`).
    pub fn remove_contact(&mut self, id: &str) -> Result<(), ClientError> {
        self.store
            .transaction(|tx| Client::remove_member_in(tx, id))?;
        Ok(())
    }

    /// A name not used by any contact: `base`, or `base-2`, `base-3`, …
    /// Names are compared after NFKC and white-space folding, so a
    /// full-width or padded copy of a name counts as that name.
    pub fn unique_name(tx: &Tx<'_>, base: &str, except_id: &str) -> Result<String, StoreError> {
        let index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let group = index
            .iter()
            .find(|e| e.id == except_id)
            .map(|e| e.group().to_string())
            .unwrap_or_else(|| except_id.to_string());
        let taken = |n: &str| {
            let key = name_key(n);
            index
                .iter()
                .any(|e| name_key(&e.name) == key && e.group() != group)
        };
        if !taken(base) {
            return Ok(base.to_string());
        }
        Ok((2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| !taken(n))
            .expect("some suffix is free"))
    }

    /// Renames a contact — every connection of its group — in the records
    /// and the index. `contact` is the caller's copy of one of them, which
    /// the caller saves.
    pub fn rename_in(tx: &Tx<'_>, contact: &mut Contact, name: String) -> Result<(), StoreError> {
        let mut index = tx.get::<Vec<IndexEntry>>(INDEX)?.unwrap_or_default();
        let group = contact.group().to_string();
        for e in index.iter_mut().filter(|e| e.group() == group) {
            e.name = name.clone();
            if e.id != contact.id {
                if let Some(mut other) = records::load(tx, &e.id)? {
                    other.name = name.clone();
                    records::save(tx, &other)?;
                }
            }
        }
        tx.put(INDEX, &index)?;
        contact.name = name;
        Ok(())
    }
}

pub fn new_contact_id() -> String {
    HEXLOWER.encode(&random_id())
}

pub fn now() -> u64 {
    now_ms()
}

fn create_queue(net: &RelayClient, relay: &RelayAddress) -> Result<RecvQueue, ClientError> {
    let keys = QueueKeys::generate(&mut OsRng);
    let signer = ed25519_dalek::SigningKey::from_bytes(keys.auth.as_bytes());
    // A queue of its own session with --isolate (it has no id yet: a fresh
    // one names the session).
    let reply = net.call_for(
        relay,
        Some(&random_id()),
        &Command::Create {
            access_key: relay.access_key.clone(),
            recipient_auth: keys.auth_public(),
            recipient_dh: keys.dh.public(),
        },
        Some(&signer),
    )?;
    match reply {
        Reply::Queue {
            recipient_id,
            sender_id,
            relay_dh,
        } => Ok(RecvQueue::created(
            relay.clone(),
            &keys,
            recipient_id,
            sender_id,
            &relay_dh,
        )?),
        other => Err(ClientError::Invalid(format!(
            "relay {} answered CREATE with {other:?}",
            relay.label()
        ))),
    }
}

/// The read-modify-write of one contact record inside `tx`.
fn change_contact<T>(
    tx: &Tx<'_>,
    id: &str,
    f: impl FnOnce(&Tx<'_>, &mut Contact) -> Result<T, ClientError>,
) -> Result<T, crate::store::StoreError> {
    let mut c =
        records::load(tx, id)?.ok_or_else(|| abort(ClientError::UnknownContact(id.to_string())))?;
    let out = f(tx, &mut c).map_err(abort)?;
    records::save(tx, &c)?;
    Ok(out)
}
