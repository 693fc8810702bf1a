//! tern end to end through a relay whose store is PostgreSQL, as on a PaaS:
//! the relay's local disk is thrown away between starts, the database
//! restarts and goes away for a while, and every message still arrives
//! exactly once. Skipped with a note where PostgreSQL is not installed (the
//! server comes from the system packages; see relay/tests/pg_common).

mod cli_common;
#[path = "../relay/tests/pg_common/mod.rs"]
mod pg_common;

use std::time::{Duration, Instant};

use cli_common::*;

/// `recv --json` until it succeeds, and the texts of every attempt: right
/// after its database comes back the relay answers "temporarily
/// unavailable" (exit 75) until it has reconnected, which it does by
/// itself within a second or so.
fn recv_until_ok(p: &Profile) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    loop {
        let o = p.run(&["recv", "--json"]);
        got.extend(texts(&json_lines(&stdout(&o))));
        if o.status.success() {
            return got;
        }
        assert_code(&o, 75, "recv while the relay reconnects to its database");
        assert!(
            Instant::now() < deadline,
            "the relay did not recover from the database restart: {}",
            show(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `texts` from `from` to `to` (each send must succeed).
fn send_all(from: &Profile, to: &str, texts: &[String]) {
    for t in texts {
        from.ok(&["send", to, t]);
    }
}

fn batch(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i}")).collect()
}

#[test]
fn a_relay_on_postgres_loses_and_doubles_nothing_across_restarts_of_both() {
    let Some(mut pg) = pg_common::PgServer::start() else {
        return;
    };
    let url = pg.database();
    let mut relay = Relay::start_with(&["--store", &url]);
    let ada = Profile::new("Ada", &[&relay]);
    let bob = Profile::new("Bob", &[&relay]);
    connect(&ada, "bob", &bob, "ada");
    let mut expected = Vec::new();

    // Both ways, as usual.
    let first = batch("first", 5);
    send_all(&ada, "bob", &first);
    send_all(&bob, "ada", &batch("reply", 3));
    assert_eq!(bob.recv_texts(), first);
    assert_eq!(ada.recv_texts(), batch("reply", 3));
    expected.extend(first);

    // Messages waiting in the database while it restarts.
    let waiting = batch("across a database restart", 5);
    send_all(&ada, "bob", &waiting);
    pg.restart();
    expected.extend(waiting.clone());
    assert_eq!(recv_until_ok(&bob), waiting);

    // The relay killed and started on an empty data directory (a PaaS
    // dyno's disk is new at every start): same identity, same address (the
    // helper checks), nothing lost.
    let waiting = batch("across a relay restart", 5);
    send_all(&ada, "bob", &waiting);
    relay.stop();
    for e in std::fs::read_dir(relay.data_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    relay.restart();
    expected.extend(waiting.clone());
    assert_eq!(bob.recv_texts(), waiting);

    // The database away: a send is a temporary failure (75) and the
    // message is kept; once the database is back, it goes out, and each
    // message arrives once.
    pg.stop(false);
    let o = ada.run(&["send", "bob", "while the database is away"]);
    assert_code(&o, 75, "send while the relay's database is down");
    pg.run();
    // Ada's next runs upload what was kept, once the relay is back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(recv_until_ok(&ada).is_empty());
        if ada.contact("bob")["pending_jobs"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kept message never went out: {}",
            ada.contact("bob")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ada.ok(&["send", "bob", "after it came back"]);
    expected.push("while the database is away".into());
    expected.push("after it came back".into());
    assert_eq!(
        bob.recv_texts(),
        ["while the database is away", "after it came back"]
    );

    // The whole history: every message once, in order.
    let log = json_lines(&bob.ok(&["log", "ada", "--json"]));
    let incoming: Vec<String> = log
        .iter()
        .filter(|e| e["direction"] == "in")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(incoming, expected);
    bob.recv_nothing();
}
