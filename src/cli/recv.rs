//! `tern recv`: fetch, store and print new messages.

use std::time::Duration;

use anyhow::Context;

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

/// A received message as `tern recv` prints it: what another device of
/// ours sent shows as ours, and a copy says which of our devices it came
/// from.
fn message_text(contact: &str, entry: &HistoryEntry) -> String {
    let who = match (entry.dir, &entry.device) {
        (Direction::In, None) => contact.to_string(),
        (Direction::In, Some(d)) => format!("{contact} (via your device {d})"),
        (Direction::Out, None) => format!("you → {contact}"),
        (Direction::Out, Some(d)) => format!("you (on {d}) → {contact}"),
    };
    message_lines(&who, entry).join("\n")
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
            // One write, so that a message is shown whole or not at all.
            return try_line(&message_text(contact, entry));
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
    let home = unlock::home(cli)?;
    if let Some(daemon) = super::daemon::client::find(&home)? {
        return via_daemon(daemon, &home, args);
    }
    let mut client = unlock::open_at(cli, &home)?;
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

/// A `message` notification of the daemon as the entry it was made from.
pub(super) fn entry_of(m: &serde_json::Value) -> Option<HistoryEntry> {
    let id = HEXLOWER.decode(m["id"].as_str()?.as_bytes()).ok()?;
    Some(HistoryEntry {
        dir: if m["direction"] == "out" {
            Direction::Out
        } else {
            Direction::In
        },
        id: id.try_into().ok()?,
        text: m["text"].as_str()?.to_string(),
        sent_at_ms: m["sent_at_ms"].as_u64()?,
        received_at_ms: m["received_at_ms"].as_u64(),
        device: m["device"].as_str().map(str::to_string),
    })
}

/// `tern recv` through the daemon that serves `home`: no unlock, no relay
/// sessions of its own. It subscribes as a client that acknowledges: a
/// message leaves the daemon's inbox only once this command wrote it out
/// and acknowledged it, so a recv killed (or a stdout closed) in between
/// leaves it for the next client. Files are not fetched this way (run
/// with `TERN_NO_DAEMON=1` for them).
fn via_daemon(
    mut daemon: super::daemon::client::Connection,
    home: &std::path::Path,
    args: &Args,
) -> anyhow::Result<()> {
    use std::time::Instant;

    use super::daemon::client::rpc_failure;
    use crate::client::ClientError;

    let profile = home.display().to_string();
    if let Some(from) = &args.from {
        let contacts = daemon
            .call("contacts", json!({"profile": profile}))
            .map_err(|e| e.error)?;
        let known = contacts
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["name"] == from.as_str()));
        if !known {
            return Err(ClientError::UnknownContact(from.clone()).into());
        }
    }
    let socket = daemon.socket().to_path_buf();
    let reached = || format!("talking to the tern daemon at {}", socket.display());
    daemon.request(
        json!("subscribe"),
        "subscribe",
        json!({"profile": profile, "manual_ack": true}),
    )?;
    // Without --follow: what is pending (written before the response to
    // subscribe), or with --wait the first message within that time.
    // Beyond a century a wait is for ever (and a larger one would overflow
    // the clock).
    let deadline = args
        .wait
        .map(|w| Instant::now() + Duration::from_secs(w.min(u32::MAX.into())));
    let mut line = String::new();
    let mut subscribed = false;
    let mut shown = 0usize;
    let mut acks_due = 0usize;
    let mut next_ack = 0u64;
    loop {
        let waiting_for_more = args.follow
            || !subscribed
            || (shown == 0 && deadline.is_some_and(|d| Instant::now() < d));
        if !waiting_for_more && acks_due == 0 {
            break;
        }
        let timeout = match deadline {
            Some(d) if subscribed && shown == 0 && !args.follow => Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
            _ if args.follow && acks_due == 0 => None,
            _ => Some(Duration::from_secs(120)),
        };
        match daemon.read_line(&mut line, timeout) {
            Ok(0) => {
                return Err(fail(
                    FAILURE,
                    format!(
                        "the tern daemon at {} hung up; what was shown and not acknowledged \
                         yet will be shown again",
                        socket.display()
                    ),
                ))
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && deadline.is_some()
                    && shown == 0
                    && subscribed =>
            {
                break;
            }
            Err(e) => return Err(anyhow::Error::from(e).context(reached())),
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(reached)?;
        let params = &v["params"];
        match v["method"].as_str() {
            Some("message") => {
                if args
                    .from
                    .as_ref()
                    .is_some_and(|f| params["contact"] != f.as_str())
                {
                    // Not acknowledged: it stays for another client.
                    continue;
                }
                let written = if args.json {
                    let mut m = params.clone();
                    if let Some(o) = m.as_object_mut() {
                        o.remove("profile");
                    }
                    try_line(&json_text(&m))
                } else {
                    let Some(entry) = entry_of(params) else {
                        continue;
                    };
                    try_line(&message_text(
                        params["contact"].as_str().unwrap_or_default(),
                        &entry,
                    ))
                };
                if let Err(err) = written {
                    if err.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(fail(
                        FAILURE,
                        format!(
                            "could not write to standard output ({err}); what was not written \
                             is kept and shown by the next `tern recv`"
                        ),
                    ));
                }
                shown += 1;
                next_ack += 1;
                acks_due += 1;
                daemon.request(
                    json!(format!("ack-{next_ack}")),
                    "ack",
                    json!({"profile": profile, "id": params["id"]}),
                )?;
            }
            Some(kind @ ("connected" | "contact_updated")) => {
                let contact = params["contact"].as_str().unwrap_or_default();
                if args.json {
                    let t = if kind == "connected" {
                        "connected"
                    } else {
                        "profile"
                    };
                    let _ = try_line(&json_text(
                        &json!({"type": t, "contact": contact, "from": contact}),
                    ));
                } else if kind == "connected" {
                    note(&format!("{} is connected", text(contact)));
                } else {
                    note(&format!(
                        "{} updated their profile (see `tern contacts {}`)",
                        text(contact),
                        text(contact)
                    ));
                }
            }
            Some("notice") => note(&text(params["message"].as_str().unwrap_or_default())),
            Some("error") => note(&format!(
                "warning: {}",
                text(params["message"].as_str().unwrap_or_default())
            )),
            Some(_) => {}
            None if v["id"] == "subscribe" => {
                if let Some(e) = v.get("error") {
                    return Err(rpc_failure(e, "the daemon refused"));
                }
                subscribed = true;
            }
            None => {
                acks_due = acks_due.saturating_sub(1);
                if let Some(e) = v.get("error") {
                    note(&format!(
                        "warning: the daemon did not take an acknowledgement ({}); the message \
                         may be shown again",
                        text(e["message"].as_str().unwrap_or_default())
                    ));
                }
            }
        }
    }
    if args.fail_if_empty && shown == 0 {
        return Err(fail(NOTHING_RECEIVED, "no message arrived"));
    }
    Ok(())
}
