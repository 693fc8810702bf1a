//! Writing to stdout: a closed pipe (`tern recv | head -1`) ends tern
//! quietly instead of being an error.

use std::io::{self, IsTerminal, Write};

/// Writes one line to stdout and flushes it, so `--follow` output reaches a
/// pipe at once. Exits with success if the reader has gone away.
pub fn line(s: &str) {
    let mut out = io::stdout().lock();
    let r = writeln!(out, "{s}").and_then(|_| out.flush());
    if let Err(e) = r {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

pub fn json(v: &serde_json::Value) {
    line(&v.to_string());
}

pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

pub fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}

/// A diagnostic on stderr.
pub fn note(s: &str) {
    let _ = writeln!(io::stderr(), "tern: {s}");
}

/// RFC 3339 UTC time for milliseconds since the Unix epoch.
pub fn time(ms: u64) -> String {
    crate::time::rfc3339(ms)
}
