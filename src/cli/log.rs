//! `tern log`: the local history with a contact.

use super::output::{json, line};
use super::{recv, unlock, Cli};
use crate::client::model::{history_log, Direction, HistoryEntry};

/// Show the local history with a contact, oldest first
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  tern log bob --limit 20\n  tern log bob --json | jq -r .text")]
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
    for (_, e) in entries {
        if args.json {
            json(&recv::message_json(&name, &me, &e, None));
        } else {
            let base = match e.dir {
                Direction::In => name.as_str(),
                Direction::Out => me.as_str(),
            };
            // A copy from another device of ours says so.
            let who = match &e.device {
                Some(d) => format!("{base} (via {d})"),
                None => base.to_string(),
            };
            for l in recv::message_lines(&who, &e) {
                line(&l);
            }
        }
    }
    Ok(())
}
