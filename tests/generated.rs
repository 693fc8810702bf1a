//! The man pages and completions in the repository must be exactly what
//! the current clap definitions generate. When this fails, run
//! `cargo run -- generate` and commit the result.

use std::path::Path;

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn man_pages_and_completions_are_current() {
    let fresh = tempfile::tempdir().unwrap();
    tern::cli::generate::write_all(fresh.path()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["man", "completions"] {
        let (want, have) = (fresh.path().join(sub), repo.join(sub));
        assert_eq!(
            files(&want),
            files(&have),
            "{sub}/ lists different files: run `cargo run -- generate`"
        );
        for f in files(&want) {
            let a = std::fs::read(want.join(&f)).unwrap();
            let b = std::fs::read(have.join(&f)).unwrap();
            assert!(
                a == b,
                "{sub}/{f} is stale: run `cargo run -- generate` and commit"
            );
        }
    }
}

#[test]
fn main_page_documents_exit_codes_and_environment() {
    let fresh = tempfile::tempdir().unwrap();
    tern::cli::generate::write_all(fresh.path()).unwrap();
    let page = std::fs::read_to_string(fresh.path().join("man/tern.1")).unwrap();
    for needle in [
        "EXIT STATUS",
        "\\fB75\\fR",
        "TERN_PASSPHRASE_FILE",
        "TERN_HOME",
        ".SH FILES",
        "key.age",
    ] {
        assert!(page.contains(needle), "man/tern.1 lacks {needle}");
    }
}

/// Every `tern…(1)` a page names (SUBCOMMANDS, SEE ALSO, anywhere) is a
/// page that exists, and every subcommand at any depth has its page.
#[test]
fn every_referenced_man_page_exists() {
    let fresh = tempfile::tempdir().unwrap();
    tern::cli::generate::write_all(fresh.path()).unwrap();
    let man = fresh.path().join("man");
    let pages = files(&man);
    let mut missing = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(man.join(page)).unwrap();
        let plain = text
            .replace("\\-", "-")
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\fI", "");
        for (at, _) in plain.match_indices("(1)") {
            let start = plain[..at]
                .rfind(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                .map_or(0, |i| i + 1);
            let name = &plain[start..at];
            if name.starts_with("tern") && !pages.contains(&format!("{name}.1")) {
                missing.push(format!("{page} names {name}(1)"));
            }
        }
        if page != "tern.1" {
            assert!(plain.contains("SEE ALSO"), "{page} has no SEE ALSO");
        }
    }
    assert!(missing.is_empty(), "pages that do not exist: {missing:#?}");

    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{path}-{}", sub.get_name());
            if sub.get_name() != "help" {
                out.push(format!("{name}.1"));
                walk(sub, &name, out);
            }
        }
    }
    let mut want = Vec::new();
    walk(
        &<tern::cli::Cli as clap::CommandFactory>::command(),
        "tern",
        &mut want,
    );
    for w in want {
        assert!(pages.contains(&w), "no man page {w}");
    }
    for flag in [
        "wait",
        "png",
        "out",
        "force",
        "access\\-key\\-file",
        "ttl\\-days",
        "listen",
    ] {
        assert!(
            pages.iter().any(|p| std::fs::read_to_string(man.join(p))
                .unwrap()
                .contains(&format!("\\fB\\-\\-{flag}\\fR"))),
            "--{flag} is in no man page"
        );
    }
}

/// No option or argument is left without a help text.
#[test]
fn every_argument_has_help() {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut missing = Vec::new();
    walk(
        &<tern::cli::Cli as clap::CommandFactory>::command(),
        "tern",
        &mut missing,
    );
    assert!(missing.is_empty(), "arguments without help: {missing:#?}");
}

/// tern-daemon(1) lists every method, parameter, notification and error
/// code of docs/jsonrpc.schema.json (the page is generated from it).
#[test]
fn daemon_page_lists_the_whole_schema() {
    let fresh = tempfile::tempdir().unwrap();
    tern::cli::generate::write_all(fresh.path()).unwrap();
    let page = std::fs::read_to_string(fresh.path().join("man/tern-daemon.1"))
        .unwrap()
        .replace("\\-", "-");
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/jsonrpc.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for (name, m) in schema["methods"].as_object().unwrap() {
        assert!(
            page.contains(&format!("\\fB{name}\\fR {{")),
            "method {name}"
        );
        for p in m["params"]["properties"].as_object().unwrap().keys() {
            assert!(
                page.contains(&format!("\\fB{name}\\fR {{"))
                    && page
                        .split(&format!("\\fB{name}\\fR {{"))
                        .nth(1)
                        .unwrap()
                        .split('}')
                        .next()
                        .unwrap()
                        .contains(p.as_str()),
                "parameter {p} of {name}"
            );
        }
    }
    for name in schema["notifications"].as_object().unwrap().keys() {
        assert!(
            page.contains(&format!("\\fB{name}\\fR {{")),
            "notification {name}"
        );
    }
    for code in schema["error_codes"].as_object().unwrap().keys() {
        assert!(
            page.contains(&format!("\\fB{code}\\fR")),
            "error code {code}"
        );
    }
}
