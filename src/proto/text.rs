//! What a name or a status may contain, and when two names are the same
//! (PROTOCOL.md §5.5). Names and statuses come from contacts and other
//! devices, so they are hostile input: they must not be able to reorder or
//! hide text on a screen (bidirectional controls, zero-width characters),
//! break a line, or pass for another name.
//!
//! Character classes come from the Unicode Character Database as packaged
//! by `unicode-properties` (general categories) and `unicode-normalization`
//! (NFKC), never from a table of our own.

use std::borrow::Cow;
use std::fmt::Write as _;

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// The Unicode version whose character data these rules use.
pub const UNICODE_VERSION: (u64, u64, u64) = unicode_properties::UNICODE_VERSION;

/// Characters no name or status may hold: general categories Cc (C0,
/// DEL, C1 controls), Cf (format characters: the bidirectional controls
/// U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069, the zero-width
/// U+200B–U+200D, U+2060, U+FEFF, the soft hyphen U+00AD and the rest),
/// Zl and Zp (U+2028, U+2029: line breaks by another name).
pub fn is_forbidden(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Why a name is refused, or `None` if it is acceptable. `max` is its
/// limit in bytes.
pub fn name_problem(name: &str, max: usize) -> Option<String> {
    if name.len() > max {
        return Some(format!("at most {max} bytes (this one is {})", name.len()));
    }
    if name.chars().all(char::is_whitespace) {
        return Some("must not be empty or only white space".into());
    }
    forbidden_problem(name, |_| false)
}

/// Why a status is refused (line feeds are allowed), or `None`.
pub fn status_problem(status: &str, max: usize) -> Option<String> {
    if status.len() > max {
        return Some(format!(
            "at most {max} bytes (this one is {})",
            status.len()
        ));
    }
    forbidden_problem(status, |c| c == '\n')
}

fn forbidden_problem(s: &str, allowed: impl Fn(char) -> bool) -> Option<String> {
    s.chars()
        .find(|&c| is_forbidden(c) && !allowed(c))
        .map(|c| {
            format!(
                "must not contain control, bidirectional or invisible format characters \
                 (it has U+{:04X})",
                c as u32
            )
        })
}

/// The form two names are compared in: NFKC (so full-width, ligature and
/// other compatibility variants fold onto the plain letters), every run of
/// white space one space, none at either end. Two contacts never share a
/// key; `tern` adds `-2`, `-3`, … to a new one that would.
pub fn name_key(name: &str) -> String {
    let folded: String = name.nfkc().collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

// Showing text (PROTOCOL.md §5.5, "Showing text"): what tern writes to a
// terminal never holds a raw control or bidi character.

/// U+200C ZERO WIDTH NON-JOINER and U+200D ZERO WIDTH JOINER (Unicode's
/// Join_Control property): format characters that only choose glyph
/// forms — Persian and Indic text and emoji sequences need them — and
/// move nothing on the line.
fn is_join_control(c: char) -> bool {
    matches!(c, '\u{200C}' | '\u{200D}')
}

fn push_escape(out: &mut String, c: char) {
    let _ = match c {
        '\n' => write!(out, "\\n"),
        '\r' => write!(out, "\\r"),
        '\t' => write!(out, "\\t"),
        c if (c as u32) < 0x100 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    };
}

fn escape_if(s: &str, bad: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(&bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            push_escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One line of a message body for the terminal: every control character
/// (C0, DEL, C1) but tab, every format character (category Cf: the
/// bidirectional controls, zero-width spaces, invisible tag characters) but
/// the two join controls, and the Unicode line separators become visible
/// escapes. Split the body on `\n` first: a newline here is escaped too.
pub fn escape_body(s: &str) -> Cow<'_, str> {
    escape_if(s, |c| is_forbidden(c) && c != '\t' && !is_join_control(c))
}

/// A name, status, relay address or error text for the terminal: every
/// control character (tab and newline included) and every format character
/// (general category Cf: bidi controls, zero-width characters) is escaped.
/// Names that pass PROTOCOL.md §5.5 are unchanged by it.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    escape_if(s, is_forbidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIDI: &[char] = &[
        '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
        '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
    ];
    const ZERO_WIDTH: &[char] = &['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}'];

    #[test]
    fn every_control_and_format_character_is_refused() {
        let controls = (0u32..0x20)
            .chain(0x7f..0xa0)
            .map(|c| char::from_u32(c).unwrap());
        for c in controls
            .chain(BIDI.iter().copied())
            .chain(ZERO_WIDTH.iter().copied())
        {
            let name = format!("Ada{c}");
            assert!(
                name_problem(&name, 64).is_some(),
                "U+{:04X} accepted",
                c as u32
            );
            if c != '\n' {
                assert!(status_problem(&name, 512).is_some(), "U+{:04X}", c as u32);
            }
        }
        for c in ['\u{2028}', '\u{2029}', '\u{00AD}'] {
            assert!(name_problem(&format!("a{c}b"), 64).is_some());
        }
        assert!(status_problem("two\nlines", 512).is_none());
        assert!(name_problem("two\nlines", 64).is_some());
    }

    #[test]
    fn ordinary_names_pass() {
        for n in [
            "Ada",
            "Zoë Ünal",
            "李小龍",
            "محمد",
            "Ada 🙂",
            "O'Brien-Smith",
        ] {
            assert_eq!(name_problem(n, 64), None, "{n}");
        }
        assert!(name_problem(" \u{3000} ", 64).is_some());
        assert!(name_problem("", 64).is_some());
        assert!(name_problem(&"x".repeat(65), 64).is_some());
    }

    #[test]
    fn keys_fold_compatibility_forms_and_space() {
        assert_eq!(name_key("Ａｄａ"), "Ada");
        assert_eq!(name_key("ﬁona"), "fiona");
        assert_eq!(name_key(" Ada\u{00A0} Lovelace "), "Ada Lovelace");
        assert_ne!(name_key("Ada"), name_key("ada"));
    }
}
