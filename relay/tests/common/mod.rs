//! A minimal relay client for the integration tests: std sockets, HTTP/1.1 by
//! hand for the plain HTTP tests, tungstenite and the wire crate's session
//! for everything else. Deliberately independent of the server code it tests.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_relay::{RelayAddress, RelayError, ServeConfig, Server, ShutdownHandle};
use tern_wire::delivery::{delivery_open, queue_secret};
use tern_wire::frame::{parse_replies, FrameBuilder};
use tern_wire::{ClientHandshake, Command, Id, RelayInfo, Reply, Request, Session, QUEUE_MSG_LEN};
use tungstenite::{Message, WebSocket};
use x25519_dalek::{PublicKey, StaticSecret};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Where a test relay keeps its queues. The suites whose subject is not
/// the store itself run on both (`on_both_stores!` in `pg_common`).
pub enum Db {
    Sqlite,
    /// A connection string for a fresh database.
    Postgres(String),
}

impl Db {
    /// A relay on this store (SQLite under `dir`; `dir` holds nothing with
    /// PostgreSQL).
    pub fn relay(&self, dir: &Path, tweak: impl FnOnce(&mut ServeConfig)) -> Relay {
        Relay::start(dir, |cfg| {
            if let Db::Postgres(url) = self {
                cfg.database_url = Some(url.clone());
            }
            tweak(cfg)
        })
    }
}

/// A relay running on a thread, on 127.0.0.1 and a free port.
pub struct Relay {
    pub addr: SocketAddr,
    pub address: RelayAddress,
    pub handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), RelayError>>>,
}

impl Relay {
    pub fn start(dir: &Path, tweak: impl FnOnce(&mut ServeConfig)) -> Relay {
        let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir);
        cfg.workers = 4;
        tweak(&mut cfg);
        let server = Server::bind(cfg).expect("bind");
        let address = server.address();
        let addr = server.local_addr();
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Relay {
            addr,
            address,
            handle,
            thread: Some(thread),
        }
    }

    pub fn key(&self) -> [u8; 32] {
        self.address.key
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr, self.key())
    }

    /// Shuts down and waits for `run` to return.
    pub fn stop(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("server thread panicked")
                .expect("run failed");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    pub fn get(&mut self, path: &str) -> HttpResponse {
        self.write_raw(format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
            .expect("write request");
        self.read_response().expect("read response")
    }

    pub fn read_response(&mut self) -> io::Result<HttpResponse> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h
                .split_once(':')
                .ok_or_else(|| io::Error::other("bad header"))?;
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = resp
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other("no content-length"))?;
        resp.body = vec![0; len];
        self.reader.read_exact(&mut resp.body)?;
        Ok(resp)
    }

    /// True if the server closed the connection (EOF or reset) within `wait`.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream().set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// The relay's answer to one command, or what a subscription pushed.
pub type Tagged = (u32, Reply);

/// A relay session on one WebSocket: the client's side of the protocol,
/// built from the wire crate and tungstenite only.
pub struct Client {
    ws: WebSocket<TcpStream>,
    session: Session,
    pub info: RelayInfo,
    next_tag: u32,
    /// Records that arrived while waiting for something else.
    pub pending: Vec<Tagged>,
}

/// Opens a WebSocket to the relay's session endpoint (no handshake yet).
pub fn websocket(addr: SocketAddr) -> WebSocket<TcpStream> {
    try_websocket(addr).expect("upgrade")
}

pub fn try_websocket(addr: SocketAddr) -> Result<WebSocket<TcpStream>, String> {
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_nodelay(true).unwrap();
    let (ws, _) =
        tungstenite::client::client(format!("ws://{addr}/v2"), s).map_err(|e| e.to_string())?;
    Ok(ws)
}

impl Client {
    pub fn new(addr: SocketAddr, relay_key: [u8; 32]) -> Client {
        Self::try_new(addr, relay_key).expect("handshake")
    }

    pub fn try_new(addr: SocketAddr, relay_key: [u8; 32]) -> Result<Client, String> {
        let mut ws = try_websocket(addr)?;
        let (hs, msg1) =
            ClientHandshake::start(&relay_key, &mut OsRng).map_err(|e| e.to_string())?;
        ws.send(Message::Binary(msg1.into()))
            .map_err(|e| e.to_string())?;
        let msg2 = match ws.read().map_err(|e| e.to_string())? {
            Message::Binary(b) => b,
            other => return Err(format!("handshake answered {other:?}")),
        };
        let (session, info) = hs.finish(&msg2).map_err(|e| e.to_string())?;
        Ok(Client {
            ws,
            session,
            info,
            next_tag: 1,
            pending: Vec::new(),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    pub fn hash(&self) -> [u8; 32] {
        *self.session.hash()
    }

    /// Sends raw bytes as one WebSocket binary message.
    pub fn send_raw(&mut self, bytes: Vec<u8>) -> tungstenite::Result<()> {
        self.ws.send(Message::Binary(bytes.into()))
    }

    /// Seals a frame plaintext as the session's next message, without sending it.
    pub fn seal(&mut self, frame: &[u8]) -> Vec<u8> {
        self.session.seal(frame).unwrap()
    }

    /// Encodes commands (each signed by its key, for this session) into as
    /// few frames as they fit, sends them, and returns their tags.
    pub fn submit(&mut self, cmds: &[(Command, Option<&SigningKey>)]) -> Vec<u32> {
        let hash = *self.session.hash();
        let mut frames = FrameBuilder::new();
        let mut tags = Vec::new();
        for (cmd, key) in cmds {
            let tag = self.next_tag;
            self.next_tag += 1;
            let mut rec = Vec::new();
            Request::encode(tag, cmd, &hash, *key, &mut rec);
            frames.push(&rec);
            tags.push(tag);
        }
        for f in frames.finish() {
            let m = self.session.seal(&f).unwrap();
            self.ws.send(Message::Binary(m.into())).expect("send");
        }
        tags
    }

    /// Reads the next frame's records.
    pub fn read_frame(&mut self) -> Result<Vec<Tagged>, String> {
        loop {
            match self.ws.read().map_err(|e| e.to_string())? {
                Message::Binary(b) => {
                    let f = self.session.open(&b).map_err(|e| e.to_string())?;
                    return parse_replies(&f).map_err(|e| e.to_string());
                }
                Message::Close(_) => return Err("closed".into()),
                _ => {}
            }
        }
    }

    /// Waits for the reply tagged `tag`; other records are kept in `pending`.
    pub fn wait_for(&mut self, tag: u32) -> Reply {
        if let Some(i) = self.pending.iter().position(|(t, _)| *t == tag) {
            return self.pending.remove(i).1;
        }
        loop {
            let records = self.read_frame().expect("a frame");
            let mut found = None;
            for (t, r) in records {
                if t == tag && found.is_none() {
                    found = Some(r);
                } else {
                    self.pending.push((t, r));
                }
            }
            if let Some(r) = found {
                return r;
            }
        }
    }

    pub fn request(&mut self, cmd: &Command, key: Option<&SigningKey>) -> Reply {
        let tag = self.submit(&[(cmd.clone(), key)])[0];
        self.wait_for(tag)
    }

    /// The next record (pending ones first).
    pub fn next(&mut self) -> Tagged {
        if !self.pending.is_empty() {
            return self.pending.remove(0);
        }
        let mut records = self.read_frame().expect("a frame");
        let first = records.remove(0);
        self.pending.extend(records);
        first
    }

    /// The next record within `wait`, if any.
    pub fn next_within(&mut self, wait: Duration) -> Option<Tagged> {
        if !self.pending.is_empty() {
            return Some(self.pending.remove(0));
        }
        self.stream().set_read_timeout(Some(wait)).unwrap();
        let got = self.read_frame();
        self.stream()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut records = got.ok()?;
        if records.is_empty() {
            return None;
        }
        let first = records.remove(0);
        self.pending.extend(records);
        Some(first)
    }

    /// True if the relay closed the session within `wait`.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream().set_read_timeout(Some(wait)).unwrap();
        loop {
            match self.ws.read() {
                Ok(Message::Close(_)) => return true,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// A queue as its recipient (and, for tests, its sender) sees it.
pub struct Queue {
    pub recipient_id: Id,
    pub sender_id: Id,
    pub recipient_key: SigningKey,
    pub sender_key: SigningKey,
    pub secret: [u8; 32],
}

pub fn create_command(access_key: Option<&str>) -> (Command, SigningKey, StaticSecret) {
    let recipient_key = SigningKey::generate(&mut OsRng);
    let dh = StaticSecret::random_from_rng(OsRng);
    let cmd = Command::Create {
        access_key: access_key.map(str::to_string),
        recipient_auth: recipient_key.verifying_key().to_bytes(),
        recipient_dh: PublicKey::from(&dh).to_bytes(),
    };
    (cmd, recipient_key, dh)
}

pub fn queue_from(reply: Reply, recipient_key: SigningKey, dh: &StaticSecret) -> Queue {
    match reply {
        Reply::Queue {
            recipient_id,
            sender_id,
            relay_dh,
        } => Queue {
            recipient_id,
            sender_id,
            recipient_key,
            sender_key: SigningKey::generate(&mut OsRng),
            secret: *queue_secret(dh, &relay_dh).unwrap(),
        },
        other => panic!("CREATE answered {other:?}"),
    }
}

pub fn create_queue(client: &mut Client, access_key: Option<&str>) -> Queue {
    let (cmd, key, dh) = create_command(access_key);
    let reply = client.request(&cmd, Some(&key));
    queue_from(reply, key, &dh)
}

/// A queue created and secured, ready for signed sends.
pub fn secured_queue(client: &mut Client) -> Queue {
    let q = create_queue(client, None);
    assert_eq!(
        client.request(&q.secure(), Some(&q.recipient_key)),
        Reply::Ok
    );
    q
}

impl Queue {
    pub fn secure(&self) -> Command {
        Command::Secure {
            recipient_id: self.recipient_id,
            sender_auth: self.sender_key.verifying_key().to_bytes(),
        }
    }

    pub fn send(&self, message: &[u8]) -> Command {
        Command::Send {
            sender_id: self.sender_id,
            message: message.to_vec(),
        }
    }

    pub fn sub(&self, window: u16) -> Command {
        Command::Subscribe {
            recipient_id: self.recipient_id,
            window,
        }
    }

    pub fn ack(&self, msg_id: Id) -> Command {
        Command::Ack {
            recipient_id: self.recipient_id,
            msg_id,
        }
    }

    pub fn ack_upto(&self, msg_id: Id) -> Command {
        Command::AckUpTo {
            recipient_id: self.recipient_id,
            msg_id,
        }
    }

    pub fn delete(&self) -> Command {
        Command::Delete {
            recipient_id: self.recipient_id,
            if_empty: false,
        }
    }

    pub fn check(&self) -> Command {
        Command::Check {
            recipient_id: self.recipient_id,
        }
    }

    /// Decrypts a pushed message.
    pub fn open(&self, reply: &Reply) -> (Id, Vec<u8>) {
        match reply {
            Reply::Message { msg_id, body, .. } => (
                *msg_id,
                delivery_open(&self.secret, msg_id, body).expect("delivery opens"),
            ),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Subscribes to `q` and reads it empty, acknowledging each window's worth
/// of messages as it goes; returns the messages in order. IDLE means
/// everything there is was pushed: acknowledging what is left ends it.
pub fn drain_acking(c: &mut Client, q: &Queue) -> Vec<Vec<u8>> {
    let tag = c.submit(&[(q.sub(64), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    let mut out = Vec::new();
    let mut unacked = None;
    let ack = |c: &mut Client, id| {
        let t = c.submit(&[(q.ack_upto(id), Some(&q.recipient_key))])[0];
        assert_eq!(c.wait_for(t), Reply::Ok);
    };
    loop {
        let r = c.wait_for(tag);
        match r {
            Reply::Message { .. } => {
                let (id, m) = q.open(&r);
                out.push(m);
                unacked = Some(id);
                if out.len() % 64 == 0 {
                    ack(c, id);
                    unacked = None;
                }
            }
            Reply::Idle => {
                if let Some(id) = unacked {
                    ack(c, id);
                }
                break;
            }
            other => panic!("subscription pushed {other:?}"),
        }
    }
    let t = c.submit(&[(Command::Unsubscribe { sub_tag: tag }, None)])[0];
    assert_eq!(c.wait_for(t), Reply::Ok);
    out
}

/// Subscribes to `q` and collects what it pushes until IDLE, acknowledging
/// nothing (at most one window, 64): (msg id, message).
pub fn drain(c: &mut Client, q: &Queue) -> Vec<(Id, Vec<u8>)> {
    let tag = c.submit(&[(q.sub(64), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    let mut out = Vec::new();
    loop {
        let r = c.wait_for(tag);
        match r {
            Reply::Idle => return out,
            Reply::Message { .. } => out.push(q.open(&r)),
            other => panic!("subscription pushed {other:?}"),
        }
    }
}

/// A random queue message.
pub fn message() -> Vec<u8> {
    let mut m = vec![0u8; QUEUE_MSG_LEN];
    OsRng.fill_bytes(&mut m);
    m
}

/// Soft limit on open files for this process.
pub fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Threads in this process.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
