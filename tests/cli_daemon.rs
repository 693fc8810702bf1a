//! `tern daemon` and `tern jsonrpc` end to end, with real relays on
//! loopback: JSON-RPC over the socket and over stdio, the delivery contract
//! (nothing lost when no client listens, when a client dies before its
//! `ack`, when the daemon is killed), the socket's permissions and the
//! one-daemon-per-home rule. Also `tern send --lines`.

mod cli_common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_common::*;
use serde_json::{json, Value};

/// Longest wait for any one answer or notification.
const WAIT: Duration = Duration::from_secs(60);

/// A running `tern daemon`, SIGKILLed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
}

fn drain(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// `tern daemon --home … --socket SOCKET EXTRA…` from `sandbox`.
fn daemon_cmd(sandbox: &Path, homes: &[&Path], socket: &Path, extra: &[&str]) -> Command {
    let mut c = tern_cmd(sandbox);
    c.arg("daemon");
    for h in homes {
        c.arg("--home").arg(h);
    }
    c.arg("--socket").arg(socket).args(extra);
    c
}

impl Daemon {
    /// Starts it and waits for the line that says it listens.
    fn start(mut c: Command, socket: &Path) -> Daemon {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawning tern daemon");
        let stderr = drain(child.stderr.take().unwrap());
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut first = String::new();
            let _ = tx.send(r.read_line(&mut first).map(|_| first));
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        match rx.recv_timeout(WAIT) {
            Ok(Ok(line)) if line.trim() == socket.display().to_string() => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not start ({other:?}); stderr:\n{}",
                    String::from_utf8_lossy(&stderr.lock().unwrap())
                );
            }
        }
        Daemon {
            child,
            socket: socket.to_path_buf(),
            stderr,
        }
    }

    fn connect(&self) -> Rpc {
        Rpc::connect(&self.socket)
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JSON-RPC client: requests out, responses and notifications in.
struct Rpc {
    out: Box<dyn Write + Send>,
    /// The socket, shut down on drop as a client that dies would leave it
    /// (the reading thread holds a copy of it).
    socket: Option<UnixStream>,
    lines: Receiver<String>,
    next_id: u64,
    /// Notifications that came while waiting for a response.
    notes: VecDeque<Value>,
}

impl Rpc {
    fn connect(socket: &Path) -> Rpc {
        let s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        let r = s.try_clone().unwrap();
        let shut = s.try_clone().unwrap();
        let mut rpc = Rpc::over(Box::new(s), r);
        rpc.socket = Some(shut);
        rpc
    }

    fn over(out: Box<dyn Write + Send>, input: impl Read + Send + 'static) -> Rpc {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(input).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Rpc {
            out,
            socket: None,
            lines: rx,
            next_id: 1,
            notes: VecDeque::new(),
        }
    }

    fn write_line(&mut self, line: &str) {
        self.out
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.out.flush())
            .expect("writing to the daemon");
    }

    /// The next line, parsed; `None` once the daemon hung up.
    fn read(&mut self, limit: Duration) -> Option<Value> {
        match self.lines.recv_timeout(limit) {
            Ok(l) => {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("the daemon wrote a non-JSON line ({e}): {l:?}"));
                assert_eq!(v["jsonrpc"], "2.0", "{l}");
                Some(v)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("nothing from the daemon within {limit:?}"),
        }
    }

    /// The response to the next line sent (notifications are kept).
    fn response(&mut self) -> Value {
        loop {
            let v = self.read(WAIT).expect("the daemon hung up");
            if v.get("method").is_some() {
                self.notes.push_back(v);
            } else {
                return v;
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.write_line(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        );
        let r = self.response();
        assert_eq!(r["id"], id, "{r}");
        r
    }

    #[track_caller]
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params.clone());
        assert!(r.get("error").is_none(), "{method} {params} failed: {r}");
        r["result"].clone()
    }

    #[track_caller]
    fn error(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params.clone());
        assert!(
            r.get("result").is_none(),
            "{method} {params} succeeded: {r}"
        );
        r["error"].clone()
    }

    /// The next notification of `method`, waiting up to `limit`; `None` if
    /// none came (other notifications are dropped).
    fn notification(&mut self, method: &str, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.notes.iter().position(|n| n["method"] == method) {
                let n = self.notes.remove(i).unwrap();
                return Some(n["params"].clone());
            }
            self.notes.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.lines.recv_timeout(left) {
                Ok(l) => self.notes.push_back(serde_json::from_str(&l).unwrap()),
                Err(_) => return None,
            }
        }
    }

    /// The next `n` messages.
    #[track_caller]
    fn messages(&mut self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                self.notification("message", WAIT)
                    .unwrap_or_else(|| panic!("message {} of {n} did not come", i + 1))
            })
            .collect()
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Two profiles on one relay, connected: `ada` calls the other `bob`.
fn pair(relay: &Relay) -> (Profile, Profile) {
    let a = Profile::new("Ada", &[relay]);
    let b = Profile::new("Bob", &[relay]);
    connect(&a, "bob", &b, "ada");
    (a, b)
}

fn socket_in(p: &Profile, name: &str) -> PathBuf {
    let dir = p.sandbox().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir.join(name)
}

fn label(p: &Profile) -> String {
    p.home.display().to_string()
}

/// Polls `log` through the daemon until the history with `contact` holds
/// `n` messages from them.
fn wait_for_history(rpc: &mut Rpc, profile: &str, contact: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = rpc.ok(
            "log",
            json!({"profile": profile, "contact": contact, "limit": 1000}),
        );
        let got: Vec<Value> = log
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["direction"] == "in")
            .cloned()
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_profiles_in_one_daemon_200_messages_back_to_back_exactly_once() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&a, "d.sock");
    let d = Daemon::start(
        daemon_cmd(a.sandbox(), &[&a.home, &b.home], &socket, &[]),
        &socket,
    );
    let mut bot = d.connect();
    let profiles = bot.ok("profiles", json!({}));
    assert_eq!(profiles.as_array().unwrap().len(), 2, "{profiles}");
    assert!(profiles.as_array().unwrap().iter().all(|p| p["ok"] == true));
    // Several profiles: each call names one.
    let e = bot.error("contacts", json!({}));
    assert_eq!(e["code"], -32100, "{e}");
    // By name works too, when no other profile has it.
    let contacts = bot.ok("contacts", json!({"profile": "Bob"}));
    assert_eq!(contacts[0]["name"], "ada");
    let sub = bot.ok("subscribe", json!({"profile": label(&b)}));
    assert_eq!(sub["manual_ack"], false);

    let mut sender = d.connect();
    let started = Instant::now();
    let mut ids = HashMap::new();
    for i in 0..200 {
        let text = format!("burst {i}");
        let r = sender.ok(
            "send",
            json!({"profile": label(&a), "contact": "bob", "text": text}),
        );
        assert_eq!(r["state"], "sent", "{r}");
        assert_eq!(r["relays"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["failed"], json!([]), "{r}");
        ids.insert(r["id"].as_str().unwrap().to_string(), text);
    }
    eprintln!("200 sends through the daemon: {:?}", started.elapsed());
    assert_eq!(ids.len(), 200, "every message has an id of its own");

    let got = bot.messages(200);
    let mut seen = HashSet::new();
    for m in &got {
        assert_eq!(m["profile"], label(&b));
        assert_eq!(m["contact"], "ada");
        let id = m["id"].as_str().unwrap();
        assert_eq!(ids.get(id).map(String::as_str), m["text"].as_str(), "{m}");
        assert!(seen.insert(id.to_string()), "delivered twice: {m}");
    }
    // Exactly once: nothing more comes.
    assert!(bot
        .notification("message", Duration::from_secs(2))
        .is_none());
    let history = wait_for_history(&mut sender, &label(&b), "ada", 200);
    assert_eq!(history.len(), 200, "each message once in the history");
    eprintln!("200 messages end to end: {:?}", started.elapsed());
}

#[test]
fn what_arrives_with_no_client_connected_is_delivered_on_connect() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let d = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]), &socket);
    for t in ["one", "two", "three"] {
        a.send("bob", t);
    }
    let mut look = d.connect();
    wait_for_history(&mut look, &label(&b), "ada", 3);
    drop(look);
    // (Stored comes a moment before handed to the delivery list.)
    std::thread::sleep(Duration::from_millis(300));
    let mut bot = d.connect();
    let sub = bot.ok("subscribe", json!({}));
    assert_eq!(sub["pending"], 3, "{sub}");
    let texts: Vec<Value> = bot.messages(3).iter().map(|m| m["text"].clone()).collect();
    assert_eq!(texts, [json!("one"), json!("two"), json!("three")]);
    // Delivered: a second client does not get them again.
    let mut other = d.connect();
    assert_eq!(other.ok("subscribe", json!({}))["pending"], 0);
    // And what comes now goes to both.
    a.send("bob", "four");
    assert_eq!(bot.messages(1)[0]["text"], "four");
    assert_eq!(other.messages(1)[0]["text"], "four");
    // A one-shot recv finds nothing left behind for it (once the daemon
    // has noted the last delivery).
    std::thread::sleep(Duration::from_secs(1));
    drop(d);
    b.recv_nothing();
}

#[test]
fn manual_ack_redelivers_until_acknowledged_across_restarts() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let cmd = || daemon_cmd(b.sandbox(), &[&b.home], &socket, &["--manual-ack"]);
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    assert_eq!(bot.ok("subscribe", json!({}))["manual_ack"], true);
    a.send("bob", "hold me");
    let first = bot.messages(1).remove(0);
    assert_eq!(first["text"], "hold me");
    // The bot dies before its ack.
    drop(bot);
    let mut again = d.connect();
    assert_eq!(again.ok("subscribe", json!({}))["pending"], 1);
    assert_eq!(again.messages(1)[0]["id"], first["id"]);
    drop(again);
    // So does the daemon.
    d.kill();
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    assert_eq!(bot.ok("subscribe", json!({}))["pending"], 1);
    assert_eq!(bot.messages(1)[0]["id"], first["id"]);
    let e = bot.error("ack", json!({"id": "00"}));
    assert_eq!(e["code"], -32101, "{e}");
    assert_eq!(bot.ok("ack", json!({"id": first["id"]}))["acked"], 1);
    drop(bot);
    let mut later = d.connect();
    assert_eq!(later.ok("subscribe", json!({}))["pending"], 0);
    assert!(later
        .notification("message", Duration::from_secs(1))
        .is_none());
    // The acknowledgement outlives the daemon.
    drop(later);
    d.kill();
    let d = Daemon::start(cmd(), &socket);
    assert_eq!(d.connect().ok("subscribe", json!({}))["pending"], 0);
}

#[test]
fn a_daemon_killed_mid_traffic_loses_nothing() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let cmd = || daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]);
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let n = 60;
    let input: String = (0..n).map(|i| format!("flow {i}\n")).collect();
    let mut sender = a.cmd(&["send", "--lines", "bob"]);
    sender
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = sender.spawn().unwrap();
    let mut stdin: ChildStdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let mut got = HashSet::new();
    for m in bot.messages(5) {
        got.insert(m["text"].as_str().unwrap().to_string());
    }
    d.kill();
    // What the killed daemon wrote before it died was delivered: the bot
    // reads it to the end.
    while let Some(m) = bot.notification("message", Duration::from_secs(2)) {
        got.insert(m["text"].as_str().unwrap().to_string());
    }
    let status = wait_guarded(&mut child, HANG_GUARD, "send --lines");
    assert!(status.success(), "send --lines failed");
    let d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "after the restart only {} of {n} arrived; daemon log:\n{}",
            got.len(),
            d.stderr()
        );
        if let Some(m) = bot.notification("message", Duration::from_secs(5)) {
            got.insert(m["text"].as_str().unwrap().to_string());
        }
    }
    let mut look = d.connect();
    let history = wait_for_history(&mut look, &label(&b), "ada", n);
    let texts: HashSet<&str> = history
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(history.len(), n, "each message exactly once in the history");
    assert_eq!(texts.len(), n);
}

#[test]
fn the_socket_is_private_one_daemon_per_home_and_failures_stay_apart() {
    let relay = Relay::start();
    let b = Profile::new("Bob", &[&relay]);
    let nobody = Profile::empty("Nobody");
    std::fs::create_dir_all(&nobody.home).unwrap();
    let socket = b.sandbox().join("run/tern/b.sock");
    let d = Daemon::start(
        daemon_cmd(b.sandbox(), &[&b.home, &nobody.home], &socket, &[]),
        &socket,
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600, "socket mode");
    assert_eq!(
        mode(socket.parent().unwrap()),
        0o700,
        "socket directory mode"
    );

    // The home that holds no profile is reported; the other is served.
    let mut c = d.connect();
    let profiles = c.ok("profiles", json!({}));
    let bad = &profiles[1];
    assert_eq!(bad["ok"], false, "{profiles}");
    assert_eq!(bad["error"]["exit_code"], 7, "{profiles}");
    let e = c.error("contacts", json!({"profile": label(&nobody)}));
    assert_eq!(e["code"], -32007, "{e}");
    assert_eq!(
        c.ok("profile", json!({"profile": label(&b)}))["name"],
        "Bob"
    );

    // A second daemon for the same home is refused, naming the first.
    let other = b.sandbox().join("run/tern/other.sock");
    let o = run_cmd(
        daemon_cmd(b.sandbox(), &[&b.home], &other, &[]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 1, "second daemon");
    assert!(
        stderr(&o).contains("another tern daemon serves") && stderr(&o).contains("b.sock"),
        "{}",
        show(&o)
    );
    assert!(!other.exists(), "the refused daemon left a socket");

    // A socket in a directory others can read is refused.
    let open_dir = b.sandbox().join("open");
    std::fs::create_dir_all(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(c);
    drop(d);
    let o = run_cmd(
        daemon_cmd(b.sandbox(), &[&b.home], &open_dir.join("x.sock"), &[]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 1, "socket in an open directory");
    assert!(stderr(&o).contains("open to other users"), "{}", show(&o));

    // A stale socket (the daemon above was SIGKILLed) is replaced, and by
    // default the socket goes beside the profile.
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    let d = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]), &socket);
    drop(d.connect());
    drop(d);
    let mut c = tern_cmd(b.sandbox());
    c.env_remove("XDG_RUNTIME_DIR")
        .arg("daemon")
        .arg("--home")
        .arg(&b.home);
    let beside = b.home.join("daemon.sock");
    let d = Daemon::start(c, &beside);
    assert_eq!(mode(&beside), 0o600);
    drop(d);
}

#[test]
fn jsonrpc_over_stdio_with_bad_input_and_hostile_text() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let mut c = b.cmd(&["jsonrpc"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let _err = drain(child.stderr.take().unwrap());
    let stdin = child.stdin.take().unwrap();
    let mut rpc = Rpc::over(Box::new(stdin), child.stdout.take().unwrap());

    assert_eq!(rpc.ok("contacts", json!({}))[0]["name"], "ada");
    assert_eq!(rpc.ok("relays", json!({}))[0]["access_key"], false);
    rpc.write_line("{not json");
    assert_eq!(rpc.response()["error"]["code"], -32700);
    assert_eq!(rpc.error("frobnicate", json!({}))["code"], -32601);
    assert_eq!(rpc.error("send", json!({"contact": 5}))["code"], -32602);
    assert_eq!(
        rpc.error("send", json!({"contact": "bob", "text": "x", "extra": 1}))["code"],
        -32602
    );
    let e = rpc.error("send", json!({"contact": "nobody", "text": "hi"}));
    assert_eq!(e["code"], -32003, "{e}");
    assert_eq!(e["data"]["retryable"], false);
    rpc.write_line(&"x".repeat((1 << 20) + 10));
    assert_eq!(rpc.response()["error"]["code"], -32600);
    // A notification (no id) gets no answer; the next request does.
    rpc.write_line(r#"{"jsonrpc":"2.0","method":"profile"}"#);
    assert_eq!(rpc.ok("profile", json!({}))["name"], "Bob");

    rpc.ok("subscribe", json!({}));
    let hostile = "\x1b[2J\u{202e}evil\r\nline \u{85}\u{7f} é";
    a.send("bob", hostile);
    let m = rpc.messages(1).remove(0);
    assert_eq!(m["text"], hostile, "hostile text arrives exactly");
    assert_eq!(m["from"], "ada");

    // And the other way.
    let r = rpc.ok("send", json!({"contact": "ada", "text": "back"}));
    assert_eq!(r["state"], "sent");
    assert_eq!(a.recv_texts(), ["back"]);

    // The end of stdin ends it.
    drop(rpc);
    let st = wait_guarded(&mut child, HANG_GUARD, "tern jsonrpc");
    assert!(st.success(), "{st:?}");
}

#[test]
fn send_lines_sends_each_line_in_one_process() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let out = a.ok_stdin(
        &["send", "--lines", "--json", "bob"],
        b"one\n\ntwo\r\nthree",
    );
    let sent = json_lines(&out);
    assert_eq!(sent.len(), 3, "{out}");
    assert!(sent.iter().all(|s| s["state"] == "sent"), "{out}");
    assert_eq!(b.recv_texts(), ["one", "two", "three"]);
    // Not UTF-8 on line 2: line 1 is sent, nothing after.
    let o = a.run_stdin(&["send", "--lines", "bob"], b"fine\n\xff\nnever\n");
    assert_code(&o, 1, "send --lines with a bad line");
    assert!(stderr(&o).contains("line 2"), "{}", show(&o));
    assert_eq!(b.recv_texts(), ["fine"]);
}

#[test]
fn one_shot_send_goes_through_the_daemon_without_unlocking() {
    let relay = Relay::start();
    let a = Profile::new("Ada", &[&relay]);
    let b = Profile::with_passphrase("Bob", &[&relay], "plum ferry onion velvet gravel");
    connect(&a, "bob", &b, "ada");
    let socket = socket_in(&b, "b.sock");
    let mut c = b.cmd(&["daemon", "--socket"]);
    c.arg(&socket);
    let d = Daemon::start(c, &socket);
    // No passphrase given: only the daemon can send this.
    let o = run_cmd(
        b.bare_cmd(&["send", "--json", "ada", "through the daemon"]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 0, "send through the daemon");
    let sent = json_lines(&stdout(&o));
    assert_eq!(sent[0]["state"], "sent", "{}", show(&o));
    assert_eq!(a.recv_texts(), ["through the daemon"]);
    // Its errors keep their exit codes.
    let o = run_cmd(b.bare_cmd(&["send", "nobody", "x"]), None, HANG_GUARD);
    assert_code(&o, 3, "send to no such contact through the daemon");
    // Told to work alone, the same command needs the passphrase.
    let mut alone = b.bare_cmd(&["send", "ada", "alone"]);
    alone.env("TERN_NO_DAEMON", "1");
    assert_code(
        &run_cmd(alone, None, HANG_GUARD),
        5,
        "send without the daemon",
    );
    drop(d);
}

#[test]
fn invite_and_accept_through_one_daemon_connect_its_two_profiles() {
    let relay = Relay::start();
    let a = Profile::new("Ada", &[&relay]);
    let b = Profile::new("Bob", &[&relay]);
    let socket = socket_in(&a, "d.sock");
    let d = Daemon::start(
        daemon_cmd(a.sandbox(), &[&a.home, &b.home], &socket, &[]),
        &socket,
    );
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let inv = bot.ok("invite", json!({"profile": "Ada", "name": "bob"}));
    let link = inv["link"].as_str().unwrap().to_string();
    assert!(link.starts_with("TERN:"), "{inv}");
    let acc = bot.ok(
        "accept",
        json!({"profile": "Bob", "link": link, "name": "ada"}),
    );
    assert_eq!(acc["state"], "pending", "{acc}");
    // Both sides complete on their own, with no other command.
    let mut connected = HashSet::new();
    while connected.len() < 2 {
        let n = bot
            .notification("connected", WAIT)
            .unwrap_or_else(|| panic!("only {connected:?} connected; log:\n{}", d.stderr()));
        connected.insert(n["profile"].as_str().unwrap().to_string());
    }
    let r = bot.ok(
        "send",
        json!({"profile": "Ada", "contact": "bob", "text": "hello"}),
    );
    assert_eq!(r["state"], "sent", "{r}");
    let m = bot.notification("message", WAIT).expect("the message");
    assert_eq!(m["profile"], label(&b));
    assert_eq!(m["text"], "hello");
}
