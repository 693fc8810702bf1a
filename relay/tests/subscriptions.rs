//! Subscriptions: prompt pushes, windows, shutdown.

mod common;
#[macro_use]
mod pg_common;

use std::time::{Duration, Instant};

use common::*;
use tern_wire::Reply;

on_both_stores!(
    a_message_is_pushed_as_soon_as_it_arrives_and_once,
    unsubscribed_queues_push_nothing,
    shutdown_closes_subscribed_sessions,
);

fn a_message_is_pushed_as_soon_as_it_arrives_and_once(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let tag = c.submit(&[(q.sub(16), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    assert_eq!(c.wait_for(tag), Reply::Idle);
    let mut sender = relay.client();
    for _ in 0..3 {
        let msg = message();
        let sent = Instant::now();
        assert_eq!(
            sender.request(&q.send(&msg), Some(&q.sender_key)),
            Reply::Ok
        );
        let pushed = c.wait_for(tag);
        let woke_after = sent.elapsed();
        assert!(woke_after < Duration::from_secs(2), "{woke_after:?}");
        let (id, body) = q.open(&pushed);
        assert_eq!(body, msg);
        assert_eq!(c.wait_for(tag), Reply::Idle);
        assert_eq!(c.request(&q.ack(id), Some(&q.recipient_key)), Reply::Ok);
    }
    assert_eq!(
        c.next_within(Duration::from_millis(300)),
        None,
        "pushed once"
    );
    relay.stop();
}

fn unsubscribed_queues_push_nothing(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let tag = c.submit(&[(q.sub(16), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    assert_eq!(c.wait_for(tag), Reply::Idle);
    assert_eq!(
        c.request(&tern_wire::Command::Unsubscribe { sub_tag: tag }, None),
        Reply::Ok
    );
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    assert_eq!(c.next_within(Duration::from_millis(400)), None);
    relay.stop();
}

fn shutdown_closes_subscribed_sessions(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    assert_eq!(c.request(&q.sub(1), Some(&q.recipient_key)), Reply::Ok);
    assert_eq!(c.next().1, Reply::Idle);
    let start = Instant::now();
    let stopper = std::thread::spawn(move || relay.stop());
    assert!(c.closed_within(Duration::from_secs(5)));
    stopper.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}
