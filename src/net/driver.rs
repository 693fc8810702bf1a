//! One relay session and the thread that drives it.
//!
//! The sans-IO session (the wire crate) decides what bytes mean; this file
//! only waits and moves them: a thread per session owns the WebSocket, packs
//! the records callers hand it into frames, seals and writes them, and
//! routes every reply record to whoever waits for its tag — a one-shot
//! caller, or a subscription's event channel. Callers encode and sign their
//! commands on their own threads (the session hash is known once the
//! handshake is done), so signing many commands uses every core.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::rngs::OsRng;
use tern_wire::address::RelayAddress;
use tern_wire::frame::{parse_replies, FrameBuilder};
use tern_wire::{ClientHandshake, Id, RelayInfo, Reply, Session};
use tungstenite::{Message, WebSocket};

use super::transport::{self, ConnectError, Proxy, Stream};
use super::NetError;

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);
/// A session quiet this long sends a ping, so that fronts and the relay
/// keep it open.
const PING_EVERY: Duration = Duration::from_secs(25);
/// Nothing at all from the relay for this long (pings unanswered): the
/// session is dead.
const SILENT_LIMIT: Duration = Duration::from_secs(70);

/// What a subscription reports, tagged with the caller's token.
#[derive(Debug, Clone)]
pub enum SubEvent {
    /// The relay took the SUB.
    Subscribed { token: usize },
    /// The relay refused the SUB (its queue is gone, or a limit).
    Refused { token: usize, reply: Reply },
    /// A pushed message.
    Message {
        token: usize,
        msg_id: Id,
        received_at: u64,
        body: Vec<u8>,
    },
    /// Everything there is was pushed.
    Idle { token: usize },
    /// The queue was deleted.
    Ended { token: usize },
    /// The session is gone: resubscribe on a new one.
    Lost { token: usize, error: String },
}

/// Where a reply record goes.
pub enum Route {
    Once(Sender<Result<Reply, NetError>>),
    Sub {
        token: usize,
        events: Sender<SubEvent>,
        subscribed: bool,
    },
}

enum Op {
    Send(Vec<(u32, Vec<u8>, Option<Route>)>),
    Forget(u32),
    Close,
}

/// A live session with one relay; cheap to share between threads.
pub struct Conn {
    ops: Sender<Op>,
    waker: Arc<Waker>,
    hash: [u8; 32],
    info: RelayInfo,
    dead: Arc<AtomicBool>,
    next_tag: AtomicU32,
    label: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.ops.send(Op::Close);
        let _ = self.waker.wake();
    }
}

impl Conn {
    /// Connects, runs the session handshake, and starts the driver thread.
    pub fn open(
        relay: &RelayAddress,
        proxy: Option<&Proxy>,
        isolation: Option<&[u8; 16]>,
    ) -> Result<Arc<Conn>, NetError> {
        let label = relay.label();
        let mut ws = transport::connect(relay, proxy, isolation).map_err(|e| match e {
            ConnectError::Io(reason) => NetError::Unreachable {
                relay: label.clone(),
                reason,
            },
            ConnectError::Http(status) => NetError::Http {
                relay: label.clone(),
                status,
            },
            ConnectError::Tls(reason) => NetError::Tls {
                relay: label.clone(),
                reason,
            },
        })?;
        let unreachable = |reason: String| NetError::Unreachable {
            relay: label.clone(),
            reason,
        };
        let (hs, msg1) =
            ClientHandshake::start(&relay.key, &mut OsRng).map_err(|_| NetError::NotThatRelay {
                relay: label.clone(),
            })?;
        ws.send(Message::Binary(msg1.into()))
            .map_err(|e| unreachable(e.to_string()))?;
        let msg2 = loop {
            match ws.read() {
                Ok(Message::Binary(b)) => break b,
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
                // A relay that cannot open our first message closes: it does
                // not hold the key in the address.
                Ok(_) | Err(tungstenite::Error::ConnectionClosed) => {
                    return Err(NetError::NotThatRelay { relay: label })
                }
                Err(e) => return Err(unreachable(e.to_string())),
            }
        };
        let (session, info) = hs.finish(&msg2).map_err(|_| NetError::NotThatRelay {
            relay: label.clone(),
        })?;
        let hash = *session.hash();
        ws.get_ref()
            .tcp()
            .set_nonblocking(true)
            .map_err(|e| unreachable(e.to_string()))?;
        let poll = Poll::new().map_err(|e| unreachable(e.to_string()))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKE).map_err(|e| unreachable(e.to_string()))?);
        let fd = std::os::fd::AsRawFd::as_raw_fd(ws.get_ref());
        poll.registry()
            .register(
                &mut SourceFd(&fd),
                SOCKET,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| unreachable(e.to_string()))?;
        let (ops, rx) = mpsc::channel();
        let dead = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            ws,
            session,
            poll,
            ops: rx,
            routes: HashMap::new(),
            dead: dead.clone(),
            label: label.clone(),
            unflushed: false,
            last_rx: Instant::now(),
            last_tx: Instant::now(),
        };
        std::thread::Builder::new()
            .name("tern-relay-session".into())
            .spawn(move || driver.run())
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Arc::new(Conn {
            ops,
            waker,
            hash,
            info,
            dead,
            next_tag: AtomicU32::new(1),
            label,
        }))
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The session's handshake hash, to which signatures are bound.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn info(&self) -> &RelayInfo {
        &self.info
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// A tag no other command of this session uses.
    pub fn tag(&self) -> u32 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands encoded records to the driver; fails at once if the session is
    /// already gone (nothing was sent then).
    pub fn send(&self, records: Vec<(u32, Vec<u8>, Option<Route>)>) -> Result<(), NetError> {
        let gone = || NetError::Unreachable {
            relay: self.label.clone(),
            reason: "the session ended".into(),
        };
        if self.is_dead() {
            return Err(gone());
        }
        self.ops.send(Op::Send(records)).map_err(|_| gone())?;
        let _ = self.waker.wake();
        Ok(())
    }

    /// Stops routing replies for `tag` (a caller that gave up waiting).
    pub fn forget(&self, tag: u32) {
        let _ = self.ops.send(Op::Forget(tag));
        let _ = self.waker.wake();
    }
}

struct Driver {
    ws: WebSocket<Stream>,
    session: Session,
    poll: Poll,
    ops: Receiver<Op>,
    routes: HashMap<u32, Route>,
    dead: Arc<AtomicBool>,
    label: String,
    unflushed: bool,
    last_rx: Instant,
    last_tx: Instant,
}

enum Step {
    Go,
    Stop(String),
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
}

impl Driver {
    fn run(mut self) {
        let mut events = Events::with_capacity(8);
        let reason = loop {
            let wait = PING_EVERY.saturating_sub(self.last_tx.elapsed());
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    break e.to_string();
                }
            }
            if let Step::Stop(r) = self.step() {
                break r;
            }
        };
        self.dead.store(true, Ordering::Release);
        // Whatever is still waiting hears now, not at its timeout.
        loop {
            match self.ops.try_recv() {
                Ok(Op::Send(records)) => {
                    for (tag, _, route) in records {
                        if let Some(r) = route {
                            self.routes.insert(tag, r);
                        }
                    }
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        for (_, route) in self.routes.drain() {
            match route {
                Route::Once(tx) => {
                    let _ = tx.send(Err(NetError::Unreachable {
                        relay: self.label.clone(),
                        reason: reason.clone(),
                    }));
                }
                Route::Sub { token, events, .. } => {
                    let _ = events.send(SubEvent::Lost {
                        token,
                        error: reason.clone(),
                    });
                }
            }
        }
    }

    fn step(&mut self) -> Step {
        // Callers' records, packed into as few frames as they fit.
        let mut frames = FrameBuilder::new();
        loop {
            match self.ops.try_recv() {
                Ok(Op::Send(records)) => {
                    for (tag, record, route) in records {
                        if let Some(r) = route {
                            self.routes.insert(tag, r);
                        }
                        frames.push(&record);
                    }
                }
                Ok(Op::Forget(tag)) => {
                    self.routes.remove(&tag);
                }
                Ok(Op::Close) | Err(TryRecvError::Disconnected) => {
                    let _ = self.ws.close(None);
                    let _ = self.ws.flush();
                    return Step::Stop("closed".into());
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        for f in frames.finish() {
            let sealed = match self.session.seal(&f) {
                Ok(s) => s,
                Err(e) => return Step::Stop(e.to_string()),
            };
            match self.ws.write(Message::Binary(sealed.into())) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Step::Stop(e.to_string()),
            }
            self.unflushed = true;
            self.last_tx = Instant::now();
        }
        if self.last_tx.elapsed() >= PING_EVERY {
            match self.ws.write(Message::Ping(Vec::new().into())) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Step::Stop(e.to_string()),
            }
            self.unflushed = true;
            self.last_tx = Instant::now();
        }
        if self.unflushed {
            match self.ws.flush() {
                Ok(()) => self.unflushed = false,
                Err(e) if would_block(&e) => {}
                Err(e) => return Step::Stop(e.to_string()),
            }
        }
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    self.last_rx = Instant::now();
                    let records =
                        match self
                            .session
                            .open(&b)
                            .map_err(|e| e.to_string())
                            .and_then(|f| {
                                parse_replies(&f).map_err(|e| format!("a malformed frame: {e}"))
                            }) {
                            Ok(r) => r,
                            Err(e) => return Step::Stop(format!("the relay's session broke: {e}")),
                        };
                    for (tag, reply) in records {
                        self.route(tag, reply);
                    }
                }
                Ok(Message::Close(_)) => return Step::Stop("the relay closed the session".into()),
                Ok(_) => self.last_rx = Instant::now(),
                Err(e) if would_block(&e) => break,
                Err(e) => return Step::Stop(e.to_string()),
            }
        }
        if self.last_rx.elapsed() >= SILENT_LIMIT {
            return Step::Stop("the relay stopped answering".into());
        }
        Step::Go
    }

    fn route(&mut self, tag: u32, reply: Reply) {
        let Some(route) = self.routes.get_mut(&tag) else {
            // Nobody waits for it any more.
            return;
        };
        match route {
            Route::Once(_) => {
                if let Some(Route::Once(tx)) = self.routes.remove(&tag) {
                    let _ = tx.send(Ok(reply));
                }
            }
            Route::Sub {
                token,
                events,
                subscribed,
            } => {
                let token = *token;
                let event = match reply {
                    Reply::Ok if !*subscribed => {
                        *subscribed = true;
                        SubEvent::Subscribed { token }
                    }
                    Reply::Message {
                        msg_id,
                        received_at,
                        body,
                    } => SubEvent::Message {
                        token,
                        msg_id,
                        received_at,
                        body,
                    },
                    Reply::Idle => SubEvent::Idle { token },
                    Reply::Ended => SubEvent::Ended { token },
                    other => SubEvent::Refused {
                        token,
                        reply: other,
                    },
                };
                let end = matches!(event, SubEvent::Ended { .. } | SubEvent::Refused { .. });
                if events.send(event).is_err() || end {
                    self.routes.remove(&tag);
                }
            }
        }
    }
}
