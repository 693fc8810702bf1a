//! The durable queue store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! What is kept is the minimum needed to run a queue, and nothing that would
//! tell a seized disk who talks to whom or when:
//!
//! ```text
//! queues(id           random 63-bit row id, not a creation counter
//!        recipient_hash SHA-256 of the recipient id (the id itself is never stored)
//!        sender_hash    SHA-256 of the sender id
//!        recipient_auth Ed25519 key that signs SUB/ACK/SECURE/DELETE
//!        queue_secret   X25519(relay queue key, recipient key): encrypts deliveries
//!        sender_auth    Ed25519 key that signs SEND, once the queue is secured
//!        unsigned_used  whether the one unsigned SEND has been accepted
//!        key_id         which access key created it (a hash), for quotas; NULL on an open relay
//!        day            the day (Unix days) it was created or last used, for expiry only:
//!                       never finer than a day, updated at most once a day)
//! messages(id         random row id, so row order says nothing about arrival order
//!          queue_id, seq  FIFO position within its queue only
//!          msg_id     the relay's random 16-byte message id
//!          received_hour  Unix time / 3600, for the TTL only
//!          body       delivery_seal(queue_secret, msg_id, message): never the uploaded bytes)
//! ```
//!
//! No addresses, no activity times finer than the day that expiry needs, no
//! counters. Deleted rows are overwritten
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
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use super::{
    today, AckOutcome, CreateOutcome, DeleteOutcome, Durability, NewMessage, NewQueue, Pending,
    QueueRef, QueueRow, SecureOutcome, SendAuth, SendOutcome, StoreError, StoredMessage,
};
use crate::log::error;
use tern_wire::Id;

/// The file name of the queue database inside the data directory.
pub const DB_FILE: &str = "relay.db";
const SCHEMA_VERSION: i64 = 2;
/// Upper bound on operations per transaction, so one commit never holds
/// replies back for long.
const MAX_BATCH: usize = 256;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Prepared statements kept per connection: more than the writer uses (its
/// operations and the transaction statements, about twenty), so the hot
/// ones are never prepared again.
const STATEMENT_CACHE: usize = 32;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY,
    recipient_hash BLOB NOT NULL UNIQUE,
    sender_hash BLOB NOT NULL UNIQUE,
    recipient_auth BLOB NOT NULL,
    queue_secret BLOB NOT NULL,
    sender_auth BLOB,
    unsigned_used INTEGER NOT NULL DEFAULT 0,
    key_id INTEGER,
    day INTEGER NOT NULL DEFAULT 0
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
CREATE INDEX IF NOT EXISTS queues_key ON queues(key_id);
CREATE INDEX IF NOT EXISTS queues_day ON queues(day);
";

/// From schema 1 (before quotas and queue expiry): existing queues count as
/// used today, so none of them expires sooner than a new one would.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE queues ADD COLUMN key_id INTEGER;
ALTER TABLE queues ADD COLUMN day INTEGER NOT NULL DEFAULT 0;
";

/// A handle to the SQLite store; clones share the writer thread and reader
/// pool.
#[derive(Clone)]
pub(crate) struct SqliteStore {
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

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
            return Err(StoreError::Schema(version, SCHEMA_VERSION));
        }
        if version == 1 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATE_1_TO_2} UPDATE queues SET day = {}; COMMIT;",
                today()
            ))?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        stable_plans(&conn)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

        let (tx, rx) = mpsc::channel();
        let writer_thread = std::thread::Builder::new()
            .name("relay-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Io(Arc::new(e)))?;
        Ok(SqliteStore {
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
                stable_plans(&c)?;
                c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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

    /// Runs `f` in the writer's next transaction; the result comes once that
    /// transaction is committed. `Lazy` operations (whose loss in a power
    /// cut is harmless, see the module docs) let their batch skip the fsync
    /// unless another operation in it needs one.
    fn submit<R, F>(&self, durability: Durability, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let Some(writer) = self.inner.writer.as_ref() else {
            return Pending::failed(StoreError::Closed);
        };
        let (reply, result) = mpsc::sync_channel(1);
        let job = Box::new(Op {
            f: Some(f),
            durability,
            result: None,
            reply,
        });
        if writer.send(job).is_err() {
            return Pending::failed(StoreError::Closed);
        }
        Pending(result)
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

    /// Up to `limit` live messages of `queue` queued after position
    /// `after_seq` (0: from the start), oldest first.
    pub fn messages_after(
        &self,
        queue: QueueRef,
        after_seq: i64,
        expired_upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT seq, msg_id, received_hour, body FROM messages
                 WHERE queue_id = ?1 AND seq > ?2 AND received_hour > ?3 ORDER BY seq LIMIT ?4",
            )?
            .query_map(
                params![queue, after_seq, expired_upto, limit as i64],
                stored_message,
            )?
            .collect()
        })
    }

    /// Whether message `msg_id` is still in `queue` (live or expired).
    pub fn has_message(&self, queue: QueueRef, msg_id: &Id) -> Result<bool, StoreError> {
        self.read(|c| seq_of(c, queue, msg_id).map(|s| s.is_some()))
    }

    /// How many live messages `queue` holds.
    pub fn count_live(&self, queue: QueueRef, expired_upto: i64) -> Result<u32, StoreError> {
        self.read(|c| live_count(c, queue, expired_upto))
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Inserts a queue, unless its ids collide or the quota is used up.
    pub fn create_queue(&self, q: NewQueue) -> Pending<CreateOutcome> {
        self.submit(Durability::Durable, move |c| {
            let count: i64 = match q.key_id {
                Some(k) => c
                    .prepare_cached("SELECT count(*) FROM queues WHERE key_id = ?1")?
                    .query_row([k], |r| r.get(0))?,
                None => c
                    .prepare_cached("SELECT count(*) FROM queues WHERE key_id IS NULL")?
                    .query_row([], |r| r.get(0))?,
            };
            if u64::try_from(count).unwrap_or(0) >= q.max_queues {
                return Ok(CreateOutcome::Quota);
            }
            let id = (OsRng.next_u64() >> 1) as i64;
            let n = c.prepare_cached(
                "INSERT OR IGNORE INTO queues (id, recipient_hash, sender_hash, recipient_auth, queue_secret, key_id, day)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![id, q.recipient_hash, q.sender_hash, q.recipient_auth, &q.queue_secret[..], q.key_id, q.day])?;
            Ok(if n == 1 {
                CreateOutcome::Created(id)
            } else {
                CreateOutcome::Collision
            })
        })
    }

    /// Sets the sender key; the same key again is an idempotent retry.
    pub fn secure(
        &self,
        queue: QueueRef,
        sender_auth: [u8; 32],
        day: i64,
    ) -> Pending<SecureOutcome> {
        self.submit(Durability::Durable, move |c| {
            let current: Option<Option<[u8; 32]>> = c
                .prepare_cached("SELECT sender_auth FROM queues WHERE id = ?1")?
                .query_row([queue], |r| r.get(0))
                .optional()?;
            Ok(match current {
                None => SecureOutcome::Auth,
                Some(Some(k)) if k == sender_auth => SecureOutcome::Secured,
                Some(Some(_)) => SecureOutcome::Auth,
                Some(None) => {
                    c.prepare_cached("UPDATE queues SET sender_auth = ?2, day = ?3 WHERE id = ?1")?
                        .execute(params![queue, sender_auth, day])?;
                    SecureOutcome::Secured
                }
            })
        })
    }

    /// Appends a message, re-checking authorisation and the quota inside the
    /// transaction so concurrent SENDs cannot both take the last slot or both
    /// use the one unsigned message.
    pub fn send(&self, m: NewMessage) -> Pending<SendOutcome> {
        self.submit(Durability::Durable, move |c| {
            let row: Option<(Option<[u8; 32]>, bool, i64)> = c
                .prepare_cached("SELECT sender_auth, unsigned_used, day FROM queues WHERE id = ?1")?
                .query_row([m.queue], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((sender_auth, unsigned_used, day)) = row else {
                return Ok(SendOutcome::Auth);
            };
            let allowed = match m.auth {
                SendAuth::Unsigned => sender_auth.is_none() && !unsigned_used,
                SendAuth::Signed(k) => sender_auth == Some(k),
            };
            if !allowed {
                return Ok(SendOutcome::Auth);
            }
            if live_count(c, m.queue, m.expired_upto)? >= i64::from(m.max_pending) {
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
            // A message (the handshake's first one included) counts as use:
            // an invitation that was answered waits for its inviter anew.
            if day < m.day {
                c.prepare_cached("UPDATE queues SET day = ?2 WHERE id = ?1")?
                    .execute(params![m.queue, m.day])?;
            }
            Ok(SendOutcome::Stored)
        })
    }

    /// Marks a secured queue used today (a recipient reading it).
    pub fn touch(&self, queue: QueueRef, day: i64) -> Pending<()> {
        self.submit(Durability::Lazy, move |c| {
            c.prepare_cached(
                "UPDATE queues SET day = ?2 WHERE id = ?1 AND day < ?2 AND sender_auth IS NOT NULL",
            )?
            .execute(params![queue, day])?;
            Ok(())
        })
    }

    /// Deletes message `msg_id`.
    pub fn ack(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        self.submit(Durability::Lazy, move |c| {
            let n = c
                .prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND msg_id = ?2")?
                .execute(params![queue, msg_id])?;
            Ok(if n == 0 {
                AckOutcome::NoMessage
            } else {
                AckOutcome::Deleted
            })
        })
    }

    /// Deletes message `msg_id` and every message queued before it, live or
    /// expired. Messages queued later keep their place: the FIFO position
    /// (`seq`) only grows while a queue holds messages, so nothing can slip
    /// in before `msg_id` after it was read.
    pub fn ack_up_to(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        self.submit(Durability::Lazy, move |c| {
            let Some(seq) = seq_of(c, queue, &msg_id)? else {
                return Ok(AckOutcome::NoMessage);
            };
            c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND seq <= ?2")?
                .execute(params![queue, seq])?;
            Ok(AckOutcome::Deleted)
        })
    }

    /// Removes a queue and everything in it (with `if_empty`, only if it
    /// holds no live message).
    pub fn delete_queue(
        &self,
        queue: QueueRef,
        if_empty: bool,
        expired_upto: i64,
    ) -> Pending<DeleteOutcome> {
        self.submit(Durability::Durable, move |c| {
            if if_empty && live_count(c, queue, expired_upto)? > 0 {
                return Ok(DeleteOutcome::NotEmpty);
            }
            c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1")?
                .execute([queue])?;
            c.prepare_cached("DELETE FROM queues WHERE id = ?1")?
                .execute([queue])?;
            Ok(DeleteOutcome::Deleted)
        })
    }

    /// Deletes every expired message; returns how many.
    pub fn purge_expired(&self, expired_upto: i64) -> Result<usize, StoreError> {
        self.submit(Durability::Lazy, move |c| {
            c.prepare_cached("DELETE FROM messages WHERE received_hour <= ?1")?
                .execute([expired_upto])
        })
        .wait()
    }

    /// Deletes queues never secured since before day `unsecured_before`, and
    /// secured queues unused since before day `idle_before`, with their
    /// messages; returns the ids of the deleted queues.
    pub fn expire_queues(
        &self,
        unsecured_before: i64,
        idle_before: i64,
    ) -> Result<Vec<QueueRef>, StoreError> {
        self.submit(Durability::Durable, move |c| {
            let gone: Vec<QueueRef> = c
                .prepare_cached(
                    "SELECT id FROM queues WHERE (sender_auth IS NULL AND day < ?1) OR day < ?2",
                )?
                .query_map(params![unsecured_before, idle_before], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for q in &gone {
                c.prepare_cached("DELETE FROM messages WHERE queue_id = ?1")?
                    .execute([q])?;
                c.prepare_cached("DELETE FROM queues WHERE id = ?1")?
                    .execute([q])?;
            }
            Ok(gone)
        })
        .wait()
    }

    /// Bytes the database uses (pages in use, not free ones).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
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

/// Turns on the query planner stability guarantee. The bundled SQLite is
/// built with STAT4, so without it a cached statement is compiled again on
/// its first step after a bound value changed, as if the schema had changed:
/// the push path's read of a queue's next messages spent more time being
/// compiled than running (about 6% of the relay's CPU at 16 pairs). The
/// relay never runs ANALYZE, so no plan depends on the values.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

fn live_count(c: &Connection, queue: QueueRef, expired_upto: i64) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT count(*) FROM messages WHERE queue_id = ?1 AND received_hour > ?2")?
        .query_row(params![queue, expired_upto], |r| r.get(0))
}

fn queue_where(
    c: &Connection,
    column: &str,
    hash: &[u8; 32],
) -> rusqlite::Result<Option<QueueRow>> {
    // `column` is one of two constants, never input.
    let sql = format!(
        "SELECT id, recipient_auth, queue_secret, sender_auth, unsigned_used, day FROM queues WHERE {column} = ?1"
    );
    c.prepare_cached(&sql)?
        .query_row([hash], |r| {
            Ok(QueueRow {
                queue: r.get(0)?,
                recipient_auth: r.get(1)?,
                queue_secret: Zeroizing::new(r.get(2)?),
                sender_auth: r.get(3)?,
                unsigned_used: r.get(4)?,
                day: r.get(5)?,
            })
        })
        .optional()
}

fn stored_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        seq: r.get(0)?,
        msg_id: r.get(1)?,
        received_hour: r.get(2)?,
        body: r.get(3)?,
    })
}

/// The FIFO position of message `msg_id` in `queue`, if it is there.
fn seq_of(c: &Connection, queue: QueueRef, msg_id: &Id) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT seq FROM messages WHERE queue_id = ?1 AND msg_id = ?2")?
        .query_row(params![queue, msg_id], |r| r.get(0))
        .optional()
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
        if let Err(e) = run_cached(conn, "SAVEPOINT op") {
            self.result = Some(Err(e));
            return;
        }
        let mut result = f(conn);
        let end = if result.is_ok() {
            run_cached(conn, "RELEASE op")
        } else {
            run_cached(conn, "ROLLBACK TO op").and_then(|()| run_cached(conn, "RELEASE op"))
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
        // Not cached: SQLite compiles a PRAGMA again on every run anyway.
        conn.pragma_update(None, "synchronous", level)?;
        *current = wanted;
    }
    Ok(())
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
    run_cached(conn, "BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        job.run(conn);
    }
    if let Err(e) = run_cached(conn, "COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

/// Runs one statement that returns no rows, prepared once per connection
/// (the transaction and savepoint statements run several times for every
/// write: `execute_batch` would parse them anew each time).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.raw_query();
    while rows.next()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::run_cached;
    use rusqlite::Connection;

    fn synchronous(c: &Connection) -> i64 {
        c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
    }

    /// SQLite marks every PRAGMA statement to be run only once (it expires
    /// itself and is compiled again on its next run), so even a cached
    /// `synchronous` switch takes effect each time: caching it would only
    /// save nothing, which is why `set_sync` does not.
    #[test]
    fn a_cached_synchronous_pragma_still_acts_each_time() {
        let c = Connection::open_in_memory().unwrap();
        for _ in 0..3 {
            run_cached(&c, "PRAGMA synchronous = NORMAL").unwrap();
            assert_eq!(synchronous(&c), 1);
            run_cached(&c, "PRAGMA synchronous = FULL").unwrap();
            assert_eq!(synchronous(&c), 2);
        }
    }

    /// The statements `run_cached` runs again do take effect each time.
    #[test]
    fn cached_transaction_statements_run_each_time() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        for i in 0..3 {
            run_cached(&c, "BEGIN IMMEDIATE").unwrap();
            assert!(!c.is_autocommit());
            run_cached(&c, "SAVEPOINT op").unwrap();
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            if i == 1 {
                run_cached(&c, "ROLLBACK TO op").unwrap();
            }
            run_cached(&c, "RELEASE op").unwrap();
            run_cached(&c, "COMMIT").unwrap();
            assert!(c.is_autocommit());
        }
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "the rolled-back insert is gone, the others stayed");
    }
}
