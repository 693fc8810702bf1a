//! Several devices per profile, end to end on real relays with three homes:
//! Alice's laptop, Alice's server and Bob.

mod cli_common;

use cli_common::*;
use serde_json::Value;

/// `recv --json` on each profile in turn, `rounds` times; every event each
/// one printed, per profile.
fn settle(profiles: &[&Profile], rounds: usize) -> Vec<Vec<Value>> {
    let mut all = vec![Vec::new(); profiles.len()];
    for _ in 0..rounds {
        for (i, p) in profiles.iter().enumerate() {
            all[i].extend(p.recv());
        }
    }
    all
}

fn messages(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["contact"].as_str().unwrap().to_string(),
                e["direction"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn log_texts(p: &Profile, contact: &str) -> Vec<(String, String)> {
    p.log(contact)
        .iter()
        .map(|e| {
            (
                e["direction"].as_str().unwrap().to_string(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn devices(p: &Profile) -> Vec<Value> {
    json_lines(&p.ok(&["device", "list", "--json"]))
}

fn m(contact: &str, dir: &str, text: &str) -> (String, String, String) {
    (contact.into(), dir.into(), text.into())
}

struct World {
    _relays: Vec<Relay>,
    laptop: Profile,
    server: Profile,
    bob: Profile,
}

/// Alice (laptop) and Bob connected on separate relays, one message each
/// way; then Alice links her server and everything settles.
fn linked_world() -> World {
    let (r1, r2) = (Relay::start(), Relay::start());
    let laptop = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    connect(&laptop, "bob", &bob, "alice");
    laptop.send("bob", "before the link, from the laptop");
    bob.send("alice", "before the link, from Bob");
    assert_eq!(laptop.recv_texts(), vec!["before the link, from Bob"]);
    bob.recv();

    let link = laptop.ok(&["device", "link", "--link", "--name", "laptop"]);
    let link = link.trim();
    assert!(link.starts_with("TERN:"), "{link}");
    // A contact invitation is not a device link, and the other way round.
    let o = bob.run(&["accept", link]);
    assert_code(&o, 6, "accept of a device link");
    let server = Profile::empty("Alice-server");
    server.ok(&[
        "device",
        "join",
        link,
        "--name",
        "server",
        "--no-passphrase",
    ]);
    // A plain recv never links a device (PROTOCOL.md §12.2): the user
    // confirms it on the laptop.
    laptop.ok(&["device", "confirm", "--yes"]);
    // Handshake with the laptop (2 rounds), profile and history, the
    // server's invitation forwarded to Bob, Bob's handshake with the server.
    settle(&[&laptop, &server, &bob], 5);
    World {
        _relays: vec![r1, r2],
        laptop,
        server,
        bob,
    }
}

#[test]
fn a_linked_device_gets_profile_contacts_and_history_and_both_see_everything_once() {
    let w = linked_world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);

    // The server has the profile, the contact and the history.
    let names: Vec<Value> = devices(server).iter().map(|d| d["name"].clone()).collect();
    assert_eq!(names, vec!["server", "laptop"], "{:?}", devices(server));
    assert_eq!(devices(laptop)[1]["state"], "connected");
    assert_eq!(server.contact("bob")["state"], "connected");
    assert_eq!(
        log_texts(server, "bob"),
        vec![
            ("out".into(), "before the link, from the laptop".into()),
            ("in".into(), "before the link, from Bob".into()),
        ]
    );
    // Bob sees one contact, with two devices, and the same security code.
    let bc = bob.contacts();
    assert_eq!(bc.len(), 1, "{bc:?}");
    assert_eq!(bc[0]["name"], "alice");
    assert_eq!(bc[0]["devices"], 2);
    // Each pair of devices has its own code, the same at both ends; a
    // device never takes another's (PROTOCOL.md §12.7): Bob lists one code
    // per device of Alice, and each of her devices shows its own.
    let (on_laptop, on_server) = (laptop.ok(&["verify", "bob"]), server.ok(&["verify", "bob"]));
    assert_ne!(on_laptop, on_server, "each device has a code of its own");
    let bobs: Vec<String> = bob
        .ok(&["verify", "alice"])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(bobs.len(), 2, "{bobs:?}");
    for code in [&on_laptop, &on_server] {
        assert!(
            bobs.contains(&code.trim().to_string()),
            "{code} in {bobs:?}"
        );
    }
    assert_eq!(server.contact("bob")["security"], "introduced");

    // Bob to Alice: each of her devices gets it exactly once.
    bob.send("alice", "hello both of you");
    assert_eq!(
        messages(&laptop.recv()),
        vec![m("bob", "in", "hello both of you")]
    );
    assert_eq!(
        messages(&server.recv()),
        vec![m("bob", "in", "hello both of you")]
    );
    laptop.recv_nothing();
    server.recv_nothing();

    // Alice from either device: Bob sees one contact; the other device sees
    // what was sent.
    server.send("bob", "from the server");
    laptop.send("bob", "from the laptop");
    // Two connections, two queues: the order between them is the relays'.
    let mut got = messages(&bob.recv());
    got.sort();
    assert_eq!(
        got,
        vec![
            m("alice", "in", "from the laptop"),
            m("alice", "in", "from the server")
        ]
    );
    assert_eq!(
        messages(&laptop.recv()),
        vec![m("bob", "out", "from the server")]
    );
    assert_eq!(
        messages(&server.recv()),
        vec![m("bob", "out", "from the laptop")]
    );
    bob.recv_nothing();
    laptop.recv_nothing();
    server.recv_nothing();

    let expected: Vec<(String, String)> = vec![
        ("out".into(), "before the link, from the laptop".into()),
        ("in".into(), "before the link, from Bob".into()),
        ("in".into(), "hello both of you".into()),
        ("out".into(), "from the server".into()),
        ("out".into(), "from the laptop".into()),
    ];
    assert_eq!(log_texts(laptop, "bob"), expected);
    assert_eq!(log_texts(server, "bob"), expected);
}

#[test]
fn a_removed_device_receives_nothing_new_even_before_contacts_hear_of_it() {
    let w = linked_world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    bob.send("alice", "still three of us");
    assert_eq!(server.recv_texts(), vec!["still three of us"]);
    laptop.recv();

    assert_code(
        &laptop.run(&["device", "remove", "no-such-device"]),
        3,
        "device remove of an unknown device",
    );
    let contact_link = bob.ok(&["invite", "--link", "--name", "someone"]);
    let stranger = Profile::empty("stranger");
    assert_code(
        &stranger.run(&["device", "join", contact_link.trim(), "--no-passphrase"]),
        6,
        "device join of a contact invitation",
    );
    assert!(!stranger.home.exists(), "a refused join creates nothing");
    bob.ok(&["forget", "someone", "--yes"]);
    let rotated_before = laptop.contact("bob")["last_rotated"].clone();
    assert_code(
        &server.run(&["device", "remove", "laptop"]),
        2,
        "a device cannot remove its elder",
    );
    let out = laptop.run(&["device", "remove", "server"]);
    assert_code(&out, 0, "device remove");
    // Bob has not run `recv` yet: his tern still sends to the server's
    // connection, whose queues are gone.
    bob.send("alice", "after the removal");
    let o = server.run(&["recv", "--json"]);
    let got = json_lines(&stdout(&o));
    assert!(
        messages(&got).is_empty(),
        "the removed device must get nothing: {got:?}\n{}",
        show(&o)
    );
    assert_eq!(laptop.recv_texts(), vec!["after the removal"]);
    // Once Bob's tern hears of it, the contact has one device again, and
    // the server cannot send as Alice any more.
    bob.recv();
    assert_eq!(bob.contact("alice")["devices"], 1);
    let _ = server.run(&["send", "bob", "I was removed"]);
    assert!(messages(&bob.recv()).is_empty());
    assert_eq!(devices(laptop).len(), 1, "{:?}", devices(laptop));
    // Life goes on for the others.
    laptop.send("bob", "just the laptop now");
    assert_eq!(bob.recv_texts(), vec!["just the laptop now"]);
    // The server, younger, was never given the keys of the laptop's queues
    // (only those of their own device connection), so the laptop need not
    // move; and it could not remove the laptop, its elder, in return.
    assert_eq!(laptop.contact("bob")["last_rotated"], rotated_before);
    // The server was told it was removed (issue 19 item 3; before, it kept
    // listing the laptop as connected): it says so and lists no device.
    let server_view = devices(server);
    assert_eq!(server_view[0]["state"], "removed", "{server_view:?}");
    assert_eq!(server_view.len(), 1, "{server_view:?}");
    assert_code(
        &server.run(&["device", "remove", "laptop"]),
        3,
        "the removed device no longer knows the laptop",
    );
    bob.send("alice", "still reaching the laptop");
    assert_eq!(laptop.recv_texts(), vec!["still reaching the laptop"]);
}

#[test]
fn linking_while_messages_are_in_flight_and_a_device_catching_up_later() {
    let (r1, r2, r3) = (Relay::start(), Relay::start(), Relay::start());
    let laptop = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    connect(&laptop, "bob", &bob, "alice");
    // Its first queues on a relay of its own (as when the profile's relays
    // need an access key); the profile's relay list replaces it.
    let server = join_server(&laptop, &["--relay", &r3.addr]);
    laptop.ok(&["device", "confirm", "--yes"]);
    // Messages while the devices are still introducing themselves.
    bob.send("alice", "in flight 1");
    laptop.ok(&["recv"]);
    bob.send("alice", "in flight 2");
    server.ok(&["recv"]);
    laptop.send("bob", "in flight 3");
    bob.ok(&["recv"]);
    bob.send("alice", "in flight 4");
    let all = settle(&[&laptop, &server, &bob], 5);
    let server_texts: Vec<String> = messages(&all[1]).into_iter().map(|m| m.2).collect();
    for t in ["in flight 1", "in flight 2", "in flight 3", "in flight 4"] {
        let n = server_texts.iter().filter(|s| *s == t).count()
            + log_texts(&server, "bob")
                .iter()
                .filter(|(_, s)| s == t)
                .count();
        assert!(n >= 1, "{t} reached the server: {server_texts:?}");
    }
    let server_log: Vec<String> = log_texts(&server, "bob").into_iter().map(|e| e.1).collect();
    let mut sorted = server_log.clone();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        server_log.len(),
        "no duplicates: {server_log:?}"
    );
    assert_eq!(server_log.len(), 4, "{server_log:?}");

    // The server is offline a while; the others go on.
    for i in 0..5 {
        bob.send("alice", &format!("while away {i}"));
    }
    laptop.send("bob", "laptop while server away");
    laptop.recv();
    bob.recv();
    let got = messages(&server.recv());
    let mut want: Vec<(String, String, String)> = (0..5)
        .map(|i| m("bob", "in", &format!("while away {i}")))
        .collect();
    want.push(m("bob", "out", "laptop while server away"));
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want, "{got:?}");
    server.recv_nothing();
    // The server now lists the profile's relays.
    let relays = json_lines(&server.ok(&["relays", "--json"]));
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert_eq!(relays[0]["address"], r1.addr.as_str(), "{relays:?}");
}

/// Links `new` to `existing` through a PNG device link scanned with
/// `--image`, and lets the two settle with `others`.
fn link_by_png(existing: &Profile, new: &Profile, name: &str, others: &[&Profile]) {
    let png = existing.sandbox().join("device-link.png");
    existing.ok(&["device", "link", "--png", png.to_str().unwrap()]);
    new.ok(&[
        "device",
        "join",
        "--image",
        png.to_str().unwrap(),
        "--name",
        name,
        "--no-passphrase",
    ]);
    existing.ok(&["device", "confirm", "--yes"]);
    let mut all = vec![existing, new];
    all.extend_from_slice(others);
    settle(&all, 5);
}

#[test]
fn two_people_with_two_devices_each_get_one_connection_per_pair_of_devices() {
    let (r1, r2) = (Relay::start(), Relay::start());
    let laptop = Profile::new("Alice", &[&r1]);
    let server = Profile::empty("Alice-server");
    let phone = Profile::new("Bob", &[&r2]);
    let desk = Profile::empty("Bob-desk");
    link_by_png(&laptop, &server, "server", &[]);
    link_by_png(&phone, &desk, "desk", &[]);
    assert!(desk.ok(&["profile", "--json"]).contains("\"Bob\""));

    // Alice's laptop invites Bob's phone; their other devices meet each
    // other and everyone else by themselves.
    connect(&laptop, "bob", &phone, "alice");
    settle(&[&laptop, &server, &phone, &desk], 6);
    for (p, contact) in [
        (&laptop, "bob"),
        (&server, "bob"),
        (&phone, "alice"),
        (&desk, "alice"),
    ] {
        let c = p.contacts();
        assert_eq!(c.len(), 1, "{}: {c:?}", p.display);
        assert_eq!(c[0]["name"], contact, "{}: {c:?}", p.display);
        assert_eq!(
            c[0]["devices"], 2,
            "{}: exactly one connection per device of the contact: {c:?}",
            p.display
        );
        assert_eq!(c[0]["state"], "connected", "{}: {c:?}", p.display);
    }

    // Any device to the three others, each once.
    let people = [
        (&laptop, "bob", "Alice"),
        (&server, "bob", "Alice"),
        (&phone, "alice", "Bob"),
        (&desk, "alice", "Bob"),
    ];
    for (i, (sender, to, _)) in people.iter().enumerate() {
        let text = format!("from {}", sender.display);
        sender.send(to, &text);
        for (j, (other, other_to, _)) in people.iter().enumerate() {
            if i == j {
                continue;
            }
            let dir = if people[j].2 == people[i].2 {
                "out"
            } else {
                "in"
            };
            assert_eq!(
                messages(&other.recv()),
                vec![m(other_to, dir, &text)],
                "{} → {}",
                sender.display,
                other.display
            );
        }
    }
    for (p, _, _) in people {
        p.recv_nothing();
    }

    // A new profile name reaches the other device too.
    laptop.ok(&["profile", "--name", "Alice L."]);
    server.recv();
    assert!(server.ok(&["profile", "--json"]).contains("Alice L."));
}

#[test]
fn link_and_join_can_wait_for_each_other_instead_of_recv_by_hand() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Duration;

    let (r1, r2) = (Relay::start(), Relay::start());
    let laptop = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    connect(&laptop, "bob", &bob, "alice");
    bob.send("alice", "history before the link");
    laptop.recv();

    let mut link_cmd = laptop.cmd(&["device", "link", "--link", "--wait", "60"]);
    link_cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut linking = link_cmd.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(linking.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let server = Profile::empty("Alice-server");
    server.ok(&[
        "device",
        "join",
        first.trim(),
        "--name",
        "server",
        "--no-passphrase",
        "--wait",
        "60",
    ]);
    let status = wait_guarded(&mut linking, Duration::from_secs(60), "device link --wait");
    assert!(status.success(), "device link --wait exits 0 once linked");
    // Both sides are done: the server has the contact and the history.
    assert_eq!(
        log_texts(&server, "bob"),
        vec![("in".to_string(), "history before the link".to_string())]
    );
    // Bob's tern meets the server: request, reply, confirmation.
    bob.recv();
    server.recv();
    bob.recv();
    bob.send("alice", "to both, with no recv by hand in between");
    assert_eq!(
        server.recv_texts(),
        vec!["to both, with no recv by hand in between"]
    );
    assert_eq!(
        laptop.recv_texts(),
        vec!["to both, with no recv by hand in between"]
    );
    assert_eq!(server.contact("bob")["state"], "connected");
}
