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

/// The socket of the daemon serving `home`, if one runs. `TERN_NO_DAEMON`
/// (set, non-empty) makes commands ignore it.
pub fn find(home: &Path) -> Option<PathBuf> {
    if std::env::var_os("TERN_NO_DAEMON").is_some_and(|v| !v.is_empty()) {
        return None;
    }
    super::lock::running_socket(home)
}

/// A JSON-RPC error from the daemon, with what it said.
pub struct CallError {
    pub error: anyhow::Error,
    /// `error.data`: for `send`, the message's id and state.
    pub data: Value,
}

/// Calls `method` on the daemon at `socket`. A JSON-RPC error becomes an
/// error with the exit code the daemon says it stands for.
pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value, CallError> {
    call_timeout(socket, method, params, CALL_TIMEOUT)
}

/// [`call`] for a method that may take longer (`send` with
/// `wait_delivered`).
pub fn call_timeout(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, CallError> {
    let plain = |e: anyhow::Error| CallError {
        error: e,
        data: Value::Null,
    };
    let reached = || format!("talking to the tern daemon at {}", socket.display());
    let mut stream = UnixStream::connect(socket)
        .with_context(reached)
        .map_err(plain)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .with_context(reached)
        .map_err(plain)?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(stream, "{request}")
        .with_context(reached)
        .map_err(plain)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .with_context(reached)
            .map_err(plain)?;
        if n == 0 {
            return Err(plain(fail(
                FAILURE,
                format!(
                    "the tern daemon at {} hung up without an answer; whether the {method} took \
                     effect is unknown (see its log)",
                    socket.display()
                ),
            )));
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(reached)
            .map_err(plain)?;
        if v.get("id") != Some(&json!(1)) {
            continue;
        }
        if let Some(e) = v.get("error") {
            let code = e["data"]["exit_code"]
                .as_u64()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(FAILURE);
            let message = e["message"]
                .as_str()
                .unwrap_or("the daemon failed")
                .to_string();
            return Err(CallError {
                error: fail(code, message),
                data: e.get("data").cloned().unwrap_or(Value::Null),
            });
        }
        return Ok(v.get("result").cloned().unwrap_or(Value::Null));
    }
}
