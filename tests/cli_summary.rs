//! The per-contact summaries a plain `tern recv` decides from
//! (`src/client/records.rs`): after every kind of write the real binary
//! makes — connecting, sending to a contact that is offline, queue
//! rotation, an invitation left open and withdrawn, a device link, a
//! contact forgotten — each contact record has the summary of its current
//! write, saying what the record says, and no summary outlives its
//! record. And a summary that is not of the record's current write (a
//! record written by a tern from before summaries, say) is never used:
//! `tern recv` reads the record instead, and writes the summary again.
//!
//! Everything runs the real binary on real relays (127.0.0.1); the
//! profiles are opened with the library only to look at (and, in the last
//! test, to damage) the store.

mod cli_common;

use cli_common::*;
use tern::client::records::{self, Summary};
use tern::client::Client;
use tern::store::{KeySource, Stamp};

fn open(p: &Profile) -> Client {
    Client::open(&p.home, KeySource::Unprotected, None).expect("open the profile")
}

/// Every contact record of `p` has the summary `save` would write for it
/// now, and every summary has a record.
#[track_caller]
fn assert_summaries_agree(p: &Profile, when: &str) {
    let client = open(p);
    let index = client.index().unwrap();
    assert!(!index.is_empty(), "{when}: no contacts");
    client
        .store
        .read(|tx| {
            for e in &index {
                assert_eq!(
                    records::summary_agrees(tx, &e.id)?,
                    Some(true),
                    "{when}: the summary of {} ({}) is not its record's",
                    e.name,
                    e.id
                );
            }
            assert_eq!(
                records::orphan_summaries(tx)?,
                Vec::<String>::new(),
                "{when}: summaries without a record"
            );
            Ok(())
        })
        .unwrap();
}

/// Runs `tern recv` on each profile `rounds` times, in turns.
fn settle(profiles: &[&Profile], rounds: usize) {
    for _ in 0..rounds {
        for p in profiles {
            p.recv();
        }
    }
}

#[test]
fn every_write_of_a_contact_record_writes_its_summary() {
    let (r1, r2) = (Relay::start(), Relay::start());
    let alice = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    let carol = Profile::new("Carol", &[&r2]);
    connect(&alice, "bob", &bob, "alice");
    connect(&alice, "carol", &carol, "alice");
    for p in [&alice, &bob, &carol] {
        assert_summaries_agree(p, "connected");
    }

    // Sending, with a relay of the contact down: the message waits in a
    // job, which the summary must announce (has_work) for the next recv.
    let mut r2 = r2;
    r2.stop();
    let o = alice.run(&["send", "bob", "while Bob's relay is down"]);
    assert!(
        o.status.success() || o.status.code() == Some(75),
        "{}",
        show(&o)
    );
    assert_summaries_agree(&alice, "a send that could not be delivered");
    let bob_summary = summary_of(&alice, "bob");
    assert!(
        bob_summary.has_work,
        "the pending delivery: {bob_summary:?}"
    );
    r2.restart();
    alice.recv();
    assert_summaries_agree(&alice, "the delivery done by a recv");
    assert!(!summary_of(&alice, "bob").has_work);
    assert_eq!(bob.recv_texts(), vec!["while Bob's relay is down"]);

    // A rotation, both sides, until it is over.
    let before = summary_of(&alice, "bob").queues;
    alice.ok(&["rotate", "bob"]);
    assert_summaries_agree(&alice, "rotate started");
    settle(&[&bob, &alice], 4);
    for p in [&alice, &bob] {
        assert_summaries_agree(p, "rotation settled");
    }
    let after = summary_of(&alice, "bob").queues;
    assert!(
        after.iter().all(|q| !before.contains(q)),
        "the rotation moved every queue: {before:?} -> {after:?}"
    );
    alice.send("bob", "after the rotation");
    assert_eq!(bob.recv_texts(), vec!["after the rotation"]);
    bob.send("alice", "back, after the rotation");
    assert_eq!(alice.recv_texts(), vec!["back, after the rotation"]);

    // An invitation nobody takes up, with an expiry, then withdrawn.
    alice.ok(&["invite", "--link", "--name", "nobody", "--expires", "1h"]);
    assert_summaries_agree(&alice, "an open invitation");
    assert!(summary_of(&alice, "nobody").expires_ms.is_some());
    alice.ok(&["invitations", "revoke", "nobody"]);
    assert_summaries_agree(&alice, "the invitation revoked");

    // A device link: the new device's records, and Alice's of it.
    let server = join_server(&alice, &[]);
    alice.ok(&["device", "confirm", "--yes"]);
    settle(&[&alice, &server, &bob, &carol], 5);
    for p in [&alice, &server, &bob, &carol] {
        assert_summaries_agree(p, "a device linked");
    }

    // Forgetting a contact takes its summary with its record.
    alice.ok(&["forget", "carol", "--yes"]);
    assert_summaries_agree(&alice, "carol forgotten");
    settle(&[&alice, &server], 2);
    assert_summaries_agree(&server, "carol forgotten on the other device");
}

/// The summary `p` holds of its contact `name`.
fn summary_of(p: &Profile, name: &str) -> Summary {
    let client = open(p);
    let id = client.contact_id(name).unwrap();
    client
        .store
        .read(|tx| tx.get::<Summary>(&format!("summary/{id}")))
        .unwrap()
        .expect("a summary")
}

/// Writes `summary` as `p`'s summary of contact `name`, as it is.
fn plant(p: &Profile, name: &str, summary: &Summary) {
    let mut client = open(p);
    let id = client.contact_id(name).unwrap();
    client
        .store
        .transaction(|tx| tx.put(&format!("summary/{id}"), summary))
        .unwrap();
}

/// The stamp of `p`'s current record of contact `name`.
fn stamp_of(p: &Profile, name: &str) -> Stamp {
    let client = open(p);
    let id = client.contact_id(name).unwrap();
    client
        .store
        .read(|tx| tx.stamp(&format!("contact/{id}")))
        .unwrap()
        .expect("a record")
}

#[test]
fn a_summary_of_another_write_is_never_used() {
    let r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&alice, "bob", &bob, "alice");

    // A summary that lists no queues, of another write of the record (as
    // after a tern without summaries wrote the record): recv reads the
    // record, so the message arrives, and the summary is made again.
    let mut wrong = summary_of(&alice, "bob");
    assert!(!wrong.queues.is_empty());
    wrong.queues.clear();
    wrong.stamp = serde_json::from_value(serde_json::json!("00".repeat(56))).unwrap();
    plant(&alice, "bob", &wrong);
    bob.send("alice", "one");
    assert_eq!(alice.recv_texts(), vec!["one"]);
    assert_summaries_agree(&alice, "a stale summary replaced by recv");

    // A missing summary (a store from before summaries): the same.
    {
        let mut client = open(&alice);
        let id = client.contact_id("bob").unwrap();
        client
            .store
            .transaction(|tx| tx.delete(&format!("summary/{id}")))
            .unwrap();
    }
    bob.send("alice", "two");
    assert_eq!(alice.recv_texts(), vec!["two"]);
    assert_summaries_agree(&alice, "a missing summary made by recv");

    // The same wrong summary with the record's current stamp is believed
    // (that is what saves reading the record): recv asks no queue and
    // shows nothing. The next write of the record replaces it, and the
    // message waiting is received.
    let mut believed = summary_of(&alice, "bob");
    believed.queues.clear();
    believed.stamp = stamp_of(&alice, "bob");
    plant(&alice, "bob", &believed);
    bob.send("alice", "three");
    alice.recv_nothing();
    alice.send("bob", "a write of the record");
    assert_summaries_agree(&alice, "the record written again");
    assert_eq!(alice.recv_texts(), vec!["three"]);
}
