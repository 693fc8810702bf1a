//! `tern log`: the local history with a contact.

use serde_json::{json, Value};

use super::exit::{fail, FAILURE};
use super::output::{json, line, time};
use super::{recv, unlock, Cli};
use crate::client::model::{history_log, HistoryEntry};
use crate::client::receipts::MessageState;
use crate::client::Client;

/// The delivery fields `log --json` adds to a message (README, tern-log(1)).
pub fn state_json(v: &mut serde_json::Value, state: Option<&MessageState>) {
    v["state"] = json!(state.map(MessageState::word));
    v["delivered"] = match state {
        Some(MessageState::Delivered(ds)) => ds
            .iter()
            .map(|d| json!({"device": d.device, "at": time(d.at_ms), "at_ms": d.at_ms}))
            .collect(),
        _ => json!([]),
    };
}

/// The compact marker after our name in text output, from the `state`
/// of `log --json`.
fn marker(state: Option<&str>) -> &'static str {
    match state {
        Some("sent") => " …",
        Some("on-relay") => " ✓",
        Some("delivered") => " ✓✓",
        _ => "",
    }
}

/// Show the local history with a contact, oldest first
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern log bob --limit 20\n  tern log bob --json | jq -r .text\n  tern log bob --json | jq 'select(.direction==\"out\") | {text, state, delivered}'\n\nWhat you sent is marked after your name: `…` sent (no relay has it yet,\nor sent by another of your devices), `✓` on a relay of the contact, `✓✓`\ndelivered (a device of the contact stored it: a delivery receipt; never\nshown for a contact who turned receipts off). With --json, `state` is\n\"sent\", \"on-relay\" or \"delivered\" and `delivered` lists each device of\nthe contact that stored it ({device, at, at_ms}; `device` is the start of\nthat connection's fingerprint); both are null and [] for what you received."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// How many of the latest messages
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let home = unlock::home(cli)?;
    let messages = match super::daemon::client::find(&home)? {
        // The daemon answers at most MAX_LOG; a longer history is read here.
        Some(mut daemon) if args.limit <= super::daemon::MAX_LOG => {
            let v = daemon
                .call(
                    "log",
                    json!({"profile": home.display().to_string(), "contact": args.contact,
                           "limit": args.limit}),
                )
                .map_err(|e| e.error)?;
            match v {
                Value::Array(a) => a,
                _ => return Err(fail(FAILURE, "the tern daemon answered log with no list")),
            }
        }
        _ => messages(&unlock::open_at(cli, &home)?, &args.contact, args.limit)?,
    };
    for m in &messages {
        if args.json {
            json(m);
            continue;
        }
        let Some(e) = recv::entry_of(m) else {
            continue;
        };
        let base = m["from"].as_str().unwrap_or_default();
        // A copy from another device of ours says so.
        let who = match &e.device {
            Some(d) => format!("{base} (via {d}){}", marker(m["state"].as_str())),
            None => format!("{base}{}", marker(m["state"].as_str())),
        };
        for l in recv::message_lines(&who, &e) {
            line(&l);
        }
    }
    Ok(())
}

/// The `limit` latest messages with the contact named `contact`, oldest
/// first, as `log --json` shows them (and the daemon's `log` answers).
pub fn messages(client: &Client, contact: &str, limit: usize) -> anyhow::Result<Vec<Value>> {
    let id = client.contact_id(contact)?;
    let record = client.contact(&id)?;
    let group = record.group().to_string();
    let mut entries: Vec<(u64, HistoryEntry)> = client
        .store
        .read(|tx| tx.tail(&history_log(&group), limit))?;
    // Copies from our other devices arrive after the fact: show the
    // conversation in the order it was written.
    entries.sort_by_key(|(_, e)| e.sent_at_ms);
    let me = client.settings()?.profile.name;
    let plain: Vec<HistoryEntry> = entries.into_iter().map(|(_, e)| e).collect();
    let states = client.message_states(&group, &plain)?;
    Ok(plain
        .iter()
        .zip(&states)
        .map(|(e, state)| {
            let mut v = recv::message_json(&record.name, &me, e, None);
            state_json(&mut v, state.as_ref());
            v
        })
        .collect())
}
