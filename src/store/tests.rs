use super::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Deserialize;

fn pass(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

fn pw(s: &str) -> NewKey {
    NewKey::Passphrase(pass(s))
}

fn with_pw(s: &str) -> KeySource {
    KeySource::Passphrase(pass(s))
}

/// A fresh home directory inside a temp dir (so `create` makes it itself).
fn new_home() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("profile");
    (dir, home)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Contact {
    name: String,
    note: String,
}

/// Every file in `home`, name → content (for "nothing changed" checks).
fn snapshot(home: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(home)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_open_round_trip() {
    let (_d, home) = new_home();
    assert!(!Store::exists(&home));
    assert!(matches!(
        Store::open(&home, with_pw("x")),
        Err(StoreError::NoProfile(_))
    ));
    let alice = Contact {
        name: "Alice".into(),
        note: "met at the station".into(),
    };
    {
        let mut s = Store::create(&home, pw("correct horse")).unwrap();
        s.transaction(|tx| {
            tx.put("contact/01", &alice)?;
            tx.put("settings", &42u32)?;
            tx.append("log/01", "first")?;
            tx.mark_seen("seen/01", &[9; 32])
        })
        .unwrap();
    }
    assert!(Store::exists(&home));
    assert_eq!(Store::protection(&home).unwrap(), Protection::Passphrase);
    assert!(matches!(
        Store::create(&home, pw("again")),
        Err(StoreError::AlreadyExists(_))
    ));

    let s = Store::open(&home, with_pw("correct horse")).unwrap();
    s.read(|tx| {
        assert_eq!(tx.get::<Contact>("contact/01")?, Some(alice.clone()));
        assert_eq!(tx.get::<u32>("settings")?, Some(42));
        assert_eq!(tx.get::<u32>("missing")?, None);
        assert_eq!(
            tx.tail::<String>("log/01", 10)?,
            vec![(1, "first".to_string())]
        );
        assert!(tx.seen("seen/01", &[9; 32])?);
        assert!(!tx.seen("seen/01", &[8; 32])?);
        assert!(!tx.seen("seen/02", &[9; 32])?);
        Ok(())
    })
    .unwrap();
    assert!(s.recipient().starts_with("age1"));

    // Every file, including SQLite's -wal and -shm while open, is private.
    #[cfg(unix)]
    {
        assert_eq!(mode(&home), 0o700);
        let files = snapshot(&home);
        assert!(files.contains_key("store.db-wal"), "{:?}", files.keys());
        for name in files.keys() {
            assert_eq!(mode(&home.join(name)), 0o600, "{name}");
        }
    }
}

#[test]
fn store_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<Store>();
    is_send::<StoreError>();
}

#[test]
fn wrong_passphrase_changes_nothing() {
    let (_d, home) = new_home();
    {
        let mut s = Store::create(&home, pw("right")).unwrap();
        s.transaction(|tx| tx.put("k", "v")).unwrap();
    }
    let before = snapshot(&home);
    let err = Store::open(&home, with_pw("wrong")).unwrap_err();
    assert!(matches!(err, StoreError::WrongPassphrase), "{err}");
    assert_eq!(err.to_string(), "wrong passphrase");
    assert_eq!(snapshot(&home), before);
    let s = Store::open(&home, with_pw("right")).unwrap();
    assert_eq!(
        s.read(|tx| tx.get::<String>("k")).unwrap().as_deref(),
        Some("v")
    );
    assert!(matches!(
        Store::create(&tempfile::tempdir().unwrap().path().join("p"), pw("")),
        Err(StoreError::EmptyPassphrase)
    ));
}

#[test]
fn identity_file_unlock() {
    let (d, home) = new_home();
    let exported = d.path().join("tern-identity.txt");
    {
        let mut s = Store::create(&home, pw("pw")).unwrap();
        s.transaction(|tx| tx.put("k", &1)).unwrap();
        s.export_identity(&exported, false).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&exported), 0o600);
        let text = fs::read_to_string(&exported).unwrap();
        assert!(text.starts_with("# created: "));
        assert!(text.contains(&format!("# public key: {}\n", s.recipient())));
        // Refuses to overwrite unless told to.
        assert!(matches!(
            s.export_identity(&exported, false),
            Err(StoreError::FileExists(_))
        ));
        s.export_identity(&exported, true).unwrap();
        assert_eq!(fs::read_to_string(&exported).unwrap(), text);
    }

    // Unlocking with the identity costs no scrypt.
    let t = Instant::now();
    let mut s = Store::open(&home, KeySource::IdentityFile(exported.clone())).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s.read(|tx| tx.get::<i32>("k")).unwrap(), Some(1));
    s.transaction(|tx| tx.put("k", &2)).unwrap();
    drop(s);

    // Another profile's identity is refused before anything is read.
    let (d2, home2) = new_home();
    let other = d2.path().join("other.txt");
    Store::create(&home2, NewKey::Unprotected)
        .unwrap()
        .export_identity(&other, false)
        .unwrap();
    assert!(matches!(
        Store::open(&home, KeySource::IdentityFile(other)),
        Err(StoreError::WrongIdentity(_))
    ));

    // Files that others can read are refused, like ssh keys.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&exported, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Store::open(&home, KeySource::IdentityFile(exported.clone())).unwrap_err();
        assert!(matches!(err, StoreError::IdentityFile { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    // Garbage and missing files are clean errors, and never echo content.
    let junk = d.path().join("junk.txt");
    keyfile::write_new(&junk, b"AGE-SECRET-KEY-1NOTAKEY\n").unwrap();
    let err = Store::open(&home, KeySource::IdentityFile(junk)).unwrap_err();
    assert!(matches!(err, StoreError::IdentityFile { .. }), "{err}");
    assert!(!err.to_string().contains("NOTAKEY"), "{err}");
    assert!(matches!(
        Store::open(&home, KeySource::IdentityFile(d.path().join("nope"))),
        Err(StoreError::IdentityFile { .. })
    ));
    // Pointing at key.age by mistake says what to do instead.
    let err = Store::open(&home, KeySource::IdentityFile(home.join(KEY_FILE))).unwrap_err();
    assert!(err.to_string().contains("passphrase"), "{err}");
}

#[test]
fn unprotected_profile() {
    let (_d, home) = new_home();
    {
        let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
        s.transaction(|tx| tx.put("k", "v")).unwrap();
    }
    let id_file = home.join(UNPROTECTED_FILE);
    assert!(id_file.is_file());
    assert!(!home.join(KEY_FILE).exists());
    #[cfg(unix)]
    assert_eq!(mode(&id_file), 0o600);
    assert!(fs::read_to_string(&id_file)
        .unwrap()
        .contains("AGE-SECRET-KEY-1"));
    assert_eq!(Store::protection(&home).unwrap(), Protection::Unprotected);

    let s = Store::open(&home, KeySource::Unprotected).unwrap();
    assert_eq!(
        s.read(|tx| tx.get::<String>("k")).unwrap().as_deref(),
        Some("v")
    );
    drop(s);
    assert!(matches!(
        Store::open(&home, with_pw("v")),
        Err(StoreError::NotPassphraseProtected(_))
    ));
    // The clear identity file is itself a valid identity file.
    Store::open(&home, KeySource::IdentityFile(id_file)).unwrap();

    let (_d2, home2) = new_home();
    drop(Store::create(&home2, pw("pw")).unwrap());
    assert!(matches!(
        Store::open(&home2, KeySource::Unprotected),
        Err(StoreError::PassphraseRequired(_))
    ));
}

#[test]
fn nothing_readable_on_disk() {
    let (d, home) = new_home();
    let name = "Wilhelmina-Quux";
    let message = "the eagle lands at midnight";
    let key = "contact/9f8e7d6c5b4a";
    let log = "history/1a2b3c4d5e6f";
    let set = "dedup/0f1e2d3c4b5a";
    let digest = [0x5a; 32];
    let mut s = Store::create(&home, pw("pw")).unwrap();
    let exported = d.path().join("id.txt");
    s.export_identity(&exported, false).unwrap();
    let secret_line = fs::read_to_string(&exported)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .unwrap()
        .to_string();
    s.transaction(|tx| {
        tx.put(
            key,
            &Contact {
                name: name.into(),
                note: message.into(),
            },
        )?;
        for _ in 0..20 {
            tx.append(log, message)?;
        }
        tx.mark_seen(set, &digest)
    })
    .unwrap();

    let needles: [&[u8]; 7] = [
        name.as_bytes(),
        message.as_bytes(),
        key.as_bytes(),
        log.as_bytes(),
        set.as_bytes(),
        &digest,
        secret_line.as_bytes(),
    ];
    let check = |when: &str| {
        let files = snapshot(&home);
        assert!(files.contains_key(DB_FILE));
        for (file, content) in &files {
            for needle in needles {
                assert!(
                    !contains(content, needle),
                    "{when}: {file} contains {:?}",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    };
    // While open (data in the WAL) and after close (checkpointed).
    check("open");
    drop(s);
    check("closed");
    // The search does work: the exported identity holds the secret line.
    assert!(contains(
        &fs::read(&exported).unwrap(),
        secret_line.as_bytes()
    ));
}

/// Rewrite rows behind the store's back with plain SQLite.
fn raw(home: &Path) -> Connection {
    Connection::open(home.join(DB_FILE)).unwrap()
}

#[test]
fn swapped_ciphertexts_are_rejected() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    s.transaction(|tx| {
        tx.put("contact/a", "alice")?;
        tx.put("contact/b", "bob")?;
        tx.append("log/1", "one")?;
        tx.append("log/1", "two")?;
        Ok(())
    })
    .unwrap();
    drop(s);

    let c = raw(&home);
    // Swap the two values (and, separately below, the names).
    c.execute_batch(
        "CREATE TEMP TABLE t AS SELECT id, value FROM kv;
         UPDATE kv SET value = (SELECT value FROM t WHERE t.id <> kv.id);",
    )
    .unwrap();
    // Move log entry 2 onto seq 3 and entry 1 onto seq 2.
    c.execute_batch("UPDATE log SET seq = seq + 10; UPDATE log SET seq = seq - 9;")
        .unwrap();
    drop(c);

    let s = Store::open(&home, KeySource::Unprotected).unwrap();
    for k in ["contact/a", "contact/b"] {
        let err = s.read(|tx| tx.get::<String>(k)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }
    let err = s.read(|tx| tx.tail::<String>("log/1", 10)).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    // Names are intact so far.
    assert_eq!(
        s.read(|tx| tx.keys("contact/")).unwrap(),
        ["contact/a", "contact/b"]
    );
    drop(s);

    // Now swap the sealed names.
    let c = raw(&home);
    c.execute_batch(
        "CREATE TEMP TABLE t AS SELECT id, name FROM kv;
         UPDATE kv SET name = (SELECT name FROM t WHERE t.id <> kv.id);",
    )
    .unwrap();
    drop(c);
    let s = Store::open(&home, KeySource::Unprotected).unwrap();
    let err = s.read(|tx| tx.keys("contact/")).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[test]
fn damaged_key_file_is_a_clean_error() {
    let (_d, home) = new_home();
    drop(Store::create(&home, pw("pw")).unwrap());
    let key_path = home.join(KEY_FILE);
    let good = fs::read(&key_path).unwrap();
    let db_before = fs::read(home.join(DB_FILE)).unwrap();

    let try_open = |bytes: &[u8]| {
        fs::write(&key_path, bytes).unwrap();
        Store::open(&home, with_pw("pw")).map(|_| ())
    };

    // Truncations: inside the header, at the header's end, in the payload.
    let header_end = good.windows(4).position(|w| w == b"\n---").unwrap();
    for len in [0, 10, 30, header_end, header_end + 20, good.len() - 1] {
        let err = try_open(&good[..len]).unwrap_err();
        assert!(
            matches!(err, StoreError::KeyFileCorrupt { .. }),
            "truncated to {len}: {err}"
        );
    }
    // Bit flips across the file: the scrypt stanza (which fails exactly like
    // a wrong passphrase, told apart by the recorded hash), the MAC, the
    // payload nonce and ciphertext.
    let stride = (good.len() / 24).max(1);
    for pos in (0..good.len()).step_by(stride).chain([good.len() - 1]) {
        let mut bad = good.clone();
        bad[pos] ^= 0x04;
        let err = try_open(&bad).unwrap_err();
        assert!(
            matches!(err, StoreError::KeyFileCorrupt { .. }),
            "bit flip at {pos}: {err}"
        );
    }
    // Not an age file at all, and too big to be one.
    assert!(matches!(
        try_open(b"hello").unwrap_err(),
        StoreError::KeyFileCorrupt { .. }
    ));
    assert!(matches!(
        try_open(&vec![0u8; 100_000]).unwrap_err(),
        StoreError::KeyFileCorrupt { .. }
    ));
    fs::remove_file(&key_path).unwrap();
    assert!(matches!(
        Store::open(&home, with_pw("pw")),
        Err(StoreError::KeyFileMissing(_))
    ));

    // Another profile's key.age is recognised as such.
    let (_d2, home2) = new_home();
    drop(Store::create(&home2, pw("pw")).unwrap());
    let err = try_open(&fs::read(home2.join(KEY_FILE)).unwrap()).unwrap_err();
    assert!(
        matches!(&err, StoreError::KeyFileCorrupt { detail, .. } if detail.contains("another profile")),
        "{err}"
    );

    // Restored, everything works and the database was never touched.
    assert_eq!(fs::read(home.join(DB_FILE)).unwrap(), db_before);
    try_open(&good).unwrap();
}

#[test]
fn corrupt_database_is_a_clean_error() {
    let (_d, home) = new_home();
    drop(Store::create(&home, NewKey::Unprotected).unwrap());
    fs::write(home.join(DB_FILE), vec![0x42; 8192]).unwrap();
    let err = Store::open(&home, KeySource::Unprotected).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    // A SQLite database that is not ours.
    fs::remove_file(home.join(DB_FILE)).unwrap();
    Connection::open(home.join(DB_FILE))
        .unwrap()
        .execute_batch("CREATE TABLE x (y);")
        .unwrap();
    let err = Store::protection(&home).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[test]
fn append_and_tail() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    s.transaction(|tx| {
        for i in 1..=50u64 {
            assert_eq!(tx.append("conv/a", &i)?, i);
            if i % 2 == 0 {
                tx.append("conv/b", &(i * 100))?;
            }
        }
        Ok(())
    })
    .unwrap();
    s.read(|tx| {
        let last: Vec<(u64, u64)> = tx.tail("conv/a", 10)?;
        assert_eq!(last, (41..=50).map(|i| (i, i)).collect::<Vec<_>>());
        let page: Vec<(u64, u64)> = tx.tail_before("conv/a", 41, 5)?;
        assert_eq!(page, (36..=40).map(|i| (i, i)).collect::<Vec<_>>());
        assert_eq!(tx.tail_before::<u64>("conv/a", 3, 10)?, [(1, 1), (2, 2)]);
        assert_eq!(tx.tail::<u64>("conv/a", 1000)?.len(), 50);
        assert!(tx.tail::<u64>("conv/a", 0)?.is_empty());
        assert_eq!(tx.tail::<u64>("conv/b", 2)?, [(24, 4800), (25, 5000)]);
        assert!(tx.tail::<u64>("conv/none", 5)?.is_empty());
        // The wrong type is a Decode error, not corruption.
        let err = tx.tail::<String>("conv/a", 1).unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
        Ok(())
    })
    .unwrap();
    s.transaction(|tx| tx.remove_log("conv/a")).unwrap();
    s.read(|tx| {
        assert!(tx.tail::<u64>("conv/a", 5)?.is_empty());
        assert_eq!(tx.tail::<u64>("conv/b", 100)?.len(), 25);
        Ok(())
    })
    .unwrap();
    assert_eq!(s.transaction(|tx| tx.append("conv/a", &7)).unwrap(), 1);
}

#[test]
fn tail_cost_does_not_grow_with_history() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    // The query plan is the real guarantee; check it uses the primary key.
    let plan: Vec<String> = s
        .conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT seq, value FROM log WHERE log = ?1 AND seq < ?2 \
             ORDER BY seq DESC LIMIT ?3",
        )
        .unwrap()
        .query_map(rusqlite::params![&[0u8; 32][..], 5, 5], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|p| p.contains("USING INDEX") || p.contains("USING PRIMARY KEY")),
        "{plan:?}"
    );
    assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
    s.transaction(|tx| {
        for i in 0..20_000u32 {
            tx.append("big", &i)?;
        }
        for i in 0..20u32 {
            tx.append("small", &i)?;
        }
        Ok(())
    })
    .unwrap();
    let time = |log: &str| {
        let t = Instant::now();
        for _ in 0..200 {
            s.read(|tx| tx.tail::<u32>(log, 20)).unwrap();
        }
        t.elapsed()
    };
    let (big, small) = (time("big"), time("small"));
    // Same work (20 entries each) over histories of 20,000 and of 20: a
    // scan would make the first ~1000 times slower; allow 5 for noise.
    assert!(
        big < small * 5 + Duration::from_millis(50),
        "{big:?} {small:?}"
    );
}

#[test]
fn keys_by_prefix() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    s.transaction(|tx| {
        for k in [
            "contact/b",
            "contact/a",
            "contact/a/x",
            "conv/1",
            "config",
            "x",
        ] {
            tx.put(k, &k)?;
        }
        Ok(())
    })
    .unwrap();
    s.read(|tx| {
        assert_eq!(
            tx.keys("contact/")?,
            ["contact/a", "contact/a/x", "contact/b"]
        );
        assert_eq!(tx.keys("contact/a")?, ["contact/a", "contact/a/x"]);
        assert_eq!(tx.keys("contact/a/")?, ["contact/a/x"]);
        assert_eq!(
            tx.keys("con")?,
            ["config", "contact/a", "contact/a/x", "contact/b", "conv/1"]
        );
        assert_eq!(tx.keys("")?.len(), 6);
        assert!(tx.keys("nothing/")?.is_empty());
        Ok(())
    })
    .unwrap();
    s.transaction(|tx| tx.delete("contact/a")).unwrap();
    s.transaction(|tx| tx.delete("never-existed")).unwrap();
    assert_eq!(
        s.read(|tx| tx.keys("contact/")).unwrap(),
        ["contact/a/x", "contact/b"]
    );
    assert_eq!(s.read(|tx| tx.get::<String>("contact/a")).unwrap(), None);
}

#[test]
fn transaction_rolls_back_on_error() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    s.transaction(|tx| tx.put("n", &1)).unwrap();
    let err = s
        .transaction(|tx| -> Result<(), StoreError> {
            tx.put("n", &2)?;
            tx.append("log", "x")?;
            Err(StoreError::abort(std::io::Error::other("caller gave up")))
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "caller gave up");
    let StoreError::Aborted(inner) = err else {
        panic!("expected Aborted")
    };
    assert!(inner.downcast_ref::<std::io::Error>().is_some());
    s.read(|tx| {
        assert_eq!(tx.get::<i32>("n")?, Some(1));
        assert!(tx.tail::<String>("log", 5)?.is_empty());
        Ok(())
    })
    .unwrap();
    // A panic inside rolls back too, and the store stays usable.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.transaction(|tx| -> Result<(), StoreError> {
            tx.put("n", &3)?;
            panic!("boom")
        });
    }));
    assert!(r.is_err());
    assert_eq!(s.read(|tx| tx.get::<i32>("n")).unwrap(), Some(1));
    s.transaction(|tx| tx.put("n", &4)).unwrap();
    assert_eq!(s.read(|tx| tx.get::<i32>("n")).unwrap(), Some(4));
}

#[test]
fn seen_set_is_capped() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    let digest = |i: u64| {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&i.to_be_bytes());
        d
    };
    let n = SEEN_CAP + 5;
    s.transaction(|tx| {
        for i in 0..n {
            tx.mark_seen("conv/a", &digest(i))?;
        }
        tx.mark_seen("conv/b", &digest(0))
    })
    .unwrap();
    s.read(|tx| {
        for i in 0..5 {
            assert!(!tx.seen("conv/a", &digest(i))?, "{i} should be evicted");
        }
        for i in [5, 6, n / 2, n - 1] {
            assert!(tx.seen("conv/a", &digest(i))?, "{i} should be kept");
        }
        assert!(tx.seen("conv/b", &digest(0))?);
        Ok(())
    })
    .unwrap();
    let rows = |s: &Store| -> i64 {
        s.conn
            .query_row("SELECT count(*) FROM seen", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows(&s), SEEN_CAP as i64 + 1);

    // Seeing an old digest again makes it the newest.
    s.transaction(|tx| {
        tx.mark_seen("conv/a", &digest(5))?;
        tx.mark_seen("conv/a", &digest(n))
    })
    .unwrap();
    s.read(|tx| {
        assert!(tx.seen("conv/a", &digest(5))?);
        assert!(!tx.seen("conv/a", &digest(6))?);
        Ok(())
    })
    .unwrap();
    assert_eq!(rows(&s), SEEN_CAP as i64 + 1);

    s.transaction(|tx| tx.clear_seen("conv/a")).unwrap();
    assert_eq!(rows(&s), 1);
}

#[test]
fn concurrent_writers_lose_no_updates() {
    let (d, home) = new_home();
    let exported = d.path().join("id.txt");
    {
        let s = Store::create(&home, pw("pw")).unwrap();
        s.export_identity(&exported, false).unwrap();
    }
    const PER_THREAD: u64 = 150;
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let home = home.clone();
            let exported = exported.clone();
            std::thread::spawn(move || {
                let mut s = Store::open(&home, KeySource::IdentityFile(exported)).unwrap();
                for i in 0..PER_THREAD {
                    s.transaction(|tx| {
                        let n: u64 = tx.get("counter")?.unwrap_or(0);
                        tx.put("counter", &(n + 1))?;
                        tx.append("log", &(t, i))?;
                        Ok(())
                    })
                    .unwrap();
                    // Interleave reads too: they must never block or fail.
                    s.read(|tx| tx.get::<u64>("counter")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = Store::open(&home, KeySource::IdentityFile(exported)).unwrap();
    s.read(|tx| {
        assert_eq!(tx.get::<u64>("counter")?, Some(2 * PER_THREAD));
        let log: Vec<(u64, (u32, u64))> = tx.tail("log", 1000)?;
        assert_eq!(log.len() as u64, 2 * PER_THREAD);
        assert!(log
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1));
        for t in 0..2 {
            let mine: Vec<u64> = log
                .iter()
                .filter(|(_, (tt, _))| *tt == t)
                .map(|(_, (_, i))| *i)
                .collect();
            assert_eq!(mine, (0..PER_THREAD).collect::<Vec<_>>());
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn change_passphrase_and_protection() {
    let (d, home) = new_home();
    let exported = d.path().join("id.txt");
    let mut s = Store::create(&home, pw("old")).unwrap();
    s.export_identity(&exported, false).unwrap();
    s.transaction(|tx| tx.put("k", "v")).unwrap();
    s.set_key(pw("new")).unwrap();
    drop(s);
    assert!(matches!(
        Store::open(&home, with_pw("old")),
        Err(StoreError::WrongPassphrase)
    ));
    let mut s = Store::open(&home, with_pw("new")).unwrap();
    assert!(matches!(
        s.set_key(pw("")),
        Err(StoreError::EmptyPassphrase)
    ));

    // To unprotected and back.
    s.set_key(NewKey::Unprotected).unwrap();
    assert!(!home.join(KEY_FILE).exists());
    assert_eq!(Store::protection(&home).unwrap(), Protection::Unprotected);
    drop(s);
    let mut s = Store::open(&home, KeySource::Unprotected).unwrap();
    s.set_key(pw("again")).unwrap();
    assert!(!home.join(UNPROTECTED_FILE).exists());
    drop(s);
    let s = Store::open(&home, with_pw("again")).unwrap();
    assert_eq!(
        s.read(|tx| tx.get::<String>("k")).unwrap().as_deref(),
        Some("v")
    );
    drop(s);
    // The identity never changed, so old exports still work.
    Store::open(&home, KeySource::IdentityFile(exported)).unwrap();
}

#[test]
fn interrupted_operations_recover() {
    let (_d, home) = new_home();
    // A key file alone is not ours to delete: store.db may have moved.
    fs::create_dir_all(&home).unwrap();
    fs::write(home.join(KEY_FILE), b"precious").unwrap();
    assert!(matches!(
        Store::create(&home, NewKey::Unprotected),
        Err(StoreError::StrayKeyFile(_))
    ));
    assert_eq!(fs::read(home.join(KEY_FILE)).unwrap(), b"precious");
    // An init that died after writing key.age but before store.db.
    fs::write(home.join(KEY_FILE), b"half-written").unwrap();
    fs::write(home.join(DB_PARTIAL_FILE), b"junk").unwrap();
    assert!(!Store::exists(&home));
    drop(Store::create(&home, pw("pw")).unwrap());
    assert!(!home.join(DB_PARTIAL_FILE).exists());

    // A switch to --no-passphrase that died between writing the clear
    // identity and committing: the passphrase still rules, and the clear
    // copy (and any temp file) must go.
    fs::write(home.join(UNPROTECTED_FILE), b"AGE-SECRET-KEY-1...").unwrap();
    let tmp = home.join(".key.age.0123456789abcdef.tmp");
    fs::write(&tmp, b"x").unwrap();
    let unrelated = home.join("notes.txt");
    fs::write(&unrelated, b"mine").unwrap();
    drop(Store::open(&home, with_pw("pw")).unwrap());
    assert!(!home.join(UNPROTECTED_FILE).exists());
    assert!(!tmp.exists());
    assert!(unrelated.exists());
    assert!(home.join(KEY_FILE).exists());
}

#[test]
fn locked_profile_times_out_cleanly() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    let mut other = Store::open(&home, KeySource::Unprotected).unwrap();
    other.conn.busy_timeout(Duration::from_millis(50)).unwrap();
    let err = s
        .transaction(|_tx| other.transaction(|tx| tx.put("k", &1)))
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked), "{err}");
    assert!(err.to_string().contains("locked by another tern process"));
    // Readers are not blocked by a writer.
    s.transaction(|tx| {
        tx.put("k", &2)?;
        assert_eq!(other.read(|r| r.get::<i32>("k"))?, None);
        Ok(())
    })
    .unwrap();
    assert_eq!(other.read(|r| r.get::<i32>("k")).unwrap(), Some(2));
}

/// Run `cmd` with `input` on its stdin, giving up after 20 s.
fn run_with_timeout(cmd: &mut Command, input: &[u8]) -> Option<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(input).ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().ok()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The key file is a standard age file: the Go `age` CLI opens it with the
/// passphrase, and an exported identity works with `age -i`.
#[test]
fn age_cli_interop() {
    if !have("age") || !have("script") {
        println!("note: `age` (or util-linux `script`) not installed; skipping the age CLI test");
        return;
    }
    let (d, home) = new_home();
    let s = Store::create(&home, pw("correct horse battery")).unwrap();
    let exported = d.path().join("id.txt");
    s.export_identity(&exported, false).unwrap();
    let out = d.path().join("decrypted.txt");

    // age reads passphrases from the terminal only: give it one with
    // script(1), typing the passphrase on the pseudo-terminal.
    let t = Instant::now();
    let cmd = format!(
        "age -d -o '{}' '{}'",
        out.display(),
        home.join(KEY_FILE).display()
    );
    let result = run_with_timeout(
        Command::new("script").args(["-qec", &cmd, "/dev/null"]),
        b"correct horse battery\n",
    )
    .expect("age -d did not finish");
    let elapsed = t.elapsed();
    assert!(
        result.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&result.stdout)
    );
    println!("age -d key.age took {elapsed:?}");
    assert_eq!(fs::read(&out).unwrap(), fs::read(&exported).unwrap());

    // Something encrypted to the profile's recipient opens with the export.
    let enc = run_with_timeout(Command::new("age").args(["-r", &s.recipient()]), b"hello").unwrap();
    assert!(enc.status.success());
    let dec = run_with_timeout(
        Command::new("age").args(["-d", "-i"]).arg(&exported),
        &enc.stdout,
    )
    .unwrap();
    assert_eq!(dec.stdout, b"hello");
}

#[test]
fn a_failed_savepoint_undoes_only_its_own_writes() {
    let (_dir, home) = new_home();
    let mut store = Store::create(&home, NewKey::Unprotected).unwrap();
    let note = |n: &str| Contact {
        name: n.into(),
        note: String::new(),
    };
    let outcomes = store
        .transaction(|tx| {
            tx.put("contact/a", &note("a"))?;
            let failed = tx.savepoint(|tx| {
                tx.put("contact/b", &note("b"))?;
                tx.append("history/b", &note("b"))?;
                tx.mark_seen("seen/b", &[1; 32])?;
                tx.put("contact/a", &note("overwritten"))?;
                Err::<(), _>(StoreError::Corrupt("refused on purpose".into()))
            });
            let kept = tx.savepoint(|tx| tx.put("contact/c", &note("c")));
            // The failed step's writes are gone within the transaction too.
            assert!(tx.get::<Contact>("contact/b")?.is_none());
            Ok((failed.is_err(), kept.is_ok()))
        })
        .unwrap();
    assert_eq!(outcomes, (true, true));
    store
        .read(|r| {
            assert_eq!(r.get::<Contact>("contact/a")?, Some(note("a")));
            assert_eq!(r.get::<Contact>("contact/b")?, None);
            assert_eq!(r.get::<Contact>("contact/c")?, Some(note("c")));
            assert!(r.tail::<Contact>("history/b", 10)?.is_empty());
            assert!(!r.seen("seen/b", &[1; 32])?);
            Ok(())
        })
        .unwrap();
}

#[test]
fn rekey_keeps_everything_and_retires_old_keys() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, pw("old pass")).unwrap();
    let c = Contact {
        name: "ada".into(),
        note: "x".repeat(100),
    };
    s.transaction(|tx| {
        tx.put("contact/1", &c)?;
        tx.put("settings", &7u32)?;
        for i in 0..5u32 {
            tx.append("history/1", &i)?;
        }
        tx.mark_seen("seen/1", &[9; 32])
    })
    .unwrap();
    let exported = home.parent().unwrap().join("identity.txt");
    s.export_identity(&exported, false).unwrap();
    let old_key_file = fs::read(home.join("key.age")).unwrap();
    let mut other = s.another_handle().unwrap();

    s.rekey(pw("new pass")).unwrap();
    // Twice, so name ids go through three keys.
    drop(s);
    let mut s = Store::open(&home, with_pw("new pass")).unwrap();
    s.rekey(pw("newer pass")).unwrap();
    drop(s);

    let s = Store::open(&home, with_pw("newer pass")).unwrap();
    s.read(|tx| {
        assert_eq!(tx.get::<Contact>("contact/1")?, Some(c.clone()));
        assert_eq!(tx.keys("contact/")?, vec!["contact/1".to_string()]);
        assert_eq!(tx.keys("")?.len(), 2);
        let log: Vec<(u64, u32)> = tx.tail("history/1", 10)?;
        assert_eq!(
            log,
            (0..5).map(|i| (u64::from(i) + 1, i)).collect::<Vec<_>>()
        );
        assert!(tx.seen("seen/1", &[9; 32])?);
        assert!(!tx.seen("seen/1", &[8; 32])?);
        Ok(())
    })
    .unwrap();
    // Appending goes on from the re-sealed sequence numbers.
    let mut s = s;
    assert_eq!(
        s.transaction(|tx| tx.append("history/1", &5u32)).unwrap(),
        6
    );
    drop(s);

    // What opened the profile before opens it no more.
    let e = Store::open(&home, KeySource::IdentityFile(exported)).unwrap_err();
    assert!(matches!(e, StoreError::RetiredKey(_)), "{e}");
    fs::write(home.join("key.age.bak"), &old_key_file).unwrap();
    let current = fs::read(home.join("key.age")).unwrap();
    fs::write(home.join("key.age"), &old_key_file).unwrap();
    let e = Store::open(&home, with_pw("old pass")).unwrap_err();
    assert!(matches!(e, StoreError::RetiredKey(_)), "{e}");
    fs::write(home.join("key.age"), &current).unwrap();
    // A handle that was open during the re-key stops, writing nothing.
    let e = other.transaction(|tx| tx.put("contact/2", &c)).unwrap_err();
    assert!(matches!(e, StoreError::Rekeyed), "{e}");
    let s = Store::open(&home, with_pw("newer pass")).unwrap();
    assert_eq!(s.read(|tx| tx.get::<Contact>("contact/2")).unwrap(), None);
    // The database shows no trace of the old keys' ciphertexts.
    let db = fs::read(home.join("store.db")).unwrap();
    assert!(!contains(&db, b"ada"));
}

#[test]
fn an_interrupted_rekey_is_undone_or_finished() {
    // Stopped before the commit: as if it never happened.
    let (_d, home) = new_home();
    let mut s = Store::create(&home, pw("old pass")).unwrap();
    s.transaction(|tx| tx.put("k", &1u32)).unwrap();
    let plan = s.rekey_prepare(pw("new pass")).unwrap();
    assert!(home.join("key.age.next").exists());
    drop(plan);
    drop(s);
    let s = Store::open(&home, with_pw("old pass")).unwrap();
    assert_eq!(s.read(|tx| tx.get::<u32>("k")).unwrap(), Some(1));
    assert!(!home.join("key.age.next").exists());
    drop(s);
    assert!(matches!(
        Store::open(&home, with_pw("new pass")),
        Err(StoreError::WrongPassphrase)
    ));

    // Stopped after the commit, before the rename: finished by `open`.
    let mut s = Store::open(&home, with_pw("old pass")).unwrap();
    let plan = s.rekey_prepare(pw("new pass")).unwrap();
    s.rekey_commit(&plan).unwrap();
    drop(plan);
    drop(s);
    let s = Store::open(&home, with_pw("new pass")).unwrap();
    assert_eq!(s.read(|tx| tx.get::<u32>("k")).unwrap(), Some(1));
    assert!(!home.join("key.age.next").exists());
    drop(s);
    assert!(Store::open(&home, with_pw("new pass")).is_ok());
    assert!(Store::open(&home, with_pw("old pass")).is_err());

    // The same for an unprotected profile, and a switch of protection.
    let (_d2, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    s.transaction(|tx| tx.put("k", &2u32)).unwrap();
    let plan = s.rekey_prepare(NewKey::Unprotected).unwrap();
    s.rekey_commit(&plan).unwrap();
    drop(plan);
    drop(s);
    let mut s = Store::open(&home, KeySource::Unprotected).unwrap();
    assert_eq!(s.read(|tx| tx.get::<u32>("k")).unwrap(), Some(2));
    s.rekey(pw("a pass")).unwrap();
    drop(s);
    assert!(!home.join("identity-unprotected.txt").exists());
    let s = Store::open(&home, with_pw("a pass")).unwrap();
    assert_eq!(s.read(|tx| tx.get::<u32>("k")).unwrap(), Some(2));
    assert_eq!(mode(&home.join("key.age")), 0o600);
}

#[test]
fn a_stamp_changes_with_every_write_of_its_record_only() {
    let (_d, home) = new_home();
    let mut s = Store::create(&home, NewKey::Unprotected).unwrap();
    let note = |n: &str| Contact {
        name: n.into(),
        note: String::new(),
    };
    let first = s
        .transaction(|tx| {
            tx.put("contact/b", &note("b"))?;
            tx.put_stamped("contact/a", &note("a"))
        })
        .unwrap();
    let read = |s: &Store, k: &str| s.read(|tx| tx.stamp(k)).unwrap();
    assert_eq!(read(&s, "contact/a"), Some(first));
    assert_eq!(read(&s, "contact/none"), None);
    // Other records' writes leave it alone; the same value written again
    // does not.
    let b = read(&s, "contact/b");
    s.transaction(|tx| tx.put("contact/b", &note("b"))).unwrap();
    assert_eq!(read(&s, "contact/a"), Some(first));
    assert_ne!(read(&s, "contact/b"), b);
    s.transaction(|tx| tx.put("contact/a", &note("a"))).unwrap();
    let second = read(&s, "contact/a").unwrap();
    assert_ne!(second, first);
    // A re-key seals every row again.
    s.rekey(NewKey::Unprotected).unwrap();
    assert_ne!(read(&s, "contact/a"), Some(second));
    assert!(read(&s, "contact/a").is_some());
    // Deleted: none.
    s.transaction(|tx| tx.delete("contact/a")).unwrap();
    assert_eq!(read(&s, "contact/a"), None);
    // It serialises (summaries keep it) and reads back the same.
    let json = serde_json::to_string(&second).unwrap();
    assert_eq!(serde_json::from_str::<Stamp>(&json).unwrap(), second);
}
