//! Post-quantum protection end to end (issue 15, the conversation parts):
//! two profiles on real relays connect with the hybrid handshake, talk,
//! rotate their queues and link a device, and `tern contacts` says which
//! connections are post-quantum throughout. The wire format has no
//! classical-only mode, so every connection is hybrid once the handshake is
//! complete (PROTOCOL.md §6.2).

mod cli_common;

use cli_common::*;

fn pq(p: &Profile, name: &str) -> bool {
    p.contact(name)["post_quantum"]
        .as_bool()
        .unwrap_or_else(|| panic!("{}: no post_quantum field", p.display))
}

#[test]
fn connections_are_post_quantum_and_stay_so_across_rotation_and_devices() {
    let (r1, r2, r3) = (Relay::start(), Relay::start(), Relay::start());
    let a = Profile::new("Alice", &[&r1]);
    let b = Profile::new("Bob", &[&r2]);

    let link = a.ok(&["invite", "--link", "--name", "bob"]);
    assert!(!pq(&a, "bob"), "an invitation alone is not post-quantum");
    b.ok(&["accept", link.trim(), "--name", "alice"]);
    assert!(!pq(&b, "alice"), "the connection request is X25519 only");
    a.ok(&["recv"]);
    b.recv();
    a.recv();
    // The reply carried an encapsulation to the joiner's key, the
    // confirmation one to the inviter's: both directions are hybrid.
    assert!(pq(&a, "bob") && pq(&b, "alice"));
    let text = b.ok(&["contacts"]);
    assert!(text.contains("post-quantum"), "{text}");

    for i in 0..3 {
        a.send("bob", &format!("a{i}"));
        assert_eq!(b.recv_texts(), vec![format!("a{i}")]);
        b.send("alice", &format!("b{i}"));
        assert_eq!(a.recv_texts(), vec![format!("b{i}")]);
    }
    assert!(pq(&a, "bob") && pq(&b, "alice"));

    // Rotation travels inside the ratchet, and changes nothing here.
    a.ok(&["relays", "add", &r3.addr]);
    a.ok(&["rotate", "bob"]);
    for _ in 0..3 {
        b.recv();
        a.recv();
    }
    a.send("bob", "after the rotation");
    assert_eq!(b.recv_texts(), vec!["after the rotation"]);
    b.send("alice", "got it");
    assert_eq!(a.recv_texts(), vec!["got it"]);
    assert!(pq(&a, "bob") && pq(&b, "alice"));

    // A linked device: its own connections (with Alice's first device and
    // with Bob) are made by the same hybrid handshake.
    let server = join_server(&a, &[]);
    // A plain recv never links a device: confirmed on the first device.
    a.ok(&["device", "confirm", "--yes"]);
    for _ in 0..5 {
        a.recv();
        server.recv();
        b.recv();
    }
    server.send("bob", "from the server");
    assert!(b.recv_texts().contains(&"from the server".to_string()));
    a.recv();
    server.recv();
    b.send("alice", "to both devices");
    assert!(server.recv_texts().contains(&"to both devices".to_string()));
    assert!(a.recv_texts().contains(&"to both devices".to_string()));
    server.recv();
    b.recv();
    assert!(pq(&server, "bob"), "{:?}", server.contacts());
    assert!(
        pq(&b, "alice"),
        "every connection of the group: {:?}",
        b.contacts()
    );
    assert_eq!(b.contact("alice")["devices"], 2);
}
