//! The handler with an injected clock: TTL expiry, queue expiry and
//! subscription wake-ups, without sleeping and without sockets.

mod common;

use std::sync::mpsc;

use common::message;
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::config::{DEFAULT_CREATE_RATE_ADDRESS, DEFAULT_CREATE_RATE_CONNECTION};
use tern_relay::handler::{Handler, Policy, SessionState};
use tern_relay::limits::Origin;
use tern_relay::store::{QueueRef, Store};
use tern_wire::delivery::{delivery_open, queue_secret};
use tern_wire::frame::{parse_replies, FrameBuilder};
use tern_wire::{ClientHandshake, Command, ErrorCode, Reply, Request, Session};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// 2024-01-01 00:10:00 UTC: ten minutes into an hour.
const T0: u64 = 1_704_067_800_000;

struct Fixture {
    handler: Handler,
    state: Box<SessionState>,
    client: Session,
    wakes: mpsc::Receiver<(u64, QueueRef, bool)>,
    next_tag: u32,
    _dir: tempfile::TempDir,
}

fn policy() -> Policy {
    Policy {
        access_keys: Vec::new(),
        ttl_secs: 2 * 3600,
        max_pending: 2,
        max_data_bytes: u64::MAX,
        max_open_queues: 1000,
        unsecured_days: 1,
        create_rate_connection: DEFAULT_CREATE_RATE_CONNECTION,
        create_rate_address: DEFAULT_CREATE_RATE_ADDRESS,
        max_subscriptions: 16,
        max_window: 8,
        session_push_budget: 16,
    }
}

fn fixture(policy: Policy) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("relay.db")).unwrap();
    let secret = StaticSecret::random_from_rng(OsRng);
    let public = PublicKey::from(&secret).to_bytes();
    let (tx, wakes) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler = Handler::new(
        Zeroizing::new(secret.to_bytes()),
        store,
        policy,
        Box::new(move |t, q, gone| {
            let _ = tx.lock().unwrap().send((t, q, gone));
        }),
    );
    let (hs, msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
    let (state, msg2) = handler
        .handshake(&msg1, 42, Origin::of("127.0.0.1".parse().unwrap()))
        .unwrap();
    let (client, _) = hs.finish(&msg2).unwrap();
    Fixture {
        handler,
        state,
        client,
        wakes,
        next_tag: 1,
        _dir: dir,
    }
}

impl Fixture {
    /// Runs one job at `now_ms` with these commands and wakes; returns every
    /// record it produced.
    fn job(
        &mut self,
        cmds: &[(&Command, Option<&SigningKey>)],
        wakes: &[(QueueRef, bool)],
        now_ms: u64,
    ) -> Vec<(u32, Reply)> {
        let mut frames = FrameBuilder::new();
        for (cmd, key) in cmds {
            let mut rec = Vec::new();
            Request::encode(self.next_tag, cmd, self.client.hash(), *key, &mut rec);
            self.next_tag += 1;
            frames.push(&rec);
        }
        let messages: Vec<Vec<u8>> = frames
            .finish()
            .iter()
            .map(|f| self.client.seal(f).unwrap())
            .collect();
        let out = self
            .handler
            .process(&mut self.state, &messages, wakes, now_ms);
        assert!(!out.close);
        out.messages
            .iter()
            .flat_map(|m| parse_replies(&self.client.open(m).unwrap()).unwrap())
            .collect()
    }

    fn now(&mut self, cmd: &Command, key: Option<&SigningKey>, now_ms: u64) -> Reply {
        let tag = self.next_tag;
        let records = self.job(&[(cmd, key)], &[], now_ms);
        records
            .into_iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, r)| r)
            .expect("an answer")
    }
}

struct Q {
    rid: [u8; 16],
    sid: [u8; 16],
    rkey: SigningKey,
    skey: SigningKey,
    secret: [u8; 32],
}

fn create(f: &mut Fixture, now: u64, secure: bool) -> Q {
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
        secret: *queue_secret(&dh, &relay_dh).unwrap(),
    };
    if secure {
        let cmd = Command::Secure {
            recipient_id: q.rid,
            sender_auth: q.skey.verifying_key().to_bytes(),
        };
        assert_eq!(f.now(&cmd, Some(&q.rkey), now), Reply::Ok);
    }
    q
}

fn send(q: &Q, m: &[u8]) -> Command {
    Command::Send {
        sender_id: q.sid,
        message: m.to_vec(),
    }
}

fn sub(q: &Q) -> Command {
    Command::Subscribe {
        recipient_id: q.rid,
        window: 8,
    }
}

fn check(q: &Q) -> Command {
    Command::Check {
        recipient_id: q.rid,
    }
}

#[test]
fn expired_messages_are_never_delivered_nor_counted() {
    let mut f = fixture(policy());
    let q = create(&mut f, T0, true);
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
    assert_eq!(f.now(&check(&q), None, live), Reply::Count(2));
    let expired = T0 + 2 * HOUR_MS - 10 * 60_000;
    assert_eq!(f.now(&check(&q), None, expired), Reply::Count(0));
    // Expired messages free the quota even before they are purged...
    assert_eq!(
        f.now(&send(&q, &message()), Some(&q.skey), expired),
        Reply::Ok
    );
    assert_eq!(f.handler.purge(expired).unwrap(), (2, 0));
    // ...and are never pushed: only the new one is.
    let records = f.job(&[(&sub(&q), Some(&q.rkey))], &[], expired);
    let pushed: Vec<&Reply> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| matches!(r, Reply::Message { .. }))
        .collect();
    assert_eq!(pushed.len(), 1);
    if let Reply::Message {
        msg_id,
        received_at,
        body,
    } = pushed[0]
    {
        assert_eq!(*received_at, (expired / HOUR_MS) * 3600);
        assert!(delivery_open(&q.secret, msg_id, body).is_ok());
    }
    let _ = (a, b);
}

#[test]
fn subscriptions_are_woken_by_sends_and_deletes() {
    let mut f = fixture(policy());
    let q = create(&mut f, T0, true);
    let records = f.job(&[(&sub(&q), Some(&q.rkey))], &[], T0);
    assert_eq!(
        records.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        vec![Reply::Ok, Reply::Idle]
    );
    // A SEND, here on the same session for brevity, wakes the subscription.
    let m = message();
    assert_eq!(f.now(&send(&q, &m), Some(&q.skey), T0), Reply::Ok);
    let (ticket, queue, gone) = f.wakes.try_recv().expect("a wake");
    assert_eq!((ticket, gone), (42, false));
    let records = f.job(&[], &[(queue, false)], T0);
    match &records[..] {
        [(_, Reply::Message { msg_id, body, .. }), (_, Reply::Idle)] => {
            assert_eq!(delivery_open(&q.secret, msg_id, body).unwrap(), m);
        }
        other => panic!("{other:?}"),
    }
    // A wake with nothing new pushes nothing.
    assert!(f.job(&[], &[(queue, false)], T0).is_empty());
    // Gone: the subscription ends.
    let records = f.job(&[], &[(queue, true)], T0);
    assert_eq!(
        records.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        vec![Reply::Ended]
    );
    assert_eq!(f.handler.subscriptions(), 0);
}

#[test]
fn never_secured_and_idle_queues_expire() {
    let mut f = fixture(policy());
    let invitation = create(&mut f, T0, false);
    let answered = create(&mut f, T0, false);
    let used = create(&mut f, T0, true);
    // The one unsigned message of a handshake counts as use, and reading
    // keeps a secured queue alive.
    assert_eq!(
        f.now(&send(&answered, &message()), None, T0 + DAY_MS),
        Reply::Ok
    );
    let records = f.job(&[(&sub(&used), Some(&used.rkey))], &[], T0 + DAY_MS);
    assert!(records.iter().any(|(_, r)| *r == Reply::Idle));
    // A day later and a bit: the unanswered invitation's queue is gone.
    assert_eq!(f.handler.purge(T0 + 2 * DAY_MS).unwrap().1, 1);
    assert_eq!(
        f.now(&check(&invitation), None, T0 + 2 * DAY_MS),
        Reply::Error(ErrorCode::Auth)
    );
    // (its message expired with the two-hour TTL; the queue is still there)
    assert_eq!(
        f.now(&check(&answered), None, T0 + 2 * DAY_MS),
        Reply::Count(0)
    );
    // Unused for the TTL (rounded up to a day), a secured queue goes too.
    let records = f.job(&[(&sub(&used), Some(&used.rkey))], &[], T0 + 2 * DAY_MS);
    assert!(records.iter().any(|(_, r)| *r == Reply::Idle));
    assert_eq!(
        f.handler.purge(T0 + 3 * DAY_MS).unwrap().1,
        1,
        "the answered, never secured one"
    );
    assert_eq!(f.now(&check(&used), None, T0 + 3 * DAY_MS), Reply::Count(0));
    assert_eq!(f.handler.purge(T0 + 4 * DAY_MS).unwrap().1, 1);
    assert_eq!(
        f.now(&check(&used), None, T0 + 4 * DAY_MS),
        Reply::Error(ErrorCode::Auth)
    );
}

#[test]
fn one_bad_frame_ends_the_session_and_changes_nothing() {
    let mut f = fixture(policy());
    let q = create(&mut f, T0, true);
    let mut rec = Vec::new();
    Request::encode(
        99,
        &send(&q, &message()),
        f.client.hash(),
        Some(&q.skey),
        &mut rec,
    );
    let mut frame = FrameBuilder::new();
    frame.push(&rec);
    let mut sealed = f.client.seal(&frame.finish()[0]).unwrap();
    sealed[40] ^= 1;
    let out = f.handler.process(&mut f.state, &[sealed], &[], T0);
    assert!(out.close);
    assert!(out.messages.is_empty());
}
