//! Passphrases, re-keying, file permissions and prompts on the terminal
//! (issue 14 items 8 and 9, issue 19 items 11, 18 and the `forget` prompt
//! of 20), through the real binary. The terminal tests run tern under
//! util-linux `script`, which gives it a pseudo-terminal.

mod cli_common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_common::*;

const OLD: &str = "correct horse battery staple";
const NEW: &str = "plum ferry onion velvet gravel";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{content}\n")).unwrap();
    p
}

/// The command with only `passphrase` as TERN_PASSPHRASE_FILE.
fn with_pass(p: &Profile, pass: &str, args: &[&str]) -> std::process::Output {
    let f = write_file(p.sandbox(), "try.txt", pass);
    let mut c = p.bare_cmd(args);
    c.env("TERN_PASSPHRASE_FILE", &f);
    run_cmd(c, None, HANG_GUARD)
}

#[test]
fn key_passwd_never_takes_the_new_passphrase_from_the_old_ones_file() {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], OLD);
    let before = std::fs::read(a.home.join("key.age")).unwrap();
    // The reproduction: TERN_PASSPHRASE_FILE set, nothing else.
    let o = a.run(&["key", "passwd"]);
    assert_code(&o, 5, "key passwd without a new passphrase");
    assert!(
        stderr(&o).contains("--new-passphrase-file"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("key changed") && !stderr(&o).contains("passphrase changed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(a.home.join("key.age")).unwrap(), before);

    // The same passphrase as the new one: refused, nothing changed.
    let same = write_file(a.sandbox(), "same.txt", OLD);
    let o = a.run(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        same.to_str().unwrap(),
    ]);
    assert_code(&o, 2, "a new passphrase equal to the old");
    assert!(stderr(&o).contains("is the current one"), "{}", stderr(&o));
    assert_eq!(std::fs::read(a.home.join("key.age")).unwrap(), before);

    // A separate file: changed; the old one no longer opens it.
    let new = write_file(a.sandbox(), "new.txt", NEW);
    a.ok(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        new.to_str().unwrap(),
    ]);
    assert_code(&with_pass(&a, OLD, &["contacts"]), 5, "old passphrase");
    assert_code(&with_pass(&a, NEW, &["contacts"]), 0, "new passphrase");
}

#[test]
fn weak_passphrases_are_refused_unless_allowed() {
    let r = Relay::start();
    let fresh = Profile::empty("Ada");
    let weak = write_file(fresh.sandbox(), "weak.txt", "letmein1");
    let mut c = fresh.bare_cmd(&["init", "--name", "Ada", "--relay", &r.addr]);
    c.env("TERN_PASSPHRASE_FILE", &weak);
    let o = run_cmd(c, None, HANG_GUARD);
    assert_code(&o, 2, "init with a weak passphrase");
    let e = stderr(&o);
    assert!(
        e.contains("too weak") && e.contains("--allow-weak-passphrase"),
        "{e}"
    );
    assert!(!fresh.home.join("store.db").exists(), "no profile was made");
    let mut c = fresh.bare_cmd(&[
        "init",
        "--name",
        "Ada",
        "--relay",
        &r.addr,
        "--allow-weak-passphrase",
    ]);
    c.env("TERN_PASSPHRASE_FILE", &weak);
    assert_code(&run_cmd(c, None, HANG_GUARD), 0, "init, weak but allowed");

    let a = Profile::with_passphrase("Bea", &[&r], OLD);
    let one = write_file(a.sandbox(), "one.txt", "x");
    let o = a.run(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        one.to_str().unwrap(),
    ]);
    assert_code(&o, 2, "a one-character passphrase");
    assert!(stderr(&o).contains("too weak"), "{}", stderr(&o));
    assert_code(&with_pass(&a, OLD, &["contacts"]), 0, "unchanged");
}

#[test]
fn rekey_retires_old_key_files_and_exported_identities() {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], OLD);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    b.send("ada", "before the re-key");
    assert_eq!(a.recv_texts(), vec!["before the re-key"]);
    let exported = a.sandbox().join("exported-identity");
    a.ok(&["key", "export", "--out", exported.to_str().unwrap()]);
    let old_key = std::fs::read(a.home.join("key.age")).unwrap();
    let contacts_before = a.ok(&["contacts", "--json"]);

    // Same passphrase, new key: allowed with --rekey.
    let same = write_file(a.sandbox(), "same.txt", OLD);
    let o = a.run(&[
        "key",
        "passwd",
        "--rekey",
        "--new-passphrase-file",
        same.to_str().unwrap(),
    ]);
    assert_code(&o, 0, "key passwd --rekey");
    assert_ne!(std::fs::read(a.home.join("key.age")).unwrap(), old_key);

    // Everything is still there, and the conversation goes on.
    assert_eq!(a.ok(&["contacts", "--json"]), contacts_before);
    assert_eq!(a.log("bram").len(), 1);
    b.send("ada", "after the re-key");
    assert_eq!(a.recv_texts(), vec!["after the re-key"]);
    a.send("bram", "still here");
    assert_eq!(b.recv_texts(), vec!["still here"]);

    // The exported identity and a restored old key.age open nothing.
    let mut c = a.bare_cmd(&["contacts"]);
    c.arg("--identity").arg(&exported);
    let o = run_cmd(c, None, HANG_GUARD);
    assert_code(&o, 5, "an identity exported before the re-key");
    assert!(stderr(&o).contains("retired"), "{}", stderr(&o));
    let current = std::fs::read(a.home.join("key.age")).unwrap();
    std::fs::write(a.home.join("key.age"), &old_key).unwrap();
    let o = with_pass(&a, OLD, &["contacts"]);
    assert_code(&o, 5, "the old key.age with the old passphrase");
    std::fs::write(a.home.join("key.age"), &current).unwrap();
    assert_code(&with_pass(&a, OLD, &["contacts"]), 0, "the new key.age");
}

/// Runs `tern ARGS` with umask 022, as a user's shell would have it.
fn under_umask(p: &Profile, home: &Path, args: &[&str]) -> std::process::Output {
    let mut c = tern_cmd(p.sandbox());
    let mut full = vec!["-c", "umask 022; exec \"$@\"", "sh", TERN, "--home"];
    let home = home.to_str().unwrap().to_string();
    full.push(&home);
    full.extend_from_slice(args);
    let mut sh = Command::new("sh");
    sh.args(&full);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    c.stdin(Stdio::null());
    run_cmd(sh, None, HANG_GUARD)
}

/// Every directory from `top` down to and including `home`, and every file
/// under `home`, must be private.
#[track_caller]
fn assert_private(top: &Path, home: &Path) {
    let mut d = home.to_path_buf();
    while d.starts_with(top) && d != top {
        assert_eq!(mode(&d), 0o700, "{} is {:o}", d.display(), mode(&d));
        d.pop();
    }
    let files = files_under(home);
    assert!(files.iter().any(|f| f.ends_with("store.db")), "{files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{} is {:o}", f.display(), mode(&f));
    }
}

#[test]
fn profiles_and_exports_are_private_from_the_start() {
    let r = Relay::start();
    let p = Profile::empty("Ada");
    let top = p.sandbox().join("made");
    let home = top.join("by/tern/home");
    let o = under_umask(
        &p,
        &home,
        &[
            "init",
            "--name",
            "Ada",
            "--no-passphrase",
            "--relay",
            &r.addr,
        ],
    );
    assert_code(&o, 0, "init in a new nested home");
    // A command that writes (so -wal and -shm exist too).
    assert_code(&under_umask(&p, &home, &["invite", "--link"]), 0, "invite");
    assert_private(&top, &home);

    // A home that exists already with the umask's 0755.
    let existing = p.sandbox().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = write_file(p.sandbox(), "pass.txt", OLD);
    let mut c = tern_cmd(p.sandbox());
    c.arg("--home")
        .arg(&existing)
        .args(["init", "--name", "Ada", "--relay", &r.addr])
        .env("TERN_PASSPHRASE_FILE", &f);
    assert_code(&run_cmd(c, None, HANG_GUARD), 0, "init in an existing dir");
    assert_eq!(mode(&existing), 0o700);
    assert_eq!(mode(&existing.join("key.age")), 0o600);

    // key export into directories that do not exist yet (issue 19 item 11).
    let out = top.join("config/tern/identity");
    let o = under_umask(
        &p,
        &home,
        &["key", "export", "--out", out.to_str().unwrap()],
    );
    assert_code(&o, 0, "key export into a missing directory");
    assert_eq!(mode(&out), 0o600);
    assert_eq!(mode(&top.join("config")), 0o700);
    assert_eq!(mode(&top.join("config/tern")), 0o700);
    let o = under_umask(
        &p,
        &home,
        &["key", "export", "--out", out.to_str().unwrap()],
    );
    assert_code(&o, 2, "an existing file without --force");
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));

    // device join into a new home.
    let link = run_cmd(
        {
            let mut c = tern_cmd(p.sandbox());
            c.arg("--home")
                .arg(&home)
                .args(["device", "link", "--link"]);
            c
        },
        None,
        HANG_GUARD,
    );
    let link = stdout(&link);
    let dtop = p.sandbox().join("dev");
    let dhome = dtop.join("a/b");
    let o = under_umask(
        &p,
        &dhome,
        &[
            "device",
            "join",
            link.trim(),
            "--no-passphrase",
            "--name",
            "server",
        ],
    );
    assert_code(&o, 0, "device join");
    assert_private(&dtop, &dhome);
}

#[test]
fn no_home_and_no_xdg_data_home_is_refused() {
    let p = Profile::empty("Ada");
    for args in [&["contacts"][..], &["relay", "address"][..]] {
        let mut c = tern_cmd(p.sandbox());
        c.env_remove("HOME").env_remove("XDG_DATA_HOME").args(args);
        c.current_dir(p.sandbox());
        let o = run_cmd(c, None, HANG_GUARD);
        assert_code(&o, 2, &format!("{args:?} without HOME"));
        assert!(stderr(&o).contains("HOME"), "{}", stderr(&o));
        assert!(!p.sandbox().join("tern").exists() && !p.sandbox().join("tern-relay").exists());
    }
}

// ---------------------------------------------------------------------------
// On a terminal

/// tern on a pseudo-terminal (util-linux `script`), stdin of the command
/// given by `shell` (a pipe, if it says so).
struct Pty {
    child: Child,
    input: ChildStdin,
    output: Arc<Mutex<Vec<u8>>>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Pty {
    fn start(p: &Profile, args: &[&str], stdin_pipe: Option<&str>) -> Pty {
        assert!(have_program("script"), "util-linux `script` is needed");
        let mut cmd = format!("{} --home {}", quote(TERN), quote(p.home.to_str().unwrap()));
        for a in args {
            cmd.push(' ');
            cmd.push_str(&quote(a));
        }
        if let Some(data) = stdin_pipe {
            cmd = format!("printf %s {} | {cmd}", quote(data));
        }
        let base = tern_cmd(p.sandbox());
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"]);
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.env_remove("TERN_PASSPHRASE_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().expect("spawning script");
        let input = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            child,
            input,
            output,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the screen shows `what` `n` times in all.
    #[track_caller]
    fn expect(&self, what: &str, n: usize) {
        let deadline = Instant::now() + HANG_GUARD;
        while self.text().matches(what).count() < n {
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what:?} ({n}×):\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn type_line(&mut self, s: &str) {
        self.input.write_all(format!("{s}\n").as_bytes()).unwrap();
        self.input.flush().unwrap();
    }

    fn finish(mut self) -> (Option<i32>, String) {
        let st = wait_guarded(&mut self.child, HANG_GUARD, "tern under script");
        (st.code(), self.text())
    }
}

#[test]
fn a_piped_command_asks_for_the_passphrase_on_the_terminal() {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], OLD);
    let b = Profile::new("Bram", &[&r]);
    connect(&a, "bram", &b, "ada");
    // `echo … | tern send bram` at an interactive terminal.
    let mut t = Pty::start(&a, &["send", "bram"], Some("piped message"));
    t.expect("Passphrase for", 1);
    t.type_line(OLD);
    let (code, screen) = t.finish();
    assert_eq!(code, Some(0), "{screen}");
    assert!(!screen.contains(OLD), "the passphrase was echoed: {screen}");
    assert_eq!(b.recv_texts(), vec!["piped message"]);
}

#[test]
fn init_asks_again_after_a_mistyped_repeat() {
    let r = Relay::start();
    let p = Profile::empty("Ada");
    let mut t = Pty::start(&p, &["init", "--name", "Ada", "--relay", &r.addr], None);
    t.expect("New passphrase", 1);
    t.type_line(OLD);
    t.expect("Repeat it", 1);
    t.type_line("correct horse battery stapel");
    t.expect("differ; try again", 1);
    t.expect("New passphrase", 2);
    t.type_line(OLD);
    t.expect("Repeat it", 2);
    t.type_line(OLD);
    let (code, screen) = t.finish();
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains("profile created"), "{screen}");
    assert!(p.home.join("key.age").is_file());
}

#[test]
fn key_passwd_asks_for_the_new_passphrase_on_the_terminal() {
    let r = Relay::start();
    let a = Profile::with_passphrase("Ada", &[&r], OLD);
    let mut t = Pty::start(&a, &["key", "passwd"], None);
    t.expect("Passphrase for", 1);
    t.type_line(OLD);
    t.expect("New passphrase", 1);
    t.type_line(NEW);
    t.expect("Repeat it", 1);
    t.type_line(NEW);
    let (code, screen) = t.finish();
    assert_eq!(code, Some(0), "{screen}");
    assert_code(&with_pass(&a, NEW, &["contacts"]), 0, "the new passphrase");
}

#[test]
fn declining_forget_exits_non_zero_and_keeps_the_contact() {
    let r = Relay::start();
    let a = Profile::new("Ada", &[&r]);
    a.ok(&["invite", "--link", "--name", "bram"]);
    let mut t = Pty::start(&a, &["forget", "bram"], None);
    t.expect("[y/N]", 1);
    t.type_line("n");
    let (code, screen) = t.finish();
    assert_eq!(code, Some(1), "{screen}");
    assert!(screen.contains("nothing was changed"), "{screen}");
    assert_eq!(a.contacts().len(), 1);
}
