//! The fuzz targets as ordinary tests.
//!
//! `fuzz/src/` holds the harnesses the cargo-fuzz targets run (see
//! `fuzz/README.md`); this file includes the same source and replays every
//! file under `tests/fuzz-corpus/<target>/` through it: the seed inputs,
//! and every input a fuzz run found crashing (`scripts/fuzz` copies those
//! there). A crash found once stays a regression test.
//!
//! `short_random_run` then feeds each target a few hundred inputs made by
//! mutating the kept ones with a seeded RNG: plain random fuzzing without
//! libFuzzer, so `cargo test` exercises the harnesses even where
//! `cargo fuzz` cannot run.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn target(name: &str) -> fn(&[u8]) {
    harness::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
        .1
}

/// Runs `f` on `data`, turning a panic into its message.
fn run_one(f: fn(&[u8]), data: &[u8]) -> Result<(), String> {
    panic::catch_unwind(AssertUnwindSafe(|| f(data))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// Replays the kept inputs of `name`; fails listing every input that panics.
fn replay(name: &str) {
    let f = target(name);
    let files = corpus(name);
    assert!(
        !files.is_empty(),
        "{}: no inputs kept for {name}",
        corpus_dir(name).display()
    );
    let started = Instant::now();
    let failures: Vec<String> = files
        .iter()
        .filter_map(|(path, data)| {
            run_one(f, data).err().map(|msg| {
                format!(
                    "{}: {msg}",
                    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                        .unwrap_or(path)
                        .display()
                )
            })
        })
        .collect();
    eprintln!(
        "{name}: replayed {} inputs in {:.2?}",
        files.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} kept {name} inputs fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn invitation_corpus() {
    replay("invitation");
}

#[test]
fn relay_request_corpus() {
    replay("relay_request");
}

#[test]
fn relay_response_corpus() {
    replay("relay_response");
}

#[test]
fn ratchet_corpus() {
    replay("ratchet");
}

#[test]
fn store_corpus() {
    replay("store");
}

#[test]
fn file_corpus() {
    replay("file");
}

#[test]
fn receipt_corpus() {
    replay("receipt");
}

#[test]
fn every_target_has_a_corpus_and_a_fuzz_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for (name, _) in harness::TARGETS {
        assert!(corpus_dir(name).is_dir(), "no corpus for {name}");
        assert!(
            fuzz.join(format!("{name}.rs")).is_file(),
            "no fuzz target for {name}"
        );
    }
}

/// One mutation of `data`: flip, insert, delete, overwrite or splice.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8]) {
    match rng.gen_range(0..6) {
        0 if !data.is_empty() => {
            let i = rng.gen_range(0..data.len());
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 => {
            let i = rng.gen_range(0..=data.len());
            data.insert(i, rng.gen());
        }
        2 if !data.is_empty() => {
            let i = rng.gen_range(0..data.len());
            let n = rng.gen_range(1..=(data.len() - i).min(16));
            data.drain(i..i + n);
        }
        3 if !data.is_empty() => {
            let i = rng.gen_range(0..data.len());
            data[i] = *[0u8, 1, 0x7f, 0x80, 0xff].get(rng.gen_range(0..5)).unwrap();
        }
        4 if !other.is_empty() => {
            let i = rng.gen_range(0..=data.len());
            let a = rng.gen_range(0..other.len());
            let b = rng.gen_range(a..=other.len().min(a + 64));
            data.splice(i..i, other[a..b].iter().copied());
        }
        _ => {
            let n = rng.gen_range(0..32);
            data.extend((0..n).map(|_| rng.gen::<u8>()));
        }
    }
}

/// Random fuzzing without libFuzzer: mutated kept inputs and random bytes.
/// Each input that panics is written out so it can be kept.
#[test]
fn short_random_run() {
    const PER_TARGET: usize = 100;
    let mut failures = Vec::new();
    for (name, f) in harness::TARGETS {
        let files = corpus(name);
        let mut rng = StdRng::seed_from_u64(0x7e4);
        let started = Instant::now();
        for i in 0..PER_TARGET {
            let mut data = if files.is_empty() || i % 10 == 0 {
                let n = rng.gen_range(0..512);
                (0..n).map(|_| rng.gen()).collect()
            } else {
                files[rng.gen_range(0..files.len())].1.clone()
            };
            let other = if files.is_empty() {
                Vec::new()
            } else {
                files[rng.gen_range(0..files.len())].1.clone()
            };
            for _ in 0..rng.gen_range(1..8) {
                mutate(&mut rng, &mut data, &other);
            }
            if let Err(msg) = run_one(f, &data) {
                let out = std::env::temp_dir().join(format!("tern-fuzz-{name}-{i}"));
                let _ = fs::write(&out, &data);
                failures.push(format!(
                    "{name}: {msg} (input written to {})",
                    out.display()
                ));
            }
        }
        eprintln!(
            "{name}: {PER_TARGET} random inputs in {:.2?}",
            started.elapsed()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The hand-made seeds of the relay targets (transport v2): valid handshake
/// messages, valid frames of every record, and session programs that create,
/// subscribe, send, secure, acknowledge, replay, tamper and delete. Written
/// by `cargo test --test fuzz_regressions write_relay_seeds -- --ignored`;
/// `relay_seeds_are_current` keeps the committed ones equal to these.
fn relay_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use tern_wire::frame::FrameBuilder;
    use tern_wire::{Command, ErrorCode, Reply, Request, DELIVERED_LEN, QUEUE_MSG_LEN};

    let (_, msg1) = harness::relay_response::client_start();
    let msg2 = {
        let (_, msg1) = harness::relay_response::client_start();
        tern_wire::ServerHandshake::respond_fixed(
            &harness::relay_response::RELAY_SECRET,
            &msg1,
            &harness::relay_response::relay_info(),
            tern_wire::session::Fixed {
                ephemeral: &harness::relay_response::RELAY_E,
                kem: &harness::relay_response::RELAY_KEM,
            },
        )
        .unwrap()
        .1
    };
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let mut commands = FrameBuilder::new();
    for (tag, c) in [
        Command::Info,
        Command::Check {
            recipient_id: [3; 16],
        },
        Command::Subscribe {
            recipient_id: [3; 16],
            window: 8,
        },
        Command::Delete {
            recipient_id: [3; 16],
            if_empty: true,
        },
        Command::Unsubscribe { sub_tag: 3 },
        Command::Send {
            sender_id: [4; 16],
            message: [vec![1, 2, 3], vec![0; QUEUE_MSG_LEN - 3]].concat(),
        },
    ]
    .iter()
    .enumerate()
    {
        let mut rec = Vec::new();
        let signer = (c.has_signature_field() && tag != 5).then_some(&key);
        Request::encode(tag as u32 + 1, c, &[9; 32], signer, &mut rec);
        commands.push(&rec);
    }
    let mut replies = FrameBuilder::new();
    let mut msg = FrameBuilder::new();
    for (tag, r) in [
        Reply::Ok,
        Reply::Info(harness::relay_response::relay_info()),
        Reply::Queue {
            recipient_id: [1; 16],
            sender_id: [2; 16],
            relay_dh: [9; 32],
        },
        Reply::Idle,
        Reply::Ended,
        Reply::Count(2),
        Reply::Error(ErrorCode::NotSecured),
    ]
    .iter()
    .enumerate()
    {
        let mut rec = Vec::new();
        r.encode(tag as u32, &mut rec);
        replies.push(&rec);
    }
    let mut rec = Vec::new();
    Reply::Message {
        msg_id: [5; 16],
        received_at: 3600,
        body: vec![6; DELIVERED_LEN],
    }
    .encode(9, &mut rec);
    msg.push(&rec);
    let cat = |parts: &[&[u8]]| parts.concat();
    // Session programs (see fuzz/src/relay_request.rs for how bytes are
    // read): a policy, then steps.
    let policy: &[u8] = &[0, 23, 3, 9, 1, 7, 3, 3, 5];
    let zero16 = [0u8; 16];
    let create = cat(&[&[0, 0, 0, 0, 0], &zero16, &[1, 0, 0, 0]]);
    let sub = vec![0, 0, 0, 0, 0, 5, 0, 4];
    let unsigned_send = cat(&[&[1, 0, 0, 0, 3, 3, 0, 5], b"hello"]);
    let pushes = vec![0, 7];
    let secure = vec![0, 0, 0, 0, 0, 2, 1];
    let signed_send = cat(&[&[1, 0, 0, 0, 0, 3, 0, 3], b"abc"]);
    let ack_upto = vec![0, 0, 0, 0, 0, 6, 1, 1];
    let replayed = vec![1, 0, 0, 0, 0, 10, 1];
    let tamper = vec![0, 4, 0, 0, 16, 1];
    // With a queue known, target 7 means "an unknown one": a fresh id.
    let create_another = cat(&[&[0, 0, 0, 7, 0], &zero16, &[1, 0, 1, 0]]);
    let delete_it = vec![0, 0, 0, 1, 0, 8, 1];
    let session = cat(&[
        &[2],
        policy,
        &create,
        &sub,
        &unsigned_send,
        &pushes,
        &secure,
        &signed_send,
        &pushes,
        &ack_upto,
        &replayed,
        &tamper,
        &create_another,
        &delete_it,
    ]);
    // A relay with an access key: CREATE with it; then one frame of three
    // on the new queue (SUB, CHECK, an unsigned SEND); three days pass; a
    // purge deletes the never-secured queue; its subscription ENDs.
    let batch = cat(&[
        &[2],
        &[1, 0, 1, 9, 2, 7, 3, 3, 5],
        &[0, 0, 0, 0, 0],
        &zero16,
        &[1, 1, 0, 0],
        &[0, 0, 2],
        &[0, 0, 5, 0, 2],
        &[0, 3, 10, 0],
        &[0, 3, 3, 0, 2],
        b"hi",
        &[0, 5, 0xff, 0xff, 63, 1],
        &[0, 7],
    ]);
    let frame = |b: FrameBuilder| b.finish().remove(0);
    vec![
        ("relay_request", "seed-v2-message1", cat(&[&[0x81], &msg1])),
        (
            "relay_request",
            "seed-v2-frame",
            cat(&[&[0x01], &frame(commands)]),
        ),
        ("relay_request", "seed-v2-session", session),
        ("relay_request", "seed-v2-batch-expiry", batch),
        ("relay_response", "seed-v2-message2", cat(&[&[0x80], &msg2])),
        (
            "relay_response",
            "seed-v2-replies",
            cat(&[&[0x01], &frame(replies)]),
        ),
        (
            "relay_response",
            "seed-v2-sealed-msg",
            cat(&[&[0x02], &frame(msg)]),
        ),
        (
            "relay_response",
            "seed-v2-stream",
            vec![
                3, 5, 0, 1, 2, 0, 0, 0, 0, 1, 0, 1, 0, 2, 3, 0, 9, 2, 0, 4, 1, 3, 0, 1, 4, 1, 7, 2,
                1,
            ],
        ),
    ]
}

#[test]
#[ignore]
fn write_relay_seeds() {
    for (target, name, data) in relay_seeds() {
        fs::write(corpus_dir(target).join(name), data).unwrap();
    }
}

#[test]
fn relay_seeds_are_current() {
    for (target, name, data) in relay_seeds() {
        let path = corpus_dir(target).join(name);
        let kept = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            kept == data,
            "{} is stale: run `cargo test --test fuzz_regressions write_relay_seeds -- --ignored`",
            path.display()
        );
    }
}
