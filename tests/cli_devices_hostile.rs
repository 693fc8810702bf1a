//! Hostile and careless devices (issue 14 items 1–3, issue 19 items 3 and
//! 17): a linked device that lies in GROUP, SETTINGS, SIBLING, HISTORY,
//! COPY and OFFER; device links used after expiry, after revocation, and
//! answered while only a cron-style `tern recv` runs; what goes with a
//! removed device; a removed device learning of it; `forget` across
//! devices; contact invitations that expire or are revoked.
//!
//! Everything runs the real binary on real relays (127.0.0.1). The hostile
//! device is Alice's younger server: the test opens its profile with the
//! library and forges device messages inside its real, authenticated
//! device connection with the laptop, as a patched tern would.

mod cli_common;

use std::time::Duration;

use cli_common::*;
use data_encoding::HEXLOWER;
use serde_json::Value;
use tern::client::jobs::flush_outbox;
use tern::client::model::{Contact, Queued};
use tern::client::{now, random_id, Client};
use tern::proto::device::{DeviceMsg, Entry};
use tern::proto::envelope::Kind;
use tern::store::KeySource;

fn open(p: &Profile) -> Client {
    Client::open(&p.home, KeySource::Unprotected, None).expect("open the profile")
}

/// Sends `msg` from `p` to its device `device`, inside their connection.
fn forge(p: &Profile, device: &str, msg: &DeviceMsg) {
    let mut client = open(p);
    let id = client.device_id(device).unwrap();
    client
        .update_contact(&id, |_, c: &mut Contact| {
            c.outbox.push(Queued {
                kind: Kind::Device,
                id: random_id(),
                body: msg.encode(),
                created_ms: now(),
            });
            flush_outbox(c, now())
        })
        .unwrap();
    let report = client.run_jobs(&id).unwrap();
    assert_eq!(report.waiting, 0, "the forged message went out");
}

/// `p`'s id of the contact `name` (one of its connections).
fn contact_id(p: &Profile, name: &str) -> String {
    open(p).contact_id(name).unwrap()
}

/// `p`'s group id of the contact `name`.
fn group_of(p: &Profile, name: &str) -> [u8; 16] {
    let client = open(p);
    let id = client.contact_id(name).unwrap();
    let group = client.contact(&id).unwrap().group().to_string();
    HEXLOWER
        .decode(group.as_bytes())
        .unwrap()
        .try_into()
        .unwrap()
}

fn id_bytes(id: &str) -> [u8; 16] {
    HEXLOWER.decode(id.as_bytes()).unwrap().try_into().unwrap()
}

fn devices(p: &Profile) -> Vec<Value> {
    json_lines(&p.ok(&["device", "list", "--json"]))
}

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

fn names(p: &Profile) -> Vec<String> {
    let mut n: Vec<String> = p
        .contacts()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// `recv` on each profile in turn, `rounds` times; what each printed on
/// stderr, concatenated.
fn settle(profiles: &[&Profile], rounds: usize) -> Vec<String> {
    let mut err = vec![String::new(); profiles.len()];
    for _ in 0..rounds {
        for (i, p) in profiles.iter().enumerate() {
            let o = p.run(&["recv", "--json"]);
            assert!(
                matches!(o.status.code(), Some(0) | Some(75)),
                "{}: {}",
                p.display,
                show(&o)
            );
            err[i].push_str(&stderr(&o));
        }
    }
    err
}

fn log_texts(p: &Profile, contact: &str) -> Vec<String> {
    p.log(contact)
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect()
}

struct World {
    relays: Vec<Relay>,
    laptop: Profile,
    server: Profile,
    bob: Profile,
}

/// Alice's laptop and Bob, connected and verified on the laptop; the
/// laptop links Alice's server (confirmed by the user), and all settles.
fn world() -> World {
    let relays = vec![Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[1]]);
    connect(&laptop, "bob", &bob, "alice");
    let code = laptop.ok(&["verify", "bob"]);
    laptop.ok(&["verify", "bob", code.trim()]);
    bob.ok(&["verify", "alice", code.trim()]);
    laptop.send("bob", "before the link");
    bob.recv();
    let server = join_server(&laptop, &[]);
    laptop.ok(&["device", "confirm", "--yes"]);
    settle(&[&laptop, &server, &bob], 5);
    assert_eq!(bob.contact("alice")["devices"], 2);
    assert_eq!(server.contact("bob")["state"], "connected");
    assert_eq!(
        other_devices(&laptop),
        vec![("server".to_string(), "connected".to_string())]
    );
    World {
        relays,
        laptop,
        server,
        bob,
    }
}

// ---------------------------------------------------------------------------
// Item 1: GROUP

/// The reviewer's attack: the younger server reuses Bob's group id and
/// introduces Mallory (its own contact) as one more device of Bob's. The
/// laptop must not take its word for a contact it does not rest on: Bob
/// keeps one device there, verified, and Mallory's text never shows as
/// Bob's.
#[test]
fn a_younger_device_cannot_add_a_fake_device_to_a_contact_of_its_elder() {
    let w = world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    let mallory = Profile::new("Mallory", &[&w.relays[1]]);
    connect(server, "mallory", &mallory, "alice");
    settle(&[laptop, server, &mallory, bob], 4);
    let before = laptop.contact("bob");
    assert_eq!(before["devices"], 1);
    assert_eq!(before["security"], "verified");

    forge(
        server,
        "laptop",
        &DeviceMsg::Group {
            group: group_of(laptop, "bob"),
            name: "bob".into(),
            introduce: false,
            members: vec![id_bytes(&contact_id(server, "mallory"))],
        },
    );
    let err = settle(&[laptop, server, &mallory, bob], 4);
    assert!(
        err[0].contains("no say over"),
        "the laptop says it refused: {}",
        err[0]
    );
    let after = laptop.contact("bob");
    assert_eq!(after["devices"], 1, "no planted device: {after}");
    assert_eq!(after["security"], "verified", "{after}");
    mallory.send("alice", "I am Bob, trust me");
    settle(&[laptop], 1);
    assert!(
        !log_texts(laptop, "bob").contains(&"I am Bob, trust me".to_string()),
        "Mallory's text shown as Bob's: {:?}",
        log_texts(laptop, "bob")
    );
}

// ---------------------------------------------------------------------------
// Item 2: SETTINGS, SIBLING, HISTORY, COPY, OFFER

/// After the link, the server sends the laptop settings (its own relay,
/// another name), a SIBLING, history and an OFFER it has no say over: the
/// laptop changes nothing. A copy of what the server itself received is
/// kept, and shown as coming from the server.
#[test]
fn a_younger_device_cannot_rewrite_settings_or_history_of_its_elder() {
    let w = world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    let evil = Relay::start();
    let relays_before = laptop.ok(&["relays", "--json"]);
    let profile_before = laptop.ok(&["profile", "--json"]);
    let group = group_of(laptop, "bob");
    forge(
        server,
        "laptop",
        &DeviceMsg::Settings {
            profile: tern::proto::hello::Profile {
                name: "Mallory".into(),
                ..Default::default()
            }
            .to_bytes(),
            relays: vec![evil.addr.parse().unwrap()],
            rotate_days: 1,
        },
    );
    forge(
        server,
        "laptop",
        &DeviceMsg::Sibling {
            device: [7; 16],
            name: "planted".into(),
        },
    );
    forge(
        server,
        "laptop",
        &DeviceMsg::History {
            group,
            entries: vec![Entry {
                incoming: true,
                id: [9; 16],
                sent_at_ms: 1,
                received_at_ms: 1,
                text: "forged history".into(),
            }],
        },
    );
    // An invitation of Mallory's, for the laptop to forward to Bob as if
    // it were the server's (the server got the laptop's id for Bob in the
    // link; its one offer through it was used up then).
    let mallory = Profile::new("Mallory", &[&w.relays[1]]);
    let link = mallory.ok(&["invite", "--link", "--name", "bob"]);
    forge(
        server,
        "laptop",
        &DeviceMsg::Offer {
            via: id_bytes(&contact_id(laptop, "bob")),
            introduce: false,
            invitation: tern::proto::invitation::link_bytes(link.trim()).unwrap(),
        },
    );
    let err = settle(&[laptop, bob, &mallory], 3);
    assert!(err[0].contains("no say over"), "{}", err[0]);
    assert_eq!(laptop.ok(&["relays", "--json"]), relays_before);
    assert_eq!(laptop.ok(&["profile", "--json"]), profile_before);
    assert_eq!(
        other_devices(laptop),
        vec![("server".to_string(), "connected".to_string())]
    );
    assert!(!log_texts(laptop, "bob").contains(&"forged history".to_string()));
    assert_eq!(bob.contact("alice")["devices"], 2, "Bob met no Mallory");
    assert!(mallory.contacts().iter().all(|c| c["state"] == "invited"));
    // What the server itself received, copied: kept, and marked as a copy.
    forge(
        server,
        "laptop",
        &DeviceMsg::Copy {
            group,
            entry: Entry {
                incoming: true,
                id: [5; 16],
                sent_at_ms: now(),
                received_at_ms: now(),
                text: "a copy from the server".into(),
            },
        },
    );
    let got = laptop.recv();
    let m: Vec<&Value> = got.iter().filter(|e| e["type"] == "message").collect();
    assert_eq!(m.len(), 1, "{got:?}");
    assert_eq!(m[0]["device"], "server", "{got:?}");
    let log = laptop.log("bob");
    let copy = log
        .iter()
        .find(|e| e["text"] == "a copy from the server")
        .expect("kept");
    assert_eq!(copy["device"], "server");
}

/// A profile change made on the server reaches the laptop as that, and
/// nothing else: the laptop's relays stay its own.
#[test]
fn a_profile_change_on_one_device_is_shown_on_the_others_as_made_there() {
    let w = world();
    let (laptop, server) = (&w.laptop, &w.server);
    let relays_before = laptop.ok(&["relays", "--json"]);
    server.ok(&["relays", "add", &Relay::start().addr]);
    server.ok(&["profile", "--name", "Alice S."]);
    let o = laptop.run(&["recv"]);
    assert_code(&o, 0, "recv");
    assert!(
        stderr(&o).contains("profile changed on device server"),
        "{}",
        show(&o)
    );
    assert!(laptop.ok(&["profile", "--json"]).contains("Alice S."));
    assert_eq!(laptop.ok(&["relays", "--json"]), relays_before);
}

// ---------------------------------------------------------------------------
// Item 1: what rests on a removed device goes with it

/// The server makes two contacts by hand; the laptop meets both through
/// it, and verifies one of them itself. Removing the server drops the
/// other one from the laptop (it rested on the server's word alone) and
/// keeps the verified one.
#[test]
fn removing_a_device_drops_the_contacts_it_introduced_unless_verified_here() {
    let w = world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    let carol = Profile::new("Carol", &[&w.relays[1]]);
    let dave = Profile::new("Dave", &[&w.relays[0]]);
    connect(server, "carol", &carol, "alice");
    connect(server, "dave", &dave, "alice");
    let err = settle(&[laptop, server, &carol, &dave, bob], 4);
    assert!(
        err[0].contains("connected with a new contact"),
        "the laptop announces the contacts it met through the server: {}",
        err[0]
    );
    assert_eq!(names(laptop), vec!["bob", "carol", "dave"]);
    let c = laptop.contact("carol");
    assert_eq!(c["security"], "introduced", "{c}");
    assert_eq!(c["introduced_by_device"], "server", "{c}");
    let code = laptop.ok(&["verify", "dave"]);
    laptop.ok(&["verify", "dave", code.trim()]);
    assert_eq!(laptop.contact("dave")["security"], "verified");

    let o = laptop.run(&["device", "remove", "server"]);
    assert_code(&o, 0, "device remove");
    assert!(stderr(&o).contains("carol"), "{}", show(&o));
    assert_eq!(
        names(laptop),
        vec!["bob", "dave"],
        "carol went with the server"
    );
    dave.send("alice", "still here");
    assert!(laptop.recv_texts().contains(&"still here".to_string()));
}

// ---------------------------------------------------------------------------
// Issue 19 item 3: a removed device learns it was removed

#[test]
fn a_removed_device_learns_it_was_removed_and_stops_for_good() {
    let w = world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    laptop.ok(&["device", "remove", "server"]);
    let o = server.run(&["recv", "--json"]);
    assert_code(&o, 8, "recv on the removed device");
    assert!(
        stderr(&o).contains("removed from the profile"),
        "{}",
        show(&o)
    );
    let d = devices(server);
    assert_eq!(d[0]["state"], "removed", "{d:?}");
    assert_eq!(d[0]["removed_by"], "laptop", "{d:?}");
    assert!(
        !other_devices(server)
            .iter()
            .any(|(n, s)| n == "laptop" && s == "connected"),
        "{d:?}"
    );
    let o = server.run(&["send", "bob", "still me?"]);
    assert_code(&o, 8, "send on the removed device: permanent, not 75");
    assert_code(&server.run(&["recv"]), 8, "and every later recv");
    // Its history stays readable.
    assert!(log_texts(server, "bob").contains(&"before the link".to_string()));
    let o = bob.run(&["recv", "--json"]);
    assert_eq!(bob.contact("alice")["devices"], 1, "{}", show(&o));
}

// ---------------------------------------------------------------------------
// Item 3: device links

/// A device link shown without --wait and answered while only a cron-style
/// `tern recv` runs: nothing leaves the laptop until the user confirms.
#[test]
fn a_device_link_answered_during_a_plain_recv_gives_nothing_until_confirmed() {
    let relays = [Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[1]]);
    connect(&laptop, "bob", &bob, "alice");
    laptop.send("bob", "secret history");
    let link = laptop.ok(&["device", "link", "--link"]);
    let thief = Profile::empty("thief");
    thief.ok(&[
        "device",
        "join",
        link.trim(),
        "--name",
        "thief",
        "--no-passphrase",
    ]);
    let err = settle(&[&laptop, &thief], 4);
    assert!(err[0].contains("tern device confirm"), "{}", err[0]);
    assert!(thief.contacts().is_empty(), "{:?}", thief.contacts());
    assert!(!thief.ok(&["profile", "--json"]).contains("Alice"));
    let d = devices(&laptop);
    assert_eq!(d[1]["state"], "answered", "{d:?}");
    assert_eq!(d[1]["answered_by"], "thief", "{d:?}");
    // The user sees it is not theirs and withdraws it.
    let name = d[1]["name"].as_str().unwrap().to_string();
    laptop.ok(&["device", "revoke", &name]);
    settle(&[&laptop, &thief], 2);
    assert!(thief.contacts().is_empty());
    assert_eq!(devices(&laptop).len(), 1, "{:?}", devices(&laptop));
}

/// The same, confirmed by the user: the link completes.
#[test]
fn a_device_link_confirmed_on_the_linking_device_completes() {
    let relays = [Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[1]]);
    connect(&laptop, "bob", &bob, "alice");
    let link = laptop.ok(&["device", "link", "--link"]);
    let server = Profile::empty("Alice-server");
    server.ok(&[
        "device",
        "join",
        link.trim(),
        "--name",
        "server",
        "--no-passphrase",
    ]);
    settle(&[&laptop, &server], 2);
    assert!(server.contacts().is_empty());
    assert_code(
        &laptop.run(&["device", "confirm"]),
        2,
        "confirm without --yes and no terminal",
    );
    laptop.ok(&["device", "confirm", "--yes"]);
    settle(&[&laptop, &server, &bob], 5);
    assert_eq!(server.contact("bob")["state"], "connected");
}

/// A link used after it expired, and one used after it was revoked: the
/// joiner gets nothing, the laptop lists no pending link.
#[test]
fn a_device_link_used_after_expiry_or_revocation_links_nothing() {
    let relays = [Relay::start(), Relay::start()];
    let laptop = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[1]]);
    connect(&laptop, "bob", &bob, "alice");

    let link = laptop.ok(&["device", "link", "--link", "--expires", "2s"]);
    assert_eq!(devices(&laptop)[1]["state"], "link shown");
    std::thread::sleep(Duration::from_millis(2500));
    let late = Profile::empty("late");
    // Nothing ran on the laptop since: the request reaches its queue.
    late.ok(&[
        "device",
        "join",
        link.trim(),
        "--name",
        "late",
        "--no-passphrase",
    ]);
    let o = laptop.run(&["device", "confirm", "--yes"]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let err = settle(&[&laptop, &late], 3);
    assert!(late.contacts().is_empty());
    assert_eq!(devices(&laptop).len(), 1, "{:?}\n{err:?}", devices(&laptop));
    // Once the laptop has withdrawn it, the link is refused at once.
    let later = Profile::empty("later");
    assert_code(
        &later.run(&["device", "join", link.trim(), "--no-passphrase"]),
        6,
        "join of an expired link",
    );

    let link = laptop.ok(&["device", "link", "--link"]);
    let name = devices(&laptop)[1]["name"].as_str().unwrap().to_string();
    laptop.ok(&["device", "revoke", &name]);
    let other = Profile::empty("other");
    assert_code(
        &other.run(&["device", "join", link.trim(), "--no-passphrase"]),
        6,
        "join of a revoked link",
    );
    assert_eq!(devices(&laptop).len(), 1);

    // A link shown with --wait that nobody answers is withdrawn with it.
    let o = laptop.run(&["device", "link", "--link", "--wait", "1"]);
    assert_code(&o, 1, "device link --wait with no answer");
    let link = stdout(&o);
    assert_code(
        &other.run(&["device", "join", link.trim(), "--no-passphrase"]),
        6,
        "join of a link whose --wait ended",
    );
    assert_eq!(devices(&laptop).len(), 1);
}

// ---------------------------------------------------------------------------
// Item 3: contact invitations

#[test]
fn contact_invitations_can_be_listed_revoked_and_expire() {
    let relays = [Relay::start()];
    let alice = Profile::new("Alice", &[&relays[0]]);
    let bob = Profile::new("Bob", &[&relays[0]]);
    let link = alice.ok(&["invite", "--link", "--name", "bob"]);
    let listed = json_lines(&alice.ok(&["invitations", "--json"]));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "bob");
    alice.ok(&["invitations", "revoke", "bob"]);
    assert!(json_lines(&alice.ok(&["invitations", "--json"])).is_empty());
    assert_code(
        &bob.run(&["accept", link.trim()]),
        6,
        "accept of a revoked invitation",
    );

    let link = alice.ok(&["invite", "--link", "--name", "carol", "--expires", "2s"]);
    assert!(json_lines(&alice.ok(&["invitations", "--json"]))[0]["expires"].is_string());
    std::thread::sleep(Duration::from_millis(2500));
    let carol = Profile::new("Carol", &[&relays[0]]);
    carol.ok(&["accept", link.trim()]);
    let o = alice.run(&["recv"]);
    assert_code(&o, 0, "recv");
    assert!(alice.contacts().is_empty(), "{:?}", alice.contacts());
    settle(&[&carol, &alice], 2);
    assert!(
        carol.contacts().iter().all(|c| c["state"] != "connected"),
        "{:?}",
        carol.contacts()
    );
}

// ---------------------------------------------------------------------------
// Issue 19 item 17: forget across devices

#[test]
fn forget_is_profile_wide_but_a_younger_device_cannot_forget_for_its_elder() {
    let w = world();
    let (laptop, server, bob) = (&w.laptop, &w.server, &w.bob);
    // Made on the laptop: the younger server's forget is only a hint there.
    let o = server.run(&["forget", "bob", "--yes"]);
    assert_code(&o, 0, "forget on the server");
    let o = laptop.run(&["recv"]);
    assert!(stderr(&o).contains("keeps them"), "{}", show(&o));
    assert_eq!(names(laptop), vec!["bob"]);
    // The laptop (elder) forgets Carol, whom both have: gone on both.
    let carol = Profile::new("Carol", &[&w.relays[1]]);
    connect(laptop, "carol", &carol, "alice");
    settle(&[laptop, server, &carol, bob], 4);
    assert_eq!(names(server), vec!["carol"]);
    laptop.ok(&["forget", "carol", "--yes"]);
    let o = server.run(&["recv"]);
    assert!(stderr(&o).contains("forgotten here too"), "{}", show(&o));
    assert!(names(server).is_empty(), "{:?}", names(server));
}
