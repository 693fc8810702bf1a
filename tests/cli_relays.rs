//! Relays going down and coming back: several relays per profile, the
//! outbox (exit 75 and a later retry), and a relay killed with SIGKILL and
//! restarted on the same data directory and port. Every message must arrive
//! exactly once.

mod cli_common;

use cli_common::*;

/// Three profiles on overlapping relays; one relay dies mid-conversation.
/// Sends still succeed, and each message is received exactly once even
/// though it travels through several relays (and, once the dead relay is
/// back, a late copy arrives through it too).
#[test]
fn several_relays_one_dies_mid_conversation() {
    let mut r1 = Relay::start();
    let r2 = Relay::start();
    let r3 = Relay::start();
    let alice = Profile::new("Alice", &[&r1, &r2, &r3]);
    let bob = Profile::new("Bob", &[&r2, &r3]);
    let carol = Profile::new("Carol", &[&r3, &r1]);
    connect(&alice, "bob", &bob, "alice");
    connect(&alice, "carol", &carol, "alice");
    connect(&bob, "carol", &carol, "bob");
    assert_eq!(
        alice.contact("bob")["receive_relays"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "Alice receives from Bob on all three of her relays"
    );
    assert_eq!(
        alice.contact("bob")["send_relays"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "and sends to Bob on his two"
    );

    alice.send("bob", "a→b 1");
    alice.send("carol", "a→c 1");
    bob.send("alice", "b→a 1");
    bob.send("carol", "b→c 1");
    carol.send("alice", "c→a 1");
    carol.send("bob", "c→b 1");
    let mut got = alice.recv_texts();
    got.sort();
    assert_eq!(got, vec!["b→a 1", "c→a 1"]);
    let mut got = bob.recv_texts();
    got.sort();
    assert_eq!(got, vec!["a→b 1", "c→b 1"]);
    let mut got = carol.recv_texts();
    got.sort();
    assert_eq!(got, vec!["a→c 1", "b→c 1"]);
    for p in [&alice, &bob, &carol] {
        p.recv_nothing();
    }

    // R1 dies.
    r1.stop();
    alice.send("bob", "a→b 2"); // Bob's relays are fine
    let o = bob.run(&["send", "alice", "b→a 2"]); // one of Alice's three is down
    assert_code(&o, 0, "send with one of three relays down");
    let o = carol.run(&["send", "alice", "c→a 2"]);
    assert_code(&o, 0, "Carol to Alice with R1 down");
    let o = alice.run(&["send", "carol", "a→c 2"]); // Carol keeps R3
    assert_code(&o, 0, "Alice to Carol with R1 down");
    bob.send("alice", "b→a 3");

    let o = alice.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv with one relay down");
    let mut got = texts(&json_lines(&stdout(&o)));
    got.sort();
    assert_eq!(got, vec!["b→a 2", "b→a 3", "c→a 2"], "{}", show(&o));
    assert_eq!(bob.recv_texts(), vec!["a→b 2"]);
    assert_eq!(carol.recv_texts(), vec!["a→c 2"]);
    alice.recv_nothing();
    carol.recv_nothing();
    // The copies for R1 wait for it.
    assert!(bob.contact("alice")["pending_jobs"].as_u64().unwrap() > 0);

    // R1 comes back: the late copies reach it and are dropped as duplicates.
    r1.restart();
    bob.ok(&["recv"]);
    carol.ok(&["recv"]);
    assert_eq!(bob.contact("alice")["pending_jobs"], 0);
    assert_eq!(carol.contact("alice")["pending_jobs"], 0);
    alice.recv_nothing();
    let log: Vec<String> = alice
        .log("bob")
        .iter()
        .filter(|e| e["direction"] == "in")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(log, vec!["b→a 1", "b→a 2", "b→a 3"]);
    // And everything still flows.
    carol.send("alice", "c→a 3");
    assert_eq!(alice.recv_texts(), vec!["c→a 3"]);
}

/// All of the contact's relays down: `tern send` exits 75 and keeps the
/// message; once the relays are back (same port and data), the next `tern
/// send` or `tern recv` delivers it, and it arrives exactly once.
#[test]
fn outbox_keeps_messages_while_relays_are_down() {
    let ra = Relay::start();
    let mut rb1 = Relay::start();
    let mut rb2 = Relay::start();
    let a = Profile::new("Ada", &[&ra]);
    let b = Profile::new("Bram", &[&rb1, &rb2]);
    connect(&a, "bram", &b, "ada");
    a.send("bram", "m0");
    assert_eq!(b.recv_texts(), vec!["m0"]);

    rb1.stop();
    rb2.stop();
    let o = a.run(&["send", "bram", "m1"]);
    assert_code(&o, 75, "send with every relay of the contact down");
    assert!(stderr(&o).contains("kept"), "{}", stderr(&o));
    let o = a.run(&["send", "bram", "m2"]);
    assert_code(&o, 75, "second send, still down");
    assert_eq!(a.contact("bram")["pending_jobs"], 2);
    let log: Vec<String> = a
        .log("bram")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(log, vec!["m0", "m1", "m2"], "kept in the history");
    // Bram's own recv fails as a whole: every relay is down.
    let o = b.run(&["recv"]);
    assert_code(&o, 75, "recv with all of one's relays down");

    // Back up: the next send delivers everything waiting, in order.
    rb1.restart();
    rb2.restart();
    a.send("bram", "m3");
    assert_eq!(a.contact("bram")["pending_jobs"], 0);
    assert_eq!(b.recv_texts(), vec!["m1", "m2", "m3"]);
    b.recv_nothing();

    // Down again, then the next recv (not send) delivers.
    rb1.stop();
    rb2.stop();
    let o = a.run(&["send", "bram", "m4"]);
    assert_code(&o, 75, "send while down again");
    let o = a.run(&["recv"]);
    assert_code(&o, 0, "Ada's own relay is fine; the retry fails quietly");
    assert_eq!(a.contact("bram")["pending_jobs"], 1);
    rb1.restart();
    rb2.restart();
    a.ok(&["recv"]);
    assert_eq!(a.contact("bram")["pending_jobs"], 0);
    assert_eq!(b.recv_texts(), vec!["m4"]);
    b.recv_nothing();

    // Only one of the two back: delivered through it; the copy for the
    // other follows later and is dropped as a duplicate.
    rb1.stop();
    rb2.stop();
    assert_code(&a.run(&["send", "bram", "m5"]), 75, "send, both down");
    rb2.restart();
    a.ok(&["recv"]);
    assert_eq!(
        a.contact("bram")["pending_jobs"],
        1,
        "the copy for rb1 waits"
    );
    assert_eq!(b.recv_texts(), vec!["m5"]);
    rb1.restart();
    a.ok(&["recv"]);
    assert_eq!(a.contact("bram")["pending_jobs"], 0);
    b.recv_nothing();
    let log: Vec<String> = b
        .log("ada")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(log, vec!["m0", "m1", "m2", "m3", "m4", "m5"]);
}

/// A message the relay acknowledged to the sender survives the relay being
/// killed (SIGKILL) and restarted on the same data directory and port, and
/// is received exactly once.
#[test]
fn acknowledged_message_survives_relay_sigkill() {
    let ra = Relay::start();
    let mut rb = Relay::start();
    let a = Profile::new("Ada", &[&ra]);
    let b = Profile::new("Bram", &[&rb]);
    connect(&a, "bram", &b, "ada");

    let o = a.run(&["send", "bram", "survives the crash"]);
    assert_code(&o, 0, "send (acknowledged by the relay)");
    assert_eq!(a.contact("bram")["pending_jobs"], 0, "the relay has it");
    a.send("bram", "and a second one");
    rb.restart(); // SIGKILL, then start again
    assert_eq!(
        b.recv_texts(),
        vec!["survives the crash", "and a second one"]
    );
    b.recv_nothing();

    // Acknowledged deliveries stay deleted across a crash too.
    rb.restart();
    b.recv_nothing();
    // The queues themselves survived: the conversation goes on both ways.
    a.send("bram", "after the restarts");
    assert_eq!(b.recv_texts(), vec!["after the restarts"]);
    b.send("ada", "back to you");
    assert_eq!(a.recv_texts(), vec!["back to you"]);
}
