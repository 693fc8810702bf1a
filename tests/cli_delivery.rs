//! What a user and a script can rely on from `tern recv` and `tern send`:
//! a message counts as delivered only once written out; `recv --wait`
//! completes a connection in one round per side; permanent failures are
//! said once, with their own exit status; a relay that goes away while
//! following is reported once and again when it is back.

mod cli_common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cli_common::*;

fn pair() -> (Relay, Profile, Profile) {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bob", &[&r]);
    connect(&a, "bob", &b, "ada");
    (r, a, b)
}

#[test]
fn what_a_closed_pipe_or_a_full_disk_kept_from_being_shown_comes_next_time() {
    let (_r, a, b) = pair();
    // Messages of 13,000 bytes, so that only a few fit in the pipe (64 KiB
    // on Linux) and the reader's buffer: a write that reached the pipe
    // counts as shown (it is all a writer can know), so those few may be
    // gone with the reader; every later one must come next time.
    let sent: Vec<String> = (0..12)
        .map(|i| format!("m{i}:{}", "x".repeat(13_000)))
        .collect();
    for m in &sent {
        a.send("bob", m);
    }

    // `tern recv | head -1`: the reader takes one line and goes away.
    let mut child = b
        .cmd(&["recv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    let status = wait_guarded(&mut child, HANG_GUARD, "recv | head -1");
    assert!(
        status.success(),
        "a reader going away is no error: {status:?}"
    );
    assert!(
        first.contains(&sent[0]),
        "{:?}",
        &first[..40.min(first.len())]
    );
    // Everything not written out is shown now, once, in order: the rest
    // is the tail of what was sent, and at most what the pipe and the
    // reader's 8 KiB buffer could hold is missing before it.
    let rest = b.recv_texts();
    let lost = (sent.len() - 1)
        .checked_sub(rest.len())
        .expect("no message shown twice");
    assert!(
        lost <= (64 * 1024 + 8 * 1024) / 13_000,
        "what was not shown comes next time: {lost} of {} lost",
        sent.len()
    );
    assert_eq!(rest, sent[1 + lost..].to_vec(), "the rest, in order, once");
    b.recv_nothing();

    // A full disk: a write error is an error, and nothing is lost.
    a.send("bob", "to /dev/full");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = b
        .cmd(&["recv"])
        .stdout(full)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let status = wait_guarded(&mut child, HANG_GUARD, "recv >/dev/full");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("next `tern recv`"), "{err}");
    assert_eq!(b.recv_texts(), vec!["to /dev/full"]);

    // The same while following: what the closed pipe missed comes next.
    let mut follower = b
        .cmd(&["recv", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(follower.stdout.take().unwrap());
    a.send("bob", "f1");
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("f1"), "{line:?}");
    drop(out);
    a.send("bob", "f2");
    a.send("bob", "f3");
    let status = wait_guarded(&mut follower, HANG_GUARD, "recv --follow | head -1");
    assert!(status.success(), "{status:?}");
    assert_eq!(b.recv_texts(), vec!["f2", "f3"]);
}

#[test]
fn recv_wait_on_each_side_completes_the_connection_in_one_round() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    let b = Profile::new("Bob", &[&r]);
    let link = a.ok(&["invite", "--link", "--name", "bob"]);
    b.ok(&["accept", link.trim(), "--name", "ada"]);
    // The README's tour: each side runs one `recv --wait`, at the same time.
    let inviter = std::thread::spawn({
        let cmd = a.cmd(&["recv", "--wait", "30", "--json"]);
        move || run_cmd(cmd, None, HANG_GUARD)
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let joiner = run_cmd(b.cmd(&["recv", "--wait", "30", "--json"]), None, HANG_GUARD);
    let inviter = inviter.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    for (o, who) in [(&inviter, "inviter"), (&joiner, "joiner")] {
        assert!(o.status.success(), "{who}: {}", show(o));
        let events = json_lines(&stdout(o));
        assert!(
            events.iter().any(|e| e["type"] == "connected"),
            "{who}'s one recv --wait connects: {}",
            show(o)
        );
    }
    assert_eq!(a.contact("bob")["state"], "connected");
    assert_eq!(b.contact("ada")["state"], "connected");
}

#[test]
fn a_contact_that_deleted_the_connection_is_gone_said_once() {
    let (_r, a, b) = pair();
    // Bob forgets Ada: his queues for her are deleted at the relay.
    b.ok(&["forget", "ada", "--yes"]);
    let o = a.run(&["send", "bob", "are you there?"]);
    assert_code(&o, 8, "send to a contact who deleted the connection");
    assert!(
        stderr(&o).contains("deleted this connection"),
        "{}",
        show(&o)
    );
    assert_eq!(a.contact("bob")["state"], "gone");
    // Not repeated on every receive, and not "temporary".
    for _ in 0..3 {
        let o = a.run(&["recv"]);
        assert_code(&o, 0, "recv with a gone contact");
        assert!(!stderr(&o).contains("could not deliver"), "{}", show(&o));
    }
}

#[test]
fn a_relay_that_needs_an_access_key_the_address_lacks_is_no_temporary_failure() {
    let data = tempfile::tempdir().unwrap();
    let key_file = data.path().join("keys");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let r = Relay::start_with(&["--access-key-file", key_file.to_str().unwrap()]);
    // The address without its access key.
    let addr = r.addr.replace(":s3cret@", "@");
    let a = Profile::with_env("Ada", &[&addr], &[], &[]);
    let o = a.run(&["invite", "--link", "--name", "bob"]);
    assert_code(&o, 1, "invite without the access key");
    assert!(stderr(&o).contains("access key"), "{}", show(&o));
    assert!(a.contacts().is_empty());
}

#[test]
fn a_relay_going_away_while_following_is_said_once_and_when_back() {
    let r1 = Relay::start();
    let mut r2 = Relay::start();
    let a = Profile::new("Ada", &[&r1]);
    let b = Profile::new("Bob", &[&r1, &r2]);
    connect(&a, "bob", &b, "ada");
    let mut f = b.follow();
    a.send("bob", "before");
    assert_eq!(f.next_messages(1).0, vec!["before"]);
    r2.stop();
    a.send("bob", "while r2 is down");
    assert_eq!(f.next_messages(1).0, vec!["while r2 is down"]);
    // Several reconnection attempts fail meanwhile (the first after half a
    // second, then doubling).
    std::thread::sleep(Duration::from_secs(6));
    r2.restart();
    std::thread::sleep(Duration::from_secs(6));
    a.send("bob", "after");
    assert_eq!(f.next_messages(1).0, vec!["after"]);
    let err = f.kill();
    let unreachable = err.matches("unreachable").count();
    assert_eq!(unreachable, 1, "said once, not on every retry:\n{err}");
    assert!(
        err.contains("reachable again"),
        "and said when back:\n{err}"
    );
}
