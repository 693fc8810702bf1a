//! A malicious relay during queue rotation (`tern rotate`): the control
//! messages that move a direction to new queues travel through the relay
//! like any message, so it can swap, duplicate, drop or replay them. The
//! rotation must complete (or the conversation go on without it), and no
//! text may be lost without a gap report, shown twice, or shown wrongly.

mod adversary_common;
mod cli_common;

use std::sync::{Arc, Mutex};

use adversary_common::*;
use cli_common::*;
use tern_relay::hooks::{SendAction, Upload};

fn rotating(p: &Profile, c: &str) -> bool {
    p.contact(c)["rotating"] == true
}

/// `(text, order)` pairs shown by `recv`.
type Shown = Vec<(String, String)>;

/// Runs `recv` on both sides until both rotations are over (bounded).
fn complete(a: &Profile, b: &Profile) -> (Shown, Shown) {
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let (ea, _) = recv_json(a);
        got_a.extend(messages(&ea));
        let (eb, _) = recv_json(b);
        got_b.extend(messages(&eb));
        if !rotating(a, "bob") && !rotating(b, "alice") {
            break;
        }
    }
    (got_a, got_b)
}

/// Bob's only relay swaps every two consecutive uploads to the same queue
/// and stores each upload twice, for the whole rotation; texts flow both
/// ways meanwhile. Every text arrives exactly once and the rotation
/// completes on both sides.
#[test]
fn rotation_survives_a_relay_that_reorders_and_duplicates() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let a = profile("Alice", &[&ra.addr]);
    let b = profile("Bob", &[&evil.addr]);
    connect(&a, "bob", &b, "alice");

    type Held = Option<([u8; 16], Vec<u8>)>;
    let held: Arc<Mutex<Held>> = Arc::default();
    let h = held.clone();
    evil.evil.on_send(move |s| {
        let mut h = h.lock().unwrap();
        let me = (*s.sender_id, s.message.to_vec());
        match h.take() {
            None => {
                *h = Some(me);
                SendAction::Replace(vec![])
            }
            // Same queue: the newer first, then the held one; all twice.
            Some((sid, m)) if sid == *s.sender_id => SendAction::Replace(vec![
                Upload::here(s.message.to_vec()),
                Upload::here(m.clone()),
                Upload::here(s.message.to_vec()),
                Upload::here(m),
            ]),
            // Another queue: release the held one where it belongs.
            Some((sid, m)) => SendAction::Replace(vec![
                Upload::to(sid, m.clone()),
                Upload::to(sid, m),
                Upload::here(s.message.to_vec()),
                Upload::here(s.message.to_vec()),
            ]),
        }
    });

    b.ok(&["rotate", "alice"]); // both directions rotate (Bob asks Alice too)
    let mut sent_ab = Vec::new();
    let mut sent_ba = Vec::new();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let t = format!("a→b {i}");
        a.send("bob", &t);
        sent_ab.push(t);
        let t = format!("b→a {i}");
        b.send("alice", &t);
        sent_ba.push(t);
        let (ga, gb) = complete(&a, &b);
        got_a.extend(ga);
        got_b.extend(gb);
    }
    // Release whatever the relay still holds, then be honest.
    {
        let h = held.clone();
        evil.evil.on_send(move |s| {
            let mut v = Vec::new();
            if let Some((sid, m)) = h.lock().unwrap().take() {
                v.push(Upload::to(sid, m));
            }
            v.push(Upload::here(s.message.to_vec()));
            SendAction::Replace(v)
        });
    }
    a.send("bob", "flush");
    sent_ab.push("flush".into());
    evil.evil.honest();
    let (ga, gb) = complete(&a, &b);
    got_a.extend(ga);
    got_b.extend(gb);
    assert!(!rotating(&a, "bob"), "Alice's rotation completed");
    assert!(!rotating(&b, "alice"), "Bob's rotation completed");

    let mut texts_b: Vec<String> = got_b.iter().map(|(t, _)| t.clone()).collect();
    texts_b.sort();
    sent_ab.sort();
    assert_eq!(texts_b, sent_ab, "Bob got every text once: {got_b:?}");
    let mut texts_a: Vec<String> = got_a.iter().map(|(t, _)| t.clone()).collect();
    texts_a.sort();
    sent_ba.sort();
    assert_eq!(texts_a, sent_ba, "Alice got every text once: {got_a:?}");
    assert!(
        got_a.iter().chain(&got_b).any(|(_, o)| o == "late"),
        "the relay did reorder texts: {got_a:?} {got_b:?}"
    );
    a.send("bob", "after");
    assert_eq!(b.recv_texts(), vec!["after"]);
    b.send("alice", "after too");
    assert_eq!(a.recv_texts(), vec!["after too"]);
}

/// One of Bob's two relays drops everything during a rotation (the control
/// messages included): the rotation completes through the other relay,
/// and nothing is lost.
#[test]
fn rotation_completes_through_the_honest_relay() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let a = profile("Alice", &[&ra.addr]);
    let b = profile("Bob", &[&evil.addr, &honest.addr]);
    connect(&a, "bob", &b, "alice");
    evil.evil.on_send(|_| SendAction::Replace(vec![]));
    b.ok(&["rotate", "alice"]);
    a.send("bob", "during");
    let (ga, gb) = complete(&a, &b);
    assert!(ga.is_empty());
    assert_eq!(gb, vec![("during".to_string(), "in-order".to_string())]);
    assert!(!rotating(&a, "bob") && !rotating(&b, "alice"));
    evil.evil.honest();
    a.send("bob", "after");
    let (eb, err) = recv_json(&b);
    assert_eq!(
        messages(&eb),
        vec![("after".into(), "in-order".into())],
        "{err}"
    );
    b.recv_nothing();
}
