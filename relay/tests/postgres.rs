//! The PostgreSQL store with real servers: one identity for every node, the
//! schema version check, several relay nodes on one database, a node killed
//! and the database restarted under load. Skipped with a note where
//! PostgreSQL is not installed (see `pg_common`).

mod common;
mod pg_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pg_common::PgServer;
use tern_relay::store::{Store, StoreError};
use tern_relay::{ServeConfig, Server};
use tern_wire::{ErrorCode, Reply};

fn node(url: &str) -> (tempfile::TempDir, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.database_url = Some(url.to_string());
        cfg.max_pending = 1_000_000;
    });
    (dir, relay)
}

#[test]
fn one_identity_for_nodes_starting_together_and_newer_schemas_refused() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database();
    // Nodes starting at once on an empty database: one schema, one key.
    let keys: Vec<[u8; 32]> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let store = Store::open_postgres(&url).unwrap();
                *store.identity(true).unwrap().unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "nodes disagree on the key"
    );
    assert_eq!(
        *Store::read_database_identity(&url).unwrap().unwrap(),
        keys[0]
    );
    // An empty database has no identity, and reading it creates nothing.
    let empty = pg.database();
    assert!(Store::read_database_identity(&empty).unwrap().is_none());
    let mut c = pg.client(&empty);
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'tern_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);

    // A relay node started on it serves that key.
    let (_dir, relay) = node(&url);
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(keys[0]));
    assert_eq!(relay.key(), public.to_bytes());
    relay.stop();

    // A newer relay's schema is refused, saying what to do.
    pg.client(&url)
        .batch_execute("UPDATE tern_schema SET version = 99")
        .unwrap();
    match Store::open_postgres(&url) {
        Err(e @ StoreError::Schema(99, _)) => {
            assert!(e.to_string().contains("upgrade tern"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[test]
fn a_send_on_one_node_is_pushed_by_another() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database();
    let (_a_dir, a) = node(&url);
    let (_b_dir, b) = node(&url);
    assert_eq!(a.key(), b.key(), "one relay, one key");
    let mut on_a = a.client();
    let mut on_b = b.client();
    let q = secured_queue(&mut on_b);
    let tag = on_b.submit(&[(q.sub(16), Some(&q.recipient_key))])[0];
    assert_eq!(on_b.wait_for(tag), Reply::Ok);
    assert_eq!(on_b.wait_for(tag), Reply::Idle);
    for _ in 0..3 {
        let msg = message();
        let sent = Instant::now();
        assert_eq!(on_a.request(&q.send(&msg), Some(&q.sender_key)), Reply::Ok);
        let pushed = on_b.wait_for(tag);
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{:?}",
            sent.elapsed()
        );
        let (id, body) = q.open(&pushed);
        assert_eq!(body, msg);
        assert_eq!(on_b.wait_for(tag), Reply::Idle);
        assert_eq!(on_b.request(&q.ack(id), Some(&q.recipient_key)), Reply::Ok);
    }
    // Deleted through A: B's subscription ends.
    assert_eq!(on_a.request(&q.delete(), Some(&q.recipient_key)), Reply::Ok);
    assert_eq!(on_b.wait_for(tag), Reply::Ended);
    a.stop();
    b.stop();
}

#[test]
fn the_relay_reaches_the_database_over_tls() {
    let Some(pg) = PgServer::start_tls() else {
        return;
    };
    let db = pg.database_name();
    let url = pg.tls_url(&db);
    let (_dir, relay) = node(&url);
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let msg = message();
    assert_eq!(c.request(&q.send(&msg), Some(&q.sender_key)), Reply::Ok);
    let delivered = drain_acking(&mut c, &q);
    assert_eq!(delivered, vec![msg]);
    // Every connection the relay holds is encrypted.
    let mut admin = pg.client(&pg.url(&db));
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'tern-relay'",
            &[],
        )
        .unwrap();
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(tls >= 2, "{tls} TLS connections");
    assert_eq!(plain, 0);
    relay.stop();
}

#[test]
fn verify_full_checks_the_database_certificate_and_its_name() {
    let Some(pg) = PgServer::start_tls() else {
        return;
    };
    let start = |url: String| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
        cfg.database_url = Some(url);
        Server::bind(cfg).map(|s| (dir, s))
    };
    // The right CA: verify-ca passes (the certificate is for `localhost`,
    // the relay connects to 127.0.0.1), and a relay serves on it.
    let db = pg.database_name();
    let url = pg.verify_url(&db, "verify-ca", &pg.ca_file(true));
    let (dir, server) = start(url.clone()).expect("verify-ca with the signing CA");
    drop(server);
    drop(dir);
    let (_dir, relay) = node(&url);
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let msg = message();
    assert_eq!(c.request(&q.send(&msg), Some(&q.sender_key)), Reply::Ok);
    assert_eq!(drain_acking(&mut c, &q), vec![msg]);
    relay.stop();

    // verify-full also wants the name: 127.0.0.1 is not in the certificate.
    let err = start(pg.verify_url(&db, "verify-full", &pg.ca_file(true)))
        .err()
        .expect("verify-full against a certificate for another name");
    let text = err.to_string();
    assert!(
        text.contains("certificate") && text.contains("name"),
        "{text}"
    );
    // A CA that did not sign it: refused in either mode.
    for mode in ["verify-ca", "verify-full"] {
        let err = start(pg.verify_url(&db, mode, &pg.ca_file(false)))
            .err()
            .expect("a certificate from an unknown CA");
        let text = err.to_string();
        assert!(text.contains("certificate"), "{mode}: {text}");
    }
    // A root file that is not there is named.
    let missing = std::path::Path::new("/nonexistent/ca.pem");
    let err = start(pg.verify_url(&db, "verify-full", missing))
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

/// A relay node in a child process of this test binary, so that it can be
/// SIGKILLed: started by the tests below, not a test of its own.
#[test]
#[ignore = "a relay node process for the tests in this file; runs only when they start it"]
fn relay_node_process() {
    let Ok(url) = std::env::var("TERN_TEST_NODE_DATABASE") else {
        return;
    };
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), "/nonexistent");
    cfg.database_url = Some(url);
    cfg.max_pending = 1_000_000;
    cfg.workers = 4;
    let server = Server::bind(cfg).unwrap();
    println!("NODE {}", server.local_addr());
    server.run().unwrap();
}

struct ChildNode {
    child: Child,
    addr: SocketAddr,
}

impl ChildNode {
    fn start(url: &str) -> ChildNode {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["relay_node_process", "--exact", "--ignored", "--nocapture"])
            .env("TERN_TEST_NODE_DATABASE", url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let addr = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("NODE ").map(|a| a.parse().unwrap()))
            .expect("the node printed its address");
        ChildNode { child, addr }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends random messages to `q` through `addr` until `stop`, on fresh
/// sessions whenever one fails; records what was attempted and what was
/// answered OK. Refusals (the database away) are expected and retried.
/// Three senders on one node until `finish`: what each SEND answered OK
/// (`acked`) and everything tried (`attempted`).
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Vec<u8>>>>,
    attempted: Arc<Mutex<Vec<Vec<u8>>>>,
    senders: Vec<std::thread::JoinHandle<usize>>,
}

impl Load {
    fn start(addr: SocketAddr, key: [u8; 32], q: &Arc<Queue>) -> Load {
        let acked: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let attempted: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let senders = (0..3)
            .map(|_| {
                sender(
                    addr,
                    key,
                    q.clone(),
                    stop.clone(),
                    acked.clone(),
                    attempted.clone(),
                )
            })
            .collect();
        Load {
            stop,
            acked,
            attempted,
            senders,
        }
    }

    /// Stops the senders: how many SENDs were refused, then what was
    /// acknowledged and what was tried.
    fn finish(self) -> (usize, Vec<Vec<u8>>, Vec<Vec<u8>>) {
        self.stop.store(true, Ordering::SeqCst);
        let refused = self.senders.into_iter().map(|s| s.join().unwrap()).sum();
        let acked = self.acked.lock().unwrap().clone();
        let attempted = self.attempted.lock().unwrap().clone();
        (refused, acked, attempted)
    }
}

fn sender(
    addr: SocketAddr,
    key: [u8; 32],
    q: Arc<Queue>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Vec<u8>>>>,
    attempted: Arc<Mutex<Vec<Vec<u8>>>>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut refused = 0;
        while !stop.load(Ordering::SeqCst) {
            let Ok(mut c) = Client::try_new(addr, key) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                let m = message();
                attempted.lock().unwrap().push(m.clone());
                let tag = c.submit(&[(q.send(&m), Some(&q.sender_key))])[0];
                // A node that dies closes the session; try another.
                let Ok(records) = c.read_frame() else { break };
                for (t, r) in records {
                    assert_eq!(t, tag);
                    match r {
                        Reply::Ok => acked.lock().unwrap().push(m.clone()),
                        Reply::Error(ErrorCode::Unavailable) => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        other => panic!("SEND answered {other:?}"),
                    }
                }
            }
        }
        refused
    })
}

/// Every acknowledged message is delivered exactly once; anything else
/// delivered was attempted, and is there once at most.
fn check_delivery(delivered: &[Vec<u8>], acked: &[Vec<u8>], attempted: &[Vec<u8>]) {
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    for d in delivered {
        *count.entry(d.as_slice()).or_default() += 1;
    }
    for m in acked {
        assert_eq!(
            count.get(m.as_slice()),
            Some(&1),
            "an acknowledged message was lost or doubled"
        );
    }
    for d in delivered {
        assert!(attempted.contains(d), "a message nobody sent was delivered");
        assert_eq!(count[d.as_slice()], 1, "a message was delivered twice");
    }
}

#[test]
fn a_node_killed_mid_traffic_loses_nothing_acknowledged() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database();
    let (_dir, survivor) = node(&url);
    let doomed = ChildNode::start(&url);
    let key = survivor.key();
    let mut c = survivor.client();
    let q = Arc::new(secured_queue(&mut c));
    // Subscribed on the survivor while the doomed node takes the SENDs.
    let tag = c.submit(&[(q.sub(64), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    assert_eq!(c.wait_for(tag), Reply::Idle);

    let load = Load::start(doomed.addr, key, &q);
    // The subscriber on the other node hears of them as they land.
    let first = c.wait_for(tag);
    assert!(matches!(first, Reply::Message { .. }), "{first:?}");
    std::thread::sleep(Duration::from_millis(700));
    drop(doomed); // SIGKILL
    std::thread::sleep(Duration::from_millis(200));
    let (_, acked, attempted) = load.finish();
    assert!(acked.len() >= 10, "only {} sends got through", acked.len());
    eprintln!(
        "{} sends answered OK before the node was killed",
        acked.len()
    );

    // The survivor serves the queue whole: a fresh session drains it.
    drop(c);
    let mut c = survivor.client();
    let delivered = drain_acking(&mut c, &q);
    check_delivery(&delivered, &acked, &attempted);
    // And takes new messages.
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    assert_eq!(c.request(&q.check(), None), Reply::Count(1));
    survivor.stop();
}

#[test]
fn a_database_restart_under_load_loses_nothing_acknowledged() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    let url = pg.database();
    let (_a_dir, a) = node(&url);
    let (_b_dir, b) = node(&url);
    let key = a.key();
    let mut on_a = a.client();
    let q = Arc::new(secured_queue(&mut on_a));
    // A subscription on the other node, from before the restart.
    let mut on_b = b.client();
    let watched = secured_queue(&mut on_b);
    let tag = on_b.submit(&[(watched.sub(16), Some(&watched.recipient_key))])[0];
    assert_eq!(on_b.wait_for(tag), Reply::Ok);
    assert_eq!(on_b.wait_for(tag), Reply::Idle);

    let load = Load::start(a.addr, key, &q);
    let acked = load.acked.clone();
    std::thread::sleep(Duration::from_millis(700));
    let before = acked.lock().unwrap().len();
    assert!(before >= 10, "only {before} sends got through");
    pg.restart(); // an immediate shutdown: every connection dies
    let restarted = Instant::now();
    // The relay reconnects by itself: SENDs are answered OK again soon.
    while acked.lock().unwrap().len() < before + 20 {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "the relay did not recover from the database restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "sends answered OK again {:?} after the database came back",
        restarted.elapsed()
    );
    let (refused, acked, attempted) = load.finish();
    eprintln!("{refused} sends answered 'unavailable' around the restart");

    // The other node listens again: its old subscription is pushed what
    // is sent through the first one now.
    let msg = message();
    assert_eq!(
        on_a.request(&watched.send(&msg), Some(&watched.sender_key)),
        Reply::Ok
    );
    let pushed = on_b.wait_for(tag);
    assert_eq!(watched.open(&pushed).1, msg);

    let delivered = drain_acking(&mut on_a, &q);
    check_delivery(&delivered, &acked, &attempted);
    a.stop();
    b.stop();
}
