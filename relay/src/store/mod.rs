//! The durable queue store, behind one handle for both backends: SQLite
//! under the data directory (the default, [`sqlite`]) and PostgreSQL
//! ([`pg`]), for relays on platforms whose disk does not last and for several
//! relay nodes serving one relay.
//!
//! Both keep the same rows and give the same guarantees: a write's result
//! arrives only after the transaction that carried it committed; writes
//! waiting at the same time share one commit; ids are stored only as
//! SHA-256 hashes; no address or activity time finer than a day is kept.
//! The handle is an enum rather than a trait object so that the handler
//! stays unaware of the backend and a call costs one match.

mod pg;
mod sqlite;
mod tls;

use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::waiters::Waiters;
use tern_wire::Id;

pub use sqlite::DB_FILE;

/// Checks a PostgreSQL connection string and its TLS settings (the root
/// certificates are read) without connecting.
pub fn check_database_url(url: &str) -> Result<(), StoreError> {
    tls::DbConfig::parse(url).map(drop)
}

#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("{0}")]
    Postgres(Arc<postgres::Error>),
    /// The database cannot be reached, restarts, or asked for a retry (a
    /// deadlock or serialisation failure): clients are told "temporarily
    /// unavailable" and retry; the store reconnects by itself.
    #[error("the database is unavailable ({0})")]
    Unavailable(String),
    /// A connection string or setting that cannot work as given.
    #[error("{0}")]
    Config(String),
    #[error("cannot create the database file: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the database was written by a newer relay (schema {0}, this relay knows {1} at most); upgrade tern on every relay node that uses it")]
    Schema(i64, i64),
    #[error("the database holds a malformed {0}; it may be damaged, or not a tern relay database")]
    Corrupt(&'static str),
    #[error("the store is shut down")]
    Closed,
}

impl StoreError {
    /// Whether the client should be told to retry ("temporarily
    /// unavailable") rather than that the relay failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

/// A queue's database row id. Random, so it carries no information.
pub type QueueRef = i64;

/// A queue as the handler needs it to authorise a request.
pub struct QueueRow {
    pub queue: QueueRef,
    pub recipient_auth: [u8; 32],
    pub queue_secret: Zeroizing<[u8; 32]>,
    pub sender_auth: Option<[u8; 32]>,
    pub unsigned_used: bool,
    /// The day it was created or last used (see `sqlite.rs`).
    pub day: i64,
}

pub struct NewQueue {
    pub recipient_hash: [u8; 32],
    pub sender_hash: [u8; 32],
    pub recipient_auth: [u8; 32],
    pub queue_secret: Zeroizing<[u8; 32]>,
    /// The access key it was created with, if any (a hash of it).
    pub key_id: Option<i64>,
    /// Most queues `key_id` (or, without one, all keyless queues) may have.
    pub max_queues: u64,
    pub day: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(QueueRef),
    /// The ids collide with an existing queue: draw new ones.
    Collision,
    /// The access key (or the open relay) has as many queues as allowed.
    Quota,
}

/// A pending message, as stored (already encrypted for the recipient).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// FIFO position within its queue.
    pub seq: i64,
    pub msg_id: Id,
    pub received_hour: i64,
    pub body: Vec<u8>,
}

/// Which key a SEND was authorised with; re-checked inside the transaction
/// because the queue may have been secured or deleted since it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendAuth {
    Unsigned,
    Signed([u8; 32]),
}

pub struct NewMessage {
    pub queue: QueueRef,
    pub auth: SendAuth,
    pub msg_id: Id,
    pub received_hour: i64,
    pub body: Vec<u8>,
    pub max_pending: u32,
    /// Messages with `received_hour <= expired_upto` do not count.
    pub expired_upto: i64,
    /// Today, to mark the queue used.
    pub day: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Stored,
    Auth,
    QueueFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureOutcome {
    Secured,
    Auth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Deleted,
    NoMessage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// `if_empty` was asked and a live message is there.
    NotEmpty,
}

/// The last `received_hour` that is expired at `now_secs`: a message is live
/// while `received_hour * 3600 + ttl_secs > now_secs`.
pub fn expired_upto(now_secs: u64, ttl_secs: u64) -> i64 {
    let limit = i128::from(now_secs) - i128::from(ttl_secs);
    let hour = limit.div_euclid(3600);
    i64::try_from(hour).unwrap_or(i64::MIN)
}

/// A write handed to the writer thread; [`Pending::wait`] returns its result
/// once the transaction that carried it has committed. Submitting several
/// before waiting for any lets them share one commit.
pub struct Pending<R>(Receiver<Result<R, StoreError>>);

impl<R> Pending<R> {
    pub fn wait(self) -> Result<R, StoreError> {
        self.0.recv().unwrap_or(Err(StoreError::Closed))
    }

    fn failed(e: StoreError) -> Self {
        let (tx, rx) = mpsc::sync_channel(1);
        let _ = tx.send(Err(e));
        Pending(rx)
    }
}

/// Days since the Unix epoch, the only clock the store keeps.
pub fn today() -> i64 {
    day_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The Unix day of `secs` seconds since the epoch.
pub fn day_of(secs: u64) -> i64 {
    i64::try_from(secs / 86_400).unwrap_or(i64::MAX)
}

/// Whether a write must be on disk before its caller hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Committed with an fsync.
    Durable,
    /// Committed without one if nothing else in the batch needs it.
    Lazy,
}

/// A handle to the store; clones share the backend's connections and writer
/// thread.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(pg::PgStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sqlite($s) => $e,
            Backend::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(sqlite::SqliteStore::open(path)?),
        })
    }

    /// Connects to the PostgreSQL database at `url` (a `postgres://` URL or
    /// a `key=value` connection string) and brings its schema up to date.
    pub fn open_postgres(url: &str) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Postgres(pg::PgStore::open(url)?),
        })
    }

    /// The relay identity in the PostgreSQL database at `url`, if there is
    /// one; creates nothing (no tables, no key) and starts no thread.
    pub fn read_database_identity(url: &str) -> Result<Option<Zeroizing<[u8; 32]>>, StoreError> {
        pg::read_identity(url)
    }

    /// Whether this is the PostgreSQL store.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The relay identity kept in the database, created on first use (once,
    /// whichever node asks first). PostgreSQL only: the SQLite relay keeps
    /// its identity in a file beside the database.
    pub fn identity(&self, create: bool) -> Result<Option<Zeroizing<[u8; 32]>>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(s) => s.identity(create),
        }
    }

    /// Lets writes committed by other relay nodes on the same database wake
    /// this node's subscriptions (PostgreSQL; nothing to do for SQLite,
    /// which one relay alone may use).
    pub(crate) fn listen(&self, waiters: Arc<Waiters>) {
        if let Backend::Postgres(s) = &self.backend {
            s.listen(waiters);
        }
    }

    pub fn queue_by_recipient(
        &self,
        recipient_hash: &[u8; 32],
    ) -> Result<Option<QueueRow>, StoreError> {
        each!(self, s => s.queue_by_recipient(recipient_hash))
    }

    pub fn queue_by_sender(&self, sender_hash: &[u8; 32]) -> Result<Option<QueueRow>, StoreError> {
        each!(self, s => s.queue_by_sender(sender_hash))
    }

    /// Up to `limit` live messages of `queue` queued after position
    /// `after_seq` (0: from the start), oldest first.
    pub fn messages_after(
        &self,
        queue: QueueRef,
        after_seq: i64,
        expired_upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        each!(self, s => s.messages_after(queue, after_seq, expired_upto, limit))
    }

    /// Whether message `msg_id` is still in `queue` (live or expired).
    pub fn has_message(&self, queue: QueueRef, msg_id: &Id) -> Result<bool, StoreError> {
        each!(self, s => s.has_message(queue, msg_id))
    }

    /// How many live messages `queue` holds.
    pub fn count_live(&self, queue: QueueRef, expired_upto: i64) -> Result<u32, StoreError> {
        each!(self, s => s.count_live(queue, expired_upto))
    }

    /// Inserts a queue, unless its ids collide or the quota is used up.
    pub fn create_queue(&self, q: NewQueue) -> Pending<CreateOutcome> {
        each!(self, s => s.create_queue(q))
    }

    /// Sets the sender key; the same key again is an idempotent retry.
    pub fn secure(
        &self,
        queue: QueueRef,
        sender_auth: [u8; 32],
        day: i64,
    ) -> Pending<SecureOutcome> {
        each!(self, s => s.secure(queue, sender_auth, day))
    }

    /// Appends a message, re-checking authorisation and the quota inside the
    /// transaction so concurrent SENDs cannot both take the last slot or both
    /// use the one unsigned message.
    pub fn send(&self, m: NewMessage) -> Pending<SendOutcome> {
        each!(self, s => s.send(m))
    }

    /// Marks a secured queue used today (a recipient reading it).
    pub fn touch(&self, queue: QueueRef, day: i64) -> Pending<()> {
        each!(self, s => s.touch(queue, day))
    }

    /// Deletes message `msg_id`.
    pub fn ack(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        each!(self, s => s.ack(queue, msg_id))
    }

    /// Deletes message `msg_id` and every message queued before it, live or
    /// expired.
    pub fn ack_up_to(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        each!(self, s => s.ack_up_to(queue, msg_id))
    }

    /// Removes a queue and everything in it (with `if_empty`, only if it
    /// holds no live message).
    pub fn delete_queue(
        &self,
        queue: QueueRef,
        if_empty: bool,
        expired_upto: i64,
    ) -> Pending<DeleteOutcome> {
        each!(self, s => s.delete_queue(queue, if_empty, expired_upto))
    }

    /// Deletes every expired message; returns how many.
    pub fn purge_expired(&self, expired_upto: i64) -> Result<usize, StoreError> {
        each!(self, s => s.purge_expired(expired_upto))
    }

    /// Deletes queues never secured since before day `unsecured_before`, and
    /// secured queues unused since before day `idle_before`, with their
    /// messages; returns the ids of the deleted queues.
    pub fn expire_queues(
        &self,
        unsecured_before: i64,
        idle_before: i64,
    ) -> Result<Vec<QueueRef>, StoreError> {
        each!(self, s => s.expire_queues(unsecured_before, idle_before))
    }

    /// Bytes of live data, for the high-water mark (`--max-data-mib`).
    /// SQLite: pages in use. PostgreSQL: an estimate from the row counts (the
    /// table files do not shrink when rows are deleted, so their size would
    /// keep a relay refusing messages after its queues were drained).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        each!(self, s => s.size_bytes())
    }

    /// Periodic cleanup after the purge. SQLite: truncates the WAL, so
    /// deleted rows do not survive in old WAL frames. PostgreSQL: VACUUMs
    /// the relay's tables, so deleted rows stop being kept as dead tuples.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        each!(self, s => s.checkpoint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_boundary() {
        // Received in hour 10 with a 2-hour TTL: live until 12:00:00.
        let ttl = 7200;
        assert!(10 > expired_upto(12 * 3600 - 1, ttl));
        assert!(10 <= expired_upto(12 * 3600, ttl));
        assert_eq!(expired_upto(0, ttl), -2);
    }
}
