//! `store`: opening a profile whose files were damaged or replaced —
//! `store.db`, `key.age`, the unprotected identity, an exported identity
//! file — through `tern::store::Store::open`, then reading and writing it.
//!
//! A template profile of each kind (unprotected, and passphrase-protected
//! with `key.age` rewritten at a tiny scrypt work factor so one attempt
//! costs microseconds, not 0.2 s) is made once per process; each input
//! then works on fresh copies in a temporary directory. The first byte
//! picks what is damaged:
//!
//! 0. `store.db` replaced by the input;
//! 1. `store.db` patched by the input (a list of offset/xor pairs), so the
//!    damage lands inside a real database that the key still opens;
//! 2. `key.age` replaced by the input;
//! 3. `key.age` re-encrypted around the input (damaged identity text);
//! 4. `key.age` patched by the input;
//! 5. the identity file replaced by the input (`--identity FILE`, and the
//!    unprotected profile's own file).
//!
//! Invariants, besides "no panic":
//! - input that cannot hold this process's identity (0, 3, 5) never opens;
//! - whatever opens reads back only what was written: a record, a name or a
//!   log entry is the original or an error (or missing: deleting rows is
//!   possible on a stolen disk), never something else — AEAD with the slot
//!   in the associated data must see to that;
//! - a write on an opened store succeeds or fails cleanly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use age::secrecy::SecretString;
use serde_json::{json, Value};
use tern::store::{KeySource, NewKey, Store};

use super::input::Input;
use super::relay_request::temp_dir;

const PASSPHRASE: &str = "fuzz passphrase";
/// scrypt work factors above this are skipped: `tern` accepts up to 2^20
/// (1 GiB, seconds per attempt) by design, and a fuzzer that finds that
/// byte would spend all its time there.
const MAX_FUZZ_LOG_N: u64 = 10;

const RECORDS: [(&str, i64); 3] = [("contact/a", 1), ("contact/b", 2), ("settings", 3)];
const LOG: &str = "history/a";
const LOG_LEN: i64 = 4;

struct Template {
    unprotected_db: Vec<u8>,
    unprotected_identity: Vec<u8>,
    passphrase_db: Vec<u8>,
    /// `key.age` for the passphrase profile, at a tiny work factor.
    key_age: Vec<u8>,
}

fn populate(store: &mut Store) {
    store
        .transaction(|tx| {
            for (k, v) in RECORDS {
                tx.put(k, &json!({ "value": v, "name": k }))?;
            }
            for i in 1..=LOG_LEN {
                tx.append(LOG, &json!({ "entry": i }))?;
            }
            tx.mark_seen("seen/a", &[7; 32])?;
            Ok(())
        })
        .expect("populate the template store");
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let dir = temp_dir();
        let u = dir.path().join("u");
        let mut s = Store::create(&u, NewKey::Unprotected).expect("create unprotected");
        populate(&mut s);
        drop(s);
        let p = dir.path().join("p");
        let mut s = Store::create(&p, NewKey::Passphrase(PASSPHRASE.to_string().into()))
            .expect("create protected");
        populate(&mut s);
        let exported = dir.path().join("exported.txt");
        s.export_identity(&exported, false).unwrap();
        drop(s);
        let identity = fs::read_to_string(&exported).unwrap();
        Template {
            unprotected_db: fs::read(u.join("store.db")).unwrap(),
            unprotected_identity: fs::read(u.join("identity-unprotected.txt")).unwrap(),
            passphrase_db: fs::read(p.join("store.db")).unwrap(),
            key_age: encrypt_cheaply(identity.as_bytes()),
        }
    })
}

/// `data` as a passphrase-encrypted age file at work factor 2^2.
fn encrypt_cheaply(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut r = age::scrypt::Recipient::new(SecretString::from(PASSPHRASE.to_string()));
    r.set_work_factor(2);
    let e = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient)).unwrap();
    let mut out = Vec::new();
    let mut w = e.wrap_output(&mut out).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap();
    out
}

/// The work factor an age header asks for, if it names one we can read.
fn scrypt_log_n(key_age: &[u8]) -> Option<u64> {
    let header_end = key_age
        .windows(4)
        .position(|w| w == b"\n---")
        .unwrap_or(key_age.len().min(4096));
    let header = String::from_utf8_lossy(&key_age[..header_end]);
    header.lines().find_map(|l| {
        let mut t = l.split(' ');
        (t.next() == Some("->") && t.next() == Some("scrypt"))
            .then(|| t.nth(1).and_then(|n| n.trim().parse::<u64>().ok()))
            .flatten()
    })
}

fn write_private(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Applies `(u32 offset, u8 xor)` pairs from the input to `data`.
fn patch(data: &mut [u8], input: &mut Input<'_>) {
    if data.is_empty() {
        return;
    }
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let at = input.u32() as usize % data.len();
        data[at] ^= input.u8();
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8() % 6;
    let t = template();
    let dir = temp_dir();
    let home = dir.path().join("profile");
    fs::create_dir(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let db = home.join("store.db");
    let unprotected = home.join("identity-unprotected.txt");
    let key_age = home.join("key.age");
    let passphrase = || KeySource::Passphrase(PASSPHRASE.to_string().into());

    let (result, may_open) = match mode {
        0 | 1 => {
            let mut bytes = t.unprotected_db.clone();
            if mode == 0 {
                bytes = input.rest().to_vec();
            } else {
                patch(&mut bytes, &mut input);
            }
            write_private(&db, &bytes);
            write_private(&unprotected, &t.unprotected_identity);
            let _ = Store::protection(&home);
            (Store::open(&home, KeySource::Unprotected), mode == 1)
        }
        2..=4 => {
            let bytes = match mode {
                2 => input.rest().to_vec(),
                3 => encrypt_cheaply(input.rest()),
                _ => {
                    let mut b = t.key_age.clone();
                    patch(&mut b, &mut input);
                    b
                }
            };
            if scrypt_log_n(&bytes).is_some_and(|n| n > MAX_FUZZ_LOG_N) {
                return;
            }
            write_private(&db, &t.passphrase_db);
            write_private(&key_age, &bytes);
            (Store::open(&home, passphrase()), mode == 4)
        }
        _ => {
            let bytes = input.rest();
            write_private(&db, &t.unprotected_db);
            let file: PathBuf = dir.path().join("identity.txt");
            write_private(&file, bytes);
            let from_file = Store::open(&home, KeySource::IdentityFile(file));
            assert!(
                from_file.is_err(),
                "a foreign identity file opened the store"
            );
            write_private(&unprotected, bytes);
            (Store::open(&home, KeySource::Unprotected), false)
        }
    };
    match result {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(store) => {
            assert!(may_open, "input that cannot hold the key opened the store");
            check_contents(store);
        }
    }
}

/// Reads everything back: originals or errors, never other values.
fn check_contents(mut store: Store) {
    let _ = store.read(|tx| {
        if let Ok(names) = tx.keys("") {
            for n in &names {
                assert!(
                    RECORDS.iter().any(|(k, _)| k == n),
                    "a damaged store listed a name never written: {n:?}"
                );
            }
        }
        if let Ok(names) = tx.keys("contact/") {
            assert!(names.iter().all(|n| n.starts_with("contact/")));
        }
        for (k, v) in RECORDS {
            if let Ok(Some(value)) = tx.get::<Value>(k) {
                assert_eq!(
                    value,
                    json!({ "value": v, "name": k }),
                    "a damaged store returned another value"
                );
            }
        }
        if let Ok(entries) = tx.tail::<Value>(LOG, 100) {
            for (seq, value) in entries {
                assert!((1..=LOG_LEN as u64).contains(&seq));
                assert_eq!(
                    value,
                    json!({ "entry": seq }),
                    "a log entry moved or changed"
                );
            }
        }
        let _ = tx.seen("seen/a", &[7; 32]);
        Ok(())
    });
    let _ = store.transaction(|tx| {
        tx.put("contact/c", &json!(1))?;
        tx.append(LOG, &json!({ "entry": LOG_LEN + 1 }))?;
        tx.mark_seen("seen/a", &[8; 32])
    });
}
