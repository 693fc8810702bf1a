//! A malicious relay against a real conversation: it flips bytes, replays,
//! reorders, drops, injects forged messages and swaps queues between
//! contacts. Each attack must end in detection (a warning, a gap report),
//! rejection, or redundancy (an honest relay delivers the real copy) —
//! never a wrong plaintext shown, never a crash, never a message shown twice.

mod adversary_common;
mod cli_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use adversary_common::*;
use cli_common::*;
use tern_relay::hooks::{DeliverAction, SendAction, Upload};

/// Alice (on `a_relays`) and Bob (on `b_relays`), connected: Alice calls
/// him "bob", he calls her "alice".
fn pair(a_relays: &[&str], b_relays: &[&str]) -> (Profile, Profile) {
    let a = profile("Alice", a_relays);
    let b = profile("Bob", b_relays);
    connect(&a, "bob", &b, "alice");
    (a, b)
}

/// The queue (and its sender id) that the SEND made by `f` went to on
/// `evil`. `f` must make exactly one upload there.
fn queue_used_by(evil: &Evil, f: impl FnOnce()) -> (i64, [u8; 16]) {
    let before = evil.sent_count();
    f();
    let sent = evil.sent();
    assert_eq!(sent.len(), before + 1, "expected one upload on the relay");
    let s = &sent[before];
    (s.queue, s.sender_id)
}

#[track_caller]
fn assert_warned(stderr: &str, what: &str) {
    assert!(
        stderr.contains("warning"),
        "{what}: expected a warning on stderr, got:\n{stderr}"
    );
}

/// Every byte region of a stored message flipped (type, nonce, encrypted
/// header, body, tag, zero fill), and the delivered ciphertext flipped:
/// each copy is dropped with a warning, nothing is shown, the chain reports
/// the lost message once a later one arrives, and the conversation goes on.
#[test]
fn flipped_bytes_are_dropped_and_the_gap_is_reported() {
    let honest = EvilRelay::start();
    let evil = EvilRelay::start();
    let (a, b) = pair(&[&honest.addr], &[&evil.addr]);
    let (bob_queue, _) = queue_used_by(&evil.evil, || a.send("bob", "hello 0"));
    assert_eq!(b.recv_texts(), vec!["hello 0"]);

    // Offsets into the 16,000-byte queue message: type byte, nonce,
    // encrypted ratchet header, ratchet body, queue-layer tag, zero fill.
    let stored_offsets = [0usize, 1, 30, 100, 8_000, 15_936, 15_999];
    // Offsets into the 16,016-byte delivered ciphertext.
    let delivered_offsets = [0usize, 7_000, 16_015];
    let mut lost = 0;
    for (round, &i) in stored_offsets.iter().enumerate() {
        let mask = [0x01, 0x80, 0x10][round % 3];
        evil.evil.on_send(move |s| {
            if s.queue == bob_queue {
                SendAction::Replace(vec![Upload::here(flipped(s.message, i, mask))])
            } else {
                SendAction::Store
            }
        });
        let secret = format!("tampered stored {i}");
        a.send("bob", &secret);
        let (events, err) = recv_json(&b);
        assert_eq!(
            messages(&events),
            vec![],
            "flip at {i}: nothing may be shown"
        );
        assert_warned(&err, &format!("stored byte {i} flipped"));
        lost += 1;
    }
    for &i in &delivered_offsets {
        evil.evil.honest();
        evil.evil.on_deliver(move |d| {
            if d.queue == bob_queue {
                DeliverAction::Raw {
                    msg_id: *d.msg_id,
                    delivered: flipped(d.delivered, i, 0x04),
                }
            } else {
                DeliverAction::Pass
            }
        });
        a.send("bob", &format!("tampered delivered {i}"));
        let (events, err) = recv_json(&b);
        assert_eq!(messages(&events), vec![], "delivered flip at {i}");
        assert!(err.contains("does not decrypt"), "{err}");
        lost += 1;
    }
    evil.evil.honest();
    a.send("bob", "after the tampering");
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![("after the tampering".to_string(), "after-gap".to_string())],
        "the next message arrives, marked as following a gap"
    );
    assert!(
        err.contains(&format!(
            "{lost} earlier message(s) from alice have not arrived"
        )),
        "the receiver is told exactly how many are missing:\n{err}"
    );
    // Both ways still work, and nothing tampered ever reached a history.
    b.send("alice", "reply");
    assert_eq!(a.recv_texts(), vec!["reply"]);
    assert_eq!(inbox(&b, "alice"), vec!["hello 0", "after the tampering"]);
    b.recv_nothing();
}

/// With a second, honest relay, the tampered copies are dropped and the
/// real ones arrive through the other relay: no gap, nothing lost.
#[test]
fn tampering_relay_is_outvoted_by_an_honest_one() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let (a, b) = pair(&[&ra.addr], &[&evil.addr, &honest.addr]);
    // Flip every upload and every delivery through the evil relay, in
    // both directions of storage.
    evil.evil
        .on_send(|s| SendAction::Replace(vec![Upload::here(flipped(s.message, 5_000, 0x20))]));
    let mut n = 0u8;
    evil.evil.on_deliver(move |d| {
        n = n.wrapping_add(1);
        if n % 2 == 0 {
            DeliverAction::Raw {
                msg_id: *d.msg_id,
                delivered: flipped(d.delivered, 9_999, 0x01),
            }
        } else {
            DeliverAction::Pass
        }
    });
    for i in 0..4 {
        a.send("bob", &format!("m{i}"));
    }
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        (0..4)
            .map(|i| (format!("m{i}"), "in-order".to_string()))
            .collect::<Vec<_>>(),
        "every message once, in order, from the honest relay\n{err}"
    );
    assert_warned(&err, "tampered copies");
    assert!(!err.contains("have not arrived"), "no gap: {err}");
    b.recv_nothing();
    assert_eq!(inbox(&b, "alice"), vec!["m0", "m1", "m2", "m3"]);
}

/// The relay keeps copies of everything it carried (including the
/// handshake's messages) and stores them again, and re-delivers old ones
/// in place of new ones: nothing is ever shown twice, also across ratchet
/// steps.
#[test]
fn replayed_messages_are_never_shown_twice() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let (a, b) = pair(&[&ra.addr], &[&evil.addr]);
    let (bob_queue, _) = queue_used_by(&evil.evil, || a.send("bob", "one"));
    a.send("bob", "two");
    assert_eq!(b.recv_texts(), vec!["one", "two"]);
    // A ratchet step on Bob's side, then more from Alice.
    b.send("alice", "ack");
    assert_eq!(a.recv_texts(), vec!["ack"]);
    a.send("bob", "three");
    assert_eq!(b.recv_texts(), vec!["three"]);

    // Everything Bob's queue ever carried: the HelloReply, "one", "two",
    // "three" (and whatever else went there).
    let old: Vec<Vec<u8>> = evil
        .evil
        .sent()
        .into_iter()
        .filter(|s| s.queue == bob_queue)
        .map(|s| s.message)
        .collect();
    assert!(
        old.len() >= 4,
        "the relay saw the handshake and three texts"
    );

    // Store all of them again alongside the next upload, twice over.
    let replay = old.clone();
    evil.evil.on_send(move |s| {
        let mut v = vec![Upload::here(s.message.to_vec())];
        for m in replay.iter().chain(replay.iter()) {
            v.push(Upload::here(m.clone()));
        }
        v.push(Upload::here(s.message.to_vec()));
        SendAction::Replace(v)
    });
    a.send("bob", "four");
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![("four".to_string(), "in-order".to_string())],
        "{err}"
    );
    b.recv_nothing();

    // Now re-deliver an old message in front of every real one, under a
    // fresh message id (the real one stays queued behind it).
    evil.evil.honest();
    let replay = Arc::new(Mutex::new(old.clone()));
    let r = replay.clone();
    evil.evil.on_deliver(move |d| {
        if d.queue != bob_queue {
            return DeliverAction::Pass;
        }
        match r.lock().unwrap().pop() {
            Some(m) => DeliverAction::Replace {
                msg_id: fresh_id(),
                message: m,
            },
            None => DeliverAction::Pass,
        }
    });
    a.send("bob", "five");
    a.send("bob", "six");
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![
            ("five".to_string(), "in-order".to_string()),
            ("six".to_string(), "in-order".to_string())
        ],
        "{err}"
    );
    assert!(replay.lock().unwrap().is_empty(), "every replay was tried");
    b.recv_nothing();
    assert_eq!(
        inbox(&b, "alice"),
        vec!["one", "two", "three", "four", "five", "six"]
    );
    // And the conversation goes on both ways.
    b.send("alice", "still here");
    assert_eq!(a.recv_texts(), vec!["still here"]);
}

/// The relay holds messages back and releases them out of order: each is
/// shown exactly once, the first to arrive after a gap, the others late.
#[test]
fn reordered_messages_are_shown_once_and_marked_late() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let (a, b) = pair(&[&ra.addr], &[&evil.addr]);
    let (bob_queue, _) = queue_used_by(&evil.evil, || a.send("bob", "r0"));
    assert_eq!(b.recv_texts(), vec!["r0"]);

    let held: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let h = held.clone();
    evil.evil.on_send(move |s| {
        if s.queue != bob_queue {
            return SendAction::Store;
        }
        let mut h = h.lock().unwrap();
        h.push(s.message.to_vec());
        if h.len() < 3 {
            // Hold it: the sender is told it was stored.
            return SendAction::Replace(vec![]);
        }
        // Release newest first.
        let out = h.drain(..).rev().map(Upload::here).collect();
        SendAction::Replace(out)
    });
    a.send("bob", "r1");
    a.send("bob", "r2");
    b.recv_nothing();
    a.send("bob", "r3");
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![
            ("r3".to_string(), "after-gap".to_string()),
            ("r2".to_string(), "late".to_string()),
            ("r1".to_string(), "late".to_string()),
        ]
    );
    assert!(
        err.contains("2 earlier message(s) from alice have not arrived"),
        "{err}"
    );
    b.recv_nothing();
    // The history shows what arrived, each once.
    let mut got = inbox(&b, "alice");
    got.sort();
    assert_eq!(got, vec!["r0", "r1", "r2", "r3"]);

    // Reordering across a ratchet step: Bob answers (new DH keys), then
    // Alice's next two are swapped.
    evil.evil.honest();
    b.send("alice", "turn");
    assert_eq!(a.recv_texts(), vec!["turn"]);
    let held: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let h = held.clone();
    evil.evil.on_send(move |s| {
        if s.queue != bob_queue {
            return SendAction::Store;
        }
        let mut h = h.lock().unwrap();
        match h.take() {
            None => {
                *h = Some(s.message.to_vec());
                SendAction::Replace(vec![])
            }
            Some(first) => {
                SendAction::Replace(vec![Upload::here(s.message.to_vec()), Upload::here(first)])
            }
        }
    });
    a.send("bob", "s1");
    a.send("bob", "s2");
    let (events, _) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![
            ("s2".to_string(), "after-gap".to_string()),
            ("s1".to_string(), "late".to_string()),
        ]
    );
    b.recv_nothing();
}

/// The relay acknowledges and silently discards. Alone, it causes a gap
/// that the next message reveals ("n earlier messages have not arrived");
/// next to an honest relay, nothing is lost at all.
#[test]
fn silently_dropped_messages_are_reported_or_recovered() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let (a, b) = pair(&[&ra.addr], &[&evil.addr]);
    let (bob_queue, _) = queue_used_by(&evil.evil, || a.send("bob", "d0"));
    assert_eq!(b.recv_texts(), vec!["d0"]);
    evil.evil.on_send(move |s| {
        if s.queue == bob_queue {
            SendAction::Replace(vec![])
        } else {
            SendAction::Store
        }
    });
    let o = a.run(&["send", "bob", "dropped 1"]);
    assert_code(&o, 0, "the relay said OK");
    a.send("bob", "dropped 2");
    b.recv_nothing();
    evil.evil.honest();
    a.send("bob", "d3");
    let o = b.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv");
    let events = json_lines(&stdout(&o));
    assert_eq!(
        messages(&events),
        vec![("d3".to_string(), "after-gap".to_string())]
    );
    assert!(
        stderr(&o).contains("2 earlier message(s) from alice have not arrived"),
        "the gap must be reported:\n{}",
        show(&o)
    );
    assert_never_shown(&b, &["dropped 1", "dropped 2"]);

    // Now with redundancy: Carol on the evil relay and an honest one.
    let honest = EvilRelay::start();
    let c = profile("Carol", &[&evil.addr, &honest.addr]);
    connect(&a, "carol", &c, "alice");
    // Drop everything the evil relay is given, from now on.
    evil.evil.on_send(|_| SendAction::Replace(vec![]));
    for i in 0..3 {
        a.send("carol", &format!("c{i}"));
    }
    let (events, err) = recv_json(&c);
    assert_eq!(
        messages(&events),
        (0..3)
            .map(|i| (format!("c{i}"), "in-order".to_string()))
            .collect::<Vec<_>>(),
        "{err}"
    );
    assert!(!err.contains("have not arrived"), "{err}");
    c.recv_nothing();
}

/// Forged messages of every shape stored next to real ones: random
/// ciphertext, a connection request, a copy of a real message with one bit
/// changed, all zeros, an unknown type. All rejected; the real message is
/// shown once; no forged content anywhere.
#[test]
fn injected_forgeries_are_rejected() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let (a, b) = pair(&[&ra.addr], &[&evil.addr]);
    let (bob_queue, _) = queue_used_by(&evil.evil, || a.send("bob", "real 0"));
    assert_eq!(b.recv_texts(), vec!["real 0"]);

    evil.evil.on_send(move |s| {
        if s.queue != bob_queue {
            return SendAction::Store;
        }
        let mut zero = vec![0u8; s.message.len()];
        zero[0] = 0x02;
        let mut unknown = s.message.to_vec();
        unknown[0] = 0x07;
        SendAction::Replace(vec![
            Upload::here(forged_message()),
            Upload::here(forged_request()),
            Upload::here(flipped(s.message, 20, 0x01)),
            Upload::here(zero),
            Upload::here(unknown),
            Upload::here(vec![0u8; s.message.len()]),
            Upload::here(s.message.to_vec()),
            Upload::here(forged_message()),
        ])
    });
    a.send("bob", "real 1");
    let (events, err) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![("real 1".to_string(), "in-order".to_string())],
        "{err}"
    );
    assert_warned(&err, "forgeries");
    b.recv_nothing();

    // Forgeries delivered at fetch time, in front of a real message.
    evil.evil.honest();
    let mut left = 3;
    evil.evil.on_deliver(move |_d| {
        if left == 0 {
            return DeliverAction::Pass;
        }
        left -= 1;
        DeliverAction::Replace {
            msg_id: fresh_id(),
            message: forged_message(),
        }
    });
    a.send("bob", "real 2");
    let (events, _) = recv_json(&b);
    assert_eq!(
        messages(&events),
        vec![("real 2".to_string(), "in-order".to_string())]
    );

    // A forged connection request on a queue of a connected contact:
    // refused (the relay can at most raise a false alarm, see below).
    evil.evil.honest();
    let (carol_sid, carol) = {
        // Carol invites Bob; her (inviter) queue is on the evil relay.
        let c = profile("Carol", &[&evil.addr]);
        connect(&c, "bob", &b, "carol");
        let (_, sid) = queue_used_by(&evil.evil, || b.send("carol", "hi carol"));
        assert_eq!(c.recv_texts(), vec!["hi carol"]);
        (sid, c)
    };
    evil.evil.on_send(move |s| {
        SendAction::Replace(vec![
            Upload::here(s.message.to_vec()),
            Upload::to(carol_sid, forged_request()),
        ])
    });
    // Any upload to the relay triggers the injection into Carol's queue.
    a.send("bob", "real 3");
    assert_eq!(b.recv_texts(), vec!["real 3"]);
    let (events, err) = recv_json(&carol);
    assert_eq!(messages(&events), vec![], "{err}");
    // What Carol is told is a false alarm the relay made up from random
    // bytes: "someone else tried to use the one-time invitation you made
    // for bob: it may have been copied on its way" (see the report).
    assert_warned(&err, "forged connection request");
    assert_never_shown(&b, &["forged"]);
}

/// The relay hosts queues of two contacts of Alice and delivers Carol's
/// messages on Bob's queue (and Bob's on Carol's), both in place of the
/// real message and next to it. Nothing is ever shown as coming from the
/// wrong contact.
#[test]
fn swapped_queues_never_show_a_message_from_the_wrong_contact() {
    let evil = EvilRelay::start();
    let rb = EvilRelay::start();
    let rc = EvilRelay::start();
    let a = profile("Alice", &[&evil.addr]);
    let b = profile("Bob", &[&rb.addr]);
    let c = profile("Carol", &[&rc.addr]);
    connect(&a, "bob", &b, "alice");
    connect(&a, "carol", &c, "alice");
    let (qb, sid_b) = queue_used_by(&evil.evil, || b.send("alice", "from bob 1"));
    let (qc, sid_c) = queue_used_by(&evil.evil, || c.send("alice", "from carol 1"));
    assert_ne!(qb, qc);
    let mut got = a.recv_texts();
    got.sort();
    assert_eq!(got, vec!["from bob 1", "from carol 1"]);

    // 1. At storage: each upload is also stored in the other contact's queue.
    evil.evil.on_send(move |s| {
        let other = if s.queue == qb { sid_c } else { sid_b };
        SendAction::Replace(vec![
            Upload::to(other, s.message.to_vec()),
            Upload::here(s.message.to_vec()),
        ])
    });
    b.send("alice", "from bob 2");
    c.send("alice", "from carol 2");
    let (events, err) = recv_json(&a);
    let by: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["contact"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut by_sorted = by.clone();
    by_sorted.sort();
    assert_eq!(
        by_sorted,
        vec![
            ("bob".to_string(), "from bob 2".to_string()),
            ("carol".to_string(), "from carol 2".to_string())
        ],
        "{err}"
    );
    assert_warned(&err, "copies on the wrong queue");

    // 2. At delivery: the message waiting on Bob's queue is replaced by the
    // last upload to Carol's queue (the ACK deletes Bob's real message), and
    // vice versa.
    evil.evil.honest();
    let last: Arc<Mutex<HashMap<i64, Vec<u8>>>> = Arc::default();
    for s in evil.evil.sent() {
        last.lock().unwrap().insert(s.queue, s.message);
    }
    let l = last.clone();
    evil.evil.on_deliver(move |d| {
        let other = if d.queue == qb { qc } else { qb };
        match l.lock().unwrap().get(&other) {
            Some(m) => DeliverAction::Replace {
                msg_id: *d.msg_id,
                message: m.clone(),
            },
            None => DeliverAction::Pass,
        }
    });
    b.send("alice", "from bob 3");
    c.send("alice", "from carol 3");
    let (events, err) = recv_json(&a);
    assert_eq!(messages(&events), vec![], "{err}");
    assert_warned(&err, "swapped deliveries");

    // Honest again: the next messages show the gap, each from its sender.
    evil.evil.honest();
    b.send("alice", "from bob 4");
    c.send("alice", "from carol 4");
    let (events, err) = recv_json(&a);
    let mut by: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["contact"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
                e["order"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    by.sort();
    assert_eq!(
        by,
        vec![
            (
                "bob".to_string(),
                "from bob 4".to_string(),
                "after-gap".to_string()
            ),
            (
                "carol".to_string(),
                "from carol 4".to_string(),
                "after-gap".to_string()
            )
        ],
        "{err}"
    );
    for t in inbox(&a, "bob") {
        assert!(t.starts_with("from bob"), "Bob's history holds {t:?}");
    }
    for t in inbox(&a, "carol") {
        assert!(t.starts_with("from carol"), "Carol's history holds {t:?}");
    }
}
