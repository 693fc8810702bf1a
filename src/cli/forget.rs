//! `tern forget`: delete a contact, its queues and its history.

use std::io::{BufRead, Write};

use super::exit::{fail, USAGE};
use super::output::{note, stdin_is_terminal};
use super::{unlock, Cli};

/// Delete a contact on all your devices: its queues, keys and history
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  tern forget bob --yes")]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// Do not ask for confirmation (needed when stdin is not a terminal)
    #[arg(long)]
    pub yes: bool,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    if !args.yes {
        if !stdin_is_terminal() {
            return Err(fail(
                USAGE,
                "forget deletes the history too: pass --yes to confirm; nothing was changed",
            ));
        }
        eprint!(
            "Delete {} and the whole history with them? [y/N] ",
            args.contact
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(fail(
                super::exit::FAILURE,
                "not confirmed; nothing was changed",
            ));
        }
    }
    // Every connection of the contact (one per device of theirs), here and
    // on our other devices.
    for relay in client.forget_contact(&id)? {
        note(&format!(
            "warning: could not delete a queue on {relay}; it stays on its relay, unusable \
             without the keys now deleted"
        ));
    }
    note(&format!("{} forgotten", args.contact));
    Ok(())
}
