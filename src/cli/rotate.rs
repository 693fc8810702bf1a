//! `tern rotate`: move connections to fresh queues now.

use super::exit::{fail, USAGE};
use super::output::note;
use super::{unlock, Cli};
use crate::proto::connection::ConnState;

/// Move connections to fresh queues and keys (both directions)
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern rotate bob\n  tern rotate --all\n\nThe move completes as both sides run `tern recv`; messages in flight arrive exactly once.\nConnections also rotate by themselves about every 7 days (tern init --rotate-days)."
)]
pub struct Args {
    /// The contact to rotate
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub contact: Option<String>,
    /// Every connected contact
    #[arg(long)]
    pub all: bool,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let targets: Vec<(String, String)> = match &args.contact {
        Some(name) => vec![(client.contact_id(name)?, name.clone())],
        None => client
            .contacts()?
            .into_iter()
            .filter(|c| c.conn.state == ConnState::Connected)
            .map(|c| (c.id, c.name))
            .collect(),
    };
    if targets.is_empty() {
        return Err(fail(USAGE, "no connected contacts to rotate"));
    }
    for (id, name) in targets {
        let report = client.rotate(&id, true)?;
        for e in &report.errors {
            note(&format!("warning: {e} (retried by the next tern recv)"));
        }
        note(&format!(
            "rotation of {name}'s queues started; it completes as you both run `tern recv`"
        ));
    }
    Ok(())
}
