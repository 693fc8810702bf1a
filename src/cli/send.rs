//! `tern send`: send a message.

use std::io::Read;

use anyhow::Context;
use data_encoding::HEXLOWER;
use serde_json::json;

use super::exit::{fail, FAILURE, GONE, TRY_AGAIN, USAGE};
use super::output::{json, note, stdin_is_terminal};
use super::{unlock, Cli};
use crate::proto::envelope::{Kind, MAX_BODY_LEN};

/// Past this much input on stdin tern stops counting: the size is only for
/// the error message.
const COUNT_LIMIT: u64 = 64 << 20;

/// Options that, after the message's first word, are message text: worth
/// a note, since the user may have meant them as options.
const OPTION_WORDS: &[&str] = &[
    "--json",
    "--home",
    "--passphrase-file",
    "--identity",
    "--help",
    "-h",
];

/// Send a message: from the arguments, or from stdin when there are none
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern send bob 'see you at 6'\n  tern send bob -5 degrees tonight        # the message may start with -\n  tern send bob --json 'on my way'        # options before the message\n  tern send bob -- --json                 # after --, every word is the message\n  df -h | tern send ops-bot\n\nOptions go before the message: after the contact, the first word that is\nnot an option starts the message, and every word from there on is part of\nit, including words that begin with - (`tern send bob hi --json` sends\n\"hi --json\", and says so). `--` starts the message explicitly. The words\nare joined with single spaces.\n\nExit status 75 means no relay could take the message now: it is kept and\nsent by the next `tern send` or `tern recv`."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// The message; read from stdin when absent
    #[arg(allow_hyphen_values = true, value_name = "TEXT")]
    pub text: Vec<String>,
    /// Print one JSON object: the message id and whether a relay has it
    #[arg(long)]
    pub json: bool,
}

/// The message from stdin: its bytes, or the error that says how big it
/// really was.
fn read_stdin() -> anyhow::Result<String> {
    if stdin_is_terminal() {
        note("type the message, then Ctrl-D");
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    (&mut stdin)
        .take(MAX_BODY_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading the message from stdin")?;
    if buf.len() > MAX_BODY_LEN {
        let rest = std::io::copy(&mut (&mut stdin).take(COUNT_LIMIT), &mut std::io::sink())?;
        let total = buf.len() as u64 + rest;
        let size = if rest == COUNT_LIMIT {
            format!("more than {total} bytes")
        } else {
            format!("{total} bytes")
        };
        return Err(too_long(&size));
    }
    let mut s = String::from_utf8(buf).map_err(|_| {
        fail(
            FAILURE,
            "the message on stdin is not UTF-8 text; nothing was sent",
        )
    })?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

fn too_long(size: &str) -> anyhow::Error {
    fail(
        USAGE,
        format!(
            "the message is {size}, more than the {MAX_BODY_LEN} one message holds; nothing was sent"
        ),
    )
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let text = if args.text.is_empty() {
        read_stdin()?
    } else {
        if let Some(w) = args
            .text
            .iter()
            .skip(1)
            .find(|w| OPTION_WORDS.contains(&w.as_str()))
        {
            note(&format!(
                "`{w}` comes after the first word of the message, so it is sent as part of it; \
                 options go before the message"
            ));
        }
        args.text.join(" ")
    };
    if text.is_empty() {
        return Err(fail(USAGE, "the message is empty; nothing was sent"));
    }
    if text.len() > MAX_BODY_LEN {
        return Err(too_long(&format!("{} bytes", text.len())));
    }
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let name = client.contact(&id)?.name;
    let outcome = client.send(&id, Kind::Text, text.into_bytes())?;
    let state = if outcome.awaiting_connection {
        "awaiting-connection"
    } else if outcome.delivered {
        "sent"
    } else {
        "kept"
    };
    if args.json {
        json(&json!({
            "type": "sent",
            "contact": name,
            "id": HEXLOWER.encode(&outcome.id),
            "state": state,
            "errors": outcome.report.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }));
    }
    if outcome.awaiting_connection {
        note(&format!(
            "{name} has not completed the connection yet; the message will go out once they do (run `tern recv`)"
        ));
        return Ok(());
    }
    if outcome.gone && !outcome.delivered {
        return Err(fail(
            GONE,
            format!(
                "{} deleted this connection: the message cannot reach them (it is kept; `tern forget {}` removes them here)",
                args.contact, args.contact
            ),
        ));
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
