//! `tern daemon` and `tern jsonrpc` end to end, with real relays on
//! loopback: JSON-RPC over the socket and over stdio, the delivery contract
//! (nothing lost when no client listens, when a client dies before its
//! `ack`, when the daemon is killed), the socket's permissions and the
//! one-daemon-per-home rule. Also `tern send --lines`. Every exchange is
//! checked against docs/jsonrpc.schema.json (tests/daemon_common).

mod cli_common;
mod daemon_common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};

use cli_common::*;
use daemon_common::*;
use serde_json::{json, Value};

#[test]
fn two_profiles_in_one_daemon_200_messages_back_to_back_exactly_once() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&a, "d.sock");
    let d = Daemon::start(
        daemon_cmd(a.sandbox(), &[&a.home, &b.home], &socket, &[]),
        &socket,
    );
    let mut bot = d.connect();
    let profiles = bot.ok("profiles", json!({}));
    assert_eq!(profiles.as_array().unwrap().len(), 2, "{profiles}");
    assert!(profiles.as_array().unwrap().iter().all(|p| p["ok"] == true));
    // Several profiles: each call names one.
    let e = bot.error("contacts", json!({}));
    assert_eq!(e["code"], -32100, "{e}");
    // By name works too, when no other profile has it.
    let contacts = bot.ok("contacts", json!({"profile": "Bob"}));
    assert_eq!(contacts[0]["name"], "ada");
    let sub = bot.ok("subscribe", json!({"profile": label(&b)}));
    assert_eq!(sub["manual_ack"], false);

    let mut sender = d.connect();
    let started = Instant::now();
    let mut ids = HashMap::new();
    for i in 0..200 {
        let text = format!("burst {i}");
        let r = sender.ok(
            "send",
            json!({"profile": label(&a), "contact": "bob", "text": text}),
        );
        assert_eq!(r["state"], "sent", "{r}");
        assert_eq!(r["relays"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["failed"], json!([]), "{r}");
        ids.insert(r["id"].as_str().unwrap().to_string(), text);
    }
    eprintln!("200 sends through the daemon: {:?}", started.elapsed());
    assert_eq!(ids.len(), 200, "every message has an id of its own");

    let got = bot.messages(200);
    let mut seen = HashSet::new();
    for m in &got {
        assert_eq!(m["profile"], label(&b));
        assert_eq!(m["contact"], "ada");
        let id = m["id"].as_str().unwrap();
        assert_eq!(ids.get(id).map(String::as_str), m["text"].as_str(), "{m}");
        assert!(seen.insert(id.to_string()), "delivered twice: {m}");
    }
    // Exactly once: nothing more comes.
    assert!(bot
        .notification("message", Duration::from_secs(2))
        .is_none());
    let history = wait_for_history(&mut sender, &label(&b), "ada", 200);
    assert_eq!(history.len(), 200, "each message once in the history");
    eprintln!("200 messages end to end: {:?}", started.elapsed());
}

#[test]
fn what_arrives_with_no_client_connected_is_delivered_on_connect() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let d = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]), &socket);
    for t in ["one", "two", "three"] {
        a.send("bob", t);
    }
    let mut look = d.connect();
    wait_for_history(&mut look, &label(&b), "ada", 3);
    drop(look);
    // (Stored comes a moment before handed to the delivery list.)
    std::thread::sleep(Duration::from_millis(300));
    let mut bot = d.connect();
    let sub = bot.ok("subscribe", json!({}));
    assert_eq!(sub["pending"], 3, "{sub}");
    let texts: Vec<Value> = bot.messages(3).iter().map(|m| m["text"].clone()).collect();
    assert_eq!(texts, [json!("one"), json!("two"), json!("three")]);
    // Delivered: a second client does not get them again.
    let mut other = d.connect();
    assert_eq!(other.ok("subscribe", json!({}))["pending"], 0);
    // And what comes now goes to both.
    a.send("bob", "four");
    assert_eq!(bot.messages(1)[0]["text"], "four");
    assert_eq!(other.messages(1)[0]["text"], "four");
    // A one-shot recv finds nothing left behind for it (once the daemon
    // has noted the last delivery).
    std::thread::sleep(Duration::from_secs(1));
    drop(d);
    b.recv_nothing();
}

#[test]
fn manual_ack_redelivers_until_acknowledged_across_restarts() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let cmd = || daemon_cmd(b.sandbox(), &[&b.home], &socket, &["--manual-ack"]);
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    assert_eq!(bot.ok("subscribe", json!({}))["manual_ack"], true);
    a.send("bob", "hold me");
    let first = bot.messages(1).remove(0);
    assert_eq!(first["text"], "hold me");
    // The bot dies before its ack.
    drop(bot);
    let mut again = d.connect();
    assert_eq!(again.ok("subscribe", json!({}))["pending"], 1);
    assert_eq!(again.messages(1)[0]["id"], first["id"]);
    drop(again);
    // So does the daemon.
    d.kill();
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    assert_eq!(bot.ok("subscribe", json!({}))["pending"], 1);
    assert_eq!(bot.messages(1)[0]["id"], first["id"]);
    let e = bot.error("ack", json!({"id": "00"}));
    assert_eq!(e["code"], -32101, "{e}");
    assert_eq!(bot.ok("ack", json!({"id": first["id"]}))["acked"], 1);
    drop(bot);
    let mut later = d.connect();
    assert_eq!(later.ok("subscribe", json!({}))["pending"], 0);
    assert!(later
        .notification("message", Duration::from_secs(1))
        .is_none());
    // The acknowledgement outlives the daemon.
    drop(later);
    d.kill();
    let d = Daemon::start(cmd(), &socket);
    assert_eq!(d.connect().ok("subscribe", json!({}))["pending"], 0);
}

#[test]
fn a_daemon_killed_mid_traffic_loses_nothing() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let cmd = || daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]);
    let mut d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let n = 60;
    let input: String = (0..n).map(|i| format!("flow {i}\n")).collect();
    let mut sender = a.cmd(&["send", "--lines", "bob"]);
    sender
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = sender.spawn().unwrap();
    let mut stdin: ChildStdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let mut got = HashSet::new();
    for m in bot.messages(5) {
        got.insert(m["text"].as_str().unwrap().to_string());
    }
    d.kill();
    // What the killed daemon wrote before it died was delivered: the bot
    // reads it to the end.
    while let Some(m) = bot.notification("message", Duration::from_secs(2)) {
        got.insert(m["text"].as_str().unwrap().to_string());
    }
    let status = wait_guarded(&mut child, HANG_GUARD, "send --lines");
    assert!(status.success(), "send --lines failed");
    let d = Daemon::start(cmd(), &socket);
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "after the restart only {} of {n} arrived; daemon log:\n{}",
            got.len(),
            d.stderr()
        );
        if let Some(m) = bot.notification("message", Duration::from_secs(5)) {
            got.insert(m["text"].as_str().unwrap().to_string());
        }
    }
    let mut look = d.connect();
    let history = wait_for_history(&mut look, &label(&b), "ada", n);
    let texts: HashSet<&str> = history
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(history.len(), n, "each message exactly once in the history");
    assert_eq!(texts.len(), n);
}

#[test]
fn the_socket_is_private_one_daemon_per_home_and_failures_stay_apart() {
    let relay = Relay::start();
    let b = Profile::new("Bob", &[&relay]);
    let nobody = Profile::empty("Nobody");
    std::fs::create_dir_all(&nobody.home).unwrap();
    let socket = b.sandbox().join("run/tern/b.sock");
    let d = Daemon::start(
        daemon_cmd(b.sandbox(), &[&b.home, &nobody.home], &socket, &[]),
        &socket,
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600, "socket mode");
    assert_eq!(
        mode(socket.parent().unwrap()),
        0o700,
        "socket directory mode"
    );

    // The home that holds no profile is reported; the other is served.
    let mut c = d.connect();
    let profiles = c.ok("profiles", json!({}));
    let bad = &profiles[1];
    assert_eq!(bad["ok"], false, "{profiles}");
    assert_eq!(bad["error"]["exit_code"], 7, "{profiles}");
    let e = c.error("contacts", json!({"profile": label(&nobody)}));
    assert_eq!(e["code"], -32007, "{e}");
    assert_eq!(
        c.ok("profile", json!({"profile": label(&b)}))["name"],
        "Bob"
    );

    // A second daemon for the same home is refused, naming the first.
    let other = b.sandbox().join("run/tern/other.sock");
    let o = run_cmd(
        daemon_cmd(b.sandbox(), &[&b.home], &other, &[]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 1, "second daemon");
    assert!(
        stderr(&o).contains("another tern daemon serves") && stderr(&o).contains("b.sock"),
        "{}",
        show(&o)
    );
    assert!(!other.exists(), "the refused daemon left a socket");

    // A socket in a directory others can read is refused.
    let open_dir = b.sandbox().join("open");
    std::fs::create_dir_all(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(c);
    drop(d);
    let o = run_cmd(
        daemon_cmd(b.sandbox(), &[&b.home], &open_dir.join("x.sock"), &[]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 1, "socket in an open directory");
    assert!(stderr(&o).contains("open to other users"), "{}", show(&o));

    // A stale socket (the daemon above was SIGKILLed) is replaced, and by
    // default the socket goes beside the profile.
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    let d = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]), &socket);
    drop(d.connect());
    drop(d);
    let mut c = tern_cmd(b.sandbox());
    c.env_remove("XDG_RUNTIME_DIR")
        .arg("daemon")
        .arg("--home")
        .arg(&b.home);
    let beside = b.home.join("daemon.sock");
    let d = Daemon::start(c, &beside);
    assert_eq!(mode(&beside), 0o600);
    drop(d);
}

#[test]
fn jsonrpc_over_stdio_with_bad_input_and_hostile_text() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let mut c = b.cmd(&["jsonrpc"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let _err = drain(child.stderr.take().unwrap());
    let stdin = child.stdin.take().unwrap();
    let mut rpc = Rpc::over(Box::new(stdin), child.stdout.take().unwrap());

    assert_eq!(rpc.ok("contacts", json!({}))[0]["name"], "ada");
    assert_eq!(rpc.ok("relays", json!({}))[0]["access_key"], false);
    rpc.write_line("{not json");
    assert_eq!(rpc.response()["error"]["code"], -32700);
    assert_eq!(rpc.error("frobnicate", json!({}))["code"], -32601);
    assert_eq!(rpc.error("send", json!({"contact": 5}))["code"], -32602);
    assert_eq!(
        rpc.error("send", json!({"contact": "bob", "text": "x", "extra": 1}))["code"],
        -32602
    );
    let e = rpc.error("send", json!({"contact": "nobody", "text": "hi"}));
    assert_eq!(e["code"], -32003, "{e}");
    assert_eq!(e["data"]["retryable"], false);
    rpc.write_line(&"x".repeat((1 << 20) + 10));
    assert_eq!(rpc.response()["error"]["code"], -32600);
    // A notification (no id) gets no answer; the next request does.
    rpc.write_line(r#"{"jsonrpc":"2.0","method":"profile"}"#);
    assert_eq!(rpc.ok("profile", json!({}))["name"], "Bob");

    rpc.ok("subscribe", json!({}));
    let hostile = "\x1b[2J\u{202e}evil\r\nline \u{85}\u{7f} é";
    a.send("bob", hostile);
    let m = rpc.messages(1).remove(0);
    assert_eq!(m["text"], hostile, "hostile text arrives exactly");
    assert_eq!(m["from"], "ada");

    // And the other way.
    let r = rpc.ok("send", json!({"contact": "ada", "text": "back"}));
    assert_eq!(r["state"], "sent");
    assert_eq!(a.recv_texts(), ["back"]);

    // The end of stdin ends it.
    drop(rpc);
    let st = wait_guarded(&mut child, HANG_GUARD, "tern jsonrpc");
    assert!(st.success(), "{st:?}");
}

#[test]
fn send_lines_sends_each_line_in_one_process() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let out = a.ok_stdin(
        &["send", "--lines", "--json", "bob"],
        b"one\n\ntwo\r\nthree",
    );
    let sent = json_lines(&out);
    assert_eq!(sent.len(), 3, "{out}");
    assert!(sent.iter().all(|s| s["state"] == "sent"), "{out}");
    assert_eq!(b.recv_texts(), ["one", "two", "three"]);
    // Not UTF-8 on line 2: line 1 is sent, nothing after.
    let o = a.run_stdin(&["send", "--lines", "bob"], b"fine\n\xff\nnever\n");
    assert_code(&o, 1, "send --lines with a bad line");
    assert!(stderr(&o).contains("line 2"), "{}", show(&o));
    assert_eq!(b.recv_texts(), ["fine"]);
}

#[test]
fn one_shot_send_goes_through_the_daemon_without_unlocking() {
    let relay = Relay::start();
    let a = Profile::new("Ada", &[&relay]);
    let b = Profile::with_passphrase("Bob", &[&relay], "plum ferry onion velvet gravel");
    connect(&a, "bob", &b, "ada");
    let socket = socket_in(&b, "b.sock");
    let mut c = b.cmd(&["daemon", "--socket"]);
    c.arg(&socket);
    let d = Daemon::start(c, &socket);
    // No passphrase given: only the daemon can send this.
    let o = run_cmd(
        b.bare_cmd(&["send", "--json", "ada", "through the daemon"]),
        None,
        HANG_GUARD,
    );
    assert_code(&o, 0, "send through the daemon");
    let sent = json_lines(&stdout(&o));
    assert_eq!(sent[0]["state"], "sent", "{}", show(&o));
    assert_eq!(a.recv_texts(), ["through the daemon"]);
    // Its errors keep their exit codes.
    let o = run_cmd(b.bare_cmd(&["send", "nobody", "x"]), None, HANG_GUARD);
    assert_code(&o, 3, "send to no such contact through the daemon");
    // Told to work alone, the same command needs the passphrase.
    let mut alone = b.bare_cmd(&["send", "ada", "alone"]);
    alone.env("TERN_NO_DAEMON", "1");
    assert_code(
        &run_cmd(alone, None, HANG_GUARD),
        5,
        "send without the daemon",
    );
    drop(d);
}

#[test]
fn invite_and_accept_through_one_daemon_connect_its_two_profiles() {
    let relay = Relay::start();
    let a = Profile::new("Ada", &[&relay]);
    let b = Profile::new("Bob", &[&relay]);
    let socket = socket_in(&a, "d.sock");
    let d = Daemon::start(
        daemon_cmd(a.sandbox(), &[&a.home, &b.home], &socket, &[]),
        &socket,
    );
    let mut bot = d.connect();
    bot.ok("subscribe", json!({}));
    let inv = bot.ok("invite", json!({"profile": "Ada", "name": "bob"}));
    let link = inv["link"].as_str().unwrap().to_string();
    assert!(link.starts_with("TERN:"), "{inv}");
    let acc = bot.ok(
        "accept",
        json!({"profile": "Bob", "link": link, "name": "ada"}),
    );
    assert_eq!(acc["state"], "pending", "{acc}");
    // Both sides complete on their own, with no other command.
    let mut connected = HashSet::new();
    while connected.len() < 2 {
        let n = bot
            .notification("connected", WAIT)
            .unwrap_or_else(|| panic!("only {connected:?} connected; log:\n{}", d.stderr()));
        connected.insert(n["profile"].as_str().unwrap().to_string());
    }
    let r = bot.ok(
        "send",
        json!({"profile": "Ada", "contact": "bob", "text": "hello"}),
    );
    assert_eq!(r["state"], "sent", "{r}");
    let m = bot.notification("message", WAIT).expect("the message");
    assert_eq!(m["profile"], label(&b));
    assert_eq!(m["text"], "hello");
}

/// docs/jsonrpc.schema.json lists exactly the methods the daemon
/// dispatches, and real traffic of every method and notification matches
/// it (every exchange in this file is checked too, by the harness).
#[test]
fn the_schema_lists_the_daemons_methods_and_matches_real_traffic() {
    assert!(
        jsonschema::meta::is_valid(&SCHEMA),
        "docs/jsonrpc.schema.json is not a valid JSON Schema: {:?}",
        jsonschema::meta::validate(&SCHEMA).err()
    );
    let listed: BTreeSet<String> = SCHEMA["methods"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let served: BTreeSet<String> = tern::cli::daemon::method_names()
        .map(String::from)
        .collect();
    assert_eq!(
        listed, served,
        "docs/jsonrpc.schema.json and the daemon's dispatch name different methods"
    );

    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let c = Profile::new("Cy", &[&relay]);
    let nobody = Profile::empty("Nobody");
    std::fs::create_dir_all(&nobody.home).unwrap();
    let socket = socket_in(&a, "s.sock");
    let d = Daemon::start(
        daemon_cmd(
            a.sandbox(),
            &[&a.home, &b.home, &c.home, &nobody.home],
            &socket,
            &[],
        ),
        &socket,
    );
    let mut rpc = d.connect();
    rpc.ok("subscribe", json!({}));
    let e = rpc
        .notification("error", WAIT)
        .expect("the error of Nobody");
    assert_eq!(e["kind"], "profile", "{e}");
    assert_eq!(rpc.ok("profiles", json!({})).as_array().unwrap().len(), 4);
    rpc.ok("contacts", json!({"profile": "Ada"}));
    rpc.ok("profile", json!({"profile": "Ada"}));
    rpc.ok("relays", json!({"profile": "Ada"}));
    let sent = rpc.ok(
        "send",
        json!({"profile": "Ada", "contact": "bob", "text": "to the schema"}),
    );
    let m = rpc.notification("message", WAIT).expect("the message");
    assert_eq!(m["id"], sent["id"]);
    assert_eq!(
        rpc.ok("ack", json!({"profile": "Bob", "id": m["id"]}))["acked"],
        0
    );
    assert_eq!(
        rpc.ok("log", json!({"profile": "Bob", "contact": "ada"}))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let inv = rpc.ok("invite", json!({"profile": "Cy", "name": "ada"}));
    rpc.ok(
        "accept",
        json!({"profile": "Ada", "link": inv["link"], "name": "cy"}),
    );
    rpc.notification("connected", WAIT)
        .expect("a connected notification");
    // A contact changes its profile (a one-shot command beside the daemon).
    b.ok(&["profile", "--status", "schema status"]);
    let u = rpc
        .notification("contact_updated", WAIT)
        .expect("a contact_updated notification");
    assert_eq!(u["contact"], "bob", "{u}");

    rpc.ok("verify", json!({"profile": "Ada", "contact": "bob"}));
    rpc.ok("rotate", json!({"profile": "Ada", "contact": "bob"}));
    rpc.ok("profile", json!({"profile": "Cy", "status": "checked"}));
    a.ok(&["device", "link", "--link"]);
    let devs = rpc.ok("devices", json!({"profile": "Ada"}));
    let link = devs[1]["name"].clone();
    rpc.ok("device_remove", json!({"profile": "Ada", "device": link}));
    // Files: one sent and downloaded on its own; what cannot be done to it
    // now (it is sent, and received) is refused with the codes listed.
    let path = a.sandbox().join("schema.txt");
    std::fs::write(&path, "a small file").unwrap();
    let up = rpc.ok(
        "send_file",
        json!({"profile": "Ada", "contact": "bob", "path": path.display().to_string()}),
    );
    let file_id = up["files"][0]["id"].clone();
    let f = rpc.notification("file", WAIT).expect("a file notification");
    assert_eq!(f["state"], "received", "{f}");
    assert!(!rpc
        .ok("files", json!({"profile": "Bob"}))
        .as_array()
        .unwrap()
        .is_empty());
    rpc.error("file_get", json!({"profile": "Bob", "id": file_id}));
    rpc.error("file_retry", json!({"profile": "Ada", "id": file_id}));
    rpc.error("file_cancel", json!({"profile": "Ada", "id": file_id}));
    let relative = rpc.error(
        "send_file",
        json!({"profile": "Ada", "contact": "bob", "path": "schema.txt"}),
    );
    assert_eq!(relative["code"], -32602, "{relative}");

    // Every method refuses a parameter it does not know, and one the
    // schema does not list: the harness checks the schema refuses it too.
    for method in &listed {
        let e = rpc.error(method, json!({"bogus": 1}));
        assert_eq!(e["code"], -32602, "{method}: {e}");
    }
    assert_eq!(rpc.error("frobnicate", json!({}))["code"], -32601);
    // Wrong types, missing ones, out of range.
    for (method, params) in [
        ("send", json!({"profile": "Ada", "contact": "bob"})),
        (
            "send",
            json!({"profile": "Ada", "contact": "bob", "text": 5}),
        ),
        (
            "log",
            json!({"profile": "Ada", "contact": "bob", "limit": -1}),
        ),
        ("ack", json!({"profile": "Ada"})),
        ("accept", json!({"profile": "Ada"})),
        ("invite", json!({"profile": "Ada", "name": ["x"]})),
    ] {
        let e = rpc.error(method, params.clone());
        assert_eq!(e["code"], -32602, "{method} {params}: {e}");
    }
    // tern's own errors have the codes the schema lists for them.
    let e = rpc.error(
        "send",
        json!({"profile": "Ada", "contact": "nobody", "text": "x"}),
    );
    assert_eq!(e["code"], -32003);
    let e = rpc.error("contacts", json!({}));
    assert_eq!(e["code"], -32100);

    let seen = SEEN.lock().unwrap().clone();
    // Results of these need a file in the middle of a transfer:
    // tests/cli_files.rs has them; here their errors are checked.
    let errors_only = ["file_get", "file_retry", "file_cancel"];
    for method in &listed {
        let answered = if errors_only.contains(&method.as_str()) {
            seen.iter().any(|s| {
                s.strip_prefix(&format!("{method}!"))
                    .is_some_and(|c| c != "-32602")
            })
        } else {
            seen.contains(method)
        };
        assert!(answered, "{method} was never answered: {seen:?}");
    }
    // `notice` comes with device linking (tests/cli_devices.rs); when it
    // comes here, the harness checks it all the same.
    for n in ["message", "connected", "contact_updated", "error", "file"] {
        assert!(
            seen.contains(&format!("notify:{n}")),
            "no {n} notification: {seen:?}"
        );
    }
}

/// `verify`, `rotate`, `devices`, `device_remove` and `profile` with a
/// change: the CLI's commands through the daemon, each with a bad
/// parameter refused.
#[test]
fn verify_rotate_devices_and_profile_changes_through_the_daemon() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let socket = socket_in(&b, "b.sock");
    let d = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &socket, &[]), &socket);
    let mut rpc = d.connect();
    rpc.ok("subscribe", json!({}));

    // verify: the code Ada's side shows is Bob's side's code.
    let shown = rpc.ok("verify", json!({"contact": "ada"}));
    assert_eq!(shown["verified"], false, "{shown}");
    let theirs = json_lines(&a.ok(&["verify", "--json", "bob"]))[0]["code"].clone();
    assert_eq!(shown["code"], theirs);
    let e = rpc.error(
        "verify",
        json!({"contact": "ada", "code": "00000 00000 00000 00000 00000 00000"}),
    );
    assert_eq!(e["code"], -32004, "{e}");
    assert_eq!(e["data"]["match"], false, "{e}");
    assert_eq!(
        rpc.ok("contacts", json!({}))[0]["security"],
        "shared",
        "a mismatch verifies nothing"
    );
    assert_eq!(
        rpc.error("verify", json!({"contact": "ada", "code": "12"}))["code"],
        -32002
    );
    assert_eq!(
        rpc.error("verify", json!({"contact": "ada", "code": 12}))["code"],
        -32602
    );
    assert_eq!(
        rpc.error("verify", json!({"contact": "nobody"}))["code"],
        -32003
    );
    let ok = rpc.ok("verify", json!({"contact": "ada", "code": theirs}));
    assert_eq!(ok["match"], true, "{ok}");
    assert_eq!(rpc.ok("contacts", json!({}))[0]["security"], "verified");
    assert_eq!(
        rpc.ok("verify", json!({"contact": "ada"}))["verified"],
        true
    );

    // rotate: started here, completed by the daemon's receiving and Ada's
    // recv; messages go both ways afterwards.
    for bad in [
        json!({}),
        json!({"contact": "ada", "all": true}),
        json!({"all": 1}),
    ] {
        assert_eq!(rpc.error("rotate", bad.clone())["code"], -32602, "{bad}");
    }
    let r = rpc.ok("rotate", json!({"contact": "ada"}));
    assert_eq!(r[0]["contact"], "ada", "{r}");
    assert_eq!(r[0]["warnings"], json!([]), "{r}");
    let deadline = Instant::now() + WAIT;
    loop {
        a.recv();
        let c = rpc.ok("contacts", json!({}));
        if c[0]["rotating"] == false && !c[0]["last_rotated"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not complete: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.send("bob", "after the rotation");
    let m = rpc
        .notification("message", WAIT)
        .expect("a message after the rotation");
    assert_eq!(m["text"], "after the rotation");
    rpc.ok("send", json!({"contact": "ada", "text": "rotated too"}));
    assert!(a.recv_texts().contains(&"rotated too".to_string()));
    assert_eq!(rpc.ok("rotate", json!({"all": true}))[0]["contact"], "ada");

    // devices: this one, then a link shown by a one-shot command, which
    // device_remove withdraws.
    let devs = rpc.ok("devices", json!({}));
    assert_eq!(devs.as_array().unwrap().len(), 1, "{devs}");
    assert_eq!(devs[0]["this_device"], true);
    b.ok(&["device", "link", "--link"]);
    let devs = rpc.ok("devices", json!({}));
    let link = devs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["this_device"] == false)
        .unwrap_or_else(|| panic!("no pending link listed: {devs}"));
    assert_eq!(link["pending_link"], true, "{devs}");
    assert_eq!(
        rpc.error("device_remove", json!({"device": 7}))["code"],
        -32602
    );
    assert_eq!(
        rpc.error("device_remove", json!({"device": "no such device"}))["code"],
        -32003
    );
    let gone = rpc.ok("device_remove", json!({"device": link["name"]}));
    assert_eq!(gone["withdrawn"], true, "{gone}");
    assert_eq!(rpc.ok("devices", json!({})).as_array().unwrap().len(), 1);

    // profile: a new name, sent to Ada.
    assert_eq!(rpc.error("profile", json!({"name": 5}))["code"], -32602);
    assert_eq!(rpc.error("profile", json!({"name": ""}))["code"], -32002);
    let p = rpc.ok("profile", json!({"name": "Bobby", "status": "new here"}));
    assert_eq!(p["name"], "Bobby", "{p}");
    assert_eq!(p["sent_to"], 1, "{p}");
    assert_eq!(rpc.ok("profile", json!({}))["status"], "new here");
    let deadline = Instant::now() + WAIT;
    while a.contact("bob")["profile"]["name"] != "Bobby" {
        a.recv();
        assert!(Instant::now() < deadline, "Ada never saw the new name");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `tern contacts` and `tern recv` find the daemon and go through it: no
/// passphrase needed. A message counts as delivered only once recv wrote
/// it out: a recv that cannot write leaves it for the next one.
#[test]
fn one_shot_contacts_recv_and_log_go_through_the_daemon() {
    let relay = Relay::start();
    let a = Profile::new("Ada", &[&relay]);
    let b = Profile::with_passphrase("Bob", &[&relay], "plum ferry onion velvet gravel");
    connect(&a, "bob", &b, "ada");
    let socket = socket_in(&b, "b.sock");
    let mut c = b.cmd(&["daemon", "--socket"]);
    c.arg(&socket);
    let d = Daemon::start(c, &socket);
    let bare = |args: &[&str]| run_cmd(b.bare_cmd(args), None, HANG_GUARD);

    let o = bare(&["contacts", "--json"]);
    assert_code(&o, 0, "contacts through the daemon");
    let list = json_lines(&stdout(&o));
    assert_eq!(list.len(), 1, "{}", show(&o));
    assert_eq!(list[0]["name"], "ada");
    assert_valid(
        "/$defs/contact",
        &list[0],
        "contacts --json through the daemon",
    );
    let o = bare(&["contacts", "--long", "ada"]);
    assert_code(&o, 0, "contacts --long ada through the daemon");
    assert!(stdout(&o).contains("security:"), "{}", show(&o));
    assert_code(&bare(&["contacts", "nobody"]), 3, "no such contact");

    // Each message until both came (the daemon may take them one by one).
    a.send("bob", "first");
    a.send("bob", "second \u{1b}[2J");
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "recv got only {got:?}");
        let o = bare(&["recv", "--json", "--wait", "5"]);
        assert_code(&o, 0, "recv through the daemon");
        for m in json_lines(&stdout(&o)) {
            assert!(m.get("profile").is_none(), "{m}");
            assert_eq!(m["order"], "in-order", "{m}");
            got.push(m["text"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(got, ["first", "second \u{1b}[2J"]);
    // Shown, so delivered: not again.
    let o = bare(&["recv", "--json"]);
    assert_code(&o, 0, "recv through the daemon");
    assert_eq!(stdout(&o), "", "{}", show(&o));
    assert_code(&bare(&["recv", "--fail-if-empty"]), 66, "nothing left");

    // A recv that cannot write it out does not acknowledge it.
    a.send("bob", "kept");
    let wait_pending = || {
        let mut rpc = d.connect();
        wait_for_history(&mut rpc, &label(&b), "ada", 3);
    };
    wait_pending();
    let mut full = b.bare_cmd(&["recv", "--json"]);
    full.stdout(std::fs::File::create("/dev/full").unwrap());
    full.stderr(Stdio::piped());
    let o = full.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let o = bare(&["recv", "--json"]);
    assert_eq!(texts(&json_lines(&stdout(&o))), ["kept"], "{}", show(&o));

    // --follow, in text: escaped, no raw escape character.
    let mut follow = b.bare_cmd(&["recv", "--follow"]);
    follow.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = follow.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines() {
            if tx.send(l.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    a.send("bob", "followed \u{1b}]0;title\u{7}");
    let line = rx
        .recv_timeout(WAIT)
        .expect("recv --follow printed nothing");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("ada: followed"), "{line:?}");
    assert!(
        !line.contains('\u{1b}'),
        "a raw escape reached the terminal: {line:?}"
    );

    // log: what the same command alone shows (with the passphrase), to the
    // byte, in text and in JSON.
    for args in [
        &["log", "ada"][..],
        &["log", "--json", "--limit", "2", "ada"],
    ] {
        let o = bare(args);
        assert_code(&o, 0, "log through the daemon");
        let mut alone = b.cmd(args);
        alone.env("TERN_NO_DAEMON", "1");
        let by_itself = run_cmd(alone, None, HANG_GUARD);
        assert_code(&by_itself, 0, "log alone");
        assert_eq!(stdout(&o), stdout(&by_itself), "{args:?}");
    }
    let o = bare(&["log", "ada"]);
    let shown = stdout(&o);
    assert!(shown.contains("ada: first"), "{shown}");
    assert!(!shown.contains('\u{1b}'), "a raw escape in log: {shown:?}");
    let o = bare(&["log", "--json", "ada"]);
    let texts_logged = texts(&json_lines(&stdout(&o)));
    assert_eq!(texts_logged.first().map(String::as_str), Some("first"));
    assert_eq!(texts_logged.len(), 4, "{}", show(&o));
    assert_code(&bare(&["log", "nobody"]), 3, "log of no such contact");
    // Told to work alone, log needs the passphrase.
    let mut alone = b.bare_cmd(&["log", "ada"]);
    alone.env("TERN_NO_DAEMON", "1");
    assert_code(
        &run_cmd(alone, None, HANG_GUARD),
        5,
        "log without the daemon",
    );

    // Told to work alone, recv needs the passphrase.
    let mut alone = b.bare_cmd(&["recv"]);
    alone.env("TERN_NO_DAEMON", "1");
    assert_code(
        &run_cmd(alone, None, HANG_GUARD),
        5,
        "recv without the daemon",
    );
    drop(d);
}

/// `--homes-dir DIR` serves every profile in DIR (a directory without one
/// is skipped, a file ignored).
#[test]
fn a_directory_of_profiles_is_served_whole() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    let dir = a.sandbox().join("bots");
    std::fs::create_dir_all(dir.join("not-a-profile")).unwrap();
    std::fs::write(dir.join("README"), "a file").unwrap();
    std::os::unix::fs::symlink(&a.home, dir.join("ada")).unwrap();
    std::os::unix::fs::symlink(&b.home, dir.join("bob")).unwrap();
    let socket = socket_in(&a, "dir.sock");
    let mut c = tern_cmd(a.sandbox());
    c.arg("daemon")
        .arg("--homes-dir")
        .arg(&dir)
        .arg("--socket")
        .arg(&socket);
    let d = Daemon::start(c, &socket);
    let mut rpc = d.connect();
    let profiles = rpc.ok("profiles", json!({}));
    let names: Vec<&Value> = profiles
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["name"])
        .collect();
    assert_eq!(names, [&json!("Ada"), &json!("Bob")], "{profiles}");
    assert!(profiles.as_array().unwrap().iter().all(|p| p["ok"] == true));
    assert!(
        d.stderr().contains("not-a-profile: no profile here"),
        "{}",
        d.stderr()
    );
    rpc.ok("subscribe", json!({"profile": "Bob"}));
    rpc.ok(
        "send",
        json!({"profile": "Ada", "contact": "bob", "text": "from the directory"}),
    );
    let m = rpc.notification("message", WAIT).expect("the message");
    assert_eq!(m["text"], "from the directory");
    assert_eq!(m["profile"], dir.join("bob").display().to_string());
    drop(rpc);
    drop(d);

    // A directory with no profile at all: nothing to serve.
    let empty = a.sandbox().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut c = tern_cmd(a.sandbox());
    c.arg("daemon")
        .arg("--homes-dir")
        .arg(&empty)
        .arg("--socket")
        .arg(a.sandbox().join("run/e.sock"));
    assert_code(&run_cmd(c, None, HANG_GUARD), 7, "an empty directory");
}

/// Two bots, each on a daemon of its own, talk while both relays are
/// SIGKILLed and started again, three times: every message reaches the
/// other bot (at least once) and is in each history exactly once.
#[test]
fn two_bots_on_two_daemons_survive_relay_restarts() {
    let mut r1 = Relay::start();
    let mut r2 = Relay::start();
    let a = Profile::new("Ada", &[&r1, &r2]);
    let b = Profile::new("Bob", &[&r1, &r2]);
    connect(&a, "bob", &b, "ada");
    let (sa, sb) = (socket_in(&a, "a.sock"), socket_in(&b, "b.sock"));
    let da = Daemon::start(daemon_cmd(a.sandbox(), &[&a.home], &sa, &[]), &sa);
    let db = Daemon::start(daemon_cmd(b.sandbox(), &[&b.home], &sb, &[]), &sb);
    let (mut ada, mut bob) = (da.connect(), db.connect());
    ada.ok("subscribe", json!({}));
    bob.ok("subscribe", json!({}));
    // Ids sent by each side: from the result, or from the error's data
    // when no relay took it (kept and retried by the daemon).
    let mut sent: [HashSet<String>; 2] = Default::default();
    let mut kept = 0;
    let send =
        |rpc: &mut Rpc, to: &str, text: String, out: &mut HashSet<String>, kept: &mut usize| {
            let r = rpc.call("send", json!({"contact": to, "text": text}));
            let id = match (r.get("result"), r.get("error")) {
                (Some(res), _) => res["id"].clone(),
                (None, Some(e)) => {
                    assert_eq!(e["code"], -32075, "{r}");
                    *kept += 1;
                    e["data"]["id"].clone()
                }
                _ => panic!("{r}"),
            };
            assert!(
                out.insert(id.as_str().unwrap().to_string()),
                "an id twice: {r}"
            );
        };
    for round in 0..4 {
        for i in 0..5 {
            send(
                &mut ada,
                "bob",
                format!("a{round}.{i}"),
                &mut sent[0],
                &mut kept,
            );
            send(
                &mut bob,
                "ada",
                format!("b{round}.{i}"),
                &mut sent[1],
                &mut kept,
            );
        }
        if round == 3 {
            break;
        }
        r1.stop();
        r2.stop();
        // Sent while every relay is down: kept and retried.
        send(
            &mut ada,
            "bob",
            format!("a{round}.down"),
            &mut sent[0],
            &mut kept,
        );
        send(
            &mut bob,
            "ada",
            format!("b{round}.down"),
            &mut sent[1],
            &mut kept,
        );
        r1.restart();
        r2.restart();
    }
    assert!(kept >= 6, "sends with every relay down were taken: {kept}");
    // Each bot gets everything the other sent.
    for (rpc, want, who) in [(&mut bob, &sent[0], "Bob"), (&mut ada, &sent[1], "Ada")] {
        let mut got = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !want.is_subset(&got) {
            assert!(
                Instant::now() < deadline,
                "{who} got {} of {}; logs:\n{}\n{}",
                want.intersection(&got).count(),
                want.len(),
                da.stderr(),
                db.stderr()
            );
            if let Some(m) = rpc.notification("message", Duration::from_secs(5)) {
                got.insert(m["id"].as_str().unwrap().to_string());
            }
        }
    }
    // Exactly once in each history.
    for (rpc, p, contact, want) in [
        (&mut bob, &b, "ada", &sent[0]),
        (&mut ada, &a, "bob", &sent[1]),
    ] {
        let history = wait_for_history(rpc, &label(p), contact, want.len());
        let ids: Vec<String> = history
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let unique: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            ids.len(),
            unique.len(),
            "a message twice in {}'s history",
            p.home.display()
        );
        assert_eq!(&unique, want, "{}'s history", p.home.display());
    }
}

/// One-shot commands talk only to a daemon of their own user: a lock file
/// naming a socket that another user listens on makes them refuse, with
/// nothing written to it (the text of a message would go to whoever
/// listens there).
#[test]
fn a_socket_served_by_another_user_gets_nothing() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("note: skipped: listening as another user needs root");
        return;
    }
    // The system's Python: one found through root's PATH (a pyenv shim in
    // root's home, say) may be out of the other user's reach.
    let python = Path::new("/usr/bin/python3");
    let setpriv = std::process::Command::new("sh")
        .args(["-c", "command -v setpriv"])
        .output()
        .unwrap();
    if !setpriv.status.success() || !python.exists() {
        eprintln!("note: skipped: needs setpriv and /usr/bin/python3");
        return;
    }
    let relay = Relay::start();
    let b = Profile::new("Bob", &[&relay]);
    // A directory the other user (nobody) can listen in.
    let dir = tempfile::Builder::new()
        .prefix("tern-peer-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("stranger.sock");
    let listen = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.bind(sys.argv[1]); s.listen(4); s.settimeout(60)\n\
                  c, _ = s.accept(); c.settimeout(60)\n\
                  got = b''\n\
                  while True:\n    \
                      d = c.recv(65536)\n    \
                      if not d: break\n    \
                      got += d\n\
                  print(len(got), flush=True)\n";
    let mut stranger = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(python)
        .args(["-c", listen])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        if let Some(status) = stranger.try_wait().unwrap() {
            panic!("the stranger's listener ended ({status}) before listening");
        }
        assert!(
            Instant::now() < deadline,
            "the stranger's socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(
        b.home.join("daemon.lock"),
        format!("4242\n{}\n", socket.display()),
    )
    .unwrap();
    let o = b.run(&["send", "ada", "for my contact only"]);
    assert_code(&o, 1, "send beside a stranger's socket");
    assert!(
        stderr(&o).contains("served by another user"),
        "{}",
        show(&o)
    );
    let out = stranger.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "bytes reached the stranger's socket"
    );
}
