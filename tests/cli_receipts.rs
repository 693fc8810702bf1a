//! Delivery receipts end to end, with real relays on loopback: `tern log`
//! states, `tern send --wait-delivered` (delivered, timed out, and what it
//! received meanwhile kept for the next `recv`), receipts turned off per
//! contact and for the profile, a contact with two devices, and the daemon
//! (`send` with `wait_delivered`, the `delivered` notification).

mod cli_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cli_common::*;
use serde_json::{json, Value};

/// Exit status of `send --wait-delivered` when no receipt came in time.
const NOT_DELIVERED: i32 = 9;

fn pair() -> (Relay, Profile, Profile) {
    let relay = Relay::start();
    let ada = Profile::new("Ada", &[&relay]);
    let bob = Profile::new("Bob", &[&relay]);
    connect(&ada, "bob", &bob, "ada");
    (relay, ada, bob)
}

/// The `log --json` entry with this text.
#[track_caller]
fn entry(p: &Profile, contact: &str, text: &str) -> Value {
    let log = p.log(contact);
    log.iter()
        .find(|e| e["text"] == text)
        .cloned()
        .unwrap_or_else(|| panic!("no {text:?} in {log:#?}"))
}

/// What this profile calls each device of `contact` (`contacts --json`).
fn device_labels(p: &Profile, contact: &str) -> Vec<String> {
    p.contact(contact)["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["device"].as_str().unwrap().to_string())
        .collect()
}

fn delivered_devices(e: &Value) -> Vec<String> {
    let mut d: Vec<String> = e["delivered"]
        .as_array()
        .unwrap_or_else(|| panic!("no delivered list in {e}"))
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_string())
        .collect();
    d.sort();
    d
}

#[test]
fn a_message_received_is_delivered_by_that_device() {
    let (_relay, ada, bob) = pair();
    ada.send("bob", "did you get this?");
    let e = entry(&ada, "bob", "did you get this?");
    assert_eq!(e["state"], "on-relay", "{e}");
    assert_eq!(e["delivered"], json!([]), "{e}");
    let text = ada.ok(&["log", "bob"]);
    assert!(text.contains("Ada ✓: did you get this?"), "{text}");

    assert_eq!(bob.recv_texts(), vec!["did you get this?"]);
    // Bob's side: what he received has no delivery state.
    let b = entry(&bob, "ada", "did you get this?");
    assert_eq!(b["state"], Value::Null, "{b}");
    // Ada's next recv takes the receipt: nothing to print, but recorded.
    ada.recv_nothing();
    let e = entry(&ada, "bob", "did you get this?");
    assert_eq!(e["state"], "delivered", "{e}");
    assert_eq!(delivered_devices(&e), device_labels(&ada, "bob"));
    assert!(e["delivered"][0]["at_ms"].as_u64().unwrap() > 0, "{e}");
    let text = ada.ok(&["log", "bob"]);
    assert!(text.contains("Ada ✓✓: did you get this?"), "{text}");
    // No receipt for a receipt: Bob gets nothing more.
    bob.recv_nothing();
    assert_eq!(ada.log("bob").len(), 1);
}

#[test]
fn wait_delivered_returns_once_the_contact_receives() {
    let (_relay, ada, bob) = pair();
    let mut c = ada.cmd(&[
        "send",
        "bob",
        "--wait-delivered",
        "60",
        "--json",
        "cron alert",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let child: Child = c.spawn().unwrap();
    // Bob receives (as often as it takes for the message to be there).
    let mut got = Vec::new();
    while got.is_empty() && started.elapsed() < Duration::from_secs(60) {
        got = texts(&json_lines(&bob.ok(&["recv", "--wait", "10", "--json"])));
    }
    assert_eq!(got, vec!["cron alert"]);
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 0, "send --wait-delivered");
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "it returned when the receipt came, not at the end"
    );
    let v = &json_lines(&stdout(&o))[0];
    assert_eq!(v["delivered"], true, "{v}");
    assert_eq!(
        vec![v["device"].as_str().unwrap().to_string()],
        device_labels(&ada, "bob")
    );
    assert_eq!(entry(&ada, "bob", "cron alert")["state"], "delivered");
}

#[test]
fn wait_delivered_times_out_with_its_own_status_and_loses_nothing() {
    let (_relay, ada, bob) = pair();
    // Waiting for Ada's queues: her wait receives it, and must keep it.
    bob.send("ada", "meanwhile");
    let started = Instant::now();
    let o = ada.run(&["send", "bob", "--wait-delivered", "3", "--json", "anyone?"]);
    assert_code(
        &o,
        NOT_DELIVERED,
        "send --wait-delivered with nobody receiving",
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let v = &json_lines(&stdout(&o))[0];
    assert_eq!(v["delivered"], false, "{v}");
    assert_eq!(v["state"], "sent", "{v}");
    assert!(stdout(&o).lines().count() == 1, "{}", show(&o));
    // Stored while waiting (Bob got a receipt for it) and shown now, once.
    assert_eq!(entry(&ada, "bob", "meanwhile")["direction"], "in");
    let shown = ada.recv();
    assert_eq!(texts(&shown), vec!["meanwhile"]);
    assert_eq!(shown[0]["order"], "in-order", "{:?}", shown[0]);
    ada.recv_nothing();
    // Bob has the receipt for his message; and "anyone?" was sent, not
    // refused: once he receives it, Ada sees it delivered.
    assert_eq!(bob.recv_texts(), vec!["anyone?"]);
    assert_eq!(entry(&bob, "ada", "meanwhile")["state"], "delivered");
    ada.recv_nothing();
    assert_eq!(entry(&ada, "bob", "anyone?")["state"], "delivered");
}

#[test]
fn receipts_off_for_a_contact_or_the_profile_are_never_sent() {
    let (_relay, ada, bob) = pair();
    assert_eq!(
        bob.ok(&["contacts", "receipts", "ada"]).trim(),
        "receipts to ada: on"
    );
    bob.ok(&["contacts", "receipts", "ada", "off"]);
    assert_eq!(
        bob.ok(&["contacts", "receipts", "ada"]).trim(),
        "receipts to ada: off"
    );
    ada.send("bob", "one");
    assert_eq!(bob.recv_texts(), vec!["one"]);
    ada.recv_nothing();
    assert_eq!(entry(&ada, "bob", "one")["state"], "on-relay");

    bob.ok(&["contacts", "receipts", "ada", "on"]);
    bob.ok(&["profile", "--receipts", "off"]);
    assert_eq!(
        json_lines(&bob.ok(&["profile", "--json"]))[0]["receipts"],
        false
    );
    ada.send("bob", "two");
    assert_eq!(bob.recv_texts(), vec!["two"]);
    let o = ada.run(&["send", "bob", "--wait-delivered", "2", "three"]);
    assert_code(&o, NOT_DELIVERED, "wait for a contact with receipts off");
    assert_eq!(bob.recv_texts(), vec!["three"]);
    ada.recv_nothing();
    for t in ["one", "two", "three"] {
        assert_eq!(entry(&ada, "bob", t)["state"], "on-relay", "{t}");
    }

    // On again: the same path marks the next one (so the above is the
    // setting at work, not a receipt that never works).
    bob.ok(&["profile", "--receipts", "on"]);
    ada.send("bob", "four");
    assert_eq!(bob.recv_texts(), vec!["four"]);
    ada.recv_nothing();
    assert_eq!(entry(&ada, "bob", "four")["state"], "delivered");
    assert_eq!(entry(&ada, "bob", "three")["state"], "on-relay");
}

#[test]
fn a_contact_with_two_devices_shows_both() {
    let (r1, r2) = (Relay::start(), Relay::start());
    let ada = Profile::new("Ada", &[&r1]);
    let laptop = Profile::new("Bob", &[&r2]);
    connect(&ada, "bob", &laptop, "ada");
    let link = laptop.ok(&["device", "link", "--link", "--name", "laptop"]);
    let phone = Profile::empty("Bob-phone");
    phone.ok(&[
        "device",
        "join",
        link.trim(),
        "--name",
        "phone",
        "--no-passphrase",
    ]);
    laptop.ok(&["device", "confirm", "--yes"]);
    for _ in 0..5 {
        for p in [&laptop, &phone, &ada] {
            p.recv();
        }
    }
    assert_eq!(ada.contact("bob")["devices"], 2);

    ada.send("bob", "to both of you");
    assert_eq!(laptop.recv_texts(), vec!["to both of you"]);
    ada.recv();
    let e = entry(&ada, "bob", "to both of you");
    assert_eq!(e["delivered"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(phone.recv_texts(), vec!["to both of you"]);
    ada.recv();
    let e = entry(&ada, "bob", "to both of you");
    let mut labels = device_labels(&ada, "bob");
    labels.sort();
    assert_eq!(delivered_devices(&e), labels, "{e}");
    assert_eq!(labels.len(), 2);

    // Bob's side: what the phone sent, the laptop sees delivered too (the
    // receipt goes to every device of the contact).
    phone.send("ada", "from the phone");
    laptop.recv();
    assert_eq!(ada.recv_texts(), vec!["from the phone"]);
    phone.recv();
    laptop.recv();
    assert_eq!(entry(&phone, "ada", "from the phone")["state"], "delivered");
    let on_laptop = entry(&laptop, "ada", "from the phone");
    assert_eq!(on_laptop["state"], "delivered", "{on_laptop}");
    assert_eq!(on_laptop["device"], "phone", "{on_laptop}");
}

// ---------------------------------------------------------------------------
// The daemon

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request, its response; notifications before it are returned too.
fn call(socket: &std::path::Path, method: &str, params: Value) -> (Value, Vec<Value>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").unwrap();
    let mut notes = Vec::new();
    for l in BufReader::new(s).lines() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        if v.get("method").is_some() {
            notes.push(v);
        } else {
            return (v, notes);
        }
    }
    panic!("the daemon hung up");
}

#[test]
fn through_the_daemon_send_waits_and_subscribers_hear_delivered() {
    let (_relay, ada, bob) = pair();
    let dir = ada.sandbox().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = dir.join("d.sock");
    let mut c = tern_cmd(ada.sandbox());
    c.arg("daemon")
        .arg("--home")
        .arg(&ada.home)
        .arg("--socket")
        .arg(&socket);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _daemon = Daemon(child);
    assert_eq!(first.trim(), socket.display().to_string());

    // A subscriber, listening on a connection of its own.
    let mut sub = UnixStream::connect(&socket).unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    writeln!(
        sub,
        "{}",
        json!({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {}})
    )
    .unwrap();
    let mut sub_lines = BufReader::new(sub.try_clone().unwrap()).lines();

    let profile = ada.home.display().to_string();
    let id = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let got = texts(&json_lines(&bob.ok(&["recv", "--wait", "10", "--json"])));
                if !got.is_empty() {
                    return got;
                }
            }
            Vec::new()
        });
        let (r, _) = call(
            &socket,
            "send",
            json!({"profile": profile, "contact": "bob", "text": "via the bot", "wait_delivered": 60}),
        );
        assert_eq!(receiver.join().unwrap(), vec!["via the bot"]);
        let result = &r["result"];
        assert_eq!(result["delivered"], true, "{r}");
        assert_eq!(
            vec![result["device"].as_str().unwrap().to_string()],
            device_labels(&ada, "bob")
        );
        result["id"].as_str().unwrap().to_string()
    });
    // The subscriber heard of it.
    let delivered = loop {
        let v: Value = serde_json::from_str(&sub_lines.next().unwrap().unwrap()).unwrap();
        if v["method"] == "delivered" {
            break v["params"].clone();
        }
    };
    assert_eq!(delivered["id"], id.as_str(), "{delivered}");
    assert_eq!(delivered["contact"], "bob");
    assert_eq!(delivered["profile"], profile.as_str());
    assert_eq!(
        vec![delivered["device"].as_str().unwrap().to_string()],
        device_labels(&ada, "bob")
    );

    // `log` through the daemon carries the state too.
    let (r, _) = call(
        &socket,
        "log",
        json!({"profile": profile, "contact": "bob"}),
    );
    let e = r["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["text"] == "via the bot")
        .cloned()
        .unwrap();
    assert_eq!(e["state"], "delivered", "{e}");
    assert_eq!(delivered_devices(&e), device_labels(&ada, "bob"));

    // The CLI through the daemon: nobody receives, so the distinct status,
    // with the daemon's answer in --json.
    let o = ada.run(&[
        "send",
        "bob",
        "--wait-delivered",
        "2",
        "--json",
        "nobody home",
    ]);
    assert_code(
        &o,
        NOT_DELIVERED,
        "send --wait-delivered through the daemon",
    );
    let v = &json_lines(&stdout(&o))[0];
    assert_eq!(v["delivered"], false, "{v}");
    // A wait too long for the daemon is a usage error, sending nothing.
    let (r, _) = call(
        &socket,
        "send",
        json!({"profile": profile, "contact": "bob", "text": "x", "wait_delivered": 10_000_000}),
    );
    assert_eq!(r["error"]["data"]["exit_code"], 2, "{r}");
}

/// Many messages received (in as many batches as the relay pushes) are
/// acknowledged by receipts that cover what was owed together: every one
/// ends delivered.
#[test]
fn a_long_run_of_messages_is_delivered_by_few_receipts() {
    let (_relay, ada, bob) = pair();
    let lines: String = (0..150).map(|i| format!("line {i}\n")).collect();
    let o = run_cmd(
        ada.cmd(&["send", "--lines", "bob"]),
        Some(lines.as_bytes()),
        HANG_GUARD,
    );
    assert_code(&o, 0, "send --lines");
    let got = bob.recv_texts();
    assert_eq!(got.len(), 150, "{got:?}");
    ada.recv_nothing();
    let log = json_lines(&ada.ok(&["log", "bob", "--json", "--limit", "200"]));
    assert_eq!(log.len(), 150);
    let late: Vec<&Value> = log.iter().filter(|e| e["state"] != "delivered").collect();
    assert!(late.is_empty(), "not delivered: {late:#?}");
}
