//! The relay server.
//!
//! Threads:
//!
//! - one event loop (the thread that calls [`Server::run`]) owns every socket
//!   through `mio`: it accepts, reads HTTP heads and WebSocket messages,
//!   writes replies and pushes, and enforces timeouts. An idle subscribed
//!   session costs a socket and a few kilobytes, never a thread, so tens of
//!   thousands can wait at once;
//! - a pool of workers ([`ServeConfig::workers`]) runs session handshakes and
//!   executes frames of commands (the CPU and disk work) and hands the
//!   results back;
//! - the store's writer thread, which group-commits writes;
//! - a maintenance thread that purges expired messages and queues and
//!   measures the database periodically.
//!
//! The event loop never blocks and never panics on input, and every state
//! that waits on the client has a deadline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};
use tern_wire::address::{Host, RelayAddress, Transport};

use crate::config::ServeConfig;
use crate::error::RelayError;
use crate::event_loop::EventLoop;
use crate::handler::{Handler, Policy};
use crate::identity;
use crate::jobs::{ticket, Job, LoopEvent, LISTENER, WAKER};
use crate::lock::DirLock;
use crate::log::{error, info, warning};
use crate::page;
use crate::store::{Store, DB_FILE};

/// The file in the data directory that holds the address `serve` printed.
pub const ADDRESS_FILE: &str = "address";

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The host to print for a listen address: the bound IP, or loopback when
/// bound to the unspecified address (0.0.0.0 → 127.0.0.1, :: → ::1), since
/// "0.0.0.0" cannot be connected to. Operators behind NAT, a front or with
/// several interfaces give `--public-address`.
fn advertised_host(ip: IpAddr) -> Host {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Host::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(a) => Host::V4(a),
        IpAddr::V6(a) if a.is_unspecified() => Host::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Host::V4(v4),
            None => Host::V6(a),
        },
    }
}

/// The public part of a relay address, as an operator writes it:
/// `HOST[:PORT]` (plain `tern://`), or `https://HOST[:PORT][/PATH]` for a
/// relay behind an HTTPS front (`tern+https://`).
pub struct PublicAddress {
    pub transport: Transport,
    pub host: Host,
    pub port: Option<u16>,
    pub path: String,
}

/// Parses `--public-address` through the relay address parser itself, so
/// that it accepts exactly what an address can say.
pub fn public_host(text: &str) -> Result<PublicAddress, RelayError> {
    let bad = || {
        RelayError::Config(format!(
            "the public address {text:?} is not HOST[:PORT] or https://HOST[:PORT][/PATH]"
        ))
    };
    let text = text.trim();
    let (scheme, rest) = match text.strip_prefix("https://") {
        Some(r) => ("tern+https://", r),
        None => ("tern://", text.strip_prefix("http://").unwrap_or(text)),
    };
    // Any key the parser accepts: X25519's base point (u = 9), which is of
    // large order (an all-zero key is refused as low order).
    let mut base_point = [0u8; 32];
    base_point[0] = 9;
    let dummy = data_encoding::BASE64URL_NOPAD.encode(&base_point);
    let explicit_port = {
        let authority = rest.split('/').next().unwrap_or("");
        let after_v6 = authority.rsplit(']').next().unwrap_or(authority);
        after_v6.contains(':')
    };
    let parsed: RelayAddress = format!("{scheme}{dummy}@{rest}")
        .parse()
        .map_err(|_| bad())?;
    Ok(PublicAddress {
        transport: parsed.transport,
        host: parsed.host,
        port: explicit_port.then_some(parsed.port),
        path: parsed.path,
    })
}

fn make_address(
    key: [u8; 32],
    addr: SocketAddr,
    public: Option<&str>,
    access_key: Option<String>,
) -> Result<RelayAddress, RelayError> {
    if addr.port() == 0 {
        return Err(RelayError::Config(
            "the listen address has port 0; give the port the relay listens on".into(),
        ));
    }
    let mut a = RelayAddress::new(advertised_host(addr.ip()), addr.port(), key);
    if let Some(p) = public {
        let p = public_host(p)?;
        a.transport = p.transport;
        a.host = p.host;
        a.port = p.port.unwrap_or(match p.transport {
            Transport::Http => addr.port(),
            Transport::Https => 443,
        });
        a.path = p.path;
    }
    a.access_key = access_key;
    Ok(a)
}

/// The address of the relay whose data directory is `data_dir`, for
/// `tern relay address`: what `tern relay serve` printed last (it keeps it
/// in the data directory), or, for a relay that never ran, the address it
/// would print for `listen`. Reads only; creates nothing.
pub fn load_address(
    data_dir: &Path,
    access_key: Option<String>,
    listen: SocketAddr,
) -> Result<RelayAddress, RelayError> {
    let identity = identity::load(data_dir)?.ok_or_else(|| RelayError::NoIdentity {
        path: identity::identity_path(data_dir),
    })?;
    if let Ok(text) = std::fs::read_to_string(data_dir.join(ADDRESS_FILE)) {
        if let Ok(mut a) = text.trim().parse::<RelayAddress>() {
            if a.key == identity.public() {
                if access_key.is_some() {
                    a.access_key = access_key;
                }
                return Ok(a);
            }
        }
    }
    make_address(identity.public(), listen, None, access_key)
}

/// The address of the relay whose queues are in the PostgreSQL database
/// `url`, for `tern relay address --store`: made from the identity in the
/// database and `public` (or `listen`), since the database remembers no
/// address (each node may listen on its own). Reads only; creates nothing.
pub fn load_database_address(
    url: &str,
    access_key: Option<String>,
    listen: SocketAddr,
    public: Option<&str>,
) -> Result<RelayAddress, RelayError> {
    let secret = Store::read_database_identity(url)
        .map_err(RelayError::Database)?
        .ok_or(RelayError::NoDatabaseIdentity)?;
    let identity = identity::RelayIdentity::from_secret(&secret);
    make_address(identity.public(), listen, public, access_key)
}

/// Remembers the address `serve` prints, so that `tern relay address`
/// prints the same. Written atomically; the access key is kept too (the
/// file is the operator's, mode 0600, beside the identity key).
fn save_address(data_dir: &Path, address: &RelayAddress) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = data_dir.join(".address.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{address}")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, data_dir.join(ADDRESS_FILE))
}

/// Makes [`Server::run`] return: stops accepting, lets in-flight requests
/// finish (parked FETCHes are answered at once), then closes everything.
#[derive(Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("could not wake the event loop for shutdown: {e}");
        }
    }
}

/// Stops the relay gracefully on the first SIGTERM or SIGINT, and at once
/// (as if killed; the database is safe either way) on a second one.
pub fn shutdown_on_signals(handle: ShutdownHandle) -> Result<(), RelayError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new()
        .name("relay-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for _ in signals.forever() {
                seen += 1;
                if seen == 1 {
                    info!("shutting down: finishing requests in progress (signal again to stop at once)");
                    handle.shutdown();
                } else {
                    warning!("stopping at once");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}

/// A bound relay, ready to [`run`](Server::run).
pub struct Server {
    cfg: ServeConfig,
    address: RelayAddress,
    handler: Arc<Handler>,
    poll: Poll,
    listener: TcpListener,
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
    events_tx: Sender<LoopEvent>,
    events_rx: Receiver<LoopEvent>,
    /// The body of `GET /`, rendered once.
    page: Vec<u8>,
    /// SQLite only: one relay per data directory. Relays on one PostgreSQL
    /// database are meant to run together.
    _lock: Option<DirLock>,
}

impl Server {
    /// Opens (or creates) the identity and the store, in `cfg.data_dir` or
    /// in the PostgreSQL database `cfg.database_url`, and binds the
    /// listening socket.
    pub fn bind(cfg: ServeConfig) -> Result<Server, RelayError> {
        cfg.validate()?;
        let (store, identity, lock) = match cfg.database_url.as_deref() {
            None => {
                identity::ensure_data_dir(&cfg.data_dir)?;
                let lock = DirLock::acquire(&cfg.data_dir)?;
                let identity = identity::load_or_create(&cfg.data_dir)?;
                let store = Store::open(&cfg.data_dir.join(DB_FILE))?;
                (store, identity, Some(lock))
            }
            Some(url) => {
                let store = Store::open_postgres(url).map_err(RelayError::Database)?;
                let secret = store
                    .identity(true)
                    .map_err(RelayError::Database)?
                    .ok_or(RelayError::NoDatabaseIdentity)?;
                (store, identity::RelayIdentity::from_secret(&secret), None)
            }
        };

        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listener = TcpListener::bind(cfg.listen).map_err(|source| RelayError::Bind {
            addr: cfg.listen,
            source,
        })?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let local = listener.local_addr()?;
        let address = make_address(
            identity.public(),
            local,
            cfg.public_address.as_deref(),
            cfg.address_key(),
        )?;
        // With PostgreSQL the data directory may be a PaaS's ephemeral disk,
        // or not exist: the address is printed, not remembered.
        if cfg.database_url.is_none() {
            if let Err(e) = save_address(&cfg.data_dir, &address) {
                warning!("could not remember the relay's address in the data directory: {e}");
            }
        }

        let (events_tx, events_rx) = mpsc::channel();
        let wake_tx = events_tx.clone();
        let wake_waker = Arc::clone(&waker);
        let policy = Policy {
            access_keys: cfg.access_keys.clone(),
            ttl_secs: u32::try_from(cfg.ttl.as_secs()).unwrap_or(u32::MAX),
            max_pending: cfg.max_pending,
            max_data_bytes: cfg.max_data_bytes,
            max_open_queues: cfg.max_open_queues,
            unsecured_days: cfg.unsecured_days,
            create_rate_connection: cfg.create_rate_connection,
            create_rate_address: cfg.create_rate_address,
            max_subscriptions: cfg.max_subscriptions,
            max_window: cfg.max_window,
            session_push_budget: cfg.session_push_budget,
        };
        let handler = Handler::new(
            identity.secret_bytes(),
            store,
            policy,
            Box::new(move |ticket, queue, gone| {
                if wake_tx
                    .send(LoopEvent::Wake {
                        ticket,
                        queue,
                        gone,
                    })
                    .is_ok()
                {
                    let _ = wake_waker.wake();
                }
            }),
        )
        .with_hooks(cfg.hooks.clone());
        if let Err(e) = handler.measure() {
            warning!("could not measure the database: {e}");
        }
        let page = page::render(&address, cfg.access_keys.is_empty()).into_bytes();
        let mut cfg = cfg;
        cfg.max_connections = connection_cap(cfg.max_connections);
        Ok(Server {
            cfg,
            address,
            handler: Arc::new(handler),
            poll,
            listener,
            waker,
            shutdown: Arc::new(AtomicBool::new(false)),
            events_tx,
            events_rx,
            page,
            _lock: lock,
        })
    }

    /// `tern://KEY[:ACCESS]@HOST:PORT` with the port actually bound. The host
    /// is the public address if one was given, else the bound IP, or
    /// loopback if bound to 0.0.0.0 / [::].
    pub fn address(&self) -> RelayAddress {
        self.address.clone()
    }

    /// The socket address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.cfg.listen)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: Arc::clone(&self.shutdown),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`]; returns once every
    /// connection is finished (or `shutdown_timeout` has passed) and the
    /// store is closed.
    pub fn run(self) -> Result<(), RelayError> {
        let Server {
            cfg,
            handler,
            poll,
            listener,
            waker,
            shutdown,
            events_tx,
            events_rx,
            page,
            _lock,
            ..
        } = self;
        info!(
            "relay listening on {} ({} for new queues)",
            listener.local_addr()?,
            if cfg.access_keys.is_empty() {
                "open"
            } else {
                "access key needed"
            }
        );

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut workers = Vec::with_capacity(cfg.workers);
        for i in 0..cfg.workers {
            let rx = Arc::clone(&jobs_rx);
            let h = Arc::clone(&handler);
            let tx = events_tx.clone();
            // mio allows one Waker per Poll: the workers share it.
            let wk = Arc::clone(&waker);
            workers.push(
                thread::Builder::new()
                    .name(format!("relay-worker-{i}"))
                    .spawn(move || worker_loop(&rx, &h, &tx, &wk))?,
            );
        }
        drop(events_tx);
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let maintenance = {
            let h = Arc::clone(&handler);
            let every = cfg.purge_interval;
            thread::Builder::new()
                .name("relay-maintenance".into())
                .spawn(move || maintenance_loop(&h, every, &stop_rx))?
        };

        let mut el = EventLoop::new(
            cfg,
            poll,
            listener,
            jobs_tx,
            events_rx,
            Arc::clone(&handler),
            shutdown,
            page,
        );
        let result = el.run();
        // Workers finish what they hold (every write is committed or rolled
        // back as a whole), then exit when the job channel closes.
        drop(el);
        for w in workers {
            let _ = w.join();
        }
        drop(stop_tx);
        let _ = maintenance.join();
        // The last handle to the store: its writer drains and checkpoints.
        drop(handler);
        info!("relay stopped");
        result
    }
}

/// The open-file soft limit, where the platform tells (Linux).
fn fd_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
}

/// Descriptors kept free for the database, the listener and the poller.
const FD_RESERVE: usize = 64;

/// Connections beyond the open-file limit would fail to be accepted, and
/// could starve the database of descriptors: cap them below it.
fn connection_cap(max_connections: usize) -> usize {
    match fd_limit() {
        Some(limit) if limit < max_connections.saturating_add(FD_RESERVE) => {
            let cap = limit.saturating_sub(FD_RESERVE).max(1);
            warning!(
                "the open-file limit ({limit}) is too low for {max_connections} connections; \
                 serving at most {cap}. Raise it (ulimit -n, or LimitNOFILE= in a systemd unit) \
                 for more concurrent long polls"
            );
            cap
        }
        _ => max_connections,
    }
}

fn worker_loop(
    jobs: &Mutex<Receiver<Job>>,
    handler: &Handler,
    events: &Sender<LoopEvent>,
    waker: &Waker,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
            rx.recv()
        };
        let Ok(job) = job else { return };
        let event = match job {
            Job::Handshake {
                token,
                serial,
                origin,
                msg1,
            } => LoopEvent::Handshaken {
                token,
                serial,
                result: handler.handshake(&msg1, ticket(token, serial), origin).ok(),
            },
            Job::Process {
                token,
                serial,
                mut state,
                messages,
                wakes,
            } => {
                let out = handler.process(&mut state, &messages, &wakes, now_ms());
                LoopEvent::Processed {
                    token,
                    serial,
                    state,
                    messages: out.messages,
                    close: out.close,
                }
            }
        };
        if let Err(mpsc::SendError(event)) = events.send(event) {
            // The event loop is gone (shutdown grace expired).
            if let LoopEvent::Processed { state, .. } = event {
                handler.end_session(&state);
            }
            continue;
        }
        let _ = waker.wake();
    }
}

/// How often the database size (the high-water mark's input) is measured.
const MEASURE_EVERY: Duration = Duration::from_secs(5);

fn maintenance_loop(handler: &Handler, every: Duration, stop: &Receiver<()>) {
    let mut until_purge = Duration::ZERO;
    loop {
        if until_purge.is_zero() {
            match handler.purge(now_ms()) {
                Ok((0, 0)) => {}
                Ok((m, q)) => info!("deleted {m} expired messages and {q} expired queues"),
                Err(e) => error!("purging expired messages failed: {e}"),
            }
            if let Err(e) = handler.checkpoint() {
                warning!("truncating the database log failed: {e}");
            }
            until_purge = every;
        }
        if let Err(e) = handler.measure() {
            warning!("measuring the database failed: {e}");
        }
        let pause = MEASURE_EVERY.min(until_purge);
        until_purge -= pause;
        match stop.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
