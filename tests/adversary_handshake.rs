//! A malicious relay during the handshake: it replaces the connection
//! request (the joiner's keys J and E travel in the clear through the
//! inviter's relays), the inviter's reply or the joiner's confirmation with
//! copies it made, and lies about its own queue key in CREATE. The
//! handshake must not complete through the tampered copy; it completes only
//! through an honest relay, and then both sides' security codes match.

mod adversary_common;
mod cli_common;

use adversary_common::*;
use cli_common::*;
use tern_relay::hooks::{ResponseAction, SendAction, Upload};
use tern_wire::Reply;

/// An authentic reply record of the relay's choice, under the tag `tag`.
fn record(tag: u32, reply: Reply) -> Vec<u8> {
    let mut out = Vec::new();
    reply.encode(tag, &mut out);
    out
}

fn code(p: &Profile, contact: &str) -> String {
    p.ok(&["verify", contact]).trim().to_string()
}

fn state(p: &Profile, contact: &str) -> String {
    p.contact(contact)["state"].as_str().unwrap().to_string()
}

/// A named way to alter a queue message.
type Tamper = (&'static str, fn(&[u8]) -> Vec<u8>);

/// Ways to tamper with a connection request (type 0x01: J, E, ratchet
/// message carrying the Hello).
fn substitutions() -> Vec<Tamper> {
    vec![
        ("J replaced by the relay's own key", |m| {
            let mut m = m.to_vec();
            m[1..33].copy_from_slice(&random_bytes(32));
            m
        }),
        ("E replaced by the relay's own key", |m| {
            let mut m = m.to_vec();
            m[33..65].copy_from_slice(&random_bytes(32));
            m
        }),
        ("J and E both replaced", |m| {
            let mut m = m.to_vec();
            m[1..65].copy_from_slice(&random_bytes(64));
            m
        }),
        ("J replaced by a low-order point", |m| {
            let mut m = m.to_vec();
            m[1..33].fill(0);
            m
        }),
        ("encrypted Hello header altered", |m| {
            flipped(m, 65 + 30, 0x01)
        }),
        ("encrypted Hello body altered", |m| {
            flipped(m, 65 + 9_000, 0x40)
        }),
        ("a request the relay made up", |_| forged_request()),
    ]
}

/// The inviter's only relay replaces every connection request. The
/// invitation is not used up by the forgery, the inviter is warned, and
/// the handshake never completes (the joiner stays pending).
#[test]
fn substituted_connection_request_never_completes_the_handshake() {
    let evil = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&evil.addr]);
    let b = profile("Bob", &[&rb.addr]);
    for (n, (what, tamper)) in substitutions().into_iter().enumerate() {
        evil.evil.on_send(move |s| {
            if s.signed {
                SendAction::Store
            } else {
                SendAction::Replace(vec![Upload::here(tamper(s.message))])
            }
        });
        let bob = format!("bob{n}");
        let alice = format!("alice{n}");
        let link = a.ok(&["invite", "--link", "--name", &bob]);
        b.ok(&["accept", link.trim(), "--name", &alice]);
        let (events, err) = recv_json(&a);
        assert!(
            !events.iter().any(|e| e["type"] == "connected"),
            "{what}: {events:?}"
        );
        assert!(
            err.contains("warning"),
            "{what}: the inviter is warned:\n{err}"
        );
        assert_eq!(state(&a, &bob), "invited", "{what}: invitation not used up");
        let (events, _) = recv_json(&b);
        assert!(
            !events.iter().any(|e| e["type"] == "connected"),
            "{what}: {events:?}"
        );
        assert_eq!(state(&b, &alice), "pending", "{what}");
        // No code to compare: the inviter never learnt any joiner key.
        let o = a.run(&["verify", &bob]);
        assert_code(&o, 2, &format!("{what}: verify before a request"));
    }
}

/// Same substitution, but the inviter has a second, honest relay: the
/// handshake completes through it, and the security codes agree.
#[test]
fn substituted_connection_request_loses_to_an_honest_relay() {
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&evil.addr, &honest.addr]);
    let b = profile("Bob", &[&rb.addr]);
    for (n, (what, tamper)) in substitutions().into_iter().enumerate().take(4) {
        evil.evil.on_send(move |s| {
            if s.signed {
                SendAction::Store
            } else {
                SendAction::Replace(vec![Upload::here(tamper(s.message))])
            }
        });
        let bob = format!("bob{n}");
        let alice = format!("alice{n}");
        connect(&a, &bob, &b, &alice);
        assert_eq!(code(&a, &bob), code(&b, &alice), "{what}: codes must match");
        a.send(&bob, &format!("hello {n}"));
        assert_eq!(b.recv_texts(), vec![format!("hello {n}")], "{what}");
        b.send(&alice, "back");
        assert_eq!(a.recv_texts(), vec!["back"], "{what}");
    }
    // Every pair has its own code.
    let codes: Vec<String> = (0..4).map(|n| code(&a, &format!("bob{n}"))).collect();
    let mut dedup = codes.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), codes.len());
}

/// The joiner's relay replaces the inviter's reply (HelloReply, the one
/// unsigned message on the joiner's queue): altered, made up, or the reply
/// of another handshake. The joiner never connects through it; with an
/// honest second relay it does, and the codes match.
#[test]
fn substituted_reply_never_connects_the_joiner() {
    let ra = EvilRelay::start();
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let a = profile("Alice", &[&ra.addr]);
    // A reply from an unrelated handshake, to replay in place of the real one.
    let carol = profile("Carol", &[&evil.addr]);
    connect(&a, "carol", &carol, "alice");
    let other_reply = evil
        .evil
        .sent()
        .into_iter()
        .find(|s| !s.signed)
        .expect("the reply to Carol went through the evil relay")
        .message;

    let b = profile("Bob", &[&evil.addr]);
    type Boxed = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;
    let variants: Vec<(&str, Boxed)> = vec![
        ("header altered", Box::new(|m: &[u8]| flipped(m, 40, 0x02))),
        (
            "body altered",
            Box::new(|m: &[u8]| flipped(m, 12_345, 0x02)),
        ),
        ("made up", Box::new(|_: &[u8]| forged_message())),
        (
            "another handshake's reply",
            Box::new(move |_: &[u8]| other_reply.clone()),
        ),
    ];
    for (n, (what, tamper)) in variants.into_iter().enumerate() {
        evil.evil.on_send(move |s| {
            if s.signed {
                SendAction::Store
            } else {
                SendAction::Replace(vec![Upload::here(tamper(s.message))])
            }
        });
        let bob = format!("bob{n}");
        let alice = format!("alice{n}");
        let link = a.ok(&["invite", "--link", "--name", &bob]);
        b.ok(&["accept", link.trim(), "--name", &alice]);
        a.ok(&["recv"]); // accepts the request, replies
        let (events, err) = recv_json(&b);
        assert!(
            !events.iter().any(|e| e["type"] == "connected"),
            "{what}: {events:?}"
        );
        assert!(err.contains("warning"), "{what}:\n{err}");
        assert_eq!(state(&b, &alice), "pending", "{what}");
        assert_eq!(state(&a, &bob), "pending", "{what}: no confirmation came");
        // Whatever the inviter sends waits; nothing reaches the joiner.
        let o = a.run(&["send", &bob, "not yet"]);
        assert_code(&o, 0, "send before connected is kept in the outbox");
        let (events, _) = recv_json(&b);
        assert!(messages(&events).is_empty(), "{what}");
    }

    // With an honest relay next to the evil one, the joiner connects.
    evil.evil.on_send(|s| {
        if s.signed {
            SendAction::Store
        } else {
            SendAction::Replace(vec![Upload::here(forged_message())])
        }
    });
    let b2 = profile("Bram", &[&evil.addr, &honest.addr]);
    connect(&a, "bram", &b2, "alice");
    assert_eq!(code(&a, "bram"), code(&b2, "alice"));
    assert_ne!(code(&a, "bram"), code(&a, "carol"));
    a.send("bram", "through the honest relay");
    assert_eq!(b2.recv_texts(), vec!["through the honest relay"]);
}

/// The inviter's relay drops or alters the joiner's confirmation: the
/// inviter is not connected by a forgery, and becomes connected by the
/// joiner's first real message (which proves the handshake).
#[test]
fn lost_or_altered_confirmation_is_recovered_by_the_first_real_message() {
    let evil = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&evil.addr]);
    let b = profile("Bob", &[&rb.addr]);
    let mut confirms = 0;
    evil.evil.on_send(move |s| {
        if s.signed && confirms == 0 {
            confirms += 1;
            SendAction::Replace(vec![Upload::here(flipped(s.message, 700, 0x01))])
        } else {
            SendAction::Store
        }
    });
    let link = a.ok(&["invite", "--link", "--name", "bob"]);
    b.ok(&["accept", link.trim(), "--name", "alice"]);
    a.ok(&["recv"]);
    let (events, _) = recv_json(&b);
    assert!(events.iter().any(|e| e["type"] == "connected"));
    let (events, err) = recv_json(&a);
    assert!(
        !events.iter().any(|e| e["type"] == "connected"),
        "{events:?}"
    );
    assert!(err.contains("warning"), "{err}");
    assert_eq!(state(&a, "bob"), "pending");
    // Written while pending: kept in the outbox until connected.
    a.ok(&["send", "bob", "queued while pending"]);
    b.send("alice", "first words");
    let (events, err) = recv_json(&a);
    assert_eq!(
        messages(&events),
        vec![("first words".into(), "after-gap".into())],
        "{err}"
    );
    assert!(err.contains("1 earlier message(s) from bob"), "{err}");
    assert_eq!(state(&a, "bob"), "connected");
    assert_eq!(code(&a, "bob"), code(&b, "alice"));
    assert_eq!(b.recv_texts(), vec!["queued while pending"]);
    // The user must be told that the connection is up. (This failed when
    // src/client/fetch.rs sampled `was_connected` after `conn.receive` had
    // already changed the state: the message was shown, "connected" never.)
    assert!(
        events.iter().any(|e| e["type"] == "connected"),
        "no `connected` event when the first real message completes the handshake: \
         {events:?}\n{err}"
    );
}

/// The relay lies in its CREATE answer: a queue key of its choosing (so the
/// delivery secret is not the one the relay uses) or a low-order point
/// (which would make the delivery secret all zeros, known to anyone).
#[test]
fn substituted_queue_key_in_create_is_detected() {
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let rb = EvilRelay::start();
    let b = profile("Bob", &[&rb.addr]);

    // 1. A low-order relay key: refused at once; with only this relay,
    // no invitation is made, and nothing is stored.
    evil.evil.on_response(|r| match r.reply {
        Reply::Queue {
            recipient_id,
            sender_id,
            ..
        } => ResponseAction::Plaintext(record(
            r.tag,
            Reply::Queue {
                recipient_id: *recipient_id,
                sender_id: *sender_id,
                relay_dh: [0; 32],
            },
        )),
        _ => ResponseAction::Pass,
    });
    let a = profile("Alice", &[&evil.addr]);
    let o = a.run(&["invite", "--link", "--name", "bob"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(o.status.code().is_some(), "no crash: {}", show(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", show(&o));
    assert!(a.contacts().is_empty(), "nothing stored");

    // 2. A different (valid) key: the invitation is made, but everything
    // the relay delivers on that queue fails to open; the handshake never
    // completes through it, and completes through an honest relay.
    evil.evil.on_response(|r| match r.reply {
        Reply::Queue {
            recipient_id,
            sender_id,
            ..
        } => {
            let k = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random_from_rng(
                rand::rngs::OsRng,
            ));
            ResponseAction::Plaintext(record(
                r.tag,
                Reply::Queue {
                    recipient_id: *recipient_id,
                    sender_id: *sender_id,
                    relay_dh: k.to_bytes(),
                },
            ))
        }
        _ => ResponseAction::Pass,
    });
    let link = a.ok(&["invite", "--link", "--name", "bob"]);
    b.ok(&["accept", link.trim(), "--name", "alice"]);
    let (events, err) = recv_json(&a);
    assert!(events.is_empty(), "{events:?}");
    assert!(err.contains("does not decrypt"), "{err}");
    assert_eq!(state(&a, "bob"), "invited");

    let a2 = profile("Ada", &[&evil.addr, &honest.addr]);
    connect(&a2, "bob", &b, "ada");
    assert_eq!(code(&a2, "bob"), code(&b, "ada"));
    b.send("ada", "hi");
    let (events, err) = recv_json(&a2);
    assert_eq!(messages(&events), vec![("hi".into(), "in-order".into())]);
    assert!(err.contains("does not decrypt"), "{err}");
}

/// Issue 14 item 5: whoever carries a shared link swaps one of its queues for
/// a queue on a relay of its own. Before the invitation was bound into the
/// transcript, the handshake completed with matching codes and the joiner
/// sent everything (and its connection request) to that relay too. Now the
/// inviter cannot open the request: the invitation stays unused, nothing
/// connects, and the honest link still works afterwards.
#[test]
fn invitation_with_a_swapped_queue_never_connects() {
    use tern::proto::invitation::Invitation;
    let r1 = EvilRelay::start();
    let r2 = EvilRelay::start();
    let theirs = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&r1.addr, &r2.addr]);
    let b = profile("Bob", &[&rb.addr]);
    let m = profile("Mallory", &[&theirs.addr]);
    let link = a.ok(&["invite", "--link", "--name", "bob"]);
    let mallory_link = m.ok(&["invite", "--link", "--name", "x"]);
    let mut inv = Invitation::from_link(link.trim()).unwrap();
    let planted = Invitation::from_link(mallory_link.trim()).unwrap().queues[0].clone();
    inv.queues[1] = planted;
    let swapped = inv.to_link();
    b.ok(&["accept", &swapped, "--name", "alice"]);
    assert!(
        theirs.evil.sent().iter().any(|s| !s.signed),
        "the joiner sent its request to the planted queue too"
    );
    let (events, err) = recv_json(&a);
    assert!(
        !events.iter().any(|e| e["type"] == "connected"),
        "{events:?}\n{err}"
    );
    assert!(
        err.contains("does not decrypt"),
        "the inviter is warned:\n{err}"
    );
    assert_eq!(state(&a, "bob"), "invited", "the invitation is not used up");
    let (events, _) = recv_json(&b);
    assert!(
        !events.iter().any(|e| e["type"] == "connected"),
        "{events:?}"
    );
    assert_eq!(state(&b, "alice"), "pending");
    assert_code(&a.run(&["verify", "bob"]), 2, "no code before a request");

    // The link as Alice made it still connects, with matching codes.
    let b2 = profile("Bram", &[&rb.addr]);
    b2.ok(&["accept", link.trim(), "--name", "alice"]);
    a.ok(&["recv"]);
    b2.ok(&["recv"]);
    a.ok(&["recv"]);
    assert_eq!(state(&a, "bob"), "connected");
    assert_eq!(code(&a, "bob"), code(&b2, "alice"));
}
