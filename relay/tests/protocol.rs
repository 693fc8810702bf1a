//! The relay's command semantics, over real sockets.

mod common;

use common::*;
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::seal::{RelayIdentity, RequestSealer};
use tern_relay::wire::{Command, ErrorCode, Reply, Request, DELIVERED_LEN};

#[test]
fn create_secure_send_fetch_ack_delete() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();

    match c.request(&Command::Info, None) {
        Reply::Info(i) => {
            assert_eq!((i.min_version, i.max_version), (1, 1));
            assert!(i.open);
            assert_eq!(i.max_pending, 1000);
            assert_eq!(i.ttl_secs, 21 * 24 * 3600);
            assert_eq!(i.max_wait_ms, 30_000);
        }
        other => panic!("{other:?}"),
    }

    let q = create_queue(&mut c, None);
    // The connection request: one unsigned message before securing.
    let hello = message();
    assert_eq!(c.request(&q.send(&hello), None), Reply::Ok);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    // Retrying SECURE with the same key is fine.
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    let m2 = message();
    assert_eq!(c.request(&q.send(&m2), Some(&q.sender_key)), Reply::Ok);

    let first = c.request(&q.fetch(0), Some(&q.recipient_key));
    let (id1, body1) = q.open(&first);
    assert_eq!(body1, hello);
    if let Reply::Message {
        received_at, body, ..
    } = &first
    {
        assert_eq!(body.len(), DELIVERED_LEN);
        let now = now_ms() / 1000;
        assert!(
            *received_at <= now && now - received_at < 3600,
            "rounded to the hour"
        );
        assert_eq!(received_at % 3600, 0);
    }
    // FETCH does not remove: the same message comes again until acknowledged.
    assert_eq!(
        q.open(&c.request(&q.fetch(0), Some(&q.recipient_key))).0,
        id1
    );

    let next = c.request(&q.ack(id1), Some(&q.recipient_key));
    let (id2, body2) = q.open(&next);
    assert_eq!(body2, m2);
    assert_ne!(id1, id2);
    // A second ACK of the same id: nothing to delete.
    assert_eq!(
        c.request(&q.ack(id1), Some(&q.recipient_key)),
        Reply::Error(ErrorCode::NoMessage)
    );
    assert_eq!(c.request(&q.ack(id2), Some(&q.recipient_key)), Reply::Empty);
    assert_eq!(c.request(&q.fetch(0), Some(&q.recipient_key)), Reply::Empty);

    assert_eq!(c.request(&q.delete(), Some(&q.recipient_key)), Reply::Ok);
    assert_eq!(
        c.request(&q.fetch(0), Some(&q.recipient_key)),
        Reply::Error(ErrorCode::Auth)
    );
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Error(ErrorCode::Auth)
    );
    relay.stop();
}

#[test]
fn peek_reads_ahead_and_ack_upto_acknowledges_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    let sent: Vec<Vec<u8>> = (0..4).map(|_| message()).collect();
    for m in &sent[..3] {
        assert_eq!(c.request(&q.send(m), Some(&q.sender_key)), Reply::Ok);
    }
    let peek = |after| Command::Peek {
        recipient_id: q.recipient_id,
        after,
    };
    let up_to = |msg_id| Command::AckUpTo {
        recipient_id: q.recipient_id,
        msg_id,
    };
    // FETCH, then PEEK after each message read: the queue in order, intact.
    let (id1, m1) = q.open(&c.request(&q.fetch(0), Some(&q.recipient_key)));
    let (id2, m2) = q.open(&c.request(&peek(id1), Some(&q.recipient_key)));
    let (id3, m3) = q.open(&c.request(&peek(id2), Some(&q.recipient_key)));
    assert_eq!([m1, m2, m3], [&sent[0][..], &sent[1][..], &sent[2][..]]);
    assert_eq!(c.request(&peek(id3), Some(&q.recipient_key)), Reply::Empty);
    assert_eq!(
        q.open(&c.request(&q.fetch(0), Some(&q.recipient_key))).0,
        id1
    );
    // A message queued after the run is read is not acknowledged with it.
    assert_eq!(c.request(&q.send(&sent[3]), Some(&q.sender_key)), Reply::Ok);
    let next = c.request(&up_to(id2), Some(&q.recipient_key));
    assert_eq!(q.open(&next).0, id3);
    let (id4, m4) = q.open(&c.request(&up_to(id3), Some(&q.recipient_key)));
    assert_eq!(m4, sent[3]);
    // Gone: the ids acknowledged are not in the queue any more.
    for cmd in [peek(id1), up_to(id2)] {
        assert_eq!(
            c.request(&cmd, Some(&q.recipient_key)),
            Reply::Error(ErrorCode::NoMessage)
        );
    }
    assert_eq!(c.request(&up_to(id4), Some(&q.recipient_key)), Reply::Empty);
    assert_eq!(c.request(&q.fetch(0), Some(&q.recipient_key)), Reply::Empty);
    relay.stop();
}

#[test]
fn unsigned_sends_are_limited_to_one_before_securing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();

    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.send(&message()), None), Reply::Ok);
    assert_eq!(
        c.request(&q.send(&message()), None),
        Reply::Error(ErrorCode::Auth)
    );

    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    assert_eq!(
        c.request(&q.send(&message()), None),
        Reply::Error(ErrorCode::Auth)
    );
    // Signed by the wrong key, or signed before securing: refused too.
    let q2 = create_queue(&mut c, None);
    assert_eq!(
        c.request(&q2.send(&message()), Some(&q2.sender_key)),
        Reply::Error(ErrorCode::Auth)
    );
    let stranger = SigningKey::generate(&mut OsRng);
    assert_eq!(
        c.request(&q.send(&message()), Some(&stranger)),
        Reply::Error(ErrorCode::Auth)
    );
    // A different sender key once secured.
    let other = Command::Secure {
        recipient_id: q.recipient_id,
        sender_auth: stranger.verifying_key().to_bytes(),
    };
    assert_eq!(
        c.request(&other, Some(&q.recipient_key)),
        Reply::Error(ErrorCode::Auth)
    );
    relay.stop();
}

#[test]
fn wrong_key_and_unknown_queue_look_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    let wrong = SigningKey::generate(&mut OsRng);
    let unknown = [0x42u8; 16];

    let commands = |rid: [u8; 16], sid: [u8; 16]| {
        vec![
            Command::Secure {
                recipient_id: rid,
                sender_auth: [1; 32],
            },
            Command::Fetch {
                recipient_id: rid,
                wait_ms: 0,
            },
            Command::Ack {
                recipient_id: rid,
                msg_id: [0; 16],
            },
            Command::Delete { recipient_id: rid },
            Command::Send {
                sender_id: sid,
                message: message(),
            },
            Command::Peek {
                recipient_id: rid,
                after: [0; 16],
            },
            Command::AckUpTo {
                recipient_id: rid,
                msg_id: [0; 16],
            },
        ]
    };
    for (known, unknown_cmd) in commands(q.recipient_id, q.sender_id)
        .into_iter()
        .zip(commands(unknown, unknown))
    {
        let a = c.request(&known, Some(&wrong));
        let b = c.request(&unknown_cmd, Some(&wrong));
        assert_eq!(a, Reply::Error(ErrorCode::Auth), "{known:?}");
        assert_eq!(a, b, "{known:?}");
        // Same plaintext apart from the relay's clock.
        let with_time = |r: Reply| {
            tern_relay::wire::Response {
                time_ms: 0,
                reply: r,
            }
            .encode()
        };
        assert_eq!(with_time(a), with_time(b));
    }
    // The queue is intact.
    assert_eq!(c.request(&q.fetch(0), Some(&q.recipient_key)), Reply::Empty);
    relay.stop();
}

#[test]
fn replayed_block_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    let (block, key) = seal_request(&relay.key(), &q.send(&message()), None, now_ms());
    let first = c.conn.post(&block);
    assert_eq!(open_response(&key, &first.body).reply, Reply::Ok);
    // Replayed on the same connection and on a new one.
    let again = c.conn.post(&block);
    assert_eq!(again.status, 200);
    let resp = open_response(&key, &again.body);
    assert_eq!(resp.reply, Reply::Error(ErrorCode::Stale));
    let mut other = relay.client();
    assert_eq!(
        open_response(&key, &other.conn.post(&block).body).reply,
        Reply::Error(ErrorCode::Stale)
    );
    // Only one message was stored.
    let m = c.request(&q.fetch(0), Some(&q.recipient_key));
    let (id, _) = q.open(&m);
    assert_eq!(c.request(&q.ack(id), Some(&q.recipient_key)), Reply::Empty);
    relay.stop();
}

#[test]
fn stale_and_future_times_are_refused_with_the_relay_clock() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let now = now_ms();
    for t in [now - 120_000, now + 120_000, 0, u64::MAX] {
        let resp = c.request_at(&Command::Info, None, t);
        assert_eq!(resp.reply, Reply::Error(ErrorCode::Stale), "time {t}");
        // The relay's clock comes back so the client can correct its own.
        assert!(resp.time_ms.abs_diff(now_ms()) < 5_000);
    }
    // Within the window, but before the relay started (the replay cache does
    // not survive restarts, so those are refused too).
    let resp = c.request_at(&Command::Info, None, now - 30_000);
    assert_eq!(resp.reply, Reply::Error(ErrorCode::Stale));
    assert!(matches!(
        c.request_at(&Command::Info, None, now + 30_000).reply,
        Reply::Info(_)
    ));
    relay.stop();
}

#[test]
fn block_for_another_relay_gets_a_bare_400() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let other = RelayIdentity::generate(&mut OsRng);
    let (block, _) = seal_request(&other.public(), &Command::Info, None, now_ms());
    let resp = c.conn.post(&block);
    assert_eq!(resp.status, 400);
    assert!(resp.body.is_empty());
    // The connection stays usable.
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
    relay.stop();
}

#[test]
fn malformed_plaintext_is_a_sealed_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let sealer = RequestSealer::new(&relay.key(), &mut OsRng).unwrap();
    let mut pt = Request::encode(&Command::Info, now_ms(), sealer.enc(), None);
    pt[0] = 0x7e; // unknown command
    let (block, key) = sealer.seal(&pt).unwrap();
    let resp = c.conn.post(&block);
    assert_eq!(resp.status, 200);
    assert_eq!(
        open_response(&key, &resp.body).reply,
        Reply::Error(ErrorCode::BadRequest)
    );
    relay.stop();
}

#[test]
fn queue_quota() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_pending = 3);
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    for _ in 0..3 {
        assert_eq!(
            c.request(&q.send(&message()), Some(&q.sender_key)),
            Reply::Ok
        );
    }
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Error(ErrorCode::QueueFull)
    );
    // Acknowledging makes room.
    let (id, _) = q.open(&c.request(&q.fetch(0), Some(&q.recipient_key)));
    assert!(matches!(
        c.request(&q.ack(id), Some(&q.recipient_key)),
        Reply::Message { .. }
    ));
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    match c.request(&Command::Info, None) {
        Reply::Info(i) => assert_eq!(i.max_pending, 3),
        other => panic!("{other:?}"),
    }
    relay.stop();
}

#[test]
fn access_key_gates_create_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.access_key = Some("Open-Sesame_1".into())
    });
    assert_eq!(relay.address.access_key.as_deref(), Some("Open-Sesame_1"));
    let mut c = relay.client();
    match c.request(&Command::Info, None) {
        Reply::Info(i) => assert!(!i.open),
        other => panic!("{other:?}"),
    }
    for bad in [
        None,
        Some("open-sesame_1"),
        Some("Open-Sesame_"),
        Some("Open-Sesame_12"),
    ] {
        let key = SigningKey::generate(&mut OsRng);
        let cmd = Command::Create {
            access_key: bad.map(str::to_string),
            recipient_auth: key.verifying_key().to_bytes(),
            recipient_dh: [9; 32],
        };
        assert_eq!(
            c.request(&cmd, Some(&key)),
            Reply::Error(ErrorCode::Access),
            "{bad:?}"
        );
    }
    // CREATE must be signed by the key it registers.
    let key = SigningKey::generate(&mut OsRng);
    let cmd = Command::Create {
        access_key: Some("Open-Sesame_1".into()),
        recipient_auth: key.verifying_key().to_bytes(),
        recipient_dh: [9; 32],
    };
    let stranger = SigningKey::generate(&mut OsRng);
    assert_eq!(
        c.request(&cmd, Some(&stranger)),
        Reply::Error(ErrorCode::Auth)
    );
    let q = create_queue(&mut c, Some("Open-Sesame_1"));
    // Sending needs no access key.
    assert_eq!(c.request(&q.send(&message()), None), Reply::Ok);
    relay.stop();
}
