//! `scripts/demo` (issue 19 item 10): it uses the tern it is given (or an
//! up-to-date release build) instead of always building, prints no escape
//! sequences into a pipe, and stops every relay it started.

mod cli_common;

use std::process::Command;
use std::time::Duration;

use cli_common::*;

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

#[test]
fn demo_reuses_a_build_prints_no_escapes_and_leaves_no_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Command::new("bash");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"))
        .env("TERN", TERN)
        .env("TMPDIR", tmp.path())
        .env("HOME", tmp.path())
        .env_remove("NO_COLOR")
        .env_remove("TERN_HOME")
        .env_remove("TERN_PASSPHRASE_FILE");
    let o = run_cmd(c, None, Duration::from_secs(240));
    assert_code(&o, 0, "scripts/demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains('\x1b'), "escape sequences in a pipe: {out:?}");
    assert!(out.contains("using TERN="), "{out}");
    assert!(!stderr(&o).contains("Compiling"), "it built tern again");
    // Give a killed relay a moment to be reaped, then look.
    std::thread::sleep(Duration::from_millis(200));
    let left = processes_mentioning(tmp.path().to_str().unwrap());
    assert!(left.is_empty(), "left running: {left:#?}");
    let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(files.is_empty(), "left behind: {files:?}");
}
