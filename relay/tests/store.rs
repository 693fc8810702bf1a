//! The store's operations, case by case, against both backends: SQLite in a
//! temporary directory and PostgreSQL on a server these tests start (see
//! `pg_common`; skipped with a note where PostgreSQL is not installed).

mod pg_common;

use pg_common::PgServer;
use tern_relay::store::{
    AckOutcome, CreateOutcome, DeleteOutcome, NewMessage, NewQueue, QueueRef, SecureOutcome,
    SendAuth, SendOutcome, Store, StoredMessage, DB_FILE,
};
use zeroize::Zeroizing;

fn new_queue(n: u8, key_id: Option<i64>, max_queues: u64) -> NewQueue {
    NewQueue {
        recipient_hash: [n; 32],
        sender_hash: [n + 100; 32],
        recipient_auth: [1; 32],
        queue_secret: Zeroizing::new([2; 32]),
        key_id,
        max_queues,
        day: 100,
    }
}

fn queue(store: &Store, n: u8) -> QueueRef {
    match store.create_queue(new_queue(n, None, 10)).wait().unwrap() {
        CreateOutcome::Created(q) => q,
        other => panic!("{other:?}"),
    }
}

fn msg(queue: QueueRef, id: u8, auth: SendAuth, hour: i64) -> NewMessage {
    NewMessage {
        queue,
        auth,
        msg_id: [id; 16],
        received_hour: hour,
        body: vec![id; 10],
        max_pending: 3,
        expired_upto: 0,
        day: 101,
    }
}

fn ids(v: Vec<StoredMessage>) -> Vec<u8> {
    v.into_iter().map(|m| m.msg_id[0]).collect()
}

fn fifo_quota_ack_and_unsigned_once(store: &Store) {
    let q = queue(store, 1);
    let mut dup = new_queue(1, None, 10);
    dup.sender_hash = [9; 32];
    assert_eq!(
        store.create_queue(dup).wait().unwrap(),
        CreateOutcome::Collision
    );
    let send = |m| store.send(m).wait().unwrap();
    assert_eq!(send(msg(q, 1, SendAuth::Unsigned, 10)), SendOutcome::Stored);
    assert_eq!(send(msg(q, 2, SendAuth::Unsigned, 10)), SendOutcome::Auth);
    assert_eq!(
        send(msg(q, 2, SendAuth::Signed([5; 32]), 10)),
        SendOutcome::Auth
    );
    let secure = |k| store.secure(q, k, 101).wait().unwrap();
    assert_eq!(secure([5; 32]), SecureOutcome::Secured);
    assert_eq!(secure([5; 32]), SecureOutcome::Secured);
    assert_eq!(secure([6; 32]), SecureOutcome::Auth);
    // Several writes submitted before any is waited for share a commit.
    let pending: Vec<_> = (2..=3)
        .map(|id| store.send(msg(q, id, SendAuth::Signed([5; 32]), 10)))
        .collect();
    for p in pending {
        assert_eq!(p.wait().unwrap(), SendOutcome::Stored);
    }
    assert_eq!(
        send(msg(q, 4, SendAuth::Signed([5; 32]), 10)),
        SendOutcome::QueueFull
    );
    assert_eq!(
        ids(store.messages_after(q, 0, 0, 10).unwrap()),
        vec![1, 2, 3]
    );
    assert_eq!(store.count_live(q, 0).unwrap(), 3);
    assert_eq!(store.ack(q, [9; 16]).wait().unwrap(), AckOutcome::NoMessage);
    assert_eq!(store.ack(q, [1; 16]).wait().unwrap(), AckOutcome::Deleted);
    let rest = store.messages_after(q, 0, 0, 1).unwrap();
    assert_eq!(ids(rest.clone()), vec![2]);
    assert_eq!(
        ids(store.messages_after(q, rest[0].seq, 0, 10).unwrap()),
        vec![3]
    );
    assert_eq!(
        store.ack_up_to(q, [1; 16]).wait().unwrap(),
        AckOutcome::NoMessage
    );
    assert_eq!(
        send(msg(q, 4, SendAuth::Signed([5; 32]), 10)),
        SendOutcome::Stored
    );
    assert_eq!(
        store.ack_up_to(q, [3; 16]).wait().unwrap(),
        AckOutcome::Deleted
    );
    assert_eq!(ids(store.messages_after(q, 0, 0, 10).unwrap()), vec![4]);
    // A stored message counts towards the high-water mark.
    assert!(store.size_bytes().unwrap() > 0);
    assert_eq!(
        store.delete_queue(q, true, 0).wait().unwrap(),
        DeleteOutcome::NotEmpty
    );
    // Expired messages are neither delivered nor counted.
    assert!(store.messages_after(q, 0, 10, 10).unwrap().is_empty());
    assert_eq!(store.count_live(q, 10).unwrap(), 0);
    assert_eq!(store.purge_expired(10).unwrap(), 1);
    assert_eq!(
        store.delete_queue(q, true, 0).wait().unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(store.queue_by_recipient(&[1; 32]).unwrap().is_none());
    store.checkpoint().unwrap();
}

fn quotas_per_access_key(store: &Store) {
    let create = |n, key| store.create_queue(new_queue(n, key, 2)).wait().unwrap();
    assert!(matches!(create(1, Some(7)), CreateOutcome::Created(_)));
    assert!(matches!(create(2, Some(7)), CreateOutcome::Created(_)));
    assert_eq!(create(3, Some(7)), CreateOutcome::Quota);
    assert!(matches!(create(4, Some(8)), CreateOutcome::Created(_)));
    assert!(matches!(create(5, None), CreateOutcome::Created(_)));
}

fn unsecured_and_idle_queues_expire(store: &Store) {
    let unsecured = queue(store, 1);
    let secured = queue(store, 2);
    assert_eq!(
        store.secure(secured, [5; 32], 100).wait().unwrap(),
        SecureOutcome::Secured
    );
    // Day 100 is not before day 100: nothing goes.
    assert!(store.expire_queues(100, 90).unwrap().is_empty());
    assert_eq!(store.expire_queues(101, 90).unwrap(), vec![unsecured]);
    store.touch(secured, 120).wait().unwrap();
    assert!(store.expire_queues(121, 120).unwrap().is_empty());
    assert_eq!(store.expire_queues(121, 121).unwrap(), vec![secured]);
}

/// Every case, on a fresh SQLite store each.
#[test]
fn sqlite_store() {
    for case in CASES {
        let dir = tempfile::tempdir().unwrap();
        case(&Store::open(&dir.path().join(DB_FILE)).unwrap());
    }
}

/// Every case, on a fresh PostgreSQL database each, one server.
#[test]
fn postgres_store() {
    let Some(pg) = PgServer::start() else { return };
    for case in CASES {
        case(&Store::open_postgres(&pg.database()).unwrap());
    }
}

const CASES: [fn(&Store); 3] = [
    fifo_quota_ack_and_unsigned_once,
    quotas_per_access_key,
    unsecured_and_idle_queues_expire,
];
