//! Getting the key that opens a profile without ever hanging a script: a
//! prompt only when stdin is a terminal, otherwise a file or a variable.

use std::path::{Path, PathBuf};

use age::secrecy::SecretString;
use anyhow::Context;
use zeroize::Zeroizing;

use super::exit::{fail, LOCKED};
use super::output::stdin_is_terminal;
use super::Cli;
use crate::client::Client;
use crate::store::{KeySource, Protection, Store};

/// Reads a passphrase from TERN_PASSPHRASE, --passphrase-file, or (on a
/// terminal only) a prompt. `confirm` asks twice, for new passphrases.
pub fn passphrase(cli: &Cli, prompt: &str, confirm: bool) -> anyhow::Result<SecretString> {
    if let Ok(p) = std::env::var("TERN_PASSPHRASE") {
        return Ok(SecretString::from(p));
    }
    if let Some(path) = &cli.passphrase_file {
        return read_passphrase_file(path);
    }
    if !stdin_is_terminal() {
        return Err(fail(
            LOCKED,
            "a passphrase is needed and stdin is not a terminal: set TERN_PASSPHRASE_FILE (or \
             --passphrase-file, or TERN_PASSPHRASE), or unlock with --identity FILE from `tern key export`",
        ));
    }
    let first =
        Zeroizing::new(rpassword::prompt_password(prompt).context("reading the passphrase")?);
    if confirm {
        let again = Zeroizing::new(
            rpassword::prompt_password("Repeat it: ").context("reading the passphrase")?,
        );
        if *first != *again {
            return Err(fail(
                LOCKED,
                "the two passphrases differ; nothing was changed",
            ));
        }
    }
    Ok(SecretString::from(first.to_string()))
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

pub fn home(cli: &Cli) -> anyhow::Result<PathBuf> {
    super::home_dir(cli.home.as_ref())
}

/// Opens the profile, asking for whatever unlocks it.
pub fn open(cli: &Cli) -> anyhow::Result<Client> {
    let home = home(cli)?;
    let key = key_source(cli, &home)?;
    Ok(Client::open(&home, key)?)
}
