//! Adversarial review of several devices per profile (PROTOCOL.md §12,
//! THREAT-MODEL.md "10. Your other devices"), end to end with the real
//! binary on real relays (127.0.0.1), three homes: Alice's laptop (the
//! linking device), Alice's server (the new device) and Bob.
//!
//! Faults: SIGKILL of `tern recv` (plain and `--follow`) at random points of
//! the link and the sync, a relay down during the link, two `tern`
//! processes on one home at once, a removed device that keeps trying, a new
//! device offline for a long stretch, a device link used twice. After each,
//! plain `recv`s on every home must converge: the link completes, one
//! connection per pair of devices, the whole history exactly once on every
//! device, and messages go both ways.
//!
//! The random kill points are seeded from the clock (printed on stderr);
//! replay a run with `DEVICES_FAULTS_SEED=1234 cargo test --test
//! cli_devices_faults`.

mod cli_common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cli_common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers

/// A small seeded generator for the kill points.
struct Rng(u64);

impl Rng {
    fn from_env(what: &str) -> Rng {
        let seed = std::env::var("DEVICES_FAULTS_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: DEVICES_FAULTS_SEED={seed}");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Complete JSON lines of a possibly cut output.
fn complete_lines(s: &str) -> Vec<Value> {
    let complete = match s.rfind('\n') {
        Some(i) => &s[..=i],
        None => "",
    };
    json_lines(complete)
}

/// `recv --json` that may find a relay down (exit 75); anything else but 0
/// fails the test. Returns what it printed.
#[track_caller]
fn recv_any(p: &Profile) -> Vec<Value> {
    let o = p.run(&["recv", "--json"]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(75)),
        "{}: recv failed\n{}",
        p.display,
        show(&o)
    );
    complete_lines(&stdout(&o))
}

/// `recv --json` on a device that was removed: it may not have heard yet
/// (0, or 75 with its queues gone) or have heard (8, permanently gone:
/// issue 19 item 3). Returns what it printed.
#[track_caller]
fn recv_removed(p: &Profile) -> Vec<Value> {
    let o = p.run(&["recv", "--json"]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(75) | Some(8)),
        "{}: recv failed\n{}",
        p.display,
        show(&o)
    );
    complete_lines(&stdout(&o))
}

/// Starts `args` on `p`, SIGKILLs it after `after`, and returns the complete
/// JSON lines it printed until then.
fn run_killed(p: &Profile, args: &[&str], after: Duration) -> Vec<Value> {
    let mut c = p.cmd(args);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().expect("spawning tern");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
    complete_lines(&String::from_utf8_lossy(&reader.join().unwrap()))
}

/// `recv --follow --json` in the background, SIGKILLed after `after`;
/// returns the lines it printed (some printed just before the kill may be
/// missed: this record only ever under-counts).
fn follow_killed(p: &Profile, after: Duration) -> Vec<Value> {
    let f = p.follow();
    std::thread::sleep(after);
    let lines = f.pending_lines();
    f.kill();
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every time each profile printed each message text, and whether the run
/// that printed it may have been killed.
#[derive(Default)]
struct Printed {
    shows: BTreeMap<(String, String), Vec<bool>>,
}

impl Printed {
    /// What a run that ended on its own printed.
    fn record(&mut self, p: &Profile, events: &[Value]) {
        self.add(p, events, false);
    }

    /// What a run that may have been SIGKILLed printed.
    fn record_killed(&mut self, p: &Profile, events: &[Value]) {
        self.add(p, events, true);
    }

    /// How many times `p` showed `text`.
    fn times(&self, p: &Profile, text: &str) -> usize {
        self.shows
            .get(&(p.display.clone(), text.to_string()))
            .map_or(0, Vec::len)
    }

    fn add(&mut self, p: &Profile, events: &[Value], killed: bool) {
        for t in texts(events) {
            self.shows
                .entry((p.display.clone(), t))
                .or_default()
                .push(killed);
        }
    }

    /// No device showed a message twice, except again after a run that
    /// was killed: a message counts as shown once it is written, and a
    /// kill between writing it and recording that leaves it to be shown
    /// again (at least once, never lost). After a run that ended on its
    /// own showed it, nothing shows it again.
    #[track_caller]
    fn assert_at_most_once(&self) {
        let twice: Vec<_> = self
            .shows
            .iter()
            .filter(|(_, runs)| runs[..runs.len() - 1].iter().any(|killed| !killed))
            .collect();
        assert!(twice.is_empty(), "messages shown more than once: {twice:?}");
    }
}

/// One entry of `tern log --json`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    sent_at: String,
    id: String,
    dir: String,
    text: String,
}

/// The whole history with `contact`, ordered by sent time (then id).
#[track_caller]
/// `tern log` shows them (ordered by sent time).
fn history(p: &Profile, contact: &str) -> Vec<Entry> {
    json_lines(&p.ok(&["log", contact, "--json", "--limit", "100000"]))
        .iter()
        .map(|e| Entry {
            sent_at: e["sent_at"].as_str().unwrap().to_string(),
            id: e["id"].as_str().unwrap().to_string(),
            dir: e["direction"].as_str().unwrap().to_string(),
            text: e["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Directions and texts in the order `tern log` shows them.
fn shown(h: &[Entry]) -> Vec<(String, String)> {
    h.iter().map(|e| (e.dir.clone(), e.text.clone())).collect()
}

/// Whether every one of Alice's devices has each of `expected` in its
/// history with Bob (copies may still be on their way).
fn histories_hold(alice: &[&Profile], expected: &[(String, String)]) -> bool {
    let mut want: Vec<(String, String)> = expected.to_vec();
    want.sort();
    alice.iter().all(|p| {
        let mut got = shown(&history(p, "bob"));
        got.sort();
        got == want
    })
}

/// Both of Alice's devices hold exactly `expected` (direction, text) in
/// their history with Bob, each once, with the same message ids, and
/// `tern log` shows them in the same order on both; Bob holds each once
/// too.
#[track_caller]
fn assert_histories(alice: &[&Profile], bob: &Profile, expected: &[(String, String)]) {
    let mut want: Vec<(String, String)> = expected.to_vec();
    want.sort();
    let first = history(alice[0], "bob");
    let ids = |h: &[Entry]| {
        let mut v: Vec<String> = h.iter().map(|e| e.id.clone()).collect();
        v.sort();
        v
    };
    for p in alice {
        let h = history(p, "bob");
        let mut got = shown(&h);
        got.sort();
        assert_eq!(
            got, want,
            "{}: the history with Bob must hold every message exactly once",
            p.display
        );
        assert_eq!(ids(&h), ids(&first), "{}: message ids", p.display);
        assert_eq!(
            shown(&h),
            shown(&first),
            "{} and {} must show the same log, in the same order\n{h:#?}\n{first:#?}",
            p.display,
            alice[0].display
        );
    }
    let mut bob_got: Vec<(String, String)> = history(bob, "alice")
        .iter()
        .map(|e| {
            let dir = if e.dir == "in" { "out" } else { "in" };
            (dir.to_string(), e.text.clone())
        })
        .collect();
    bob_got.sort();
    assert_eq!(bob_got, want, "Bob's history with Alice");
}

fn try_contact(p: &Profile, name: &str) -> Option<Value> {
    let o = p.run(&["contacts", "--json"]);
    if !o.status.success() {
        return None;
    }
    json_lines(&stdout(&o))
        .into_iter()
        .find(|c| c["name"] == name)
}

fn devices(p: &Profile) -> Vec<Value> {
    json_lines(&p.ok(&["device", "list", "--json"]))
}

/// The other devices `p` lists, by name, with their state.
fn other_devices(p: &Profile) -> Vec<(String, String)> {
    devices(p)
        .iter()
        .filter(|d| d["this_device"] == false)
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Everything about the link is complete: each of Alice's devices knows
/// the other, connected; each has exactly one connection with Bob, and Bob
/// has exactly one with each of them.
fn link_complete(laptop: &Profile, server: &Profile, bob: &Profile) -> bool {
    let ok = |p: &Profile, name: &str, devices: u64| {
        try_contact(p, name).is_some_and(|c| c["state"] == "connected" && c["devices"] == devices)
    };
    ok(server, "bob", 1)
        && ok(laptop, "bob", 1)
        && ok(bob, "alice", 2)
        && other_devices(laptop) == vec![("server".to_string(), "connected".to_string())]
        && other_devices(server) == vec![("laptop".to_string(), "connected".to_string())]
}

/// What each home looks like, for failure messages.
fn state(profiles: &[&Profile]) -> String {
    let mut s = String::new();
    for p in profiles {
        let c = p.run(&["contacts", "--json"]);
        let d = p.run(&["device", "list", "--json"]);
        s.push_str(&format!(
            "--- {} ---\ncontacts: {}\ndevices: {}\n",
            p.display,
            stdout(&c).trim(),
            stdout(&d).trim()
        ));
    }
    s
}

/// Plain `recv`s on every profile in turn until `done` (at most `rounds`
/// rounds); what they print is recorded.
#[track_caller]
fn settle_until(
    printed: &mut Printed,
    profiles: &[&Profile],
    rounds: usize,
    what: &str,
    done: impl Fn() -> bool,
) {
    for _ in 0..rounds {
        if done() {
            return;
        }
        for p in profiles {
            let ev = recv_any(p);
            printed.record(p, &ev);
        }
    }
    assert!(
        done(),
        "{what}: not done after {rounds} rounds of recv\n{}",
        state(profiles)
    );
}

/// Plain `recv` on every profile, `rounds` times.
fn settle(printed: &mut Printed, profiles: &[&Profile], rounds: usize) {
    for _ in 0..rounds {
        for p in profiles {
            let ev = recv_any(p);
            printed.record(p, &ev);
        }
    }
}

fn pair(dir: &str, text: &str) -> (String, String) {
    (dir.to_string(), text.to_string())
}

/// Alice's laptop and Bob, connected, one message each way; the laptop
/// uses the relays `laptop_on` and Bob `bob_on` (indexes into the relays).
struct World {
    relays: Vec<Relay>,
    laptop: Profile,
    bob: Profile,
    /// (direction as Alice sees it, text) of everything sent so far.
    sent: Vec<(String, String)>,
}

fn world(n: usize, laptop_on: &[usize], bob_on: &[usize]) -> World {
    let relays: Vec<Relay> = (0..n).map(|_| Relay::start()).collect();
    let pick = |on: &[usize]| on.iter().map(|i| &relays[*i]).collect::<Vec<_>>();
    let laptop = Profile::new("Alice", &pick(laptop_on));
    let bob = Profile::new("Bob", &pick(bob_on));
    connect(&laptop, "bob", &bob, "alice");
    laptop.send("bob", "before the link, from the laptop");
    bob.send("alice", "before the link, from Bob");
    assert_eq!(laptop.recv_texts(), vec!["before the link, from Bob"]);
    bob.recv();
    World {
        relays,
        laptop,
        bob,
        sent: vec![
            pair("out", "before the link, from the laptop"),
            pair("in", "before the link, from Bob"),
        ],
    }
}

/// `device link` on the laptop (named "laptop").
fn device_link(laptop: &Profile) -> String {
    let link = laptop.ok(&["device", "link", "--link", "--name", "laptop"]);
    let link = link.trim().to_string();
    assert!(link.starts_with("TERN:"), "{link}");
    link
}

/// `device confirm --yes` on the linking device: the user accepts the
/// device that answered (a plain `recv` never links it, §12.2).
#[track_caller]
fn confirm(laptop: &Profile) {
    laptop.ok(&["device", "confirm", "--yes"]);
}

fn join_args(link: &str) -> [&str; 6] {
    [
        "device",
        "join",
        link,
        "--name",
        "server",
        "--no-passphrase",
    ]
}

/// Bob and the laptop write to each other and the server's history must
/// follow: one message each way from every device, each shown once on each
/// of the others.
#[track_caller]
fn both_ways(w: &mut World, server: &Profile, tag: &str) {
    let (laptop, bob) = (&w.laptop, &w.bob);
    let from_bob = format!("{tag}: from Bob");
    bob.send("alice", &from_bob);
    assert_eq!(laptop.recv_texts(), vec![from_bob.clone()], "laptop");
    assert_eq!(server.recv_texts(), vec![from_bob.clone()], "server");
    let from_server = format!("{tag}: from the server");
    server.send("bob", &from_server);
    let from_laptop = format!("{tag}: from the laptop");
    laptop.send("bob", &from_laptop);
    let mut got = bob.recv_texts();
    got.sort();
    let mut want = vec![from_laptop.clone(), from_server.clone()];
    want.sort();
    assert_eq!(got, want, "Bob gets each of Alice's devices' message once");
    assert_eq!(laptop.recv_texts(), vec![from_server.clone()]);
    assert_eq!(server.recv_texts(), vec![from_laptop.clone()]);
    w.sent.push(pair("in", &from_bob));
    w.sent.push(pair("out", &from_server));
    w.sent.push(pair("out", &from_laptop));
    for p in [laptop, server, bob] {
        p.recv_nothing();
    }
}

// ---------------------------------------------------------------------------
// 6. A device link is good for one device

#[test]
fn a_device_link_joins_one_device_and_a_second_join_gets_exit_6_and_nothing() {
    let mut w = world(1, &[0], &[0]);
    let link = device_link(&w.laptop);
    // A device link is not a contact invitation.
    assert_code(
        &w.bob.run(&["accept", &link, "--name", "x"]),
        6,
        "accept of a device link",
    );
    assert_eq!(w.bob.contacts().len(), 1, "{:?}", w.bob.contacts());

    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    // The same link again, before the laptop answered the first request:
    // the invitation's queue already holds its one request.
    let thief = Profile::empty("thief");
    let o = thief.run(&[
        "device",
        "join",
        &link,
        "--name",
        "thief",
        "--no-passphrase",
    ]);
    assert_code(&o, 6, "second device join with the same link, in flight");
    let mut printed = Printed::default();
    let (laptop, bob) = (&w.laptop, &w.bob);
    settle_until(&mut printed, &[laptop, &server, bob], 6, "link", || {
        link_complete(laptop, &server, bob)
    });
    // And again once the link is complete.
    let late = Profile::empty("late");
    let o = late.run(&["device", "join", &link, "--name", "late", "--no-passphrase"]);
    assert_code(
        &o,
        6,
        "second device join with the same link, after the link",
    );
    // An accept of it, by Bob or by the newcomer, is refused too.
    assert_code(&bob.run(&["accept", &link]), 6, "accept after the link");

    for p in [&thief, &late] {
        settle(&mut printed, &[p], 2);
        assert!(
            other_devices(p).is_empty(),
            "{}: the refused join left a device connection: {:?}",
            p.display,
            devices(p)
        );
        assert!(p.contacts().is_empty(), "{}: {:?}", p.display, p.contacts());
        assert_code(
            &p.run(&["send", "bob", "hello"]),
            3,
            "send from a refused device",
        );
    }
    // The refused tries reached nobody: the laptop still has one other
    // device, Bob still two connections for Alice.
    settle(&mut printed, &[laptop, &server, bob], 2);
    assert!(
        link_complete(laptop, &server, bob),
        "{}",
        state(&[laptop, &server, bob])
    );
    assert_eq!(
        other_devices(laptop),
        vec![("server".to_string(), "connected".to_string())]
    );
    for p in [&thief, &late] {
        for e in history(&server, "bob") {
            assert!(!e.text.contains(&p.display));
        }
        assert!(
            try_contact(p, "bob").is_none(),
            "{} must not know Bob",
            p.display
        );
    }
    // A refused home can still join with a fresh link, and then works.
    let fresh = device_link(laptop);
    thief.ok(&[
        "device",
        "join",
        &fresh,
        "--name",
        "third",
        "--no-passphrase",
    ]);
    confirm(laptop);
    settle_until(
        &mut printed,
        &[laptop, &thief, &server, bob],
        8,
        "third",
        || {
            try_contact(bob, "alice").is_some_and(|c| c["devices"] == 3)
                && try_contact(&thief, "bob").is_some_and(|c| c["state"] == "connected")
        },
    );
    both_ways(&mut w, &server, "after the refused joins");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

// ---------------------------------------------------------------------------
// 1. SIGKILL during the link and the sync

/// One chaotic step: a `recv` on `p`, SIGKILLed at a random point (plain or
/// `--follow`), or left to finish.
fn chaotic_recv(rng: &mut Rng, printed: &mut Printed, p: &Profile) {
    let ev = match rng.below(4) {
        0 => follow_killed(p, Duration::from_millis(50 + rng.below(600))),
        1 | 2 => run_killed(
            p,
            &["recv", "--json"],
            Duration::from_millis(5 + rng.below(300)),
        ),
        _ => {
            printed.record(p, &recv_any(p));
            return;
        }
    };
    printed.record_killed(p, &ev);
}

#[test]
fn recvs_killed_at_random_during_the_link_and_sync_still_converge_with_history_once() {
    let mut rng = Rng::from_env("recvs_killed_during_the_link");
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    for step in 0..18 {
        let p = match rng.below(3) {
            0 => &w.laptop,
            1 => &server,
            _ => &w.bob,
        };
        chaotic_recv(&mut rng, &mut printed, p);
        match step % 4 {
            1 => {
                let t = format!("during the link {step}, from Bob");
                w.bob.send("alice", &t);
                w.sent.push(pair("in", &t));
            }
            3 => {
                let t = format!("during the link {step}, from the laptop");
                w.laptop.send("bob", &t);
                w.sent.push(pair("out", &t));
            }
            _ => {}
        }
    }
    let (laptop, bob) = (&w.laptop, &w.bob);
    let all = [laptop, &server, bob];
    settle_until(&mut printed, &all, 8, "link after the kills", || {
        link_complete(laptop, &server, bob)
    });
    // Copies still on their way settle in one more round or two.
    settle(&mut printed, &all, 2);
    both_ways(&mut w, &server, "after the kills");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

/// Same, with the kills aimed at the new device's first recvs (the ones
/// that receive the profile, contacts and history, and make the offers).
#[test]
fn the_new_device_killed_while_it_receives_the_sync_still_gets_everything_once() {
    let mut w = world(2, &[0], &[1]);
    for i in 0..6 {
        let t = format!("old {i}");
        if i % 2 == 0 {
            w.bob.send("alice", &t);
            w.sent.push(pair("in", &t));
        } else {
            w.laptop.send("bob", &t);
            w.sent.push(pair("out", &t));
        }
    }
    let mut printed = Printed::default();
    settle(&mut printed, &[&w.laptop, &w.bob], 1);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let (laptop, bob) = (&w.laptop, &w.bob);
    // Handshake: laptop answers, server completes, laptop completes and
    // queues the sync.
    printed.record(laptop, &recv_any(laptop));
    printed.record(&server, &recv_any(&server));
    printed.record(laptop, &recv_any(laptop));
    // The server's recvs that get the sync, killed at a sweep of points.
    for ms in [15u64, 30, 45, 60, 80, 100, 130, 170, 220] {
        let ev = run_killed(&server, &["recv", "--json"], Duration::from_millis(ms));
        printed.record_killed(&server, &ev);
        // The laptop forwards offers (killed too, later in its run).
        let ev = run_killed(laptop, &["recv", "--json"], Duration::from_millis(ms + 20));
        printed.record_killed(laptop, &ev);
        let ev = run_killed(bob, &["recv", "--json"], Duration::from_millis(ms + 40));
        printed.record_killed(bob, &ev);
    }
    let all = [laptop, &server, bob];
    settle_until(&mut printed, &all, 8, "link after the kills", || {
        link_complete(laptop, &server, bob)
    });
    settle(&mut printed, &all, 2);
    both_ways(&mut w, &server, "after the kills");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

// ---------------------------------------------------------------------------
// 5. Catching up

/// Bob writes after the laptop forwarded the server's offer but before his
/// tern accepted it: that message goes to the laptop alone. The laptop does
/// not read it until after the server's connection with Bob completed and
/// its ANNOUNCE arrived; both arrive in the same `recv`.
// Failed at d5dd685, BUG: a message the contact sent before accepting the new
// device's ADD is never copied to it when the linking device reads it after
// that device's ANNOUNCE (devices.rs copy_to_devices / pending_groups);
// passes since 8e6655e.
#[test]
fn a_message_the_contact_sent_just_before_meeting_the_new_device_reaches_it() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let (laptop, bob) = (&w.laptop, &w.bob);
    let mut printed = Printed::default();
    let mut step = |p: &Profile| printed.record(p, &recv_any(p));
    // The device connection: request, reply, confirmation + sync.
    step(laptop);
    step(&server);
    step(laptop);
    // The server gets the sync and offers an invitation for Bob; the laptop
    // forwards it to Bob as ADD.
    step(&server);
    step(laptop);
    assert_eq!(bob.contact("alice")["devices"], 1);
    // Bob writes: his tern knows only the laptop's connection.
    let t = "written before Bob's tern met the server";
    bob.send("alice", t);
    w.sent.push(pair("in", t));
    // Bob accepts the ADD; the server answers; Bob completes; the server
    // completes and announces the connection to the laptop. The laptop
    // runs no recv meanwhile.
    step(bob);
    step(&server);
    step(bob);
    step(&server);
    assert_eq!(
        server.contact("bob")["state"],
        "connected",
        "{}",
        state(&[laptop, &server, bob])
    );
    // Now the laptop reads Bob's message and the server's ANNOUNCE.
    step(laptop);
    let all = [laptop, &server, bob];
    settle(&mut printed, &all, 3);
    assert!(link_complete(laptop, &server, bob), "{}", state(&all));
    assert!(
        history(&server, "bob").iter().any(|e| e.text == t),
        "the server never gets {t:?}: {:?}",
        history(&server, "bob")
    );
    both_ways(&mut w, &server, "after");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

/// The new device is offline for a long stretch: many messages both ways,
/// from Bob and from the laptop; then it catches up with everything once,
/// and then the laptop is the one away while the server writes.
#[test]
fn a_device_offline_for_a_long_stretch_catches_up_with_everything_exactly_once() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    {
        let (laptop, bob) = (&w.laptop, &w.bob);
        settle_until(&mut printed, &[laptop, &server, bob], 8, "link", || {
            link_complete(laptop, &server, bob)
        });
    }
    settle(&mut printed, &[&w.laptop, &server, &w.bob], 1);
    // The server is away: 24 messages, Bob and the laptop talking (and both
    // of them reading now and then).
    for i in 0..24 {
        if i % 3 == 2 {
            let t = format!("while the server is away {i}, from the laptop");
            w.laptop.send("bob", &t);
            w.sent.push(pair("out", &t));
        } else {
            let t = format!("while the server is away {i}, from Bob");
            w.bob.send("alice", &t);
            w.sent.push(pair("in", &t));
        }
        if i % 5 == 4 {
            printed.record(&w.laptop, &recv_any(&w.laptop));
            printed.record(&w.bob, &recv_any(&w.bob));
        }
    }
    printed.record(&w.laptop, &recv_any(&w.laptop));
    printed.record(&w.bob, &recv_any(&w.bob));
    // One recv catches up with everything, each once.
    let got = server.recv_texts();
    let mut want: Vec<String> = w.sent[2..].iter().map(|(_, t)| t.clone()).collect();
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "the server catching up: {got:?}");
    printed.record(&server, &server.recv());
    server.recv_nothing();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);

    // Now the laptop is away while the server and Bob talk.
    let mark = w.sent.len();
    for i in 0..12 {
        if i % 2 == 0 {
            let t = format!("while the laptop is away {i}, from the server");
            server.send("bob", &t);
            w.sent.push(pair("out", &t));
        } else {
            let t = format!("while the laptop is away {i}, from Bob");
            w.bob.send("alice", &t);
            w.sent.push(pair("in", &t));
        }
        if i % 4 == 3 {
            printed.record(&server, &recv_any(&server));
            printed.record(&w.bob, &recv_any(&w.bob));
        }
    }
    printed.record(&server, &recv_any(&server));
    printed.record(&w.bob, &recv_any(&w.bob));
    let got = w.laptop.recv_texts();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<String> = w.sent[mark..].iter().map(|(_, t)| t.clone()).collect();
    want.sort();
    assert_eq!(sorted, want, "the laptop catching up: {got:?}");
    w.laptop.recv_nothing();
    printed.record(&w.laptop, &texts_as_events(&got));
    both_ways(&mut w, &server, "after catching up");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

fn texts_as_events(texts: &[String]) -> Vec<Value> {
    texts
        .iter()
        .map(|t| serde_json::json!({"type": "message", "text": t}))
        .collect()
}

// ---------------------------------------------------------------------------
// 2. A relay down during the link

/// Both of Alice's and Bob's homes use two relays; relay `down` is stopped
/// from just after `device link` until the handshake of the device
/// connection and part of the sync are done, then comes back.
fn link_with_a_relay_down(down: usize) {
    let mut w = world(2, &[0, 1], &[1, 0]);
    let link = device_link(&w.laptop);
    w.relays[down].stop();
    let server = Profile::empty("Alice-server");
    // The request reaches the relay that is up: that is enough.
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    let t = format!("while relay {down} is down, from Bob");
    // Sending with one relay of two down still works (the other has it).
    w.bob.send("alice", &t);
    w.sent.push(pair("in", &t));
    {
        let (laptop, bob) = (&w.laptop, &w.bob);
        settle(&mut printed, &[laptop, &server, bob], 3);
        let t = format!("while relay {down} is down, from the laptop");
        laptop.send("bob", &t);
        w.sent.push(pair("out", &t));
        settle(&mut printed, &[laptop, &server, bob], 2);
    }
    w.relays[down].restart();
    let (laptop, bob) = (&w.laptop, &w.bob);
    let all = [laptop, &server, bob];
    settle_until(&mut printed, &all, 8, "link with a relay back", || {
        link_complete(laptop, &server, bob)
    });
    settle(&mut printed, &all, 2);
    both_ways(&mut w, &server, "relay back");
    // And with that relay down again, everything still flows through the
    // other one.
    w.relays[down].stop();
    let t = format!("relay {down} down again, from Bob");
    w.bob.send("alice", &t);
    w.sent.push(pair("in", &t));
    let (laptop, bob) = (&w.laptop, &w.bob);
    for p in [laptop, &server] {
        let ev = recv_any(p);
        assert_eq!(texts(&ev), vec![t.clone()], "{}", p.display);
        printed.record(p, &ev);
    }
    let t2 = format!("relay {down} down again, from the server");
    server.send("bob", &t2);
    w.sent.push(pair("out", &t2));
    let ev = recv_any(bob);
    assert_eq!(texts(&ev), vec![t2.clone()]);
    let ev = recv_any(laptop);
    assert_eq!(texts(&ev), vec![t2.clone()]);
    w.relays[down].restart();
    settle(&mut printed, &[laptop, &server, bob], 1);
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

#[test]
fn the_link_completes_with_the_second_relay_down_during_it() {
    link_with_a_relay_down(1);
}

#[test]
fn the_link_completes_with_the_first_relay_down_during_it() {
    link_with_a_relay_down(0);
}

// ---------------------------------------------------------------------------
// 3. Two tern processes on one home at once

/// Runs `a` and `b` on `p` at the same time; returns both outputs.
fn at_once(p: &Profile, a: &[&str], b: &[&str]) -> (std::process::Output, std::process::Output) {
    std::thread::scope(|s| {
        let ha = s.spawn(|| p.run(a));
        let hb = s.spawn(|| p.run(b));
        (ha.join().unwrap(), hb.join().unwrap())
    })
}

/// Runs every command of `commands` on `p` at the same time.
fn all_at_once(p: &Profile, commands: &[&[&str]]) -> Vec<std::process::Output> {
    std::thread::scope(|s| {
        let hs: Vec<_> = commands.iter().map(|c| s.spawn(|| p.run(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The new device's `recv --follow` runs while plain `recv`s and a `send`
/// run on the same home.
// Failed at d5dd685, BUG (intermittent, about 1 run in 9 under load): the
// follower and a plain recv on the new device both run one DeviceJob::Offer,
// making two connections with the contact (devices.rs
// run_device_jobs/make_offer); passes since 7ee1f15.
#[test]
fn a_follower_and_plain_commands_on_the_new_device_during_the_sync() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    let (laptop, bob) = (&w.laptop, &w.bob);
    let mut follow = server.follow();
    for round in 0..5 {
        printed.record(laptop, &recv_any(laptop));
        printed.record(&server, &recv_any(&server));
        printed.record(bob, &recv_any(bob));
        let t = format!("round {round}, from Bob");
        bob.send("alice", &t);
        w.sent.push(pair("in", &t));
    }
    // The follower may have shown some of them; it is killed before the end.
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<Value> = follow
        .pending_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    printed.record(&server, &lines);
    let _ = follow.child.kill();
    drop(follow);
    let all = [laptop, &server, bob];
    settle_until(&mut printed, &all, 8, "link beside a follower", || {
        link_complete(laptop, &server, bob)
    });
    settle(&mut printed, &all, 2);
    // The server writes while its recv runs.
    let t = "from the server, beside its recv";
    let (r, s) = at_once(&server, &["recv", "--json"], &["send", "bob", t]);
    assert_code(&s, 0, "send beside a recv");
    printed.record(&server, &complete_lines(&stdout(&r)));
    w.sent.push(pair("out", t));
    settle(&mut printed, &all, 2);
    both_ways(&mut w, &server, "after the follower");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

/// Which home runs two processes at once in [`two_processes_on_one_home`].
#[derive(Clone, Copy, PartialEq)]
enum Busy {
    /// The linking device: `recv` beside `send bob`.
    Laptop,
    /// The new device: two `recv`s.
    Server,
    /// The contact: `recv` beside `send alice`.
    Bob,
}

/// During the whole link and sync, the `busy` home always runs two
/// processes at once; the others run plain `recv`s. Then everything must
/// converge to one connection per pair of devices and the history once.
fn two_processes_on_one_home(busy: Busy) {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    for round in 0..7 {
        for home in [Busy::Laptop, Busy::Server, Busy::Bob] {
            let (p, to, dir) = match home {
                Busy::Laptop => (&w.laptop, "bob", "out"),
                Busy::Server => (&server, "bob", "out"),
                Busy::Bob => (&w.bob, "alice", "in"),
            };
            if home != busy {
                printed.record(p, &recv_any(p));
                continue;
            }
            let t = format!("round {round}, from {}", p.display);
            let second: Vec<&str> = if home == Busy::Server {
                vec!["recv", "--json"]
            } else {
                vec!["send", to, &t]
            };
            let mut commands: Vec<&[&str]> = vec![&["recv", "--json"], &second];
            if home == Busy::Server {
                // Three at once: the offers' queue creation is the window.
                commands.push(&["recv", "--json"]);
            }
            let outs = all_at_once(p, &commands);
            for (o, c) in outs.iter().zip(&commands) {
                assert_code(o, 0, &c.join(" "));
                if c[0] == "recv" {
                    printed.record(p, &complete_lines(&stdout(o)));
                }
            }
            if home != Busy::Server {
                w.sent.push(pair(dir, &t));
            }
        }
    }
    let (laptop, bob) = (&w.laptop, &w.bob);
    let all = [laptop, &server, bob];
    settle_until(
        &mut printed,
        &all,
        6,
        "link with two processes on one home",
        || link_complete(laptop, &server, bob),
    );
    settle(&mut printed, &all, 1);
    both_ways(&mut w, &server, "after the concurrent rounds");
    // A copy one of Alice's devices still owes another goes out with that
    // device's next run: a few rounds, never an unbounded wait.
    let alice = [&w.laptop, &server];
    let all = [&w.laptop, &server, &w.bob];
    let sent = w.sent.clone();
    settle_until(&mut printed, &all, 4, "copies on their way", || {
        histories_hold(&alice, &sent)
    });
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

#[test]
fn a_recv_and_a_send_at_once_on_the_linking_device_during_the_sync() {
    two_processes_on_one_home(Busy::Laptop);
}

// Failed at d5dd685, BUG (intermittent, about half the runs): concurrent
// recvs on the new device both run one DeviceJob::Offer, making two
// connections with the contact (devices.rs run_device_jobs/make_offer);
// passes since 7ee1f15.
#[test]
fn two_recvs_at_once_on_the_new_device_during_the_sync() {
    two_processes_on_one_home(Busy::Server);
}

#[test]
fn a_recv_and_a_send_at_once_on_the_contact_during_the_sync() {
    two_processes_on_one_home(Busy::Bob);
}

// ---------------------------------------------------------------------------
// 4. A removed device that keeps trying

/// Linked and settled, one message from Bob seen by both of Alice's
/// devices.
fn linked(n: usize, laptop_on: &[usize], bob_on: &[usize]) -> (World, Profile, Printed) {
    let mut w = world(n, laptop_on, bob_on);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    {
        let (laptop, bob) = (&w.laptop, &w.bob);
        let all = [laptop, &server, bob];
        settle_until(&mut printed, &all, 8, "link", || {
            link_complete(laptop, &server, bob)
        });
        settle(&mut printed, &all, 1);
    }
    both_ways(&mut w, &server, "linked");
    (w, server, printed)
}

#[test]
fn a_removed_device_that_keeps_receiving_and_sending_gets_nothing_and_disturbs_nobody() {
    let (mut w, server, mut printed) = linked(2, &[0], &[1]);
    let server_before = history(&server, "bob");
    w.laptop.ok(&["device", "remove", "server"]);
    assert!(
        other_devices(&w.laptop).is_empty(),
        "{:?}",
        devices(&w.laptop)
    );
    // Bob writes before and after his tern heard of the removal; the
    // removed server keeps receiving (and trying to send) all along.
    for i in 0..4 {
        let t = format!("after the removal {i}, from Bob");
        w.bob.send("alice", &t);
        w.sent.push(pair("in", &t));
        let o = server.run(&["recv", "--json"]);
        // 8 once it has heard of its removal (issue 19 item 3).
        assert!(
            matches!(o.status.code(), Some(0) | Some(75) | Some(8)),
            "{}",
            show(&o)
        );
        assert!(
            texts(&complete_lines(&stdout(&o))).is_empty(),
            "the removed device must receive nothing new\n{}",
            show(&o)
        );
        let _ = server.run(&["send", "bob", &format!("removed, trying {i}")]);
        assert_eq!(w.laptop.recv_texts(), vec![t], "the laptop, exactly once");
        if i == 1 {
            // Bob's tern hears of it (DROP) from here on.
            let got = w.bob.recv();
            // Until then the removed device could still send as Alice: the
            // tries before this point may show; none after.
            for t in texts(&got) {
                assert!(t.starts_with("removed, trying"), "{t}");
            }
            assert_eq!(w.bob.contact("alice")["devices"], 1);
        } else if i > 1 {
            let got = w.bob.recv_texts();
            assert!(
                got.is_empty(),
                "after DROP, nothing from the removed device: {got:?}"
            );
        }
    }
    // The removed device also tries the other commands it has.
    let _ = server.run(&["rotate", "bob"]);
    let _ = server.run(&["device", "link", "--link"]);
    let _ = server.run(&["profile", "--name", "Mallory"]);
    let _ = server.run(&["recv", "--json"]);
    // The laptop's queues move to new ones (the server held their keys).
    let (laptop, bob) = (&w.laptop, &w.bob);
    settle(&mut printed, &[laptop, bob], 3);
    let c = laptop.contact("bob");
    assert_eq!(c["rotating"], false, "{c}");
    assert_eq!(c["pending_jobs"], 0, "{c}");
    assert!(bob.ok(&["profile", "--json"]).contains("Bob"));
    let bc = bob.contact("alice");
    assert_eq!(bc["devices"], 1, "{bc}");
    assert_eq!(bc["state"], "connected", "{bc}");
    // Life goes on for the others, each message once.
    for i in 0..3 {
        let t = format!("after all that {i}, from Bob");
        bob.send("alice", &t);
        w.sent.push(pair("in", &t));
        assert_eq!(laptop.recv_texts(), vec![t]);
        let t = format!("after all that {i}, from the laptop");
        laptop.send("bob", &t);
        w.sent.push(pair("out", &t));
        assert_eq!(bob.recv_texts(), vec![t]);
        let o = server.run(&["recv", "--json"]);
        assert!(
            texts(&complete_lines(&stdout(&o))).is_empty(),
            "{}",
            show(&o)
        );
    }
    laptop.recv_nothing();
    bob.recv_nothing();
    // Bob's name for Alice did not become "Mallory".
    assert_eq!(bob.contacts()[0]["name"], "alice");
    let server_after: Vec<Entry> = history(&server, "bob")
        .into_iter()
        .filter(|e| !e.text.starts_with("removed, trying"))
        .collect();
    assert_eq!(server_after, server_before, "the server got nothing new");
    printed.assert_at_most_once();
    // Bob's history may hold the removed device's tries from before his
    // DROP; Alice's laptop has exactly what was sent, once.
    let bob_texts: Vec<String> = history(bob, "alice").into_iter().map(|e| e.text).collect();
    for t in &bob_texts {
        let n = bob_texts.iter().filter(|x| *x == t).count();
        assert_eq!(n, 1, "Bob: {t} {n} times");
    }
    let mut got: Vec<(String, String)> = history(laptop, "bob")
        .into_iter()
        .map(|e| (e.dir, e.text))
        .filter(|(_, t)| !t.starts_with("removed, trying"))
        .collect();
    got.sort();
    let mut want = w.sent.clone();
    want.sort();
    assert_eq!(got, want, "the laptop's history");
}

/// The removed device, before any contact heard of its removal, removes
/// the laptop in turn (it was granted the recipient auth keys of the
/// laptop's queues, and its DROP can reach Bob first).
// Failed at d5dd685, BUG: a removed device that runs `device remove` on the
// remaining one before contacts process DROP deletes its queues and cuts it
// off for good (devices.rs remove_device / DeviceMsg::Drop); passes since
// 7ee1f15.
#[test]
fn a_removed_device_removing_the_remaining_one_does_not_cut_it_off() {
    let (w, server, _printed) = linked(2, &[0], &[1]);
    w.laptop.ok(&["device", "remove", "server"]);
    // The server does not know it was removed; it removes the laptop.
    let o = server.run(&["device", "remove", "laptop"]);
    eprintln!("server's device remove laptop: {}", show(&o));
    let (laptop, bob) = (&w.laptop, &w.bob);
    // Bob writes, then reads (both DROPs), then writes again; the laptop
    // reads after each step.
    let o = bob.run(&["send", "alice", "to Alice, after both removals"]);
    let mut got = texts(&recv_any(laptop));
    let mut log = format!("Bob's first send: {}\n", show(&o));
    for _ in 0..3 {
        recv_any(bob);
        got.extend(texts(&recv_any(laptop)));
    }
    let o = bob.run(&["send", "alice", "to Alice, once Bob heard of them"]);
    log.push_str(&format!("Bob's second send: {}\n", show(&o)));
    let mut got2 = texts(&recv_any(laptop));
    for _ in 0..3 {
        recv_any(bob);
        got2.extend(texts(&recv_any(laptop)));
    }
    let state = format!("{log}{}", state(&[laptop, &server, bob]));
    assert_eq!(
        got,
        vec!["to Alice, after both removals"],
        "the remaining device must keep receiving\n{state}"
    );
    assert_eq!(
        got2,
        vec!["to Alice, once Bob heard of them"],
        "the remaining device must keep receiving\n{state}"
    );
    laptop.send("bob", "from the laptop, still here");
    assert_eq!(
        bob.recv_texts(),
        vec!["from the laptop, still here"],
        "{state}"
    );
    assert_eq!(bob.contact("alice")["devices"], 1, "{state}");
}

/// With several contacts the new device has one offer to make per contact;
/// three of its recvs take the sync at once. Each contact must end with
/// exactly two connections for Alice, the server with one per contact.
// Failed at d5dd685, BUG: duplicate connections per pair of devices
// (re-entrant run_device_jobs, and concurrent processes both running one
// DeviceJob::Offer); passes since 7ee1f15.
#[test]
fn three_recvs_at_once_on_the_new_device_with_several_contacts_make_one_connection_per_pair() {
    let relays = [Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let names = ["bob", "carol", "dave", "erin"];
    let contacts: Vec<Profile> = names
        .iter()
        .map(|n| {
            let p = Profile::new(n, &[&relays[1]]);
            connect(&laptop, n, &p, "alice");
            p
        })
        .collect();
    let link = device_link(&laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&laptop);
    let mut printed = Printed::default();
    for p in [&laptop, &server, &laptop] {
        printed.record(p, &recv_any(p));
    }
    let outs = all_at_once(
        &server,
        &[
            &["recv", "--json"],
            &["recv", "--json"],
            &["recv", "--json"],
        ],
    );
    for o in &outs {
        assert_code(o, 0, "recv beside recvs");
    }
    let mut all: Vec<&Profile> = vec![&laptop, &server];
    all.extend(contacts.iter());
    let done = || {
        names.iter().zip(&contacts).all(|(n, c)| {
            try_contact(&server, n).is_some_and(|x| x["state"] == "connected")
                && try_contact(c, "alice").is_some_and(|x| x["devices"] == 2)
        })
    };
    settle_until(&mut printed, &all, 5, "links with every contact", done);
    settle(&mut printed, &all, 1);
    let st = state(&all);
    for (n, c) in names.iter().zip(&contacts) {
        assert_eq!(server.contact(n)["devices"], 1, "{n}\n{st}");
        assert_eq!(c.contact("alice")["devices"], 2, "{n}\n{st}");
    }
}

/// No fault at all: a profile with two contacts links a device, plain
/// `recv`s one at a time. Each contact must end with exactly two
/// connections for Alice, the new device with one per contact.
// Failed at d5dd685, BUG: with two or more contacts the new device runs the
// offer of every contact after the first several times (re-entrant
// run_device_jobs via make_offer -> run_jobs), making duplicate connections;
// passes since 7ee1f15.
#[test]
fn linking_a_device_to_a_profile_with_two_contacts_makes_one_connection_per_pair() {
    let relays = [Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[1]]);
    let carol = Profile::new("Carol", &[&relays[1]]);
    connect(&laptop, "bob", &bob, "alice");
    connect(&laptop, "carol", &carol, "alice");
    let link = device_link(&laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&laptop);
    let mut printed = Printed::default();
    let all = [&laptop, &server, &bob, &carol];
    settle(&mut printed, &all, 5);
    let st = state(&all);
    assert_eq!(server.contact("bob")["devices"], 1, "{st}");
    assert_eq!(server.contact("carol")["devices"], 1, "{st}");
    assert_eq!(bob.contact("alice")["devices"], 2, "{st}");
    assert_eq!(carol.contact("alice")["devices"], 2, "{st}");
    // And every message once on every device.
    carol.send("alice", "from Carol");
    assert_eq!(laptop.recv_texts(), vec!["from Carol"]);
    assert_eq!(server.recv_texts(), vec!["from Carol"]);
    server.send("carol", "from the server to Carol");
    assert_eq!(carol.recv_texts(), vec!["from the server to Carol"]);
    printed.assert_at_most_once();
}

/// `device remove` while the relay holding the removed device's queues is
/// down: it says so (exit 75), keeps the device as "removing", and the
/// next `recv` once the relay is back finishes the job before the removed
/// device can read anything new.
#[test]
fn removing_a_device_while_its_relay_is_down_finishes_when_the_relay_is_back() {
    let (mut w, server, mut printed) = linked(2, &[0], &[1]);
    w.relays[0].stop();
    let o = w.laptop.run(&["device", "remove", "server"]);
    assert_code(&o, 75, "device remove with the device's relay down");
    assert_eq!(
        other_devices(&w.laptop),
        vec![("server".to_string(), "removing".to_string())]
    );
    // Bob writes meanwhile: Alice's relay is down, his tern keeps it.
    let t = "while the removal is pending, from Bob";
    assert_code(
        &w.bob.run(&["send", "alice", t]),
        75,
        "send with Alice's relay down",
    );
    w.sent.push(pair("in", t));
    w.relays[0].restart();
    // The laptop's next recv deletes the server's queues first.
    printed.record(&w.laptop, &recv_any(&w.laptop));
    assert!(
        other_devices(&w.laptop).is_empty(),
        "{:?}",
        devices(&w.laptop)
    );
    // Bob's recv delivers what he kept.
    printed.record(&w.bob, &recv_any(&w.bob));
    assert_eq!(texts(&recv_any(&w.laptop)), vec![t.to_string()]);
    let t2 = "after the removal finished, from Bob";
    w.bob.send("alice", t2);
    w.sent.push(pair("in", t2));
    let got = texts(&recv_removed(&server));
    assert!(
        got.is_empty(),
        "the removed device read messages sent after its removal: {got:?}"
    );
    let (laptop, bob) = (&w.laptop, &w.bob);
    settle(&mut printed, &[laptop, bob], 3);
    assert_eq!(bob.contact("alice")["devices"], 1);
    laptop.send("bob", "the laptop alone");
    w.sent.push(pair("out", "the laptop alone"));
    assert_eq!(bob.recv_texts(), vec!["the laptop alone"]);
    printed.assert_at_most_once();
    let mut got: Vec<(String, String)> = history(laptop, "bob")
        .into_iter()
        .map(|e| (e.dir, e.text))
        .collect();
    got.sort();
    let mut want = w.sent.clone();
    want.sort();
    assert_eq!(got, want, "the laptop's history");
}

/// `device join` SIGKILLed at a sweep of points, then run again with the
/// same link on the same home: either the first try's request got out
/// (and the second says so, exit 6) or not (and the second joins). Either
/// way the link then completes with one device and one connection per pair.
/// See the two tests below; `strict`: the retried join must also leave no
/// second, never-completing device record behind.
fn join_killed_then_retried(strict: bool) {
    let mut rng = Rng::from_env("device_join_killed");
    // A join takes some tens of milliseconds here: early, middle, late.
    for range in [(5, 40), (20, 45), (40, 90), (90, 200)] {
        let ms = range.0 + rng.below(range.1 - range.0);
        let mut w = world(2, &[0], &[1]);
        let mut printed = Printed::default();
        let link = device_link(&w.laptop);
        let server = Profile::empty("Alice-server");
        run_killed(&server, &join_args(&link), Duration::from_millis(ms));
        let mut o = server.run(&join_args(&link));
        if o.status.code() == Some(1) && stderr(&o).contains("not fully initialised") {
            // Killed between creating the home and writing its settings:
            // tern says to start again in an empty home; so does the user.
            std::fs::remove_dir_all(&server.home).unwrap();
            o = server.run(&join_args(&link));
        }
        assert!(
            matches!(o.status.code(), Some(0) | Some(6)),
            "the join retried after a kill at {ms} ms: {}",
            show(&o)
        );
        confirm(&w.laptop);
        let (laptop, bob) = (&w.laptop, &w.bob);
        let all = [laptop, &server, bob];
        let what = format!("link, join killed at {ms} ms");
        settle_until(&mut printed, &all, 8, &what, || {
            if strict {
                return link_complete(laptop, &server, bob);
            }
            // The link itself: everything but a left-over record.
            let ok = |p: &Profile, name: &str, devices: u64| {
                try_contact(p, name)
                    .is_some_and(|c| c["state"] == "connected" && c["devices"] == devices)
            };
            ok(&server, "bob", 1)
                && ok(bob, "alice", 2)
                && other_devices(laptop) == vec![("server".to_string(), "connected".to_string())]
                && other_devices(&server).contains(&("laptop".to_string(), "connected".to_string()))
        });
        settle(&mut printed, &all, 1);
        both_ways(&mut w, &server, &what);
        printed.assert_at_most_once();
        assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
    }
}

/// `device join` SIGKILLed at a sweep of points, then run again with the
/// same link on the same home: either the first try's request got out
/// (and the second says so, exit 6) or not (and the second joins). Either
/// way the link then completes, one connection per pair, history once.
#[test]
fn a_device_join_killed_midway_then_retried_links_the_device() {
    join_killed_then_retried(false);
}

/// The same, and the new device lists exactly one other device. Killed
/// after the first try stored its connection record but before its request
/// went out, the retry makes a second record whose request the relay takes;
/// the first one's request is then refused and it stays "linking" for good.
// Failed at d5dd685, BUG: a `device join` killed before its request went out,
// then retried, leaves a phantom device stuck in "linking" (cli/device.rs
// run_join / devices.rs join_device); fixed in 8e6655e, which brought the
// bug this test is ignored for.
#[test]
fn a_device_join_killed_midway_then_retried_leaves_no_phantom_device() {
    join_killed_then_retried(true);
}

/// A third device linked once two are: it meets the server through the
/// laptop (SIBLING) and Bob through the laptop (GROUP). Every device must
/// list exactly the two others, connected, and Bob must have three
/// connections for Alice.
// Failed at d5dd685, BUG: the third device runs its SIBLING offer twice
// (re-entrant run_device_jobs via make_offer -> run_jobs): the server gets
// two connections with it; passes since 7ee1f15.
#[test]
fn a_third_device_meets_each_other_device_and_the_contact_exactly_once() {
    let (mut w, server, mut printed) = linked(2, &[0], &[1]);
    let link = w
        .laptop
        .ok(&["device", "link", "--link"])
        .trim()
        .to_string();
    let phone = Profile::empty("Alice-phone");
    phone.ok(&[
        "device",
        "join",
        &link,
        "--name",
        "phone",
        "--no-passphrase",
    ]);
    confirm(&w.laptop);
    let (laptop, bob) = (&w.laptop, &w.bob);
    let all = [laptop, &server, &phone, bob];
    settle(&mut printed, &all, 6);
    let st = state(&all);
    let sorted = |p: &Profile| {
        let mut d = other_devices(p);
        d.sort();
        d
    };
    let c = |n: &str| (n.to_string(), "connected".to_string());
    assert_eq!(sorted(laptop), vec![c("phone"), c("server")], "{st}");
    assert_eq!(sorted(&server), vec![c("laptop"), c("phone")], "{st}");
    assert_eq!(sorted(&phone), vec![c("laptop"), c("server")], "{st}");
    assert_eq!(bob.contact("alice")["devices"], 3, "{st}");
    assert_eq!(phone.contact("bob")["devices"], 1, "{st}");
    assert_eq!(phone.contact("bob")["state"], "connected", "{st}");
    // Each device's message reaches the three others once.
    phone.send("bob", "from the phone");
    w.sent.push(pair("out", "from the phone"));
    for p in [laptop, &server, bob] {
        assert_eq!(p.recv_texts(), vec!["from the phone"], "{}", p.display);
    }
    both_ways(&mut w, &server, "three devices");
    assert_eq!(phone.recv_texts().len(), 3);
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server, &phone], &w.bob, &w.sent);
}

/// `device remove` SIGKILLed at a sweep of points, then the laptop's
/// `recv`s finish the job: the server receives nothing new, Bob ends with
/// one connection for Alice, the laptop receives everything once.
#[test]
fn a_device_remove_killed_midway_is_finished_by_the_next_recv() {
    let mut rng = Rng::from_env("device_remove_killed");
    let (mut w, server, mut printed) = linked(2, &[0], &[1]);
    let ms = 5 + rng.below(60);
    run_killed(
        &w.laptop,
        &["device", "remove", "server"],
        Duration::from_millis(ms),
    );
    // The laptop's recv finishes whatever the kill left (or the user runs
    // the command again, if the device is still listed as connected).
    let left = other_devices(&w.laptop);
    eprintln!("device remove killed after {ms} ms; devices then: {left:?}");
    if left.contains(&("server".to_string(), "connected".to_string())) {
        w.laptop.ok(&["device", "remove", "server"]);
    }
    printed.record(&w.laptop, &recv_any(&w.laptop));
    assert!(
        other_devices(&w.laptop).is_empty(),
        "{:?}",
        devices(&w.laptop)
    );
    let t = format!("after a remove killed at {ms} ms, from Bob");
    w.bob.send("alice", &t);
    w.sent.push(pair("in", &t));
    let got = texts(&recv_removed(&server));
    assert!(got.is_empty(), "the removed device read {got:?}");
    assert_eq!(texts(&recv_any(&w.laptop)), vec![t.clone()]);
    let (laptop, bob) = (&w.laptop, &w.bob);
    settle(&mut printed, &[laptop, bob], 3);
    assert_eq!(
        bob.contact("alice")["devices"],
        1,
        "{}",
        state(&[laptop, bob])
    );
    laptop.send("bob", "the laptop alone");
    w.sent.push(pair("out", "the laptop alone"));
    assert_eq!(bob.recv_texts(), vec!["the laptop alone"]);
    printed.assert_at_most_once();
    let mut got: Vec<(String, String)> = history(laptop, "bob")
        .into_iter()
        .map(|e| (e.dir, e.text))
        .collect();
    got.sort();
    let mut want = w.sent.clone();
    want.sort();
    assert_eq!(got, want, "the laptop's history");
}

// ---------------------------------------------------------------------------
// Removal after the queues moved, and the other way round

/// The server rotates its queues with Bob after the link; then the laptop
/// removes it. The server's new queues (announced again after the
/// rotation) must be the ones deleted: it receives nothing new.
#[test]
fn removing_a_device_after_it_rotated_its_queues_still_cuts_it_off() {
    let (mut w, server, mut printed) = linked(2, &[0], &[1]);
    let rotated = server.contact("bob")["last_rotated"].clone();
    server.ok(&["rotate", "bob"]);
    {
        let (laptop, bob) = (&w.laptop, &w.bob);
        let all = [laptop, &server, bob];
        settle_until(&mut printed, &all, 6, "rotation", || {
            let c = server.contact("bob");
            c["rotating"] == false && c["pending_jobs"] == 0 && c["last_rotated"] != rotated
        });
        settle(&mut printed, &all, 1);
    }
    both_ways(&mut w, &server, "after the rotation");
    w.laptop.ok(&["device", "remove", "server"]);
    assert!(
        other_devices(&w.laptop).is_empty(),
        "{:?}",
        devices(&w.laptop)
    );
    let t = "after the server's removal, from Bob";
    w.bob.send("alice", t);
    w.sent.push(pair("in", t));
    let got = texts(&recv_removed(&server));
    assert!(
        got.is_empty(),
        "the removed server read {got:?}: its rotated queues survived the removal"
    );
    assert_eq!(texts(&recv_any(&w.laptop)), vec![t.to_string()]);
    let (bob, laptop) = (&w.bob, &w.laptop);
    settle(&mut printed, &[laptop, bob], 3);
    assert_eq!(bob.contact("alice")["devices"], 1);
    let _ = server.run(&["send", "bob", "the removed server, trying"]);
    laptop.send("bob", "the laptop alone");
    w.sent.push(pair("out", "the laptop alone"));
    assert_eq!(bob.recv_texts(), vec!["the laptop alone"]);
    assert!(texts(&recv_removed(&server)).is_empty());
    printed.assert_at_most_once();
    let mut got: Vec<(String, String)> = history(laptop, "bob")
        .into_iter()
        .map(|e| (e.dir, e.text))
        .collect();
    got.sort();
    let mut want = w.sent.clone();
    want.sort();
    assert_eq!(got, want, "the laptop's history");
}

/// The new device writes to Bob as soon as it has the contact, before its
/// own connection with him has completed: kept, delivered once the
/// connection is up, copied to the laptop once.
#[test]
fn the_new_device_writing_before_its_connection_with_the_contact_completes() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let mut printed = Printed::default();
    for p in [&w.laptop, &server, &w.laptop, &server] {
        printed.record(p, &recv_any(p));
    }
    // The server has Bob (from GROUP), invited, not connected yet.
    let c = server.contact("bob");
    assert_ne!(c["state"], "connected", "{c}");
    let t = "from the server, before its connection with Bob completed";
    let o = server.run(&["send", "bob", t]);
    assert_code(&o, 0, "send before the connection completed");
    w.sent.push(pair("out", t));
    let (laptop, bob) = (&w.laptop, &w.bob);
    let all = [laptop, &server, bob];
    settle_until(&mut printed, &all, 8, "link", || {
        link_complete(laptop, &server, bob)
    });
    settle(&mut printed, &all, 1);
    assert_eq!(printed.times(&w.bob, t), 1);
    assert_eq!(printed.times(&w.laptop, t), 1);
    both_ways(&mut w, &server, "after");
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

// ---------------------------------------------------------------------------
// Daemons

/// Every home runs `recv --follow` the whole time (the server as a daemon,
/// say) and nobody runs anything else but `device join` and `send`: the
/// link completes by itself, and messages reach every follower once. Then
/// the followers are SIGKILLed and plain recvs find nothing left.
#[test]
fn the_link_completes_with_a_follower_on_every_home_and_nothing_else() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let (laptop, bob) = (&w.laptop, &w.bob);
    let mut followers = vec![laptop.follow(), server.follow(), bob.follow()];
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while !link_complete(laptop, &server, bob) {
        assert!(
            std::time::Instant::now() < deadline,
            "the link did not complete with followers alone\n{}",
            state(&[laptop, &server, bob])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    bob.send("alice", "to the followers");
    w.sent.push(pair("in", "to the followers"));
    for f in &mut followers[..2] {
        let (got, _) = f.next_messages(1);
        assert_eq!(got, vec!["to the followers"]);
    }
    server.send("bob", "from the server, to Bob's follower");
    w.sent
        .push(pair("out", "from the server, to Bob's follower"));
    let (got, _) = followers[2].next_messages(1);
    assert_eq!(got, vec!["from the server, to Bob's follower"]);
    let (got, _) = followers[0].next_messages(1);
    assert_eq!(got, vec!["from the server, to Bob's follower"]);
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = Vec::new();
    for f in followers {
        extra.extend(texts(
            &f.pending_lines()
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<Value>>(),
        ));
        f.kill();
    }
    assert!(extra.is_empty(), "messages shown twice: {extra:?}");
    for p in [laptop, &server, bob] {
        p.recv_nothing();
    }
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

// ---------------------------------------------------------------------------
// Sent times

/// Bob writes while his connection with the new device is still being
/// made; it reaches the server from Bob's outbox a while later. Both of
/// Alice's devices must give the message the time Bob wrote it: the same
/// sent time (and so the same place in `tern log`) on each.
#[test]
fn a_message_the_contact_wrote_while_meeting_the_new_device_has_one_sent_time() {
    let mut w = world(2, &[0], &[1]);
    let link = device_link(&w.laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&w.laptop);
    let (laptop, bob) = (&w.laptop, &w.bob);
    let mut printed = Printed::default();
    // Device connection, sync, offer, ADD; Bob accepts the ADD.
    for p in [laptop, &server, laptop, &server, laptop, bob] {
        printed.record(p, &recv_any(p));
    }
    assert_eq!(bob.contact("alice")["devices"], 2);
    let t = "written while Bob's tern was meeting the server";
    bob.send("alice", t);
    w.sent.push(pair("in", t));
    // Some time passes before that connection completes.
    std::thread::sleep(Duration::from_millis(2100));
    for p in [&server, bob, &server, laptop] {
        printed.record(p, &recv_any(p));
    }
    let all = [laptop, &server, bob];
    settle(&mut printed, &all, 2);
    let when = |p: &Profile| {
        history(p, "bob")
            .into_iter()
            .find(|e| e.text == t)
            .map(|e| e.sent_at)
    };
    assert_eq!(
        when(&server),
        when(laptop),
        "one message, two sent times; Bob's: {:?}",
        history(bob, "alice")
            .into_iter()
            .find(|e| e.text == t)
            .map(|e| e.sent_at)
    );
    printed.assert_at_most_once();
    assert_histories(&[&w.laptop, &server], &w.bob, &w.sent);
}

/// The laptop uses two relays; the first `device join` reaches only one
/// of them (the other is down). A second `device join` with the same link,
/// once that relay is back, reaches the other one: the laptop then holds two
/// valid requests for one device link and cannot tell which came first. The
/// link was copied, so neither device may get anything (PROTOCOL.md §12.2);
/// the user is told, and a new link works.
#[test]
fn a_device_link_used_twice_across_two_relays_is_cancelled_for_both() {
    let mut w = world(2, &[0, 1], &[1]);
    let link = device_link(&w.laptop);
    w.relays[1].stop();
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    w.relays[1].restart();
    let thief = Profile::empty("thief");
    let _ = thief.run(&[
        "device",
        "join",
        &link,
        "--name",
        "thief",
        "--no-passphrase",
    ]);
    let (laptop, bob) = (&w.laptop, &w.bob);
    let o = laptop.run(&["recv", "--json"]);
    assert!(
        stderr(&o).contains("two devices answered your device link"),
        "the user is told the link was copied\n{}",
        show(&o)
    );
    let mut printed = Printed::default();
    settle(&mut printed, &[laptop, &server, &thief, bob], 4);
    let st = state(&[laptop, &server, &thief, bob]);
    assert!(
        thief.contacts().is_empty() && server.contacts().is_empty(),
        "a copied link gives nothing to anyone\n{st}"
    );
    assert!(
        other_devices(laptop).is_empty(),
        "the laptop links neither device\n{st}"
    );
    // A new link, shown to the right device only, works.
    let server2 = Profile::empty("Alice-server-2");
    let link2 = device_link(laptop);
    server2.ok(&join_args(&link2));
    confirm(laptop);
    settle_until(
        &mut printed,
        &[laptop, &server2, bob],
        8,
        "a new link",
        || link_complete(laptop, &server2, bob),
    );
}

// ---------------------------------------------------------------------------
// A recv killed while it hangs on a relay in the middle of a device step

/// The pid of a relay's `tern relay serve` process (found by its data
/// directory).
fn relay_pid(r: &Relay) -> u32 {
    let needle = r.data_dir().to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("relay serve") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("no relay process for {needle}");
}

/// A relay frozen with SIGSTOP (it accepts connections and answers
/// nothing) until dropped.
struct Frozen(u32);

impl Frozen {
    fn new(r: &Relay) -> Frozen {
        let pid = relay_pid(r);
        let st = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Alice uses two relays; the second one hangs (frozen, not down) while
/// the new device's recv takes the sync, so that recv is still making its
/// offer for Bob (creating queues, one relay hanging) when the user kills
/// it. Once the relay answers again, the next few recvs must finish the
/// link: a killed process must not hold the step up for minutes. (About
/// 25 s: the frozen relay's timeouts.)
// Failed at 7ee1f15..53775ea, BUG: the killed recv's claim on the offer
// (CLAIM_MS, 120 s) stalled the link for two minutes; passes since 48f4549.
#[test]
fn a_recv_killed_while_it_makes_an_offer_does_not_stall_the_link() {
    let relays: Vec<Relay> = (0..3).map(|_| Relay::start()).collect();
    let laptop = Profile::new("Alice", &[&relays[0], &relays[1]]);
    let bob = Profile::new("Bob", &[&relays[2]]);
    connect(&laptop, "bob", &bob, "alice");
    let link = device_link(&laptop);
    let server = Profile::empty("Alice-server");
    server.ok(&join_args(&link));
    confirm(&laptop);
    let mut printed = Printed::default();
    for p in [&laptop, &server, &laptop] {
        printed.record(p, &recv_any(p));
    }
    {
        let _frozen = Frozen::new(&relays[1]);
        // Its fetches from the frozen relay time out (15 s), then it makes
        // the offer: queues on both relays, the frozen one hanging again.
        let ev = run_killed(&server, &["recv", "--json"], Duration::from_secs(22));
        printed.record(&server, &ev);
    }
    let all = [&laptop, &server, &bob];
    settle_until(&mut printed, &all, 6, "link after the killed offer", || {
        link_complete(&laptop, &server, &bob)
    });
}
