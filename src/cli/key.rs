//! `tern key`: export the unlocked identity, change the passphrase, re-key.

use std::path::PathBuf;

use age::secrecy::{ExposeSecret, SecretString};

use super::exit::{fail, USAGE};
use super::output::note;
use super::{files, unlock, Cli};
use crate::store::NewKey;

/// Manage the key that protects the profile
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern key export --out ~/.config/tern/identity   # then: tern --identity FILE recv\n  tern key passwd                                  # asks for the new passphrase twice\n  tern key passwd --new-passphrase-file new.txt    # for scripts\n  tern key passwd --rekey                          # also retire old key files and exports\n\nThe passphrase protects key.age with scrypt (N = 2^16, about 0.16 s per\ntry on a 2-core machine); a weak one falls to offline guessing, so new\npassphrases are checked with zxcvbn (--allow-weak-passphrase overrides)."
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Write the unlocked identity to a file (mode 0600) for scripts and
    /// cron jobs: with --identity FILE, commands skip the slow passphrase step
    Export {
        /// Where to write the identity (missing directories are made, 0700)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Change the passphrase (or remove it with --no-passphrase); with
    /// --rekey, also move the whole profile to a new key
    Passwd {
        /// Keep the profile key unencrypted on disk from now on
        #[arg(long, conflicts_with = "new_passphrase_file")]
        no_passphrase: bool,
        /// Read the new passphrase from the first line of FILE instead of
        /// asking twice on the terminal (the current one still comes from
        /// TERN_PASSPHRASE_FILE, --passphrase-file or a prompt)
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Re-key: a new profile key, with every record re-encrypted under
        /// it in one transaction. Old copies of key.age and every identity
        /// exported before stop opening the profile (export again after);
        /// contacts notice nothing. The new passphrase may equal the old.
        #[arg(long)]
        rekey: bool,
    },
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    match &args.action {
        Action::Export { out, force } => {
            if !*force {
                files::refuse_existing(out)?;
            }
            // `--out ~/.config/tern/identity` on a fresh machine.
            files::create_parents(out)?;
            client.store.export_identity(out, *force)?;
            note(&format!(
                "identity written to {}; anyone who can read it can read this profile",
                out.display()
            ));
        }
        Action::Passwd {
            no_passphrase,
            new_passphrase_file,
            rekey,
        } => {
            let key = if *no_passphrase {
                NewKey::Unprotected
            } else {
                let name = client.settings()?.profile.name;
                let p = unlock::new_passphrase(cli, new_passphrase_file.as_deref(), &[&name])?;
                // The same passphrase again changes nothing, except in a
                // re-key, where it protects a new key.
                let same = SecretString::from(p.expose_secret().to_string());
                if !*rekey && client.store.passphrase_opens(same) {
                    return Err(fail(
                        USAGE,
                        "the new passphrase is the current one; nothing was changed",
                    ));
                }
                NewKey::Passphrase(p)
            };
            if *rekey {
                client.store.rekey(key)?;
                note(
                    "profile re-keyed: every record is under a new key; earlier copies of key.age \
                     and exported identities no longer open it (run `tern key export` again where \
                     you need one)",
                );
            } else {
                client.store.set_key(key)?;
                note(
                    "passphrase changed (the profile key is the same: exported identities still \
                     work; `tern key passwd --rekey` retires them)",
                );
            }
        }
    }
    Ok(())
}
