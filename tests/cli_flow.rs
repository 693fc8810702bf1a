//! End-to-end flows of the `tern` command line: invitations (link and PNG),
//! messages both ways, the handshake, profile updates, verification, JSON
//! output, waiting and following, and what ends up on disk.

mod cli_common;

use std::process::Stdio;
use std::time::Duration;

use cli_common::*;
use serde_json::Value;
use tern::proto::envelope::MAX_BODY_LEN;
use tern::proto::invitation::Invitation;

/// The fields every `recv --json` message carries.
#[track_caller]
fn check_message_fields(e: &Value, contact: &str) {
    assert_eq!(e["type"], "message", "{e}");
    assert_eq!(e["contact"], contact, "{e}");
    assert!(e["text"].is_string(), "text: {e}");
    assert_eq!(e["order"], "in-order", "{e}");
    let id = e["id"].as_str().unwrap_or_else(|| panic!("id: {e}"));
    assert_eq!(id.len(), 32, "id is 16 bytes of hex: {e}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "id: {e}");
    for f in ["sent_at", "received_at"] {
        let t = e[f].as_str().unwrap_or_else(|| panic!("{f}: {e}"));
        // 2025-11-25T19:00:00Z
        assert_eq!(t.len(), 20, "{f} is RFC 3339 UTC: {e}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{f}: {e}");
    }
}

/// Messages both ways between two connected profiles (`a` calls `b`
/// `b_name`, `b` calls `a` `a_name`); each arrives once.
fn converse(a: &Profile, b_name: &str, b: &Profile, a_name: &str, tag: &str) {
    let a1 = format!("{tag}: hello from the first side");
    let a2 = format!("{tag}: second line, ünïcödé ✓");
    a.send(b_name, &a1);
    a.send(b_name, &a2);
    let got = b.recv();
    assert_eq!(texts(&got), vec![a1.clone(), a2.clone()], "{got:?}");
    for e in got.iter().filter(|e| e["type"] == "message") {
        check_message_fields(e, a_name);
    }
    let ids: Vec<&str> = got.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_ne!(ids[0], ids[1], "message ids differ");
    b.recv_nothing();

    let b1 = format!("{tag}: and back from the second side");
    b.send(a_name, &b1);
    let got = a.recv();
    assert_eq!(texts(&got), vec![b1.clone()]);
    check_message_fields(&got[0], b_name);
    a.recv_nothing();

    // Both histories hold the three messages, each once, in order.
    let log_a: Vec<(String, String)> = a
        .log(b_name)
        .iter()
        .map(|e| {
            (
                e["direction"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        log_a,
        vec![
            ("out".to_string(), a1.clone()),
            ("out".to_string(), a2.clone()),
            ("in".to_string(), b1.clone()),
        ]
    );
    let log_b: Vec<String> = b
        .log(a_name)
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(log_b, vec![a1, a2, b1]);
}

#[test]
fn whole_flow_via_link() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    converse(&a, "bram", &b, "ada", "link");
}

#[test]
fn whole_flow_via_png() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let png = a.sandbox().join("invite.png");
    let png_s = png.to_str().unwrap();
    // No --name on either side: the names come from the profiles.
    let out = a.ok(&["invite", "--png", png_s]);
    assert_eq!(out, "", "--png alone prints nothing on stdout");
    let bytes = std::fs::read(&png).expect("the PNG was written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");

    let link = tern::cli::qr::decode_file(&png).expect("the PNG holds a QR code");
    assert!(link.starts_with("TERN:"), "{link}");
    Invitation::from_link(&link).expect("the QR code holds a valid invitation");
    if have_program("zbarimg") {
        let o = run_cmd(
            {
                let mut c = std::process::Command::new("zbarimg");
                c.args(["--raw", "-q"]).arg(&png).stdin(Stdio::null());
                c
            },
            None,
            HANG_GUARD,
        );
        assert_code(&o, 0, "zbarimg");
        assert_eq!(stdout(&o).trim(), link, "zbarimg reads the same link");
    } else {
        println!("note: zbarimg is not installed; skipped decoding the PNG with it");
    }

    b.ok(&["accept", "--image", png_s]);
    a.ok(&["recv"]);
    let eb = b.recv();
    assert!(
        eb.iter()
            .any(|e| e["type"] == "connected" && e["contact"] == "Ada"),
        "the joiner's placeholder name becomes the inviter's display name: {eb:?}"
    );
    let ea = a.recv();
    assert!(
        ea.iter()
            .any(|e| e["type"] == "connected" && e["contact"] == "Bram"),
        "the inviter's placeholder name becomes the joiner's display name: {ea:?}"
    );
    assert_eq!(a.contact("Bram")["state"], "connected");
    assert_eq!(b.contact("Ada")["state"], "connected");
    assert_eq!(a.contacts().len(), 1);
    assert_eq!(b.contacts().len(), 1);
    converse(&a, "Bram", &b, "Ada", "png");
}

/// The handshake state after each step, as `contacts` shows it.
#[test]
fn handshake_steps_are_visible_in_contacts() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    // Off a terminal, a plain `invite` prints the link.
    let link = a.ok(&["invite", "--name", "bram"]);
    assert!(
        link.starts_with("TERN:") && link.ends_with('\n'),
        "{link:?}"
    );
    assert_eq!(link.lines().count(), 1);
    assert_eq!(a.contact("bram")["state"], "invited");
    // The link may come on stdin, wrapped and in lower case.
    let wrapped = format!("  {}\n{}\n", link[..50].to_lowercase(), &link[50..]);
    b.ok_stdin(&["accept", "-", "--name", "ada"], wrapped.as_bytes());
    assert_eq!(b.contact("ada")["state"], "pending");
    assert_eq!(a.contact("bram")["state"], "invited", "nothing fetched yet");
    a.ok(&["recv"]);
    assert_eq!(a.contact("bram")["state"], "pending");
    b.ok(&["recv"]);
    assert_eq!(b.contact("ada")["state"], "connected");
    a.ok(&["recv"]);
    assert_eq!(a.contact("bram")["state"], "connected");
    for (p, n) in [(&a, "bram"), (&b, "ada")] {
        let c = p.contact(n);
        assert_eq!(c["security"], "shared", "a link is a shared channel: {c}");
        assert_eq!(c["pending_jobs"], 0, "{c}");
        assert_eq!(c["receive_relays"].as_array().unwrap().len(), 1, "{c}");
        assert_eq!(c["send_relays"].as_array().unwrap().len(), 1, "{c}");
    }
}

/// The invite note says `tern recv --wait 60` completes the connection: it
/// must return once it has, not sit out the whole wait. (The limit below is
/// a hang guard far below the --wait given, not a timing assertion.)
#[test]
fn recv_wait_returns_once_the_connection_completes() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let link = a.ok(&["invite", "--link", "--name", "bram"]);
    b.ok(&["accept", link.trim(), "--name", "ada"]);
    a.ok(&["recv"]);
    let mut c = b.cmd(&["recv", "--wait", "600", "--json"]);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut joiner = c.spawn().unwrap();
    let st = wait_guarded(
        &mut joiner,
        Duration::from_secs(15),
        "recv --wait 600 (joiner, connection completed at once)",
    );
    assert!(st.success());
    assert_eq!(b.contact("ada")["state"], "connected");
}

#[test]
fn messages_sent_before_the_handshake_completes() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let link = a.ok(&["invite", "--link", "--name", "bram"]);
    b.ok(&["accept", link.trim(), "--name", "ada"]);

    // The joiner writes at once.
    let o = b.run(&["send", "ada", "early one"]);
    assert_code(&o, 0, "send before the handshake");
    assert!(
        stderr(&o).contains("has not completed the connection"),
        "a note says the message waits: {}",
        stderr(&o)
    );
    b.send("ada", "early two");
    assert!(b.contact("ada")["pending_jobs"].as_u64().unwrap() >= 2);

    // Inviter answers the request; it is not connected yet, so its message
    // waits too.
    let ea = a.recv();
    assert!(texts(&ea).is_empty(), "{ea:?}");
    let o = a.run(&["send", "bram", "early from the inviter"]);
    assert_code(&o, 0, "inviter send before the handshake completes");
    assert!(stderr(&o).contains("has not completed the connection"));

    // Joiner completes: the early messages go out with the confirmation.
    let eb = b.recv();
    assert!(texts(&eb).is_empty(), "nothing to read yet: {eb:?}");
    assert!(eb.iter().any(|e| e["type"] == "connected"));

    let ea = a.recv();
    assert!(ea.iter().any(|e| e["type"] == "connected"), "{ea:?}");
    assert_eq!(texts(&ea), vec!["early one", "early two"], "{ea:?}");
    // …and the inviter's own early message left with this recv.
    assert_eq!(b.recv_texts(), vec!["early from the inviter"]);
    a.recv_nothing();
    b.recv_nothing();
    assert_eq!(a.contact("bram")["pending_jobs"], 0);
    assert_eq!(b.contact("ada")["pending_jobs"], 0);
    assert_eq!(a.log("bram").len(), 3);
    assert_eq!(b.log("ada").len(), 3);
}

/// `contacts --json` without the field that activity changes.
/// `contacts --json` without what a profile update changes: the last
/// activity, and the profile the contact sent (checked on its own).
fn contacts_sans_activity(p: &Profile) -> Vec<Value> {
    p.contacts()
        .into_iter()
        .map(|mut c| {
            c.as_object_mut().unwrap().remove("last_activity");
            c.as_object_mut().unwrap().remove("profile");
            c
        })
        .collect()
}

#[test]
fn profile_update_reaches_the_contact() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let before_a = contacts_sans_activity(&a);
    let before_b = contacts_sans_activity(&b);

    let o = a.run(&["profile", "--status", "on holiday until Monday"]);
    assert_code(&o, 0, "profile --status");
    assert!(stderr(&o).contains("sent to 1 contact"), "{}", stderr(&o));
    let p: Value = serde_json::from_str(a.ok(&["profile", "--json"]).trim()).unwrap();
    assert_eq!(p["status"], "on holiday until Monday");
    assert_eq!(p["name"], "Ada");

    let got = b.recv();
    assert_eq!(
        got,
        vec![serde_json::json!({"type": "profile", "contact": "ada", "from": "ada"})],
        "one profile event, no message"
    );
    assert_eq!(
        b.contact("ada")["profile"]["status"],
        "on holiday until Monday"
    );
    b.recv_nothing();
    assert_eq!(contacts_sans_activity(&a), before_a);
    assert_eq!(contacts_sans_activity(&b), before_b);
    assert!(b.log("ada").is_empty(), "a profile update is not a message");
    // A new display name does not rename the contact on the other side.
    a.ok(&["profile", "--name", "Ada Lovelace"]);
    let got = b.recv();
    assert_eq!(
        got,
        vec![serde_json::json!({"type": "profile", "contact": "ada", "from": "ada"})]
    );
    assert_eq!(b.contact("ada")["profile"]["name"], "Ada Lovelace");
    assert_eq!(contacts_sans_activity(&b), before_b);
    // The conversation goes on.
    b.send("ada", "nice holiday");
    assert_eq!(a.recv_texts(), vec!["nice holiday"]);
}

/// Six groups of five digits.
#[track_caller]
fn check_code_shape(code: &str) {
    let groups: Vec<&str> = code.split(' ').collect();
    assert_eq!(groups.len(), 6, "{code:?}");
    for g in groups {
        assert_eq!(g.len(), 5, "{code:?}");
        assert!(g.bytes().all(|b| b.is_ascii_digit()), "{code:?}");
    }
}

#[test]
fn verify_security_codes() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let code_a = a.ok(&["verify", "bram"]);
    let code_b = b.ok(&["verify", "ada"]);
    let (code_a, code_b) = (code_a.trim_end(), code_b.trim_end());
    check_code_shape(code_a);
    assert_eq!(code_a, code_b, "both sides show the same code");
    assert_eq!(a.contact("bram")["security"], "shared");

    // A wrong code: exit 4, nothing changes.
    let before = a.snapshot();
    let mut wrong: Vec<u8> = code_b.bytes().collect();
    wrong[0] = if wrong[0] == b'9' { b'1' } else { wrong[0] + 1 };
    let wrong = String::from_utf8(wrong).unwrap();
    let o = a.run(&["verify", "bram", &wrong]);
    assert_code(&o, 4, "verify with a wrong code");
    assert_eq!(a.snapshot(), before);
    assert_eq!(a.contact("bram")["security"], "shared");
    // A truncated code is not a code: a usage error (issue 19 item 15).
    let o = a.run(&["verify", "bram", &code_b[..code_b.len() - 6]]);
    assert_code(&o, 2, "verify with a truncated code");
    assert_eq!(a.snapshot(), before);

    // The right code (dashes instead of spaces are fine).
    let o = a.run(&["verify", "bram", &code_b.replace(' ', "-")]);
    assert_code(&o, 0, "verify with the other side's code");
    assert_eq!(a.contact("bram")["security"], "verified");
    assert_eq!(
        b.contact("ada")["security"],
        "shared",
        "only where verified"
    );
    let o = b.run(&["verify", "ada", code_a]);
    assert_code(&o, 0, "verify on the other side");
    assert_eq!(b.contact("ada")["security"], "verified");

    // A wrong code later does not undo the verification.
    let before = a.snapshot();
    assert_code(&a.run(&["verify", "bram", &wrong]), 4, "wrong code again");
    assert_eq!(a.snapshot(), before);
    assert_eq!(
        a.ok(&["verify", "bram"]).trim_end(),
        code_a,
        "the code is stable"
    );
}

#[test]
fn json_outputs_are_one_object_per_line() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let c = Profile::new("Cleo", &[&r]);
    connect(&a, "bram", &b, "ada");
    connect(&a, "cleo", &c, "ada");
    let multi = "first line\nsecond line\n\tthird \"quoted\" line {not json}";
    b.send("ada", multi);
    b.send("ada", "two");
    c.send("ada", "three");
    a.ok(&["profile", "--status", "busy"]);

    let check = |args: &[&str], min: usize| -> Vec<Value> {
        let out = a.ok(args);
        assert!(out.ends_with('\n'), "{args:?}: newline-terminated");
        let v = json_lines(&out);
        assert!(v.len() >= min, "{args:?}: {out}");
        v
    };
    let recv = check(&["recv", "--json"], 3);
    let mut got = texts(&recv);
    got.sort();
    let mut want = vec![multi.to_string(), "two".into(), "three".into()];
    want.sort();
    assert_eq!(got, want, "a multi-line text stays one JSON line");
    let contacts = check(&["contacts", "--json"], 2);
    assert_eq!(contacts.len(), 2);
    for c in &contacts {
        for f in ["name", "state", "security", "last_activity", "pending_jobs"] {
            assert!(!c[f].is_null(), "contacts --json has {f}: {c}");
        }
    }
    let log = check(&["log", "bram", "--json"], 2);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["text"], multi);
    assert_eq!(log[0]["direction"], "in");
    let log = check(&["log", "bram", "--json", "--limit", "1"], 1);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["text"], "two", "--limit keeps the latest");
    // --from: one contact only.
    b.send("ada", "from bram only");
    c.send("ada", "from cleo, later");
    assert_eq!(
        texts(&json_lines(&a.ok(&["recv", "--json", "--from", "bram"]))),
        vec!["from bram only"]
    );
    assert_eq!(a.recv_texts(), vec!["from cleo, later"]);
    let prof = check(&["profile", "--json"], 1);
    assert_eq!(prof.len(), 1);
    // Profile events and messages on one stream.
    a.ok(&["profile", "--status", "free"]);
    b.send("ada", "four");
    let events = json_lines(&b.ok(&["recv", "--json"]));
    assert!(events.iter().any(|e| e["type"] == "profile"), "{events:?}");
    let events = json_lines(&a.ok(&["recv", "--json"]));
    assert_eq!(texts(&events), vec!["four"]);
}

#[test]
fn longest_message_and_unicode_arrive_intact() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let longest: String = "0123456789abcdef".repeat(MAX_BODY_LEN / 16 + 1)[..MAX_BODY_LEN].into();
    assert_eq!(longest.len(), MAX_BODY_LEN);
    a.send("bram", &longest);
    let uni = "Grüße 👋 — 日本語 — עברית";
    a.send("bram", uni);
    // Leading dashes and several words are one message.
    a.ok(&["send", "bram", "--", "-n", "two", "words"]);
    assert_eq!(
        b.recv_texts(),
        vec![longest, uni.to_string(), "-n two words".into()]
    );
}

#[test]
fn passphrase_profile_via_passphrase_file() {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], "correct horse battery staple");
    assert!(
        a.home.join("key.age").is_file(),
        "a passphrase profile has key.age"
    );
    assert!(!a.home.join("identity-unprotected.txt").exists());
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    converse(&a, "bram", &b, "ada", "passphrase");
    // TERN_PASSPHRASE works too.
    let mut c = a.bare_cmd(&["contacts", "--json"]);
    c.env("TERN_PASSPHRASE", "correct horse battery staple");
    let o = run_cmd(c, None, HANG_GUARD);
    assert_code(&o, 0, "TERN_PASSPHRASE");
    assert_eq!(json_lines(&stdout(&o)).len(), 1);
}

/// `recv --wait` returns with a message that arrives while it waits; with
/// nothing to receive it returns with exit 0 and prints nothing.
#[test]
fn recv_wait() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");

    let o = b.run(&["recv", "--wait", "1", "--json"]);
    assert_code(&o, 0, "recv --wait 1 with nothing");
    assert_eq!(stdout(&o), "");

    // Wait generously; the message is sent about a second after the wait
    // starts. Only the outcome is checked, never how long it took.
    let mut c = b.cmd(&["recv", "--wait", "30", "--json"]);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    std::thread::sleep(Duration::from_secs(1));
    a.send("bram", "worth the wait");
    let st = wait_guarded(&mut child, HANG_GUARD, "recv --wait 30");
    assert!(st.success(), "{st:?}");
    let got = json_lines(&reader.join().unwrap());
    assert_eq!(texts(&got), vec!["worth the wait"]);
    b.recv_nothing();
}

/// `recv --follow` in one process while `tern send` (and `tern recv` on the
/// other profile) run: every incoming message printed once, both stores fine.
#[test]
fn follow_while_sending_from_the_same_profile() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let mut follower = b.follow();

    a.send("bram", "f1");
    let (m, _) = follower.next_messages(1);
    assert_eq!(m, vec!["f1"]);

    // Bram writes from the same home while the follower runs.
    b.send("ada", "reply while following");
    assert_eq!(a.recv_texts(), vec!["reply while following"]);
    a.send("bram", "f2");
    b.send("ada", "second reply");
    a.send("bram", "f3");
    let (m, _) = follower.next_messages(2);
    assert_eq!(m, vec!["f2", "f3"]);
    assert_eq!(a.recv_texts(), vec!["second reply"]);
    // The store is usable by other commands meanwhile.
    assert_eq!(b.contact("ada")["state"], "connected");
    assert_eq!(b.log("ada").len(), 5);

    let err = follower.kill();
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was printed twice, nothing is left to print.
    b.recv_nothing();
    let log: Vec<String> = b
        .log("ada")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        log,
        vec!["f1", "reply while following", "f2", "second reply", "f3"]
    );
    a.recv_nothing();
}

/// After a conversation nothing readable is left on disk: not the texts,
/// not the display names, not the names given to contacts, not the status,
/// in the profiles or on the relays, WAL files included.
#[test]
fn no_plaintext_on_disk() {
    let r1 = Relay::start();
    let r2 = Relay::start();
    let a = Profile::new("Quintessa Marlowe", &[&r1]);
    let b = Profile::new("Bartholomew Okafor", &[&r2]);
    connect(&a, "contact-named-barty", &b, "contact-named-quinn");
    let secrets = [
        "the eagle lands at the old lighthouse",
        "meet by the Zanzibar fountain at noon",
        "reply: bring the purple umbrella",
        "status: gone fishing at Lake Wobegon",
        "Quintessa Marlowe",
        "Bartholomew Okafor",
        "contact-named-barty",
        "contact-named-quinn",
    ];
    a.send("contact-named-barty", secrets[0]);
    a.send("contact-named-barty", secrets[1]);
    a.ok(&["profile", "--status", secrets[3]]);
    b.recv();
    b.send("contact-named-quinn", secrets[2]);
    // A follower holds Ada's store open, so its WAL is on disk when it is
    // killed; the last message is stored by it.
    let mut follower = a.follow();
    let (m, _) = follower.next_messages(1);
    assert_eq!(m, vec![secrets[2]]);
    follower.kill();

    let mut scanned = Vec::new();
    let mut control = false;
    for root in [a.sandbox(), b.sandbox(), r1.data_dir(), r2.data_dir()] {
        for f in files_under(root) {
            let data = std::fs::read(&f).unwrap();
            // The scan sees plaintext where there is some: the identity of
            // a --no-passphrase profile is stored in the clear by design.
            control |= contains(&data, b"AGE-SECRET-KEY-1");
            for s in secrets {
                assert!(
                    !contains(&data, s.as_bytes()),
                    "{s:?} found in plaintext in {}",
                    f.display()
                );
            }
            scanned.push(f);
        }
    }
    assert!(control, "the scan found the one plaintext it should");
    let names: Vec<String> = scanned
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "store.db-wal"),
        "a profile WAL was scanned: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == "relay.db-wal"),
        "a relay WAL was scanned: {names:?}"
    );
    assert_eq!(names.iter().filter(|n| *n == "store.db").count(), 2);
}
