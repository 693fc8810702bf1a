//! tern end to end through a relay whose store is PostgreSQL, as on a PaaS:
//! the relay's local disk is thrown away between starts, the database
//! restarts and goes away for a while, and every message still arrives
//! exactly once. Skipped with a note where PostgreSQL is not installed (the
//! server comes from the system packages; see relay/tests/pg_common).

mod cli_common;
#[path = "../relay/tests/pg_common/mod.rs"]
mod pg_common;

use cli_common::*;

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
    assert_eq!(bob.recv_texts(), waiting);

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
    // message is kept; once the database is back, the next send takes it
    // out with the new one, and each arrives once.
    pg.stop(false);
    let o = ada.run(&["send", "bob", "while the database is away"]);
    assert_code(&o, 75, "send while the relay's database is down");
    pg.run();
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
