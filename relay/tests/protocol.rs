//! The relay's command semantics and session rules, over real sockets.

mod common;
#[macro_use]
mod pg_common;

use std::time::Duration;

use common::*;
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::AccessKey;
use tern_wire::frame::FRAME_QUANTUM;
use tern_wire::{Command, ErrorCode, Reply, Request, DELIVERED_LEN};
use x25519_dalek::{PublicKey, StaticSecret};

on_both_stores!(
    create_secure_send_subscribe_ack_delete,
    a_new_session_is_pushed_what_was_not_acknowledged,
    unsigned_sends_are_limited_to_one_before_securing,
    wrong_key_and_unknown_queue_look_the_same,
    a_command_signed_for_one_session_is_refused_in_another,
    replayed_reordered_truncated_or_flipped_frames_end_the_session,
    a_wrong_relay_key_learns_nothing_and_sends_nothing,
    queue_quota,
    access_keys_gate_create_only_and_have_quotas,
    queue_creation_is_rate_limited_per_connection_and_address,
    subscriptions_are_limited_per_session,
    a_frame_of_many_sends_is_answered_in_one_go,
);

fn create_secure_send_subscribe_ack_delete(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    assert_eq!((c.info.min_version, c.info.max_version), (2, 2));
    assert!(c.info.open);
    assert_eq!(c.info.max_pending, 1000);
    assert_eq!(c.info.ttl_secs, 21 * 24 * 3600);
    assert_eq!(c.request(&Command::Info, None), Reply::Info(c.info));

    let q = create_queue(&mut c, None);
    // The first handshake message: one unsigned message before securing.
    let hello = message();
    assert_eq!(c.request(&q.send(&hello), None), Reply::Ok);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    // Retrying SECURE with the same key is fine.
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    let m2 = message();
    assert_eq!(c.request(&q.send(&m2), Some(&q.sender_key)), Reply::Ok);
    assert_eq!(c.request(&q.check(), None), Reply::Count(2));

    let tag = c.submit(&[(q.sub(8), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    let first = c.wait_for(tag);
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
    let (id2, body2) = q.open(&c.wait_for(tag));
    assert_eq!(body2, m2);
    assert_ne!(id1, id2);
    assert_eq!(c.wait_for(tag), Reply::Idle);

    // A message arriving while subscribed is pushed at once, then IDLE again.
    let mut sender = relay.client();
    let m3 = message();
    assert_eq!(sender.request(&q.send(&m3), Some(&q.sender_key)), Reply::Ok);
    let (id3, body3) = q.open(&c.wait_for(tag));
    assert_eq!(body3, m3);
    assert_eq!(c.wait_for(tag), Reply::Idle);

    assert_eq!(c.request(&q.ack(id1), Some(&q.recipient_key)), Reply::Ok);
    // A second ACK of the same id: nothing to delete.
    assert_eq!(
        c.request(&q.ack(id1), Some(&q.recipient_key)),
        Reply::Error(ErrorCode::NoMessage)
    );
    assert_eq!(
        c.request(&q.ack_upto(id3), Some(&q.recipient_key)),
        Reply::Ok
    );
    let _ = id2;
    assert_eq!(c.request(&q.check(), None), Reply::Count(0));
    // Nothing is pushed twice on one session.
    assert_eq!(c.next_within(Duration::from_millis(300)), None);

    let if_empty = Command::Delete {
        recipient_id: q.recipient_id,
        if_empty: true,
    };
    assert_eq!(
        sender.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    assert!(matches!(c.wait_for(tag), Reply::Message { .. }));
    assert_eq!(c.wait_for(tag), Reply::Idle);
    assert_eq!(
        c.request(&if_empty, Some(&q.recipient_key)),
        Reply::Error(ErrorCode::NotEmpty)
    );
    let del = c.submit(&[(q.delete(), Some(&q.recipient_key))])[0];
    // The subscription ends with its queue.
    assert_eq!(c.wait_for(tag), Reply::Ended);
    assert_eq!(c.wait_for(del), Reply::Ok);
    assert_eq!(c.request(&q.check(), None), Reply::Error(ErrorCode::Auth));
    assert_eq!(
        c.request(&q.sub(1), Some(&q.recipient_key)),
        Reply::Error(ErrorCode::Auth)
    );
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Error(ErrorCode::Auth)
    );
    relay.stop();
}

fn a_new_session_is_pushed_what_was_not_acknowledged(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let sent: Vec<Vec<u8>> = (0..5).map(|_| message()).collect();
    for m in &sent {
        assert_eq!(c.request(&q.send(m), Some(&q.sender_key)), Reply::Ok);
    }
    // A window of 2: two pushed, then nothing until acknowledged.
    let tag = c.submit(&[(q.sub(2), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    let (a, _) = q.open(&c.wait_for(tag));
    let (b, _) = q.open(&c.wait_for(tag));
    assert_eq!(c.next_within(Duration::from_millis(300)), None);
    assert_eq!(c.request(&q.ack_upto(b), Some(&q.recipient_key)), Reply::Ok);
    let _ = a;
    let (cid, cm) = q.open(&c.wait_for(tag));
    assert_eq!(cm, sent[2]);
    // The subscriber goes away mid-push: nothing is lost.
    drop(c);
    let mut again = relay.client();
    let rest = drain(&mut again, &q);
    let bodies: Vec<&Vec<u8>> = rest.iter().map(|(_, m)| m).collect();
    assert_eq!(bodies, vec![&sent[2], &sent[3], &sent[4]]);
    assert_eq!(rest[0].0, cid);
    relay.stop();
}

fn unsigned_sends_are_limited_to_one_before_securing(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
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
    // Signed before securing: refused, as not secured yet; by the wrong
    // key: refused.
    let q2 = create_queue(&mut c, None);
    assert_eq!(
        c.request(&q2.send(&message()), Some(&q2.sender_key)),
        Reply::Error(ErrorCode::NotSecured)
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

fn wrong_key_and_unknown_queue_look_the_same(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let wrong = SigningKey::generate(&mut OsRng);
    let unknown = [0x42u8; 16];

    let commands = |rid: [u8; 16], sid: [u8; 16]| {
        vec![
            Command::Secure {
                recipient_id: rid,
                sender_auth: [1; 32],
            },
            Command::Subscribe {
                recipient_id: rid,
                window: 1,
            },
            Command::Ack {
                recipient_id: rid,
                msg_id: [0; 16],
            },
            Command::AckUpTo {
                recipient_id: rid,
                msg_id: [0; 16],
            },
            Command::Delete {
                recipient_id: rid,
                if_empty: false,
            },
            Command::Send {
                sender_id: sid,
                message: message(),
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
    }
    // The queue is intact.
    assert_eq!(c.request(&q.check(), None), Reply::Count(0));
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    relay.stop();
}

fn a_command_signed_for_one_session_is_refused_in_another(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut a = relay.client();
    let mut b = relay.client();
    let q = secured_queue(&mut a);
    assert_eq!(
        a.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    // A DELETE signed for session A, replayed inside session B.
    let mut record = Vec::new();
    Request::encode(
        7,
        &q.delete(),
        &a.hash(),
        Some(&q.recipient_key),
        &mut record,
    );
    let mut frame = record.clone();
    frame.resize(FRAME_QUANTUM, 0);
    let sealed = b.seal(&frame);
    b.send_raw(sealed).unwrap();
    assert_eq!(b.wait_for(7), Reply::Error(ErrorCode::Auth));
    assert_eq!(a.request(&q.check(), None), Reply::Count(1));
    relay.stop();
}

fn replayed_reordered_truncated_or_flipped_frames_end_the_session(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut setup = relay.client();
    let q = secured_queue(&mut setup);
    let frame_with = |c: &mut Client, cmd: &Command, key: Option<&SigningKey>, tag: u32| {
        let mut rec = Vec::new();
        Request::encode(tag, cmd, &c.hash(), key, &mut rec);
        rec.resize(rec.len().div_ceil(FRAME_QUANTUM) * FRAME_QUANTUM, 0);
        c.seal(&rec)
    };
    type Mangle = fn(Vec<u8>, Vec<u8>) -> Vec<Vec<u8>>;
    let cases: Vec<(&str, Mangle)> = vec![
        ("replayed", |a, _| vec![a.clone(), a]),
        ("reordered", |a, b| vec![b, a]),
        ("truncated", |a, _| vec![a[..a.len() - 1].to_vec()]),
        ("flipped", |mut a, _| {
            a[20] ^= 1;
            vec![a]
        }),
        ("empty", |_, _| vec![Vec::new()]),
    ];
    for (name, mangle) in cases {
        let mut c = relay.client();
        let a = frame_with(&mut c, &q.send(&message()), Some(&q.sender_key), 1);
        let b = frame_with(&mut c, &q.send(&message()), Some(&q.sender_key), 2);
        let msgs = mangle(a, b);
        let honest_first = name == "replayed";
        for m in msgs {
            let _ = c.send_raw(m);
        }
        if honest_first {
            // The first copy is executed and answered; the replay ends it.
            assert_eq!(c.wait_for(1), Reply::Ok);
        }
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "{name}: session ended"
        );
        let expected = u32::from(honest_first);
        assert_eq!(
            setup.request(&q.check(), None),
            Reply::Count(expected),
            "{name}"
        );
        if honest_first {
            drain(&mut setup, &q).into_iter().for_each(|(id, _)| {
                assert_eq!(setup.request(&q.ack(id), Some(&q.recipient_key)), Reply::Ok)
            });
        }
    }
    relay.stop();
}

fn a_wrong_relay_key_learns_nothing_and_sends_nothing(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let other = PublicKey::from(&StaticSecret::random_from_rng(OsRng)).to_bytes();
    let err = Client::try_new(relay.addr, other).err().expect("refused");
    assert!(!err.is_empty());
    // The relay is still fine.
    let mut c = relay.client();
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
    relay.stop();
}

fn queue_quota(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |cfg| cfg.max_pending = 3);
    let mut c = relay.client();
    let q = secured_queue(&mut c);
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
    let got = drain(&mut c, &q);
    assert_eq!(
        c.request(&q.ack(got[0].0), Some(&q.recipient_key)),
        Reply::Ok
    );
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    assert_eq!(c.info.max_pending, 3);
    relay.stop();
}

fn access_keys_gate_create_only_and_have_quotas(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |cfg| {
        cfg.access_keys = vec![
            AccessKey::new("Open-Sesame_1"),
            AccessKey {
                key: "friend".into(),
                max_queues: 2,
            },
        ]
    });
    assert_eq!(relay.address.access_key.as_deref(), Some("Open-Sesame_1"));
    let mut c = relay.client();
    assert!(!c.info.open);
    for bad in [
        None,
        Some("open-sesame_1"),
        Some("Open-Sesame_"),
        Some("Open-Sesame_12"),
    ] {
        let (cmd, key, _) = create_command(bad);
        assert_eq!(
            c.request(&cmd, Some(&key)),
            Reply::Error(ErrorCode::Access),
            "{bad:?}"
        );
    }
    // CREATE must be signed by the key it registers.
    let (cmd, _, _) = create_command(Some("Open-Sesame_1"));
    let stranger = SigningKey::generate(&mut OsRng);
    assert_eq!(
        c.request(&cmd, Some(&stranger)),
        Reply::Error(ErrorCode::Auth)
    );
    let q = create_queue(&mut c, Some("Open-Sesame_1"));
    // Sending needs no access key.
    assert_eq!(c.request(&q.send(&message()), None), Reply::Ok);
    // The second key may have two queues.
    create_queue(&mut c, Some("friend"));
    create_queue(&mut c, Some("friend"));
    let (cmd, key, _) = create_command(Some("friend"));
    assert_eq!(c.request(&cmd, Some(&key)), Reply::Error(ErrorCode::Quota));
    relay.stop();
}

fn queue_creation_is_rate_limited_per_connection_and_address(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |cfg| {
        cfg.create_rate_connection = tern_relay::limits::Rate {
            burst: 5,
            per_minute: 1,
        };
        cfg.create_rate_address = tern_relay::limits::Rate {
            burst: 8,
            per_minute: 1,
        };
    });
    let mut a = relay.client();
    let create = |c: &mut Client| {
        let (cmd, key, _) = create_command(None);
        c.request(&cmd, Some(&key))
    };
    let first = create_queue(&mut a, None);
    for _ in 0..4 {
        assert!(matches!(create(&mut a), Reply::Queue { .. }));
    }
    assert_eq!(create(&mut a), Reply::Error(ErrorCode::RateLimited));
    // A new connection from the same address has what the address has left.
    let mut b = relay.client();
    for _ in 0..3 {
        assert!(matches!(create(&mut b), Reply::Queue { .. }));
    }
    assert_eq!(create(&mut b), Reply::Error(ErrorCode::RateLimited));
    // Everything else still works.
    assert_eq!(b.request(&first.check(), None), Reply::Count(0));
    assert_eq!(
        a.request(&first.secure(), Some(&first.recipient_key)),
        Reply::Ok
    );
    relay.stop();
}

fn subscriptions_are_limited_per_session(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |cfg| cfg.max_subscriptions = 2);
    let mut c = relay.client();
    let qs: Vec<Queue> = (0..3).map(|_| secured_queue(&mut c)).collect();
    assert_eq!(
        c.request(&qs[0].sub(1), Some(&qs[0].recipient_key)),
        Reply::Ok
    );
    assert_eq!(
        c.request(&qs[1].sub(1), Some(&qs[1].recipient_key)),
        Reply::Ok
    );
    assert_eq!(
        c.request(&qs[2].sub(1), Some(&qs[2].recipient_key)),
        Reply::Error(ErrorCode::Limit)
    );
    relay.stop();
}

fn a_frame_of_many_sends_is_answered_in_one_go(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let relay = db.relay(dir.path(), |_| {});
    let mut c = relay.client();
    let qs: Vec<Queue> = (0..12).map(|_| secured_queue(&mut c)).collect();
    let cmds: Vec<(Command, Option<&SigningKey>)> = qs
        .iter()
        .map(|q| (q.send(&message()), Some(&q.sender_key)))
        .collect();
    let tags = c.submit(&cmds);
    for t in tags {
        assert_eq!(c.wait_for(t), Reply::Ok);
    }
    let checks: Vec<(Command, Option<&SigningKey>)> =
        qs.iter().map(|q| (q.check(), None)).collect();
    for t in c.submit(&checks) {
        assert_eq!(c.wait_for(t), Reply::Count(1));
    }
    relay.stop();
}
