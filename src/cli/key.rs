//! `tern key`: export the unlocked identity, change the passphrase.

use std::path::PathBuf;

use super::output::note;
use super::{files, unlock, Cli};
use crate::store::NewKey;

/// Manage the key that protects the profile
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern key export --out ~/.config/tern/identity   # then: tern --identity FILE recv\n  tern key passwd"
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
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Change the passphrase (or remove it with --no-passphrase)
    Passwd {
        #[arg(long)]
        no_passphrase: bool,
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
        Action::Passwd { no_passphrase } => {
            let key = if *no_passphrase {
                NewKey::Unprotected
            } else {
                NewKey::Passphrase(unlock::passphrase(cli, "New passphrase: ", true)?)
            };
            client.store.set_key(key)?;
            note("key changed");
        }
    }
    Ok(())
}
