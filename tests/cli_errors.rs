//! Errors and exit codes of the `tern` command line. Every failing command
//! must leave the profile exactly as it was (contacts and histories), and
//! nothing may go out to the contact.

mod cli_common;

use std::process::Stdio;
use std::time::Duration;

use cli_common::*;
use tern::proto::envelope::MAX_BODY_LEN;
use tern::proto::invitation::{link_bytes, link_of};

/// A connected pair on one relay: Ada (calls Bram "bram") and Bram (calls
/// Ada "ada"), with one message each way already exchanged.
fn pair() -> (Relay, Profile, Profile) {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    a.send("bram", "before the errors");
    assert_eq!(b.recv_texts(), vec!["before the errors"]);
    (r, a, b)
}

/// Runs a command expected to fail with `code`; checks that neither
/// profile changed and that nothing reached the other side.
#[track_caller]
fn fails_unchanged(
    a: &Profile,
    b: &Profile,
    out: std::process::Output,
    code: i32,
    what: &str,
    before: &(String, String),
) {
    assert_code(&out, code, what);
    assert_eq!(stdout(&out), "", "{what}: nothing on stdout");
    assert!(
        !stderr(&out).trim().is_empty(),
        "{what}: an explanation on stderr"
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(a.snapshot(), before.0, "{what}: Ada's profile changed");
    assert_eq!(b.snapshot(), before.1, "{what}: Bram's profile changed");
}

#[test]
fn usage_errors_and_unknown_contacts_change_nothing() {
    let (_r, a, b) = pair();
    let before = (a.snapshot(), b.snapshot());
    let check = |args: &[&str], code: i32, what: &str| {
        fails_unchanged(&a, &b, a.run(args), code, what, &before);
    };
    let check_stdin = |args: &[&str], input: &[u8], code: i32, what: &str| {
        fails_unchanged(&a, &b, a.run_stdin(args, input), code, what, &before);
    };

    // Unknown contact: 3.
    check(&["send", "nobody", "hi"], 3, "send to an unknown contact");
    check(
        &["send", "Bram", "hi"],
        3,
        "names are exact (display name, case)",
    );
    check(&["log", "nobody"], 3, "log of an unknown contact");
    check(&["verify", "nobody"], 3, "verify an unknown contact");
    check(
        &["recv", "--from", "nobody"],
        3,
        "recv --from an unknown contact",
    );
    check(
        &["forget", "nobody", "--yes"],
        3,
        "forget an unknown contact",
    );

    // Empty message: 2.
    check(&["send", "bram", ""], 2, "empty message argument");
    check_stdin(&["send", "bram"], b"", 2, "empty message on stdin");
    check_stdin(&["send", "bram"], b"\n", 2, "a lone newline on stdin");

    // Too long: 2.
    let long = "x".repeat(MAX_BODY_LEN + 1);
    check(&["send", "bram", &long], 2, "message one byte too long");
    check_stdin(&["send", "bram"], long.as_bytes(), 2, "too long on stdin");
    let wide = "é".repeat(MAX_BODY_LEN / 2 + 1);
    assert!(wide.chars().count() < MAX_BODY_LEN && wide.len() > MAX_BODY_LEN);
    check(
        &["send", "bram", &wide],
        2,
        "too long in bytes, not in chars",
    );
    let huge = vec![b'y'; 10 * MAX_BODY_LEN];
    check_stdin(&["send", "bram"], &huge, 2, "far too long on stdin");
    check_stdin(
        &["send", "bram"],
        b"\xff\xfe not utf-8",
        1,
        "invalid UTF-8 on stdin",
    );

    // Other usage errors: 2.
    check(&["send"], 2, "send without a contact");
    check(&["no-such-command"], 2, "unknown subcommand");
    check(&["recv", "--wait", "soon"], 2, "non-numeric --wait");
    check(
        &["recv", "--wait", "1", "--follow"],
        2,
        "--wait with --follow",
    );
    check(
        &["invite", "--link", "--name", "bram"],
        2,
        "a name already taken",
    );
    check(&["invite", "--link", "--name", "   "], 2, "an empty name");
    check(
        &["forget", "bram"],
        2,
        "forget without --yes off a terminal",
    );
    // Not a code at all (issue 19 item 15): a usage error, not a mismatch.
    check(&["verify", "bram", "12345"], 2, "a short string of digits");
    check(&["verify", "bram", "garbage"], 2, "not digits");
    check(&["profile", "--name", ""], 2, "an empty display name");
    check(
        &["profile", "--status", &"s".repeat(600)],
        2,
        "a status too long",
    );
    let relay = a.ok(&["relays"]);
    check(
        &[
            "init",
            "--name",
            "Again",
            "--relay",
            "tern://x@127.0.0.1:1",
            "--no-passphrase",
        ],
        2,
        "init over an existing profile",
    );
    assert_eq!(a.ok(&["relays"]), relay);

    // After all that, the conversation works as before.
    a.send("bram", "still here");
    assert_eq!(b.recv_texts(), vec!["still here"]);
}

#[test]
fn send_reads_the_message_from_stdin() {
    let (_r, a, b) = pair();
    let o = a.run_stdin(&["send", "bram"], b"hi\n");
    assert_code(&o, 0, "echo hi | tern send bram");
    let o = a.run_stdin(&["send", "bram"], b"two\nlines\r\n");
    assert_code(&o, 0, "two lines on stdin");
    let o = a.run_stdin(&["send", "bram"], b"no newline");
    assert_code(&o, 0, "no final newline");
    let exact = vec![b'z'; MAX_BODY_LEN];
    let o = a.run_stdin(&["send", "bram"], &exact);
    assert_code(&o, 0, "the longest message on stdin");
    let got = b.recv_texts();
    assert_eq!(
        got,
        vec![
            "hi".to_string(),
            "two\nlines".into(),
            "no newline".into(),
            String::from_utf8(exact).unwrap()
        ]
    );
    b.recv_nothing();
}

/// One typo of each kind in `link`: a substitution (in the body and in the
/// checksum), a swap of neighbours, a dropped and an added character, and
/// a character base32 lacks.
fn typos(link: &str) -> Vec<(String, &'static str)> {
    let next = |c: u8| -> char {
        let abc = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        abc[(abc.iter().position(|&a| a == c).unwrap() + 1) % 32] as char
    };
    let at =
        |i: usize, with: &str, skip: usize| format!("{}{with}{}", &link[..i], &link[i + skip..]);
    let swap = (20..link.len() - 1)
        .find(|&i| link.as_bytes()[i] != link.as_bytes()[i + 1])
        .unwrap();
    let last = link.len() - 1;
    vec![
        (
            at(9, &next(link.as_bytes()[9]).to_string(), 1),
            "one character replaced",
        ),
        (
            at(last, &next(link.as_bytes()[last]).to_string(), 1),
            "a checksum character replaced",
        ),
        (
            at(
                swap,
                &format!("{}{}", &link[swap + 1..swap + 2], &link[swap..swap + 1]),
                2,
            ),
            "two neighbours swapped",
        ),
        (at(50, "", 1), "one character dropped"),
        (at(50, "A", 0), "one character added"),
        (at(30, "0", 1), "a zero typed for a letter"),
        (link[..link.len() - 6].to_string(), "the checksum left out"),
    ]
}

#[test]
fn a_mistyped_link_is_damaged_before_anything_happens() {
    let (_r, a, b) = pair();
    let contact = a
        .ok(&["invite", "--link", "--name", "carol"])
        .trim()
        .to_string();
    let rekey = a
        .ok(&["invite", "--rekey", "bram", "--link"])
        .trim()
        .to_string();
    let device = a
        .ok(&["device", "link", "--link", "--name", "laptop"])
        .trim()
        .to_string();
    let before = (a.snapshot(), b.snapshot());
    let stranger = Profile::new("Cleo", &[&_r]);
    let stranger_before = stranger.snapshot();
    let mut tried = 0;
    for (link, whose, args) in [
        (&contact, "contact invitation", vec!["accept"]),
        (&rekey, "re-key invitation", vec!["accept"]),
    ] {
        for (bad, what) in typos(link) {
            let mut argv = args.clone();
            argv.push(&bad);
            let joiner = if whose == "contact invitation" {
                &stranger
            } else {
                &b
            };
            let o = joiner.run(&argv);
            let what = format!("{whose}, {what}");
            assert_code(&o, 6, &what);
            let err = stderr(&o);
            assert!(err.contains("the link is damaged"), "{what}: {err}");
            assert!(
                !err.contains("request sent") && !err.contains("already used"),
                "{what}: {err}"
            );
            assert_eq!(stdout(&o), "", "{what}");
            tried += 1;
        }
    }
    for (bad, what) in typos(&device) {
        let joiner = Profile::empty("Alice-new-device");
        let o = joiner.run(&["device", "join", &bad, "--no-passphrase"]);
        assert_code(&o, 6, &format!("device link, {what}"));
        assert!(
            stderr(&o).contains("the link is damaged"),
            "{what}: {}",
            stderr(&o)
        );
        tried += 1;
    }
    assert_eq!(tried, 21);
    assert_eq!(a.snapshot(), before.0, "the inviter's profile is untouched");
    assert_eq!(b.snapshot(), before.1, "Bram's profile is untouched");
    assert_eq!(stranger.snapshot(), stranger_before, "no contact was made");
    // Nothing reached the inviter: no request, no re-key answer.
    a.recv_nothing();
    // The links themselves are fine.
    stranger.ok(&["accept", &contact, "--name", "ada"]);
}

#[test]
fn bad_invitations_exit_6_and_change_nothing() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let link = a.ok(&["invite", "--link", "--name", "bram"]);
    let link = link.trim().to_string();
    let before = (a.snapshot(), b.snapshot());
    let dir = b.sandbox();

    let mut future = link_bytes(&link).unwrap();
    future[0] = 200;
    let future = link_of(&future);
    let bad_links = [
        ("hello", "not a link"),
        ("", "empty"),
        ("TERN:", "prefix only"),
        ("TERN:AAAA", "too short"),
        ("TERN:0189!!", "not base32"),
        (&link[..link.len() - 16], "truncated"),
        (&future, "a future version"),
    ];
    for (l, what) in bad_links {
        let o = b.run(&["accept", l, "--name", "ada"]);
        fails_unchanged(&a, &b, o, 6, what, &before);
    }
    let o = b.run_stdin(&["accept", "-"], b"TERN:NOTANINVITATION\n");
    fails_unchanged(&a, &b, o, 6, "garbage on stdin", &before);

    // Pictures.
    let blank = dir.join("blank.png");
    image::GrayImage::from_pixel(240, 240, image::Luma([255u8]))
        .save(&blank)
        .unwrap();
    let noise = dir.join("noise.png");
    let mut bytes = vec![0u8; 4096];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8;
    }
    std::fs::write(&noise, &bytes).unwrap();
    let truncated = dir.join("truncated.png");
    let png = dir.join("real.png");
    tern::cli::qr::png(&link, &png).unwrap();
    let real = std::fs::read(&png).unwrap();
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    let other_qr = dir.join("url.png");
    tern::cli::qr::png("HTTPS://EXAMPLE.ORG/NOT-A-TERN-LINK", &other_qr).unwrap();
    for (f, what) in [
        (&blank, "a PNG without a QR code"),
        (&noise, "random bytes as an image"),
        (&truncated, "a truncated PNG"),
        (&other_qr, "a QR code that is not an invitation"),
    ] {
        let o = b.run(&["accept", "--image", f.to_str().unwrap()]);
        fails_unchanged(&a, &b, o, 6, what, &before);
    }
    // The real invitation still works after all that.
    b.ok(&["accept", "--image", png.to_str().unwrap(), "--name", "ada"]);
    a.ok(&["recv"]);
    b.ok(&["recv"]);
    a.ok(&["recv"]);
    assert_eq!(a.contact("bram")["state"], "connected");
    assert_eq!(b.contact("ada")["state"], "connected");
}

#[test]
fn no_profile_exits_7_and_creates_nothing() {
    let r = Relay::start();
    let somebody = Profile::new("Somebody", &[&r]);
    let link = somebody.ok(&["invite", "--link"]);
    let p = Profile::empty("Nobody");
    for args in [
        &["contacts"][..],
        &["contacts", "--json"],
        &["recv"],
        &["send", "bram", "hi"],
        &["invite", "--link"],
        &["accept", link.trim()],
        &["log", "bram"],
        &["profile"],
        &["relays"],
    ] {
        let o = p.run(args);
        assert_code(&o, 7, &format!("{args:?} without a profile"));
        assert!(stderr(&o).contains("tern init"), "{}", stderr(&o));
    }
    // The default home ($XDG_DATA_HOME/tern) and TERN_HOME are used too.
    let mut c = tern_cmd(p.sandbox());
    c.arg("contacts");
    assert_code(&run_cmd(c, None, HANG_GUARD), 7, "default home");
    let mut c = tern_cmd(p.sandbox());
    c.env("TERN_HOME", p.sandbox().join("elsewhere"))
        .arg("contacts");
    assert_code(&run_cmd(c, None, HANG_GUARD), 7, "TERN_HOME");
    let left: Vec<_> = files_under(p.sandbox());
    assert!(left.is_empty(), "nothing created: {left:?}");
    assert!(
        std::fs::read_dir(p.sandbox()).unwrap().next().is_none(),
        "no directory created either"
    );
}

/// A connected pair where Ada's profile has a passphrase (given to every
/// command through TERN_PASSPHRASE_FILE, unless the test leaves it out).
fn passphrase_pair() -> (Relay, Profile, Profile, (String, String)) {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], "the right one");
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let before = (a.snapshot(), b.snapshot());
    (r, a, b, before)
}

/// Unlocking with an identity file does not change "no profile" into a
/// generic failure: still 7, and nothing is created.
#[test]
fn no_profile_with_an_identity_file_exits_7() {
    let r = Relay::start();
    let somebody = Profile::new("Somebody", &[&r]);
    let id = somebody.sandbox().join("identity.txt");
    somebody.ok(&["key", "export", "--out", id.to_str().unwrap()]);
    let p = Profile::empty("Nobody");
    let mut c = p.bare_cmd(&["contacts"]);
    c.arg("--identity").arg(&id);
    let o = run_cmd(c, None, HANG_GUARD);
    assert!(stderr(&o).contains("tern init"), "{}", stderr(&o));
    assert!(files_under(p.sandbox()).is_empty(), "nothing created");
    assert_code(&o, 7, "--identity FILE on a home without a profile");
}

#[test]
fn wrong_passphrase_exits_5() {
    let (_r, a, b, before) = passphrase_pair();
    let mut c = a.bare_cmd(&["send", "bram", "with a wrong passphrase"]);
    c.env("TERN_PASSPHRASE", "wrong");
    let o = run_cmd(c, None, HANG_GUARD);
    fails_unchanged(&a, &b, o, 5, "TERN_PASSPHRASE=wrong", &before);

    let wrong_file = a.sandbox().join("wrong.txt");
    std::fs::write(&wrong_file, "the wrong one\n").unwrap();
    let mut c = a.bare_cmd(&["contacts"]);
    c.arg("--passphrase-file").arg(&wrong_file);
    let o = run_cmd(c, None, HANG_GUARD);
    fails_unchanged(
        &a,
        &b,
        o,
        5,
        "--passphrase-file with the wrong one",
        &before,
    );
    b.recv_nothing();
}

#[test]
fn wrong_identity_file_exits_5() {
    let (_r, a, b, before) = passphrase_pair();
    // The identity file of another profile (`tern key export`).
    let other = b.sandbox().join("bram-identity.txt");
    b.ok(&["key", "export", "--out", other.to_str().unwrap()]);
    let mut c = a.bare_cmd(&["contacts"]);
    c.arg("--identity").arg(&other);
    let o = run_cmd(c, None, HANG_GUARD);
    fails_unchanged(&a, &b, o, 5, "--identity of another profile", &before);
    // The profile's own identity file opens it.
    let own = a.sandbox().join("ada-identity.txt");
    a.ok(&["key", "export", "--out", own.to_str().unwrap()]);
    let mut c = a.bare_cmd(&["contacts", "--json"]);
    c.arg("--identity").arg(&own);
    let o = run_cmd(c, None, HANG_GUARD);
    assert_code(&o, 0, "--identity with the profile's own identity");
    assert_eq!(stdout(&o), a.ok(&["contacts", "--json"]));
}

/// No passphrase source and stdin not a terminal: exit 5 at once, no
/// prompt. The limits are hang guards, not timing assertions.
#[test]
fn missing_passphrase_exits_5_without_hanging() {
    let (_r, a, b, before) = passphrase_pair();
    for args in [&["contacts"][..], &["recv"], &["send", "bram", "hi"]] {
        let c = a.bare_cmd(args);
        let o = run_cmd(c, None, Duration::from_secs(30));
        assert!(
            stderr(&o).contains("TERN_PASSPHRASE"),
            "says how to give the passphrase: {}",
            stderr(&o)
        );
        fails_unchanged(&a, &b, o, 5, "no passphrase source", &before);
    }
    // Same with stdin an open pipe nobody writes to (a prompt would block).
    let mut c = a.bare_cmd(&["contacts"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let st = wait_guarded(
        &mut child,
        Duration::from_secs(30),
        "contacts, stdin an idle pipe",
    );
    drop(child.stdin.take());
    assert_eq!(st.code(), Some(5));
    // Nothing went out, and the right passphrase still opens it.
    b.recv_nothing();
    assert_eq!(a.contacts().len(), 1);
}

/// `tern recv --json | something that closed early`: no error message, exit
/// 0 (tern exits quietly on EPIPE). The messages are stored all the same.
#[test]
fn broken_pipe_is_quiet() {
    let (_r, a, b) = pair();
    for i in 0..3 {
        a.send("bram", &format!("piped {i}"));
    }
    let mut c = b.cmd(&["recv", "--json"]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Close the reading end before tern writes anything.
    drop(child.stdout.take());
    let mut err = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let st = wait_guarded(&mut child, HANG_GUARD, "recv --json into a closed pipe");
    let errs = errs.join().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            st.code() == Some(0) || st.signal() == Some(13),
            "exit 0 (or SIGPIPE), got {st:?}; stderr: {errs}"
        );
    }
    assert_eq!(errs, "", "no error printed on a broken pipe");
    // Whatever was not printed is still there: in the log and, if it was
    // not yet fetched, for the next recv.
    let rest = b.recv_texts();
    let log: Vec<String> = b
        .log("ada")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        log,
        vec!["before the errors", "piped 0", "piped 1", "piped 2"],
        "each message stored once (next recv printed {rest:?})"
    );
    b.recv_nothing();
}
