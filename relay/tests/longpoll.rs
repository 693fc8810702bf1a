//! Long-poll FETCH: prompt wake-ups, deadlines, and many idle waiters on a
//! handful of threads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_relay::wire::{Command, Reply};

#[test]
fn fetch_returns_as_soon_as_a_message_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);

    let (block, key) = seal_request(
        &relay.key(),
        &q.fetch(20_000),
        Some(&q.recipient_key),
        now_ms(),
    );
    let mut waiter = Conn::connect(relay.addr);
    waiter.send_post(&block).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let msg = message();
    let sent = Instant::now();
    assert_eq!(c.request(&q.send(&msg), Some(&q.sender_key)), Reply::Ok);
    let r = waiter.read_response().unwrap();
    let woke_after = sent.elapsed();
    assert!(woke_after < Duration::from_secs(2), "{woke_after:?}");
    let (_, body) = q.open(&open_response(&key, &r.body).reply);
    assert_eq!(body, msg);
    // The waiter's connection is reusable afterwards.
    let mut again = Client {
        conn: waiter,
        relay_key: relay.key(),
    };
    assert!(matches!(
        again.request(&Command::Info, None),
        Reply::Info(_)
    ));
    relay.stop();
}

#[test]
fn fetch_waits_until_its_deadline_capped_by_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_wait = Duration::from_millis(800));
    let mut c = relay.client();
    let q = create_queue(&mut c, None);

    let start = Instant::now();
    assert_eq!(
        c.request(&q.fetch(300), Some(&q.recipient_key)),
        Reply::Empty
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Asks for a minute, gets the relay's cap.
    let start = Instant::now();
    assert_eq!(
        c.request(&q.fetch(60_000), Some(&q.recipient_key)),
        Reply::Empty
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(790) && took < Duration::from_secs(4),
        "{took:?}"
    );
    match c.request(&Command::Info, None) {
        Reply::Info(i) => assert_eq!(i.max_wait_ms, 800),
        other => panic!("{other:?}"),
    }
    relay.stop();
}

#[test]
fn shutdown_answers_parked_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    let (block, key) = seal_request(
        &relay.key(),
        &q.fetch(30_000),
        Some(&q.recipient_key),
        now_ms(),
    );
    let mut waiter = Conn::connect(relay.addr);
    waiter.send_post(&block).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let stopper = std::thread::spawn(move || relay.stop());
    let r = waiter.read_response().unwrap();
    assert_eq!(open_response(&key, &r.body).reply, Reply::Empty);
    assert_eq!(r.header("connection"), Some("close"));
    stopper.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}
