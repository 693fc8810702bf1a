//! The socket side of the server: one thread, non-blocking sockets, `mio`.
//!
//! Each connection is a small state machine:
//!
//! ```text
//! Reading ──request──▶ Processing ──reply──▶ Writing ──keep-alive──▶ Reading
//!    │                    │    ▲                 │
//!    │ bad/oversized      │wait│wake/deadline    └──close──▶ Draining ──▶ closed
//!    └──▶ Writing(close)  ▼    │
//!                         Waiting
//! ```
//!
//! Every state that waits for the client has a deadline (idle, request,
//! write, linger), and a parked FETCH has its long-poll deadline, so no
//! client can hold anything forever. Worker results and long-poll wakes come
//! back through a channel plus the poll's waker.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SendError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::config::ServeConfig;
use crate::error::RelayError;
use crate::handler::{Handler, Outcome, Wait};
use crate::http::{self, Head, Method, Parse, Target, MAX_HEAD};
use crate::log::{info, warning};
use crate::seal::BLOCK_LEN;
use crate::server::{now_ms, ticket, unticket, Job, LoopEvent, LISTENER, WAKER};

const FIRST_CONN: usize = 2;
/// Most bytes buffered from one connection: a full head and a full body.
const READ_CAP: usize = MAX_HEAD + BLOCK_LEN;
/// After a response that closes the connection, unread input is drained for
/// this long (and up to `LINGER_BYTES`) so that the client reads the response
/// rather than a connection reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;
/// Pause before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Rate limit for repeated warnings.
const WARN_EVERY: Duration = Duration::from_secs(60);

const OCTETS: &str = "application/octet-stream";
const OCTETS_HEADERS: &str = "Cache-Control: no-store\r\n";
const HTML: &str = "text/html; charset=utf-8";
const PAGE_HEADERS: &str = "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n";

enum State {
    /// Waiting for (the rest of) a request.
    Reading,
    /// A worker has the request. `woken`: a message arrived for a FETCH that
    /// has not come back as a wait yet.
    Processing { woken: bool },
    /// A parked long-poll FETCH.
    Waiting(Wait),
    /// Sending a response; then close, or read the next request. `linger`:
    /// the request may not have been read completely (an error response).
    Writing { close: bool, linger: bool },
    /// Output shut down; discarding input until the client closes.
    Draining,
}

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    /// Identifies the request in flight, so late results and wakes for an
    /// earlier request (or an earlier connection in the same slot) are ignored.
    serial: u32,
    deadline: Option<Instant>,
    keep_alive: bool,
    continue_sent: bool,
    /// The client has closed its side.
    eof: bool,
    drained: usize,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            state: State::Reading,
            serial: 0,
            deadline: None,
            keep_alive: true,
            continue_sent: false,
            eof: false,
            drained: 0,
        }
    }
}

enum Next {
    Keep,
    Close,
}

/// What reading a request led to.
enum Progress {
    /// State changed: run the state machine again.
    Again,
    /// Nothing more until the socket is ready.
    Blocked,
    Close,
}

enum ReadStatus {
    Data,
    Blocked,
    Eof,
    Full,
    Error,
}

/// `now + after`, saturating instead of panicking on absurd durations.
fn later(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Reads once into `inbuf` (up to [`READ_CAP`]) through `scratch`, so idle
/// connections hold no buffer at all.
fn fill(c: &mut Conn, scratch: &mut [u8]) -> ReadStatus {
    let room = READ_CAP.saturating_sub(c.inbuf.len()).min(scratch.len());
    if room == 0 {
        return ReadStatus::Full;
    }
    loop {
        match c.stream.read(&mut scratch[..room]) {
            Ok(0) => return ReadStatus::Eof,
            Ok(n) => {
                c.inbuf.extend_from_slice(&scratch[..n]);
                return ReadStatus::Data;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadStatus::Blocked,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return ReadStatus::Error,
        }
    }
}

/// Writes as much pending output as the socket takes; `Ok(true)` when done.
fn flush(c: &mut Conn) -> io::Result<bool> {
    while c.out_pos < c.out.len() {
        match c.stream.write(&c.out[c.out_pos..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Release the buffer: a waiting connection should cost almost nothing.
    c.out = Vec::new();
    c.out_pos = 0;
    Ok(true)
}

pub(crate) struct EventLoop {
    cfg: ServeConfig,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
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
            scratch: vec![0; BLOCK_LEN],
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

    fn set_deadline(&mut self, idx: usize, c: &mut Conn, after: Duration) {
        let t = later(after);
        c.deadline = Some(t);
        self.timers.push(Reverse((t, idx)));
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

    fn close(&mut self, idx: usize, mut c: Conn) {
        if let State::Waiting(w) = &c.state {
            self.handler.cancel(w, ticket(idx, c.serial));
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        drop(c);
        self.free.push(idx);
        self.live -= 1;
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.live >= self.cfg.max_connections {
                        // Best effort: a fresh socket's send buffer takes this.
                        let _ = stream.write(&http::empty(503, true));
                        let max = self.cfg.max_connections;
                        self.warn_limited(format_args!(
                            "connection limit ({max}) reached; refusing new connections"
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
                        self.warn_limited(format_args!("could not watch a new connection: {e}"));
                        continue;
                    }
                    let mut c = Conn::new(stream);
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
            if c.out_pos < c.out.len() {
                match flush(c) {
                    Err(_) => return Next::Close,
                    Ok(false) if matches!(c.state, State::Writing { .. }) => return Next::Keep,
                    // A pending "100 Continue" must not stop us reading the body.
                    Ok(_) => {}
                }
            }
            match &mut c.state {
                State::Writing { close, linger } => {
                    if *close && !*linger {
                        // Everything the client sent was read: a plain close
                        // cannot reset the connection under the response.
                        return Next::Close;
                    }
                    if *close {
                        let _ = c.stream.shutdown(Shutdown::Write);
                        c.state = State::Draining;
                        c.inbuf = Vec::new();
                        self.set_deadline(idx, c, LINGER);
                        continue;
                    }
                    c.state = State::Reading;
                    c.continue_sent = false;
                    let wait = if c.inbuf.is_empty() {
                        self.cfg.idle_timeout
                    } else {
                        self.cfg.request_timeout
                    };
                    self.set_deadline(idx, c, wait);
                }
                State::Reading => match self.read_request(idx, c) {
                    Progress::Again => {}
                    Progress::Blocked => return Next::Keep,
                    Progress::Close => return Next::Close,
                },
                State::Processing { .. } | State::Waiting(_) => {
                    // Nothing to do but notice the client leaving; pipelined
                    // bytes are kept for later.
                    loop {
                        match fill(c, &mut self.scratch) {
                            ReadStatus::Data => {}
                            ReadStatus::Blocked | ReadStatus::Full => return Next::Keep,
                            ReadStatus::Eof | ReadStatus::Error => {
                                c.eof = true;
                                // A parked FETCH of a vanished client frees its slot now;
                                // a request being processed still gets its answer written.
                                return if matches!(c.state, State::Waiting(_)) {
                                    Next::Close
                                } else {
                                    Next::Keep
                                };
                            }
                        }
                    }
                }
                State::Draining => loop {
                    match c.stream.read(&mut self.scratch) {
                        Ok(0) => return Next::Close,
                        Ok(n) => {
                            c.drained += n;
                            if c.drained > LINGER_BYTES {
                                return Next::Close;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return Next::Close,
                    }
                },
            }
        }
    }

    fn read_request(&mut self, idx: usize, c: &mut Conn) -> Progress {
        loop {
            match http::parse_head(&c.inbuf) {
                Parse::Bad(status) => {
                    self.respond(idx, c, status, None, "", &[], true);
                    return Progress::Again;
                }
                Parse::Head(h) => {
                    if let Some(p) = self.route(idx, c, &h) {
                        return p;
                    }
                }
                Parse::Incomplete => {}
            }
            // More bytes needed.
            if c.eof {
                return Progress::Close;
            }
            let was_empty = c.inbuf.is_empty();
            match fill(c, &mut self.scratch) {
                ReadStatus::Data => {
                    if was_empty {
                        let t = self.cfg.request_timeout;
                        self.set_deadline(idx, c, t);
                    }
                }
                ReadStatus::Blocked => return Progress::Blocked,
                ReadStatus::Eof => c.eof = true,
                // A full buffer always holds a complete head or a too-large
                // one, so this is only reached by garbage; and errors end it.
                ReadStatus::Full | ReadStatus::Error => return Progress::Close,
            }
        }
    }

    /// Acts on a complete head; `None` when the body is not complete yet.
    fn route(&mut self, idx: usize, c: &mut Conn, h: &Head) -> Option<Progress> {
        let close = !h.keep_alive;
        let has_body = h.content_length.is_some_and(|n| n > 0);
        match (h.method, h.target) {
            (Method::Post, Target::V1) => {
                let Some(len) = h.content_length else {
                    self.respond(idx, c, 411, None, "", &[], true);
                    return Some(Progress::Again);
                };
                if len > BLOCK_LEN as u64 {
                    // Refused on the head alone: the body is never read in.
                    self.respond(idx, c, 413, None, "", &[], true);
                    return Some(Progress::Again);
                }
                if len != BLOCK_LEN as u64 {
                    self.respond(idx, c, 400, None, "", &[], true);
                    return Some(Progress::Again);
                }
                let total = h.len + BLOCK_LEN;
                if c.inbuf.len() < total {
                    if h.expect_continue && !c.continue_sent {
                        c.continue_sent = true;
                        c.out.extend_from_slice(http::CONTINUE);
                        return Some(Progress::Again);
                    }
                    return None;
                }
                let body = c.inbuf[h.len..total].to_vec();
                c.inbuf.drain(..total);
                if c.inbuf.is_empty() {
                    c.inbuf = Vec::new();
                }
                c.keep_alive = !close;
                self.next_serial = self.next_serial.wrapping_add(1);
                c.serial = self.next_serial;
                c.state = State::Processing { woken: false };
                c.deadline = None;
                let job = Job::Request {
                    token: idx,
                    serial: c.serial,
                    body,
                };
                if self.jobs.send(job).is_err() {
                    return Some(Progress::Close);
                }
                Some(Progress::Again)
            }
            (Method::Get, Target::Root) if !has_body => {
                c.inbuf.drain(..h.len);
                let page = std::mem::take(&mut self.page);
                self.respond(idx, c, 200, Some(HTML), PAGE_HEADERS, &page, close);
                self.page = page;
                Some(Progress::Again)
            }
            _ => {
                // A body we will not read means the connection cannot continue.
                c.inbuf.drain(..h.len.min(c.inbuf.len()));
                self.respond(idx, c, 404, None, "", &[], close || has_body);
                Some(Progress::Again)
            }
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
        let close = close || self.shutting_down || c.eof;
        // Keep any unsent "100 Continue" in front of the response.
        c.out.drain(..c.out_pos);
        c.out_pos = 0;
        c.out
            .extend_from_slice(&http::response(status, content_type, headers, body, close));
        c.state = State::Writing {
            close,
            linger: status >= 400,
        };
        let t = self.cfg.write_timeout;
        self.set_deadline(idx, c, t);
    }

    fn dispatch_resume(&mut self, idx: usize, c: &mut Conn, wait: Wait, last: bool) -> Next {
        c.state = State::Processing { woken: false };
        c.deadline = None;
        let job = Job::Resume {
            token: idx,
            serial: c.serial,
            wait,
            last,
        };
        match self.jobs.send(job) {
            Ok(()) => Next::Keep,
            Err(SendError(Job::Resume { wait, .. })) => {
                self.handler.cancel(&wait, ticket(idx, c.serial));
                Next::Close
            }
            Err(_) => Next::Close,
        }
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                LoopEvent::Done {
                    token,
                    serial,
                    outcome,
                } => self.on_done(token, serial, outcome),
                LoopEvent::Wake(t) => self.on_wake(t),
            }
        }
    }

    fn on_done(&mut self, idx: usize, serial: u32, outcome: Outcome) {
        let stale = |h: &Handler, o: &Outcome| {
            if let Outcome::Wait(w) = o {
                h.cancel(w, ticket(idx, serial));
            }
        };
        let Some(mut c) = self.take(idx) else {
            stale(&self.handler, &outcome);
            return;
        };
        let woken = match c.state {
            State::Processing { woken } if c.serial == serial => woken,
            _ => {
                stale(&self.handler, &outcome);
                self.conns[idx] = Some(c);
                return;
            }
        };
        let close = !c.keep_alive;
        let next = match outcome {
            Outcome::Reply(block) => {
                self.respond(
                    idx,
                    &mut c,
                    200,
                    Some(OCTETS),
                    OCTETS_HEADERS,
                    &block,
                    close,
                );
                self.step(idx, &mut c)
            }
            Outcome::Reject => {
                self.respond(idx, &mut c, 400, None, "", &[], close);
                self.step(idx, &mut c)
            }
            Outcome::Wait(w) if c.eof => {
                self.handler.cancel(&w, ticket(idx, serial));
                Next::Close
            }
            Outcome::Wait(w) if woken || self.shutting_down => {
                let last = self.shutting_down;
                self.dispatch_resume(idx, &mut c, w, last)
            }
            Outcome::Wait(w) => {
                let left = Duration::from_millis(w.deadline_ms().saturating_sub(now_ms()));
                c.state = State::Waiting(w);
                self.set_deadline(idx, &mut c, left);
                Next::Keep
            }
        };
        self.put(idx, c, next);
    }

    fn on_wake(&mut self, t: u64) {
        let (idx, serial) = unticket(t);
        let Some(mut c) = self.take(idx) else { return };
        let mut next = Next::Keep;
        if c.serial == serial {
            match std::mem::replace(&mut c.state, State::Reading) {
                State::Waiting(w) => next = self.dispatch_resume(idx, &mut c, w, false),
                State::Processing { .. } => c.state = State::Processing { woken: true },
                other => c.state = other,
            }
        }
        self.put(idx, c, next);
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
            let next = match std::mem::replace(&mut c.state, State::Reading) {
                // The long poll is over: answer with whatever is there now.
                State::Waiting(w) => self.dispatch_resume(idx, &mut c, w, true),
                // Idle, too slow to send a request, or to read a response.
                other => {
                    c.state = other;
                    Next::Close
                }
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
            let next = match std::mem::replace(&mut c.state, State::Reading) {
                State::Reading if c.inbuf.is_empty() => Next::Close,
                State::Waiting(w) => self.dispatch_resume(idx, &mut c, w, true),
                State::Writing { linger, .. } => {
                    c.state = State::Writing {
                        close: true,
                        linger,
                    };
                    Next::Keep
                }
                other => {
                    c.state = other;
                    Next::Keep
                }
            };
            self.put(idx, c, next);
        }
    }
}
