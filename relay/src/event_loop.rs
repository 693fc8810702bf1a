//! The socket side of the server: one thread, non-blocking sockets, `mio`.
//!
//! Each connection starts as HTTP and either stays HTTP (the operator page,
//! errors) or is upgraded to a WebSocket that carries one relay session:
//!
//! ```text
//! Head ──GET /──▶ Writing ──keep-alive──▶ Head
//!   │                │
//!   │ bad            └──close──▶ Draining ──▶ closed
//!   └──GET /v2 (upgrade)──▶ Upgrading ──101 sent──▶ Session
//!                                                    │ handshake (worker)
//!                                                    ▼
//!                                     frames ⇄ jobs (worker), pushes
//! ```
//!
//! A session's state lives with its connection and moves into a worker job
//! whenever there are frames to process or subscriptions to serve; only one
//! job per session runs at a time, so frames are handled in order. Every
//! state that waits on the client has a deadline: the head, the handshake,
//! an idle session (longer with subscriptions, which the client keeps alive
//! with pings), and output the client does not take.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::config::ServeConfig;
use crate::error::RelayError;
use crate::handler::{Handler, SessionState};
use crate::http::{self, Head, Method, Parse, Target, Upgrade, MAX_HEAD};
use crate::jobs::{unticket, Job, LoopEvent, LISTENER, WAKER};
use crate::limits::{ConnectionCounts, Origin};
use crate::log::{info, warning};
use crate::store::QueueRef;

const FIRST_CONN: usize = 2;
/// Most bytes buffered from one connection before its upgrade.
const READ_CAP: usize = MAX_HEAD + 1024;
/// After a response that closes the connection, unread input is drained for
/// this long (and up to `LINGER_BYTES`) so that the client reads the response
/// rather than a connection reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;
/// Pause before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Rate limit for repeated warnings.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Frames received and not yet processed, per session: beyond this the
/// relay stops reading from that client until a job takes them.
const MAX_INBOX_BYTES: usize = 512 * 1024;
/// Output a session may have waiting for its client; beyond it the
/// connection is closed (the client is not reading).
const MAX_WRITE_BUFFER: usize = 8 << 20;

const HTML: &str = "text/html; charset=utf-8";
const PAGE_HEADERS: &str = "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n";

fn ws_config() -> WebSocketConfig {
    let max = tern_wire::session::MAX_MESSAGE_LEN.max(tern_wire::session::MSG1_LEN);
    WebSocketConfig::default()
        // Idle sessions are the common case: a small buffer each.
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Where a session's state is.
enum Slot {
    /// Waiting for the client's handshake message.
    Handshake,
    /// A worker holds it (handshake or frames).
    Busy,
    Ready(Box<SessionState>),
}

struct WsConn {
    ws: WebSocket<TcpStream>,
    slot: Slot,
    /// Messages received and not yet handed to a worker.
    inbox: Vec<Vec<u8>>,
    inbox_bytes: usize,
    /// Subscribed queues that got a message (false) or went away (true).
    wakes: Vec<(QueueRef, bool)>,
    /// The session is over: close once the output is out.
    closing: bool,
    /// Output is waiting for the client since then.
    unflushed_since: Option<Instant>,
    last_rx: Instant,
    /// The handshake is done.
    up: bool,
}

enum Http {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Sending a response; then close, or read the next request.
    Writing { close: bool, linger: bool },
    /// Sending the 101; then the session starts.
    Upgrading,
    /// Output shut down; discarding input until the client closes.
    Draining,
}

enum Io {
    Http {
        stream: TcpStream,
        inbuf: Vec<u8>,
        out: Vec<u8>,
        out_pos: usize,
        state: Http,
        eof: bool,
        drained: usize,
    },
    Ws(Box<WsConn>),
    /// Being converted from one to the other.
    Moving,
}

struct Conn {
    io: Io,
    origin: Origin,
    /// Identifies this connection in its slot, so late results and wakes for
    /// an earlier connection in the same slot are ignored.
    serial: u32,
    deadline: Option<Instant>,
}

enum Next {
    Keep,
    Close,
}

/// `now + after`, saturating instead of panicking on absurd durations.
fn later(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == ErrorKind::WouldBlock)
}

pub(crate) struct EventLoop {
    cfg: ServeConfig,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    per_origin: ConnectionCounts,
    /// (deadline, slot). Stale entries are skipped when popped: an entry
    /// counts only while it equals its connection's current deadline.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    jobs: Sender<Job>,
    events: Receiver<LoopEvent>,
    handler: Arc<Handler>,
    shutdown: Arc<AtomicBool>,
    shutting_down: bool,
    grace_until: Option<Instant>,
    accept_retry: Option<Instant>,
    last_warn: Option<Instant>,
    next_serial: u32,
    page: Vec<u8>,
    scratch: Vec<u8>,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: ServeConfig,
        poll: Poll,
        listener: TcpListener,
        jobs: Sender<Job>,
        events: Receiver<LoopEvent>,
        handler: Arc<Handler>,
        shutdown: Arc<AtomicBool>,
        page: Vec<u8>,
    ) -> Self {
        Self {
            cfg,
            poll,
            listener: Some(listener),
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            per_origin: ConnectionCounts::default(),
            timers: BinaryHeap::new(),
            jobs,
            events,
            handler,
            shutdown,
            shutting_down: false,
            grace_until: None,
            accept_retry: None,
            last_warn: None,
            next_serial: 0,
            page,
            scratch: vec![0; 16 * 1024],
        }
    }

    pub(crate) fn run(&mut self) -> Result<(), RelayError> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.shutdown.load(Ordering::SeqCst) && !self.shutting_down {
                self.begin_shutdown();
            }
            if self.shutting_down {
                let expired = self.grace_until.is_some_and(|t| Instant::now() >= t);
                if self.live == 0 || expired {
                    break;
                }
            }
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            self.drain_events();
            self.fire_timers();
        }
        if self.live > 0 {
            warning!(
                "closing {} connections still busy at the end of the shutdown grace period",
                self.live
            );
        }
        for idx in 0..self.conns.len() {
            if let Some(c) = self.conns[idx].take() {
                self.close(idx, c);
            }
        }
        Ok(())
    }

    fn warn_limited(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.last_warn = Some(now);
            warning!("{msg}");
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        [
            self.timers.peek().map(|Reverse((t, _))| *t),
            self.accept_retry,
            self.grace_until,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    fn set_deadline_at(&mut self, idx: usize, c: &mut Conn, t: Instant) {
        if c.deadline != Some(t) {
            c.deadline = Some(t);
            self.timers.push(Reverse((t, idx)));
        }
    }

    fn set_deadline(&mut self, idx: usize, c: &mut Conn, after: Duration) {
        self.set_deadline_at(idx, c, later(after));
    }

    fn take(&mut self, idx: usize) -> Option<Conn> {
        self.conns.get_mut(idx).and_then(Option::take)
    }

    fn put(&mut self, idx: usize, c: Conn, next: Next) {
        match next {
            Next::Keep => self.conns[idx] = Some(c),
            Next::Close => self.close(idx, c),
        }
    }

    fn close(&mut self, idx: usize, c: Conn) {
        match c.io {
            Io::Http { mut stream, .. } => {
                let _ = self.poll.registry().deregister(&mut stream);
            }
            Io::Ws(mut w) => {
                if let Slot::Ready(st) = &w.slot {
                    self.handler.end_session(st);
                }
                let _ = self.poll.registry().deregister(w.ws.get_mut());
            }
            Io::Moving => {}
        }
        self.per_origin.release(c.origin);
        self.free.push(idx);
        self.live -= 1;
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let origin = Origin::of(peer.ip());
                    if self.live >= self.cfg.max_connections {
                        // Best effort: a fresh socket's send buffer takes this.
                        let _ = stream.write(&http::empty(503, true));
                        let max = self.cfg.max_connections;
                        self.warn_limited(format_args!(
                            "connection limit ({max}) reached; refusing new connections"
                        ));
                        continue;
                    }
                    if !self
                        .per_origin
                        .admit(origin, self.cfg.max_connections_per_address)
                    {
                        let _ = stream.write(&http::empty(503, true));
                        let max = self.cfg.max_connections_per_address;
                        // The address itself is never logged.
                        self.warn_limited(format_args!(
                            "an address reached the limit of {max} connections; refusing more from it"
                        ));
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let idx = match self.free.pop() {
                        Some(i) => i,
                        None => {
                            self.conns.push(None);
                            self.conns.len() - 1
                        }
                    };
                    let registered = self.poll.registry().register(
                        &mut stream,
                        Token(idx + FIRST_CONN),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if let Err(e) = registered {
                        self.free.push(idx);
                        self.per_origin.release(origin);
                        self.warn_limited(format_args!("could not watch a new connection: {e}"));
                        continue;
                    }
                    self.next_serial = self.next_serial.wrapping_add(1);
                    let mut c = Conn {
                        io: Io::Http {
                            stream,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            out_pos: 0,
                            state: Http::Head,
                            eof: false,
                            drained: 0,
                        },
                        origin,
                        serial: self.next_serial,
                        deadline: None,
                    };
                    self.live += 1;
                    let idle = self.cfg.idle_timeout;
                    self.set_deadline(idx, &mut c, idle);
                    // Registration reports the socket's current readiness, so
                    // data that is already there triggers an event.
                    self.conns[idx] = Some(c);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // Typically out of file descriptors: the pending connection
                    // stays in the backlog; try again shortly.
                    self.warn_limited(format_args!("accepting connections failed: {e}; raise the open-file limit or lower max connections"));
                    self.accept_retry = Some(later(ACCEPT_BACKOFF));
                    return;
                }
            }
        }
    }

    fn drive(&mut self, idx: usize) {
        let Some(mut c) = self.take(idx) else { return };
        let next = self.step(idx, &mut c);
        self.put(idx, c, next);
    }

    /// Advances one connection as far as it can go without blocking.
    fn step(&mut self, idx: usize, c: &mut Conn) -> Next {
        loop {
            let next = match &mut c.io {
                Io::Http { .. } => self.step_http(idx, c),
                Io::Ws(_) => return self.step_ws(idx, c),
                Io::Moving => return Next::Close,
            };
            match next {
                Some(n) => return n,
                // Upgraded: go on as a session.
                None => continue,
            }
        }
    }

    /// `None` when the connection was just upgraded.
    fn step_http(&mut self, idx: usize, c: &mut Conn) -> Option<Next> {
        loop {
            let Io::Http {
                stream,
                inbuf,
                out,
                out_pos,
                state,
                eof,
                drained,
            } = &mut c.io
            else {
                return None;
            };
            if *out_pos < out.len() {
                match flush(stream, out, out_pos) {
                    Err(_) => return Some(Next::Close),
                    Ok(false) => return Some(Next::Keep),
                    Ok(true) => {}
                }
            }
            match state {
                Http::Writing { close, linger } => {
                    if *close && !*linger {
                        // Everything the client sent was read: a plain close
                        // cannot reset the connection under the response.
                        return Some(Next::Close);
                    }
                    if *close {
                        let _ = stream.shutdown(Shutdown::Write);
                        *state = Http::Draining;
                        *inbuf = Vec::new();
                        self.set_deadline(idx, c, LINGER);
                        continue;
                    }
                    *state = Http::Head;
                    let wait = if inbuf.is_empty() {
                        self.cfg.idle_timeout
                    } else {
                        self.cfg.request_timeout
                    };
                    self.set_deadline(idx, c, wait);
                }
                Http::Upgrading => {
                    let Io::Http { stream, inbuf, .. } = std::mem::replace(&mut c.io, Io::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    let ws = WebSocket::from_partially_read(
                        stream,
                        inbuf,
                        Role::Server,
                        Some(ws_config()),
                    );
                    c.io = Io::Ws(Box::new(WsConn {
                        ws,
                        slot: Slot::Handshake,
                        inbox: Vec::new(),
                        inbox_bytes: 0,
                        wakes: Vec::new(),
                        closing: false,
                        unflushed_since: None,
                        last_rx: Instant::now(),
                        up: false,
                    }));
                    let t = self.cfg.request_timeout;
                    self.set_deadline(idx, c, t);
                    return None;
                }
                Http::Head => {
                    match http::parse_head(inbuf, self.cfg.forwarded_header.as_deref()) {
                        Parse::Bad(status) => {
                            self.respond(idx, c, status, None, "", &[], true);
                            continue;
                        }
                        Parse::Head(h) => {
                            self.route(idx, c, &h);
                            continue;
                        }
                        Parse::Incomplete => {}
                    }
                    if *eof {
                        return Some(Next::Close);
                    }
                    let was_empty = inbuf.is_empty();
                    match fill(stream, inbuf, &mut self.scratch) {
                        ReadStatus::Data => {
                            if was_empty {
                                let t = self.cfg.request_timeout;
                                self.set_deadline(idx, c, t);
                            }
                        }
                        ReadStatus::Blocked => return Some(Next::Keep),
                        ReadStatus::Eof => *eof = true,
                        // A full buffer always holds a complete head or a
                        // too-large one, so this is only reached by garbage.
                        ReadStatus::Full | ReadStatus::Error => return Some(Next::Close),
                    }
                }
                Http::Draining => loop {
                    match stream.read(&mut self.scratch) {
                        Ok(0) => return Some(Next::Close),
                        Ok(n) => {
                            *drained += n;
                            if *drained > LINGER_BYTES {
                                return Some(Next::Close);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(Next::Keep),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return Some(Next::Close),
                    }
                },
            }
        }
    }

    /// Acts on a complete head.
    fn route(&mut self, idx: usize, c: &mut Conn, h: &Head) {
        let Io::Http { inbuf, state, .. } = &mut c.io else {
            return;
        };
        inbuf.drain(..h.len.min(inbuf.len()));
        let close = !h.keep_alive;
        match (h.method, h.target, &h.upgrade) {
            (Method::Get, Target::Session, Upgrade::WebSocket { accept }) => {
                if self.shutting_down {
                    self.respond(idx, c, 503, None, "", &[], true);
                    return;
                }
                // Behind a trusted front the session counts for the client
                // the front names, not for the front.
                if let Some(ip) = h.forwarded_for {
                    let origin = Origin::of(ip);
                    if origin != c.origin {
                        if !self
                            .per_origin
                            .admit(origin, self.cfg.max_connections_per_address)
                        {
                            self.respond(idx, c, 503, None, "", &[], true);
                            return;
                        }
                        self.per_origin.release(c.origin);
                        c.origin = origin;
                    }
                }
                let Io::Http { out, out_pos, .. } = &mut c.io else {
                    return;
                };
                out.drain(..*out_pos);
                *out_pos = 0;
                out.extend_from_slice(&http::switching_protocols(accept));
                let Io::Http { state, .. } = &mut c.io else {
                    return;
                };
                *state = Http::Upgrading;
                let t = self.cfg.write_timeout;
                self.set_deadline(idx, c, t);
            }
            // A session needs the upgrade.
            (Method::Get, Target::Session, Upgrade::None) => {
                let _ = state;
                self.respond(idx, c, 426, None, "", &[], close);
            }
            (Method::Get, Target::Root, Upgrade::None) => {
                let page = std::mem::take(&mut self.page);
                self.respond(idx, c, 200, Some(HTML), PAGE_HEADERS, &page, close);
                self.page = page;
            }
            _ => self.respond(idx, c, 404, None, "", &[], close),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &mut self,
        idx: usize,
        c: &mut Conn,
        status: u16,
        content_type: Option<&str>,
        headers: &str,
        body: &[u8],
        close: bool,
    ) {
        let Io::Http {
            out,
            out_pos,
            state,
            eof,
            ..
        } = &mut c.io
        else {
            return;
        };
        let close = close || self.shutting_down || *eof;
        out.drain(..*out_pos);
        *out_pos = 0;
        out.extend_from_slice(&http::response(status, content_type, headers, body, close));
        *state = Http::Writing {
            close,
            linger: status >= 400,
        };
        let t = self.cfg.write_timeout;
        self.set_deadline(idx, c, t);
    }

    fn step_ws(&mut self, idx: usize, c: &mut Conn) -> Next {
        let Io::Ws(w) = &mut c.io else {
            return Next::Close;
        };
        // Output first: pushes and replies waiting for the client.
        if w.unflushed_since.is_some() {
            match w.ws.flush() {
                Ok(()) => w.unflushed_since = None,
                Err(e) if would_block(&e) => {}
                Err(_) => return Next::Close,
            }
        }
        if w.closing && w.unflushed_since.is_none() {
            return Next::Close;
        }
        // Input, while there is room for it.
        while w.inbox_bytes < MAX_INBOX_BYTES && !w.closing {
            match w.ws.read() {
                Ok(Message::Binary(b)) => {
                    w.last_rx = Instant::now();
                    w.inbox_bytes += b.len();
                    w.inbox.push(b.into());
                }
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {
                    // tungstenite queues the pong itself.
                    w.last_rx = Instant::now();
                    if w.unflushed_since.is_none() {
                        w.unflushed_since = Some(Instant::now());
                    }
                }
                // Text is not part of the protocol; a close ends the session.
                Ok(Message::Text(_)) | Ok(Message::Close(_)) | Ok(Message::Frame(_)) => {
                    w.closing = true;
                    let _ = w.ws.close(None);
                    w.unflushed_since.get_or_insert_with(Instant::now);
                }
                Err(e) if would_block(&e) => break,
                Err(_) => return Next::Close,
            }
        }
        if w.unflushed_since.is_some() {
            match w.ws.flush() {
                Ok(()) => w.unflushed_since = None,
                Err(e) if would_block(&e) => {}
                Err(_) => return Next::Close,
            }
        }
        if w.closing && w.unflushed_since.is_none() {
            return Next::Close;
        }
        self.dispatch(idx, c);
        self.ws_deadline(idx, c);
        Next::Keep
    }

    /// Hands the session to a worker if there is work and nobody has it.
    fn dispatch(&mut self, idx: usize, c: &mut Conn) {
        let serial = c.serial;
        let Io::Ws(w) = &mut c.io else { return };
        if w.closing || w.unflushed_since.is_some() {
            // Nothing more for a client that does not take what it has.
            return;
        }
        let job = match std::mem::replace(&mut w.slot, Slot::Busy) {
            Slot::Handshake if !w.inbox.is_empty() => {
                let msg1 = w.inbox.remove(0);
                w.inbox_bytes -= msg1.len();
                Job::Handshake {
                    token: idx,
                    serial,
                    origin: c.origin,
                    msg1,
                }
            }
            Slot::Ready(state) if !w.inbox.is_empty() || !w.wakes.is_empty() => {
                w.inbox_bytes = 0;
                Job::Process {
                    token: idx,
                    serial,
                    state,
                    messages: std::mem::take(&mut w.inbox),
                    wakes: std::mem::take(&mut w.wakes),
                }
            }
            other => {
                w.slot = other;
                return;
            }
        };
        if self.jobs.send(job).is_err() {
            w.closing = true;
        }
    }

    fn ws_deadline(&mut self, idx: usize, c: &mut Conn) {
        let Io::Ws(w) = &c.io else { return };
        let idle = match &w.slot {
            _ if !w.up => self.cfg.request_timeout,
            Slot::Ready(st) if st.has_subscriptions() => self.cfg.subscribed_idle_timeout,
            _ => self.cfg.idle_timeout,
        };
        let mut t = w.last_rx + idle;
        if let Some(since) = w.unflushed_since {
            t = t.min(since + self.cfg.write_timeout);
        }
        self.set_deadline_at(idx, c, t);
    }

    /// Sends what a job produced.
    fn deliver(&mut self, idx: usize, c: &mut Conn, messages: Vec<Vec<u8>>, close: bool) -> Next {
        let Io::Ws(w) = &mut c.io else {
            return Next::Close;
        };
        for m in messages {
            match w.ws.write(Message::Binary(m.into())) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(_) => return Next::Close,
            }
            w.unflushed_since.get_or_insert_with(Instant::now);
        }
        if close && !w.closing {
            w.closing = true;
            let _ = w.ws.close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "".into(),
            }));
            w.unflushed_since.get_or_insert_with(Instant::now);
        }
        self.step_ws(idx, c)
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                LoopEvent::Handshaken {
                    token,
                    serial,
                    result,
                } => self.on_handshake(token, serial, result),
                LoopEvent::Processed {
                    token,
                    serial,
                    state,
                    messages,
                    close,
                } => self.on_processed(token, serial, state, messages, close),
                LoopEvent::Wake {
                    ticket,
                    queue,
                    gone,
                } => self.on_wake(ticket, queue, gone),
            }
        }
    }

    fn on_handshake(
        &mut self,
        idx: usize,
        serial: u32,
        result: Option<(Box<SessionState>, Vec<u8>)>,
    ) {
        let Some(mut c) = self.take(idx) else {
            return;
        };
        if c.serial != serial {
            self.conns[idx] = Some(c);
            return;
        }
        let next = match result {
            Some((state, msg2)) => {
                if let Io::Ws(w) = &mut c.io {
                    w.slot = Slot::Ready(state);
                    w.up = true;
                    w.last_rx = Instant::now();
                }
                self.deliver(idx, &mut c, vec![msg2], false)
            }
            // Not a handshake this relay can answer (another relay's key,
            // garbage): nothing can be said that the client would believe.
            None => {
                if let Io::Ws(w) = &mut c.io {
                    w.slot = Slot::Handshake;
                }
                self.deliver(idx, &mut c, Vec::new(), true)
            }
        };
        self.put(idx, c, next);
    }

    fn on_processed(
        &mut self,
        idx: usize,
        serial: u32,
        state: Box<SessionState>,
        messages: Vec<Vec<u8>>,
        close: bool,
    ) {
        let Some(mut c) = self.take(idx) else {
            // The connection went away while the job ran.
            self.handler.end_session(&state);
            return;
        };
        if c.serial != serial {
            self.handler.end_session(&state);
            self.conns[idx] = Some(c);
            return;
        }
        if let Io::Ws(w) = &mut c.io {
            w.slot = Slot::Ready(state);
        }
        let close = close || self.shutting_down;
        let next = self.deliver(idx, &mut c, messages, close);
        self.put(idx, c, next);
    }

    fn on_wake(&mut self, t: u64, queue: QueueRef, gone: bool) {
        let (idx, serial) = unticket(t);
        let Some(mut c) = self.take(idx) else { return };
        if c.serial == serial {
            if let Io::Ws(w) = &mut c.io {
                if !w.wakes.contains(&(queue, gone)) {
                    w.wakes.push((queue, gone));
                }
            }
            self.dispatch(idx, &mut c);
        }
        self.conns[idx] = Some(c);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, idx))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(mut c) = self.take(idx) else {
                continue;
            };
            if c.deadline != Some(t) {
                self.conns[idx] = Some(c);
                continue;
            }
            c.deadline = None;
            let next = match &c.io {
                // A session's deadline moves with its activity: look again.
                Io::Ws(w) => {
                    let idle = match &w.slot {
                        _ if !w.up => self.cfg.request_timeout,
                        Slot::Ready(st) if st.has_subscriptions() => {
                            self.cfg.subscribed_idle_timeout
                        }
                        Slot::Busy => Duration::MAX,
                        _ => self.cfg.idle_timeout,
                    };
                    let read_over = now.saturating_duration_since(w.last_rx) >= idle;
                    let write_over = w.unflushed_since.is_some_and(|s| {
                        now.saturating_duration_since(s) >= self.cfg.write_timeout
                    });
                    if read_over || write_over {
                        Next::Close
                    } else {
                        self.ws_deadline(idx, &mut c);
                        Next::Keep
                    }
                }
                // Idle, too slow to send a request, or to read a response.
                _ => Next::Close,
            };
            self.put(idx, c, next);
        }
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            self.accept();
        }
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.grace_until = Some(later(self.cfg.shutdown_timeout));
        // Dropping the listener refuses new connections right away.
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        info!("shutting down; open connections: {}", self.live);
        for idx in 0..self.conns.len() {
            let Some(mut c) = self.take(idx) else {
                continue;
            };
            let next = match &mut c.io {
                Io::Http {
                    state: Http::Head,
                    inbuf,
                    ..
                } if inbuf.is_empty() => Next::Close,
                Io::Http {
                    state: Http::Writing { linger, .. },
                    ..
                } => {
                    let linger = *linger;
                    if let Io::Http { state, .. } = &mut c.io {
                        *state = Http::Writing {
                            close: true,
                            linger,
                        };
                    }
                    Next::Keep
                }
                Io::Ws(w) => {
                    if matches!(w.slot, Slot::Busy) {
                        // Its job's result closes it (see on_processed).
                        Next::Keep
                    } else {
                        w.closing = true;
                        let _ = w.ws.close(Some(CloseFrame {
                            code: CloseCode::Away,
                            reason: "".into(),
                        }));
                        w.unflushed_since.get_or_insert_with(Instant::now);
                        self.step_ws(idx, &mut c)
                    }
                }
                _ => Next::Keep,
            };
            self.put(idx, c, next);
        }
    }
}

enum ReadStatus {
    Data,
    Blocked,
    Eof,
    Full,
    Error,
}

/// Reads once into `inbuf` (up to [`READ_CAP`]) through `scratch`, so idle
/// connections hold no buffer at all.
fn fill(stream: &mut TcpStream, inbuf: &mut Vec<u8>, scratch: &mut [u8]) -> ReadStatus {
    let room = READ_CAP.saturating_sub(inbuf.len()).min(scratch.len());
    if room == 0 {
        return ReadStatus::Full;
    }
    loop {
        match stream.read(&mut scratch[..room]) {
            Ok(0) => return ReadStatus::Eof,
            Ok(n) => {
                inbuf.extend_from_slice(&scratch[..n]);
                return ReadStatus::Data;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadStatus::Blocked,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return ReadStatus::Error,
        }
    }
}

/// Writes as much pending output as the socket takes; `Ok(true)` when done.
fn flush(stream: &mut TcpStream, out: &mut Vec<u8>, out_pos: &mut usize) -> io::Result<bool> {
    while *out_pos < out.len() {
        match stream.write(&out[*out_pos..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => *out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Release the buffer: a waiting connection should cost almost nothing.
    *out = Vec::new();
    *out_pos = 0;
    Ok(true)
}
