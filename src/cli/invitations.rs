//! `tern invitations`: the invitations and device links nobody has used
//! yet, and withdrawing them.

use serde_json::json;

use super::exit::{fail, UNKNOWN_CONTACT};
use super::output::{json, line, note, time};
use super::{unlock, Cli};
use crate::client::model::Contact;
use crate::proto::connection::ConnState;

/// List the invitations and device links nobody has used yet, or withdraw one
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern invitations\n  tern invitations revoke invited-3f2a1c   # its queues are deleted: nobody can use it\n  tern invite --name bob --expires 2h     # withdrawn by itself if unused"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// One JSON object per line
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List them (the default)
    List,
    /// Withdraw one: delete its queues on the relays, so that nobody can use it
    Revoke {
        /// The name `tern invitations` shows
        name: String,
    },
}

fn pending(c: &Contact) -> bool {
    !c.removed && (c.is_pending_link() || (!c.device && c.conn.state == ConnState::Invited))
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let all: Vec<Contact> = client.contacts()?.into_iter().filter(pending).collect();
    match args.action.as_ref().unwrap_or(&Action::List) {
        Action::List => {
            for c in &all {
                let kind = if c.device {
                    "device link"
                } else {
                    "invitation"
                };
                let expires = (c.expires_ms != 0).then(|| time(c.expires_ms));
                if args.json {
                    json(&json!({
                        "name": c.name,
                        "kind": kind,
                        "created": time(c.created_ms),
                        "expires": expires,
                        "answered": !c.held.is_empty(),
                    }));
                } else {
                    line(&format!(
                        "{:<20} {:<12} made {}  expires {}",
                        c.name,
                        kind,
                        time(c.created_ms),
                        expires.as_deref().unwrap_or("never")
                    ));
                }
            }
            if all.is_empty() && !args.json {
                note("no invitation or device link is waiting");
            }
        }
        Action::Revoke { name } => {
            let Some(c) = all.iter().find(|c| &c.name == name) else {
                return Err(fail(
                    UNKNOWN_CONTACT,
                    format!("no pending invitation or device link named {name:?}: see `tern invitations`"),
                ));
            };
            client.revoke_invitation(&c.id)?;
            note(&format!(
                "{name} withdrawn: its queues are deleted, nobody can use it"
            ));
        }
    }
    Ok(())
}
