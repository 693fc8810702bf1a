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
