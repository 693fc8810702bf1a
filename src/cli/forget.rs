//! `tern forget`: delete a contact, its queues and its history.

use std::io::{BufRead, Write};

use tern_relay::wire::Command;

use super::exit::{fail, USAGE};
use super::output::{note, stdin_is_terminal};
use super::{unlock, Cli};

/// Delete a contact: its queues on the relays, its keys and its history
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
    // Every connection of the contact: one per device of theirs.
    for member in client.group_members(&id)? {
        let contact = client.contact(&member)?;
        // Best effort: a relay that is down keeps the queue until its TTL.
        for q in contact.queue_grants() {
            if let Err(e) = client.net.call(
                &q.relay,
                &Command::Delete {
                    recipient_id: q.recipient_id,
                },
                Some(&ed25519_dalek::SigningKey::from_bytes(q.auth.as_bytes())),
            ) {
                note(&format!(
                    "warning: could not delete a queue: {e}; it stays on its relay, unusable without the keys now deleted"
                ));
            }
        }
        client.remove_contact(&member)?;
    }
    note(&format!("{} forgotten", args.contact));
    Ok(())
}
