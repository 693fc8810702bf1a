//! Files (PROTOCOL.md §16): sending, receiving and keeping track of
//! attachments. A transfer is a store record (`file/ID`) that says how far
//! it got, so that a killed sender or recipient resumes where it stopped:
//! the sender records, after each batch the relays took, how many chunks
//! each copy holds; the recipient records which chunks are on its disk
//! (fsynced first) before it acknowledges them to the relay.

pub mod download;
pub mod source;
pub mod upload;

use std::path::PathBuf;

use data_encoding::HEXLOWER;
use serde::{Deserialize, Serialize};
use tern_wire::{Command, Id};

use super::model::Direction;
use super::{Client, ClientError};
use crate::net::Call;
use crate::proto::file::{chunk_count, queue_auth, FileOffer, CHUNK_LEN};
use crate::proto::keys::{b64, b64vec, Secret32};

/// The store key of a transfer.
pub fn transfer_key(id: &[u8; 16]) -> String {
    format!("file/{}", HEXLOWER.encode(id))
}

const TRANSFER_PREFIX: &str = "file/";

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileState {
    /// Out: chunks are still going to the relays.
    Uploading,
    /// Out: every live copy is complete on its relay.
    Sent,
    /// In: offered, not downloaded yet.
    Offered,
    /// In: larger than the limit; `tern files get` fetches it anyway.
    TooLarge,
    /// In: some chunks are on disk.
    Receiving,
    /// In: verified and saved.
    Received,
    /// Given up, with the reason in `error`.
    Failed,
    Cancelled,
}

impl FileState {
    pub fn word(self) -> &'static str {
        match self {
            FileState::Uploading => "uploading",
            FileState::Sent => "sent",
            FileState::Offered => "offered",
            FileState::TooLarge => "too-large",
            FileState::Receiving => "receiving",
            FileState::Received => "received",
            FileState::Failed => "failed",
            FileState::Cancelled => "cancelled",
        }
    }

    /// Whether anything is still to happen.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            FileState::Uploading | FileState::Offered | FileState::Receiving | FileState::TooLarge
        )
    }
}

/// Where an outgoing file's bytes are read from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceRecord {
    /// The user's file, as it was when offered (a change is refused).
    Path {
        path: PathBuf,
        size: u64,
        modified_ns: u128,
    },
    /// Standard input, kept encrypted under `key` until the upload ends.
    Spool { path: PathBuf, key: Secret32 },
}

/// One sender id of a copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SenderQueue {
    #[serde(with = "b64")]
    pub sender_id: Id,
}

/// An outgoing copy: the sender's side of one set of the offer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutSet {
    /// The relay to talk to (with our access key when it is one of ours).
    #[serde(with = "crate::proto::connection::address_text")]
    pub relay: tern_wire::address::RelayAddress,
    pub sender_seed: Secret32,
    pub queues: Vec<SenderQueue>,
    /// Chunks `0..next` are on the relay.
    pub next: u64,
    /// Why this copy was given up (the relay refused it for good).
    #[serde(default)]
    pub failed: Option<String>,
}

/// A file in or out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    /// The offer's envelope id.
    #[serde(with = "b64")]
    pub id: [u8; 16],
    pub dir: Direction,
    /// The contact record (one device of the contact) it goes to or came from.
    pub contact: String,
    /// As the sender wrote it (shown escaped; saved under
    /// [`crate::proto::file::safe_file_name`]).
    pub name: String,
    pub size: u64,
    #[serde(with = "b64")]
    pub sha256: [u8; 32],
    #[serde(default)]
    pub caption: String,
    pub created_ms: u64,
    pub state: FileState,
    #[serde(default)]
    pub error: Option<String>,
    /// The offer's body (PROTOCOL.md §16.1): keys and queues.
    #[serde(with = "b64vec")]
    pub offer: Vec<u8>,
    #[serde(default)]
    pub source: Option<SourceRecord>,
    #[serde(default)]
    pub sets: Vec<OutSet>,
    /// In: a bit per chunk on disk (fsynced).
    #[serde(default, with = "b64vec")]
    pub have: Vec<u8>,
    #[serde(default)]
    pub have_count: u64,
    /// In: the partial file.
    #[serde(default)]
    pub part: Option<PathBuf>,
    /// In: where it is being, or was, saved.
    #[serde(default)]
    pub saved: Option<PathBuf>,
    /// In: copies on relays this conversation does not use, never read (a
    /// contact cannot make us connect to an address of its choosing).
    #[serde(default)]
    pub refused_sets: Vec<usize>,
}

impl Transfer {
    pub fn id_hex(&self) -> String {
        HEXLOWER.encode(&self.id)
    }

    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size)
    }

    /// Bytes done: on disk (in), on the copy furthest along (out).
    pub fn done_bytes(&self) -> u64 {
        let chunks = match self.dir {
            Direction::In => self.have_count,
            Direction::Out => self
                .sets
                .iter()
                .filter(|s| s.failed.is_none())
                .map(|s| s.next)
                .max()
                .unwrap_or(0),
        };
        if chunks >= self.chunk_count() {
            self.size
        } else {
            chunks * CHUNK_LEN as u64
        }
    }

    pub fn has(&self, index: u64) -> bool {
        self.have
            .get((index / 8) as usize)
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    pub fn set_have(&mut self, index: u64) -> bool {
        let byte = (index / 8) as usize;
        if self.have.len() <= byte {
            self.have.resize(self.chunk_count().div_ceil(8) as usize, 0);
        }
        let bit = 1 << (index % 8);
        if self.have[byte] & bit != 0 {
            return false;
        }
        self.have[byte] |= bit;
        self.have_count += 1;
        true
    }

    pub fn decode_offer(&self) -> Result<FileOffer, ClientError> {
        Ok(FileOffer::decode(&self.offer)?)
    }
}

/// How far a transfer got, for a progress bar.
#[derive(Debug, Clone)]
pub struct FileProgress {
    pub id: [u8; 16],
    pub name: String,
    pub done: u64,
    pub size: u64,
}

/// `--max-file-size` when not given: 100 MiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 100 << 20;

impl Client {
    /// Every transfer, newest first.
    pub fn transfers(&self) -> Result<Vec<Transfer>, ClientError> {
        let mut all: Vec<Transfer> = self.store.read(|tx| {
            let mut v = Vec::new();
            for k in tx.keys(TRANSFER_PREFIX)? {
                if let Some(t) = tx.get::<Transfer>(&k)? {
                    v.push(t);
                }
            }
            Ok(v)
        })?;
        all.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
        Ok(all)
    }

    /// The transfer whose id starts with `prefix` (hex, at least 4 digits).
    pub fn transfer(&self, prefix: &str) -> Result<Transfer, ClientError> {
        let p = prefix.to_ascii_lowercase();
        if p.len() < 4 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::Invalid(format!(
                "{prefix:?} is not a file id: give at least 4 of its hex digits (see `tern files`)"
            )));
        }
        let found: Vec<Transfer> = self
            .transfers()?
            .into_iter()
            .filter(|t| t.id_hex().starts_with(&p))
            .collect();
        match found.len() {
            0 => Err(ClientError::Invalid(format!(
                "no file with id {prefix}: see `tern files`"
            ))),
            1 => Ok(found.into_iter().next().expect("one")),
            n => Err(ClientError::Invalid(format!(
                "{n} files have ids starting with {prefix}: give more digits"
            ))),
        }
    }

    pub(crate) fn put_transfer(&mut self, t: &Transfer) -> Result<(), ClientError> {
        self.store
            .transaction(|tx| tx.put(&transfer_key(&t.id), t))?;
        Ok(())
    }

    /// Stops a transfer and deletes its queues from the relays (both
    /// sides hold the queues' recipient keys); a partial download is
    /// removed. A recipient's copy of a cancelled upload ends with an error
    /// that says so.
    pub fn cancel_transfer(&mut self, prefix: &str) -> Result<Transfer, ClientError> {
        let mut t = self.transfer(prefix)?;
        if !t.state.is_open() {
            return Err(ClientError::Invalid(format!(
                "file {} is {} already: nothing to cancel",
                t.id_hex(),
                t.state.word()
            )));
        }
        t.state = FileState::Cancelled;
        t.error = None;
        self.put_transfer(&t)?;
        self.delete_file_queues(&t);
        if let Some(p) = t.part.take() {
            let _ = std::fs::remove_file(p);
        }
        source::remove_spool(&t);
        self.put_transfer(&t)?;
        if t.dir == Direction::In {
            download::set_open(self, &t.id_hex(), false)?;
        }
        Ok(t)
    }

    /// Deletes every queue of a transfer's offer from its relays, best
    /// effort (what stays expires with the relays' TTL).
    pub(crate) fn delete_file_queues(&self, t: &Transfer) {
        let Ok(offer) = t.decode_offer() else {
            return;
        };
        std::thread::scope(|s| {
            for (i, set) in offer.sets.iter().enumerate() {
                // Ours carry our access key; it does not matter to DELETE.
                let relay = t
                    .sets
                    .get(i)
                    .map(|o| o.relay.clone())
                    .unwrap_or_else(|| set.relay.clone());
                let net = &*self.net;
                s.spawn(move || {
                    let keys: Vec<_> = (0..set.queues.len())
                        .map(|q| queue_auth(&set.seed, q as u16))
                        .collect();
                    let calls = set
                        .queues
                        .iter()
                        .zip(&keys)
                        .map(|(q, k)| Call {
                            command: Command::Delete {
                                recipient_id: q.recipient_id,
                                if_empty: false,
                            },
                            key: Some(k),
                        })
                        .collect();
                    let _ = net.batch_for(&relay, Some(&set.queues[0].recipient_id), calls);
                });
            }
        });
    }
}

/// Records an offer that arrived (inside the transaction that took its
/// message) and puts it in the history; the download runs after the batch
/// is committed. Copies on relays this connection does not use are never
/// read.
pub(crate) fn receive_offer(
    tx: &crate::store::Tx<'_>,
    c: &super::model::Contact,
    envelope: &crate::proto::envelope::Envelope,
    offer: &FileOffer,
    now_ms: u64,
) -> Result<Vec<super::events::Event>, crate::store::StoreError> {
    use super::events::Event;
    let key = transfer_key(&envelope.id);
    if tx.get::<Transfer>(&key)?.is_some() {
        return Ok(Vec::new());
    }
    let known: Vec<&tern_wire::address::RelayAddress> = c
        .conn
        .recv_queues
        .iter()
        .map(|q| &q.relay)
        .chain(c.conn.peer_queues.iter().map(|q| &q.relay))
        .collect();
    let refused_sets: Vec<usize> = offer
        .sets
        .iter()
        .enumerate()
        .filter(|(_, s)| !known.iter().any(|k| k.same_relay(&s.relay)))
        .map(|(i, _)| i)
        .collect();
    if refused_sets.len() == offer.sets.len() {
        return Ok(vec![Event::Refused {
            contact: c.name.clone(),
            what: "file offer",
            reason: "its copies are all on relays this conversation does not use".into(),
        }]);
    }
    let t = Transfer {
        id: envelope.id,
        dir: Direction::In,
        contact: c.id.clone(),
        name: offer.name.clone(),
        size: offer.size,
        sha256: offer.sha256,
        caption: offer.caption.clone(),
        created_ms: now_ms,
        state: FileState::Offered,
        error: None,
        offer: offer
            .encode()
            .map_err(|e| crate::client::abort(ClientError::from(e)))?,
        source: None,
        sets: Vec::new(),
        have: Vec::new(),
        have_count: 0,
        part: None,
        saved: None,
        refused_sets,
    };
    tx.put(&key, &t)?;
    download::set_open_in(tx, &t.id_hex(), true)?;
    let entry = super::model::HistoryEntry {
        dir: Direction::In,
        id: envelope.id,
        text: upload::history_text(&offer.name, offer.size, &offer.caption),
        sent_at_ms: envelope.sent_at_ms,
        received_at_ms: Some(now_ms),
        device: None,
    };
    let mut events = Vec::new();
    if super::devices::record_history(tx, c.group(), &entry)? {
        events.push(Event::Message {
            contact: c.name.clone(),
            entry,
            chain: crate::proto::envelope::ChainStatus::InOrder,
            delivery: None,
        });
    }
    Ok(events)
}
