//! The handler with an injected clock: freshness windows, TTL expiry and
//! long-poll wake-ups, without sleeping and without sockets.

mod common;

use std::sync::mpsc;

use common::{message, seal_request};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::handler::{Handler, Outcome, Policy};
use tern_relay::seal::{self, RelayIdentity, ResponseKey};
use tern_relay::store::Store;
use tern_relay::wire::{Command, ErrorCode, Reply, Response};
use x25519_dalek::{PublicKey, StaticSecret};

const HOUR_MS: u64 = 3_600_000;
/// 2024-01-01 00:10:00 UTC: ten minutes into an hour.
const T0: u64 = 1_704_067_800_000;

struct Fixture {
    handler: Handler,
    key: [u8; 32],
    wakes: mpsc::Receiver<u64>,
    _dir: tempfile::TempDir,
}

fn fixture(policy: Policy) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("relay.db")).unwrap();
    let identity = RelayIdentity::generate(&mut OsRng);
    let key = identity.public();
    let (tx, wakes) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler = Handler::new(
        identity,
        store,
        policy,
        T0,
        Box::new(move |t| {
            let _ = tx.lock().unwrap().send(t);
        }),
    );
    Fixture {
        handler,
        key,
        wakes,
        _dir: dir,
    }
}

fn policy() -> Policy {
    Policy {
        access_key: None,
        ttl_secs: 2 * 3600,
        max_pending: 2,
        max_wait_ms: 30_000,
    }
}

fn reply(key: &ResponseKey, outcome: Outcome) -> Response {
    match outcome {
        Outcome::Reply(block) => Response::decode(&key.open_response(&block).unwrap()).unwrap(),
        Outcome::Reject => panic!("rejected"),
        Outcome::Wait(_) => panic!("unexpected wait"),
    }
}

impl Fixture {
    /// Sends `cmd` stamped `time_ms`, received by the relay at `now_ms`.
    fn at(&self, cmd: &Command, signer: Option<&SigningKey>, time_ms: u64, now_ms: u64) -> Reply {
        let (block, key) = seal_request(&self.key, cmd, signer, time_ms);
        reply(&key, self.handler.handle(&block, now_ms, 0)).reply
    }

    fn now(&self, cmd: &Command, signer: Option<&SigningKey>, now_ms: u64) -> Reply {
        self.at(cmd, signer, now_ms, now_ms)
    }
}

struct Q {
    rid: [u8; 16],
    sid: [u8; 16],
    rkey: SigningKey,
    skey: SigningKey,
    secret: [u8; 32],
}

fn create(f: &Fixture, now: u64) -> Q {
    let rkey = SigningKey::generate(&mut OsRng);
    let dh = StaticSecret::random_from_rng(OsRng);
    let cmd = Command::Create {
        access_key: None,
        recipient_auth: rkey.verifying_key().to_bytes(),
        recipient_dh: PublicKey::from(&dh).to_bytes(),
    };
    let Reply::Queue {
        recipient_id,
        sender_id,
        relay_dh,
    } = f.now(&cmd, Some(&rkey), now)
    else {
        panic!("no queue")
    };
    let q = Q {
        rid: recipient_id,
        sid: sender_id,
        rkey,
        skey: SigningKey::generate(&mut OsRng),
        secret: *seal::queue_secret(&dh, &relay_dh).unwrap(),
    };
    let secure = Command::Secure {
        recipient_id: q.rid,
        sender_auth: q.skey.verifying_key().to_bytes(),
    };
    assert_eq!(f.now(&secure, Some(&q.rkey), now), Reply::Ok);
    q
}

fn send(q: &Q, m: &[u8]) -> Command {
    Command::Send {
        sender_id: q.sid,
        message: m.to_vec(),
    }
}

fn fetch(q: &Q, wait_ms: u32) -> Command {
    Command::Fetch {
        recipient_id: q.rid,
        wait_ms,
    }
}

#[test]
fn freshness_window_boundaries() {
    let f = fixture(policy());
    let now = T0 + 10 * 60_000;
    let info = |t| f.at(&Command::Info, None, t, now);
    assert!(matches!(info(now - 60_000), Reply::Info(_)));
    assert_eq!(info(now - 60_001), Reply::Error(ErrorCode::Stale));
    assert!(matches!(info(now + 60_000), Reply::Info(_)));
    assert_eq!(info(now + 60_001), Reply::Error(ErrorCode::Stale));
    // Never earlier than the relay's start, even inside the window.
    let just_started = T0 + 1000;
    assert_eq!(
        f.at(&Command::Info, None, T0 - 1, just_started),
        Reply::Error(ErrorCode::Stale)
    );
    assert!(matches!(
        f.at(&Command::Info, None, T0, just_started),
        Reply::Info(_)
    ));

    // A replay is refused for as long as it would otherwise be fresh.
    let (block, key) = seal_request(&f.key, &Command::Info, None, now);
    assert!(matches!(
        reply(&key, f.handler.handle(&block, now, 0)).reply,
        Reply::Info(_)
    ));
    for later in [now, now + 1, now + 59_999, now + 60_000] {
        let r = reply(&key, f.handler.handle(&block, later, 0));
        assert_eq!(
            r.reply,
            Reply::Error(ErrorCode::Stale),
            "at +{}",
            later - now
        );
        assert_eq!(r.time_ms, later, "responses carry the relay's clock");
    }
    assert_eq!(
        reply(&key, f.handler.handle(&block, now + 600_000, 0)).reply,
        Reply::Error(ErrorCode::Stale)
    );
}

#[test]
fn expired_messages_are_never_delivered_nor_counted() {
    let f = fixture(policy());
    let q = create(&f, T0);
    let (a, b) = (message(), message());
    assert_eq!(f.now(&send(&q, &a), Some(&q.skey), T0), Reply::Ok);
    assert_eq!(f.now(&send(&q, &b), Some(&q.skey), T0), Reply::Ok);
    assert_eq!(
        f.now(&send(&q, &message()), Some(&q.skey), T0),
        Reply::Error(ErrorCode::QueueFull)
    );

    // Received in hour H (rounded down); with a two-hour TTL it is live until
    // H + 2h, i.e. 1h50 after T0.
    let live = T0 + HOUR_MS + 49 * 60_000;
    match f.now(&fetch(&q, 0), Some(&q.rkey), live) {
        Reply::Message {
            msg_id,
            received_at,
            body,
        } => {
            assert_eq!(received_at, (T0 / HOUR_MS) * 3600);
            assert_eq!(seal::delivery_open(&q.secret, &msg_id, &body).unwrap(), a);
        }
        other => panic!("{other:?}"),
    }
    let expired = T0 + 2 * HOUR_MS - 10 * 60_000;
    assert_eq!(f.now(&fetch(&q, 0), Some(&q.rkey), expired), Reply::Empty);
    // Expired messages free the quota even before they are purged.
    assert_eq!(
        f.now(&send(&q, &message()), Some(&q.skey), expired),
        Reply::Ok
    );
    assert_eq!(f.handler.purge(expired).unwrap(), 2);
    assert!(matches!(
        f.now(&fetch(&q, 0), Some(&q.rkey), expired),
        Reply::Message { .. }
    ));
}

#[test]
fn long_poll_wakes_and_deadlines() {
    let f = fixture(policy());
    let q = create(&f, T0);
    let now = T0 + 1000;

    // Nothing there: the FETCH parks, with the deadline capped by policy.
    let (block, key) = seal_request(&f.key, &fetch(&q, 90_000), Some(&q.rkey), now);
    let Outcome::Wait(wait) = f.handler.handle(&block, now, 77) else {
        panic!("expected a wait")
    };
    assert_eq!(wait.deadline_ms(), now + 30_000);
    assert_eq!(f.handler.waiting(), 1);

    // A SEND wakes ticket 77, and resuming finds the message.
    let m = message();
    assert_eq!(f.now(&send(&q, &m), Some(&q.skey), now + 10), Reply::Ok);
    assert_eq!(f.wakes.try_recv(), Ok(77));
    assert_eq!(f.handler.waiting(), 0);
    let r = reply(&key, f.handler.resume(wait, now + 20, 77, false));
    let Reply::Message { msg_id, body, .. } = r.reply else {
        panic!("{:?}", r.reply)
    };
    assert_eq!(seal::delivery_open(&q.secret, &msg_id, &body).unwrap(), m);
    let ack = Command::Ack {
        recipient_id: q.rid,
        msg_id,
    };
    assert_eq!(f.now(&ack, Some(&q.rkey), now + 30), Reply::Empty);

    // At the deadline (or at shutdown) a parked FETCH gets EMPTY.
    let (block, key) = seal_request(&f.key, &fetch(&q, 5_000), Some(&q.rkey), now + 40);
    let Outcome::Wait(wait) = f.handler.handle(&block, now + 40, 78) else {
        panic!("expected a wait")
    };
    let Outcome::Wait(wait) = f.handler.resume(wait, now + 1000, 78, false) else {
        panic!("woken too early should wait again")
    };
    assert_eq!(
        reply(&key, f.handler.resume(wait, now + 5_040, 78, false)).reply,
        Reply::Empty
    );
    assert_eq!(f.handler.waiting(), 0);

    // A cancelled waiter is not woken.
    let (block, _) = seal_request(&f.key, &fetch(&q, 5_000), Some(&q.rkey), now + 50);
    let Outcome::Wait(wait) = f.handler.handle(&block, now + 50, 79) else {
        panic!("expected a wait")
    };
    f.handler.cancel(&wait, 79);
    assert_eq!(
        f.now(&send(&q, &message()), Some(&q.skey), now + 60),
        Reply::Ok
    );
    assert!(f.wakes.try_recv().is_err());

    // wait_ms 0 never parks.
    let (block, key) = seal_request(&f.key, &fetch(&q, 0), Some(&q.rkey), now + 70);
    assert!(matches!(
        reply(&key, f.handler.handle(&block, now + 70, 80)).reply,
        Reply::Message { .. }
    ));
}

#[test]
fn unopenable_blocks_are_rejected() {
    let f = fixture(policy());
    assert!(matches!(
        f.handler.handle(&[0u8; 100], T0, 0),
        Outcome::Reject
    ));
    let other = RelayIdentity::generate(&mut OsRng);
    let (block, _) = seal_request(&other.public(), &Command::Info, None, T0);
    assert!(matches!(f.handler.handle(&block, T0, 0), Outcome::Reject));
}
