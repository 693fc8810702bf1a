//! What the hybrid (X25519 + ML-KEM-768) handshake and ratchet cost, in the
//! protocol core alone (no store, no relay, one core):
//!
//! ```text
//! cargo run --release --example bench_pq [-- --rounds N]
//! ```
//!
//! * handshake: invitation, the joiner's request, the inviter's reply and the
//!   joiner's confirmation, both sides' CPU together;
//! * a message between ratchet steps: encrypt, queue layer, receive;
//! * a message at a ratchet step: the same, each message answering the
//!   last one so that every receive runs a DH (and ML-KEM) step.
//!
//! Only public APIs that predate ML-KEM are used, so the same file measures
//! the classical ratchet on an older commit (BENCHMARKS.md). Medians of
//! `--rounds` runs (default 200); every loop is bounded. `--only handshake`
//! (or `between`, `step`) runs one loop alone, for counting instructions
//! under `valgrind --tool=callgrind` on a loaded machine: the difference
//! between two round counts, divided by the difference in rounds, is the
//! cost of one operation.

use std::time::Instant;

use rand::rngs::OsRng;
use tern::proto::connection::{Action, Connection, QueueKeys, RecvQueue};
use tern::proto::envelope::Kind;
use tern::proto::hello::{Channel, Profile};
use tern::proto::keys::DhKeyPair;
use tern_wire::RelayAddress;

fn queues(n: usize) -> Vec<RecvQueue> {
    (0..n)
        .map(|i| {
            let keys = QueueKeys::generate(&mut OsRng);
            let relay: RelayAddress =
                format!("tern://AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE@192.0.2.{i}:5223")
                    .parse()
                    .expect("address");
            let mut ids = [0u8; 32];
            rand::RngCore::fill_bytes(&mut OsRng, &mut ids);
            RecvQueue::created(
                relay,
                &keys,
                ids[..16].try_into().expect("16"),
                ids[16..].try_into().expect("16"),
                &DhKeyPair::generate(&mut OsRng).public(),
            )
            .expect("queue")
        })
        .collect()
}

fn profile() -> Profile {
    Profile {
        name: "bench".into(),
        ..Profile::default()
    }
}

fn deliveries(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { ratchet_msg, .. } => Some(ratchet_msg.clone()),
            _ => None,
        })
        .collect()
}

/// `from` sends `payload` to `to`'s first queue; `to` receives it.
fn hand_over(from: &Connection, to: &mut Connection, payload: &[u8]) -> Vec<Action> {
    let q = to.recv_queues[0].recipient_id;
    let up = from.queue_message(0, payload, &mut OsRng).expect("seal");
    to.receive(&q, &up, &profile(), 1, &mut OsRng)
        .expect("receive")
        .actions
}

fn handshake() -> (Connection, Connection) {
    let (mut a, inv) = Connection::invite(queues(1), Channel::Shared, &mut OsRng);
    let (mut b, request) =
        Connection::accept(&inv, queues(1), &profile(), Channel::Shared, 1, &mut OsRng)
            .expect("accept");
    let q = a.recv_queues[0].recipient_id;
    let r = a
        .receive(&q, &request, &profile(), 1, &mut OsRng)
        .expect("request");
    let reply = deliveries(&r.actions).remove(0);
    let r = hand_over(&a, &mut b, &reply);
    let confirm = deliveries(&r).remove(0);
    hand_over(&b, &mut a, &confirm);
    (a, b)
}

fn text(c: &mut Connection) -> Vec<u8> {
    match c
        .encrypt(Kind::Text, [7; 16], b"a short text".to_vec(), 1, &mut OsRng)
        .expect("encrypt")
    {
        Action::Deliver { ratchet_msg, .. } => ratchet_msg,
        other => panic!("{other:?}"),
    }
}

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let mut rounds = 200usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        rounds = args[i + 1].parse().expect("--rounds N");
    }
    let rounds = rounds.clamp(10, 10_000);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args[i + 1].clone());
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);

    let mut hs = vec![0.0];
    for _ in 0..if run("handshake") { rounds } else { 0 } {
        let t = Instant::now();
        std::hint::black_box(handshake());
        hs.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let (mut a, mut b) = handshake();
    let mut between = vec![0.0];
    for _ in 0..if run("between") { rounds } else { 0 } {
        let t = Instant::now();
        let m = text(&mut a);
        hand_over(&a, &mut b, &m);
        between.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let mut step = vec![0.0];
    for i in 0..if run("step") { rounds } else { 0 } {
        let (from, to) = if i % 2 == 0 {
            (&mut b, &mut a)
        } else {
            (&mut a, &mut b)
        };
        let t = Instant::now();
        let m = text(from);
        hand_over(from, to, &m);
        step.push(t.elapsed().as_secs_f64() * 1e6);
    }

    println!("| operation (median of {rounds}) | µs |");
    println!("|---|---|");
    println!(
        "| handshake, both sides (request, reply, confirmation) | {:.0} |",
        median_us(hs)
    );
    println!(
        "| one message between ratchet steps (encrypt + queue layer + receive) | {:.0} |",
        median_us(between)
    );
    println!(
        "| one message at a ratchet step (the receive runs a DH step) | {:.0} |",
        median_us(step)
    );
}
