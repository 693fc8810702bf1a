//! `tern send`: send a message.

use std::io::Read;

use anyhow::Context;

use super::exit::{fail, TRY_AGAIN, USAGE};
use super::output::{note, stdin_is_terminal};
use super::{unlock, Cli};
use crate::proto::envelope::{Kind, MAX_BODY_LEN};

/// Send a message: from the arguments, or from stdin when there are none
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern send bob 'see you at 6'\n  df -h | tern send ops-bot\n\nExit status 75 means no relay could take the message now: it is kept and\nsent by the next `tern send` or `tern recv`."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// The message; read from stdin when absent
    #[arg(trailing_var_arg = true)]
    pub text: Vec<String>,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let text = if args.text.is_empty() {
        if stdin_is_terminal() {
            note("type the message, then Ctrl-D");
        }
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_BODY_LEN as u64 + 1)
            .read_to_string(&mut s)
            .context("reading the message from stdin (it must be UTF-8 text)")?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        s
    } else {
        args.text.join(" ")
    };
    if text.is_empty() {
        return Err(fail(USAGE, "the message is empty; nothing was sent"));
    }
    if text.len() > MAX_BODY_LEN {
        return Err(fail(
            USAGE,
            format!("the message is {} bytes, more than the {MAX_BODY_LEN} one message holds; nothing was sent", text.len()),
        ));
    }
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let outcome = client.send(&id, Kind::Text, text.into_bytes())?;
    if outcome.awaiting_connection {
        note(&format!(
            "{} has not completed the connection yet; the message will go out once they do (run `tern recv`)",
            args.contact
        ));
        return Ok(());
    }
    if !outcome.delivered {
        let why = outcome.report.describe();
        return Err(fail(
            TRY_AGAIN,
            format!("no relay took the message ({why}); it is kept and will be retried"),
        ));
    }
    for e in &outcome.report.errors {
        note(&format!("warning: {e} (sent through the other relays)"));
    }
    Ok(())
}
