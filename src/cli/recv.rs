//! `tern recv`: fetch, store and print new messages.

use std::time::Duration;

use data_encoding::HEXLOWER;
use serde_json::json;

use super::exit::{fail, FAILURE, NOTHING_RECEIVED, TRY_AGAIN};
use super::output::{body, json_text, note, text, time, try_line};
use super::{unlock, Cli};
use crate::client::fetch::{Event, FetchOptions, Shown};
use crate::client::model::{Direction, HistoryEntry};
use crate::client::now;
use crate::proto::envelope::ChainStatus;

/// Receive messages from every contact (and complete pending connections)
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern recv\n  tern recv --wait 60             # wait up to a minute for the first message\n  tern recv --follow --json | jq -r .text"
)]
pub struct Args {
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Wait up to SECS for the first message if none is waiting
    #[arg(long, value_name = "SECS")]
    pub wait: Option<u64>,
    /// Keep receiving and printing as messages arrive, until interrupted
    #[arg(long, conflicts_with = "wait")]
    pub follow: bool,
    /// Only this contact
    #[arg(long, value_name = "CONTACT")]
    pub from: Option<String>,
    /// Exit with status 66 when no message arrived (for scripts:
    /// `tern recv --wait 60 --fail-if-empty || echo nothing`)
    #[arg(long, conflicts_with = "follow")]
    pub fail_if_empty: bool,
    /// Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or
    /// downloads/ in the profile]; never over another file
    #[arg(long, env = "TERN_FILES_DIR", value_name = "DIR")]
    pub files_dir: Option<std::path::PathBuf>,
    /// Offers of larger files are kept, not downloaded (`tern files get ID`
    /// takes one): a number of bytes, or with K, M, G [default: 100M]
    #[arg(long, env = "TERN_MAX_FILE_SIZE", value_name = "SIZE", value_parser = super::transfers::parse_size)]
    pub max_file_size: Option<u64>,
}

pub fn chain_word(c: ChainStatus) -> &'static str {
    match c {
        ChainStatus::InOrder => "in-order",
        ChainStatus::Gap { .. } => "after-gap",
        ChainStatus::Late => "late",
    }
}

/// One message as `recv --json` and `log --json` print it: one schema for
/// both, documented in the man pages (tern-recv(1)) and README.md.
/// `contact` names the conversation, `from` who wrote it (the contact, or
/// `me` for the name this profile goes by), `order` is for `recv` only.
pub fn message_json(
    contact: &str,
    me: &str,
    entry: &HistoryEntry,
    order: Option<&str>,
) -> serde_json::Value {
    let from = match entry.dir {
        Direction::In => contact,
        Direction::Out => me,
    };
    let mut v = json!({
        "type": "message",
        "contact": contact,
        "from": from,
        "direction": entry.dir,
        "text": entry.text,
        "id": HEXLOWER.encode(&entry.id),
        "sent_at": time(entry.sent_at_ms),
        "sent_at_ms": entry.sent_at_ms,
        "received_at": entry.received_at_ms.map(time),
        "received_at_ms": entry.received_at_ms,
        // Which of our devices a copy came from (null: this one's own).
        "device": entry.device,
    });
    if let Some(o) = order {
        v["order"] = json!(o);
    }
    v
}

/// One message as text: `TIME  WHO: first line`, further lines indented,
/// so no line of a message can pass for the start of another. Names and
/// text are escaped ([`super::output::text`], [`super::output::body`]).
pub fn message_lines(who: &str, entry: &HistoryEntry) -> Vec<String> {
    // Split on '\n' only: `str::lines` would also drop a CR before it,
    // hiding what was sent.
    let mut lines = entry.text.split('\n');
    let first = lines.next().unwrap_or("");
    let mut out = vec![format!(
        "{}  {}: {}",
        time(entry.sent_at_ms),
        text(who),
        body(first)
    )];
    out.extend(lines.map(|l| format!("    {}", body(l))));
    out
}

/// Shows one event; `me` is this profile's name (the `from` of what our
/// devices sent). Messages (and, with `--json`, every event) go to stdout,
/// where output is what counts as delivery; notes go to stderr. `Err` only
/// for stdout.
pub fn print_event(e: &Event, as_json: bool, me: &str) -> std::io::Result<()> {
    match e {
        Event::Message {
            contact,
            entry,
            chain,
            ..
        } => {
            if as_json {
                let mut entry = entry.clone();
                entry.received_at_ms.get_or_insert_with(now);
                return try_line(&json_text(&message_json(
                    contact,
                    me,
                    &entry,
                    Some(chain_word(*chain)),
                )));
            }
            // What another device of ours sent shows as ours.
            // A copy says which of our devices it came from.
            let who = match (entry.dir, &entry.device) {
                (Direction::In, None) => contact.clone(),
                (Direction::In, Some(d)) => format!("{contact} (via your device {d})"),
                (Direction::Out, None) => format!("you → {contact}"),
                (Direction::Out, Some(d)) => format!("you (on {d}) → {contact}"),
            };
            // One write, so that a message is shown whole or not at all.
            return try_line(&message_lines(&who, entry).join("\n"));
        }
        Event::Connected { contact } => {
            if as_json {
                return try_line(&json_text(
                    &json!({"type": "connected", "contact": contact, "from": contact}),
                ));
            }
            note(&format!("{contact} is connected"));
        }
        Event::ProfileUpdated { contact } => {
            if as_json {
                return try_line(&json_text(
                    &json!({"type": "profile", "contact": contact, "from": contact}),
                ));
            }
            note(&format!(
                "{contact} updated their profile (see `tern contacts {contact}`)"
            ));
        }
        Event::Unsupported { contact, kind } => {
            note(&format!(
                "{contact} sent a message of a kind ({kind}) this tern does not know: upgrade tern"
            ));
        }
        Event::Warning(w) => note(&format!("warning: {w}")),
        Event::Refused {
            contact,
            what,
            reason,
        } => note(&format!(
            "warning: dropped a {what} from {contact} that breaks the protocol's rules: {reason}"
        )),
        Event::Notice(n) => note(n),
        // Recorded for `tern log`; `send --wait-delivered` waits for it.
        Event::Delivered { .. } | Event::Pending(_) => {}
    }
    Ok(())
}

/// `recv --follow`: files are fetched beside the messages, by a thread of
/// their own on another handle of the profile, whenever one is open.
fn follow_files(
    client: &crate::client::Client,
    dir: std::path::PathBuf,
    max_size: u64,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut files = client.another_handle()?;
    std::thread::spawn(move || loop {
        let open = files
            .open_incoming()
            .map(|v| !v.is_empty())
            .unwrap_or(false);
        if open {
            match super::transfers::receive_files(
                &mut files,
                &dir,
                max_size,
                Duration::from_secs(10),
                None,
                as_json,
            ) {
                Ok(Some(e)) => note(&format!("warning: {e}")),
                Ok(None) => {}
                Err(e) => note(&format!("warning: files: {e:#}")),
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    });
    Ok(())
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let contact_id = args
        .from
        .as_deref()
        .map(|n| client.contact_id(n))
        .transpose()?;
    let opts = FetchOptions {
        wait: args.wait.map(Duration::from_secs),
        follow: args.follow,
        contact_id,
        until_delivered: None,
    };
    let as_json = args.json;
    let me = client.settings()?.profile.name;
    let files_dir = args
        .files_dir
        .clone()
        .unwrap_or_else(|| super::transfers::default_files_dir(client.store.home()));
    let max_size = args
        .max_file_size
        .unwrap_or_else(super::transfers::default_max);
    if args.follow {
        follow_files(&client, files_dir.clone(), max_size, as_json)?;
    }
    // A message counts as delivered only once written and flushed; the
    // first write error ends the run, and what was not written is written
    // by the next `tern recv`.
    let mut write_error = None;
    let summary = client.fetch(&opts, &mut |e| match print_event(&e, as_json, &me) {
        Ok(()) => Shown::Yes,
        Err(err) => {
            write_error.get_or_insert(err);
            Shown::Failed
        }
    })?;
    if let Some(err) = write_error {
        // A reader that went away (`tern recv | head -1`) is no error.
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(fail(
            FAILURE,
            format!(
                "could not write to standard output ({err}); what was not written is kept and shown by the next `tern recv`"
            ),
        ));
    }
    // Files offered in what arrived (and earlier ones not finished): after
    // the messages, so that a big download never holds them up.
    let file_error = if args.follow {
        None
    } else {
        super::transfers::receive_files(
            &mut client,
            &files_dir,
            max_size,
            Duration::from_secs(2),
            None,
            as_json,
        )?
    };
    if let Some(e) = file_error {
        return Err(e);
    }
    if summary.all_relays_failed() && summary.messages == 0 {
        return Err(fail(
            TRY_AGAIN,
            "no relay could be reached; try again later",
        ));
    }
    if args.fail_if_empty && summary.messages == 0 {
        return Err(fail(NOTHING_RECEIVED, "no message arrived"));
    }
    Ok(())
}
