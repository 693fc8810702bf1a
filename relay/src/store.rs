//! The durable queue store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! What is kept is the minimum needed to run a queue, and nothing that would
//! tell a seized disk who talks to whom or when:
//!
//! ```text
//! queues(id           random 63-bit row id, not a creation counter
//!        recipient_hash SHA-256 of the recipient id (the id itself is never stored)
//!        sender_hash    SHA-256 of the sender id
//!        recipient_auth Ed25519 key that signs FETCH/ACK/SECURE/DELETE
//!        queue_secret   X25519(relay queue key, recipient key): encrypts deliveries
//!        sender_auth    Ed25519 key that signs SEND, once the queue is secured
//!        unsigned_used  whether the one unsigned SEND has been accepted)
//! messages(id         random row id, so row order says nothing about arrival order
//!          queue_id, seq  FIFO position within its queue only
//!          msg_id     the relay's random 16-byte message id
//!          received_hour  Unix time / 3600, for the TTL only
//!          body       delivery_seal(queue_secret, msg_id, message): never the uploaded bytes)
//! ```
//!
//! No addresses, no activity times, no counters. Deleted rows are overwritten
//! (`secure_delete`), and the WAL is truncated periodically.
//!
//! All writes go through one writer thread that batches whatever requests are
//! waiting into one transaction (group commit): a caller gets its result only
//! after that transaction's COMMIT has returned, so an OK the client sees is on
//! disk. Each operation runs inside its own SAVEPOINT, so one failing
//! operation does not take the batch down with it. Reads use a pool of
//! separate connections, which WAL lets run alongside the writer.
//!
//! A batch made only of acknowledgements (and expiry purges) commits without
//! an fsync (`synchronous=NORMAL` for that transaction): losing such a
//! deletion to a power cut only means the message is delivered again, which
//! recipients deduplicate, and the next durable commit (any SEND, CREATE,
//! SECURE or DELETE) fsyncs the write-ahead log up to and including it. A
//! process crash loses nothing either way. This takes an fsync off every
//! step of a recipient draining its queue, where each message waits for the
//! ACK of the one before.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::OsRng;
use rand_core::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::log::error;
use crate::wire::Id;

/// The file name of the queue database inside the data directory.
pub const DB_FILE: &str = "relay.db";
const SCHEMA_VERSION: i64 = 1;
/// Upper bound on operations per transaction, so one commit never holds
/// replies back for long.
const MAX_BATCH: usize = 256;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY,
    recipient_hash BLOB NOT NULL UNIQUE,
    sender_hash BLOB NOT NULL UNIQUE,
    recipient_auth BLOB NOT NULL,
    queue_secret BLOB NOT NULL,
    sender_auth BLOB,
    unsigned_used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    received_hour INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_fifo ON messages(queue_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages(queue_id, msg_id);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages(received_hour);
";

#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("cannot create the database file: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the database was written by a newer relay (schema {0}); upgrade tern")]
    Schema(i64),
    #[error("the store is shut down")]
    Closed,
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
}

pub struct NewQueue {
    pub recipient_hash: [u8; 32],
    pub sender_hash: [u8; 32],
    pub recipient_auth: [u8; 32],
    pub queue_secret: Zeroizing<[u8; 32]>,
}

/// A pending message, as stored (already encrypted for the recipient).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredMessage {
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

pub enum AckOutcome {
    NoMessage,
    /// The message was deleted; this is the next pending one, if any.
    Next(Option<StoredMessage>),
}

impl AckOutcome {
    /// `None` for [`AckOutcome::NoMessage`], else the next message if any.
    pub fn next(self) -> Option<Option<StoredMessage>> {
        match self {
            AckOutcome::NoMessage => None,
            AckOutcome::Next(m) => Some(m),
        }
    }
}

/// The last `received_hour` that is expired at `now_secs`: a message is live
/// while `received_hour * 3600 + ttl_secs > now_secs`.
pub fn expired_upto(now_secs: u64, ttl_secs: u64) -> i64 {
    let limit = i128::from(now_secs) - i128::from(ttl_secs);
    let hour = limit.div_euclid(3600);
    i64::try_from(hour).unwrap_or(i64::MIN)
}

/// A handle to the store; clones share the writer thread and reader pool.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Option<Sender<Box<dyn WriteJob>>>,
    writer_thread: Option<JoinHandle<()>>,
    readers: Mutex<Vec<Connection>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish the jobs it has, then exit.
        self.writer.take();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // SQLite gives the -wal and -shm files the database file's mode, so
        // creating it owner-only first keeps all three private.
        if !path.exists() {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Io(Arc::new(e)))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidQuery.into());
        }
        // FULL: a commit survives power loss, which is what an OK promises.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Freed pages are zeroed, so acknowledged messages do not linger on disk.
        conn.pragma_update(None, "secure_delete", "ON")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Schema(version));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;

        let (tx, rx) = mpsc::channel();
        let writer_thread = std::thread::Builder::new()
            .name("relay-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Io(Arc::new(e)))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Some(tx),
                writer_thread: Some(writer_thread),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    fn read<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let pooled = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.inner.path)?;
                c.busy_timeout(BUSY_TIMEOUT)?;
                c.pragma_update(None, "query_only", "ON")?;
                c
            }
        };
        let result = f(&conn);
        self.inner
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
        Ok(result?)
    }

    /// Runs `f` in the writer's next transaction and returns its result once
    /// that transaction is committed.
    fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.write_with(Durability::Durable, f)
    }

    /// [`Store::write`] for operations whose loss in a power cut is harmless
    /// (see the module docs): their batch skips the fsync unless another
    /// operation in it needs one.
    fn write_lazy<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.write_with(Durability::Lazy, f)
    }

    fn write_with<R, F>(&self, durability: Durability, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let writer = self.inner.writer.as_ref().ok_or(StoreError::Closed)?;
        let (reply, result) = mpsc::sync_channel(1);
        let job = Box::new(Op {
            f: Some(f),
            durability,
            result: None,
            reply,
        });
        writer.send(job).map_err(|_| StoreError::Closed)?;
        result.recv().unwrap_or(Err(StoreError::Closed))
    }

    pub fn queue_by_recipient(
        &self,
        recipient_hash: &[u8; 32],
    ) -> Result<Option<QueueRow>, StoreError> {
        self.read(|c| queue_where(c, "recipient_hash", recipient_hash))
    }

    pub fn queue_by_sender(&self, sender_hash: &[u8; 32]) -> Result<Option<QueueRow>, StoreError> {
        self.read(|c| queue_where(c, "sender_hash", sender_hash))
    }

    /// The oldest live message of `queue`.
    pub fn oldest_message(
        &self,
        queue: QueueRef,
        expired_upto: i64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.read(|c| oldest(c, queue, expired_upto))
    }

    /// Inserts a queue; `None` if its ids collide with an existing queue
    /// (the caller draws new ones).
    pub fn create_queue(&self, q: NewQueue) -> Result<Option<QueueRef>, StoreError> {
        self.write(move |c| {
            let id = (OsRng.next_u64() >> 1) as i64;
            let n = c.prepare_cached(
                "INSERT OR IGNORE INTO queues (id, recipient_hash, sender_hash, recipient_auth, queue_secret)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, q.recipient_hash, q.sender_hash, q.recipient_auth, &q.queue_secret[..]])?;
            Ok((n == 1).then_some(id))
        })
    }

    /// Sets the sender key; the same key again is an idempotent retry.
    pub fn secure(
        &self,
        queue: QueueRef,
        sender_auth: [u8; 32],
    ) -> Result<SecureOutcome, StoreError> {
        self.write(move |c| {
            let current: Option<Option<[u8; 32]>> = c
                .prepare_cached("SELECT sender_auth FROM queues WHERE id = ?1")?
                .query_row([queue], |r| r.get(0))
                .optional()?;
            Ok(match current {
                None => SecureOutcome::Auth,
                Some(Some(k)) if k == sender_auth => SecureOutcome::Secured,
                Some(Some(_)) => SecureOutcome::Auth,
                Some(None) => {
                    c.prepare_cached("UPDATE queues SET sender_auth = ?2 WHERE id = ?1")?
                        .execute(params![queue, sender_auth])?;
                    SecureOutcome::Secured
                }
            })
        })
    }

    /// Appends a message, re-checking authorisation and the quota inside the
    /// transaction so concurrent SENDs cannot both take the last slot or both
    /// use the one unsigned message.
    pub fn send(&self, m: NewMessage) -> Result<SendOutcome, StoreError> {
        self.write(move |c| {
            let row: Option<(Option<[u8; 32]>, bool)> = c
                .prepare_cached("SELECT sender_auth, unsigned_used FROM queues WHERE id = ?1")?
                .query_row([m.queue], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((sender_auth, unsigned_used)) = row else {
                return Ok(SendOutcome::Auth);
            };
            let allowed = match m.auth {
                SendAuth::Unsigned => sender_auth.is_none() && !unsigned_used,
                SendAuth::Signed(k) => sender_auth == Some(k),
            };
            if !allowed {
                return Ok(SendOutcome::Auth);
            }
            let pending: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM messages WHERE queue_id = ?1 AND received_hour > ?2",
                )?
                .query_row(params![m.queue, m.expired_upto], |r| r.get(0))?;
            if pending >= i64::from(m.max_pending) {
                return Ok(SendOutcome::QueueFull);
            }
            let seq: i64 = c
                .prepare_cached(
                    "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE queue_id = ?1",
                )?
                .query_row([m.queue], |r| r.get(0))?;
            c.prepare_cached(
                "INSERT INTO messages (id, queue_id, seq, msg_id, received_hour, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                (OsRng.next_u64() >> 1) as i64,
                m.queue,
                seq,
                m.msg_id,
                m.received_hour,
                m.body
            ])?;
            if m.auth == SendAuth::Unsigned {
                c.prepare_cached("UPDATE queues SET unsigned_used = 1 WHERE id = ?1")?
                    .execute([m.queue])?;
            }
            Ok(SendOutcome::Stored)
        })
    }

    /// Deletes message `msg_id` and returns the next live one.
    pub fn ack(
        &self,
        queue: QueueRef,
        msg_id: Id,
        expired_upto: i64,
    ) -> Result<AckOutcome, StoreError> {
        self.write_lazy(move |c| {
            let n = c
                .prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND msg_id = ?2")?
                .execute(params![queue, msg_id])?;
            if n == 0 {
                return Ok(AckOutcome::NoMessage);
            }
            Ok(AckOutcome::Next(oldest(c, queue, expired_upto)?))
        })
    }

    /// Deletes message `msg_id` and every message queued before it, live or
    /// expired, and returns the next live one. Messages queued later keep
    /// their place: the FIFO position (`seq`) only grows while a queue holds
    /// messages, so nothing can slip in before `msg_id` after it was read.
    pub fn ack_up_to(
        &self,
        queue: QueueRef,
        msg_id: Id,
        expired_upto: i64,
    ) -> Result<AckOutcome, StoreError> {
        self.write_lazy(move |c| {
            let Some(seq) = seq_of(c, queue, &msg_id)? else {
                return Ok(AckOutcome::NoMessage);
            };
            c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND seq <= ?2")?
                .execute(params![queue, seq])?;
            Ok(AckOutcome::Next(oldest(c, queue, expired_upto)?))
        })
    }

    /// The oldest live message queued after message `after`; `None` in the
    /// outer option if `after` is not in the queue (acknowledged meanwhile).
    pub fn message_after(
        &self,
        queue: QueueRef,
        after: Id,
        expired_upto: i64,
    ) -> Result<Option<Option<StoredMessage>>, StoreError> {
        self.read(|c| {
            let Some(seq) = seq_of(c, queue, &after)? else {
                return Ok(None);
            };
            c.prepare_cached(
                "SELECT msg_id, received_hour, body FROM messages
                 WHERE queue_id = ?1 AND seq > ?2 AND received_hour > ?3 ORDER BY seq LIMIT 1",
            )?
            .query_row(params![queue, seq, expired_upto], stored_message)
            .optional()
            .map(Some)
        })
    }

    /// Removes a queue and everything in it.
    pub fn delete_queue(&self, queue: QueueRef) -> Result<(), StoreError> {
        self.write(move |c| {
            c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1")?
                .execute([queue])?;
            c.prepare_cached("DELETE FROM queues WHERE id = ?1")?
                .execute([queue])?;
            Ok(())
        })
    }

    /// Deletes every expired message; returns how many.
    pub fn purge_expired(&self, expired_upto: i64) -> Result<usize, StoreError> {
        self.write_lazy(move |c| {
            c.prepare_cached("DELETE FROM messages WHERE received_hour <= ?1")?
                .execute([expired_upto])
        })
    }

    /// Copies the WAL into the database and truncates it, so deleted rows do
    /// not survive in old WAL frames. Runs on its own connection because a
    /// checkpoint cannot run inside the writer's transactions.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let c = Connection::open(&self.inner.path)?;
        c.busy_timeout(BUSY_TIMEOUT)?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

fn queue_where(
    c: &Connection,
    column: &str,
    hash: &[u8; 32],
) -> rusqlite::Result<Option<QueueRow>> {
    // `column` is one of two constants, never input.
    let sql = format!(
        "SELECT id, recipient_auth, queue_secret, sender_auth, unsigned_used FROM queues WHERE {column} = ?1"
    );
    c.prepare_cached(&sql)?
        .query_row([hash], |r| {
            Ok(QueueRow {
                queue: r.get(0)?,
                recipient_auth: r.get(1)?,
                queue_secret: Zeroizing::new(r.get(2)?),
                sender_auth: r.get(3)?,
                unsigned_used: r.get(4)?,
            })
        })
        .optional()
}

fn stored_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        msg_id: r.get(0)?,
        received_hour: r.get(1)?,
        body: r.get(2)?,
    })
}

fn oldest(
    c: &Connection,
    queue: QueueRef,
    expired_upto: i64,
) -> rusqlite::Result<Option<StoredMessage>> {
    c.prepare_cached(
        "SELECT msg_id, received_hour, body FROM messages
         WHERE queue_id = ?1 AND received_hour > ?2 ORDER BY seq LIMIT 1",
    )?
    .query_row(params![queue, expired_upto], stored_message)
    .optional()
}

/// The FIFO position of message `msg_id` in `queue`, if it is there.
fn seq_of(c: &Connection, queue: QueueRef, msg_id: &Id) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT seq FROM messages WHERE queue_id = ?1 AND msg_id = ?2")?
        .query_row(params![queue, msg_id], |r| r.get(0))
        .optional()
}

/// Whether a write must be on disk before its caller hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Committed with an fsync.
    Durable,
    /// Committed without one if nothing else in the batch needs it.
    Lazy,
}

/// One queued write: runs inside the batch transaction, answers after COMMIT.
trait WriteJob: Send {
    fn durability(&self) -> Durability;
    fn run(&mut self, conn: &Connection);
    fn finish(self: Box<Self>, commit: &Result<(), StoreError>);
}

struct Op<R, F> {
    f: Option<F>,
    durability: Durability,
    result: Option<rusqlite::Result<R>>,
    reply: SyncSender<Result<R, StoreError>>,
}

impl<R, F> WriteJob for Op<R, F>
where
    R: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<R> + Send,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(&mut self, conn: &Connection) {
        let Some(f) = self.f.take() else { return };
        if let Err(e) = conn.execute_batch("SAVEPOINT op") {
            self.result = Some(Err(e));
            return;
        }
        let mut result = f(conn);
        let end = if result.is_ok() {
            conn.execute_batch("RELEASE op")
        } else {
            conn.execute_batch("ROLLBACK TO op; RELEASE op")
        };
        if let Err(e) = end {
            result = Err(e);
        }
        self.result = Some(result);
    }

    fn finish(self: Box<Self>, commit: &Result<(), StoreError>) {
        let out = match (commit, self.result) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Some(r)) => r.map_err(StoreError::from),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        // The caller may have gone away; nothing to do then.
        let _ = self.reply.send(out);
    }
}

fn writer_loop(conn: Connection, jobs: Receiver<Box<dyn WriteJob>>) {
    // `Store::open` left the connection at synchronous=FULL.
    let mut current = Durability::Durable;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let wanted = if batch.iter().any(|j| j.durability() == Durability::Durable) {
            Durability::Durable
        } else {
            Durability::Lazy
        };
        let commit =
            set_sync(&conn, &mut current, wanted).and_then(|()| run_batch(&conn, &mut batch));
        if let Err(e) = &commit {
            error!(
                "a database transaction failed, {} requests answered with an internal error: {e}",
                batch.len()
            );
        }
        for job in batch {
            job.finish(&commit);
        }
    }
    // Leave a compact database behind on a clean shutdown.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// Switches the connection's `synchronous` setting between transactions
/// (SQLite does not allow it inside one). If switching fails, the batch is
/// refused rather than committed with less durability than it asked for.
fn set_sync(
    conn: &Connection,
    current: &mut Durability,
    wanted: Durability,
) -> Result<(), StoreError> {
    if *current != wanted {
        let level = match wanted {
            Durability::Durable => "FULL",
            Durability::Lazy => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", level)?;
        *current = wanted;
    }
    Ok(())
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        job.run(conn);
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(store: &Store, n: u8) -> QueueRef {
        store
            .create_queue(NewQueue {
                recipient_hash: [n; 32],
                sender_hash: [n + 100; 32],
                recipient_auth: [1; 32],
                queue_secret: Zeroizing::new([2; 32]),
            })
            .unwrap()
            .unwrap()
    }

    fn msg(queue: QueueRef, id: u8, auth: SendAuth, hour: i64) -> NewMessage {
        NewMessage {
            queue,
            auth,
            msg_id: [id; 16],
            received_hour: hour,
            body: vec![id; 10],
            max_pending: 3,
            expired_upto: 0,
        }
    }

    #[test]
    fn fifo_quota_ack_and_unsigned_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
        let q = queue(&store, 1);
        assert_eq!(
            store
                .create_queue(NewQueue {
                    recipient_hash: [1; 32],
                    sender_hash: [9; 32],
                    recipient_auth: [1; 32],
                    queue_secret: Zeroizing::new([2; 32]),
                })
                .unwrap(),
            None
        );
        assert_eq!(
            store.send(msg(q, 1, SendAuth::Unsigned, 10)).unwrap(),
            SendOutcome::Stored
        );
        assert_eq!(
            store.send(msg(q, 2, SendAuth::Unsigned, 10)).unwrap(),
            SendOutcome::Auth
        );
        assert_eq!(
            store
                .send(msg(q, 2, SendAuth::Signed([5; 32]), 10))
                .unwrap(),
            SendOutcome::Auth
        );
        assert_eq!(store.secure(q, [5; 32]).unwrap(), SecureOutcome::Secured);
        assert_eq!(store.secure(q, [5; 32]).unwrap(), SecureOutcome::Secured);
        assert_eq!(store.secure(q, [6; 32]).unwrap(), SecureOutcome::Auth);
        for id in 2..=3 {
            assert_eq!(
                store
                    .send(msg(q, id, SendAuth::Signed([5; 32]), 10))
                    .unwrap(),
                SendOutcome::Stored
            );
        }
        assert_eq!(
            store
                .send(msg(q, 4, SendAuth::Signed([5; 32]), 10))
                .unwrap(),
            SendOutcome::QueueFull
        );
        assert_eq!(store.oldest_message(q, 0).unwrap().unwrap().msg_id, [1; 16]);
        assert!(matches!(
            store.ack(q, [9; 16], 0).unwrap(),
            AckOutcome::NoMessage
        ));
        match store.ack(q, [1; 16], 0).unwrap() {
            AckOutcome::Next(Some(m)) => assert_eq!(m.msg_id, [2; 16]),
            _ => panic!("expected the next message"),
        }
        // Reading ahead, then acknowledging the run read.
        assert_eq!(
            store
                .message_after(q, [2; 16], 0)
                .unwrap()
                .unwrap()
                .unwrap()
                .msg_id,
            [3; 16]
        );
        assert!(store
            .message_after(q, [3; 16], 0)
            .unwrap()
            .unwrap()
            .is_none());
        assert!(store.message_after(q, [1; 16], 0).unwrap().is_none());
        assert!(matches!(
            store.ack_up_to(q, [1; 16], 0).unwrap(),
            AckOutcome::NoMessage
        ));
        assert_eq!(
            store
                .send(msg(q, 4, SendAuth::Signed([5; 32]), 10))
                .unwrap(),
            SendOutcome::Stored
        );
        match store.ack_up_to(q, [3; 16], 0).unwrap() {
            AckOutcome::Next(Some(m)) => assert_eq!(m.msg_id, [4; 16]),
            _ => panic!("expected the message queued after the run"),
        }
        assert_eq!(
            store
                .send(msg(q, 5, SendAuth::Signed([5; 32]), 10))
                .unwrap(),
            SendOutcome::Stored
        );
        // Expired messages are neither delivered nor counted.
        assert!(store.oldest_message(q, 10).unwrap().is_none());
        assert_eq!(store.purge_expired(10).unwrap(), 2);
        store.delete_queue(q).unwrap();
        assert!(store.queue_by_recipient(&[1; 32]).unwrap().is_none());
        store.checkpoint().unwrap();
    }

    #[test]
    fn expiry_boundary() {
        // Received in hour 10 with a 2-hour TTL: live until 12:00:00.
        let ttl = 7200;
        assert!(10 > expired_upto(12 * 3600 - 1, ttl));
        assert!(10 <= expired_upto(12 * 3600, ttl));
        assert_eq!(expired_upto(0, ttl), -2);
    }
}
