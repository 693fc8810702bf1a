//! A minimal relay client for the integration tests: std sockets, HTTP/1.1 by
//! hand, and the wire layer's own sealing. Deliberately independent of the
//! server code it tests.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_relay::seal::{self, RequestSealer, ResponseKey, BLOCK_LEN};
use tern_relay::wire::{Command, Id, Reply, Request, Response, QUEUE_MSG_LEN};
use tern_relay::{RelayAddress, RelayError, ServeConfig, Server, ShutdownHandle};
use x25519_dalek::{PublicKey, StaticSecret};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
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

    pub fn send_post(&mut self, body: &[u8]) -> io::Result<()> {
        let mut req = format!(
            "POST /v1 HTTP/1.1\r\nHost: relay\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.write_raw(&req)
    }

    pub fn post(&mut self, body: &[u8]) -> HttpResponse {
        self.send_post(body).expect("write request");
        self.read_response().expect("read response")
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

/// Seals `cmd` at `time_ms`, signed by `key`.
pub fn seal_request(
    relay_key: &[u8; 32],
    cmd: &Command,
    key: Option<&SigningKey>,
    time_ms: u64,
) -> (Vec<u8>, ResponseKey) {
    let sealer = RequestSealer::new(relay_key, &mut OsRng).unwrap();
    let pt = Request::encode(cmd, time_ms, sealer.enc(), key);
    sealer.seal(&pt).unwrap()
}

pub fn open_response(key: &ResponseKey, block: &[u8]) -> Response {
    assert_eq!(block.len(), BLOCK_LEN);
    Response::decode(&key.open_response(block).expect("response opens")).expect("response decodes")
}

/// A relay client on one keep-alive connection.
pub struct Client {
    pub conn: Conn,
    pub relay_key: [u8; 32],
}

impl Client {
    pub fn new(addr: SocketAddr, relay_key: [u8; 32]) -> Client {
        Client {
            conn: Conn::connect(addr),
            relay_key,
        }
    }

    pub fn request_at(
        &mut self,
        cmd: &Command,
        key: Option<&SigningKey>,
        time_ms: u64,
    ) -> Response {
        let (block, rkey) = seal_request(&self.relay_key, cmd, key, time_ms);
        let resp = self.conn.post(&block);
        assert_eq!(resp.status, 200, "HTTP status");
        assert_eq!(
            resp.header("content-type"),
            Some("application/octet-stream")
        );
        open_response(&rkey, &resp.body)
    }

    pub fn request(&mut self, cmd: &Command, key: Option<&SigningKey>) -> Reply {
        self.request_at(cmd, key, now_ms()).reply
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

pub fn create_queue(client: &mut Client, access_key: Option<&str>) -> Queue {
    let recipient_key = SigningKey::generate(&mut OsRng);
    let dh = StaticSecret::random_from_rng(OsRng);
    let cmd = Command::Create {
        access_key: access_key.map(str::to_string),
        recipient_auth: recipient_key.verifying_key().to_bytes(),
        recipient_dh: PublicKey::from(&dh).to_bytes(),
    };
    match client.request(&cmd, Some(&recipient_key)) {
        Reply::Queue {
            recipient_id,
            sender_id,
            relay_dh,
        } => Queue {
            recipient_id,
            sender_id,
            recipient_key,
            sender_key: SigningKey::generate(&mut OsRng),
            secret: *seal::queue_secret(&dh, &relay_dh).unwrap(),
        },
        other => panic!("CREATE answered {other:?}"),
    }
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

    pub fn fetch(&self, wait_ms: u32) -> Command {
        Command::Fetch {
            recipient_id: self.recipient_id,
            wait_ms,
        }
    }

    pub fn ack(&self, msg_id: Id) -> Command {
        Command::Ack {
            recipient_id: self.recipient_id,
            msg_id,
        }
    }

    pub fn delete(&self) -> Command {
        Command::Delete {
            recipient_id: self.recipient_id,
        }
    }

    /// Decrypts a delivered message.
    pub fn open(&self, reply: &Reply) -> (Id, Vec<u8>) {
        match reply {
            Reply::Message { msg_id, body, .. } => (
                *msg_id,
                seal::delivery_open(&self.secret, msg_id, body).expect("delivery opens"),
            ),
            other => panic!("expected a message, got {other:?}"),
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
