//! Relays that are not there: two of three relays down or black-holing
//! (accepting TCP and never answering) in the middle of a conversation, and
//! a relay whose disk fills up. Every message must arrive exactly once, with
//! clear errors meanwhile, and nothing may be corrupted.

mod adversary_common;
mod cli_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use adversary_common::*;
use cli_common::*;

/// Alice receives on three relays; one is killed (connection refused) and
/// one turns into a black hole. Bob's messages still arrive exactly once
/// through the third, every command returns, and when the two come back
/// the late copies are dropped as duplicates.
#[test]
fn two_of_three_relays_down_or_black_holing() {
    let r1 = EvilRelay::start();
    let mut r2 = EvilRelay::start();
    let mut r3 = EvilRelay::start();
    let rb = EvilRelay::start();
    let a = profile("Alice", &[&r1.addr, &r2.addr, &r3.addr]);
    let b = profile("Bob", &[&rb.addr]);
    connect(&a, "bob", &b, "alice");
    b.send("alice", "before");
    assert_eq!(a.recv_texts(), vec!["before"]);

    r2.stop();
    let hole = r3.become_black_hole();
    let t = Instant::now();
    let o = b.run(&["send", "alice", "during 1"]);
    assert_code(&o, 0, "send with two of three relays unusable");
    assert!(
        stderr(&o).contains("warning"),
        "the unusable relays are reported: {}",
        show(&o)
    );
    let send_time = t.elapsed();
    // (Not checked here, to keep the test short: Alice → Bob is unaffected,
    // but every `tern recv` of Bob's retries the copies for the black hole
    // twice, before and after fetching, and so takes about 2 × 15 s.)

    let t = Instant::now();
    let o = a.run(&["recv", "--json"]);
    assert_code(&o, 0, "recv with two of three relays unusable");
    assert_eq!(
        texts(&json_lines(&stdout(&o))),
        vec!["during 1"],
        "{}",
        show(&o)
    );
    assert!(stderr(&o).contains("warning"), "{}", show(&o));
    let recv_time = t.elapsed();
    eprintln!("send took {send_time:?}, recv took {recv_time:?} with a black hole");
    assert!(send_time < Duration::from_secs(40) && recv_time < Duration::from_secs(40));
    assert!(b.contact("alice")["pending_jobs"].as_u64().unwrap() > 0);

    // Both come back on their ports, with their data.
    drop(hole);
    r3.restart();
    r2.restart();
    b.ok(&["recv"]); // delivers the copies that waited
    assert_eq!(b.contact("alice")["pending_jobs"], 0);
    a.recv_nothing();
    b.send("alice", "after");
    let (events, err) = recv_json(&a);
    assert_eq!(
        messages(&events),
        vec![("after".into(), "in-order".into())],
        "{err}"
    );
    a.recv_nothing();
    assert_eq!(inbox(&a, "bob"), vec!["before", "during 1", "after"]);
}

/// A tmpfs of a few megabytes, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new()
            .prefix("tern-smalldisk-")
            .tempdir()
            .ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system holding `dir` until writes fail.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = vec![0x55u8; 512];
    while f.write_all(&small).is_ok() {}
    while f.write_all(&[0x55]).is_ok() {}
    let _ = f.sync_all();
    p
}

fn integrity(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .unwrap()
}

/// Bob's relay keeps its data on a 3 MB tmpfs (mounted by the test: it
/// runs as root here) that is then filled up. Sends through it fail with a
/// clear, temporary error (exit 75, message kept), Bob's recv still gets
/// what was stored before, nothing is corrupted, and everything arrives
/// exactly once when space returns.
#[test]
fn full_disk_on_the_relay() {
    // ADVERSARY_NO_MOUNT=1 forces the fallback (as without root).
    let disk = match std::env::var_os("ADVERSARY_NO_MOUNT") {
        Some(_) => None,
        None => SmallDisk::mount("3m"),
    };
    let Some(disk) = disk else {
        full_disk_with_file_size_limit();
        return;
    };
    let ra = EvilRelay::start();
    let data = disk.path().join("relay");
    let mut rb = EvilRelay::start_in(&data, |_| {});
    let a = profile("Alice", &[&ra.addr]);
    let b = profile("Bob", &[&rb.addr]);
    connect(&a, "bob", &b, "alice");
    a.send("bob", "stored before");

    let filler = fill(disk.path());
    let mut ok = vec!["stored before".to_string()];
    let mut kept = Vec::new();
    for i in 0..40 {
        let text = format!("full {i}");
        let o = a.run(&["send", "bob", &text]);
        match o.status.code() {
            Some(0) => ok.push(text),
            Some(75) => {
                assert!(
                    stderr(&o).contains("kept"),
                    "a clear, temporary error: {}",
                    show(&o)
                );
                kept.push(text);
                if kept.len() >= 3 {
                    break;
                }
            }
            _ => panic!("send on a full relay disk: {}", show(&o)),
        }
    }
    assert!(
        !kept.is_empty(),
        "some send must have failed on a full disk (sent {})",
        ok.len()
    );
    // Bob gets what the relay had stored; acknowledging may fail (a write):
    // then the relay delivers it again later and Bob drops the copy.
    let o = b.run(&["recv", "--json"]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(75)),
        "{}",
        show(&o)
    );
    let mut got = texts(&json_lines(&stdout(&o)));
    assert!(!stderr(&o).contains("panicked"), "{}", show(&o));

    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["recv"]); // retries the kept messages
    assert_eq!(a.contact("bob")["pending_jobs"], 0);
    let (events, err) = recv_json(&b);
    got.extend(texts(&events));
    b.recv_nothing();
    let mut want = ok.clone();
    want.extend(kept.iter().cloned());
    assert_eq!(got, want, "every message exactly once, in order\n{err}");
    assert_eq!(inbox(&b, "alice"), want);

    // Nothing corrupted: the relay's database checks out and it restarts.
    rb.stop();
    assert_eq!(integrity(&data.join("relay.db")), "ok");
    rb.restart();
    a.send("bob", "after the restart");
    assert_eq!(b.recv_texts(), vec!["after the restart"]);
    drop(rb);
}

/// Without permission to mount, the relay runs as a child process under a
/// file-size limit (RLIMIT_FSIZE via `ulimit -f`, SIGXFSZ ignored so writes
/// fail with EFBIG), and "space returns" by restarting it without the limit.
fn full_disk_with_file_size_limit() {
    eprintln!("mount not permitted: using RLIMIT_FSIZE (ulimit -f) instead of a tmpfs");
    let data = tempfile::tempdir().unwrap();
    let start = |limit: Option<u32>, port: u16| -> (std::process::Child, String) {
        let script = match limit {
            Some(kb) => format!("trap '' XFSZ; ulimit -f {kb}; exec \"$0\" \"$@\""),
            None => "exec \"$0\" \"$@\"".to_string(),
        };
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .arg(TERN)
            .args([
                "relay",
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data",
            ])
            .arg(data.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        (child, line.trim().to_string())
    };
    let ra = EvilRelay::start();
    let (mut child, addr) = start(None, 0);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let a = profile("Alice", &[&ra.addr]);
    let b = profile("Bob", &[&addr]);
    connect(&a, "bob", &b, "alice");
    let _ = child.kill();
    let _ = child.wait();
    let used = std::fs::metadata(data.path().join("relay.db"))
        .unwrap()
        .len()
        / 1024;
    let (mut child, _) = start(Some(used as u32 + 16), port);
    let mut kept = 0;
    let mut ok = Vec::new();
    for i in 0..20 {
        let o = a.run(&["send", "bob", &format!("full {i}")]);
        match o.status.code() {
            Some(0) => ok.push(format!("full {i}")),
            Some(75) => kept += 1,
            _ => panic!("{}", show(&o)),
        }
    }
    assert!(kept > 0);
    let _ = child.kill();
    let _ = child.wait();
    let (mut child, _) = start(None, port);
    a.ok(&["recv"]);
    let got = b.recv_texts();
    assert_eq!(got.len(), 20, "{got:?}");
    let _ = child.kill();
    let _ = child.wait();
}
