//! A relay that tampers with file chunks (PROTOCOL.md §16): flipped bits,
//! dropped chunks, chunks moved to another position, replays and
//! reordering. Whatever it does, the recipient saves the file only whole
//! and exact — from another copy when one relay lies — and never a wrong
//! file.

mod adversary_common;
mod cli_common;

use std::path::{Path, PathBuf};

use adversary_common::*;
use cli_common::*;
use serde_json::Value;
use tern_relay::hooks::{SendAction, Upload};

const TYPE_FILE_CHUNK: u8 = 0x05;

fn chunk_index(m: &[u8]) -> Option<u32> {
    (m.first() == Some(&TYPE_FILE_CHUNK)).then(|| u32::from_be_bytes(m[1..5].try_into().unwrap()))
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

struct Setup {
    ada: Profile,
    bob: Profile,
    file: PathBuf,
    bytes: Vec<u8>,
}

fn setup(relays: &[&str]) -> Setup {
    let ada = profile("Ada", relays);
    let bob = profile("Bob", relays);
    connect(&ada, "bob", &bob, "ada");
    let bytes = payload(8 * 15_979 + 123);
    let dir = ada.sandbox().join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ledger.csv");
    std::fs::write(&file, &bytes).unwrap();
    Setup {
        ada,
        bob,
        file,
        bytes,
    }
}

fn dest(p: &Profile) -> PathBuf {
    p.sandbox().join("received")
}

fn recv(p: &Profile) -> Vec<Value> {
    let d = dest(p);
    let o = p.run(&["recv", "--json", "--files-dir", d.to_str().unwrap()]);
    json_lines(&stdout(&o))
}

fn saved_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The relay changes chunk 3 as `f` says; the file must not be saved.
fn tampered(f: impl Fn(&[u8]) -> SendAction + Send + 'static) {
    let relay = EvilRelay::start();
    let s = setup(&[&relay.addr]);
    relay.evil.on_send(move |v| match chunk_index(v.message) {
        Some(3) => f(v.message),
        _ => SendAction::Store,
    });
    s.ada
        .ok(&["send", "bob", "--file", s.file.to_str().unwrap()]);
    let events = recv(&s.bob);
    assert!(
        saved_files(&dest(&s.bob)).is_empty(),
        "nothing saved from a tampered copy: {events:?}"
    );
    let t = &json_lines(&s.bob.ok(&["files", "--json"]))[0];
    assert_ne!(t["state"], "received", "{t}");
}

#[test]
fn a_flipped_bit_in_a_chunk_is_refused() {
    tampered(|m| SendAction::Replace(vec![Upload::here(flipped(m, 500, 0x10))]));
}

#[test]
fn a_dropped_chunk_leaves_the_file_unsaved() {
    tampered(|_| SendAction::Replace(vec![]));
}

#[test]
fn a_chunk_moved_to_another_position_is_refused() {
    tampered(|m| {
        let mut x = m.to_vec();
        x[1..5].copy_from_slice(&4u32.to_be_bytes());
        SendAction::Replace(vec![Upload::here(x)])
    });
}

#[test]
fn replays_and_reordering_change_nothing() {
    let relay = EvilRelay::start();
    let s = setup(&[&relay.addr]);
    // Chunk 2 is held back and comes after chunk 5, twice; every other
    // chunk comes twice.
    let held = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
    let h = held.clone();
    relay.evil.on_send(move |v| match chunk_index(v.message) {
        Some(2) => {
            *h.lock().unwrap() = Some(v.message.to_vec());
            SendAction::Replace(vec![])
        }
        Some(5) => {
            let two = h.lock().unwrap().clone().unwrap();
            SendAction::Replace(vec![
                Upload::here(v.message.to_vec()),
                Upload::here(two.clone()),
                Upload::here(two),
            ])
        }
        Some(_) => SendAction::Replace(vec![
            Upload::here(v.message.to_vec()),
            Upload::here(v.message.to_vec()),
        ]),
        None => SendAction::Store,
    });
    s.ada
        .ok(&["send", "bob", "--file", s.file.to_str().unwrap()]);
    recv(&s.bob);
    let files = saved_files(&dest(&s.bob));
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), s.bytes);
}

#[test]
fn a_lying_relay_is_outvoted_by_an_honest_copy() {
    let evil = EvilRelay::start();
    let honest = EvilRelay::start();
    let s = setup(&[&evil.addr, &honest.addr]);
    evil.evil.on_send(|v| match chunk_index(v.message) {
        Some(i) if i % 2 == 1 => {
            SendAction::Replace(vec![Upload::here(flipped(v.message, 900, 1))])
        }
        _ => SendAction::Store,
    });
    s.ada
        .ok(&["send", "bob", "--file", s.file.to_str().unwrap()]);
    recv(&s.bob);
    let files = saved_files(&dest(&s.bob));
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        s.bytes,
        "exact, from the honest copy"
    );
}
