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
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_rfc3339() {
        assert_eq!(super::time(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::time(1_764_097_200_000), "2025-11-25T19:00:00Z");
        assert_eq!(super::time(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
