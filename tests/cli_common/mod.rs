//! Shared helpers for the end-to-end tests of the `tern` command line: real
//! relays (`tern relay serve` child processes) and profiles in temporary
//! homes, driven only through the binary.
//!
//! Every command runs with stdin closed (never a terminal), a scrubbed
//! environment (no TERN_* variables leak in from the caller, HOME and
//! XDG_DATA_HOME point inside a temporary directory) and a hang guard: a
//! command that does not finish within [`HANG_GUARD`] is killed and the test
//! fails. The guard is a safety net, not a timing assertion.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Longest any single command may run before the test gives up on it.
pub const HANG_GUARD: Duration = Duration::from_secs(90);

/// Variables that would change which profile or key a command uses.
const SCRUBBED: &[&str] = &[
    "TERN_HOME",
    "TERN_PASSPHRASE",
    "TERN_PASSPHRASE_FILE",
    "TERN_IDENTITY",
    "TERN_RELAY_DATA",
    "TERN_PROXY",
    "TERN_TLS_CA",
    "TERN_RELAY_PUBLIC_ADDRESS",
    "TERN_RELAY_FORWARDED_HEADER",
    "PORT",
    "DATABASE_URL",
];

/// A `tern` command with a clean environment; `sandbox` stands in for the
/// user's home so a command without `--home` never touches the real one.
pub fn tern_cmd(sandbox: &Path) -> Command {
    let mut c = Command::new(TERN);
    for v in SCRUBBED {
        c.env_remove(v);
    }
    c.env("HOME", sandbox.join("user-home"));
    c.env("XDG_DATA_HOME", sandbox.join("xdg-data"));
    c.env("NO_COLOR", "1");
    c.stdin(Stdio::null());
    c
}

fn describe(c: &Command) -> String {
    let mut s = String::from("tern");
    for a in c.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.len() > 80 {
            let head: String = a.chars().take(40).collect();
            s.push_str(&format!("{head}…({} bytes)", a.len()));
        } else {
            s.push_str(&a);
        }
    }
    s
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for a child with a hang guard; kills it (and fails) past `limit`.
pub fn wait_guarded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => return st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{what}` did not finish within {limit:?}: it hangs");
            }
            None => std::thread::sleep(Duration::from_millis(3)),
        }
    }
}

/// Runs a command to completion (stdin from `input`, if any), capturing
/// its output, under the hang guard.
pub fn run_cmd(mut c: Command, input: Option<&[u8]>, limit: Duration) -> Output {
    let what = describe(&c);
    if input.is_some() {
        c.stdin(Stdio::piped());
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("spawning `{what}`: {e}"));
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let status = wait_guarded(&mut child, limit, &what);
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    )
}

/// Asserts the exit code of a finished command.
#[track_caller]
pub fn assert_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        show(o)
    );
}

/// Parses output that must be one JSON object per line (and nothing else).
#[track_caller]
pub fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\nin:\n{s}"));
            assert!(v.is_object(), "JSON line is not an object: {l}");
            v
        })
        .collect()
}

/// Text of the `message` events among `events`, in order.
pub fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["text"].as_str().expect("text is a string").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Relays

/// A `tern relay serve` child process on 127.0.0.1, killed on drop.
pub struct Relay {
    /// `tern://KEY@127.0.0.1:PORT`, as printed on its first line.
    pub addr: String,
    pub port: u16,
    data: TempDir,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    /// More `tern relay serve` arguments, kept for restarts.
    extra: Vec<String>,
}

impl Relay {
    /// Starts a relay on a free port with a fresh data directory.
    pub fn start() -> Relay {
        Self::start_with(&[])
    }

    /// [`Relay::start`] with more `tern relay serve` arguments.
    pub fn start_with(extra: &[&str]) -> Relay {
        let data = tempfile::Builder::new()
            .prefix("tern-relay-")
            .tempdir()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) =
            Self::spawn(data.path(), "127.0.0.1:0", &log, &extra).unwrap_or_else(|e| panic!("{e}"));
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in relay address {addr:?}"));
        Relay {
            addr,
            port,
            data,
            child: Some(child),
            log,
            extra,
        }
    }

    fn spawn(
        data: &Path,
        listen: &str,
        log: &Arc<Mutex<Vec<u8>>>,
        extra: &[String],
    ) -> Result<(Child, String), String> {
        let mut c = tern_cmd(data);
        c.args(["relay", "serve", "--listen", listen, "--data"])
            .arg(data)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| format!("spawning the relay: {e}"))?;
        // Drain stderr so the relay never blocks on a full pipe.
        let mut err = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut first = String::new();
            let got = r.read_line(&mut first).map(|_| first);
            let _ = tx.send(got);
            // Keep draining whatever else it prints.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(line)) if line.trim().starts_with("tern://") => Ok((child, line.trim().into())),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "relay on {listen} did not start ({other:?}); its log:\n{}",
                    String::from_utf8_lossy(&log.lock().unwrap())
                ))
            }
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no clean shutdown, whatever was not on disk is lost.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data directory and port; the address
    /// (key included) must be the same.
    pub fn restart(&mut self) {
        self.stop();
        let listen = format!("127.0.0.1:{}", self.port);
        let mut last = String::new();
        // The port was just released; a bind can fail on a loaded machine
        // if something else grabbed it meanwhile. Retry a little.
        for _ in 0..20 {
            match Self::spawn(self.data.path(), &listen, &self.log, &self.extra) {
                Ok((child, addr)) => {
                    assert_eq!(
                        addr, self.addr,
                        "a restarted relay must keep its address (same key, same port)"
                    );
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("could not restart the relay: {last}");
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Profiles

/// A tern profile in a temporary home.
pub struct Profile {
    /// Display name given to `tern init --name`.
    pub display: String,
    pub home: PathBuf,
    dir: TempDir,
    /// Variables set for every command (e.g. TERN_PASSPHRASE_FILE).
    envs: Vec<(String, String)>,
}

impl Profile {
    /// A temporary home without a profile yet.
    pub fn empty(display: &str) -> Profile {
        let dir = tempfile::Builder::new()
            .prefix("tern-home-")
            .tempdir()
            .unwrap();
        Profile {
            display: display.to_string(),
            home: dir.path().join("home"),
            dir,
            envs: Vec::new(),
        }
    }

    /// `tern init --name DISPLAY --relay … --no-passphrase`.
    pub fn new(display: &str, relays: &[&Relay]) -> Profile {
        let p = Profile::empty(display);
        let mut args = vec!["init", "--name", display, "--no-passphrase"];
        for r in relays {
            args.push("--relay");
            args.push(&r.addr);
        }
        p.ok(&args);
        p
    }

    /// A profile on relays given by address, with these variables set for
    /// every command (a proxy, a CA file); `extra` goes to `tern init`.
    pub fn with_env(
        display: &str,
        addresses: &[&str],
        envs: &[(&str, &str)],
        extra: &[&str],
    ) -> Profile {
        let mut p = Profile::empty(display);
        p.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut args = vec!["init", "--name", display, "--no-passphrase"];
        args.extend_from_slice(extra);
        for a in addresses {
            args.push("--relay");
            args.push(a);
        }
        p.ok(&args);
        p
    }

    /// A passphrase-protected profile; every later command gets the
    /// passphrase through TERN_PASSPHRASE_FILE.
    pub fn with_passphrase(display: &str, relays: &[&Relay], passphrase: &str) -> Profile {
        let mut p = Profile::empty(display);
        let file = p.dir.path().join("passphrase.txt");
        std::fs::write(&file, format!("{passphrase}\n")).unwrap();
        p.envs
            .push(("TERN_PASSPHRASE_FILE".into(), file.to_string_lossy().into()));
        let mut args = vec!["init", "--name", display];
        for r in relays {
            args.push("--relay");
            args.push(&r.addr);
        }
        p.ok(&args);
        p
    }

    /// The temporary directory holding the home (and nothing that tern
    /// writes, apart from the home).
    pub fn sandbox(&self) -> &Path {
        self.dir.path()
    }

    /// A command on this profile, without the profile's extra variables.
    pub fn bare_cmd(&self, args: &[&str]) -> Command {
        let mut c = tern_cmd(self.dir.path());
        c.arg("--home").arg(&self.home).args(args);
        c
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.bare_cmd(args);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_cmd(self.cmd(args), None, HANG_GUARD)
    }

    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        run_cmd(self.cmd(args), Some(input), HANG_GUARD)
    }

    /// Runs and asserts exit 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "`{}` on {} failed\n{}",
            describe(&self.cmd(args)),
            self.display,
            show(&o)
        );
        stdout(&o)
    }

    /// Runs with `input` on stdin and asserts exit 0; returns stdout.
    #[track_caller]
    pub fn ok_stdin(&self, args: &[&str], input: &[u8]) -> String {
        let o = self.run_stdin(args, input);
        assert!(
            o.status.success(),
            "`{}` (with stdin) on {} failed\n{}",
            describe(&self.cmd(args)),
            self.display,
            show(&o)
        );
        stdout(&o)
    }

    #[track_caller]
    pub fn send(&self, to: &str, text: &str) {
        self.ok(&["send", to, text]);
    }

    /// `recv --json`, every line parsed.
    #[track_caller]
    pub fn recv(&self) -> Vec<Value> {
        json_lines(&self.ok(&["recv", "--json"]))
    }

    /// The texts a plain `recv --json` returns now.
    #[track_caller]
    pub fn recv_texts(&self) -> Vec<String> {
        texts(&self.recv())
    }

    /// Asserts that a `recv` finds nothing at all (no event of any kind).
    #[track_caller]
    pub fn recv_nothing(&self) {
        let o = self.run(&["recv", "--json"]);
        assert_code(&o, 0, "recv");
        assert_eq!(
            stdout(&o),
            "",
            "{}: a second recv must print nothing",
            self.display
        );
    }

    #[track_caller]
    pub fn contacts(&self) -> Vec<Value> {
        json_lines(&self.ok(&["contacts", "--json"]))
    }

    #[track_caller]
    pub fn contact(&self, name: &str) -> Value {
        let all = self.contacts();
        all.iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{}: no contact {name:?} in {all:#?}", self.display))
    }

    #[track_caller]
    pub fn log(&self, name: &str) -> Vec<Value> {
        json_lines(&self.ok(&["log", name, "--json"]))
    }

    /// Everything observable about the contacts: `contacts --json` and the
    /// log of each contact. Used to check that a failing command changed
    /// nothing.
    #[track_caller]
    pub fn snapshot(&self) -> String {
        let mut s = self.ok(&["contacts", "--json"]);
        for c in self.contacts() {
            let name = c["name"].as_str().unwrap().to_string();
            s.push_str(&self.ok(&["log", &name, "--json"]));
        }
        s
    }

    /// `recv --follow --json` in the background.
    pub fn follow(&self) -> Follower {
        self.follow_with(&[])
    }

    /// `recv --follow --json` with more options, in the background.
    pub fn follow_with(&self, extra: &[&str]) -> Follower {
        let mut args = vec!["recv", "--follow", "--json"];
        args.extend_from_slice(extra);
        let mut c = self.cmd(&args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawning recv --follow");
        let out: ChildStdout = child.stdout.take().unwrap();
        let err = reader(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Follower {
            child,
            lines: rx,
            stderr: Some(err),
        }
    }
}

/// A running `tern recv --follow --json`.
pub struct Follower {
    pub child: Child,
    lines: Receiver<String>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Follower {
    /// The next printed line, parsed; panics if none comes within the hang
    /// guard or the process ended.
    #[track_caller]
    pub fn next_event(&mut self) -> Value {
        match self.lines.recv_timeout(HANG_GUARD) {
            Ok(l) => {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("follow printed a non-JSON line ({e}): {l:?}"));
                assert!(v.is_object(), "follow printed a non-object: {l}");
                v
            }
            Err(e) => {
                let status = self.child.try_wait();
                panic!("recv --follow printed nothing more ({e}); process status {status:?}")
            }
        }
    }

    /// The next `n` message events (other events are collected too).
    #[track_caller]
    pub fn next_messages(&mut self, n: usize) -> (Vec<String>, Vec<Value>) {
        let mut msgs = Vec::new();
        let mut all = Vec::new();
        while msgs.len() < n {
            let e = self.next_event();
            if e["type"] == "message" {
                msgs.push(e["text"].as_str().unwrap().to_string());
            }
            all.push(e);
        }
        (msgs, all)
    }

    /// Lines already printed and not yet read (without waiting).
    pub fn pending_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// SIGKILL; returns what it wrote on stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        String::from_utf8_lossy(&err).into_owned()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects `a` (inviter) and `b` (joiner) through a link; `a` calls `b`
/// `a_calls_b` and `b` calls `a` `b_calls_a`. The handshake takes three
/// steps: the inviter's recv answers the request, the joiner's recv
/// completes its side and sends the confirmation, the inviter's second recv
/// completes its side.
#[track_caller]
pub fn connect(a: &Profile, a_calls_b: &str, b: &Profile, b_calls_a: &str) {
    let link = a.ok(&["invite", "--link", "--name", a_calls_b]);
    let link = link.trim();
    assert!(link.starts_with("TERN:"), "invite --link printed {link:?}");
    assert_eq!(a.contact(a_calls_b)["state"], "invited");
    b.ok(&["accept", link, "--name", b_calls_a]);
    assert_eq!(b.contact(b_calls_a)["state"], "pending");
    a.ok(&["recv"]);
    let eb = b.recv();
    assert!(
        eb.iter()
            .any(|e| e["type"] == "connected" && e["contact"] == b_calls_a),
        "the joiner's recv reports the connection: {eb:?}"
    );
    let ea = a.recv();
    assert!(
        ea.iter()
            .any(|e| e["type"] == "connected" && e["contact"] == a_calls_b),
        "the inviter's second recv reports the connection: {ea:?}"
    );
    assert_eq!(a.contact(a_calls_b)["state"], "connected", "inviter side");
    assert_eq!(b.contact(b_calls_a)["state"], "connected", "joiner side");
}

/// Every file under `root`, recursively.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether an executable is on PATH.
pub fn have_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
}

/// A new device ("Alice-server", named "server") that joins `first`'s
/// profile through a `device link --link` shown by `first` (named
/// "laptop"), with `extra` options for `device join`; `first` still has to
/// confirm it (`device confirm --yes`).
pub fn join_server(first: &Profile, extra: &[&str]) -> Profile {
    let link = first.ok(&["device", "link", "--link", "--name", "laptop"]);
    let server = Profile::empty("Alice-server");
    let mut args = vec![
        "device",
        "join",
        link.trim(),
        "--name",
        "server",
        "--no-passphrase",
    ];
    args.extend_from_slice(extra);
    server.ok(&args);
    server
}
