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
