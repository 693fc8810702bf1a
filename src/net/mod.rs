//! Talking to relays: one forward-secret session per relay (or per queue
//! with `--isolate`), many commands per round trip, and subscriptions that
//! push messages as they arrive.
//!
//! - [`transport`]: TCP, SOCKS5, TLS and the WebSocket upgrade;
//! - [`driver`]: one thread per session that moves frames and routes
//!   replies;
//! - this module: the pool of sessions and the calls the client makes.

pub mod driver;
pub mod transport;

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use tern_wire::address::{Host, RelayAddress, Transport};
use tern_wire::command::MAX_COMMAND_LEN;
use tern_wire::{Command, ErrorCode, Id, RelayInfo, Reply, Request, WireError};
use thiserror::Error;

pub use driver::SubEvent;
use driver::{Conn, Route};
pub use transport::Proxy;

/// How long a command may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Error)]
pub enum NetError {
    #[error("relay {relay} is unreachable: {reason}")]
    Unreachable { relay: String, reason: String },
    #[error("relay {relay} answered HTTP {status} instead of a session: is this a tern relay, and is its address right?")]
    Http { relay: String, status: u16 },
    #[error("relay {relay}: TLS failed ({reason}); for a front with a private CA, set TERN_TLS_CA to its certificate")]
    Tls { relay: String, reason: String },
    #[error("relay {relay} did not answer as the key in its address: wrong address, or something in between is tampering")]
    NotThatRelay { relay: String },
    #[error("relay {relay} sent a malformed answer: {source}")]
    Malformed {
        relay: String,
        #[source]
        source: WireError,
    },
    #[error("relay {relay}: {code}")]
    Refused { relay: String, code: ErrorCode },
}

impl NetError {
    /// Whether trying again later may succeed (the relay is down, busy, or full).
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Unreachable { .. } => true,
            NetError::Http { status, .. } => *status >= 500,
            NetError::Refused { code, .. } => code.is_transient(),
            _ => false,
        }
    }

    /// The relay the error is about (its label).
    pub fn relay(&self) -> &str {
        match self {
            NetError::Unreachable { relay, .. }
            | NetError::Http { relay, .. }
            | NetError::Tls { relay, .. }
            | NetError::NotThatRelay { relay }
            | NetError::Malformed { relay, .. }
            | NetError::Refused { relay, .. } => relay,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            NetError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Milliseconds since the Unix epoch. `TERN_TEST_CLOCK_OFFSET_SECS` moves
/// tern's clock (for tests of time-driven behaviour such as automatic
/// rotation).
pub fn now_ms() -> u64 {
    static OFFSET_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET_MS.get_or_init(|| {
        std::env::var("TERN_TEST_CLOCK_OFFSET_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1000))
    });
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(offset)
}

/// What names one pooled session: the relay (as [`RelayAddress::same_relay`]
/// compares them) and, with `--isolate`, the queue it is for.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    transport: Transport,
    host: Host,
    port: u16,
    path: String,
    key: [u8; 32],
    isolation: Option<Id>,
}

impl PoolKey {
    fn of(relay: &RelayAddress, isolation: Option<&Id>) -> Self {
        Self {
            transport: relay.transport,
            host: relay.host.clone(),
            port: relay.port,
            path: relay.path.clone(),
            key: relay.key,
            isolation: isolation.copied(),
        }
    }
}

/// One command for [`RelayClient::batch`]: what to send and who signs it.
pub struct Call<'a> {
    pub command: Command,
    pub key: Option<&'a SigningKey>,
}

/// One command for [`RelayClient::run_all`]: where it goes, and for which
/// queue (with `--isolate`, that queue's own session).
pub struct Targeted<'a> {
    pub relay: &'a RelayAddress,
    pub queue: Option<Id>,
    pub call: Call<'a>,
}

/// A subscription to one queue, for [`RelayClient::subscribe`].
pub struct SubSpec {
    /// The caller's name for it, carried by every event.
    pub token: usize,
    pub recipient_id: Id,
    pub key: SigningKey,
    pub window: u16,
}

/// Subscriptions on one session; acknowledgements go through it too.
pub struct Subscription {
    conn: Arc<Conn>,
}

impl Subscription {
    /// Acknowledges (deletes) message `msg_id` and everything before it in
    /// queue `recipient_id`. The answer is not waited for: a lost
    /// acknowledgement only means the message comes again.
    pub fn ack_upto(&self, recipient_id: Id, msg_id: Id, key: &SigningKey) -> Result<(), NetError> {
        let tag = self.conn.tag();
        let mut record = Vec::with_capacity(128);
        Request::encode(
            tag,
            &Command::AckUpTo {
                recipient_id,
                msg_id,
            },
            self.conn.hash(),
            Some(key),
            &mut record,
        );
        self.conn.send(vec![(tag, record, None)])
    }

    /// Subscribes further queues on the same session.
    pub fn add(&self, specs: Vec<SubSpec>, events: &Sender<SubEvent>) -> Result<(), NetError> {
        subscribe_on(&self.conn, specs, events)
    }

    /// A command answered after everything sent before it on this session:
    /// waiting for it means the acknowledgements before it were sent.
    pub fn barrier(&self) -> Option<mpsc::Receiver<Result<Reply, NetError>>> {
        let tag = self.conn.tag();
        let mut record = Vec::with_capacity(16);
        Request::encode(tag, &Command::Info, self.conn.hash(), None, &mut record);
        let (tx, rx) = mpsc::channel();
        self.conn
            .send(vec![(tag, record, Some(Route::Once(tx)))])
            .ok()
            .map(|()| rx)
    }

    pub fn is_lost(&self) -> bool {
        self.conn.is_dead()
    }

    pub fn relay_info(&self) -> &RelayInfo {
        self.conn.info()
    }
}

fn subscribe_on(
    conn: &Conn,
    specs: Vec<SubSpec>,
    events: &Sender<SubEvent>,
) -> Result<(), NetError> {
    let records = specs
        .into_iter()
        .map(|s| {
            let tag = conn.tag();
            let mut record = Vec::with_capacity(128);
            Request::encode(
                tag,
                &Command::Subscribe {
                    recipient_id: s.recipient_id,
                    window: s.window,
                },
                conn.hash(),
                Some(&s.key),
                &mut record,
            );
            let route = Route::Sub {
                token: s.token,
                events: events.clone(),
                subscribed: false,
            };
            (tag, record, Some(route))
        })
        .collect();
    conn.send(records)
}

/// A client for any number of relays.
pub struct RelayClient {
    /// A session per queue instead of per relay (`--isolate`), so that no
    /// connection carries commands for two queues.
    isolate: bool,
    proxy: Option<Proxy>,
    pool: Mutex<HashMap<PoolKey, Arc<Conn>>>,
}

impl RelayClient {
    pub fn new(isolate: bool) -> Self {
        Self::with_proxy(isolate, None)
    }

    pub fn with_proxy(isolate: bool, proxy: Option<Proxy>) -> Self {
        Self {
            isolate,
            proxy,
            pool: Mutex::new(HashMap::new()),
        }
    }

    pub fn isolates(&self) -> bool {
        self.isolate
    }

    /// The pooled session for `relay` (for the queue `isolation`, with
    /// `--isolate`), opened if there is none or it ended.
    fn conn(&self, relay: &RelayAddress, isolation: Option<&Id>) -> Result<Arc<Conn>, NetError> {
        let isolation = isolation.filter(|_| self.isolate);
        let key = PoolKey::of(relay, isolation);
        {
            let pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = pool.get(&key).filter(|c| !c.is_dead()) {
                return Ok(c.clone());
            }
        }
        // Connected outside the lock: other relays need not wait for this one.
        let conn = Conn::open(relay, self.proxy.as_ref(), isolation)?;
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        match pool.get(&key).filter(|c| !c.is_dead()) {
            // Another thread connected meanwhile: use one session, not two.
            Some(existing) => Ok(existing.clone()),
            None => {
                pool.insert(key, conn.clone());
                Ok(conn)
            }
        }
    }

    /// Sends `command` (signed with `key` if given) and returns the relay's
    /// reply; relay errors come back as [`NetError::Refused`].
    pub fn call(
        &self,
        relay: &RelayAddress,
        command: &Command,
        key: Option<&SigningKey>,
    ) -> Result<Reply, NetError> {
        self.call_for(relay, None, command, key)
    }

    /// [`RelayClient::call`] for one queue's command: with `--isolate` it
    /// goes on that queue's own session.
    pub fn call_for(
        &self,
        relay: &RelayAddress,
        queue: Option<&Id>,
        command: &Command,
        key: Option<&SigningKey>,
    ) -> Result<Reply, NetError> {
        let call = Call {
            command: command.clone(),
            key,
        };
        self.batch_for(relay, queue, vec![call])
            .pop()
            .expect("one answer per command")
    }

    /// Sends every command in as few frames as they fit, on one session,
    /// and returns the answers in order: one round trip for all of them.
    pub fn batch(
        &self,
        relay: &RelayAddress,
        calls: Vec<Call<'_>>,
    ) -> Vec<Result<Reply, NetError>> {
        self.batch_for(relay, None, calls)
    }

    /// [`RelayClient::batch`] on the session of queue `queue` (with
    /// `--isolate`; the relay's shared session otherwise).
    pub fn batch_for(
        &self,
        relay: &RelayAddress,
        queue: Option<&Id>,
        calls: Vec<Call<'_>>,
    ) -> Vec<Result<Reply, NetError>> {
        let n = calls.len();
        let label = relay.label();
        // A pooled session the relay closed while idle is only found out by
        // using it: one retry on a fresh session, for what was not sent.
        let mut first_error = None;
        for _ in 0..2 {
            let conn = match self.conn(relay, queue) {
                Ok(c) => c,
                Err(e) => return fail_all(n, e),
            };
            let mut waits = Vec::with_capacity(n);
            let mut records = Vec::with_capacity(n);
            for c in &calls {
                let tag = conn.tag();
                let mut record = Vec::with_capacity(match c.command {
                    Command::Send { .. } => MAX_COMMAND_LEN,
                    _ => 160,
                });
                Request::encode(tag, &c.command, conn.hash(), c.key, &mut record);
                let (tx, rx) = mpsc::channel();
                records.push((tag, record, Some(Route::Once(tx))));
                waits.push((tag, rx));
            }
            if let Err(e) = conn.send(records) {
                first_error = Some(e);
                continue;
            }
            return waits
                .into_iter()
                .map(|(tag, rx)| {
                    let reply = match rx.recv_timeout(REQUEST_TIMEOUT) {
                        Ok(r) => r,
                        Err(_) => {
                            conn.forget(tag);
                            Err(NetError::Unreachable {
                                relay: label.clone(),
                                reason: "no answer in time".into(),
                            })
                        }
                    }?;
                    match reply {
                        Reply::Error(code) => Err(NetError::Refused {
                            relay: label.clone(),
                            code,
                        }),
                        r => Ok(r),
                    }
                })
                .collect();
        }
        fail_all(
            n,
            first_error.unwrap_or_else(|| NetError::Unreachable {
                relay: label,
                reason: "the session ended".into(),
            }),
        )
    }

    /// Runs commands for any number of relays: grouped by session, one
    /// batch (one round trip) per session, all sessions at once; the
    /// answers come back in the order of `calls`.
    pub fn run_all(&self, calls: Vec<Targeted<'_>>) -> Vec<Result<Reply, NetError>> {
        let mut groups: HashMap<PoolKey, Vec<(usize, Targeted<'_>)>> = HashMap::new();
        let n = calls.len();
        for (i, t) in calls.into_iter().enumerate() {
            let isolation = t.queue.filter(|_| self.isolate);
            groups
                .entry(PoolKey::of(t.relay, isolation.as_ref()))
                .or_default()
                .push((i, t));
        }
        let mut results: Vec<Option<Result<Reply, NetError>>> = (0..n).map(|_| None).collect();
        let run = |group: Vec<(usize, Targeted<'_>)>| -> Vec<(usize, Result<Reply, NetError>)> {
            let relay = group[0].1.relay;
            let queue = group[0].1.queue;
            let (idx, calls): (Vec<usize>, Vec<Call<'_>>) =
                group.into_iter().map(|(i, t)| (i, t.call)).unzip();
            let replies = self.batch_for(relay, queue.as_ref(), calls);
            idx.into_iter().zip(replies).collect()
        };
        // One session (the usual send): no thread to start and join.
        let answered: Vec<Vec<(usize, Result<Reply, NetError>)>> = if groups.len() == 1 {
            groups.into_values().map(run).collect()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = groups
                    .into_values()
                    .map(|group| s.spawn(move || run(group)))
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            })
        };
        for (i, r) in answered.into_iter().flatten() {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(NetError::Unreachable {
                        relay: String::new(),
                        reason: "a relay session thread failed".into(),
                    })
                })
            })
            .collect()
    }

    /// Subscribes to queues of one relay on one session (with `--isolate`,
    /// give one queue and it gets a session of its own); events arrive on
    /// `events`, tagged with each spec's token.
    pub fn subscribe(
        &self,
        relay: &RelayAddress,
        isolation: Option<&Id>,
        specs: Vec<SubSpec>,
        events: &Sender<SubEvent>,
    ) -> Result<Subscription, NetError> {
        let conn = self.conn(relay, isolation)?;
        subscribe_on(&conn, specs, events)?;
        Ok(Subscription { conn })
    }

    /// Closes every pooled session.
    pub fn close_all(&self) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn fail_all(n: usize, e: NetError) -> Vec<Result<Reply, NetError>> {
    vec![Err(e); n]
}
