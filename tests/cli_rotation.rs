//! Queues and keys that move: `tern rotate` while messages flow both ways,
//! rotation with a relay down, `tern relays remove` (also of a relay that
//! dies half-way through the move), re-keying through a PNG and a link (also
//! with an invitation that a newer one replaced), crashes in the middle of a
//! rotation, and automatic rotation driven by an injected clock
//! (TERN_TEST_CLOCK_OFFSET_SECS).
//!
//! Every message must arrive exactly once (checked on what `recv --json`
//! prints and on `tern log`), and retired queues must disappear from the
//! relays: each relay's SQLite database (`relay.db` in its data directory)
//! is opened read-only and its `queues` table inspected.

mod cli_common;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Output, Stdio};
use std::time::Duration;

use cli_common::*;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

const DAY_SECS: i64 = 86_400;

// ---------------------------------------------------------------------------
// Relay databases

/// The queues a relay holds, by recipient-id hash (`queues.recipient_hash`).
fn relay_queues(r: &Relay) -> BTreeSet<Vec<u8>> {
    let path = r.data_dir().join(tern_relay::store::DB_FILE);
    let c = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("opening {} read-only: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut st = c.prepare("SELECT recipient_hash FROM queues").unwrap();
    let rows = st.query_map([], |row| row.get::<_, Vec<u8>>(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn common(a: &BTreeSet<Vec<u8>>, b: &BTreeSet<Vec<u8>>) -> usize {
    a.intersection(b).count()
}

// ---------------------------------------------------------------------------
// Exactly-once bookkeeping

/// Every message sent (globally unique texts) and every one printed by a
/// `recv`, per receiving profile.
#[derive(Default)]
struct Ledger {
    /// (from display, to display, text)
    sent: Vec<(String, String, String)>,
    /// (receiver display, text) as printed by `recv --json` / `--follow`.
    printed: Vec<(String, String)>,
    /// Of `printed`, those written by a run that was then SIGKILLed: such a
    /// run may die after writing a message and before noting it as shown,
    /// so the next run may print it once more (at least once, never lost).
    unconfirmed: Vec<(String, String)>,
    n: usize,
}

impl Ledger {
    /// `from` sends a fresh message to its contact `to_name` (profile `to`).
    #[track_caller]
    fn send(&mut self, from: &Profile, to_name: &str, to: &Profile, tag: &str) -> String {
        self.n += 1;
        let text = format!("{}→{} {tag} #{}", from.display, to.display, self.n);
        let o = from.run(&["send", to_name, &text]);
        assert_code(&o, 0, &format!("{}: send {text:?}", from.display));
        self.sent
            .push((from.display.clone(), to.display.clone(), text.clone()));
        text
    }

    /// Records a send made outside [`Ledger::send`] (one that exited 75, say).
    fn sent_anyway(&mut self, from: &Profile, to: &Profile, text: &str) {
        self.sent
            .push((from.display.clone(), to.display.clone(), text.to_string()));
    }

    fn next_text(&mut self, from: &Profile, to: &Profile, tag: &str) -> String {
        self.n += 1;
        format!("{}→{} {tag} #{}", from.display, to.display, self.n)
    }

    /// Records the messages among `events` as printed to `p` by a run that
    /// ended by itself; a message printed twice is a failure at once.
    #[track_caller]
    fn record(&mut self, p: &Profile, events: &[Value]) {
        self.record_run(p, events, false);
    }

    /// Records what a run printed before it was SIGKILLed.
    #[track_caller]
    fn record_killed(&mut self, p: &Profile, events: &[Value]) {
        self.record_run(p, events, true);
    }

    #[track_caller]
    fn record_run(&mut self, p: &Profile, events: &[Value], killed: bool) {
        for t in texts(events) {
            let key = (p.display.clone(), t);
            let seen = self.printed.contains(&key);
            if seen {
                // Again only after a killed run printed it, and only once.
                let Some(i) = self.unconfirmed.iter().position(|k| *k == key) else {
                    panic!(
                        "{}: message {:?} was received a second time",
                        p.display, key.1
                    );
                };
                self.unconfirmed.remove(i);
            } else {
                self.printed.push(key.clone());
            }
            if killed {
                self.unconfirmed.push(key);
            }
        }
    }

    /// `recv --json` on `p` (must exit 0), recorded.
    #[track_caller]
    fn recv(&mut self, p: &Profile) -> Vec<Value> {
        let ev = p.recv();
        self.record(p, &ev);
        ev
    }

    fn sent_to(&self, to: &Profile, from: Option<&Profile>) -> Vec<String> {
        let mut v: Vec<String> = self
            .sent
            .iter()
            .filter(|(f, t, _)| *t == to.display && from.is_none_or(|fr| *f == fr.display))
            .map(|(_, _, x)| x.clone())
            .collect();
        v.sort();
        v
    }

    /// Everything printed to each of `profiles` is exactly what was sent to
    /// it: nothing lost, nothing twice.
    #[track_caller]
    fn assert_all_printed_once(&self, profiles: &[&Profile]) {
        for p in profiles {
            let mut got: Vec<String> = self
                .printed
                .iter()
                .filter(|(who, _)| *who == p.display)
                .map(|(_, t)| t.clone())
                .collect();
            got.sort();
            assert_eq!(
                got,
                self.sent_to(p, None),
                "{}: the messages received (left) differ from those sent to it (right)",
                p.display
            );
        }
    }

    /// `tern log` of `p` with its contact `name` (who is `other`) holds every
    /// message each way exactly once.
    #[track_caller]
    fn assert_log_once(&self, p: &Profile, name: &str, other: &Profile) {
        let log = json_lines(&p.ok(&["log", name, "--json", "--limit", "10000"]));
        let dir = |d: &str| {
            let mut v: Vec<String> = log
                .iter()
                .filter(|e| e["direction"] == d)
                .map(|e| e["text"].as_str().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            dir("in"),
            self.sent_to(p, Some(other)),
            "{}: `tern log {name}` incoming messages (left) vs those {} sent (right)",
            p.display,
            other.display
        );
        assert_eq!(
            dir("out"),
            self.sent_to(other, Some(p)),
            "{}: `tern log {name}` outgoing messages",
            p.display
        );
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// A command of `p` with tern's clock moved by `offset_secs`.
fn run_at(p: &Profile, offset_secs: i64, args: &[&str]) -> Output {
    let mut c = p.cmd(args);
    c.env("TERN_TEST_CLOCK_OFFSET_SECS", offset_secs.to_string());
    run_cmd(c, None, HANG_GUARD)
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
    let s = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    // Only complete lines: the kill may cut the last one.
    let complete = match s.rfind('\n') {
        Some(i) => &s[..=i],
        None => "",
    };
    json_lines(complete)
}

/// What [`connect_watching`] saw.
struct Watched {
    /// The inviter's queues on the relay watched, by recipient-id hash.
    inviter: BTreeSet<Vec<u8>>,
    /// The joiner's.
    joiner: BTreeSet<Vec<u8>>,
    /// The invitation link.
    link: String,
}

/// [`connect`], step by step, noting which of `r`'s queues each side
/// created.
#[track_caller]
fn connect_watching(
    a: &Profile,
    a_calls_b: &str,
    b: &Profile,
    b_calls_a: &str,
    r: &Relay,
) -> Watched {
    let start = relay_queues(r);
    let link = a.ok(&["invite", "--link", "--name", a_calls_b]);
    let after_a = relay_queues(r);
    b.ok(&["accept", link.trim(), "--name", b_calls_a]);
    let after_b = relay_queues(r);
    a.ok(&["recv"]);
    b.ok(&["recv"]);
    a.ok(&["recv"]);
    assert_eq!(a.contact(a_calls_b)["state"], "connected");
    assert_eq!(b.contact(b_calls_a)["state"], "connected");
    Watched {
        inviter: after_a.difference(&start).cloned().collect(),
        joiner: after_b.difference(&after_a).cloned().collect(),
        link: link.trim().to_string(),
    }
}

/// The relay's `queues.sender_hash` column.
fn relay_sender_hashes(r: &Relay) -> BTreeSet<Vec<u8>> {
    let path = r.data_dir().join(tern_relay::store::DB_FILE);
    let c = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut st = c.prepare("SELECT sender_hash FROM queues").unwrap();
    let rows = st.query_map([], |row| row.get::<_, Vec<u8>>(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// SHA-256 of the sender ids in a contact invitation link, as the relay
/// stores them.
fn invitation_sender_hashes(link: &str) -> BTreeSet<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let inv = tern::proto::invitation::Invitation::from_link(link).expect("an invitation link");
    inv.queues
        .iter()
        .map(|q| Sha256::digest(q.sender_id).to_vec())
        .collect()
}

/// Field `f` of `p`'s contact `name`.
fn field(p: &Profile, name: &str, f: &str) -> Value {
    p.contact(name)[f].clone()
}

fn describe_state(pairs: &[(&Profile, &str)], relays: &[&Relay]) -> String {
    let mut s = String::new();
    for (p, name) in pairs {
        s.push_str(&format!("{}: {}\n", p.display, p.contact(name)));
    }
    for (i, r) in relays.iter().enumerate() {
        if r.is_running() || r.data_dir().join(tern_relay::store::DB_FILE).exists() {
            s.push_str(&format!("relay {i}: {} queues\n", relay_queues(r).len()));
        }
    }
    s
}

/// Runs `recv` on each profile in turn, at most `rounds` times, until
/// `done` holds. Messages printed are recorded in the ledger.
#[track_caller]
fn settle(
    ledger: &mut Ledger,
    order: &[&Profile],
    rounds: usize,
    what: &str,
    mut done: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    for _ in 0..rounds {
        if done() {
            return;
        }
        for p in order {
            ledger.recv(p);
        }
    }
    assert!(
        done(),
        "{what}: not done after {rounds} rounds of recv\n{}",
        state()
    );
}

fn rotation_done(p: &Profile, name: &str) -> bool {
    let c = p.contact(name);
    c["rotating"] == false && c["pending_jobs"] == 0
}

/// The label a relay has in `contacts --json` (`host:port (KEYPREFIX)`).
fn label_port(r: &Relay) -> String {
    format!("127.0.0.1:{} ", r.port)
}

fn relays_of(p: &Profile, name: &str, f: &str) -> Vec<String> {
    field(p, name, f)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Rotation while messages flow both ways

#[test]
fn rotate_while_messages_flow_both_ways() {
    let r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    let w = connect_watching(&alice, "bob", &bob, "alice", &r);
    let before = relay_queues(&r);
    assert_eq!(before.len(), 2, "one receiving queue each way");
    // The sender id Bob was given in the invitation, as the relay knows it.
    let old_sender = invitation_sender_hashes(&w.link);
    assert_eq!(old_sender.len(), 1);
    assert!(relay_sender_hashes(&r).is_superset(&old_sender));
    let mut l = Ledger::default();

    // Before.
    for i in 0..3 {
        l.send(&alice, "bob", &bob, &format!("before {i}"));
        l.send(&bob, "alice", &alice, &format!("before {i}"));
    }
    l.recv(&bob);
    l.recv(&alice);
    l.assert_all_printed_once(&[&alice, &bob]);
    let rotated_a = field(&alice, "bob", "last_rotated");
    let rotated_b = field(&bob, "alice", "last_rotated");
    assert_eq!(field(&alice, "bob", "rotating"), false);
    // `last_rotated` has a resolution of one second.
    std::thread::sleep(Duration::from_millis(1100));

    // During: between every step of the exchange.
    let o = alice.run(&["rotate", "bob"]);
    assert_code(&o, 0, "tern rotate bob");
    assert!(
        stderr(&o).contains("rotation of bob's queues started"),
        "{}",
        show(&o)
    );
    assert_eq!(field(&alice, "bob", "rotating"), true, "after tern rotate");
    assert_eq!(
        relay_queues(&r).len(),
        3,
        "the new queue exists on the relay"
    );
    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r]);
    let mut step = 0;
    loop {
        l.send(&alice, "bob", &bob, &format!("during {step}"));
        l.send(&bob, "alice", &alice, &format!("during {step}"));
        l.recv(&bob);
        l.send(&bob, "alice", &alice, &format!("during {step}b"));
        l.send(&alice, "bob", &bob, &format!("during {step}b"));
        l.recv(&alice);
        step += 1;
        let done = rotation_done(&alice, "bob")
            && rotation_done(&bob, "alice")
            && common(&relay_queues(&r), &before) == 0;
        if done {
            break;
        }
        assert!(step < 8, "the rotation does not complete\n{}", state());
    }
    // Bob's side completes with his next recv at the latest.
    l.recv(&bob);
    l.recv(&alice);

    // After.
    for i in 0..3 {
        l.send(&alice, "bob", &bob, &format!("after {i}"));
        l.send(&bob, "alice", &alice, &format!("after {i}"));
    }
    l.recv(&bob);
    l.recv(&alice);
    alice.recv_nothing();
    bob.recv_nothing();
    l.assert_all_printed_once(&[&alice, &bob]);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);

    for (p, name, was) in [(&alice, "bob", &rotated_a), (&bob, "alice", &rotated_b)] {
        let c = p.contact(name);
        assert_eq!(c["rotating"], false, "{}: {c}", p.display);
        assert_eq!(c["rekeying"], false, "{}: {c}", p.display);
        assert_eq!(c["state"], "connected", "{}: {c}", p.display);
        assert_eq!(c["pending_jobs"], 0, "{}: {c}", p.display);
        assert_ne!(
            &c["last_rotated"], was,
            "{}: last_rotated must change with the rotation: {c}",
            p.display
        );
    }
    // The old queues are gone from the relay, and as many as before remain.
    let after = relay_queues(&r);
    assert_eq!(common(&after, &before), 0, "no old queue is left");
    assert_eq!(after.len(), before.len(), "no queue leaked\n{}", state());
    // Nothing can be sent to the sender id of the invitation any more: no
    // queue has it.
    assert!(
        relay_sender_hashes(&r).is_disjoint(&old_sender),
        "the relay still has a queue for the invitation's sender id"
    );
}

// ---------------------------------------------------------------------------
// 2. Rotation with one relay down

#[test]
fn rotate_with_one_relay_down() {
    let r1 = Relay::start();
    let mut r2 = Relay::start();
    let alice = Profile::new("Alice", &[&r1, &r2]);
    let bob = Profile::new("Bob", &[&r1, &r2]);
    connect(&alice, "bob", &bob, "alice");
    let before1 = relay_queues(&r1);
    let before2 = relay_queues(&r2);
    assert_eq!((before1.len(), before2.len()), (2, 2));
    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "before");
    l.send(&bob, "alice", &alice, "before");
    l.recv(&bob);
    l.recv(&alice);

    r2.stop();
    l.send(&alice, "bob", &bob, "r2 down");
    l.send(&bob, "alice", &alice, "r2 down");
    let o = alice.run(&["rotate", "bob"]);
    assert_code(&o, 0, "rotate with one of two relays down");
    assert_eq!(field(&alice, "bob", "rotating"), true);
    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r1]);
    // Until both sides moved: rotating is over and the old queues on R1
    // are gone (those on R2 wait for it).
    let mut step = 0;
    loop {
        l.send(&alice, "bob", &bob, &format!("during {step}"));
        l.recv(&bob);
        l.send(&bob, "alice", &alice, &format!("during {step}"));
        l.recv(&alice);
        step += 1;
        let a = alice.contact("bob");
        let b = bob.contact("alice");
        if a["rotating"] == false
            && b["rotating"] == false
            && common(&relay_queues(&r1), &before1) == 0
        {
            break;
        }
        assert!(step < 8, "the rotation does not complete\n{}", state());
    }
    l.recv(&bob);
    l.recv(&alice);
    // Both now receive on R1 only (R2 could not create queues).
    for (p, name) in [(&alice, "bob"), (&bob, "alice")] {
        let ours = relays_of(p, name, "receive_relays");
        assert!(
            !ours.is_empty() && ours.iter().all(|x| x.starts_with(&label_port(&r1))),
            "{}: receives on {ours:?}",
            p.display
        );
    }
    // The conversation continues.
    for i in 0..2 {
        l.send(&alice, "bob", &bob, &format!("after {i}"));
        l.send(&bob, "alice", &alice, &format!("after {i}"));
    }
    l.recv(&bob);
    l.recv(&alice);
    l.assert_all_printed_once(&[&alice, &bob]);

    // R2 comes back: the retired queues there are drained and deleted.
    r2.restart();
    settle(
        &mut l,
        &[&alice, &bob],
        4,
        "deleting the retired queues on R2",
        || {
            relay_queues(&r2).is_empty()
                && rotation_done(&alice, "bob")
                && rotation_done(&bob, "alice")
        },
        || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r1, &r2]),
    );
    l.send(&alice, "bob", &bob, "r2 back");
    l.send(&bob, "alice", &alice, "r2 back");
    l.recv(&bob);
    l.recv(&alice);
    alice.recv_nothing();
    bob.recv_nothing();
    l.assert_all_printed_once(&[&alice, &bob]);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);
    let after1 = relay_queues(&r1);
    assert_eq!(common(&after1, &before1), 0);
    assert_eq!(after1.len(), 2, "one queue each way on R1\n{}", state());
    assert_eq!(common(&relay_queues(&r2), &before2), 0);
}

// ---------------------------------------------------------------------------
// 3. `tern relays remove`

#[test]
fn relays_remove_moves_connections_off_the_relay() {
    let r1 = Relay::start();
    let r2 = Relay::start();
    let alice = Profile::new("Alice", &[&r1, &r2]);
    let bob = Profile::new("Bob", &[&r1]);
    let carol = Profile::new("Carol", &[&r2]);

    // Connect step by step so as to know whose queues are whose on R1.
    let bob_r1 = connect_watching(&alice, "bob", &bob, "alice", &r1).joiner;
    connect(&alice, "carol", &carol, "alice");
    let all_r1 = relay_queues(&r1);
    // Alice receives from Bob and from Carol on R1, Bob receives on R1.
    assert_eq!(all_r1.len(), 3, "R1 before the removal");
    assert_eq!(bob_r1.len(), 1, "Bob's one receiving queue on R1");

    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "before");
    l.send(&bob, "alice", &alice, "before");
    l.send(&carol, "alice", &alice, "before");
    l.send(&alice, "carol", &carol, "before");
    for p in [&alice, &bob, &carol] {
        l.recv(p);
    }

    let o = alice.run(&["relays", "remove", &r1.addr]);
    assert_code(&o, 0, "relays remove R1");
    let err = stderr(&o);
    assert!(
        err.contains("2 connection(s) receive through it"),
        "the output says how many connections depend on R1:\n{err}"
    );
    assert!(
        err.contains("bob: moving") && err.contains("carol: moving"),
        "{err}"
    );
    let listed = alice.ok(&["relays"]);
    assert!(
        !listed.contains(&format!("127.0.0.1:{}", r1.port)),
        "R1 is no longer listed:\n{listed}"
    );
    // Messages sent while moving.
    l.send(&bob, "alice", &alice, "moving");
    l.send(&alice, "bob", &bob, "moving");
    l.send(&carol, "alice", &alice, "moving");

    let everyone = [&alice, &bob, &carol];
    let state = || {
        describe_state(
            &[
                (&alice, "bob"),
                (&alice, "carol"),
                (&bob, "alice"),
                (&carol, "alice"),
            ],
            &[&r1, &r2],
        )
    };
    settle(
        &mut l,
        &everyone,
        5,
        "moving off R1",
        || {
            rotation_done(&alice, "bob")
                && rotation_done(&alice, "carol")
                && relay_queues(&r1).len() == 1
        },
        state,
    );
    // R1 now holds only Bob's own receiving queue.
    assert_eq!(
        relay_queues(&r1),
        bob_r1,
        "only Bob's own receiving queue remains on R1\n{}",
        state()
    );
    for name in ["bob", "carol"] {
        let ours = relays_of(&alice, name, "receive_relays");
        assert!(
            ours.iter().all(|x| !x.starts_with(&label_port(&r1))) && !ours.is_empty(),
            "Alice receives from {name} on {ours:?}"
        );
    }
    assert!(relays_of(&bob, "alice", "send_relays")
        .iter()
        .all(|x| x.starts_with(&label_port(&r2))));

    // Messages still flow.
    l.send(&alice, "bob", &bob, "after");
    l.send(&bob, "alice", &alice, "after");
    l.send(&carol, "alice", &alice, "after");
    l.send(&alice, "carol", &carol, "after");
    for p in everyone {
        l.recv(p);
    }
    for p in everyone {
        p.recv_nothing();
    }
    l.assert_all_printed_once(&everyone);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&alice, "carol", &carol);
    l.assert_log_once(&bob, "alice", &alice);
    l.assert_log_once(&carol, "alice", &alice);
    assert_eq!(relay_queues(&r1), bob_r1);
}

/// Moving off a relay that dies half-way: Alice's only relay R1 takes the
/// peer's answer (QKEY), then dies before Bob switches. What Bob sends
/// meanwhile reaches no queue at all; once he learns of the switch it must
/// be re-aimed at the new queue, and arrive exactly once.
#[test]
fn moving_off_a_relay_that_dies_half_way() {
    let mut r1 = Relay::start();
    let r2 = Relay::start();
    let alice = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    let alice_r1 = connect_watching(&alice, "bob", &bob, "alice", &r1).inviter;
    assert_eq!(alice_r1.len(), 1);
    let bob_r2 = relay_queues(&r2);
    let mut l = Ledger::default();
    l.send(&bob, "alice", &alice, "before");
    l.recv(&alice);

    alice.ok(&["relays", "add", &r2.addr]);
    let o = alice.run(&["relays", "remove", &r1.addr]);
    assert_code(&o, 0, "relays remove R1");
    assert!(
        stderr(&o).contains("1 connection(s) receive through it"),
        "{}",
        show(&o)
    );
    assert_eq!(alice.contact("bob")["rotating"], true);
    l.recv(&bob); // QADD: Bob answers with his keys, through R1
    l.recv(&alice); // QKEY: Alice secures her queue on R2 and says QUSE
    assert_eq!(
        alice.contact("bob")["rotating"],
        false,
        "{}",
        alice.contact("bob")
    );

    // R1 dies before Bob has switched: his next messages reach nothing.
    r1.stop();
    let t1 = l.next_text(&bob, &alice, "r1 dead");
    let o = bob.run(&["send", "alice", &t1]);
    assert_code(&o, 75, "Bob's send to Alice's only (dead) relay");
    l.sent_anyway(&bob, &alice, &t1);
    // Bob's recv: QUSE switches him to Alice's queue on R2.
    l.recv(&bob);
    l.send(&bob, "alice", &alice, "switched");
    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r2]);
    settle(
        &mut l,
        &[&alice, &bob],
        3,
        "Bob's messages reach Alice's new queue",
        || bob.contact("alice")["pending_jobs"] == 0,
        state,
    );
    l.recv(&alice);
    l.assert_all_printed_once(&[&alice, &bob]);

    // R1 returns: Alice's retired queue there is drained and deleted.
    r1.restart();
    settle(
        &mut l,
        &[&alice, &bob],
        3,
        "deleting the retired queue on R1",
        || relay_queues(&r1).is_empty() && alice.contact("bob")["pending_jobs"] == 0,
        || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r1, &r2]),
    );
    l.send(&alice, "bob", &bob, "after");
    l.send(&bob, "alice", &alice, "after");
    l.recv(&alice);
    l.recv(&bob);
    alice.recv_nothing();
    bob.recv_nothing();
    l.assert_all_printed_once(&[&alice, &bob]);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);
    // R2 holds Bob's old queue and Alice's new one.
    let q2 = relay_queues(&r2);
    assert_eq!(q2.len(), 2);
    assert!(q2.is_superset(&bob_r2));
}

// ---------------------------------------------------------------------------
// 4. Re-key through a PNG and through a link

fn code(p: &Profile, name: &str) -> String {
    p.ok(&["verify", name]).trim().to_string()
}

#[test]
fn rekey_via_png_and_link() {
    let r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    let eve = Profile::new("Eve", &[&r]);
    connect(&alice, "bob", &bob, "alice");
    connect(&eve, "alice", &alice, "eve");
    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "old keys");
    l.send(&bob, "alice", &alice, "old keys");
    l.recv(&bob);
    l.recv(&alice);
    let mut codes = vec![code(&alice, "bob")];
    assert_eq!(code(&bob, "alice"), codes[0]);
    let eve_before = eve.snapshot();
    let dir = tempfile::tempdir().unwrap();

    for (round, via_png) in [(1, true), (2, false)] {
        let before = relay_queues(&r);
        // The invitation.
        let png = dir.path().join(format!("rekey{round}.png"));
        let link = if via_png {
            let out = alice.ok(&["invite", "--rekey", "bob", "--png", png.to_str().unwrap()]);
            assert!(png.is_file(), "invite --png writes the file");
            assert_eq!(out, "", "nothing on stdout with --png alone");
            None
        } else {
            let out = alice.ok(&["invite", "--rekey", "bob", "--link"]);
            let link = out.trim().to_string();
            assert!(link.starts_with("TERN:"), "{link:?}");
            Some(link)
        };
        let accept_args: Vec<String> = match &link {
            Some(k) => vec!["accept".into(), k.clone()],
            None => vec![
                "accept".into(),
                "--image".into(),
                png.to_str().unwrap().into(),
            ],
        };
        let accept_args: Vec<&str> = accept_args.iter().map(String::as_str).collect();
        assert_eq!(alice.contact("bob")["rekeying"], true);

        // Sent after the invitation was made, before Bob accepts.
        l.send(&alice, "bob", &bob, &format!("rekey{round} before accept"));
        l.send(
            &bob,
            "alice",
            &alice,
            &format!("rekey{round} before accept"),
        );

        // Eve cannot use it; nothing changes for her (nor on the relay).
        let queues = relay_queues(&r);
        let o = eve.run(&accept_args);
        assert_code(&o, 6, "Eve accepting Bob's re-key invitation");
        assert_eq!(eve.snapshot(), eve_before, "Eve's profile is unchanged");
        assert_eq!(relay_queues(&r), queues, "Eve's refusal created no queue");

        let o = bob.run(&accept_args);
        assert_code(&o, 0, "Bob accepting the re-key invitation");
        assert_eq!(bob.contact("alice")["rekeying"], true);
        assert_eq!(bob.contact("alice")["name"], "alice", "the contact is kept");

        // Accepting it again fails cleanly and changes nothing.
        let snap = bob.snapshot();
        let queues = relay_queues(&r);
        let o = bob.run(&accept_args);
        assert!(
            matches!(o.status.code(), Some(2) | Some(6)),
            "a second accept of the same re-key invitation must fail with a usage or \
             invitation error\n{}",
            show(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", show(&o));
        assert_eq!(bob.snapshot(), snap, "the failed accept changed nothing");
        assert_eq!(relay_queues(&r), queues);

        // Sent after Bob accepted, before the re-key completed.
        l.send(&alice, "bob", &bob, &format!("rekey{round} after accept"));
        l.send(&bob, "alice", &alice, &format!("rekey{round} after accept"));

        let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r]);
        let mut step = 0;
        loop {
            l.recv(&alice);
            l.send(&alice, "bob", &bob, &format!("rekey{round} during {step}"));
            l.recv(&bob);
            l.send(
                &bob,
                "alice",
                &alice,
                &format!("rekey{round} during {step}"),
            );
            step += 1;
            let a = alice.contact("bob");
            let b = bob.contact("alice");
            if a["rekeying"] == false
                && b["rekeying"] == false
                && a["pending_jobs"] == 0
                && b["pending_jobs"] == 0
                && a["state"] == "connected"
                && b["state"] == "connected"
                && common(&relay_queues(&r), &before) == 2
            {
                break;
            }
            assert!(step < 8, "the re-key does not complete\n{}", state());
        }
        l.recv(&alice);
        l.recv(&bob);
        // Only Eve's connection with Alice kept its queues; the old ones of
        // Alice and Bob are gone and no queue leaked.
        let after = relay_queues(&r);
        assert_eq!(common(&after, &before), 2, "{}", state());
        assert_eq!(after.len(), before.len(), "no queue leaked\n{}", state());

        // New keys: a new security code, the same on both sides.
        let c = code(&alice, "bob");
        assert_eq!(code(&bob, "alice"), c, "round {round}: codes match");
        assert!(
            !codes.contains(&c),
            "round {round}: the security code must change with a re-key"
        );
        codes.push(c);

        // After a completed re-key the invitation is useless to Bob too.
        let snap = bob.snapshot();
        let o = bob.run(&accept_args);
        assert!(
            matches!(o.status.code(), Some(2) | Some(6)),
            "accepting a used re-key invitation\n{}",
            show(&o)
        );
        assert_eq!(bob.snapshot(), snap);

        l.send(&alice, "bob", &bob, &format!("rekey{round} done"));
        l.send(&bob, "alice", &alice, &format!("rekey{round} done"));
        l.recv(&bob);
        l.recv(&alice);
        alice.recv_nothing();
        bob.recv_nothing();
        l.assert_all_printed_once(&[&alice, &bob]);
        // The history is kept, old messages included.
        l.assert_log_once(&alice, "bob", &bob);
        l.assert_log_once(&bob, "alice", &alice);
    }
    // Eve's own conversation with Alice is untouched.
    l.send(&eve, "alice", &alice, "still here");
    l.send(&alice, "eve", &eve, "still here");
    l.recv(&alice);
    l.recv(&eve);
    l.assert_all_printed_once(&[&alice, &bob, &eve]);
}

/// Alice makes a re-key invitation, then another one, which replaces the
/// first (PROTOCOL.md §11.2 step 1). Bob uses the first. Either that is
/// refused cleanly (and Bob can use the second), or the re-key completes;
/// in no case may Bob be left half-way, his messages held back for good.
#[test]
fn rekey_with_a_replaced_invitation() {
    let r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&alice, "bob", &bob, "alice");
    let before = relay_queues(&r);
    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "old keys");
    l.send(&bob, "alice", &alice, "old keys");
    l.recv(&bob);
    l.recv(&alice);

    let first = alice.ok(&["invite", "--rekey", "bob", "--link"]);
    let second = alice.ok(&["invite", "--rekey", "bob", "--link"]);
    let snap = bob.snapshot();
    let o = bob.run(&["accept", first.trim()]);
    if !o.status.success() {
        assert!(
            matches!(o.status.code(), Some(2) | Some(6)),
            "refusing a replaced re-key invitation\n{}",
            show(&o)
        );
        assert_eq!(bob.snapshot(), snap, "the refusal changed nothing");
        let o = bob.run(&["accept", second.trim()]);
        assert_code(&o, 0, "accepting the current re-key invitation");
    }
    l.send(&bob, "alice", &alice, "after accepting");
    l.send(&alice, "bob", &bob, "after accepting");
    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r]);
    settle(
        &mut l,
        &[&alice, &bob],
        5,
        "the re-key completes (or never began) and Bob's messages go out",
        || {
            [(&alice, "bob"), (&bob, "alice")].iter().all(|(p, n)| {
                let c = p.contact(n);
                c["state"] == "connected" && c["rekeying"] == false && c["pending_jobs"] == 0
            })
        },
        state,
    );
    l.send(&bob, "alice", &alice, "later");
    l.recv(&alice);
    l.recv(&bob);
    l.assert_all_printed_once(&[&alice, &bob]);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);
    assert_eq!(
        relay_queues(&r).len(),
        before.len(),
        "the replaced invitation's queue must not stay on the relay for ever\n{}",
        state()
    );
}

// ---------------------------------------------------------------------------
// 5. Crashes in the middle of a rotation

#[test]
fn crash_in_the_middle_of_a_rotation() {
    let mut r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&alice, "bob", &bob, "alice");
    let before = relay_queues(&r);
    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "before");
    l.send(&bob, "alice", &alice, "before");
    l.recv(&bob);
    l.recv(&alice);

    // Bob follows; Alice starts a rotation of both directions and writes.
    let mut follow = bob.follow();
    let o = alice.run(&["rotate", "bob"]);
    assert_code(&o, 0, "rotate");
    let d1 = l.send(&alice, "bob", &bob, "during 1");
    let (got, all) = follow.next_messages(1);
    assert_eq!(got, vec![d1], "{all:?}");
    l.record_killed(&bob, &all);
    l.send(&alice, "bob", &bob, "during 2");
    // SIGKILL Bob's follower while it works on the exchange.
    let rest: Vec<Value> = follow
        .pending_lines()
        .iter()
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect();
    follow.kill();
    l.record_killed(&bob, &rest);

    // Both sides' recvs killed at a sweep of points (a plain recv takes
    // some tens of milliseconds here), with messages in between; once Bob
    // also starts a rotation of his own with `tern rotate`, killed too
    // (it may or may not have begun, and abandons the one under way).
    for (i, ms) in [10u64, 20, 30, 40, 50, 60, 75, 90, 110, 140]
        .into_iter()
        .enumerate()
    {
        let (from, to, to_name) = if i % 2 == 0 {
            (&bob, &alice, "alice")
        } else {
            (&alice, &bob, "bob")
        };
        l.send(from, to_name, to, &format!("during {i}"));
        let ev = run_killed(to, &["recv", "--json"], Duration::from_millis(ms));
        l.record_killed(to, &ev);
        let ev = run_killed(from, &["recv", "--json"], Duration::from_millis(ms + 5));
        l.record_killed(from, &ev);
        if i == 4 {
            run_killed(&bob, &["rotate", "alice"], Duration::from_millis(40));
        }
    }

    // The relay dies between steps.
    r.stop();
    let t = l.next_text(&alice, &bob, "relay down");
    let o = alice.run(&["send", "bob", &t]);
    assert_code(&o, 75, "send with the only relay down");
    l.sent_anyway(&alice, &bob, &t);
    let o = bob.run(&["recv", "--json"]);
    assert_code(&o, 75, "recv with the only relay down");
    r.restart();
    let ev = run_killed(&bob, &["recv", "--json"], Duration::from_millis(60));
    l.record_killed(&bob, &ev);
    l.send(&bob, "alice", &alice, "relay back");

    // Then plain recvs until both rotations complete: every step was stored
    // before it was acted on, so nothing stalls.
    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r]);
    let mut step = 0;
    loop {
        l.recv(&bob);
        l.recv(&alice);
        step += 1;
        let done = rotation_done(&alice, "bob")
            && rotation_done(&bob, "alice")
            && common(&relay_queues(&r), &before) == 0;
        if done {
            break;
        }
        assert!(step < 8, "the rotation does not complete\n{}", state());
    }
    l.recv(&bob);
    l.recv(&alice);
    l.send(&alice, "bob", &bob, "after");
    l.send(&bob, "alice", &alice, "after");
    l.recv(&bob);
    l.recv(&alice);
    alice.recv_nothing();
    bob.recv_nothing();

    // Both stores open, every message is in each history exactly once, and
    // no message was printed twice (checked as they were recorded).
    for (p, name) in [(&alice, "bob"), (&bob, "alice")] {
        let c = p.contact(name);
        assert_eq!(c["state"], "connected", "{}: {c}", p.display);
        assert_eq!(c["rotating"], false, "{}: {c}", p.display);
    }
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);
    let after = relay_queues(&r);
    assert_eq!(common(&after, &before), 0, "the old queues are gone");
}

// ---------------------------------------------------------------------------
// 6. Automatic rotation with an injected clock

#[test]
fn automatic_rotation_with_an_injected_clock() {
    let r = Relay::start();
    let alice = Profile::new("Alice", &[&r]);
    let bob = Profile::new("Bob", &[&r]);
    connect(&alice, "bob", &bob, "alice");
    let before = relay_queues(&r);
    let mut l = Ledger::default();
    l.send(&alice, "bob", &bob, "before");
    l.recv(&bob);
    let rotated = field(&alice, "bob", "last_rotated");

    // One day later: nothing is due.
    for args in [&["recv", "--json"][..], &["send", "bob", "a day later"]] {
        let o = run_at(&alice, DAY_SECS, args);
        assert_code(&o, 0, &format!("{args:?} a day later"));
        if args[0] == "send" {
            l.sent_anyway(&alice, &bob, "a day later");
        } else {
            l.record(&alice, &json_lines(&stdout(&o)));
        }
    }
    assert_eq!(
        field(&alice, "bob", "rotating"),
        false,
        "nothing rotates after a day"
    );
    assert_eq!(field(&alice, "bob", "last_rotated"), rotated);
    assert_eq!(relay_queues(&r), before, "no new queue after a day");
    l.recv(&bob);
    assert_eq!(field(&bob, "alice", "rotating"), false);
    assert_eq!(relay_queues(&r), before);

    // Ten days later (more than 7 days plus 25% jitter): a rotation starts.
    let later = 10 * DAY_SECS;
    let o = run_at(&alice, later, &["recv", "--json"]);
    assert_code(&o, 0, "recv ten days later");
    l.record(&alice, &json_lines(&stdout(&o)));
    assert_eq!(
        field(&alice, "bob", "rotating"),
        true,
        "a rotation started by itself\n{}",
        show(&o)
    );
    assert_eq!(relay_queues(&r).len(), before.len() + 1, "its new queue");

    let state = || describe_state(&[(&alice, "bob"), (&bob, "alice")], &[&r]);
    let mut step = 0;
    loop {
        l.send(&bob, "alice", &alice, &format!("during {step}"));
        l.recv(&bob);
        let t = l.next_text(&alice, &bob, &format!("during {step}"));
        let o = run_at(&alice, later, &["send", "bob", &t]);
        assert_code(&o, 0, "send ten days later");
        l.sent_anyway(&alice, &bob, &t);
        let o = run_at(&alice, later, &["recv", "--json"]);
        assert_code(&o, 0, "recv ten days later");
        l.record(&alice, &json_lines(&stdout(&o)));
        step += 1;
        let q = relay_queues(&r);
        if rotation_done(&alice, "bob") && q.len() == before.len() && common(&q, &before) == 1 {
            break;
        }
        assert!(
            step < 6,
            "the automatic rotation does not complete\n{}",
            state()
        );
    }
    assert_ne!(
        field(&alice, "bob", "last_rotated"),
        rotated,
        "last_rotated moved with the automatic rotation"
    );
    // Only Alice's direction moved: Bob's receiving queue is the old one.
    assert_eq!(common(&relay_queues(&r), &before), 1);

    // It does not start again at once: the next one is a week away.
    let settled = relay_queues(&r);
    for _ in 0..2 {
        l.recv(&bob);
        let o = run_at(&alice, later, &["recv", "--json"]);
        assert_code(&o, 0, "recv ten days later");
        l.record(&alice, &json_lines(&stdout(&o)));
        assert_eq!(
            field(&alice, "bob", "rotating"),
            false,
            "no second rotation"
        );
    }
    assert_eq!(relay_queues(&r), settled, "no queue moved again");

    l.send(&bob, "alice", &alice, "after");
    let o = run_at(&alice, later, &["recv", "--json"]);
    assert_code(&o, 0, "recv");
    l.record(&alice, &json_lines(&stdout(&o)));
    l.recv(&bob);
    l.assert_all_printed_once(&[&alice, &bob]);
    l.assert_log_once(&alice, "bob", &bob);
    l.assert_log_once(&bob, "alice", &alice);
}
