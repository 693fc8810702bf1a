//! How long a stalled relay (one that takes requests and answers after
//! 25 s, beyond tern's 15 s request timeout) can hold back messages that
//! travel through *other*, honest relays, in `tern recv --follow`.
//!
//! These measure latency, not correctness: every message still arrives
//! exactly once. They fail when a stalled relay delays an unrelated
//! message by more than a few seconds.

mod adversary_common;
mod cli_common;

use std::time::{Duration, Instant};

use adversary_common::*;
use cli_common::*;
use tern_relay::hooks::ResponseAction;

/// Longest acceptable delay for a message whose own relay is fine.
const PROMPT: Duration = Duration::from_secs(6);

/// Bob receives on a stalled relay and an honest one. A message sent while
/// `recv --follow` is starting must be printed promptly through the honest
/// relay, not after the stalled relay's request times out.
#[test]
fn follow_startup_is_not_held_back_by_a_stalled_relay() {
    let ra = EvilRelay::start();
    let mut evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let a = profile("Alice", &[&ra.addr]);
    let b = profile("Bob", &[&evil.addr, &honest.addr]);
    connect(&a, "bob", &b, "alice");
    evil.evil.on_response(|r| match r.command {
        Some("SUB") | Some("CHECK") | Some("ACK_UPTO") => {
            ResponseAction::Delay(Duration::from_secs(25))
        }
        _ => ResponseAction::Pass,
    });
    let mut f = b.follow();
    std::thread::sleep(Duration::from_secs(1));
    a.send("bob", "hello");
    let t = Instant::now();
    let (msgs, _) = f.next_messages(1);
    let latency = t.elapsed();
    f.kill();
    evil.evil.honest();
    evil.abandon();
    assert_eq!(msgs, vec!["hello"]);
    assert!(
        latency < PROMPT,
        "`recv --follow` printed a message that came through the honest relay only after \
         {latency:?}: it does not long-poll any queue until the first drain of every queue \
         has finished, and the stalled relay's FETCH takes the full 15 s request timeout"
    );
}

/// Bob has a reply waiting for one of Alice's relays, which stalls. While
/// `recv --follow` runs, Alice's messages (through Bob's own, honest relay)
/// must be printed promptly — not one per stalled upload attempt.
#[test]
fn follow_is_not_held_back_by_uploads_to_a_stalled_relay() {
    let mut stalled = EvilRelay::start();
    let ra = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&stalled.addr, &ra.addr]);
    let b = profile("Bob", &[&rb.addr]);
    connect(&a, "bob", &b, "alice");
    stalled
        .evil
        .on_response(|_| ResponseAction::Delay(Duration::from_secs(25)));
    // Bob's reply reaches Alice through `ra`; the copy for the stalled relay
    // stays pending (and is retried by every job run).
    let o = b.run(&["send", "alice", "reply"]);
    assert_code(&o, 0, "send with one of Alice's relays stalled");
    assert!(b.contact("alice")["pending_jobs"].as_u64().unwrap() > 0);

    let mut f = b.follow();
    let t = Instant::now();
    a.send("bob", "m0");
    let (first, _) = f.next_messages(1);
    let startup = t.elapsed();
    // Now the follower is long-polling (a second burst message would wait
    // another 15 s; one is enough to show it and keeps the test short).
    let t = Instant::now();
    a.send("bob", "m1");
    let (next, _) = f.next_messages(1);
    let burst = t.elapsed();
    f.kill();
    stalled.evil.honest();
    stalled.abandon();
    assert_eq!(first, vec!["m0"]);
    assert_eq!(next, vec!["m1"]);
    assert!(
        startup < PROMPT && burst < PROMPT,
        "`recv --follow` took {startup:?} to print the first message and {burst:?} for the \
         next one, both from Bob's own healthy relay: it retries the pending upload to \
         Alice's stalled relay before fetching anything and again after every message it \
         prints, and each attempt blocks for the 15 s request timeout"
    );
}
