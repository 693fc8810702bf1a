//! Shared pieces of the adversarial tests (`tests/adversary_*.rs`): a relay
//! that runs in the test process with programmable misbehaviour
//! ([`tern_relay::hooks`]), a "black hole" that accepts TCP connections and
//! never answers, forging helpers, and profiles on in-process relays.
//!
//! Each test file declares `mod cli_common; mod adversary_common;` and drives
//! the real `tern` binary through `cli_common`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde_json::Value;
use tempfile::TempDir;
use tern_relay::hooks::{
    DeliverAction, DeliverView, RelayHooks, RequestView, ResponseAction, ResponseView, SendAction,
    SendView,
};
use tern_relay::{RelayError, ServeConfig, Server, ShutdownHandle};
use tern_wire::{Id, QUEUE_MSG_LEN};

use crate::cli_common::*;

// ---------------------------------------------------------------------------
// A programmable evil relay

pub type SendFn = Box<dyn FnMut(&SendView<'_>) -> SendAction + Send>;
pub type DeliverFn = Box<dyn FnMut(&DeliverView<'_>) -> DeliverAction + Send>;
pub type ResponseFn = Box<dyn FnMut(&ResponseView<'_>) -> ResponseAction + Send>;

/// An upload the relay saw (before any hook changed it).
#[derive(Clone, Debug)]
pub struct Sent {
    pub queue: i64,
    pub sender_id: Id,
    pub signed: bool,
    pub message: Vec<u8>,
}

/// A stored message the relay was about to push (before any hook).
#[derive(Clone, Debug)]
pub struct Delivered {
    pub queue: i64,
    pub msg_id: Id,
    pub delivered: Vec<u8>,
    pub message: Option<Vec<u8>>,
}

/// A session message as received, and its frame plaintext when it opened.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub message: Vec<u8>,
    pub frame: Option<Vec<u8>>,
    pub commands: Vec<&'static str>,
}

/// The relay's behaviour: records what it sees; misbehaves through the
/// closures installed with [`Evil::on_send`], [`Evil::on_deliver`] and
/// [`Evil::on_response`] (none: honest).
#[derive(Default)]
pub struct Evil {
    /// Also keep every request body and plaintext (memory: 32 KiB each).
    pub record_requests: AtomicBool,
    requests: Mutex<Vec<Recorded>>,
    sent: Mutex<Vec<Sent>>,
    delivered: Mutex<Vec<Delivered>>,
    send: Mutex<Option<SendFn>>,
    deliver: Mutex<Option<DeliverFn>>,
    response: Mutex<Option<ResponseFn>>,
}

impl Evil {
    pub fn on_send(&self, f: impl FnMut(&SendView<'_>) -> SendAction + Send + 'static) {
        *self.send.lock().unwrap() = Some(Box::new(f));
    }

    pub fn on_deliver(&self, f: impl FnMut(&DeliverView<'_>) -> DeliverAction + Send + 'static) {
        *self.deliver.lock().unwrap() = Some(Box::new(f));
    }

    pub fn on_response(&self, f: impl FnMut(&ResponseView<'_>) -> ResponseAction + Send + 'static) {
        *self.response.lock().unwrap() = Some(Box::new(f));
    }

    /// Back to honest behaviour (recording continues).
    pub fn honest(&self) {
        *self.send.lock().unwrap() = None;
        *self.deliver.lock().unwrap() = None;
        *self.response.lock().unwrap() = None;
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    pub fn sent_count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.delivered.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl RelayHooks for Evil {
    fn on_request(&self, r: &RequestView<'_>) {
        if self.record_requests.load(Ordering::SeqCst) {
            self.requests.lock().unwrap().push(Recorded {
                message: r.message.to_vec(),
                frame: r.frame.map(<[u8]>::to_vec),
                commands: r.commands.clone(),
            });
        }
    }

    fn on_send(&self, s: &SendView<'_>) -> SendAction {
        self.sent.lock().unwrap().push(Sent {
            queue: s.queue,
            sender_id: *s.sender_id,
            signed: s.signed,
            message: s.message.to_vec(),
        });
        match self.send.lock().unwrap().as_mut() {
            Some(f) => f(s),
            None => SendAction::Store,
        }
    }

    fn on_deliver(&self, d: &DeliverView<'_>) -> DeliverAction {
        self.delivered.lock().unwrap().push(Delivered {
            queue: d.queue,
            msg_id: *d.msg_id,
            delivered: d.delivered.to_vec(),
            message: d.message.map(<[u8]>::to_vec),
        });
        match self.deliver.lock().unwrap().as_mut() {
            Some(f) => f(d),
            None => DeliverAction::Pass,
        }
    }

    fn on_response(&self, r: &ResponseView<'_>) -> ResponseAction {
        match self.response.lock().unwrap().as_mut() {
            Some(f) => f(r),
            None => ResponseAction::Pass,
        }
    }
}

/// A relay in this process, with an [`Evil`] attached.
pub struct EvilRelay {
    /// `tern://KEY@127.0.0.1:PORT`.
    pub addr: String,
    pub port: u16,
    pub evil: Arc<Evil>,
    data: PathBuf,
    _data_dir: Option<TempDir>,
    handle: Option<ShutdownHandle>,
    thread: Option<JoinHandle<Result<(), RelayError>>>,
    tweak: fn(&mut ServeConfig),
}

fn no_tweak(_: &mut ServeConfig) {}

impl EvilRelay {
    pub fn start() -> EvilRelay {
        let dir = tempfile::Builder::new()
            .prefix("tern-evil-")
            .tempdir()
            .unwrap();
        let data = dir.path().to_path_buf();
        let mut r = EvilRelay::start_in(&data, no_tweak);
        r._data_dir = Some(dir);
        r
    }

    /// A relay whose data lives in `data` (kept by the caller).
    pub fn start_in(data: &Path, tweak: fn(&mut ServeConfig)) -> EvilRelay {
        let evil = Arc::new(Evil::default());
        let mut r = EvilRelay {
            addr: String::new(),
            port: 0,
            evil,
            data: data.to_path_buf(),
            _data_dir: None,
            handle: None,
            thread: None,
            tweak,
        };
        r.run_on("127.0.0.1:0".parse().unwrap());
        r
    }

    fn run_on(&mut self, listen: SocketAddr) {
        let mut cfg = ServeConfig::new(listen, &self.data);
        cfg.workers = 16;
        cfg.shutdown_timeout = Duration::from_secs(1);
        cfg.hooks = Some(self.evil.clone() as Arc<dyn RelayHooks>);
        (self.tweak)(&mut cfg);
        // A just-released port can be busy for a moment.
        let mut last = None;
        for _ in 0..50 {
            match Server::bind(cfg.clone()) {
                Ok(server) => {
                    let addr = server.address().to_string();
                    if !self.addr.is_empty() {
                        assert_eq!(addr, self.addr, "a restarted relay keeps its address");
                    }
                    self.addr = addr;
                    self.port = server.local_addr().port();
                    self.handle = Some(server.shutdown_handle());
                    self.thread = Some(std::thread::spawn(move || server.run()));
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("could not start the in-process relay: {last:?}");
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Graceful shutdown (waits for in-flight requests, a second at most).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Starts again on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        self.run_on(SocketAddr::from(([127, 0, 0, 1], self.port)));
    }

    /// Replaces the relay by a black hole on the same port: TCP connections
    /// are accepted and never answered.
    pub fn become_black_hole(&mut self) -> BlackHole {
        self.stop();
        BlackHole::bind(self.port)
    }

    /// Shuts down without waiting (for a relay whose hooks sleep).
    pub fn abandon(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        self.thread.take();
    }
}

impl Drop for EvilRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts TCP connections on a port and never answers; holds them open.
pub struct BlackHole {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BlackHole {
    pub fn bind(port: u16) -> BlackHole {
        let mut listener = None;
        for _ in 0..50 {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let listener = listener.expect("binding the black hole");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        BlackHole {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Profiles on arbitrary relay addresses

/// `tern init` on the given relay addresses (in-process or child relays).
pub fn profile(display: &str, relays: &[&str]) -> Profile {
    let p = Profile::empty(display);
    let mut args = vec!["init", "--name", display, "--no-passphrase"];
    for r in relays {
        args.push("--relay");
        args.push(r);
    }
    p.ok(&args);
    p
}

// ---------------------------------------------------------------------------
// Forging

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// Ratchet message length (PROTOCOL.md §6.3).
pub const RATCHET_MSG_LEN: usize = tern::proto::queue_msg::RATCHET_MSG_LEN;

/// A well-framed queue message of type 0x02 full of random ciphertext.
pub fn forged_message() -> Vec<u8> {
    let mut m = vec![0u8; QUEUE_MSG_LEN];
    m[0] = 0x02;
    rand::thread_rng().fill_bytes(&mut m[1..1 + 24 + RATCHET_MSG_LEN + 16]);
    m
}

/// A well-framed connection request (type 0x01) with random keys and body.
pub fn forged_request() -> Vec<u8> {
    let mut m = vec![0u8; QUEUE_MSG_LEN];
    m[0] = 0x01;
    rand::thread_rng().fill_bytes(&mut m[1..1 + 64 + RATCHET_MSG_LEN]);
    m
}

/// `msg` with byte `i` xor-ed with `mask` (non-zero).
pub fn flipped(msg: &[u8], i: usize, mask: u8) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[i] ^= mask;
    m
}

pub fn fresh_id() -> Id {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id
}

// ---------------------------------------------------------------------------
// Looking at output

/// `(text, order)` of every message event.
pub fn messages(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["text"].as_str().unwrap().to_string(),
                e["order"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `recv --json` that must exit 0: (events, stderr).
#[track_caller]
pub fn recv_json(p: &Profile) -> (Vec<Value>, String) {
    let o = p.run(&["recv", "--json"]);
    assert_code(&o, 0, &format!("{}: recv --json", p.display));
    (json_lines(&stdout(&o)), stderr(&o))
}

/// The whole local history with a contact (`tern log` shows only the
/// latest 50 by default).
#[track_caller]
pub fn full_log(p: &Profile, contact: &str) -> Vec<Value> {
    json_lines(&p.ok(&["log", contact, "--json", "--limit", "1000000"]))
}

/// Texts of the incoming messages in the contact's local history.
#[track_caller]
pub fn inbox(p: &Profile, contact: &str) -> Vec<String> {
    full_log(p, contact)
        .iter()
        .filter(|e| e["direction"] == "in")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that no text in `forbidden` was ever printed or stored as a
/// message by `p` (in any contact's log).
#[track_caller]
pub fn assert_never_shown(p: &Profile, forbidden: &[&str]) {
    let snap = p.snapshot();
    for f in forbidden {
        assert!(
            !snap.contains(f),
            "{}: a forged text {f:?} reached the history:\n{snap}",
            p.display
        );
    }
}

/// Milliseconds since the epoch (for seeds).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A small deterministic PRNG (xorshift64*), so a failing random run can be
/// replayed from its printed seed.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `ADVERSARY_SEED` if set, else from the clock; prints it.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("ADVERSARY_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(now_ms);
        eprintln!("{what}: ADVERSARY_SEED={seed}");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
