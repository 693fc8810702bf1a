//! Relay benchmarks, run by `scripts/bench` (see BENCHMARKS.md).
//!
//! ```text
//! bench_relay throughput --tern PATH [--redis-server PATH] [--quick]
//!                        [--store POSTGRES_URL [--nodes 2]]
//! bench_relay scale      --tern PATH [--quick]
//! bench_relay fixed      --tern PATH [--pairs N] [--messages M]
//! ```
//!
//! Every relay is a separate process (`tern relay serve --listen
//! 127.0.0.1:0 --data TMP`), so its peak memory and CPU time can be read from
//! `/proc/<pid>`. Clients are threads of this process, each with its own
//! relay session (WebSocket, Noise + ML-KEM handshake) signing every command
//! with Ed25519 exactly as `tern` does. Only 127.0.0.1 is ever contacted, and
//! every loop is bounded in count and in time.
//!
//! Results go to stdout as Markdown; progress goes to stderr.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_relay::RelayAddress;
use tern_wire::delivery::{delivery_open, delivery_seal, queue_secret};
use tern_wire::frame::{parse_commands, parse_replies, FrameBuilder};
use tern_wire::{ClientHandshake, Command, Id, Reply, Request, ServerHandshake, QUEUE_MSG_LEN};
use tungstenite::{Message, WebSocket};
use x25519_dalek::{PublicKey, StaticSecret};

// ---------------------------------------------------------------- utilities

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn progress(msg: &str) {
    eprintln!("bench_relay: {msg}");
}

/// Sorted-sample percentile (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// "median (min–max)" of per-run figures.
fn spread(runs: &[f64], digits: usize) -> String {
    let s = sorted(runs.to_vec());
    if s.is_empty() {
        return "n/a".into();
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    format!(
        "{median:.digits$} ({:.digits$}–{:.digits$})",
        s[0],
        s[s.len() - 1]
    )
}

fn median(runs: &[f64]) -> f64 {
    let s = sorted(runs.to_vec());
    if s.is_empty() {
        return f64::NAN;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// A field of /proc/<pid>/status, in its unit (kB for memory).
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process (or of "self"), assuming the
/// usual 100 clock ticks per second.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path, names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| std::fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn kill_term(pid: u32) {
    let _ = Process::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// Waits up to `limit` for a child to exit, then kills it.
fn reap(child: &mut Child, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// --------------------------------------------------------------- sessions

/// One relay session on a blocking socket: WebSocket, handshake, frames.
struct Session {
    ws: WebSocket<TcpStream>,
    session: tern_wire::Session,
    next_tag: u32,
    /// Records read while waiting for another.
    pending: VecDeque<(u32, Reply)>,
}

impl Session {
    fn connect(addr: SocketAddr, relay_key: &[u8; 32]) -> io::Result<Session> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/v2"), s)
            .map_err(|e| err(format!("upgrade: {e}")))?;
        let (hs, msg1) =
            ClientHandshake::start(relay_key, &mut OsRng).map_err(|e| err(e.to_string()))?;
        ws.send(Message::Binary(msg1.into()))
            .map_err(|e| err(e.to_string()))?;
        let msg2 = match ws.read().map_err(|e| err(e.to_string()))? {
            Message::Binary(b) => b,
            other => return Err(err(format!("handshake answered {other:?}"))),
        };
        let (session, _) = hs.finish(&msg2).map_err(|e| err(e.to_string()))?;
        Ok(Session {
            ws,
            session,
            next_tag: 1,
            pending: VecDeque::new(),
        })
    }

    /// Sends commands in as few frames as they fit; returns their tags.
    fn submit(&mut self, cmds: &[(&Command, Option<&SigningKey>)]) -> io::Result<Vec<u32>> {
        let mut frames = FrameBuilder::new();
        let mut tags = Vec::with_capacity(cmds.len());
        for (cmd, key) in cmds {
            let tag = self.next_tag;
            self.next_tag += 1;
            let mut rec = Vec::with_capacity(16_200);
            Request::encode(tag, cmd, self.session.hash(), *key, &mut rec);
            frames.push(&rec);
            tags.push(tag);
        }
        for f in frames.finish() {
            let m = self.session.seal(&f).map_err(|e| err(e.to_string()))?;
            self.ws
                .send(Message::Binary(m.into()))
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(tags)
    }

    /// The next record, waiting up to `wait` (`None` on time-out).
    fn next(&mut self, wait: Duration) -> io::Result<Option<(u32, Reply)>> {
        if let Some(r) = self.pending.pop_front() {
            return Ok(Some(r));
        }
        self.ws
            .get_ref()
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let f = self.session.open(&b).map_err(|e| err(e.to_string()))?;
                    let mut records: VecDeque<(u32, Reply)> =
                        parse_replies(&f).map_err(|e| err(e.to_string()))?.into();
                    let first = records.pop_front();
                    self.pending.extend(records);
                    if first.is_some() {
                        return Ok(first);
                    }
                }
                Ok(Message::Close(_)) => return Err(err("the relay closed the session")),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }

    /// Waits for the reply tagged `tag` (other records are kept).
    fn wait_for(&mut self, tag: u32) -> io::Result<Reply> {
        if let Some(i) = self.pending.iter().position(|(t, _)| *t == tag) {
            return Ok(self.pending.remove(i).expect("found").1);
        }
        let mut kept = VecDeque::new();
        loop {
            match self.next(Duration::from_secs(60))? {
                Some((t, r)) if t == tag => {
                    kept.extend(self.pending.drain(..));
                    self.pending = kept;
                    return Ok(r);
                }
                Some(other) => kept.push_back(other),
                None => return Err(err("no answer within 60 s")),
            }
        }
    }

    fn call(&mut self, cmd: &Command, key: Option<&SigningKey>) -> io::Result<Reply> {
        let tag = self.submit(&[(cmd, key)])?[0];
        self.wait_for(tag)
    }
}

// ------------------------------------------------------------ tern client

/// Keys shared by many queues: the relay only sees public keys, so reusing
/// them changes nothing on its side and saves client CPU when creating
/// 100,000 queues.
struct Keys {
    recipient: SigningKey,
    dh: StaticSecret,
    sender: SigningKey,
}

impl Keys {
    fn generate() -> Arc<Keys> {
        Arc::new(Keys {
            recipient: SigningKey::generate(&mut OsRng),
            dh: StaticSecret::random_from_rng(OsRng),
            sender: SigningKey::generate(&mut OsRng),
        })
    }
}

#[derive(Clone, Copy)]
struct Queue {
    recipient_id: Id,
    sender_id: Id,
    secret: [u8; 32],
}

fn create_queue(conn: &mut Session, keys: &Keys) -> io::Result<Queue> {
    let cmd = Command::Create {
        access_key: None,
        recipient_auth: keys.recipient.verifying_key().to_bytes(),
        recipient_dh: PublicKey::from(&keys.dh).to_bytes(),
    };
    match conn.call(&cmd, Some(&keys.recipient))? {
        Reply::Queue {
            recipient_id,
            sender_id,
            relay_dh,
        } => Ok(Queue {
            recipient_id,
            sender_id,
            secret: *queue_secret(&keys.dh, &relay_dh).map_err(|e| err(e.to_string()))?,
        }),
        other => Err(err(format!("CREATE answered {other:?}"))),
    }
}

fn secure_queue(conn: &mut Session, keys: &Keys, q: &Queue) -> io::Result<()> {
    let cmd = Command::Secure {
        recipient_id: q.recipient_id,
        sender_auth: keys.sender.verifying_key().to_bytes(),
    };
    match conn.call(&cmd, Some(&keys.recipient))? {
        Reply::Ok => Ok(()),
        other => Err(err(format!("SECURE answered {other:?}"))),
    }
}

/// Creates (and optionally secures) `n` queues from `threads` connections.
fn create_queues(
    addr: SocketAddr,
    relay_key: [u8; 32],
    keys: &Arc<Keys>,
    n: usize,
    threads: usize,
    secure: bool,
) -> io::Result<Vec<Queue>> {
    let threads = threads.max(1).min(n.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let keys = Arc::clone(keys);
            let count = n / threads + usize::from(t < n % threads);
            thread::spawn(move || -> io::Result<Vec<Queue>> {
                let mut conn = Session::connect(addr, &relay_key)?;
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    let q = create_queue(&mut conn, &keys)?;
                    if secure {
                        secure_queue(&mut conn, &keys, &q)?;
                    }
                    out.push(q);
                }
                Ok(out)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.join().map_err(|_| err("creating thread panicked"))??);
    }
    Ok(all)
}

/// A relay started as its own process.
struct RelayProc {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    key: [u8; 32],
    data: PathBuf,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl RelayProc {
    fn start(tern: &Path, base: &Path, name: &str, extra: &[&str]) -> io::Result<RelayProc> {
        let data = base.join(name);
        let log = File::create(base.join(format!("{name}.log")))?;
        let mut child = Process::new(tern)
            .args(["relay", "serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or_else(|| err("no stdout"))?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let address: RelayAddress = line
            .trim()
            .parse()
            .map_err(|e| err(format!("relay printed {line:?}: {e}")))?;
        let addr: SocketAddr = address
            .authority()
            .parse()
            .map_err(|e| err(format!("relay address {line:?}: {e}")))?;
        Ok(RelayProc {
            pid: child.id(),
            child,
            addr,
            key: address.key,
            data,
            _stdout: stdout,
        })
    }

    fn hwm_mib(&self) -> f64 {
        proc_status(self.pid, "VmHWM").unwrap_or(0) as f64 / 1024.0
    }

    fn rss_mib(&self) -> f64 {
        proc_status(self.pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
    }

    fn threads(&self) -> u64 {
        proc_status(self.pid, "Threads").unwrap_or(0)
    }

    fn db_bytes(&self) -> u64 {
        dir_bytes(&self.data, &["relay.db", "relay.db-wal", "relay.db-shm"])
    }

    /// SIGTERM (graceful: the store checkpoints on the way out), then wait.
    fn stop(mut self) {
        kill_term(self.pid);
        reap(&mut self.child, Duration::from_secs(20));
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------ Redis

// The payloads are only ever shown in error messages.
#[allow(dead_code)]
#[derive(Debug)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// A minimal RESP2 client: enough for PING, LPUSH and BRPOP.
struct Redis {
    reader: BufReader<TcpStream>,
}

impl Redis {
    fn connect(addr: SocketAddr) -> io::Result<Redis> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Redis {
            reader: BufReader::with_capacity(20 * 1024, s),
        })
    }

    fn command(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)?;
        self.read_value()
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_value(&mut self) -> io::Result<Resp> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let num = || {
            rest.parse::<i64>()
                .map_err(|_| err(format!("bad RESP {line:?}")))
        };
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(num()?),
            "$" => {
                let n = num()?;
                if n < 0 {
                    Resp::Bulk(None)
                } else {
                    let mut buf = vec![0; n as usize + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(n as usize);
                    Resp::Bulk(Some(buf))
                }
            }
            "*" => {
                let n = num()?;
                if n < 0 {
                    Resp::Array(None)
                } else {
                    let mut items = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        items.push(self.read_value()?);
                    }
                    Resp::Array(Some(items))
                }
            }
            _ => return Err(err(format!("bad RESP line {line:?}"))),
        })
    }
}

/// A redis-server process with a private directory.
struct RedisProc {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl RedisProc {
    fn start(bin: &Path, base: &Path, name: &str, fsync: &str) -> io::Result<RedisProc> {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let child = Process::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(&dir)
            .args(["--appendonly", "yes", "--appendfsync", fsync, "--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--logfile")
            .arg(base.join(format!("{name}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .map_err(|_| err("bad address"))?;
        let mut p = RedisProc {
            pid: child.id(),
            child,
            addr,
        };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = Redis::connect(addr) {
                if let Ok(Resp::Simple(s)) = c.command(&[b"PING"]) {
                    if s == "PONG" {
                        return Ok(p);
                    }
                }
            }
            if Instant::now() > end || matches!(p.child.try_wait(), Ok(Some(_))) {
                let _ = p.child.kill();
                return Err(err("redis-server did not start (see its log)"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn hwm_mib(&self) -> f64 {
        proc_status(self.pid, "VmHWM").unwrap_or(0) as f64 / 1024.0
    }

    fn stop(mut self) {
        kill_term(self.pid);
        reap(&mut self.child, Duration::from_secs(20));
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------- throughput

/// One side of a queue pair.
trait SendSide: Send {
    /// Uploads message `seq` and returns once the server has accepted it.
    fn send(&mut self, seq: u64) -> io::Result<()>;
}

trait RecvSide: Send {
    /// The next message's sequence number, waiting up to `wait` for it.
    fn recv(&mut self, wait: Duration) -> io::Result<Option<u64>>;
    /// Acknowledges the message `recv` returned last.
    fn ack(&mut self) -> io::Result<()>;
}

fn seq_of(m: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&m[..8]);
    u64::from_le_bytes(b)
}

struct TernSender {
    conn: Session,
    keys: Arc<Keys>,
    queue: Queue,
    message: Vec<u8>,
}

impl SendSide for TernSender {
    fn send(&mut self, seq: u64) -> io::Result<()> {
        self.message[..8].copy_from_slice(&seq.to_le_bytes());
        let cmd = Command::Send {
            sender_id: self.queue.sender_id,
            message: self.message.clone(),
        };
        match self.conn.call(&cmd, Some(&self.keys.sender))? {
            Reply::Ok => Ok(()),
            other => Err(err(format!("SEND answered {other:?}"))),
        }
    }
}

/// A subscribed recipient: the relay pushes each message as it arrives;
/// each is acknowledged without waiting for the answer.
struct TernRecipient {
    conn: Session,
    keys: Arc<Keys>,
    queue: Queue,
    sub_tag: u32,
    current: Option<Id>,
}

impl TernRecipient {
    fn subscribe(mut conn: Session, keys: Arc<Keys>, queue: Queue) -> io::Result<Self> {
        let cmd = Command::Subscribe {
            recipient_id: queue.recipient_id,
            window: 64,
        };
        let sub_tag = conn.submit(&[(&cmd, Some(&keys.recipient))])?[0];
        match conn.wait_for(sub_tag)? {
            Reply::Ok => {}
            other => return Err(err(format!("SUB answered {other:?}"))),
        }
        Ok(TernRecipient {
            conn,
            keys,
            queue,
            sub_tag,
            current: None,
        })
    }
}

impl RecvSide for TernRecipient {
    fn recv(&mut self, wait: Duration) -> io::Result<Option<u64>> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.conn.next(left)? {
                Some((tag, Reply::Message { msg_id, body, .. })) if tag == self.sub_tag => {
                    let m = delivery_open(&self.queue.secret, &msg_id, &body)
                        .map_err(|_| err("delivered message does not open"))?;
                    self.current = Some(msg_id);
                    return Ok(Some(seq_of(&m)));
                }
                // IDLE, and the answers to acknowledgements.
                Some((_, Reply::Idle | Reply::Ok)) => {}
                Some((_, other)) => return Err(err(format!("the session said {other:?}"))),
                None => return Ok(None),
            }
        }
    }

    fn ack(&mut self) -> io::Result<()> {
        let Some(msg_id) = self.current.take() else {
            return Ok(());
        };
        let cmd = Command::Ack {
            recipient_id: self.queue.recipient_id,
            msg_id,
        };
        self.conn.submit(&[(&cmd, Some(&self.keys.recipient))])?;
        Ok(())
    }
}

struct RedisSender {
    conn: Redis,
    key: Vec<u8>,
    message: Vec<u8>,
}

impl SendSide for RedisSender {
    fn send(&mut self, seq: u64) -> io::Result<()> {
        self.message[..8].copy_from_slice(&seq.to_le_bytes());
        match self.conn.command(&[b"LPUSH", &self.key, &self.message])? {
            Resp::Int(_) => Ok(()),
            other => Err(err(format!("LPUSH answered {other:?}"))),
        }
    }
}

struct RedisRecipient {
    conn: Redis,
    key: Vec<u8>,
}

impl RecvSide for RedisRecipient {
    fn recv(&mut self, wait: Duration) -> io::Result<Option<u64>> {
        let timeout = format!("{:.3}", wait.as_secs_f64().max(0.01));
        match self
            .conn
            .command(&[b"BRPOP", &self.key, timeout.as_bytes()])?
        {
            Resp::Array(None) => Ok(None),
            Resp::Array(Some(mut items)) if items.len() == 2 => match items.pop() {
                Some(Resp::Bulk(Some(v))) if v.len() >= 8 => Ok(Some(seq_of(&v))),
                other => Err(err(format!("BRPOP answered {other:?}"))),
            },
            other => Err(err(format!("BRPOP answered {other:?}"))),
        }
    }

    fn ack(&mut self) -> io::Result<()> {
        // BRPOP removed the message: that is Redis's acknowledgement.
        Ok(())
    }
}

/// What one pair did in one run.
#[derive(Default)]
struct PairResult {
    /// Messages delivered and acknowledged before the deadline.
    done: u64,
    /// Send start → delivery, in ms, for those messages.
    latencies: Vec<f64>,
    error: Option<String>,
}

/// Runs one queue pair for `length`: a closed loop with `window` messages in
/// flight (sent and not yet delivered). Returns the pair's counts.
fn run_pair(
    mut tx: Box<dyn SendSide>,
    mut rx: Box<dyn RecvSide>,
    window: usize,
    start: Instant,
    length: Duration,
    first_seq: u64,
) -> (PairResult, u64) {
    let deadline = start + length;
    let grace = deadline + Duration::from_secs(10);
    let starts: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; window]));
    let (credit_tx, credit_rx) = mpsc::channel::<()>();
    let sent_total = Arc::new(Mutex::new((first_seq, false)));
    let failed = Arc::new(AtomicBool::new(false));

    let sender = {
        let starts = Arc::clone(&starts);
        let sent_total = Arc::clone(&sent_total);
        let failed = Arc::clone(&failed);
        thread::spawn(move || -> Option<String> {
            let mut credits = window;
            let mut seq = first_seq;
            let mut error = None;
            while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                while credits == 0 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    if credit_rx.recv_timeout(left).is_ok() {
                        credits += 1;
                    } else {
                        break;
                    }
                }
                if credits == 0 || Instant::now() >= deadline {
                    break;
                }
                if let Ok(mut s) = starts.lock() {
                    s[(seq as usize) % window] = Some(Instant::now());
                }
                if let Ok(mut t) = sent_total.lock() {
                    t.0 = seq + 1;
                }
                if let Err(e) = tx.send(seq) {
                    error = Some(format!("send: {e}"));
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                seq += 1;
                credits -= 1;
            }
            if let Ok(mut t) = sent_total.lock() {
                t.1 = true;
            }
            error
        })
    };

    let mut result = PairResult::default();
    let mut received = first_seq;
    loop {
        let now = Instant::now();
        let (sent, sender_done) = sent_total.lock().map(|t| *t).unwrap_or((0, true));
        if (sender_done && received >= sent) || now >= grace || failed.load(Ordering::Relaxed) {
            break;
        }
        // Long-poll until a little past the deadline; after it, only drain.
        let wait = if now < deadline {
            (deadline - now + Duration::from_millis(50)).min(Duration::from_secs(5))
        } else {
            Duration::from_millis(500)
        };
        match rx.recv(wait) {
            Ok(Some(seq)) => {
                let at = Instant::now();
                let began = starts.lock().ok().and_then(|s| s[(seq as usize) % window]);
                let _ = credit_tx.send(());
                received += 1;
                if let Err(e) = rx.ack() {
                    result.error = Some(format!("ack: {e}"));
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                if Instant::now() <= deadline {
                    result.done += 1;
                    if let Some(b) = began {
                        result.latencies.push((at - b).as_secs_f64() * 1000.0);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                result.error = Some(format!("receive: {e}"));
                failed.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    drop(credit_tx);
    if let Ok(Some(e)) = sender.join() {
        result.error.get_or_insert(e);
    }
    (result, received)
}

/// How to make the two sides of pair `i` (fresh connections every run).
type PairFactory = dyn Fn(usize) -> io::Result<(Box<dyn SendSide>, Box<dyn RecvSide>)> + Sync;

struct RunFigures {
    rate: f64,
    p50: f64,
    p99: f64,
    server_cpu: f64,
    client_cpu: f64,
}

/// One run with `pairs` pairs; returns messages/s and latency percentiles.
fn run_once(
    pairs: usize,
    make: &PairFactory,
    seqs: &mut [u64],
    length: Duration,
    server_cpu: &dyn Fn() -> f64,
) -> io::Result<RunFigures> {
    let mut sides = Vec::with_capacity(pairs);
    for i in 0..pairs {
        sides.push(make(i)?);
    }
    let cpu0 = (server_cpu(), cpu_secs("self"));
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = sides
        .into_iter()
        .zip(seqs.iter().copied())
        .map(|((tx, rx), first)| {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let wait = start.saturating_duration_since(Instant::now());
                    thread::sleep(wait);
                    run_pair(tx, rx, WINDOW, start, length, first)
                })
        })
        .collect::<Result<_, _>>()?;
    let mut done = 0u64;
    let mut lat = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (r, next_seq) = h.join().map_err(|_| err("pair thread panicked"))?;
        if let Some(e) = r.error {
            return Err(err(format!("pair {i}: {e}")));
        }
        seqs[i] = next_seq;
        done += r.done;
        lat.extend(r.latencies);
    }
    let cpu1 = (server_cpu(), cpu_secs("self"));
    let lat = sorted(lat);
    let per = |d: f64| d * 1e6 / (done.max(1) as f64);
    Ok(RunFigures {
        rate: done as f64 / length.as_secs_f64(),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        server_cpu: per(cpu1.0 - cpu0.0),
        client_cpu: per(cpu1.1 - cpu0.1),
    })
}

/// Messages in flight per pair: the sender sends message n+1 once message n
/// has been delivered, so the recipient is (usually) parked in its long poll
/// when a message arrives.
const WINDOW: usize = 1;

struct Plan {
    runs: usize,
    length: Duration,
    warmup: Duration,
    levels: Vec<usize>,
}

struct Row {
    system: String,
    pairs: usize,
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    server_cpu: Vec<f64>,
    client_cpu: Vec<f64>,
    peak_mib: f64,
}

fn measure(
    system: &str,
    pairs: usize,
    plan: &Plan,
    make: &PairFactory,
    server_cpu: &dyn Fn() -> f64,
) -> io::Result<Row> {
    let mut seqs = vec![0u64; pairs];
    run_once(pairs, make, &mut seqs, plan.warmup, server_cpu)?;
    let mut row = Row {
        system: system.to_string(),
        pairs,
        rate: vec![],
        p50: vec![],
        p99: vec![],
        server_cpu: vec![],
        client_cpu: vec![],
        peak_mib: 0.0,
    };
    for r in 0..plan.runs {
        let f = run_once(pairs, make, &mut seqs, plan.length, server_cpu)?;
        progress(&format!(
            "{system}, {pairs} pairs, run {}: {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
            r + 1,
            f.rate,
            f.p50,
            f.p99
        ));
        row.rate.push(f.rate);
        row.p50.push(f.p50);
        row.p99.push(f.p99);
        row.server_cpu.push(f.server_cpu);
        row.client_cpu.push(f.client_cpu);
    }
    Ok(row)
}

/// Relay flags for benchmarks: one address (127.0.0.1) makes every queue
/// and holds every connection, which the defaults would (rightly) limit.
const BENCH_RELAY_FLAGS: &[&str] = &[
    "--max-connections-per-address",
    "100000",
    "--create-rate-per-connection",
    "1000000/1000000",
    "--create-rate-per-address",
    "1000000/1000000",
];

/// `--store URL` and `--nodes N`: the relay under test keeps its queues in
/// that PostgreSQL database, and with two nodes senders use the first and
/// recipients the second (every delivery crosses nodes through the
/// database's notifications).
static STORE: std::sync::OnceLock<(String, usize)> = std::sync::OnceLock::new();

fn tern_level(tern: &Path, base: &Path, pairs: usize, plan: &Plan) -> io::Result<Row> {
    let mut flags: Vec<&str> = BENCH_RELAY_FLAGS.to_vec();
    let (label, nodes) = match STORE.get() {
        None => ("tern relay".to_string(), 1),
        Some((url, nodes)) => {
            flags.extend(["--store", url.as_str()]);
            (
                format!(
                    "tern relay, PostgreSQL, {nodes} node{}",
                    if *nodes == 1 { "" } else { "s" }
                ),
                *nodes,
            )
        }
    };
    let relay = RelayProc::start(tern, base, &format!("relay-{pairs}"), &flags)?;
    let second = if nodes > 1 {
        Some(RelayProc::start(
            tern,
            base,
            &format!("relay-{pairs}-b"),
            &flags,
        )?)
    } else {
        None
    };
    let keys = Keys::generate();
    let queues = create_queues(relay.addr, relay.key, &keys, pairs, 8, true)?;
    let (addr, relay_key) = (relay.addr, relay.key);
    let recv_addr = second.as_ref().map_or(addr, |r| r.addr);
    let mut message = vec![0u8; QUEUE_MSG_LEN];
    OsRng.fill_bytes(&mut message);
    let make = move |i: usize| -> io::Result<(Box<dyn SendSide>, Box<dyn RecvSide>)> {
        let q = queues[i];
        Ok((
            Box::new(TernSender {
                conn: Session::connect(addr, &relay_key)?,
                keys: Arc::clone(&keys),
                queue: q,
                message: message.clone(),
            }),
            Box::new(TernRecipient::subscribe(
                Session::connect(recv_addr, &relay_key)?,
                Arc::clone(&keys),
                q,
            )?),
        ))
    };
    let pids: Vec<u32> = std::iter::once(relay.pid)
        .chain(second.as_ref().map(|r| r.pid))
        .collect();
    let mut row = measure(&label, pairs, plan, &make, &|| {
        pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
    })?;
    row.peak_mib = relay
        .hwm_mib()
        .max(second.as_ref().map_or(0.0, |r| r.hwm_mib()));
    relay.stop();
    if let Some(r) = second {
        r.stop();
    }
    Ok(row)
}

fn redis_level(bin: &Path, base: &Path, fsync: &str, pairs: usize, plan: &Plan) -> io::Result<Row> {
    let redis = RedisProc::start(bin, base, &format!("redis-{fsync}-{pairs}"), fsync)?;
    let addr = redis.addr;
    // 16 KiB values: the size of a queue message on the wire.
    let mut message = vec![0u8; 16 * 1024];
    OsRng.fill_bytes(&mut message);
    let make = move |i: usize| -> io::Result<(Box<dyn SendSide>, Box<dyn RecvSide>)> {
        let key = format!("queue:{i}").into_bytes();
        Ok((
            Box::new(RedisSender {
                conn: Redis::connect(addr)?,
                key: key.clone(),
                message: message.clone(),
            }),
            Box::new(RedisRecipient {
                conn: Redis::connect(addr)?,
                key,
            }),
        ))
    };
    let pid = redis.pid;
    let mut row = measure(&format!("Redis AOF {fsync}"), pairs, plan, &make, &|| {
        cpu_secs(&pid.to_string())
    })?;
    row.peak_mib = redis.hwm_mib();
    redis.stop();
    Ok(row)
}

fn throughput(
    tern: &Path,
    redis: Option<&Path>,
    quick: bool,
    levels: Option<Vec<usize>>,
) -> io::Result<()> {
    let mut plan = if quick {
        Plan {
            runs: 3,
            length: Duration::from_secs(1),
            warmup: Duration::from_millis(300),
            levels: vec![1, 16, 256],
        }
    } else {
        Plan {
            runs: 5,
            length: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            levels: vec![1, 16, 256],
        }
    };
    if let Some(l) = levels {
        plan.levels = l;
    }
    let base = tempfile::Builder::new().prefix("tern-bench-").tempdir()?;
    let (fsync_p50, fsync_p99) = fsync_probe(base.path())?;
    let mut rows: Vec<Row> = Vec::new();
    for &pairs in &plan.levels {
        progress(&format!("tern relay with {pairs} queue pairs"));
        rows.push(tern_level(tern, base.path(), pairs, &plan)?);
        if let Some(bin) = redis {
            for fsync in ["everysec", "always"] {
                progress(&format!("Redis (appendfsync {fsync}) with {pairs} pairs"));
                rows.push(redis_level(bin, base.path(), fsync, pairs, &plan)?);
            }
        }
    }

    println!("### Relay: end-to-end messages (send → deliver → ack)\n");
    println!(
        "Disk under the temporary directory: 16 KiB write + fdatasync p50 {fsync_p50:.2} ms, \
         p99 {fsync_p99:.2} ms (200 calls). The relay commits every SEND and ACK (synchronous=FULL, \
         group commit); Redis with appendfsync always fsyncs its AOF before answering.\n"
    );
    println!(
        "{} runs of {:.1} s per row (after a {:.1} s warm-up); figures are median (min–max) over runs. \
         Latency is SEND start → the message pushed to the subscribed recipient. \
         CPU is per delivered message, server process and client threads (this driver) apart.\n",
        plan.runs,
        plan.length.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );
    println!("| system | pairs | messages/s | p50 ms | p99 ms | server CPU µs/msg | client CPU µs/msg | server peak RSS (VmHWM) MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} |",
            r.system,
            r.pairs,
            spread(&r.rate, 0),
            spread(&r.p50, 2),
            spread(&r.p99, 2),
            median(&r.server_cpu),
            median(&r.client_cpu),
            r.peak_mib
        );
    }
    println!();
    if redis.is_none() {
        println!("Redis: skipped (redis-server not available).\n");
        return crypto_breakdown();
    }
    println!("| pairs | tern/Redis (everysec) | verdict | tern/Redis (always, like-for-like durability) | verdict |");
    println!("|---:|---:|---|---:|---|");
    let verdict = |x: f64| {
        if x >= 1.0 {
            "met (aim ≥ 1× met)"
        } else if x >= 0.5 {
            "met (≥ 0.5×)"
        } else {
            "**not met**"
        }
    };
    for &pairs in &plan.levels {
        let get = |sys: &str| {
            rows.iter()
                .find(|r| r.pairs == pairs && r.system == sys)
                .map(|r| median(&r.rate))
                .unwrap_or(f64::NAN)
        };
        // The tern row, whichever store it ran on ("tern relay",
        // "tern relay, PostgreSQL, 2 nodes").
        let t = rows
            .iter()
            .find(|r| r.pairs == pairs && r.system.starts_with("tern relay"))
            .map(|r| median(&r.rate))
            .unwrap_or(f64::NAN);
        let (e, a) = (get("Redis AOF everysec"), get("Redis AOF always"));
        println!(
            "| {pairs} | {:.2}× | {} | {:.2}× | {} |",
            t / e,
            verdict(t / e),
            t / a,
            verdict(t / a)
        );
    }
    println!();
    crypto_breakdown()
}

// ------------------------------------------------------------ fixed count

/// User and system CPU seconds of one thread (`/proc/PID/task/TID/stat`).
fn user_sys_secs(path: &str) -> (f64, f64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{path}/stat")) else {
        return (0.0, 0.0);
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// User and system CPU seconds per thread of process `pid`, summed by
/// thread name with any trailing worker number dropped ("relay-worker-3"
/// counts as "relay-worker"; the kernel keeps 15 bytes of a name).
fn thread_cpu_secs(pid: u32) -> Vec<(String, (f64, f64))> {
    let mut out: Vec<(String, (f64, f64))> = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let tid = e.file_name().to_string_lossy().to_string();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let name = stat
            .find('(')
            .zip(stat.rfind(')'))
            .map(|(a, b)| stat[a + 1..b].to_string())
            .unwrap_or_default();
        let name = name
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end_matches('-')
            .to_string();
        let (u, k) = user_sys_secs(&format!("{pid}/task/{tid}"));
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => {
                s.0 += u;
                s.1 += k;
            }
            None => out.push((name, (u, k))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Context switches (voluntary + involuntary) of all threads of `pid` so far.
fn context_switches(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        for l in s.lines() {
            if l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
            {
                n += l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    n
}

/// `bench_relay fixed --tern PATH [--pairs N] [--messages M]`: exactly M
/// messages through each of N pairs (per pair, one at a time: SEND and its
/// OK, the push to the subscribed recipient, its ACK), then one INFO per
/// recipient session so that every ACK has been handled. Prints the relay's
/// CPU per delivered message, per thread, for before/after comparisons and
/// for profiling: `--tern` may be a wrapper (valgrind, perf), and with
/// BENCH_FIXED_PAUSE=SECS the driver waits that long after printing the
/// relay's pid, before the timed part, so a profiler can attach.
fn fixed(tern: &Path, pairs: usize, messages: u64) -> io::Result<()> {
    let base = tempfile::Builder::new().prefix("tern-bench-").tempdir()?;
    let relay = RelayProc::start(tern, base.path(), "relay-fixed", BENCH_RELAY_FLAGS)?;
    let keys = Keys::generate();
    let queues = create_queues(relay.addr, relay.key, &keys, pairs, 8, true)?;
    let mut message = vec![0u8; QUEUE_MSG_LEN];
    OsRng.fill_bytes(&mut message);
    let mut sides = Vec::with_capacity(pairs);
    for q in &queues {
        let tx = TernSender {
            conn: Session::connect(relay.addr, &relay.key)?,
            keys: Arc::clone(&keys),
            queue: *q,
            message: message.clone(),
        };
        let rx = TernRecipient::subscribe(
            Session::connect(relay.addr, &relay.key)?,
            Arc::clone(&keys),
            *q,
        )?;
        sides.push((tx, rx));
    }
    progress(&format!("relay pid {} ready", relay.pid));
    if let Some(secs) = std::env::var("BENCH_FIXED_PAUSE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        thread::sleep(Duration::from_secs(secs.min(60)));
    }
    let before = thread_cpu_secs(relay.pid);
    let switches = context_switches(relay.pid);
    let client0 = cpu_secs("self");
    let t0 = Instant::now();
    let handles: Vec<_> = sides
        .into_iter()
        .map(|(mut tx, mut rx)| {
            thread::spawn(move || -> io::Result<()> {
                for seq in 0..messages {
                    tx.send(seq)?;
                    match rx.recv(Duration::from_secs(60))? {
                        Some(s) if s == seq => {}
                        other => return Err(err(format!("pushed {other:?}, not {seq}"))),
                    }
                    rx.ack()?;
                }
                match rx.conn.call(&Command::Info, None)? {
                    Reply::Info(_) => Ok(()),
                    other => Err(err(format!("INFO answered {other:?}"))),
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| err("pair thread panicked"))??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let client = cpu_secs("self") - client0;
    let after = thread_cpu_secs(relay.pid);
    let switches = context_switches(relay.pid) - switches;
    let n = (pairs as u64 * messages) as f64;
    let mut total = 0.0;
    println!(
        "{pairs} pairs × {messages} messages in {wall:.2} s ({:.0} msg/s); relay CPU per message by thread:",
        n / wall
    );
    for (name, (user, sys)) in &after {
        let (u0, k0) = before
            .iter()
            .find(|(b, _)| b == name)
            .map_or((0.0, 0.0), |(_, s)| *s);
        let (u, k) = (user - u0, sys - k0);
        total += u + k;
        println!(
            "  {name}: {:.0} µs (user {:.0}, system {:.0})",
            (u + k) * 1e6 / n,
            u * 1e6 / n,
            k * 1e6 / n
        );
    }
    println!(
        "  relay total: {:.0} µs; driver (client threads): {:.0} µs; relay context switches per message: {:.1}",
        total * 1e6 / n,
        client * 1e6 / n,
        switches as f64 / n
    );
    relay.stop();
    Ok(())
}

// ----------------------------------------------------------------- probes

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`),
/// so that time spent waiting for the CPU on a busy machine is not counted.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Mean µs of CPU per call of `f` over `n` calls (after a few warm-up
/// calls); wall-clock time where the kernel does not tell CPU time.
fn micros(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let cpu = thread_cpu_ns();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    match (cpu, thread_cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e3 / n as f64,
        _ => t.elapsed().as_secs_f64() * 1e6 / n as f64,
    }
}

/// The relay's cryptographic work for one message, timed in this process on
/// one core: what a SEND, the push of the message and its ACK cost the relay
/// before any database or network work, and what a session costs to set up.
fn crypto_breakdown() -> io::Result<()> {
    let relay_secret = StaticSecret::random_from_rng(OsRng);
    let relay_key = PublicKey::from(&relay_secret).to_bytes();
    let info = tern_wire::RelayInfo {
        min_version: 2,
        max_version: 2,
        open: true,
        max_pending: 1000,
        ttl_secs: 3600,
        max_window: 64,
        max_subscriptions: 4096,
        unsecured_ttl_secs: 86_400,
    };
    let keys = Keys::generate();
    let mut message = vec![0u8; QUEUE_MSG_LEN];
    OsRng.fill_bytes(&mut message);
    let (hs, msg1) =
        ClientHandshake::start(&relay_key, &mut OsRng).map_err(|e| err(e.to_string()))?;
    let (mut relay_side, msg2, _) =
        ServerHandshake::respond(&relay_secret.to_bytes(), &msg1, &info, &mut OsRng)
            .map_err(|e| err(e.to_string()))?;
    let (mut client_side, _) = hs.finish(&msg2).map_err(|e| err(e.to_string()))?;
    let hash = *client_side.hash();
    let frame_of = |cmd: &Command, key: Option<&SigningKey>| {
        let mut rec = Vec::new();
        Request::encode(1, cmd, &hash, key, &mut rec);
        let mut f = FrameBuilder::new();
        f.push(&rec);
        f.finish().remove(0)
    };
    let send_frame = frame_of(
        &Command::Send {
            sender_id: [7; 16],
            message: message.clone(),
        },
        Some(&keys.sender),
    );
    let ack_frame = frame_of(
        &Command::Ack {
            recipient_id: [8; 16],
            msg_id: [9; 16],
        },
        Some(&keys.recipient),
    );
    let sent = client_side
        .seal(&send_frame)
        .map_err(|e| err(e.to_string()))?;
    let req = parse_commands(&send_frame)
        .map_err(|e| err(e.to_string()))?
        .remove(0);
    let sender_pk = keys.sender.verifying_key().to_bytes();
    let delivered = delivery_seal(&[9; 32], &[1; 16], &message);
    let push_frame = {
        let mut rec = Vec::new();
        Reply::Message {
            msg_id: [1; 16],
            received_at: 0,
            body: delivered.clone(),
        }
        .encode(1, &mut rec);
        let mut f = FrameBuilder::new();
        f.push(&rec);
        f.finish().remove(0)
    };
    let ok_frame = {
        let mut rec = Vec::new();
        Reply::Ok.encode(1, &mut rec);
        let mut f = FrameBuilder::new();
        f.push(&rec);
        f.finish().remove(0)
    };
    let n = 2_000;
    // Transport messages carry counter nonces: open each in a fresh copy
    // of the stream by sealing as many as are opened.
    let mut sealed_sends: Vec<Vec<u8>> = (0..n * 2)
        .map(|_| client_side.seal(&send_frame).unwrap_or_default())
        .collect();
    let _ = sent;
    sealed_sends.reverse();
    let open_send = micros(n, || {
        let m = sealed_sends.pop().unwrap_or_default();
        let _ = relay_side.open(&m);
    });
    let decode = micros(n, || {
        let _ = parse_commands(&send_frame);
    });
    let verify = micros(n, || {
        assert!(req.verify(&hash, &sender_pk));
    });
    let deliver = micros(n, || {
        let _ = delivery_seal(&[9; 32], &[1; 16], &message);
    });
    let seal_push = micros(n, || {
        let _ = relay_side.seal(&push_frame);
    });
    let seal_ok = micros(n, || {
        let _ = relay_side.seal(&ok_frame);
    });
    let mut sealed_acks: Vec<Vec<u8>> = (0..n * 2)
        .map(|_| client_side.seal(&ack_frame).unwrap_or_default())
        .collect();
    sealed_acks.reverse();
    let open_ack = micros(n, || {
        let m = sealed_acks.pop().unwrap_or_default();
        let _ = relay_side.open(&m);
    });
    let relay_handshake = micros(200, || {
        let (_, m1) = ClientHandshake::start(&relay_key, &mut OsRng).expect("start");
        let _ = ServerHandshake::respond(&relay_secret.to_bytes(), &m1, &info, &mut OsRng);
    }) - micros(200, || {
        let _ = ClientHandshake::start(&relay_key, &mut OsRng);
    });
    let client_handshake = micros(200, || {
        let (c, m1) = ClientHandshake::start(&relay_key, &mut OsRng).expect("start");
        let (_, m2, _) = ServerHandshake::respond(&relay_secret.to_bytes(), &m1, &info, &mut OsRng)
            .expect("respond");
        let _ = c.finish(&m2);
    }) - relay_handshake;
    let client_sign = micros(n, || {
        let _ = frame_of(
            &Command::Send {
                sender_id: [7; 16],
                message: message.clone(),
            },
            Some(&keys.sender),
        );
    });
    let per_message =
        open_send + decode + verify + seal_ok + deliver + seal_push + open_ack + verify + seal_ok;
    println!("### Where a relay's CPU goes: cryptography per message\n");
    println!(
        "Timed in one thread of the driver after the runs: µs of CPU per call (the thread's on-CPU \
         time from /proc/thread-self/schedstat, mean of 2,000 calls). One delivered message costs the \
         relay a SEND frame opened, decoded, its signature checked and answered (a 1 KiB frame), the \
         delivery seal of the 16,000-byte message, the push of it sealed in a frame, and an ACK opened, \
         checked and answered. A session costs one handshake, once per connection.\n"
    );
    println!("| step | µs |");
    println!("|---|---:|");
    println!("| open a SEND frame (ChaCha20-Poly1305, 17 KiB) | {open_send:.1} |");
    println!("| decode the frame's records | {decode:.1} |");
    println!("| Ed25519 verify_strict | {verify:.1} |");
    println!("| seal a 1 KiB answer frame | {seal_ok:.1} |");
    println!("| delivery seal of the message (HKDF + ChaCha20-Poly1305) | {deliver:.1} |");
    println!("| seal the push frame (17 KiB) | {seal_push:.1} |");
    println!("| open an ACK frame (1 KiB) | {open_ack:.1} |");
    println!(
        "| **relay crypto per delivered message** (SEND + push + ACK, two signatures) | **{per_message:.0}** |"
    );
    println!("| relay: one session handshake (X25519 ×2, ML-KEM-768 encapsulation) | {relay_handshake:.0} |");
    println!("| client: one session handshake (key generation, X25519 ×2, decapsulation) | {client_handshake:.0} |");
    println!("| client: encode and sign one SEND (for comparison) | {client_sign:.1} |");
    println!();
    Ok(())
}

/// 16 KiB write + fdatasync latency in `dir`: what one commit costs at least.
fn fsync_probe(dir: &Path) -> io::Result<(f64, f64)> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = vec![0x5au8; 16 * 1024];
    let mut out = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let out = sorted(out);
    Ok((percentile(&out, 50.0), percentile(&out, 99.0)))
}

// ------------------------------------------------------------------ scale

/// Sequential SENDs from one client, round-robin over `queues`; returns
/// latencies in ms.
fn send_latency(
    relay: &RelayProc,
    keys: &Keys,
    queues: &[Queue],
    n: usize,
) -> io::Result<Vec<f64>> {
    let mut conn = Session::connect(relay.addr, &relay.key)?;
    let mut message = vec![0u8; QUEUE_MSG_LEN];
    OsRng.fill_bytes(&mut message);
    let mut out = Vec::with_capacity(n);
    let end = Instant::now() + Duration::from_secs(60);
    for i in 0..n {
        if Instant::now() > end {
            break;
        }
        let q = &queues[i % queues.len()];
        let cmd = Command::Send {
            sender_id: q.sender_id,
            message: message.clone(),
        };
        let t = Instant::now();
        match conn.call(&cmd, Some(&keys.sender))? {
            Reply::Ok => {}
            other => return Err(err(format!("SEND answered {other:?}"))),
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(sorted(out))
}

/// Sequential INFO commands on a fresh session; latencies in ms.
fn info_latency(relay: &RelayProc, n: usize) -> io::Result<Vec<f64>> {
    let mut conn = Session::connect(relay.addr, &relay.key)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        match conn.call(&Command::Info, None)? {
            Reply::Info(_) => {}
            other => return Err(err(format!("INFO answered {other:?}"))),
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(sorted(out))
}

/// Empties the queues `send_latency` filled (so their pages are reused).
fn drain(relay: &RelayProc, keys: &Keys, queues: &[Queue]) -> io::Result<()> {
    let mut conn = Session::connect(relay.addr, &relay.key)?;
    for q in queues {
        for _ in 0..10_000 {
            let check = Command::Check {
                recipient_id: q.recipient_id,
            };
            if conn.call(&check, None)? == Reply::Count(0) {
                break;
            }
            // Each look at the head: a fresh subscription, ACK_UPTO the run.
            let sub = Command::Subscribe {
                recipient_id: q.recipient_id,
                window: 64,
            };
            let tag = conn.submit(&[(&sub, Some(&keys.recipient))])?[0];
            let mut last = None;
            let mut got = 0;
            loop {
                match conn.wait_for(tag)? {
                    Reply::Ok => {}
                    Reply::Message { msg_id, .. } => {
                        last = Some(msg_id);
                        got += 1;
                        // A full window: no IDLE comes before the ACK.
                        if got == 64 {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let unsub = Command::Unsubscribe { sub_tag: tag };
            conn.call(&unsub, None)?;
            if let Some(msg_id) = last {
                let ack = Command::AckUpTo {
                    recipient_id: q.recipient_id,
                    msg_id,
                };
                conn.call(&ack, Some(&keys.recipient))?;
            }
        }
    }
    Ok(())
}

fn pct(v: &[f64]) -> String {
    format!("{:.2} / {:.2}", percentile(v, 50.0), percentile(v, 99.0))
}

struct WaiterFigures {
    waiters: usize,
    parked_in: f64,
    fds: usize,
    threads: u64,
    rss_mib: f64,
    info: Vec<f64>,
    send: Vec<f64>,
    answered: usize,
    refused: usize,
}

/// Holds `n` idle subscribed sessions (one connection each, distinct
/// queues), then measures the relay and serves other clients while they
/// wait; at the end each session must still answer.
fn park_waiters(
    relay: &RelayProc,
    keys: &Arc<Keys>,
    queues: &[Queue],
    secured: &[Queue],
    n: usize,
) -> io::Result<WaiterFigures> {
    let n = n.min(queues.len());
    let threads = 4;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let mine: Vec<Queue> = queues[..n]
                .iter()
                .skip(t)
                .step_by(threads)
                .copied()
                .collect();
            let (addr, key, keys) = (relay.addr, relay.key, Arc::clone(keys));
            thread::spawn(move || -> io::Result<Vec<Session>> {
                let mut out = Vec::with_capacity(mine.len());
                for q in mine {
                    let mut conn = Session::connect(addr, &key)?;
                    let cmd = Command::Subscribe {
                        recipient_id: q.recipient_id,
                        window: 64,
                    };
                    let tag = conn.submit(&[(&cmd, Some(&keys.recipient))])?[0];
                    // OK (or an error for an unsecured queue, which the
                    // relay subscribes all the same).
                    conn.wait_for(tag)?;
                    out.push(conn);
                }
                Ok(out)
            })
        })
        .collect();
    let mut waiting = Vec::with_capacity(n);
    for h in handles {
        waiting.extend(h.join().map_err(|_| err("waiter thread panicked"))??);
    }
    let parked_in = t0.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(1500));
    let fds = open_fds(relay.pid);
    let threads_now = relay.threads();
    let rss = relay.rss_mib();
    let info = info_latency(relay, 200)?;
    let send = send_latency(relay, keys, secured, 200)?;
    // Every session is still there and answers.
    let mut answered = 0;
    let mut refused = 0;
    for mut conn in waiting {
        match conn.call(&Command::Info, None) {
            Ok(Reply::Info(_)) => answered += 1,
            _ => refused += 1,
        }
    }
    Ok(WaiterFigures {
        waiters: n,
        parked_in,
        fds,
        threads: threads_now,
        rss_mib: rss,
        info,
        send,
        answered,
        refused,
    })
}

fn scale(tern: &Path, quick: bool) -> io::Result<()> {
    let (small, large) = if quick {
        (1_000, 10_000)
    } else {
        (1_000, 100_000)
    };
    let waiter_levels: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    let fd_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_default();
    let base = tempfile::Builder::new().prefix("tern-bench-").tempdir()?;
    let relay = RelayProc::start(tern, base.path(), "relay-scale", BENCH_RELAY_FLAGS)?;
    let keys = Keys::generate();
    let rss_empty = relay.rss_mib();
    let disk_empty = relay.db_bytes();

    // Queues to send to are secured (100 among the first 1,000, 100 among
    // the last); the others are created only, as most queues on a relay
    // are idle, and carry the long-poll waiters below.
    progress(&format!("creating {small} queues"));
    let mut plain = create_queues(relay.addr, relay.key, &keys, small - 100, 16, false)?;
    let probe_small = create_queues(relay.addr, relay.key, &keys, 100, 4, true)?;
    let rss_small = relay.rss_mib();
    let disk_small = relay.db_bytes();
    let lat_small = send_latency(&relay, &keys, &probe_small, 500)?;
    drain(&relay, &keys, &probe_small)?;

    progress(&format!("creating {} more queues", large - small));
    let t = Instant::now();
    let more = create_queues(relay.addr, relay.key, &keys, large - small - 100, 16, false)?;
    let create_rate = more.len() as f64 / t.elapsed().as_secs_f64();
    plain.extend(more);
    let probe_large = create_queues(relay.addr, relay.key, &keys, 100, 4, true)?;
    let rss_large = relay.rss_mib();
    let disk_large = relay.db_bytes();
    let lat_large = send_latency(&relay, &keys, &probe_large, 500)?;
    drain(&relay, &keys, &probe_large)?;
    let mut probes = probe_small;
    probes.extend_from_slice(&probe_large);

    let per_q = |a: f64, b: f64| (b - a) / (large - small) as f64;
    println!("### Scale: {large} queues\n");
    println!(
        "One relay; {small} queues created, then grown to {large} with CREATE requests from 16 connections \
         ({create_rate:.0} CREATE/s). SEND latency: 500 sequential 16 KiB SENDs from one session, \
         round-robin over 100 secured queues. Memory is the relay's VmRSS; disk is relay.db + -wal + -shm.\n"
    );
    println!("| queues | relay RSS MiB | disk MiB | SEND p50 / p99 ms |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| 0 | {rss_empty:.1} | {:.2} | – |",
        disk_empty as f64 / 1048576.0
    );
    println!(
        "| {small} | {rss_small:.1} | {:.2} | {} |",
        disk_small as f64 / 1048576.0,
        pct(&lat_small)
    );
    println!(
        "| {large} | {rss_large:.1} | {:.2} | {} |",
        disk_large as f64 / 1048576.0,
        pct(&lat_large)
    );
    println!();
    println!(
        "Per queue ({small} → {large}): memory {:.0} bytes, disk {:.0} bytes (live files). \
         SEND p50 at {large} queues is {:.2}× that at {small}.\n",
        per_q(rss_small, rss_large) * 1048576.0,
        per_q(disk_small as f64, disk_large as f64),
        percentile(&lat_large, 50.0) / percentile(&lat_small, 50.0)
    );

    let before = (
        open_fds(relay.pid),
        relay.threads(),
        relay.rss_mib(),
        info_latency(&relay, 200)?,
        send_latency(&relay, &keys, &probes, 200)?,
    );
    let mut figures = Vec::new();
    for &n in waiter_levels {
        progress(&format!("holding {n} idle subscribed sessions"));
        figures.push(park_waiters(&relay, &keys, &plain, &probes, n)?);
    }
    let info_idle = info_latency(&relay, 200)?;
    let send_idle = send_latency(&relay, &keys, &probes, 200)?;
    drain(&relay, &keys, &probes)?;

    println!("### Scale: idle subscribed sessions\n");
    println!(
        "Each is its own connection (WebSocket, session handshake) holding a subscription to its own queue \
         (relay with {large} queues, open-file limit {fd_limit}). While they wait, another client sends 200 INFO \
         and then 200 SEND commands one after another. \"answered\" counts sessions that still answer an \
         INFO at the end; \"refused\" any that got an error or a closed connection.\n"
    );
    println!("| sessions | time to open s | relay fds | relay threads | relay RSS MiB | INFO p50 / p99 ms | SEND p50 / p99 ms | answered | refused |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| 0 (before) | – | {} | {} | {:.1} | {} | {} | – | – |",
        before.0,
        before.1,
        before.2,
        pct(&before.3),
        pct(&before.4)
    );
    for f in &figures {
        println!(
            "| {} | {:.1} | {} | {} | {:.1} | {} | {} | {} | {} |",
            f.waiters,
            f.parked_in,
            f.fds,
            f.threads,
            f.rss_mib,
            pct(&f.info),
            pct(&f.send),
            f.answered,
            f.refused
        );
    }
    println!(
        "| 0 (after) | – | {} | {} | {:.1} | {} | {} | – | – |",
        open_fds(relay.pid),
        relay.threads(),
        relay.rss_mib(),
        pct(&info_idle),
        pct(&send_idle)
    );
    println!();
    let peak = relay.hwm_mib();
    let data = relay.data.clone();
    relay.stop();
    let disk_after = dir_bytes(&data, &["relay.db", "relay.db-wal", "relay.db-shm"]);
    println!(
        "Relay peak RSS over the whole scale run: {peak:.1} MiB; database after a clean stop \
         (WAL checkpointed): {:.2} MiB for {large} queues = {:.0} bytes per queue.\n",
        disk_after as f64 / 1048576.0,
        disk_after as f64 / large as f64
    );
    Ok(())
}

// ------------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut tern = None;
    let mut redis = None;
    let mut quick = false;
    let mut what = None;
    let mut levels = None;
    let mut store = None;
    let mut nodes = 1;
    let mut messages = 500;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tern" => tern = it.next().map(PathBuf::from),
            "--redis-server" => redis = it.next().map(PathBuf::from),
            "--quick" => quick = true,
            // Only these numbers of queue pairs (comma-separated), e.g. for profiling.
            "--pairs" => {
                levels = it
                    .next()
                    .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            }
            "--store" => store = it.next().cloned(),
            // `fixed`: messages per pair.
            "--messages" => messages = it.next().and_then(|n| n.parse().ok()).unwrap_or(500),
            "--nodes" => nodes = it.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            "throughput" | "scale" | "crypto" | "fixed" => what = Some(a.clone()),
            other => {
                eprintln!("bench_relay: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    if let Some(url) = store {
        if !(1..=2).contains(&nodes) {
            eprintln!("bench_relay: --nodes takes 1 or 2");
            std::process::exit(2);
        }
        let _ = STORE.set((url, nodes));
    }
    if what.as_deref() == Some("crypto") {
        tern.get_or_insert_with(PathBuf::new);
    }
    let (Some(tern), Some(what)) = (tern, what) else {
        eprintln!(
            "usage: bench_relay throughput|scale --tern PATH [--redis-server PATH] [--quick] [--pairs N,N] [--store POSTGRES_URL [--nodes 2]]\n       bench_relay fixed --tern PATH [--pairs N] [--messages M]\n       bench_relay crypto"
        );
        std::process::exit(2);
    };
    let result = match what.as_str() {
        "throughput" => throughput(&tern, redis.as_deref(), quick, levels),
        "crypto" => crypto_breakdown(),
        "fixed" => fixed(
            &tern,
            levels.and_then(|l| l.first().copied()).unwrap_or(16),
            messages,
        ),
        _ => scale(&tern, quick),
    };
    if let Err(e) = result {
        eprintln!("bench_relay: {what} failed: {e}");
        std::process::exit(1);
    }
}
