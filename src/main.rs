//! The `tern` binary: parse arguments, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use tern::cli::{self, exit};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            // Errors quote names and relays' texts: escaped like every note.
            eprintln!("tern: {}", tern::proto::text::escape_text(&chain(&e)));
            ExitCode::from(exit::code_for(&e))
        }
    }
}

/// "what failed: why", without repeating a cause that the message above it
/// already includes.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
