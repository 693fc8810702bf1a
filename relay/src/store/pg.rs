//! The PostgreSQL store: the same rows as the SQLite store (see `sqlite.rs`
//! for what each column is and why nothing more is kept), in tables named
//! `tern_*` so that the relay can share a database with other applications,
//! as PaaS add-ons often are.
//!
//! Any number of relay nodes may use one database at once, and are then one
//! relay: the identity key is a row (created once, whichever node starts
//! first), and a SEND committed on one node wakes the subscriptions of the
//! others through `LISTEN`/`NOTIFY` (see [`PgStore::listen`]).
//!
//! Writes go through one writer thread per node that batches whatever is
//! waiting into one transaction (group commit), each operation inside its
//! own SAVEPOINT, answering only after COMMIT returned. A batch made only of
//! acknowledgements commits with `synchronous_commit = off`, the same
//! trade-off the SQLite store makes with `synchronous=NORMAL`: a power cut
//! may undo a deletion (the message is delivered again, which recipients
//! deduplicate), never a stored message.
//!
//! Nodes run transactions concurrently, so every operation first takes a
//! transaction-scoped advisory lock on its queue (queue creation: on its
//! access key, for the quota), and a batch takes its locks in ascending
//! order: two nodes' batches cannot deadlock on each other. The purge and
//! expiry run outside batches, one queue per transaction, taking the same
//! locks.
//!
//! Losing the database is not fatal: the operations in flight fail with
//! [`StoreError::Unavailable`] (clients hear "temporarily unavailable" and
//! retry), and the next operation reconnects. An answer is given only after
//! its COMMIT returned, so nothing acknowledged depends on a connection that
//! broke; a COMMIT whose answer was lost is reported unavailable and may
//! still have happened, so a retried SEND may be stored twice, as after a
//! SQLite relay's crash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use super::tls::DbConfig;
use rand::rngs::OsRng;
use rand_core::RngCore;
use zeroize::Zeroizing;

use super::{
    AckOutcome, CreateOutcome, DeleteOutcome, Durability, NewMessage, NewQueue, Pending, QueueRef,
    QueueRow, SecureOutcome, SendAuth, SendOutcome, StoreError, StoredMessage,
};
use crate::log::{error, info, warning};
use crate::waiters::Waiters;
use tern_wire::{Id, DELIVERED_LEN};

/// The schema this relay writes. A database at a higher version was
/// migrated by a newer relay, which this one refuses to run against.
const SCHEMA_VERSION: i64 = 1;

/// Migrations, in order: entry `n` takes the schema from version `n` to
/// `n + 1`. Applied at start, under a lock, in one transaction.
const MIGRATIONS: &[&str] = &["
CREATE TABLE tern_identity (
    id integer PRIMARY KEY CHECK (id = 1),
    secret bytea NOT NULL CHECK (octet_length(secret) = 32)
);
CREATE TABLE tern_queues (
    id bigint PRIMARY KEY,
    recipient_hash bytea NOT NULL UNIQUE,
    sender_hash bytea NOT NULL UNIQUE,
    recipient_auth bytea NOT NULL,
    queue_secret bytea NOT NULL,
    sender_auth bytea,
    unsigned_used boolean NOT NULL DEFAULT false,
    key_id bigint,
    day bigint NOT NULL
);
CREATE INDEX tern_queues_key ON tern_queues (key_id);
CREATE INDEX tern_queues_day ON tern_queues (day);
CREATE TABLE tern_messages (
    id bigint PRIMARY KEY,
    queue_id bigint NOT NULL,
    seq bigint NOT NULL,
    msg_id bytea NOT NULL,
    received_hour bigint NOT NULL,
    body bytea NOT NULL
);
-- Bodies are ciphertext: compressing them only costs CPU.
ALTER TABLE tern_messages ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE INDEX tern_messages_fifo ON tern_messages (queue_id, seq);
CREATE UNIQUE INDEX tern_messages_by_id ON tern_messages (queue_id, msg_id);
CREATE INDEX tern_messages_expiry ON tern_messages (received_hour);
"];

/// The channel every node listens on.
const CHANNEL: &str = "tern_relay";
/// Advisory lock keys outside the queue ids (which are non-negative): the
/// quota of queues created without an access key, and schema migration.
const OPEN_QUOTA_LOCK: i64 = -1;
const SCHEMA_LOCK: i64 = -2;
const MAX_BATCH: usize = 256;
/// An unreachable database is tried again at most this often; meanwhile
/// operations fail at once instead of each waiting for a connect.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A database host that vanished without closing the connection is noticed
/// after this much silence plus the kernel's keepalive probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Estimated bytes per stored message beyond its body (tuple header,
/// columns, TOAST chunk headers, three index entries) and per queue (row and
/// four index entries), for [`PgStore::size_bytes`].
const MESSAGE_OVERHEAD: u64 = 400;
const QUEUE_BYTES: u64 = 512;

type PgResult<T> = Result<T, StoreError>;

/// Classifies a driver error: connection trouble, a server shutting down or
/// restarting, too many connections, and deadlock or serialisation
/// failures are worth a retry ("temporarily unavailable"); anything else is
/// a fault.
impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        let transient = e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin/crash shutdown, cannot connect now
                || c.starts_with("40") // deadlock, serialisation failure
                || c == SqlState::TOO_MANY_CONNECTIONS.code()
                || c == SqlState::READ_ONLY_SQL_TRANSACTION.code() // a failover in progress
        });
        if e.is_closed() || io || transient {
            // The driver's message alone ("error connecting to server") does
            // not say why; its source does.
            let why = match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            };
            StoreError::Unavailable(why)
        } else {
            StoreError::Postgres(Arc::new(e))
        }
    }
}

fn bytes<const N: usize>(v: Vec<u8>, what: &'static str) -> PgResult<[u8; N]> {
    v.try_into().map_err(|_| StoreError::Corrupt(what))
}

/// One connection and the statements prepared on it (the driver keeps no
/// cache of its own, and preparing costs a round trip).
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn connect(config: &DbConfig) -> PgResult<Conn> {
        Ok(Conn {
            client: config.connect()?,
            statements: HashMap::new(),
        })
    }

    fn statement(&mut self, sql: &'static str) -> PgResult<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Vec<Row>> {
        let s = self.statement(sql)?;
        Ok(self.client.query(&s, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> PgResult<Option<Row>> {
        let s = self.statement(sql)?;
        Ok(self.client.query_opt(&s, params)?)
    }

    fn query_one(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Row> {
        let s = self.statement(sql)?;
        Ok(self.client.query_one(&s, params)?)
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<u64> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, params)?)
    }

    fn lock(&mut self, key: i64) -> PgResult<()> {
        self.query_one("SELECT pg_advisory_xact_lock($1)", &[&key])
            .map(drop)
    }
}

/// A handle to the PostgreSQL store; clones share the writer thread, the
/// connection pool and the listener.
#[derive(Clone)]
pub(crate) struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: DbConfig,
    writer: Option<Sender<Box<dyn PgJob>>>,
    writer_thread: Option<JoinHandle<()>>,
    /// Idle connections for reads, the purge and the expiry.
    readers: Mutex<Vec<Conn>>,
    /// When a connection last failed, to try again at most every
    /// [`RECONNECT_EVERY`] (shared by readers; the writer keeps its own).
    /// The listener clears it when it gets through again.
    down_since: Arc<Mutex<Option<Instant>>>,
    /// The writer's backend process id: notifications from it were already
    /// acted on locally.
    writer_pid: Arc<AtomicI32>,
    listener: Mutex<Option<Listener>>,
}

struct Listener {
    stop: Arc<AtomicBool>,
    /// Sent on the channel to end the listener's wait at shutdown.
    token: String,
    thread: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish the jobs it has, then exit.
        self.writer.take();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(l) = listener {
            l.stop.store(true, Ordering::SeqCst);
            l.thread.thread().unpark();
            // The listener waits on its connection: a notification of its own
            // ends the wait. If the database is gone, so is that connection,
            // and the thread ends by itself once it notices; it is not
            // waited for then.
            let woken = self
                .conn_now()
                .and_then(|mut c| c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &l.token]));
            if woken.is_ok() {
                let _ = l.thread.join();
            }
        }
    }
}

impl Inner {
    /// A connection for a read, from the pool or new.
    fn conn(&self) -> PgResult<(Conn, bool)> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(c) = pooled {
            return Ok((c, true));
        }
        {
            let down = self
                .down_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if down.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err(StoreError::Unavailable("reconnecting".into()));
            }
        }
        match Conn::connect(&self.config) {
            Ok(c) => {
                let was_down = self
                    .down_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if was_down.is_some() {
                    info!("reconnected to the database");
                }
                Ok((c, false))
            }
            Err(e) => {
                self.mark_down(&e);
                Err(e)
            }
        }
    }

    fn conn_now(&self) -> PgResult<Conn> {
        self.conn().map(|(c, _)| c)
    }

    fn mark_down(&self, e: &StoreError) {
        let mut down = self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.is_none() {
            warning!("lost the database: {e}; reconnecting");
        }
        *down = Some(Instant::now());
    }

    /// Runs `f` on a pooled connection (the pool holds at most one per
    /// thread that reads at once: the workers and the maintenance thread).
    /// A pooled connection that turns out to be dead (the server restarted
    /// while it was idle) is replaced once; one whose connection failed is
    /// not put back, and empties the pool, whose other connections most
    /// likely died with it.
    fn with_conn<R>(&self, mut f: impl FnMut(&mut Conn) -> PgResult<R>) -> PgResult<R> {
        let mut retried = false;
        loop {
            let (mut c, pooled) = self.conn()?;
            match f(&mut c) {
                Ok(r) => {
                    self.readers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(c);
                    return Ok(r);
                }
                Err(e) => {
                    if c.client.is_closed() || e.is_unavailable() {
                        drop(c);
                        self.readers
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clear();
                        if pooled && !retried {
                            retried = true;
                            continue;
                        }
                        self.mark_down(&e);
                    } else {
                        self.readers
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(c);
                    }
                    return Err(e);
                }
            }
        }
    }
}

fn config(url: &str) -> PgResult<DbConfig> {
    let mut db = DbConfig::parse(url)?;
    let config = &mut db.pg;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE);
    if config.get_application_name().is_none() {
        config.application_name("tern-relay");
    }
    Ok(db)
}

/// The identity secret, if the database has one (see [`PgStore::identity`]).
pub(super) fn read_identity(url: &str) -> PgResult<Option<Zeroizing<[u8; 32]>>> {
    let mut c = Conn::connect(&config(url)?)?;
    let exists: bool = c
        .query_one("SELECT to_regclass('tern_identity') IS NOT NULL", &[])?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    identity_row(&mut c)
}

fn identity_row(c: &mut Conn) -> PgResult<Option<Zeroizing<[u8; 32]>>> {
    match c.query_opt("SELECT secret FROM tern_identity WHERE id = 1", &[])? {
        None => Ok(None),
        Some(r) => {
            let v = Zeroizing::new(r.try_get::<_, Vec<u8>>(0)?);
            let k: [u8; 32] = v[..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("relay identity"))?;
            Ok(Some(Zeroizing::new(k)))
        }
    }
}

impl PgStore {
    /// Connects, applies the migrations this database lacks, and starts the
    /// writer.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let config = config(url)?;
        let mut conn = Conn::connect(&config)?;
        migrate(&mut conn.client)?;
        let writer_pid = Arc::new(AtomicI32::new(0));
        let (tx, rx) = mpsc::channel();
        let writer_thread = {
            let (config, pid) = (config.clone(), Arc::clone(&writer_pid));
            std::thread::Builder::new()
                .name("relay-store-writer".into())
                .spawn(move || writer_loop(&config, &pid, &rx))
                .map_err(|e| StoreError::Io(Arc::new(e)))?
        };
        Ok(PgStore {
            inner: Arc::new(Inner {
                config,
                writer: Some(tx),
                writer_thread: Some(writer_thread),
                readers: Mutex::new(vec![conn]),
                down_since: Arc::new(Mutex::new(None)),
                writer_pid,
                listener: Mutex::new(None),
            }),
        })
    }

    /// The relay's identity secret. With `create`, one is drawn and inserted
    /// unless a row is there already; two nodes starting together both
    /// insert, one insert wins (the primary key), and both read the winner.
    pub fn identity(&self, create: bool) -> PgResult<Option<Zeroizing<[u8; 32]>>> {
        self.inner.with_conn(|c| {
            if create {
                let s = x25519_dalek::StaticSecret::random_from_rng(OsRng);
                let fresh = Zeroizing::new(s.to_bytes());
                c.execute(
                    "INSERT INTO tern_identity (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                    &[&&fresh[..]],
                )?;
            }
            identity_row(c)
        })
    }

    /// Starts the thread that turns other nodes' notifications into wakes of
    /// this node's subscriptions (once; later calls do nothing).
    pub fn listen(&self, waiters: Arc<Waiters>) {
        let mut slot = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let token = format!("stop {:016x}", OsRng.next_u64());
        let thread = {
            let (config, stop, token) = (self.inner.config.clone(), stop.clone(), token.clone());
            let pid = Arc::clone(&self.inner.writer_pid);
            let down = Arc::clone(&self.inner.down_since);
            std::thread::Builder::new()
                .name("relay-store-listener".into())
                .spawn(move || listen_loop(&config, &waiters, &pid, &down, &stop, &token))
        };
        match thread {
            Ok(thread) => {
                *slot = Some(Listener {
                    stop,
                    token,
                    thread,
                });
            }
            Err(e) => warning!(
                "could not start listening for other relay nodes' messages ({e}); \
                 subscribers here see them when they next subscribe"
            ),
        }
    }

    fn submit<R, F>(&self, key: i64, durability: Durability, f: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> PgResult<R> + Send + 'static,
    {
        let Some(writer) = self.inner.writer.as_ref() else {
            return Pending::failed(StoreError::Closed);
        };
        let (reply, result) = mpsc::sync_channel(1);
        let job = Box::new(Op {
            key,
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

    pub fn queue_by_recipient(&self, hash: &[u8; 32]) -> PgResult<Option<QueueRow>> {
        self.inner.with_conn(|c| {
            let row = c.query_opt(
                "SELECT id, recipient_auth, queue_secret, sender_auth, unsigned_used, day
                 FROM tern_queues WHERE recipient_hash = $1",
                &[&&hash[..]],
            )?;
            row.map(queue_row).transpose()
        })
    }

    pub fn queue_by_sender(&self, hash: &[u8; 32]) -> PgResult<Option<QueueRow>> {
        self.inner.with_conn(|c| {
            let row = c.query_opt(
                "SELECT id, recipient_auth, queue_secret, sender_auth, unsigned_used, day
                 FROM tern_queues WHERE sender_hash = $1",
                &[&&hash[..]],
            )?;
            row.map(queue_row).transpose()
        })
    }

    pub fn messages_after(
        &self,
        queue: QueueRef,
        after_seq: i64,
        expired_upto: i64,
        limit: usize,
    ) -> PgResult<Vec<StoredMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.inner.with_conn(|c| {
            c.query(
                "SELECT seq, msg_id, received_hour, body FROM tern_messages
                 WHERE queue_id = $1 AND seq > $2 AND received_hour > $3 ORDER BY seq LIMIT $4",
                &[&queue, &after_seq, &expired_upto, &limit],
            )?
            .into_iter()
            .map(|r| {
                Ok(StoredMessage {
                    seq: r.try_get(0)?,
                    msg_id: bytes(r.try_get(1)?, "message id")?,
                    received_hour: r.try_get(2)?,
                    body: r.try_get(3)?,
                })
            })
            .collect()
        })
    }

    pub fn has_message(&self, queue: QueueRef, msg_id: &Id) -> PgResult<bool> {
        self.inner
            .with_conn(|c| Ok(seq_of(c, queue, msg_id)?.is_some()))
    }

    pub fn count_live(&self, queue: QueueRef, expired_upto: i64) -> PgResult<u32> {
        self.inner
            .with_conn(|c| live_count(c, queue, expired_upto))
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub fn create_queue(&self, q: NewQueue) -> Pending<CreateOutcome> {
        // Serialises the quota count per access key across nodes.
        let key = q.key_id.unwrap_or(OPEN_QUOTA_LOCK);
        self.submit(key, Durability::Durable, move |tx| {
            let c = &mut *tx.conn;
            let count: i64 = match q.key_id {
                Some(k) => c
                    .query_one("SELECT count(*) FROM tern_queues WHERE key_id = $1", &[&k])?
                    .try_get(0)?,
                None => c
                    .query_one("SELECT count(*) FROM tern_queues WHERE key_id IS NULL", &[])?
                    .try_get(0)?,
            };
            if u64::try_from(count).unwrap_or(0) >= q.max_queues {
                return Ok(CreateOutcome::Quota);
            }
            let id = (OsRng.next_u64() >> 1) as i64;
            let n = c.execute(
                "INSERT INTO tern_queues (id, recipient_hash, sender_hash, recipient_auth, queue_secret, key_id, day)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[
                    &id,
                    &&q.recipient_hash[..],
                    &&q.sender_hash[..],
                    &&q.recipient_auth[..],
                    &&q.queue_secret[..],
                    &q.key_id,
                    &q.day,
                ],
            )?;
            Ok(if n == 1 {
                CreateOutcome::Created(id)
            } else {
                CreateOutcome::Collision
            })
        })
    }

    pub fn secure(
        &self,
        queue: QueueRef,
        sender_auth: [u8; 32],
        day: i64,
    ) -> Pending<SecureOutcome> {
        self.submit(queue, Durability::Durable, move |tx| {
            let c = &mut *tx.conn;
            let row = c.query_opt(
                "SELECT sender_auth FROM tern_queues WHERE id = $1",
                &[&queue],
            )?;
            let Some(row) = row else {
                return Ok(SecureOutcome::Auth);
            };
            let current: Option<Vec<u8>> = row.try_get(0)?;
            Ok(match current {
                Some(k) if k[..] == sender_auth[..] => SecureOutcome::Secured,
                Some(_) => SecureOutcome::Auth,
                None => {
                    c.execute(
                        "UPDATE tern_queues SET sender_auth = $2, day = $3 WHERE id = $1",
                        &[&queue, &&sender_auth[..], &day],
                    )?;
                    SecureOutcome::Secured
                }
            })
        })
    }

    pub fn send(&self, m: NewMessage) -> Pending<SendOutcome> {
        self.submit(m.queue, Durability::Durable, move |tx| {
            let c = &mut *tx.conn;
            // One round trip for what SQLite reads in three: the queue, its
            // live messages, and the next FIFO position.
            let row = c.query_opt(
                "SELECT q.sender_auth, q.unsigned_used, q.day,
                    (SELECT count(*) FROM tern_messages WHERE queue_id = q.id AND received_hour > $2),
                    (SELECT coalesce(max(seq), 0) + 1 FROM tern_messages WHERE queue_id = q.id)
                 FROM tern_queues q WHERE q.id = $1",
                &[&m.queue, &m.expired_upto],
            )?;
            let Some(row) = row else {
                return Ok(SendOutcome::Auth);
            };
            let sender_auth: Option<Vec<u8>> = row.try_get(0)?;
            let unsigned_used: bool = row.try_get(1)?;
            let day: i64 = row.try_get(2)?;
            let live: i64 = row.try_get(3)?;
            let seq: i64 = row.try_get(4)?;
            let allowed = match m.auth {
                SendAuth::Unsigned => sender_auth.is_none() && !unsigned_used,
                SendAuth::Signed(k) => sender_auth.as_deref() == Some(&k[..]),
            };
            if !allowed {
                return Ok(SendOutcome::Auth);
            }
            if live >= i64::from(m.max_pending) {
                return Ok(SendOutcome::QueueFull);
            }
            c.execute(
                "INSERT INTO tern_messages (id, queue_id, seq, msg_id, received_hour, body)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &((OsRng.next_u64() >> 1) as i64),
                    &m.queue,
                    &seq,
                    &&m.msg_id[..],
                    &m.received_hour,
                    &m.body,
                ],
            )?;
            // The unsigned message uses the slot; a message counts as use of
            // the queue (see the SQLite store).
            let unsigned = m.auth == SendAuth::Unsigned;
            if unsigned || day < m.day {
                c.execute(
                    "UPDATE tern_queues SET unsigned_used = unsigned_used OR $2, day = greatest(day, $3)
                     WHERE id = $1",
                    &[&m.queue, &unsigned, &m.day],
                )?;
            }
            tx.notify.push(format!("m{}", m.queue));
            Ok(SendOutcome::Stored)
        })
    }

    pub fn touch(&self, queue: QueueRef, day: i64) -> Pending<()> {
        self.submit(queue, Durability::Lazy, move |tx| {
            tx.conn.execute(
                "UPDATE tern_queues SET day = $2 WHERE id = $1 AND day < $2 AND sender_auth IS NOT NULL",
                &[&queue, &day],
            )?;
            Ok(())
        })
    }

    pub fn ack(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        self.submit(queue, Durability::Lazy, move |tx| {
            let n = tx.conn.execute(
                "DELETE FROM tern_messages WHERE queue_id = $1 AND msg_id = $2",
                &[&queue, &&msg_id[..]],
            )?;
            Ok(if n == 0 {
                AckOutcome::NoMessage
            } else {
                AckOutcome::Deleted
            })
        })
    }

    pub fn ack_up_to(&self, queue: QueueRef, msg_id: Id) -> Pending<AckOutcome> {
        self.submit(queue, Durability::Lazy, move |tx| {
            let c = &mut *tx.conn;
            let Some(seq) = seq_of(c, queue, &msg_id)? else {
                return Ok(AckOutcome::NoMessage);
            };
            c.execute(
                "DELETE FROM tern_messages WHERE queue_id = $1 AND seq <= $2",
                &[&queue, &seq],
            )?;
            Ok(AckOutcome::Deleted)
        })
    }

    pub fn delete_queue(
        &self,
        queue: QueueRef,
        if_empty: bool,
        expired_upto: i64,
    ) -> Pending<DeleteOutcome> {
        self.submit(queue, Durability::Durable, move |tx| {
            let c = &mut *tx.conn;
            if if_empty && live_count(c, queue, expired_upto)? > 0 {
                return Ok(DeleteOutcome::NotEmpty);
            }
            c.execute("DELETE FROM tern_messages WHERE queue_id = $1", &[&queue])?;
            c.execute("DELETE FROM tern_queues WHERE id = $1", &[&queue])?;
            tx.notify.push(format!("g{queue}"));
            Ok(DeleteOutcome::Deleted)
        })
    }

    /// One queue at a time, each in its own short transaction under the
    /// queue's lock, so that the purge neither holds SENDs back for long nor
    /// takes locks out of order.
    pub fn purge_expired(&self, expired_upto: i64) -> PgResult<usize> {
        self.inner.with_conn(|c| {
            let queues: Vec<i64> = c
                .query(
                    "SELECT DISTINCT queue_id FROM tern_messages WHERE received_hour <= $1 ORDER BY 1",
                    &[&expired_upto],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut deleted = 0;
            for q in queues {
                c.client
                    .batch_execute("BEGIN; SET LOCAL synchronous_commit TO off")?;
                let done = c.lock(q).and_then(|()| {
                    c.execute(
                        "DELETE FROM tern_messages WHERE queue_id = $1 AND received_hour <= $2",
                        &[&q, &expired_upto],
                    )
                });
                deleted += end(c, done)?;
            }
            Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
        })
    }

    pub fn expire_queues(
        &self,
        unsecured_before: i64,
        idle_before: i64,
    ) -> PgResult<Vec<QueueRef>> {
        self.inner.with_conn(|c| {
            let candidates: Vec<i64> = c
                .query(
                    "SELECT id FROM tern_queues
                     WHERE (sender_auth IS NULL AND day < $1) OR day < $2 ORDER BY id",
                    &[&unsecured_before, &idle_before],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut gone = Vec::new();
            for q in candidates {
                c.client.batch_execute("BEGIN")?;
                let done = c.lock(q).and_then(|()| {
                    // Checked again under the lock: another node may have
                    // used the queue since.
                    let n = c.execute(
                        "DELETE FROM tern_queues
                         WHERE id = $1 AND ((sender_auth IS NULL AND day < $2) OR day < $3)",
                        &[&q, &unsecured_before, &idle_before],
                    )?;
                    if n == 1 {
                        c.execute("DELETE FROM tern_messages WHERE queue_id = $1", &[&q])?;
                        let payload = format!("g{q}");
                        c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
                    }
                    Ok(n)
                });
                if end(c, done)? == 1 {
                    gone.push(q);
                }
            }
            Ok(gone)
        })
    }

    pub fn size_bytes(&self) -> PgResult<u64> {
        self.inner.with_conn(|c| {
            let r = c.query_one(
                "SELECT (SELECT count(*) FROM tern_messages), (SELECT count(*) FROM tern_queues)",
                &[],
            )?;
            let messages = u64::try_from(r.try_get::<_, i64>(0)?).unwrap_or(0);
            let queues = u64::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0);
            Ok(messages
                .saturating_mul(DELIVERED_LEN as u64 + MESSAGE_OVERHEAD)
                .saturating_add(queues.saturating_mul(QUEUE_BYTES)))
        })
    }

    pub fn checkpoint(&self) -> PgResult<()> {
        self.inner.with_conn(|c| {
            c.client
                .batch_execute("VACUUM tern_messages, tern_queues")
                .map_err(StoreError::from)
        })
    }
}

/// Commits (or, if `done` failed, rolls back) a transaction of the purge
/// or the expiry.
fn end<T>(c: &mut Conn, done: PgResult<T>) -> PgResult<T> {
    match done {
        Ok(v) => {
            c.client.batch_execute("COMMIT")?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.client.batch_execute("ROLLBACK");
            Err(e)
        }
    }
}

fn queue_row(r: Row) -> PgResult<QueueRow> {
    let sender_auth: Option<Vec<u8>> = r.try_get(3)?;
    Ok(QueueRow {
        queue: r.try_get(0)?,
        recipient_auth: bytes(r.try_get(1)?, "queue key")?,
        queue_secret: Zeroizing::new(bytes(r.try_get(2)?, "queue secret")?),
        sender_auth: sender_auth.map(|k| bytes(k, "sender key")).transpose()?,
        unsigned_used: r.try_get(4)?,
        day: r.try_get(5)?,
    })
}

fn live_count(c: &mut Conn, queue: QueueRef, expired_upto: i64) -> PgResult<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM tern_messages WHERE queue_id = $1 AND received_hour > $2",
        &[&queue, &expired_upto],
    )?
    .try_get(0)?)
}

fn seq_of(c: &mut Conn, queue: QueueRef, msg_id: &Id) -> PgResult<Option<i64>> {
    c.query_opt(
        "SELECT seq FROM tern_messages WHERE queue_id = $1 AND msg_id = $2",
        &[&queue, &&msg_id[..]],
    )?
    .map(|r| r.try_get(0).map_err(StoreError::from))
    .transpose()
}

/// Brings the schema up to date, or refuses a database from a newer relay.
/// Under a lock, so that nodes starting together migrate once.
fn migrate(client: &mut Client) -> PgResult<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tern_schema (version bigint NOT NULL)")?;
    let version: i64 = match tx.query_opt("SELECT version FROM tern_schema", &[])? {
        Some(r) => r.try_get(0)?,
        None => {
            tx.execute("INSERT INTO tern_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Schema(version, SCHEMA_VERSION));
    }
    let from = usize::try_from(version).map_err(|_| StoreError::Corrupt("schema version"))?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.batch_execute(sql)?;
        info!("database schema migrated to version {}", n + 1);
    }
    tx.execute("UPDATE tern_schema SET version = $1", &[&SCHEMA_VERSION])?;
    tx.commit()?;
    Ok(())
}

/// What an operation sees of the batch transaction.
struct Tx<'a> {
    conn: &'a mut Conn,
    /// Notification payloads sent when the batch commits.
    notify: &'a mut Vec<String>,
}

/// One queued write: runs inside the batch transaction, answers after COMMIT.
trait PgJob: Send {
    /// The advisory lock it takes.
    fn key(&self) -> i64;
    fn durability(&self) -> Durability;
    /// An error if the transaction can no longer be committed.
    fn run(&mut self, tx: &mut Tx<'_>) -> Result<(), StoreError>;
    fn finish(self: Box<Self>, commit: &Result<(), StoreError>);
}

struct Op<R, F> {
    key: i64,
    f: Option<F>,
    durability: Durability,
    result: Option<PgResult<R>>,
    reply: SyncSender<Result<R, StoreError>>,
}

impl<R, F> PgJob for Op<R, F>
where
    R: Send,
    F: FnOnce(&mut Tx<'_>) -> PgResult<R> + Send,
{
    fn key(&self) -> i64 {
        self.key
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(&mut self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let Some(f) = self.f.take() else {
            return Ok(());
        };
        // The key is a number this store made, never input; the savepoint
        // and the lock share one round trip.
        let begin = format!("SAVEPOINT op; SELECT pg_advisory_xact_lock({})", self.key);
        if let Err(e) = tx.conn.client.batch_execute(&begin) {
            let e = StoreError::from(e);
            self.result = Some(Err(e.clone()));
            return Err(e);
        }
        let queued = tx.notify.len();
        let result = f(&mut *tx);
        let end = if result.is_ok() {
            tx.conn.client.batch_execute("RELEASE op")
        } else {
            tx.notify.truncate(queued);
            tx.conn.client.batch_execute("ROLLBACK TO op; RELEASE op")
        };
        match end {
            Ok(()) => {
                self.result = Some(result);
                Ok(())
            }
            Err(e) => {
                // PostgreSQL would turn a COMMIT of this aborted transaction
                // into a silent rollback: the batch must fail instead.
                let e = StoreError::from(e);
                self.result = Some(Err(e.clone()));
                Err(e)
            }
        }
    }

    fn finish(self: Box<Self>, commit: &Result<(), StoreError>) {
        let out = match (commit, self.result) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(StoreError::Closed),
        };
        // The caller may have gone away; nothing to do then.
        let _ = self.reply.send(out);
    }
}

fn writer_loop(config: &DbConfig, pid: &AtomicI32, jobs: &Receiver<Box<dyn PgJob>>) {
    let mut conn: Option<Conn> = None;
    let mut down_since: Option<Instant> = None;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // Locks in ascending order, so that batches of different nodes
        // cannot deadlock. The sort is stable: one queue's operations keep
        // their order.
        batch.sort_by_key(|j| j.key());
        let lazy = batch.iter().all(|j| j.durability() == Durability::Lazy);
        let mut commit = Err(StoreError::Unavailable("not connected".into()));
        for attempt in 0..2 {
            if conn.is_none() {
                if down_since.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                    commit = Err(StoreError::Unavailable("reconnecting".into()));
                    break;
                }
                match connect_writer(config, pid) {
                    Ok(c) => {
                        if down_since.take().is_some() {
                            info!("the store's writer reconnected to the database");
                        }
                        conn = Some(c);
                    }
                    Err(e) => {
                        if down_since.is_none() {
                            warning!("the store's writer lost the database: {e}");
                        }
                        down_since = Some(Instant::now());
                        commit = Err(e);
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let begin = if lazy {
                "BEGIN; SET LOCAL synchronous_commit TO off"
            } else {
                "BEGIN"
            };
            if let Err(e) = c.client.batch_execute(begin) {
                // Nothing ran yet: a connection that died while idle (the
                // server restarted) is replaced and the batch tried once more.
                conn = None;
                commit = Err(e.into());
                if attempt == 0 {
                    continue;
                }
                down_since = Some(Instant::now());
                break;
            }
            commit = run_batch(c, &mut batch);
            if commit.is_err() {
                let _ = c.client.batch_execute("ROLLBACK");
                if c.client.is_closed() {
                    conn = None;
                    if down_since.is_none() {
                        warning!("the store's writer lost the database");
                    }
                    down_since = Some(Instant::now());
                }
            }
            break;
        }
        if let Err(e) = &commit {
            if !e.is_unavailable() {
                error!(
                    "a database transaction failed, {} requests answered with an internal error: {e}",
                    batch.len()
                );
            }
        }
        for job in batch {
            job.finish(&commit);
        }
    }
}

fn connect_writer(config: &DbConfig, pid: &AtomicI32) -> PgResult<Conn> {
    let mut c = Conn::connect(config)?;
    let p: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.try_get(0)?;
    pid.store(p, Ordering::SeqCst);
    Ok(c)
}

/// Runs the jobs of a transaction begun by the caller, then commits it.
fn run_batch(c: &mut Conn, batch: &mut [Box<dyn PgJob>]) -> Result<(), StoreError> {
    let mut notify = Vec::new();
    {
        let mut tx = Tx {
            conn: &mut *c,
            notify: &mut notify,
        };
        for job in batch.iter_mut() {
            job.run(&mut tx)?;
        }
    }
    if !notify.is_empty() {
        // Delivered to the listeners only if and when the batch commits.
        notify.sort_unstable();
        notify.dedup();
        c.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            &[&CHANNEL, &notify],
        )?;
    }
    c.client.batch_execute("COMMIT")?;
    Ok(())
}

/// Listens on the relay's channel and wakes local subscriptions for what
/// other nodes committed: `m<queue>` (a message), `g<queue>` (deleted).
/// The payload is the queue's random row id, which the database holds
/// anyway; never a recipient or sender id. Blocks on the connection: no
/// polling. Whenever listening (re)starts, every local subscription looks
/// again, since notifications sent while not listening are lost.
fn listen_loop(
    config: &DbConfig,
    waiters: &Waiters,
    writer_pid: &AtomicI32,
    down_since: &Mutex<Option<Instant>>,
    stop: &AtomicBool,
    token: &str,
) {
    let mut pause = Duration::from_millis(100);
    let mut lost = false;
    while !stop.load(Ordering::SeqCst) {
        let mut client = match config.connect().and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                if !lost {
                    warning!("cannot listen for other relay nodes' messages: {e}; retrying");
                    lost = true;
                }
                std::thread::park_timeout(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if lost {
            info!("listening for other relay nodes' messages again");
            lost = false;
        }
        pause = Duration::from_millis(100);
        // A stop after LISTEN is heard as a notification; one before, here.
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // The database is back: readers need not wait out their pause
        // before the looks this starts.
        *down_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
        waiters.wake_all();
        let mut notifications = client.notifications();
        let mut it = notifications.blocking_iter();
        loop {
            use postgres::fallible_iterator::FallibleIterator;
            match it.next() {
                Ok(Some(n)) => {
                    let payload = n.payload();
                    if payload == token {
                        return;
                    }
                    if n.process_id() == writer_pid.load(Ordering::SeqCst) {
                        // Our own writer: the handler already woke them.
                        continue;
                    }
                    // Anything else on the channel is not ours: ignored.
                    let parse = |p: &str, kind| p.strip_prefix(kind)?.parse::<QueueRef>().ok();
                    if let Some(queue) = parse(payload, 'm') {
                        waiters.notify(queue);
                    } else if let Some(queue) = parse(payload, 'g') {
                        waiters.notify_gone(queue);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        if !stop.load(Ordering::SeqCst) {
            warning!("stopped listening for other relay nodes' messages (the database connection ended); reconnecting");
            lost = true;
        }
    }
}
