//! The harness of the daemon tests: a `tern daemon` child, a JSON-RPC
//! client, and the check of every exchange against
//! docs/jsonrpc.schema.json, so that the schema describes what the daemon
//! really says (a field it adds, a type it changes, an error code it
//! invents all fail the test that saw it).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli_common::*;

/// The schema, as the repository has it.
pub static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/jsonrpc.schema.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
});

/// A validator for the part of the schema at `pointer` (`/methods/send/params`):
/// the whole schema with a `$ref` to that part at its root, so that its own
/// `$ref`s to `#/$defs/…` resolve. Built once per pointer.
pub fn validator(pointer: &str) -> &'static jsonschema::Validator {
    static CACHE: LazyLock<Mutex<HashMap<String, &'static jsonschema::Validator>>> =
        LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.entry(pointer.to_string()).or_insert_with(|| {
        assert!(
            SCHEMA.pointer(pointer).is_some(),
            "docs/jsonrpc.schema.json has nothing at {pointer}"
        );
        let mut root = SCHEMA.clone();
        root["$ref"] = json!(format!("#{pointer}"));
        let v = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("docs/jsonrpc.schema.json at {pointer}: {e}"));
        Box::leak(Box::new(v))
    })
}

/// The schema's complaints about `v` at `pointer` (empty: valid).
pub fn problems(pointer: &str, v: &Value) -> Vec<String> {
    validator(pointer)
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[track_caller]
pub fn assert_valid(pointer: &str, v: &Value, what: &str) {
    let p = problems(pointer, v);
    assert!(
        p.is_empty(),
        "{what} does not match docs/jsonrpc.schema.json {pointer}: {p:#?}\n{v}"
    );
}

/// What this test binary saw pass the schema: `method` (answered with a
/// result), `method!CODE` (answered with an error), `notify:method`.
pub static SEEN: LazyLock<Mutex<BTreeSet<String>>> = LazyLock::new(Default::default);

fn seen(what: String) {
    SEEN.lock().unwrap_or_else(|e| e.into_inner()).insert(what);
}

/// Any error object: its shape, and a code the schema lists.
#[track_caller]
fn check_error(e: &Value) {
    assert_valid("/$defs/error", e, "an error");
    let code = e["code"].as_i64().unwrap().to_string();
    assert!(
        SCHEMA["error_codes"].get(&code).is_some(),
        "error code {code} is not in docs/jsonrpc.schema.json error_codes: {e}"
    );
}

/// One request and its response, against the schema: a method it does not
/// list is refused with -32601; parameters it refuses are refused with
/// -32602, and the other way round; a result has the shape it gives; an
/// error has a code listed for the method (or for every method).
#[track_caller]
pub fn check_exchange(method: &str, params: &Value, response: &Value) {
    let code = response["error"]["code"].as_i64();
    if let Some(e) = response.get("error") {
        check_error(e);
    }
    let Some(spec) = SCHEMA["methods"].get(method) else {
        assert_eq!(
            code,
            Some(-32601),
            "{method} is not in the schema: {response}"
        );
        return;
    };
    let bad_params = problems(&format!("/methods/{method}/params"), params);
    if code == Some(-32602) {
        assert!(
            !bad_params.is_empty(),
            "the daemon refused {method} {params} as invalid, the schema allows them: {response}"
        );
    } else {
        assert!(
            bad_params.is_empty(),
            "the daemon took {method} {params}, the schema refuses them: {bad_params:#?}"
        );
    }
    match code {
        None => {
            assert_valid(
                &format!("/methods/{method}/result"),
                &response["result"],
                &format!("the result of {method}"),
            );
            seen(method.to_string());
        }
        Some(c) => {
            let listed = |list: &Value| list.as_array().is_some_and(|l| l.contains(&json!(c)));
            assert!(
                listed(&spec["errors"]) || listed(&SCHEMA["common_errors"]),
                "{method} answered error {c}, which the schema lists neither for it nor for \
                 every method: {response}"
            );
            seen(format!("{method}!{c}"));
        }
    }
}

/// A notification, against the schema.
#[track_caller]
pub fn check_notification(n: &Value) {
    let method = n["method"].as_str().expect("a notification's method");
    assert!(
        SCHEMA["notifications"].get(method).is_some(),
        "notification {method} is not in docs/jsonrpc.schema.json: {n}"
    );
    assert_valid(
        &format!("/notifications/{method}/params"),
        &n["params"],
        &format!("notification {method}"),
    );
    seen(format!("notify:{method}"));
}

/// Longest wait for any one answer or notification.
pub const WAIT: Duration = Duration::from_secs(60);

/// One line from the daemon, parsed and checked against the schema (a
/// notification's params, an error's shape and code).
#[track_caller]
pub fn parse_line(l: &str) -> Value {
    let v: Value = serde_json::from_str(l)
        .unwrap_or_else(|e| panic!("the daemon wrote a non-JSON line ({e}): {l:?}"));
    assert_eq!(v["jsonrpc"], "2.0", "{l}");
    if v.get("method").is_some() {
        check_notification(&v);
    } else if let Some(e) = v.get("error") {
        check_error(e);
    }
    v
}

/// A running `tern daemon`, SIGKILLed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
}

pub fn drain(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
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
pub fn daemon_cmd(sandbox: &Path, homes: &[&Path], socket: &Path, extra: &[&str]) -> Command {
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
    pub fn start(mut c: Command, socket: &Path) -> Daemon {
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

    pub fn connect(&self) -> Rpc {
        Rpc::connect(&self.socket)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JSON-RPC client: requests out, responses and notifications in.
pub struct Rpc {
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

    pub fn over(out: Box<dyn Write + Send>, input: impl Read + Send + 'static) -> Rpc {
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

    pub fn write_line(&mut self, line: &str) {
        self.out
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.out.flush())
            .expect("writing to the daemon");
    }

    /// The next line, parsed; `None` once the daemon hung up.
    pub fn read(&mut self, limit: Duration) -> Option<Value> {
        match self.lines.recv_timeout(limit) {
            Ok(l) => Some(parse_line(&l)),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("nothing from the daemon within {limit:?}"),
        }
    }

    /// The response to the next line sent (notifications are kept).
    pub fn response(&mut self) -> Value {
        loop {
            let v = self.read(WAIT).expect("the daemon hung up");
            if v.get("method").is_some() {
                self.notes.push_back(v);
            } else {
                return v;
            }
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.write_line(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        );
        let r = self.response();
        assert_eq!(r["id"], id, "{r}");
        check_exchange(method, &params, &r);
        r
    }

    #[track_caller]
    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params.clone());
        assert!(r.get("error").is_none(), "{method} {params} failed: {r}");
        r["result"].clone()
    }

    #[track_caller]
    pub fn error(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params.clone());
        assert!(
            r.get("result").is_none(),
            "{method} {params} succeeded: {r}"
        );
        r["error"].clone()
    }

    /// The next notification of `method`, waiting up to `limit`; `None` if
    /// none came (other notifications are dropped).
    pub fn notification(&mut self, method: &str, limit: Duration) -> Option<Value> {
        self.notification_where(method, limit, |_| true)
    }

    /// The next notification of `method` whose params satisfy `pred`,
    /// waiting up to `limit`; `None` if none came (others are dropped).
    pub fn notification_where(
        &mut self,
        method: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self
                .notes
                .iter()
                .position(|n| n["method"] == method && pred(&n["params"]))
            {
                let n = self.notes.remove(i).unwrap();
                return Some(n["params"].clone());
            }
            self.notes.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.lines.recv_timeout(left) {
                Ok(l) => self.notes.push_back(parse_line(&l)),
                Err(_) => return None,
            }
        }
    }

    /// The notifications that came while waiting for responses, oldest
    /// first (taken).
    pub fn take_notes(&mut self) -> Vec<Value> {
        self.notes.drain(..).collect()
    }

    /// The next `n` messages.
    #[track_caller]
    pub fn messages(&mut self, n: usize) -> Vec<Value> {
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
pub fn pair(relay: &Relay) -> (Profile, Profile) {
    let a = Profile::new("Ada", &[relay]);
    let b = Profile::new("Bob", &[relay]);
    connect(&a, "bob", &b, "ada");
    (a, b)
}

pub fn socket_in(p: &Profile, name: &str) -> PathBuf {
    let dir = p.sandbox().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir.join(name)
}

pub fn label(p: &Profile) -> String {
    p.home.display().to_string()
}

/// Polls `log` through the daemon until the history with `contact` holds
/// `n` messages from them.
pub fn wait_for_history(rpc: &mut Rpc, profile: &str, contact: &str, n: usize) -> Vec<Value> {
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
