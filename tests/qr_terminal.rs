//! The QR code on a terminal: it fits the terminal or tern says so (and
//! offers `--png` and `--link`), and a screenshot of it reads on a dark and
//! on a light terminal, with colour and with NO_COLOR. `tern verify --image`
//! reads a screenshot of what `tern verify` shows.
//!
//! Screenshots are drawn here from the text tern prints, as a terminal
//! would: a character cell is 8×16 pixels, the half blocks fill their half
//! with the foreground colour, ANSI 256-colour codes 16 and 231 are black
//! and white, everything else uses the theme's own colours.

mod cli_common;
mod qr_common;

use std::path::Path;
use std::process::Command;

use cli_common::*;
use image::{GrayImage, Luma};
use qr_common::*;
use tern::cli::qr::{terminal_fit, Palette, TooSmall};

#[derive(Debug, Clone, Copy)]
struct Theme {
    name: &'static str,
    fg: u8,
    bg: u8,
}

const DARK: Theme = Theme {
    name: "dark",
    fg: 0xd0,
    bg: 0x1e,
};
const LIGHT: Theme = Theme {
    name: "light",
    fg: 0x20,
    bg: 0xfa,
};

/// The lines of `out` that draw the code (half blocks, spaces, colours).
fn art_lines(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| {
            l.contains(['\u{2580}', '\u{2584}', '\u{2588}'])
                && l.chars().all(|c| {
                    matches!(
                        c,
                        ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\x1b' | '[' | ';' | 'm'
                    ) || c.is_ascii_digit()
                })
        })
        .collect()
}

/// A screenshot of terminal text drawn with `theme`, with a margin of
/// background around it.
fn screenshot(lines: &[String], theme: Theme) -> GrayImage {
    const CW: u32 = 8;
    const CH: u32 = 16;
    const MARGIN: u32 = 3;
    let width = lines.iter().map(|l| visible_len(l)).max().unwrap_or(0) as u32;
    let mut img = GrayImage::from_pixel(
        (width + 2 * MARGIN) * CW,
        (lines.len() as u32 + 2 * MARGIN) * CH,
        Luma([theme.bg]),
    );
    for (y, line) in lines.iter().enumerate() {
        let (mut fg, mut bg) = (theme.fg, theme.bg);
        let mut x = 0u32;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                let mut seq = String::new();
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                    seq.push(d);
                }
                let params: Vec<u32> = seq
                    .trim_start_matches('[')
                    .split(';')
                    .filter_map(|p| p.parse().ok())
                    .collect();
                let colour = |n: u32| if n == 16 { 0 } else { 255 };
                match params.as_slice() {
                    [0] | [] => (fg, bg) = (theme.fg, theme.bg),
                    [38, 5, f, 48, 5, b] => (fg, bg) = (colour(*f), colour(*b)),
                    other => panic!("unexpected escape {other:?}"),
                }
                continue;
            }
            let (top, bottom) = match c {
                '\u{2580}' => (fg, bg),
                '\u{2584}' => (bg, fg),
                '\u{2588}' => (fg, fg),
                ' ' => (bg, bg),
                other => panic!("unexpected character {other:?}"),
            };
            for dy in 0..CH {
                for dx in 0..CW {
                    let v = if dy < CH / 2 { top } else { bottom };
                    img.put_pixel(
                        (x + MARGIN) * CW + dx,
                        (y as u32 + MARGIN) * CH + dy,
                        Luma([v]),
                    );
                }
            }
            x += 1;
        }
    }
    img
}

fn visible_len(line: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in line.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// Reads a screenshot with tern, and with zbarimg when it is installed.
fn read(img: &GrayImage, dir: &Path, name: &str) -> (Option<String>, Option<String>) {
    let ours = tern::cli::qr::decode(img);
    let theirs = have_program("zbarimg")
        .then(|| {
            let path = dir.join(format!("{name}.png"));
            img.save(&path).unwrap();
            zbarimg(&path)
        })
        .flatten();
    (ours, theirs)
}

#[test]
fn a_screenshot_of_the_code_reads_on_dark_and_light_terminals() {
    let dir = tempfile::tempdir().unwrap();
    for n in [1, 3] {
        let link = fixed_invitation(n).to_link();
        // A roomy terminal (full quiet zone) and a tight one (narrow quiet
        // zone, or level L).
        for size in [(120, 60), (80, 30)] {
            for palette in [Palette::Ansi, Palette::DrawLight, Palette::DrawDark] {
                let art = match terminal_fit(&link, palette, Some(size)).unwrap() {
                    Ok(art) => art,
                    Err(e) => {
                        assert!(n == 3 && size == (80, 30), "{n} relays, {size:?}: {e}");
                        continue;
                    }
                };
                assert!(art.columns <= size.0 && art.rows < size.1);
                let lines: Vec<String> = art.text.lines().map(str::to_string).collect();
                assert_eq!(lines.len(), art.rows);
                assert!(lines.iter().all(|l| visible_len(l) == art.columns));
                for theme in [DARK, LIGHT] {
                    let what =
                        format!("{n} relays, {size:?}, {palette:?}, {} terminal", theme.name);
                    let img = screenshot(&lines, theme);
                    let (ours, theirs) = read(&img, dir.path(), &what.replace([' ', ','], "_"));
                    assert_eq!(
                        ours.as_deref(),
                        Some(link.as_str()),
                        "tern reads it: {what}"
                    );
                    // A normal (dark on light) code, which every reader
                    // reads: colours always; without them, the palette made
                    // for that terminal.
                    let normal = matches!(
                        (palette, theme.name),
                        (Palette::Ansi, _)
                            | (Palette::DrawLight, "dark")
                            | (Palette::DrawDark, "light")
                    );
                    if normal && have_program("zbarimg") {
                        assert_eq!(
                            theirs.as_deref(),
                            Some(link.as_str()),
                            "zbarimg reads it: {what}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_smallest_layout_that_fits_and_a_clear_no_when_none_does() {
    let one = fixed_invitation(1).to_link();
    let three = fixed_invitation(3).to_link();
    // Version 8 at level M: 49 modules; with the full quiet zone 57×29.
    let art = terminal_fit(&one, Palette::Ansi, Some((80, 40)))
        .unwrap()
        .unwrap();
    assert_eq!((art.columns, art.rows), (57, 29));
    // 80×28: the quiet zone narrows to 2 modules (53×27).
    let art = terminal_fit(&one, Palette::Ansi, Some((80, 28)))
        .unwrap()
        .unwrap();
    assert_eq!((art.columns, art.rows), (53, 27));
    // 80×26: level L gives version 7 (45 modules, 49×25).
    let art = terminal_fit(&one, Palette::Ansi, Some((80, 26)))
        .unwrap()
        .unwrap();
    assert_eq!((art.columns, art.rows), (49, 25));
    // 80×24 holds no invitation: the smallest layout is named.
    assert_eq!(
        terminal_fit(&one, Palette::Ansi, Some((80, 24))).unwrap(),
        Err(TooSmall {
            needs: (49, 25),
            has: (80, 24)
        })
    );
    // Three relays: version 12 (65 modules) at level M.
    let art = terminal_fit(&three, Palette::DrawLight, Some((80, 40)))
        .unwrap()
        .unwrap();
    assert_eq!((art.columns, art.rows), (73, 37));
    let small = terminal_fit(&three, Palette::Ansi, Some((40, 100)))
        .unwrap()
        .unwrap_err();
    assert_eq!(small.has, (40, 100));
    assert!(small.needs.0 > 40, "{small}");
    // Without a size there is no limit: the full layout.
    let art = terminal_fit(&three, Palette::Ansi, None).unwrap().unwrap();
    assert_eq!(art.columns, 65 + 8);
}

/// Runs tern under a pseudo-terminal (util-linux `script`), as a person at
/// a terminal would; the terminal's size comes from COLUMNS and LINES.
fn at_terminal(p: &Profile, args: &[&str], size: (usize, usize), color: bool) -> (i32, String) {
    let inner = p.cmd(args);
    let mut line = shell_quote(inner.get_program().to_str().unwrap());
    for a in inner.get_args() {
        line.push(' ');
        line.push_str(&shell_quote(a.to_str().unwrap()));
    }
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.env("COLUMNS", size.0.to_string())
        .env("LINES", size.1.to_string())
        .env("TERM", "xterm-256color");
    if color {
        c.env_remove("NO_COLOR");
    }
    let o = run_cmd(c, None, HANG_GUARD);
    (o.status.code().unwrap_or(-1), stdout(&o).replace('\r', ""))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn invite_at_a_terminal_fits_or_says_so() {
    if !have_program("script") {
        println!("note: util-linux `script` is not installed; skipped");
        return;
    }
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let dir = tempfile::tempdir().unwrap();

    // A roomy terminal: the code, then the link; a screenshot reads.
    for color in [true, false] {
        let (code, out) = at_terminal(
            &a,
            &["invite", "--name", &format!("c{color}")],
            (100, 40),
            color,
        );
        assert_eq!(code, 0, "{out}");
        let link = out
            .lines()
            .find(|l| l.starts_with("TERN:"))
            .unwrap_or_else(|| panic!("no link in {out}"))
            .to_string();
        let lines = art_lines(&out);
        assert!(!lines.is_empty(), "a code is shown: {out}");
        let last = out.trim_end().lines().last().unwrap();
        assert!(
            art_lines(last).len() == 1,
            "the code comes last, whole on screen: {out}"
        );
        let img = screenshot(&lines, DARK);
        assert_eq!(
            read(&img, dir.path(), &format!("invite-{color}"))
                .0
                .as_deref(),
            Some(link.as_str()),
            "{out}"
        );
    }

    // 80×24: no layout fits. Without --qr, the link instead and why.
    let before = a.contacts().len();
    let (code, out) = at_terminal(&a, &["invite", "--name", "small"], (80, 24), true);
    assert_eq!(code, 0, "{out}");
    assert!(art_lines(&out).is_empty(), "no code drawn: {out}");
    assert!(
        out.contains("needs 49×25 characters but this terminal has 80×24"),
        "{out}"
    );
    assert!(
        out.contains("--png") && out.contains("showing the link instead"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("TERN:")), "{out}");
    assert_eq!(a.contacts().len(), before + 1);
    // With --qr: refused before anything is made.
    let (code, out) = at_terminal(
        &a,
        &["invite", "--qr", "--name", "refused"],
        (40, 100),
        false,
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("this terminal has 40×100") && out.contains("--link"),
        "{out}"
    );
    assert!(out.contains("no invitation was made"), "{out}");
    assert_eq!(a.contacts().len(), before + 1, "nothing was made");
}

#[test]
fn verify_reads_a_screenshot_of_the_contacts_code() {
    if !have_program("script") {
        println!("note: util-linux `script` is not installed; skipped");
        return;
    }
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let dir = tempfile::tempdir().unwrap();

    // What Bram's terminal shows for `tern verify ada`, as a screenshot.
    let (code, out) = at_terminal(&b, &["verify", "ada"], (100, 40), true);
    assert_eq!(code, 0, "{out}");
    let shown = dir.path().join("bram-screen.png");
    screenshot(&art_lines(&out), DARK).save(&shown).unwrap();
    let o = a.run(&["verify", "bram", "--image", shown.to_str().unwrap()]);
    assert_code(&o, 0, "the codes match");
    assert!(stderr(&o).contains("codes match"), "{}", stderr(&o));
    assert_eq!(a.contact("bram")["security"], "verified");

    // Another connection's code: a mismatch, exit 4.
    let c = Profile::new("Cleo", &[&r]);
    connect(&a, "cleo", &c, "ada");
    let (_, out) = at_terminal(&c, &["verify", "ada"], (100, 40), false);
    let other = dir.path().join("cleo-screen.png");
    screenshot(&art_lines(&out), LIGHT).save(&other).unwrap();
    let o = a.run(&["verify", "bram", "--image", other.to_str().unwrap()]);
    assert_code(&o, 4, "another contact's code");
    assert!(
        stderr(&o).contains("SECURITY CODES DIFFER"),
        "{}",
        stderr(&o)
    );

    // Pictures without a code are usage errors, not mismatches.
    let link = a.ok(&["invite", "--link", "--name", "dora"]);
    let invitation = dir.path().join("invitation.png");
    tern::cli::qr::png(link.trim(), &invitation).unwrap();
    let blank = dir.path().join("blank.png");
    GrayImage::from_pixel(200, 200, Luma([255]))
        .save(&blank)
        .unwrap();
    let not_an_image = dir.path().join("text.png");
    std::fs::write(&not_an_image, "hello").unwrap();
    for (f, what) in [
        (&invitation, "an invitation's QR code"),
        (&blank, "no QR code"),
        (&not_an_image, "not an image"),
    ] {
        let o = a.run(&["verify", "cleo", "--image", f.to_str().unwrap()]);
        assert_code(&o, 2, what);
    }
    let o = a.run(&["verify", "cleo", "123", "--image", blank.to_str().unwrap()]);
    assert_code(&o, 2, "a code and a picture at once");
}
