//! `tern log`: the local history with a contact.

use serde_json::json;

use super::output::{json, line, time};
use super::{recv, unlock, Cli};
use crate::client::model::{history_log, Direction, HistoryEntry};
use crate::client::receipts::MessageState;

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

/// The compact marker after our name in text output.
fn marker(state: Option<&MessageState>) -> &'static str {
    match state {
        None => "",
        Some(MessageState::Sent) => " …",
        Some(MessageState::OnRelay) => " ✓",
        Some(MessageState::Delivered(_)) => " ✓✓",
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
    let client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let contact = client.contact(&id)?;
    let (group, name) = (contact.group().to_string(), contact.name);
    let mut entries: Vec<(u64, HistoryEntry)> = client
        .store
        .read(|tx| tx.tail(&history_log(&group), args.limit))?;
    // Copies from our other devices arrive after the fact: show the
    // conversation in the order it was written.
    entries.sort_by_key(|(_, e)| e.sent_at_ms);
    let me = client.settings()?.profile.name;
    let plain: Vec<HistoryEntry> = entries.iter().map(|(_, e)| e.clone()).collect();
    let states = client.message_states(&group, &plain)?;
    for (e, state) in plain.iter().zip(&states) {
        if args.json {
            let mut v = recv::message_json(&name, &me, e, None);
            state_json(&mut v, state.as_ref());
            json(&v);
        } else {
            let base = match e.dir {
                Direction::In => name.as_str(),
                Direction::Out => me.as_str(),
            };
            // A copy from another device of ours says so.
            let who = match &e.device {
                Some(d) => format!("{base} (via {d}){}", marker(state.as_ref())),
                None => format!("{base}{}", marker(state.as_ref())),
            };
            for l in recv::message_lines(&who, e) {
                line(&l);
            }
        }
    }
    Ok(())
}
