//! `tern send`: send a message.

use std::io::{BufRead, Read};

use anyhow::Context;
use data_encoding::HEXLOWER;
use serde_json::{json, Value};

use super::exit::{fail, FAILURE, GONE, NOT_DELIVERED, TRY_AGAIN, USAGE};
use super::output::{json, note, stdin_is_terminal};
use super::{unlock, Cli};
use crate::client::fetch::{Event, FetchOptions, Shown};
use crate::client::send::SendOutcome;
use crate::client::Client;
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
    after_help = "Examples:\n  tern send bob 'see you at 6'\n  tern send bob -5 degrees tonight        # the message may start with -\n  tern send bob --json 'on my way'        # options before the message\n  tern send bob -- --json                 # after --, every word is the message\n  df -h | tern send ops-bot\n  tern send bob --file report.pdf 'the numbers'   # a file, with a caption\n  pg_dump db | tern send ops --file - --name db.sql\n\nOptions go before the message: after the contact, the first word that is\nnot an option starts the message, and every word from there on is part of\nit, including words that begin with - (`tern send bob hi --json` sends\n\"hi --json\", and says so). `--` starts the message explicitly. The words\nare joined with single spaces.\n\nExit status 75 means no relay could take the message now: it is kept and\nsent by the next `tern send` or `tern recv`.\n\nWith --wait-delivered SECS, tern keeps receiving until a device of the\ncontact confirms it stored the message (a delivery receipt) and exits 0,\nor exits 9 once SECS pass without one (the message is on a relay and may\nstill arrive; a contact who turned receipts off never confirms). What\narrives meanwhile is stored and shown by the next `tern recv`:\n  df -h | tern send ops --wait-delivered 120 || echo 'nobody has it yet'"
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
    /// Send each line of stdin as a message of its own, as it comes (a log
    /// tail, a CSV), in one process; empty lines are skipped
    #[arg(long, conflicts_with_all = ["text", "file"])]
    pub lines: bool,
    /// Send a file (give it more than once for several; `-` reads standard
    /// input, with --name); the message words, if any, are its caption
    #[arg(long, value_name = "PATH")]
    pub file: Vec<std::path::PathBuf>,
    /// The name the file goes by (required for `--file -`)
    #[arg(long, value_name = "NAME", requires = "file")]
    pub name: Option<String>,
    /// With --file: give up on a relay that makes no progress for SECS (the
    /// upload resumes with `tern files retry`)
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub stall: u64,
    /// Wait up to SECS (at most 86400) for a device of the contact to
    /// confirm it stored the message; exit 9 if none did in time
    #[arg(long, value_name = "SECS", conflicts_with_all = ["lines", "file"],
          value_parser = clap::value_parser!(u64).range(..=86_400))]
    pub wait_delivered: Option<u64>,
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

/// `tern send` through the daemon that serves the home: the same output
/// and exit codes, with no unlock and no relay sessions of its own.
fn send_via_daemon(
    mut daemon: super::daemon::client::Connection,
    home: &std::path::Path,
    args: &Args,
    text: String,
) -> anyhow::Result<()> {
    let mut params =
        json!({"profile": home.display().to_string(), "contact": args.contact, "text": text});
    if let Some(secs) = args.wait_delivered {
        params["wait_delivered"] = json!(secs);
    }
    let timeout = super::daemon::client::CALL_TIMEOUT
        + std::time::Duration::from_secs(args.wait_delivered.unwrap_or(0));
    let (result, error) = match daemon.call_timeout("send", params, timeout) {
        Ok(r) => (r, None),
        Err(e) => (e.data, Some(e.error)),
    };
    if args.json && result.get("id").is_some() {
        let errors: Vec<&Value> = result["failed"]
            .as_array()
            .map(|f| f.iter().map(|e| &e["error"]).collect())
            .unwrap_or_default();
        let mut v = json!({
            "type": "sent",
            "contact": result["contact"],
            "id": result["id"],
            "state": result["state"],
            "errors": errors,
        });
        if args.wait_delivered.is_some() {
            v["delivered"] = result["delivered"].clone();
            v["device"] = result["device"].clone();
        }
        json(&v);
    }
    if let Some(e) = error {
        return Err(e);
    }
    if result["state"] == "awaiting-connection" {
        note(&format!(
            "{} has not completed the connection yet; the message will go out once they do",
            result["contact"].as_str().unwrap_or_default()
        ));
    }
    for f in result["failed"].as_array().into_iter().flatten() {
        note(&format!(
            "warning: {} (sent through the other relays)",
            f["error"].as_str().unwrap_or_default()
        ));
    }
    if let Some(d) = result["device"].as_str() {
        note(&format!(
            "delivered: {}'s device {d} has it",
            result["contact"].as_str().unwrap_or_default()
        ));
    }
    Ok(())
}

fn state_word(outcome: &SendOutcome) -> &'static str {
    if outcome.awaiting_connection {
        "awaiting-connection"
    } else if outcome.delivered {
        "sent"
    } else {
        "kept"
    }
}

fn sent_json(name: &str, outcome: &SendOutcome) -> serde_json::Value {
    json!({
        "type": "sent",
        "contact": name,
        "id": HEXLOWER.encode(&outcome.id),
        "state": state_word(outcome),
        "errors": outcome.report.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// `--lines`: one message per line of stdin, sent as each line arrives,
/// with one unlock and one set of relay sessions. A message no relay took
/// is kept and retried (as for one `tern send`), and the run goes on; the
/// exit status says so at the end. Input that cannot be a message (not
/// UTF-8, too long) stops the run there: the lines before it were sent.
fn send_lines(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    if stdin_is_terminal() {
        note("type one message per line, then Ctrl-D");
    }
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let name = client.contact(&id)?.name;
    let mut stdin = std::io::stdin().lock();
    let (mut sent, mut kept, mut waiting) = (0usize, 0usize, 0usize);
    let mut last_error = None;
    for number in 1.. {
        let mut buf = Vec::new();
        // One byte more than a message and its line end may hold: a longer
        // line is refused without reading all of it.
        let n = (&mut stdin)
            .take(MAX_BODY_LEN as u64 + 3)
            .read_until(b'\n', &mut buf)
            .context("reading stdin")?;
        if n == 0 {
            break;
        }
        if buf.ends_with(b"\n") {
            buf.pop();
            if buf.ends_with(b"\r") {
                buf.pop();
            }
        } else if buf.len() > MAX_BODY_LEN {
            return Err(too_long_line(number, sent));
        }
        if buf.is_empty() {
            continue;
        }
        if buf.len() > MAX_BODY_LEN {
            return Err(too_long_line(number, sent));
        }
        let text = String::from_utf8(buf).map_err(|_| {
            fail(
                FAILURE,
                format!(
                    "line {number} is not UTF-8 text; {sent} line(s) before it were sent, \
                     nothing after"
                ),
            )
        })?;
        let outcome = client.send(&id, Kind::Text, text.into_bytes())?;
        if args.json {
            json(&sent_json(&name, &outcome));
        }
        if outcome.awaiting_connection {
            waiting += 1;
        } else if outcome.gone && !outcome.delivered {
            return Err(fail(
                GONE,
                format!(
                    "{} deleted this connection: line {number} cannot reach them; {sent} line(s) \
                     before it were sent (`tern forget {}` removes them here)",
                    args.contact, args.contact
                ),
            ));
        } else if outcome.delivered {
            sent += 1;
        } else {
            kept += 1;
            last_error = Some(outcome.report.describe());
        }
    }
    if waiting > 0 {
        note(&format!(
            "{name} has not completed the connection yet; {waiting} message(s) will go out once they do (run `tern recv`)"
        ));
    }
    if let Some(why) = last_error {
        return Err(fail(
            TRY_AGAIN,
            format!(
                "no relay took {kept} of the messages ({why}); they are kept and will be retried \
                 ({sent} sent)"
            ),
        ));
    }
    Ok(())
}

fn too_long_line(number: usize, sent: usize) -> anyhow::Error {
    fail(
        USAGE,
        format!(
            "line {number} is longer than the {MAX_BODY_LEN} bytes one message holds; {sent} \
             line(s) before it were sent, nothing after"
        ),
    )
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
    if !args.file.is_empty() {
        return super::transfers::send_files(cli, args);
    }
    if args.lines {
        return send_lines(cli, args);
    }
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
    let home = unlock::home(cli)?;
    if let Some(daemon) = super::daemon::client::find(&home)? {
        return send_via_daemon(daemon, &home, args, text);
    }
    let mut client = unlock::open_at(cli, &home)?;
    let id = client.contact_id(&args.contact)?;
    let name = client.contact(&id)?.name;
    let outcome = client.send(&id, Kind::Text, text.into_bytes())?;
    let mut delivered = None;
    if let Some(secs) = args.wait_delivered {
        // Only what a relay took (or will take, once connected) can arrive.
        if outcome.delivered || outcome.awaiting_connection {
            delivered = Some(wait_delivered(&mut client, &id, &outcome.id, secs)?);
        }
    }
    if args.json {
        let mut v = sent_json(&name, &outcome);
        if let Some(d) = &delivered {
            v["delivered"] = json!(d.is_some());
            v["device"] = json!(d.as_ref().map(|d| &d.device));
        }
        json(&v);
    }
    if outcome.awaiting_connection && delivered.is_none() {
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
    match (&delivered, args.wait_delivered) {
        (Some(None), Some(secs)) => return Err(not_delivered(&name, secs)),
        (Some(Some(d)), _) => note(&format!("delivered: {name}'s device {} has it", d.device)),
        _ => {}
    }
    Ok(())
}

pub fn not_delivered(name: &str, secs: u64) -> anyhow::Error {
    fail(
        NOT_DELIVERED,
        format!(
            "no device of {name} confirmed the message within {secs} s; it is on a relay and              may still arrive (a contact who turned receipts off never confirms)"
        ),
    )
}

/// `--wait-delivered`: receives on every queue of the profile until a
/// device of the contact confirms message `msg` or `secs` pass. Messages
/// that arrive meanwhile are stored and left in the inbox ([`Shown::Later`]),
/// so the next `tern recv` shows them exactly as if it had fetched them;
/// other news goes to stderr.
fn wait_delivered(
    client: &mut Client,
    contact_id: &str,
    msg: &[u8; 16],
    secs: u64,
) -> anyhow::Result<Option<crate::client::model::DeliveredTo>> {
    // Another process on this profile (a `tern recv`) may have the receipt.
    if let Some(d) = client.delivered_to(contact_id, msg)?.into_iter().next() {
        return Ok(Some(d));
    }
    let me = client.settings()?.profile.name;
    let opts = FetchOptions {
        wait: Some(std::time::Duration::from_secs(secs)),
        until_delivered: Some(*msg),
        ..FetchOptions::default()
    };
    let summary = client.fetch(&opts, &mut |e| match e {
        Event::Message { .. } => Shown::Later,
        other => {
            // Text mode: everything but messages goes to stderr.
            let _ = super::recv::print_event(&other, false, &me);
            Shown::Yes
        }
    })?;
    if summary.delivered.is_some() {
        return Ok(summary.delivered);
    }
    Ok(client.delivered_to(contact_id, msg)?.into_iter().next())
}
