//! Getting the key that opens a profile without ever hanging a script: a
//! prompt only where a person can answer it (on the terminal, through
//! `/dev/tty` as age, gpg and ssh do, so `echo hi | tern send bob` still
//! asks), otherwise a file or a variable.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use age::secrecy::{ExposeSecret, SecretString};
use anyhow::Context;
use zeroize::Zeroizing;

use super::exit::{fail, LOCKED, USAGE};
use super::output::{note, stdin_is_terminal};
use super::Cli;
use crate::client::Client;
use crate::store::{KeySource, Protection, Store};

/// How many times a mistyped repeat of a new passphrase is asked again.
const CONFIRM_TRIES: usize = 3;

/// The lowest zxcvbn score (0–4) a new passphrase may have without
/// `--allow-weak-passphrase`: 3 means about 10^10 guesses, which at one
/// scrypt (N = 2^16) per guess is centuries on one core and still years
/// for a well-funded attacker with dedicated hardware.
pub const MIN_SCORE: u8 = 3;

/// Whether a person can be asked: stdin is the terminal, or the process
/// has a controlling terminal (`/dev/tty`) and talks to it on stderr (a
/// pipe into tern at an interactive shell). A cron job, CI or a test
/// harness has neither, and gets an error instead of a hang.
fn can_prompt() -> bool {
    stdin_is_terminal()
        || (std::io::stderr().is_terminal() && std::fs::File::open("/dev/tty").is_ok())
}

/// One line from the terminal, not echoed. rpassword reads `/dev/tty`, so
/// this works with stdin redirected.
fn prompt(text: &str) -> anyhow::Result<Zeroizing<String>> {
    Ok(Zeroizing::new(
        rpassword::prompt_password(text).context("reading the passphrase from the terminal")?,
    ))
}

/// A new passphrase typed twice; a mistyped repeat asks again.
fn prompt_new(text: &str) -> anyhow::Result<SecretString> {
    for attempt in 1..=CONFIRM_TRIES {
        let first = prompt(text)?;
        let again = prompt("Repeat it: ")?;
        if *first == *again {
            return Ok(SecretString::from(first.to_string()));
        }
        if attempt < CONFIRM_TRIES {
            note("the two passphrases differ; try again");
        }
    }
    Err(fail(
        LOCKED,
        "the two passphrases differed three times; nothing was changed",
    ))
}

fn no_terminal() -> anyhow::Error {
    fail(
        LOCKED,
        "a passphrase is needed and there is no terminal to ask on: set TERN_PASSPHRASE_FILE (or \
         --passphrase-file, or TERN_PASSPHRASE), or unlock with --identity FILE from `tern key export`",
    )
}

/// Reads a passphrase from TERN_PASSPHRASE, --passphrase-file, or a prompt.
/// `confirm` marks a new passphrase (`init`, `device join`): asked twice,
/// and checked for strength.
pub fn passphrase(cli: &Cli, prompt_text: &str, confirm: bool) -> anyhow::Result<SecretString> {
    let p = if let Ok(p) = std::env::var("TERN_PASSPHRASE") {
        SecretString::from(p)
    } else if let Some(path) = &cli.passphrase_file {
        read_passphrase_file(path)?
    } else if !can_prompt() {
        return Err(no_terminal());
    } else if confirm {
        prompt_new(prompt_text)?
    } else {
        SecretString::from(prompt(prompt_text)?.to_string())
    };
    if confirm {
        check_strength(cli, &p, &[])?;
    }
    Ok(p)
}

/// The new passphrase for `tern key passwd`: from `new_file`, or typed
/// twice, never from TERN_PASSPHRASE or the passphrase file (those hold
/// the old one). Checked for strength; `user_inputs` (the profile's name)
/// count as easy guesses.
pub fn new_passphrase(
    cli: &Cli,
    new_file: Option<&Path>,
    user_inputs: &[&str],
) -> anyhow::Result<SecretString> {
    let p = match new_file {
        Some(path) => read_passphrase_file(path)?,
        None if can_prompt() => prompt_new("New passphrase: ")?,
        None => {
            return Err(fail(
                LOCKED,
                "the new passphrase is asked on the terminal, and there is none: give it with \
                 --new-passphrase-file FILE (TERN_PASSPHRASE_FILE and --passphrase-file hold the \
                 current one); nothing was changed",
            ))
        }
    };
    check_strength(cli, &p, user_inputs)?;
    Ok(p)
}

/// Refuses an empty passphrase, and one zxcvbn scores below [`MIN_SCORE`]
/// unless `--allow-weak-passphrase`, saying why and what would do.
fn check_strength(cli: &Cli, p: &SecretString, user_inputs: &[&str]) -> anyhow::Result<()> {
    let text = p.expose_secret();
    if text.is_empty() {
        return Err(fail(
            USAGE,
            "the passphrase is empty: choose one, or use --no-passphrase; nothing was changed",
        ));
    }
    if cli.allow_weak_passphrase {
        return Ok(());
    }
    let mut inputs = vec!["tern"];
    inputs.extend_from_slice(user_inputs);
    let estimate = zxcvbn::zxcvbn(text, &inputs);
    let score = estimate.score() as u8;
    if score >= MIN_SCORE {
        return Ok(());
    }
    let mut why = String::new();
    if let Some(f) = estimate.feedback() {
        if let Some(w) = f.warning() {
            why.push_str(&format!(" ({w})"));
        }
    }
    let hint = estimate
        .feedback()
        .and_then(|f| f.suggestions().first().map(|s| format!(" {s}.")))
        .unwrap_or_default();
    Err(fail(
        USAGE,
        format!(
            "this passphrase is too weak: about 10^{:.0} guesses would find it{why}, strength {score} \
             of 4 where tern asks for {MIN_SCORE}.{hint} Four or five random words make a good one; \
             to use this one anyway, add --allow-weak-passphrase. Nothing was changed",
            estimate.guesses_log10()
        ),
    ))
}

fn read_passphrase_file(path: &Path) -> anyhow::Result<SecretString> {
    let raw = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the passphrase file {}", path.display()))?,
    );
    let line = raw.lines().next().unwrap_or("");
    Ok(SecretString::from(line.to_string()))
}

/// How to unlock the profile in `home`.
pub fn key_source(cli: &Cli, home: &Path) -> anyhow::Result<KeySource> {
    if let Some(id) = &cli.identity {
        return Ok(KeySource::IdentityFile(id.clone()));
    }
    match Store::protection(home)? {
        Protection::Unprotected => Ok(KeySource::Unprotected),
        Protection::Passphrase => Ok(KeySource::Passphrase(passphrase(
            cli,
            &format!("Passphrase for {}: ", home.display()),
            false,
        )?)),
    }
}

/// The one profile directory of a command; only `tern daemon` and `tern
/// jsonrpc` serve several ([`homes`]).
pub fn home(cli: &Cli) -> anyhow::Result<PathBuf> {
    if cli.home.len() > 1 {
        return Err(fail(
            USAGE,
            format!(
                "--home is given {} times: only `tern daemon` and `tern jsonrpc` serve several \
                 profiles; give one --home",
                cli.home.len()
            ),
        ));
    }
    super::home_dir(cli.home.first())
}

/// Every profile directory given (or the default one), each once.
pub fn homes(cli: &Cli) -> anyhow::Result<Vec<PathBuf>> {
    if cli.home.is_empty() {
        return Ok(vec![super::home_dir(None)?]);
    }
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = Vec::new();
    for h in &cli.home {
        // The same directory written two ways is served once.
        let key = h.canonicalize().unwrap_or_else(|_| h.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(h.clone());
        }
    }
    Ok(out)
}

/// Opens the profile, asking for whatever unlocks it.
pub fn open(cli: &Cli) -> anyhow::Result<Client> {
    open_at(cli, &home(cli)?)
}

/// Opens the profile in `home` (one of several a daemon serves).
pub fn open_at(cli: &Cli, home: &Path) -> anyhow::Result<Client> {
    let key = key_source(cli, home)?;
    Ok(Client::open(home, key, cli.proxy.clone())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cli(extra: &[&str]) -> Cli {
        let mut args = vec!["tern"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["contacts"]);
        Cli::parse_from(args)
    }

    #[test]
    fn weak_passphrases_are_refused_with_a_reason() {
        let c = cli(&[]);
        for weak in ["x", "password", "letmein1", "Ada2024", "tern tern"] {
            let e = check_strength(&c, &SecretString::from(weak.to_string()), &["Ada"]);
            let e = e.expect_err(weak).to_string();
            assert!(e.contains("--allow-weak-passphrase"), "{e}");
        }
        for strong in [
            "correct horse battery staple",
            "plum ferry onion velvet gravel",
        ] {
            check_strength(&c, &SecretString::from(strong.to_string()), &[]).expect(strong);
        }
        let allow = cli(&["--allow-weak-passphrase"]);
        check_strength(&allow, &SecretString::from("x".to_string()), &[]).unwrap();
        assert!(check_strength(&allow, &SecretString::from(String::new()), &[]).is_err());
    }
}
