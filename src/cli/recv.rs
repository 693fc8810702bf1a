//! `tern recv`: fetch, store and print new messages.

use std::time::Duration;

use data_encoding::HEXLOWER;
use serde_json::json;

use super::exit::{fail, TRY_AGAIN};
use super::output::{json, line, note, time};
use super::{unlock, Cli};
use crate::client::fetch::{Event, FetchOptions};
use crate::client::model::Direction;
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
}

fn chain_word(c: ChainStatus) -> &'static str {
    match c {
        ChainStatus::InOrder => "in-order",
        ChainStatus::Gap { .. } => "after-gap",
        ChainStatus::Late => "late",
    }
}

pub fn print_event(e: &Event, as_json: bool) {
    match e {
        Event::Message {
            contact,
            entry,
            chain,
        } => {
            if as_json {
                json(&json!({
                    "type": "message",
                    "contact": contact,
                    "direction": entry.dir,
                    "text": entry.text,
                    "id": HEXLOWER.encode(&entry.id),
                    "sent_at": time(entry.sent_at_ms),
                    "received_at": time(entry.received_at_ms.unwrap_or_else(now)),
                    "sent_at_ms": entry.sent_at_ms,
                    "received_at_ms": entry.received_at_ms,
                    "order": chain_word(*chain),
                    "device": entry.device,
                }));
            } else {
                let mut lines = entry.text.lines();
                let first = lines.next().unwrap_or("");
                // What another device of ours sent shows as ours.
                // A copy says which of our devices it came from.
                let who = match (entry.dir, &entry.device) {
                    (Direction::In, None) => contact.clone(),
                    (Direction::In, Some(d)) => format!("{contact} (via your device {d})"),
                    (Direction::Out, None) => format!("you → {contact}"),
                    (Direction::Out, Some(d)) => format!("you (on {d}) → {contact}"),
                };
                line(&format!("{}  {who}: {first}", time(entry.sent_at_ms)));
                for l in lines {
                    line(&format!("    {l}"));
                }
            }
        }
        Event::Connected { contact } => {
            if as_json {
                json(&json!({"type": "connected", "contact": contact}));
            } else {
                note(&format!("{contact} is connected"));
            }
        }
        Event::ProfileUpdated { contact } => {
            if as_json {
                json(&json!({"type": "profile", "contact": contact}));
            } else {
                note(&format!("{contact} updated their profile"));
            }
        }
        Event::Unsupported { contact, kind } => {
            note(&format!(
                "{contact} sent a message of a kind ({kind}) this tern does not know: upgrade tern"
            ));
        }
        Event::Warning(w) => note(&format!("warning: {w}")),
        Event::Notice(n) => note(n),
        Event::Pending(_) => {}
    }
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
    };
    let as_json = args.json;
    let summary = client.fetch(&opts, &mut |e| print_event(&e, as_json))?;
    if summary.queues > 0 && summary.errors.len() >= summary.queues && summary.messages == 0 {
        return Err(fail(
            TRY_AGAIN,
            "no relay could be reached; try again later",
        ));
    }
    Ok(())
}
