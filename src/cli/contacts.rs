//! `tern contacts`: who you are connected with, and how securely.

use serde_json::json;

use super::output::{json, line, time};
use super::{unlock, Cli};
use crate::client::model::Contact;
use crate::proto::connection::{ConnState, SecurityLevel};

/// List contacts: state, security level, relays and last activity
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern contacts\n  tern contacts --json | jq -r 'select(.state==\"connected\") | .name'"
)]
pub struct Args {
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
}

pub fn state_word(s: ConnState) -> &'static str {
    match s {
        ConnState::Invited => "invited",
        ConnState::Joining | ConnState::Accepted => "pending",
        ConnState::Connected => "connected",
    }
}

pub fn security_word(s: SecurityLevel) -> &'static str {
    match s {
        SecurityLevel::Shared => "shared",
        SecurityLevel::InPerson => "in-person",
        SecurityLevel::Verified => "verified",
    }
}

fn security_note(s: SecurityLevel) -> &'static str {
    match s {
        SecurityLevel::Shared => "invitation sent as a link or file: verify the security code to rule out a swapped invitation",
        SecurityLevel::InPerson => "QR code scanned in person",
        SecurityLevel::Verified => "security code compared",
    }
}

fn relays(c: &Contact) -> (Vec<String>, Vec<String>) {
    (
        c.conn.recv_queues.iter().map(|q| q.relay.label()).collect(),
        c.conn.peer_queues.iter().map(|q| q.relay.label()).collect(),
    )
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let client = unlock::open(cli)?;
    let mut all: Vec<Contact> = client
        .contacts()?
        .into_iter()
        .filter(|c| !c.device)
        .collect();
    // One line per contact: its first connection (the one made by hand)
    // stands for the connections with its other devices.
    all.sort_by_key(|c| (c.name.clone(), c.introduced, c.created_ms));
    let mut contacts: Vec<(Contact, usize)> = Vec::new();
    for c in all {
        match contacts.iter_mut().find(|(f, _)| f.group() == c.group()) {
            Some((_, n)) => *n += 1,
            None => contacts.push((c, 1)),
        }
    }
    for (c, devices) in &contacts {
        let devices = *devices;
        let level = match c.code() {
            Some(r) if r.verified => SecurityLevel::Verified,
            _ if c.root_code.is_some() => SecurityLevel::Shared,
            _ => c.conn.security_level(),
        };
        let (ours, theirs) = relays(c);
        if args.json {
            json(&json!({
                "name": c.name,
                "state": state_word(c.conn.state),
                "security": security_word(level),
                "receive_relays": ours,
                "send_relays": theirs,
                "last_activity": time(c.last_activity_ms),
                "last_rotated": time(c.conn.last_rotated_ms),
                "rotating": c.conn.rotating(),
                "rekeying": c.old.is_some() || !c.rekeys.is_empty(),
                "pending_jobs": c.jobs.len() + c.outbox.len(),
                "devices": devices,
            }));
        } else {
            let devices = if devices > 1 {
                format!("  {devices} devices")
            } else {
                String::new()
            };
            line(&format!(
                "{:<20} {:<10} {:<10} last {}  rotated {}{devices}  ({})",
                c.name,
                state_word(c.conn.state),
                security_word(level),
                time(c.last_activity_ms),
                time(c.conn.last_rotated_ms),
                security_note(level)
            ));
        }
    }
    if contacts.is_empty() && !args.json {
        super::output::note("no contacts yet: `tern invite` or `tern accept`");
    }
    Ok(())
}
