//! State rollback (issue 14 item 7): a copied home, a restored backup or a
//! VM snapshot sends with ratchet state that the original also uses. Before
//! the fix, the contact silently dropped the original's next messages as
//! duplicates (same ratchet position) while the sender got exit 0, and the
//! body key and nonce of the copy's message were those of the original's.
//! Now the contact detects the fork, both sides resynchronise the ratchet,
//! the side whose history forked is told so, and its text arrives.

mod cli_common;

use cli_common::*;

/// Copies a profile's home directory into a fresh temporary home.
fn copy_of(p: &Profile, display: &str) -> Profile {
    let copy = Profile::empty(display);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&p.home)
        .arg(&copy.home)
        .status()
        .expect("cp");
    assert!(st.success());
    copy
}

#[test]
fn a_copied_home_that_sent_first_does_not_swallow_the_originals_messages() {
    let r1 = Relay::start();
    let r2 = Relay::start();
    let a = Profile::new("Alice", &[&r1]);
    let b = Profile::new("Bob", &[&r2]);
    connect(&a, "bob", &b, "alice");
    a.send("bob", "before the copy");
    assert_eq!(b.recv_texts(), vec!["before the copy"]);

    let copy = copy_of(&a, "Alice's copy");
    copy.send("bob", "from the copy");
    a.send("bob", "from the original");

    // Bob takes the copy's text and finds the original's at a position the
    // copy used: the conversation forked. He is told, and a resync starts.
    let o = b.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv");
    let events = json_lines(&stdout(&o));
    assert_eq!(texts(&events), vec!["from the copy"], "{}", show(&o));
    assert!(stderr(&o).contains("lost step"), "{}", show(&o));

    // Alice (the original) answers the resync and learns that another copy
    // of her profile sent in her name; her text goes out again.
    let o = a.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv");
    assert!(
        stderr(&o).contains("another copy of this profile"),
        "the side that forked is told: {}",
        show(&o)
    );

    let o = b.run(&["recv", "--json"]);
    let events = json_lines(&stdout(&o));
    assert_eq!(
        texts(&events),
        vec!["from the original"],
        "nothing was lost: {}",
        show(&o)
    );

    // The conversation goes on both ways.
    a.send("bob", "after the resync");
    assert_eq!(b.recv_texts(), vec!["after the resync"]);
    b.send("alice", "got everything");
    assert_eq!(a.recv_texts(), vec!["got everything"]);
    let log: Vec<String> = b
        .log("alice")
        .iter()
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect();
    for t in ["from the copy", "from the original", "after the resync"] {
        assert_eq!(log.iter().filter(|l| *l == t).count(), 1, "{t}: {log:?}");
    }
}

/// Bob restores an older backup of his profile: he cannot read what Alice
/// sent since, detects that himself, and the resync brings her texts again.
#[test]
fn a_restored_backup_recovers_the_messages_it_missed() {
    let r1 = Relay::start();
    let r2 = Relay::start();
    let a = Profile::new("Alice", &[&r1]);
    let b = Profile::new("Bob", &[&r2]);
    connect(&a, "bob", &b, "alice");
    let backup = copy_of(&b, "Bob's backup");
    a.send("bob", "one");
    assert_eq!(b.recv_texts(), vec!["one"]);
    b.send("alice", "ok");
    assert_eq!(a.recv_texts(), vec!["ok"]);
    a.send("bob", "two");

    // Bob's disk dies; he restores the backup and reads on.
    let b = backup;
    let o = b.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv");
    assert!(stderr(&o).contains("lost step"), "{}", show(&o));
    let o = a.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv");
    let o = b.run(&["recv", "--json"]);
    let got = texts(&json_lines(&stdout(&o)));
    assert!(got.contains(&"two".to_string()), "{}", show(&o));
    assert!(
        stderr(&o).contains("another copy of this profile"),
        "Bob is told his state went back: {}",
        show(&o)
    );
    b.send("alice", "back again");
    assert_eq!(a.recv_texts(), vec!["back again"]);
}
