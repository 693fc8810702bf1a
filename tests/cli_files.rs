//! Files end to end (PROTOCOL.md §16): `tern send --file`, `tern recv`,
//! `tern files`, through real relays; byte-for-byte comparisons, hostile
//! names, limits, relays killed mid-transfer, killed senders and recipients.

mod cli_common;
mod daemon_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cli_common::*;
use serde_json::Value;

/// Bytes of the file in one chunk (PROTOCOL.md §16.3).
const CHUNK: usize = 15_979;

/// Deterministic bytes that are not all alike (a chunk moved or dropped
/// shows).
fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pair(relays: &[&Relay]) -> (Profile, Profile) {
    let ada = Profile::new("Ada", relays);
    let bob = Profile::new("Bob", relays);
    connect(&ada, "bob", &bob, "ada");
    (ada, bob)
}

fn files_dir(p: &Profile) -> PathBuf {
    p.sandbox().join("received")
}

/// `recv --json --files-dir …`: every event.
fn recv_files(p: &Profile, extra: &[&str]) -> (Vec<Value>, std::process::Output) {
    let dir = files_dir(p);
    let dir = dir.to_str().unwrap();
    let mut args = vec!["recv", "--json", "--files-dir", dir];
    args.extend_from_slice(extra);
    let o = p.run(&args);
    (json_lines(&stdout(&o)), o)
}

fn saved(events: &[Value]) -> Vec<(String, PathBuf)> {
    events
        .iter()
        .filter(|e| e["type"] == "file" && e["state"] == "received")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                PathBuf::from(e["saved_as"].as_str().unwrap()),
            )
        })
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn files_of_every_edge_size_arrive_byte_for_byte() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let out = ada.sandbox().join("out");
    let sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 2 << 20];
    let mut sent = Vec::new();
    let mut args: Vec<String> = vec!["send".into(), "bob".into(), "--json".into()];
    for (i, &n) in sizes.iter().enumerate() {
        let name = format!("f{i}-{n}.bin");
        let bytes = content(n, i as u64 + 1);
        let p = write(&out, &name, &bytes);
        args.push("--file".into());
        args.push(p.to_str().unwrap().into());
        sent.push((name, bytes));
    }
    args.push("the files".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ada.run(&refs);
    assert_code(&o, 0, "send --file");
    let out_events = json_lines(&stdout(&o));
    let states: Vec<&str> = out_events
        .iter()
        .filter(|e| e["type"] == "file")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["sent"; sizes.len()], "{out_events:?}");

    let (events, o) = recv_files(&bob, &[]);
    assert_code(&o, 0, "recv");
    let got = saved(&events);
    assert_eq!(got.len(), sizes.len(), "every file saved: {events:?}");
    for (name, bytes) in &sent {
        let (_, path) = got.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(path.parent().unwrap(), files_dir(&bob));
        assert_eq!(&std::fs::read(path).unwrap(), bytes, "{name} byte for byte");
    }
    // The offers are in the history, with the caption.
    let texts: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("[file] f6-2097152.bin (2.0 MiB)\nthe files")),
        "{texts:?}"
    );
    // Nothing partial is left behind, and both sides list the files.
    let leftovers: Vec<_> = std::fs::read_dir(files_dir(&bob))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let listed = json_lines(&bob.ok(&["files", "--json"]));
    assert_eq!(listed.len(), sizes.len());
    assert!(listed
        .iter()
        .all(|t| t["state"] == "received" && t["direction"] == "in"));
    let listed = json_lines(&ada.ok(&["files", "--json"]));
    assert!(listed
        .iter()
        .all(|t| t["state"] == "sent" && t["direction"] == "out"));
    // A second recv has nothing more: the chunks were deleted from the relay.
    let (events, _) = recv_files(&bob, &[]);
    assert!(saved(&events).is_empty(), "{events:?}");
}

#[test]
fn stdin_files_and_hostile_names_never_become_paths() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let bytes = content(40_000, 9);
    for name in [
        "../../etc/passwd",
        "../../etc/passwd",
        "evil\u{1b}[2J\u{202e}txt.exe",
        "..",
    ] {
        let o = ada.run_stdin(&["send", "bob", "--file", "-", "--name", name], &bytes);
        assert_code(&o, 0, "send --file - --name");
    }
    let (events, o) = recv_files(&bob, &[]);
    assert_code(&o, 0, "recv");
    let mut names: Vec<String> = saved(&events)
        .iter()
        .map(|(_, p)| {
            assert_eq!(
                p.parent().unwrap(),
                files_dir(&bob),
                "saved inside the folder"
            );
            assert_eq!(std::fs::read(p).unwrap(), bytes);
            p.file_name().unwrap().to_str().unwrap().to_string()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["evil_[2J_txt.exe", "file", "passwd", "passwd (1)"],
        "sanitised, never overwriting"
    );
    assert!(!bob.sandbox().join("etc").exists());
    // The text form escapes what the sender chose.
    let listed = bob.ok(&["files"]);
    assert!(
        !listed.contains('\u{1b}') && !listed.contains('\u{202e}'),
        "{listed:?}"
    );
    // The stdin spool is gone once the upload ended.
    let spool = ada.home.join("files").join("spool");
    let left = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "spool files left in {}", spool.display());
}

#[test]
fn recv_follow_saves_files_as_they_come_and_goes_on_with_text() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let dir = files_dir(&bob);
    let mut follow = bob.follow_with(&["--files-dir", dir.to_str().unwrap()]);
    let bytes = content(300_000, 7);
    let src = write(&ada.sandbox().join("out"), "trace.bin", &bytes);
    ada.ok(&["send", "bob", "--file", src.to_str().unwrap(), "a trace"]);
    let mut seen = Vec::new();
    let received = loop {
        let e = follow.next_event();
        seen.push(e.clone());
        if e["type"] == "file" && e["state"] == "received" {
            break e;
        }
    };
    let path = PathBuf::from(received["saved_as"].as_str().unwrap());
    assert_eq!(path.parent().unwrap(), dir);
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "{seen:?}");
    assert_eq!(received["caption"], "a trace");
    assert_eq!(received["name"], "trace.bin");
    // The follower keeps receiving after the file.
    ada.ok(&["send", "bob", "after the file"]);
    let (texts, _) = follow.next_messages(1);
    assert_eq!(texts, ["after the file"]);
    follow.kill();
}

#[test]
fn an_offer_over_the_limit_waits_for_files_get() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let bytes = content(3 * CHUNK, 5);
    let p = write(&ada.sandbox().join("out"), "big.iso", &bytes);
    ada.ok(&["send", "bob", "--file", p.to_str().unwrap()]);
    let (events, o) = recv_files(&bob, &["--max-file-size", "10K"]);
    assert_code(&o, 0, "recv with a limit");
    let offered: Vec<&Value> = events.iter().filter(|e| e["type"] == "file").collect();
    assert_eq!(offered.len(), 1, "{events:?}");
    assert_eq!(offered[0]["state"], "too-large");
    assert!(
        stderr(&o).contains("larger than your limit"),
        "{}",
        stderr(&o)
    );
    assert!(
        !files_dir(&bob).join("big.iso").exists(),
        "nothing downloaded"
    );
    let id = offered[0]["id"].as_str().unwrap().to_string();
    // A later recv does not take it either.
    let (events, _) = recv_files(&bob, &["--max-file-size", "10K"]);
    assert!(saved(&events).is_empty());
    let dir = files_dir(&bob);
    bob.ok(&[
        "files",
        "get",
        &id[..8],
        "--files-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(dir.join("big.iso")).unwrap(), bytes);
}

#[test]
fn a_relay_killed_mid_transfer_loses_nothing() {
    let r1 = Relay::start();
    let mut r2 = Relay::start();
    let r3 = Relay::start();
    let (ada, bob) = pair(&[&r1, &r2, &r3]);
    let bytes = content(12 << 20, 3);
    let p = write(&ada.sandbox().join("out"), "video.mp4", &bytes);
    let mut child = ada
        .cmd(&[
            "send",
            "bob",
            "--file",
            p.to_str().unwrap(),
            "--stall",
            "2",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once something is on the relays, one of them goes away.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let listed = json_lines(&ada.ok(&["files", "--json"]));
        if listed
            .first()
            .is_some_and(|t| t["done"].as_u64().unwrap_or(0) > 0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r2.stop();
    let status = wait_guarded(&mut child, HANG_GUARD, "send --file");
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "the file is whole on two relays: {}",
        show(&out)
    );
    let (events, o) = recv_files(&bob, &[]);
    assert_code(&o, 0, "recv with one relay down");
    let got = saved(&events);
    assert_eq!(got.len(), 1, "{events:?}");
    assert_eq!(std::fs::read(&got[0].1).unwrap(), bytes);
}

fn transfer_of(p: &Profile) -> Option<Value> {
    json_lines(&p.ok(&["files", "--json"])).into_iter().next()
}

/// Kills `tern` after `delay` (or lets it finish first).
fn run_killed(p: &Profile, args: &[&str], delay: Duration) -> bool {
    let mut child = p
        .cmd(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

#[test]
fn a_killed_sender_and_a_killed_recipient_resume_where_they_stopped() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let dir = files_dir(&bob);
    for (round, delay_ms) in [40u64, 120, 300, 700].into_iter().enumerate() {
        let bytes = content(6 << 20, 100 + round as u64);
        let name = format!("backup-{round}.tar");
        let p = write(&ada.sandbox().join("out"), &name, &bytes);
        let before = json_lines(&ada.ok(&["files", "--json"])).len();
        let skill = if std::env::var_os("NO_SENDER_KILL").is_some() {
            100_000
        } else {
            delay_ms
        };
        run_killed(
            &ada,
            &["send", "bob", "--file", p.to_str().unwrap()],
            Duration::from_millis(skill),
        );
        let listed = json_lines(&ada.ok(&["files", "--json"]));
        if listed.len() == before {
            // Killed before anything was recorded: nothing was offered.
            ada.ok(&["send", "bob", "--file", p.to_str().unwrap()]);
        } else {
            let t = &listed[0];
            if t["state"] == "uploading" {
                ada.ok(&["files", "retry", t["id"].as_str().unwrap()]);
            }
        }
        assert_eq!(transfer_of(&ada).unwrap()["state"], "sent");
        // The recipient is killed part-way, as often as it takes.
        let mut kills = 0;
        let t0 = Instant::now();
        loop {
            let d = dir.to_str().unwrap();
            let rkill = if std::env::var_os("NO_RECIPIENT_KILL").is_some() {
                100_000
            } else {
                delay_ms * (kills + 1)
            };
            let killed = run_killed(
                &bob,
                &["recv", "--files-dir", d],
                Duration::from_millis(rkill),
            );
            if !killed || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            kills += 1;
        }
        let (events, o) = recv_files(&bob, &[]);
        assert_code(&o, 0, "recv after the kills");
        let copies: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(&format!("backup-{round}"))
            })
            .collect();
        assert_eq!(
            copies.len(),
            1,
            "round {round}, {kills} kills: saved once: {copies:?}\n{events:?}\n{}\n{:?}\nsender: {:?}",
            show(&o),
            json_lines(&bob.ok(&["files", "--json"])),
            json_lines(&ada.ok(&["files", "--json"]))
        );
        assert_eq!(std::fs::read(&copies[0]).unwrap(), bytes, "round {round}");
        let t = transfer_of(&bob).unwrap();
        assert_eq!(t["state"], "received", "{t}");
    }
    let hidden: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "partial files left: {hidden:?}");
}

#[test]
fn a_full_disk_is_told_before_anything_is_written() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let small = bob.sandbox().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skip: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let bytes = content(3 << 20, 77);
    let p = write(&ada.sandbox().join("out"), "big.bin", &bytes);
    ada.ok(&["send", "bob", "--file", p.to_str().unwrap()]);
    let o = bob.run(&["recv", "--files-dir", small.to_str().unwrap()]);
    assert_code(&o, 75, "recv into a full disk");
    assert!(stderr(&o).contains("not enough space"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        0,
        "nothing half-written"
    );
    // With room, the same offer arrives whole.
    let (events, o) = recv_files(&bob, &[]);
    assert_code(&o, 0, "recv with room");
    let got = saved(&events);
    assert_eq!(std::fs::read(&got[0].1).unwrap(), bytes);
}

#[test]
fn a_full_relay_pauses_the_upload_and_it_goes_on_without_loss() {
    // A relay that takes 2 MiB at most: the upload stops at its quota,
    // and goes on as the recipient drains it.
    let relay = Relay::start_with(&["--max-data-mib", "2"]);
    let (ada, bob) = pair(&[&relay]);
    let bytes = content(6 << 20, 11);
    let p = write(&ada.sandbox().join("out"), "dump.sql", &bytes);
    let mut sender = ada
        .cmd(&[
            "send",
            "bob",
            "--file",
            p.to_str().unwrap(),
            "--stall",
            "80",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t0.elapsed() < Duration::from_secs(150) {
        let (events, _) = recv_files(&bob, &[]);
        got = saved(&events);
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = wait_guarded(&mut sender, HANG_GUARD, "send --file");
    let out = sender.wait_with_output().unwrap();
    assert!(status.success(), "{}", show(&out));
    assert_eq!(got.len(), 1, "the file arrived");
    assert_eq!(std::fs::read(&got[0].1).unwrap(), bytes);
}

#[test]
fn every_device_of_the_recipient_gets_the_file() {
    let (r1, r2) = (Relay::start(), Relay::start());
    let laptop = Profile::new("Alice", &[&r1]);
    let bob = Profile::new("Bob", &[&r2]);
    connect(&laptop, "bob", &bob, "alice");
    let server = join_server(&laptop, &[]);
    laptop.ok(&["device", "confirm", "--yes"]);
    for _ in 0..5 {
        for p in [&laptop, &server, &bob] {
            p.recv();
        }
    }
    let bytes = content(5 * CHUNK + 7, 21);
    let p = write(&bob.sandbox().join("out"), "minutes.odt", &bytes);
    let out = json_lines(&bob.ok(&["send", "alice", "--json", "--file", p.to_str().unwrap()]));
    let sent: Vec<&Value> = out.iter().filter(|e| e["type"] == "file").collect();
    assert_eq!(sent.len(), 2, "one copy per device of Alice: {out:?}");
    for device in [&laptop, &server] {
        let (events, o) = recv_files(device, &[]);
        assert_code(&o, 0, "recv on a device");
        let got = saved(&events);
        assert_eq!(got.len(), 1, "{}: {events:?}", device.display);
        assert_eq!(std::fs::read(&got[0].1).unwrap(), bytes);
    }
}

#[test]
fn a_hundred_mib_file_arrives_whole_while_it_uploads() {
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let bytes = content(100 << 20, 42);
    let p = write(&ada.sandbox().join("out"), "disk.img", &bytes);
    let mut sender = ada
        .cmd(&["send", "bob", "--file", p.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The recipient starts while the upload runs.
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t0.elapsed() < Duration::from_secs(240) {
        let (events, o) = recv_files(&bob, &["--max-file-size", "200M"]);
        assert!(
            o.status.success() || o.status.code() == Some(75),
            "{}",
            show(&o)
        );
        got = saved(&events);
    }
    assert!(wait_guarded(&mut sender, HANG_GUARD, "send --file").success());
    assert_eq!(got.len(), 1, "the file arrived");
    assert!(std::fs::read(&got[0].1).unwrap() == bytes, "byte for byte");
}

/// `tern daemon` for a profile (docs/JSONRPC.md), on a private socket in
/// its sandbox; every exchange is checked against the schema.
fn file_daemon(p: &Profile, name: &str, extra: &[&str]) -> daemon_common::Daemon {
    let socket = daemon_common::socket_in(p, name);
    let c = daemon_common::daemon_cmd(p.sandbox(), &[&p.home], &socket, extra);
    daemon_common::Daemon::start(c, &socket)
}

#[test]
fn files_through_daemons_both_ways_with_progress_and_limits() {
    use daemon_common::WAIT;
    use serde_json::json;
    let relay = Relay::start();
    let (ada, bob) = pair(&[&relay]);
    let bob_dir = files_dir(&bob);
    let ada_daemon = file_daemon(&ada, "a.sock", &[]);
    let bob_daemon = file_daemon(
        &bob,
        "b.sock",
        &[
            "--files-dir",
            bob_dir.to_str().unwrap(),
            "--max-file-size",
            "3M",
        ],
    );
    let mut bob_rpc = bob_daemon.connect();
    bob_rpc.ok("subscribe", json!({}));

    // Up through ada's daemon: progress comes to the caller, the result
    // says the copy is on the relay.
    let bytes = content(2_500_000, 11);
    let src = write(&ada.sandbox().join("out"), "photo.jpg", &bytes);
    let mut ada_rpc = ada_daemon.connect();
    let e = ada_rpc.error(
        "send_file",
        json!({"contact": "bob", "path": "out/photo.jpg"}),
    );
    assert_eq!(e["code"], -32602, "a relative path: {e}");
    let r = ada_rpc.ok(
        "send_file",
        json!({"contact": "bob", "path": src, "caption": "from the trip"}),
    );
    let files = r["files"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["state"], "sent");
    let notes = ada_rpc.take_notes();
    let progress: Vec<&Value> = notes
        .iter()
        .filter(|n| n["method"] == "file_progress")
        .collect();
    assert!(progress.len() >= 2, "{notes:?}");
    assert_eq!(progress.last().unwrap()["params"]["done"], 2_500_000);

    // Down by bob's daemon on its own, into its files folder, with
    // progress to the subscribers first.
    assert!(bob_rpc.notification("file_progress", WAIT).is_some());
    let got = bob_rpc
        .notification_where("file", WAIT, |p| p["state"] == "received")
        .expect("the file was saved");
    assert_eq!(got["name"], "photo.jpg");
    assert_eq!(got["caption"], "from the trip");
    assert_eq!(got["contact"], "ada");
    let path = PathBuf::from(got["saved_as"].as_str().unwrap());
    assert_eq!(path.parent().unwrap(), bob_dir);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Over bob's limit: offered, not downloaded, until file_get.
    let big = content(3_500_000, 12);
    let src = write(&ada.sandbox().join("out"), "big.bin", &big);
    let r = ada_rpc.ok("send_file", json!({"contact": "bob", "path": src}));
    assert_eq!(r["files"][0]["state"], "sent", "{r}");
    let offered = bob_rpc
        .notification_where("file", WAIT, |p| p["name"] == "big.bin")
        .expect("the offer was told");
    assert_eq!(offered["state"], "too-large", "{offered}");
    let id = offered["id"].as_str().unwrap().to_string();
    let listed = bob_rpc.ok("files", json!({}));
    let listed = listed.as_array().unwrap();
    assert!(listed
        .iter()
        .any(|f| f["id"] == id.as_str() && f["state"] == "too-large"));
    let mut getter = bob_daemon.connect();
    let r = getter.ok("file_get", json!({"id": &id[..8]}));
    assert_eq!(r["state"], "received", "{r}");
    assert!(getter
        .take_notes()
        .iter()
        .any(|n| n["method"] == "file_progress"));
    let path = PathBuf::from(r["saved_as"].as_str().unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), big);
    // Done: nothing to cancel or get again.
    let e = getter.error("file_cancel", json!({"id": &id}));
    assert_eq!(e["code"], -32001, "{e}");
    let e = getter.error("file_get", json!({"id": "zz"}));
    assert!(e.is_object(), "{e}");
}
