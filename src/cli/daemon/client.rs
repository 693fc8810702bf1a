//! The one-shot commands' side: a command whose home a daemon serves asks
//! the daemon instead of unlocking the profile a second time and opening
//! relay sessions of its own.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::cli::exit::{fail, FAILURE};

/// How long a call may take: a send waits for the relays (each has its own
/// timeouts, well within this).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// An open connection to the daemon serving a home.
pub struct Connection {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

/// The daemon serving `home`, connected, if one runs and is ours.
/// `TERN_NO_DAEMON` (set, non-empty) makes commands ignore it.
///
/// The connection made to learn that the daemon is alive is the one the
/// command then uses: a one-shot command through the daemon is about one
/// process start and one round trip, and a second connect would be a
/// tenth of it.
pub fn find(home: &Path) -> anyhow::Result<Option<Connection>> {
    if std::env::var_os("TERN_NO_DAEMON").is_some_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    let Some(socket) = super::lock::socket_of(home) else {
        return Ok(None);
    };
    let Ok(stream) = UnixStream::connect(&socket) else {
        // Stale: left by a daemon that was killed.
        return Ok(None);
    };
    // The text of a message goes to whoever listens there: only to a
    // process of our own user, whatever the lock file says.
    let peer = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(std::io::Error::from)
        .with_context(|| format!("asking who listens on {}", socket.display()))?;
    let uid = rustix::process::getuid();
    if peer.uid != uid {
        return Err(fail(
            FAILURE,
            format!(
                "the daemon socket {} named in {} is served by another user (uid {}): nothing \
                 was sent to it; stop that process or remove the lock file",
                socket.display(),
                home.join(super::lock::LOCK_FILE).display(),
                peer.uid.as_raw()
            ),
        ));
    }
    Ok(Some(Connection {
        socket,
        reader: BufReader::new(stream),
        next_id: 1,
    }))
}

/// A JSON-RPC error from the daemon, with what it said.
pub struct CallError {
    pub error: anyhow::Error,
    /// `error.data`: for `send`, the message's id and state.
    pub data: Value,
}

/// The error a JSON-RPC error object stands for, with the exit code the
/// daemon gives it.
pub fn rpc_failure(e: &Value, default: &str) -> anyhow::Error {
    let code = e["data"]["exit_code"]
        .as_u64()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(FAILURE);
    fail(code, e["message"].as_str().unwrap_or(default).to_string())
}

impl Connection {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn reached(&self) -> String {
        format!("talking to the tern daemon at {}", self.socket.display())
    }

    /// Writes one request (in one write: the daemon reads lines, and a
    /// request written piecemeal costs it a wake-up per piece).
    pub fn request(&mut self, id: Value, method: &str, params: Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .with_context(|| self.reached())
    }

    /// Reads one line into `line` (cleared first), waiting at most
    /// `timeout` (`None`: for ever); `Ok(0)` when the daemon hung up.
    pub fn read_line(
        &mut self,
        line: &mut String,
        timeout: Option<Duration>,
    ) -> std::io::Result<usize> {
        line.clear();
        self.reader.get_ref().set_read_timeout(timeout)?;
        self.reader.read_line(line)
    }

    /// Calls `method`. A JSON-RPC error becomes an error with the exit code
    /// the daemon says it stands for.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        self.call_timeout(method, params, CALL_TIMEOUT)
    }

    /// [`Connection::call`] for a method that may take longer (`send` with
    /// `wait_delivered`).
    pub fn call_timeout(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let plain = |e: anyhow::Error| CallError {
            error: e,
            data: Value::Null,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.reader
            .get_ref()
            .set_write_timeout(Some(timeout))
            .with_context(|| self.reached())
            .map_err(plain)?;
        self.request(json!(id), method, params).map_err(plain)?;
        let mut line = String::new();
        loop {
            let n = self
                .read_line(&mut line, Some(timeout))
                .with_context(|| self.reached())
                .map_err(plain)?;
            if n == 0 {
                return Err(plain(fail(
                    FAILURE,
                    format!(
                        "the tern daemon at {} hung up without an answer; whether the {method} \
                         took effect is unknown (see its log)",
                        self.socket.display()
                    ),
                )));
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| self.reached())
                .map_err(plain)?;
            if v.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(CallError {
                    error: rpc_failure(e, "the daemon failed"),
                    data: e.get("data").cloned().unwrap_or(Value::Null),
                });
            }
            return Ok(v.get("result").cloned().unwrap_or(Value::Null));
        }
    }
}
