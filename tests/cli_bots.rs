//! The example bots (examples/bots/) against a real daemon and real relays:
//! each echoes every message, and keeps doing so after its daemon is
//! killed and started again (it reconnects, and what came meanwhile is
//! handed to it). Skipped, with a note, where python3, socat or jq is
//! missing.

mod cli_common;
mod daemon_common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::*;
use daemon_common::*;

/// A bot process in a group of its own, so that its children (socat, jq)
/// go with it; killed on drop.
struct Bot {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Bot {
    fn start(program: &str, script: &str, socket: &Path) -> Bot {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
        let mut c = Command::new(program);
        c.arg(path)
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("starting {script}: {e}"));
        let stderr = drain(child.stderr.take().unwrap());
        Bot { child, stderr }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        // The whole group: the shell bot's socat and jq too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Receives with `tern recv --json` until `want` texts came back (each
/// counted), or fails after a minute.
fn echoes(user: &Profile, want: &[String], bot: &Bot, daemon: &Daemon) -> BTreeMap<String, usize> {
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while want.iter().any(|w| !got.contains_key(w)) {
        assert!(
            Instant::now() < deadline,
            "echoes missing: got {got:?}, want {want:?}\nbot log:\n{}\ndaemon log:\n{}",
            bot.log(),
            daemon.stderr()
        );
        for m in user.recv() {
            if m["type"] == "message" {
                assert_eq!(m["from"], "echo", "{m}");
                *got.entry(m["text"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    got
}

/// `marker`: what the bot's log says once per connection.
fn run_bot(program: &str, script: &str, needs: &[&str], marker: &str) {
    for tool in needs {
        if !have_program(tool) {
            eprintln!("note: {tool} is not installed; {script} is not tested");
            return;
        }
    }
    let relay = Relay::start();
    let user = Profile::new("User", &[&relay]);
    let bot_profile = Profile::new("Echo", &[&relay]);
    connect(&user, "echo", &bot_profile, "user");
    let socket = socket_in(&bot_profile, "echo.sock");
    let cmd = || daemon_cmd(bot_profile.sandbox(), &[&bot_profile.home], &socket, &[]);
    let mut daemon = Daemon::start(cmd(), &socket);
    let bot = Bot::start(program, script, &socket);

    // Exact text, hostile characters and all.
    let first: Vec<String> = (0..5)
        .map(|i| format!("ping {i} \t\u{202e}é \"quoted\" \\"))
        .collect();
    for t in &first {
        user.send("echo", t);
    }
    let got = echoes(&user, &first, &bot, &daemon);
    assert!(got.values().all(|&n| n == 1), "each echoed once: {got:?}");

    // The daemon dies; what is sent meanwhile waits on the relay, then in
    // the new daemon's inbox until the bot is back.
    daemon.kill();
    let second: Vec<String> = (0..5).map(|i| format!("after restart {i}")).collect();
    for t in &second {
        user.send("echo", t);
    }
    let daemon = Daemon::start(cmd(), &socket);
    let got = echoes(&user, &second, &bot, &daemon);
    assert!(
        got.values().all(|&n| n == 1),
        "each echoed once after the restart: {got:?}"
    );
    // (The second echoes came through a new connection already: the
    // first died with its daemon.)
    assert!(
        bot.log().matches(marker).count() >= 2,
        "the bot's log shows one connection only:\n{}",
        bot.log()
    );
}

#[test]
fn the_python_echo_bot_echoes_and_reconnects() {
    run_bot(
        "python3",
        "examples/bots/echo.py",
        &["python3"],
        "subscribed",
    );
}

#[test]
fn the_shell_echo_bot_echoes_and_reconnects() {
    run_bot(
        "bash",
        "examples/bots/echo.sh",
        &["bash", "socat", "jq"],
        "connecting to",
    );
}

/// contrib/systemd/tern-daemon.service passes `systemd-analyze verify
/// --user` (every key known, every specifier valid), with ExecStart on the
/// tern just built (verify wants the program to exist). Skipped where
/// systemd-analyze is missing.
#[test]
fn the_systemd_user_unit_verifies() {
    if !have_program("systemd-analyze") {
        eprintln!("note: systemd-analyze is not installed; the unit is not checked");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/tern-daemon.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=%h/.cargo/bin/tern "), "{unit}");
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let path = dir.path().join("tern-daemon.service");
    std::fs::write(&path, unit.replace("%h/.cargo/bin/tern", TERN)).unwrap();
    let o = run_cmd(
        {
            let mut c = Command::new("systemd-analyze");
            c.args(["verify", "--user"])
                .arg(&path)
                .env("XDG_RUNTIME_DIR", &runtime);
            c
        },
        None,
        HANG_GUARD,
    );
    assert!(
        o.status.success() && stderr(&o).trim().is_empty(),
        "systemd-analyze verify --user: {}",
        show(&o)
    );
}
