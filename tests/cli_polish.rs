//! What a new user tripped over (issue 19 items 7, 8, 13, 14, 15, 20, 21,
//! 22), through the real binary and relays.

mod cli_common;

use std::os::unix::fs::PermissionsExt;

use cli_common::*;
use serde_json::Value;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A PNG signature and some bytes: all tern checks of an avatar.
fn png() -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend((0..200u8).collect::<Vec<_>>());
    v
}

#[test]
fn contacts_show_what_a_contact_sent_and_save_the_avatar() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let avatar = b.sandbox().join("me.png");
    std::fs::write(&avatar, png()).unwrap();
    b.ok(&[
        "profile",
        "--status",
        "on holiday\nback Monday",
        "--avatar",
        avatar.to_str().unwrap(),
    ]);
    a.ok(&["recv"]);

    let c = a.contact("bram");
    assert_eq!(c["profile"]["name"], "Bram", "{c}");
    assert_eq!(c["profile"]["status"], "on holiday\nback Monday", "{c}");
    assert_eq!(c["profile"]["avatar_bytes"], png().len(), "{c}");
    assert_eq!(c["profile"]["avatar_type"], "png", "{c}");
    let long = a.ok(&["contacts", "bram"]);
    assert!(
        long.contains("their name:") && long.contains("Bram"),
        "{long}"
    );
    assert!(long.contains("on holiday\\nback Monday"), "{long}");
    assert!(long.contains("avatar:") && long.contains("png"), "{long}");
    let all = a.ok(&["contacts", "--long"]);
    assert!(all.contains("on holiday"), "{all}");

    let out = a.sandbox().join("saved/bram.png");
    let p = out.to_str().unwrap();
    a.ok(&["contacts", "show", "bram", "--save-avatar", p]);
    assert_eq!(std::fs::read(&out).unwrap(), png());
    assert_eq!(mode(&out), 0o600);
    let o = a.run(&["contacts", "show", "bram", "--save-avatar", p]);
    assert_code(&o, 2, "an existing file without --force");
    a.ok(&["contacts", "show", "bram", "--save-avatar", p, "--force"]);
}

#[test]
fn contacts_rename_keeps_a_name_given_by_hand() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let link = a.ok(&["invite", "--link"]);
    let placeholder = a.contacts()[0]["name"].as_str().unwrap().to_string();
    assert!(placeholder.starts_with("invited-"), "{placeholder}");
    a.ok(&["contacts", "rename", &placeholder, "my brother"]);
    b.ok(&["accept", link.trim(), "--name", "sis"]);
    a.ok(&["recv"]);
    b.ok(&["recv"]);
    a.ok(&["recv"]);
    assert_eq!(a.contact("my brother")["state"], "connected");
    assert_eq!(
        b.contact("sis")["state"],
        "connected",
        "accept --name is kept"
    );
    a.ok(&["invite", "--link", "--name", "carol"]);
    let o = a.run(&["contacts", "rename", "my brother", "carol"]);
    assert_code(&o, 2, "rename onto a name in use");
    let o = a.run(&["contacts", "rename", "my brother", "bro\u{202E}"]);
    assert_code(&o, 2, "rename to a name with a bidi control");
    let o = a.run(&["contacts", "rename", "nobody", "x"]);
    assert_code(&o, 3, "rename of a contact that does not exist");
    a.ok(&["contacts", "rename", "my brother", "Bram"]);
    a.send("Bram", "renamed");
    assert_eq!(b.recv_texts(), vec!["renamed"]);
}

#[test]
fn a_too_long_message_reports_its_real_size() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    a.ok(&["invite", "--link", "--name", "bram"]);
    let o = a.run_stdin(&["send", "bram"], &vec![b'x'; 20_000]);
    assert_code(&o, 2, "20,000 bytes on stdin");
    assert!(stderr(&o).contains("20000 bytes"), "{}", stderr(&o));
    let long = "y".repeat(16_000);
    let o = a.run(&["send", "bram", &long]);
    assert_code(&o, 2, "16,000 bytes as an argument");
    assert!(stderr(&o).contains("16000 bytes"), "{}", stderr(&o));
}

#[test]
fn invite_png_keeps_nothing_when_it_fails_and_never_overwrites() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    // A missing directory is made.
    let deep = a.sandbox().join("new/dir/bram.png");
    a.ok(&["invite", "--name", "bram", "--png", deep.to_str().unwrap()]);
    assert!(deep.is_file());
    // An existing file is not replaced without --force, and nothing is made.
    let before = std::fs::read(&deep).unwrap();
    let o = a.run(&["invite", "--name", "carol", "--png", deep.to_str().unwrap()]);
    assert_code(&o, 2, "--png onto an existing file");
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&deep).unwrap(), before);
    assert!(a.contacts().iter().all(|c| c["name"] != "carol"));
    // A place that cannot be written: no contact left behind.
    let file = a.sandbox().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("x.png");
    let o = a.run(&["invite", "--name", "dan", "--png", bad.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let dir = a.sandbox().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    let o = a.run(&[
        "invite",
        "--name",
        "dan",
        "--png",
        dir.to_str().unwrap(),
        "--force",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        a.contacts().iter().all(|c| c["name"] != "dan"),
        "{:?}",
        a.contacts()
    );
    // So a retry with the same name works.
    let ok = a.sandbox().join("dan.png");
    a.ok(&["invite", "--name", "dan", "--png", ok.to_str().unwrap()]);
    assert_eq!(a.contact("dan")["state"], "invited");
}

#[test]
fn verify_tells_a_typo_from_a_mismatch() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    for garbage in ["garbage", "12345", "12345 67890 12345 67890 12345 6789x"] {
        let o = a.run(&["verify", "bram", garbage]);
        assert_code(&o, 2, &format!("verify bram {garbage:?}"));
        assert!(stderr(&o).contains("not a security code"), "{}", stderr(&o));
    }
    let theirs: Value = serde_json::from_str(&b.ok(&["verify", "ada", "--json"])).unwrap();
    assert_eq!(theirs["contact"], "ada");
    assert_eq!(theirs["verified"], false);
    let code = theirs["code"].as_str().unwrap().to_string();
    let mut wrong: Vec<char> = code.chars().collect();
    wrong[0] = if wrong[0] == '1' { '2' } else { '1' };
    let wrong: String = wrong.into_iter().collect();
    let o = a.run(&["verify", "bram", &wrong, "--json"]);
    assert_code(&o, 4, "a real code that differs");
    assert_eq!(json_lines(&stdout(&o))[0]["match"], false);
    let dashed = code.replace(' ', "-");
    let out = a.ok(&["verify", "bram", &dashed, "--json"]);
    assert_eq!(json_lines(&out)[0]["match"], true);
    assert_eq!(a.contact("bram")["security"], "verified");
}

#[test]
fn relays_add_tests_the_relay_first() {
    let r = Relay::start();
    let mut r2 = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let list = |a: &Profile| a.ok(&["relays"]);
    // A closed port: temporary (75), nothing added.
    let down = r2.addr.clone();
    r2.stop();
    let o = a.run(&["relays", "add", &down]);
    assert_code(&o, 75, "relays add of a relay that is down");
    assert!(stderr(&o).contains("--no-test"), "{}", stderr(&o));
    assert_eq!(list(&a).lines().count(), 1);
    // A wrong key on a live port: permanent (1), nothing added.
    let other = Relay::start();
    let key_of_other = other.addr.split('@').next().unwrap();
    let wrong = format!("{key_of_other}@127.0.0.1:{}", r.port);
    let o = a.run(&["relays", "add", &wrong]);
    assert_code(&o, 1, "relays add with another relay's key");
    assert_eq!(list(&a).lines().count(), 1);
    // --no-test adds it anyway; the good one is added after its test.
    a.ok(&["relays", "add", &down, "--no-test"]);
    a.ok(&["relays", "add", &other.addr]);
    assert_eq!(list(&a).lines().count(), 3);
    let o = a.run(&["relays", "remove", &down]);
    assert_code(&o, 0, "relays remove");
    assert!(
        stderr(&o).contains("no connection receives through it"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn json_everywhere_and_one_message_schema() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    let inv: Value = serde_json::from_str(&a.ok(&["invite", "--name", "bram", "--json"])).unwrap();
    assert_eq!(inv["name"], "bram");
    let link = inv["link"].as_str().unwrap();
    assert!(link.starts_with("TERN:"), "{inv}");
    let acc = json_lines(&b.ok(&["accept", link, "--name", "ada", "--json"]));
    assert_eq!(acc[0]["contact"], "ada");
    assert_eq!(acc[0]["state"], "pending");
    a.ok(&["recv"]);
    b.ok(&["recv"]);
    a.ok(&["recv"]);

    let sent = json_lines(&b.ok(&["send", "ada", "--json", "hello"]));
    assert_eq!(sent[0]["state"], "sent", "{sent:?}");
    let id = sent[0]["id"].as_str().unwrap().to_string();
    a.send("bram", "hi back");

    let got = a.recv();
    let msg = got.iter().find(|e| e["type"] == "message").unwrap().clone();
    let logged = a.log("bram");
    let in_log = logged
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap()
        .clone();
    for f in [
        "type",
        "contact",
        "from",
        "direction",
        "text",
        "id",
        "sent_at",
        "sent_at_ms",
        "received_at",
        "received_at_ms",
    ] {
        assert!(msg.get(f).is_some(), "recv --json lacks {f}: {msg}");
        assert!(in_log.get(f).is_some(), "log --json lacks {f}: {in_log}");
        if f != "received_at" && f != "received_at_ms" {
            assert_eq!(msg[f], in_log[f], "{f} differs between recv and log");
        }
    }
    assert_eq!(msg["from"], "bram");
    let mine = logged.iter().find(|e| e["direction"] == "out").unwrap();
    assert_eq!(mine["from"], "Ada", "{mine}");
    assert_eq!(mine["type"], "message");

    // recv --fail-if-empty: 66 when nothing came, 0 when something did.
    let o = a.run(&["recv", "--fail-if-empty"]);
    assert_code(&o, 66, "recv --fail-if-empty with nothing");
    let o = a.run(&["recv", "--wait", "1", "--fail-if-empty", "--json"]);
    assert_code(&o, 66, "recv --wait 1 --fail-if-empty with nothing");
    b.send("ada", "now something");
    let o = a.run(&["recv", "--fail-if-empty", "--json"]);
    assert_code(&o, 0, "recv --fail-if-empty with a message");
}

#[test]
fn send_parses_options_before_the_message_only() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    a.ok(&["send", "bram", "-5", "degrees"]);
    let out = a.ok(&["send", "bram", "--json", "on my way"]);
    assert_eq!(json_lines(&out)[0]["state"], "sent");
    let o = a.run(&["send", "bram", "hi", "--json"]);
    assert_code(&o, 0, "an option after the message's first word");
    assert_eq!(stdout(&o), "", "it is text, not an option");
    assert!(stderr(&o).contains("part of it"), "{}", stderr(&o));
    a.ok(&["send", "bram", "--", "--json"]);
    assert_eq!(
        b.recv_texts(),
        vec!["-5 degrees", "on my way", "hi --json", "--json"]
    );
}

#[test]
fn the_store_is_compacted_after_much_is_deleted() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    let big = "z".repeat(13_000);
    for _ in 0..100 {
        a.ok(&["send", "bram", &big]);
    }
    let db = a.home.join("store.db");
    let size = |a: &Profile| {
        std::fs::metadata(&db).unwrap().len()
            + std::fs::metadata(a.home.join("store.db-wal")).map_or(0, |m| m.len())
    };
    let before = size(&a);
    assert!(before > 1_200_000, "{before}");
    a.ok(&["forget", "bram", "--yes"]);
    a.ok(&["contacts"]);
    let after = size(&a);
    assert!(
        after < before / 4,
        "store.db is {after} bytes after forget, {before} before"
    );
}
