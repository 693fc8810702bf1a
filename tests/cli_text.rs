//! Hostile text (issue 14 item 4): what a contact writes never reaches the
//! terminal as a control character, names refuse bidirectional and
//! invisible format characters, duplicates are found after NFKC, and JSON
//! output keeps every character exactly.

mod cli_common;

use cli_common::*;
use tern::client::model::{Settings, SETTINGS};
use tern::store::{KeySource, Store};

/// Every C0 control, DEL and every C1 control.
fn controls() -> Vec<char> {
    (0u32..0x20)
        .chain(0x7f..0xa0)
        .map(|c| char::from_u32(c).unwrap())
        .collect()
}

/// The bidirectional controls (Bidi_Control) and the common zero-width
/// characters.
const BIDI: &[char] = &[
    '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];
const INVISIBLE: &[char] = &[
    '\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{00AD}',
];

/// Whether text output holds something a terminal would act on: a control
/// character other than newline (and tab, which only moves the cursor
/// right), or a bidi control.
fn terminal_unsafe(out: &str) -> Option<char> {
    out.chars().find(|&c| {
        (c.is_control() && c != '\n' && c != '\t') || BIDI.contains(&c) || c == '\u{2028}'
    })
}

#[test]
fn hostile_message_text_is_escaped_in_recv_and_log_and_exact_in_json() {
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&ada, "bob", &bob, "ada");

    // The reproduction, a bare CR that would rewrite the sender
    // column, then every control and the bidi set.
    let mut hostile = String::from("hi \x1b[2J\x1b[H\x1b[42mFAKE\x1b[0m \x1b]0;pwned\x07 ");
    hostile.push_str("\r2026-01-01T00:00:00Z  mallory: fake|");
    for c in controls().into_iter().chain(BIDI.iter().copied()) {
        hostile.push(c);
        hostile.push('.');
    }
    hostile.push_str("end");
    bob.ok_stdin(&["send", "ada"], hostile.as_bytes());

    let o = ada.run(&["recv"]);
    assert_code(&o, 0, "recv");
    let out = stdout(&o);
    assert_eq!(terminal_unsafe(&out), None, "recv printed raw: {out:?}");
    assert!(out.contains("hi \\x1b[2J\\x1b[H"), "{out}");
    assert!(out.contains("\\r2026-01-01"), "the CR is shown: {out}");
    assert!(out.contains("\\u{202e}") && out.contains("\\x9b"), "{out}");
    assert!(
        out.contains('\t'),
        "a tab in a message stays a tab: {out:?}"
    );
    // The newline inside the message starts an indented line, which cannot
    // pass for a message of its own.
    for l in out.lines().skip(1) {
        assert!(l.starts_with("    "), "continuation line {l:?} in {out}");
    }

    let o = ada.run(&["log", "bob"]);
    let log = stdout(&o);
    assert_eq!(terminal_unsafe(&log), None, "log printed raw: {log:?}");
    assert!(log.contains("\\x1b]0;pwned\\x07"), "{log}");

    let o = ada.run(&["log", "bob", "--json"]);
    let raw = stdout(&o);
    assert!(
        !raw.chars().any(|c| c.is_control() && c != '\n') && terminal_unsafe(&raw).is_none(),
        "log --json wrote a raw control character: {raw:?}"
    );
    assert_eq!(
        texts(&json_lines(&raw)),
        vec![hostile.clone()],
        "JSON is exact"
    );

    // recv --json: the same, for a second message.
    bob.ok_stdin(&["send", "ada"], hostile.as_bytes());
    let o = ada.run(&["recv", "--json"]);
    let raw = stdout(&o);
    assert!(
        terminal_unsafe(&raw).is_none() && !raw.contains('\u{85}'),
        "recv --json wrote a raw control character: {raw:?}"
    );
    assert_eq!(texts(&json_lines(&raw)), vec![hostile]);
}

#[test]
fn names_and_statuses_refuse_controls_bidi_and_invisible_characters() {
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    let fresh = Profile::empty("X");
    for c in controls()
        .into_iter()
        .chain(BIDI.iter().copied())
        .chain(INVISIBLE.iter().copied())
        .chain(['\u{2028}', '\u{2029}'])
        // No argument can hold NUL; the unit tests and messages cover it.
        .filter(|&c| c != '\0')
    {
        let name = format!("Ad{c}a");
        let what = format!("U+{:04X}", c as u32);
        let o = ada.run(&["profile", "--name", &name]);
        assert_code(&o, 2, &format!("profile --name with {what}"));
        assert!(
            stderr(&o).contains(&format!("U+{:04X}", c as u32)),
            "the error names the character: {}",
            stderr(&o)
        );
        assert_eq!(
            terminal_unsafe(&stderr(&o)),
            None,
            "the error quotes it raw: {:?}",
            stderr(&o)
        );
        if c != '\n' {
            let o = ada.run(&["profile", "--status", &format!("away{c}")]);
            assert_code(&o, 2, &format!("profile --status with {what}"));
        }
        // A few more entry points, for a sample (each makes queues first
        // when it succeeds, so not all of them for every character).
        if BIDI.contains(&c) || INVISIBLE.contains(&c) || c == '\x1b' {
            let o = ada.run(&["invite", "--link", "--name", &name]);
            assert_code(&o, 2, &format!("invite --name with {what}"));
            let o = fresh.run(&[
                "init",
                "--no-passphrase",
                "--name",
                &name,
                "--relay",
                &r.addr,
            ]);
            assert_code(&o, 2, &format!("init --name with {what}"));
        }
    }
    assert!(ada.contacts().is_empty(), "nothing was created");
    // A status may have line breaks; a name may be any script.
    ada.ok(&["profile", "--status", "away\nback Monday"]);
    ada.ok(&["profile", "--name", "Zoë 李 محمد"]);
}

/// Rewrites the profile a home sends in its handshake, as a patched or
/// hostile tern would (the binary itself refuses such names).
fn patch_profile(p: &Profile, name: &str, status: &str) {
    let mut store = Store::open(&p.home, KeySource::Unprotected).unwrap();
    store
        .transaction(|tx| {
            let mut s: Settings = tx.get(SETTINGS)?.unwrap();
            s.profile.name = name.into();
            s.profile.status = status.into();
            tx.put(SETTINGS, &s)
        })
        .unwrap();
}

#[test]
fn received_profiles_with_bidi_names_or_escape_statuses_are_refused() {
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    for (i, (name, status)) in [
        ("Bob\u{202E}", ""),
        ("B\u{200B}ob", ""),
        ("Bob", "\x1b]0;pwned\x07"),
    ]
    .into_iter()
    .enumerate()
    {
        let bob = Profile::new("Bob", &[&r]);
        patch_profile(&bob, name, status);
        // Without --name: Ada would call the contact what it calls itself.
        let link = ada.ok(&["invite", "--link"]);
        bob.ok(&["accept", link.trim(), "--name", "ada"]);
        // The whole handshake, as far as it goes.
        let mut all = String::new();
        for who in [&ada, &bob, &ada] {
            let o = who.run(&["recv"]);
            all.push_str(&stdout(&o));
            all.push_str(&stderr(&o));
        }
        let o = ada.run(&["contacts", "--long"]);
        all.push_str(&stdout(&o));
        assert_eq!(terminal_unsafe(&all), None, "case {i}: {all:?}");
        for c in ada.contacts() {
            let n = c["name"].as_str().unwrap();
            assert!(
                !n.contains('\u{202E}') && !n.contains('\u{200B}'),
                "case {i}: a contact took the hostile name {n:?}"
            );
            assert_ne!(c["state"], "connected", "case {i}: {c}");
        }
    }
}

#[test]
fn a_second_name_equal_after_nfkc_gets_a_suffix() {
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&ada, "Bob", &bob, "ada");
    // Full-width "Ｂｏｂ" and "Ｂob" are "Bob" after NFKC.
    for (i, lookalike) in ["Ｂｏｂ", "Ｂob"].into_iter().enumerate() {
        let mallory = Profile::new(lookalike, &[&r]);
        let link = ada.ok(&["invite", "--link"]);
        mallory.ok(&["accept", link.trim(), "--name", "ada"]);
        ada.ok(&["recv"]);
        mallory.ok(&["recv"]);
        ada.ok(&["recv"]);
        let names: Vec<String> = ada
            .contacts()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        let want = format!("{lookalike}-{}", i + 2);
        assert!(
            names.contains(&want),
            "the look-alike must be told apart: {names:?}, want {want:?}"
        );
    }
    // By hand too: a look-alike of an existing name is taken.
    let o = ada.run(&["invite", "--link", "--name", "ｂ\u{FF4F}b"]);
    assert_code(&o, 0, "a name that differs after NFKC (case) is free");
    let o = ada.run(&["invite", "--link", "--name", "Ｂｏｂ"]);
    assert_code(&o, 2, "a name equal to Bob after NFKC is taken");
    // A contact is found by its NFKC form.
    let o = ada.run(&["log", "Ｂob", "--json"]);
    assert_code(&o, 0, "log by a compatibility form of the name");
}

#[test]
fn contacts_columns_align_with_wide_names_and_never_rotated_says_never() {
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    ada.ok(&["invite", "--link", "--name", "李小龍"]);
    ada.ok(&["invite", "--link", "--name", "bob"]);
    let out = ada.ok(&["contacts"]);
    let cols: Vec<usize> = out
        .lines()
        .map(|l| {
            let at = l.find("invited").expect("state column");
            unicode_width::UnicodeWidthStr::width(&l[..at])
        })
        .collect();
    assert!(cols.windows(2).all(|w| w[0] == w[1]), "{out}");
    assert!(out.contains("rotated never"), "{out}");
    assert!(!out.contains("1970"), "{out}");
    let c = ada.contact("bob");
    assert!(c["last_rotated"].is_null(), "{c}");
}

/// A patched tern sends profile updates with every control and bidi
/// character in its name and status (the binary refuses to): each is
/// dropped on receipt, nothing raw reaches the terminal, the conversation
/// goes on.
#[test]
fn profile_updates_with_any_control_or_bidi_character_are_dropped() {
    use tern::client::Client;
    use tern::proto::hello::Profile as WireProfile;
    let r = Relay::start();
    let ada = Profile::new("Ada", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&ada, "bob", &bob, "ada");
    let mut client = Client::open(&bob.home, KeySource::Unprotected, None).unwrap();
    let mut sent = 0;
    for c in controls().into_iter().chain(BIDI.iter().copied()) {
        let bad_name = WireProfile {
            name: format!("Bob{c}"),
            status: String::new(),
            avatar: None,
        };
        client.broadcast_profile(&bad_name.to_bytes()).unwrap();
        sent += 1;
        if c != '\n' {
            let bad_status = WireProfile {
                name: "Bob".into(),
                status: format!("away{c}"),
                avatar: None,
            };
            client.broadcast_profile(&bad_status.to_bytes()).unwrap();
            sent += 1;
        }
    }
    drop(client);
    assert!(sent > 70);
    let o = ada.run(&["recv"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(terminal_unsafe(&all), None, "{all:?}");
    let c = ada.contact("bob");
    assert_eq!(c["profile"]["name"], "Bob", "{c}");
    assert_eq!(c["profile"]["status"], "", "{c}");
    let long = ada.ok(&["contacts", "bob"]);
    assert_eq!(terminal_unsafe(&long), None, "{long:?}");
    // Nothing is stuck: the next message arrives, and once.
    bob.send("ada", "still talking");
    assert_eq!(ada.recv_texts(), vec!["still talking"]);
    ada.recv_nothing();
}
