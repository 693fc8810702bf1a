//! `tern log`: the local history with a contact.

use data_encoding::HEXLOWER;
use serde_json::json;

use super::output::{json, line, time};
use super::{unlock, Cli};
use crate::client::model::{history_log, Direction, HistoryEntry};

/// Show the local history with a contact, oldest first
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  tern log bob --limit 20\n  tern log bob --json | jq -r .text")]
pub struct Args {
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
    let group = client.contact(&id)?.group().to_string();
    let mut entries: Vec<(u64, HistoryEntry)> = client
        .store
        .read(|tx| tx.tail(&history_log(&group), args.limit))?;
    // Copies from our other devices arrive after the fact: show the
    // conversation in the order it was written.
    entries.sort_by_key(|(_, e)| e.sent_at_ms);
    let settings = client.settings()?;
    for (_, e) in entries {
        let name = match e.dir {
            Direction::In => args.contact.as_str(),
            Direction::Out => settings.profile.name.as_str(),
        };
        // A copy from another device of ours says so.
        let who = match &e.device {
            Some(d) => format!("{name} (via {d})"),
            None => name.to_string(),
        };
        if args.json {
            json(&json!({
                "contact": args.contact,
                "direction": e.dir,
                "from": name,
                "text": e.text,
                "id": HEXLOWER.encode(&e.id),
                "sent_at": time(e.sent_at_ms),
                "received_at": e.received_at_ms.map(time),
                "device": e.device,
            }));
        } else {
            line(&format!(
                "{}  {who}: {}",
                time(e.sent_at_ms),
                e.text.replace('\n', "\n    ")
            ));
        }
    }
    Ok(())
}
