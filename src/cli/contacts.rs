//! `tern contacts`: who you are connected with, and how securely.

use serde_json::json;

use super::output::{json, line, time};
use super::{unlock, Cli};
use crate::client::devices::{connection_trust, group_trust, Trust};
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
    let records = client.contacts()?;
    let mut all: Vec<Contact> = records
        .iter()
        .filter(|c| !c.device && !c.removed)
        .cloned()
        .collect();
    // One line per contact: its first connection (the one made by hand)
    // stands for the connections with its other devices.
    all.sort_by_key(|c| (c.name.clone(), c.introduced, c.created_ms));
    let mut contacts: Vec<(Contact, usize)> = Vec::new();
    for c in all.clone() {
        match contacts.iter_mut().find(|(f, _)| f.group() == c.group()) {
            Some((_, n)) => *n += 1,
            None => contacts.push((c, 1)),
        }
    }
    for (c, devices) in &contacts {
        let devices = *devices;
        // Known only from this device's own connections (PROTOCOL.md §12.7):
        // the weakest of them, since what is sent goes to all.
        let members: Vec<&Contact> = all.iter().filter(|m| m.group() == c.group()).collect();
        let trust = group_trust(&records, &members);
        let (level, introduced_by) = match &trust {
            Trust::Level(l) => (*l, None),
            Trust::Introduced(d) => (SecurityLevel::Shared, Some(d.clone())),
        };
        let connections: Vec<serde_json::Value> = members
            .iter()
            .map(|m| {
                let (security, by) = match connection_trust(&records, m) {
                    Trust::Level(l) => (security_word(l), None),
                    Trust::Introduced(d) => ("introduced", Some(d)),
                };
                json!({
                    "state": state_word(m.conn.state),
                    "security": security,
                    "introduced_by_device": by,
                    "added_by_contact": m.added_via.is_some(),
                    "since": time(m.created_ms),
                })
            })
            .collect();
        let (ours, theirs) = relays(c);
        if args.json {
            json(&json!({
                "name": c.name,
                "state": state_word(c.conn.state),
                "security": if introduced_by.is_some() { "introduced" } else { security_word(level) },
                "introduced_by_device": introduced_by,
                "connections": connections,
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
                let newest = members.iter().map(|m| m.created_ms).max().unwrap_or(0);
                format!("  {devices} devices (newest since {})", time(newest))
            } else {
                String::new()
            };
            let (word, why) = match &introduced_by {
                Some(d) => (
                    "introduced",
                    format!(
                        "met through your device {d}, not verified here: compare security codes"
                    ),
                ),
                None => (security_word(level), security_note(level).to_string()),
            };
            line(&format!(
                "{:<20} {:<10} {:<10} last {}  rotated {}{devices}  ({why})",
                c.name,
                state_word(c.conn.state),
                word,
                time(c.last_activity_ms),
                time(c.conn.last_rotated_ms),
            ));
        }
    }
    if contacts.is_empty() && !args.json {
        super::output::note("no contacts yet: `tern invite` or `tern accept`");
    }
    Ok(())
}
