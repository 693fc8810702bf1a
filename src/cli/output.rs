//! Writing to stdout and stderr.
//!
//! Everything a contact, a device or a relay chose (message text, names,
//! statuses, error texts) is hostile: written raw to a terminal it could
//! clear the screen, set the window title, move the cursor over the sender
//! column or reorder the line (`printf '\033[2J'`, a bare CR, U+202E). So
//! text output passes through [`body`] or [`text`], which show such
//! characters as visible escapes (`\x1b`, `\r`, `\u{202e}`), and JSON
//! output writes them as `\u` escapes: the same JSON value, exactly, with
//! no raw control byte in it.
//!
//! A closed pipe (`tern recv | head -1`) ends tern quietly instead of being
//! an error.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};

use unicode_width::UnicodeWidthStr;

use crate::proto::text::is_forbidden;

pub use crate::proto::text::{escape_body as body, escape_text as text};

/// `s` (already escaped) padded with spaces to `width` terminal columns:
/// wide characters (CJK, emoji) take two, combining marks none.
pub fn pad(s: &str, width: usize) -> String {
    let w = UnicodeWidthStr::width(s);
    format!("{s}{}", " ".repeat(width.saturating_sub(w)))
}

fn write_line(s: &str) {
    let mut out = io::stdout().lock();
    let r = writeln!(out, "{s}").and_then(|_| out.flush());
    if let Err(e) = r {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Writes one line of text to stdout and flushes it, so `--follow` output
/// reaches a pipe at once. Anything a terminal would act on is escaped
/// (as [`body`]); callers escape names with [`text`]. Exits with success
/// if the reader has gone away.
pub fn line(s: &str) {
    write_line(&body(s));
}

/// JSON with every control, format and line-separator character written
/// as a `\uXXXX` escape: `serde_json` leaves DEL, C1 and U+202E raw, and
/// `tern recv --json` on a terminal must be as safe as the text form. The
/// characters can only occur inside strings (JSON's own syntax is ASCII
/// without them), so the value is exactly the same.
pub fn json_text(v: &serde_json::Value) -> String {
    let raw = v.to_string();
    let bad = |c: char| is_forbidden(c);
    if !raw.chars().any(bad) {
        return raw;
    }
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        if bad(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{:04x}", u);
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn json(v: &serde_json::Value) {
    write_line(&json_text(v));
}

/// Writes one line to stdout and flushes it, and says whether that worked:
/// for output that counts as delivered only once written (`tern recv`).
pub fn try_line(s: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{s}").and_then(|_| out.flush())
}

pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

pub fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}

/// A diagnostic on stderr, escaped as [`text`]: notes quote names and
/// relays' error texts.
pub fn note(s: &str) {
    let _ = writeln!(io::stderr(), "tern: {}", text(s));
}

/// RFC 3339 UTC time for milliseconds since the Unix epoch.
pub fn time(ms: u64) -> String {
    crate::time::rfc3339(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_acts_on() {
        assert_eq!(
            body("hi \x1b[2J\x1b]0;pwned\x07 \r x\u{9b}y\u{202e}"),
            "hi \\x1b[2J\\x1b]0;pwned\\x07 \\r x\\x9by\\u{202e}"
        );
        assert_eq!(body("a\tb 👩\u{200d}💻"), "a\tb 👩\u{200d}💻");
        assert_eq!(
            body("x\u{200b}\u{e0041}\u{2066}"),
            "x\\u{200b}\\u{e0041}\\u{2066}"
        );
        assert_eq!(text("a\tb\u{200b}"), "a\\tb\\u{200b}");
        assert!(matches!(body("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_exact() {
        let s = "\x1b[2J \u{7f}\u{85}\u{202e}\u{2028} é 🙂";
        let v = serde_json::json!({ "text": s });
        let out = json_text(&v);
        assert!(
            out.is_ascii() || !out.chars().any(|c| c.is_control()),
            "{out}"
        );
        assert!(!out.contains('\u{202e}') && !out.contains('\u{85}'));
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn pads_by_columns() {
        assert_eq!(pad("李", 4), "李  ");
        assert_eq!(pad("ab", 4), "ab  ");
        assert_eq!(pad("abcdef", 4), "abcdef");
    }
}
