//! `tern rotate`: move connections to fresh queues now.

use super::exit::{fail, USAGE};
use super::output::note;
use super::{unlock, Cli};
use crate::client::Client;
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
    for r in rotate(&mut client, args.contact.as_deref())? {
        for e in &r.warnings {
            note(&format!("warning: {e} (retried by the next tern recv)"));
        }
        note(&format!(
            "rotation of {}'s queues started; it completes as you both run `tern recv`",
            r.contact
        ));
    }
    Ok(())
}

/// A rotation started.
pub struct Started {
    pub contact: String,
    /// What could not be done yet (a relay unreachable): retried later.
    pub warnings: Vec<String>,
}

/// Starts moving `contact` (or, with `None`, every connected contact) to
/// fresh queues and keys; a usage error if there is none to rotate.
pub fn rotate(client: &mut Client, contact: Option<&str>) -> anyhow::Result<Vec<Started>> {
    let targets: Vec<(String, String)> = match contact {
        Some(name) => vec![(client.contact_id(name)?, name.to_string())],
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
    let mut out = Vec::new();
    for (id, name) in targets {
        let report = client.rotate(&id, true)?;
        out.push(Started {
            contact: name,
            warnings: report.errors.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(out)
}
