//! `tern contacts`: who you are connected with, and how securely; what
//! each contact calls themselves; renaming.

use std::path::PathBuf;

use serde_json::json;

use super::exit::{fail, USAGE};
use super::output::{json, line, note, pad, text, time};
use super::{files, unlock, Cli};
use crate::client::devices::{connection_trust, group_trust, Trust};
use crate::client::model::Contact;
use crate::client::{Client, ClientError};
use crate::proto::connection::{ConnState, SecurityLevel};
use crate::proto::hello::{Profile, MAX_NAME};
use crate::proto::text::name_problem;

/// List contacts: state, security level, post-quantum protection, relays and last activity
#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  tern contacts\n  tern contacts --long\n  tern contacts ada                       # one contact, with the profile they sent\n  tern contacts show ada --save-avatar ada.png\n  tern contacts rename contact-86b24c ada\n  tern contacts --json | jq -r 'select(.state==\"connected\") | .name'"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Show only this contact, in the long form
    #[arg(value_name = "CONTACT")]
    pub contact: Option<String>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Several lines per contact: the name, status and avatar they sent,
    /// relays, rotation
    #[arg(long)]
    pub long: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List every contact (the default)
    List {
        #[command(flatten)]
        show: ShowArgs,
    },
    /// One contact in the long form; optionally save the avatar they sent
    Show {
        /// The contact's name
        contact: String,
        #[command(flatten)]
        show: ShowArgs,
        /// Write the contact's avatar (PNG or JPEG) to FILE
        #[arg(long, value_name = "FILE")]
        save_avatar: Option<PathBuf>,
        /// Replace FILE if it exists
        #[arg(long, requires = "save_avatar")]
        force: bool,
    },
    /// Give a contact another name (only here: contacts never see it)
    Rename {
        /// The contact's current name
        contact: String,
        /// The new name (1 to 64 bytes, no control or format characters)
        new_name: String,
    },
    /// Show, or turn on or off, the delivery receipts this device sends a
    /// contact (on by default; `tern profile --receipts off` turns them off
    /// for every contact). Off: that contact never sees "delivered"
    Receipts {
        /// The contact's name
        contact: String,
        /// on or off; without it, show the setting
        #[arg(value_parser = parse_on_off)]
        setting: Option<bool>,
    },
}

/// `on`/`off` (also `yes`/`no`, `true`/`false`) for settings.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn receipts(client: &mut Client, name: &str, setting: Option<bool>) -> anyhow::Result<()> {
    let id = client.contact_id(name)?;
    if let Some(on) = setting {
        client.set_contact_receipts(&id, on)?;
    }
    let on = client.contact_receipts(&id)?;
    let profile = client.settings()?.receipts;
    let shown = client.contact(&id)?.name;
    line(&format!(
        "receipts to {}: {}{}",
        text(&shown),
        if on { "on" } else { "off" },
        if on && !profile {
            " (but off for the whole profile: `tern profile --receipts on`)"
        } else {
            ""
        }
    ));
    Ok(())
}

/// A contact's state as shown: its connection's, or "gone" once the contact
/// deleted the connection (its queues refuse everything we send).
pub fn contact_state(c: &Contact) -> &'static str {
    if c.peer_gone {
        "gone"
    } else {
        state_word(c.conn.state)
    }
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

pub(crate) fn relays(c: &Contact) -> (Vec<String>, Vec<String>) {
    (
        c.conn.recv_queues.iter().map(|q| q.relay.label()).collect(),
        c.conn.peer_queues.iter().map(|q| q.relay.label()).collect(),
    )
}

/// A contact as listed: its first connection (the one made by hand)
/// stands for the connections with its other devices.
struct Listed {
    contact: Contact,
    devices: usize,
    /// The profile the contact sent, from whichever connection has one.
    profile: Option<Profile>,
    /// How far the group can be trusted: the weakest of this device's own
    /// connections with it (what is sent goes to all; PROTOCOL.md §12.7).
    trust: Trust,
    /// Each connection of the group, as JSON.
    connections: Vec<serde_json::Value>,
    /// When the newest connection of the group was made.
    newest_ms: u64,
    /// Every connection of the group has the hybrid (ML-KEM) handshake and
    /// ratchet: what is sent to the contact goes to all of them.
    post_quantum: bool,
}

fn listed(client: &Client) -> anyhow::Result<Vec<Listed>> {
    let records = client.contacts()?;
    let mut all: Vec<Contact> = records
        .iter()
        .filter(|c| !c.device && !c.removed)
        .cloned()
        .collect();
    all.sort_by_key(|c| (c.name.clone(), c.introduced, c.created_ms));
    let mut out: Vec<Listed> = Vec::new();
    for c in &all {
        match out.iter_mut().find(|l| l.contact.group() == c.group()) {
            Some(l) => {
                l.devices += 1;
                if l.profile.is_none() {
                    l.profile = c.conn.peer_profile.clone();
                }
            }
            None => out.push(Listed {
                profile: c.conn.peer_profile.clone(),
                contact: c.clone(),
                devices: 1,
                trust: Trust::Level(SecurityLevel::Shared),
                connections: Vec::new(),
                newest_ms: 0,
                post_quantum: false,
            }),
        }
    }
    for l in &mut out {
        let members: Vec<&Contact> = all
            .iter()
            .filter(|m| m.group() == l.contact.group())
            .collect();
        l.trust = group_trust(&records, &members);
        l.newest_ms = members.iter().map(|m| m.created_ms).max().unwrap_or(0);
        l.post_quantum = members.iter().all(|m| m.conn.post_quantum());
        l.connections = members
            .iter()
            .map(|m| {
                let (security, by) = match connection_trust(&records, m) {
                    Trust::Level(lv) => (security_word(lv), None),
                    Trust::Introduced(d) => ("introduced", Some(d)),
                };
                json!({
                    // What delivery states call this device of the contact.
                    "device": m.device_label(),
                    "state": state_word(m.conn.state),
                    "security": security,
                    "introduced_by_device": by,
                    "added_by_contact": m.added_via.is_some(),
                    "post_quantum": m.conn.post_quantum(),
                    "since": time(m.created_ms),
                })
            })
            .collect();
    }
    Ok(out)
}

/// The security word and its explanation for a listed contact.
fn security(l: &Listed) -> (&'static str, String) {
    match &l.trust {
        Trust::Introduced(d) => (
            "introduced",
            format!("met through your device {d}, not verified here: compare security codes"),
        ),
        Trust::Level(lv) => (security_word(*lv), security_note(*lv).to_string()),
    }
}

fn pq_word(post_quantum: bool) -> &'static str {
    if post_quantum {
        "post-quantum"
    } else {
        "classical"
    }
}

fn rotated(c: &Contact) -> Option<String> {
    (c.conn.last_rotated_ms != 0).then(|| time(c.conn.last_rotated_ms))
}

/// PNG or JPEG, from the first bytes (validated on receipt).
fn avatar_type(a: &[u8]) -> &'static str {
    if a.starts_with(b"\x89PNG") {
        "png"
    } else {
        "jpeg"
    }
}

/// Every contact as `tern contacts --json` prints them (the daemon's
/// `contacts` method too).
pub fn contacts_json(client: &Client) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(listed(client)?.iter().map(contact_json).collect())
}

fn contact_json(l: &Listed) -> serde_json::Value {
    let c = &l.contact;
    let (ours, theirs) = relays(c);
    let introduced_by = match &l.trust {
        Trust::Introduced(d) => Some(d.clone()),
        Trust::Level(_) => None,
    };
    json!({
        "name": c.name,
        "state": contact_state(c),
        "security": security(l).0,
        "introduced_by_device": introduced_by,
        "connections": l.connections,
        "receive_relays": ours,
        "send_relays": theirs,
        "last_activity": time(c.last_activity_ms),
        "last_rotated": rotated(c),
        "rotating": c.conn.rotating(),
        "rekeying": c.old.is_some() || !c.rekeys.is_empty(),
        "pending_jobs": c.jobs.len() + c.outbox.len(),
        "devices": l.devices,
        "newest_device_since": time(l.newest_ms),
        "post_quantum": l.post_quantum,
        "profile": l.profile.as_ref().map(|p| json!({
            "name": p.name,
            "status": p.status,
            "avatar_bytes": p.avatar.as_ref().map(Vec::len),
            "avatar_type": p.avatar.as_deref().map(avatar_type),
        })),
    })
}

/// Listing (and showing) through the daemon that serves `home`: no
/// unlock. `false` for what the daemon does not do (renaming, saving an
/// avatar): that works alone, as before.
fn via_daemon(
    daemon: &mut super::daemon::client::Connection,
    home: &std::path::Path,
    args: &Args,
) -> anyhow::Result<bool> {
    let (name, opts, long) = match (&args.action, &args.contact) {
        (
            Some(Action::Show {
                contact,
                show,
                save_avatar: None,
                ..
            }),
            _,
        ) => (Some(contact), show, true),
        (None, Some(name)) => (Some(name), &args.show, true),
        (Some(Action::List { show }), _) => (None, show, show.long),
        (None, None) => (None, &args.show, args.show.long),
        _ => return Ok(false),
    };
    let all = daemon
        .call("contacts", json!({"profile": home.display().to_string()}))
        .map_err(|e| e.error)?;
    let mut list: Vec<serde_json::Value> = all.as_array().cloned().unwrap_or_default();
    if let Some(n) = name {
        list.retain(|c| c["name"] == n.as_str());
        if list.is_empty() {
            return Err(ClientError::UnknownContact(n.clone()).into());
        }
    }
    show_json(&list, opts, long);
    if list.is_empty() && !opts.json {
        note("no contacts yet: `tern invite` or `tern accept`");
    }
    Ok(true)
}

/// The explanation of a security word of [`contact_json`].
fn security_why(c: &serde_json::Value) -> String {
    match c["security"].as_str().unwrap_or_default() {
        "introduced" => format!(
            "met through your device {}, not verified here: compare security codes",
            c["introduced_by_device"].as_str().unwrap_or_default()
        ),
        "in-person" => security_note(SecurityLevel::InPerson).to_string(),
        "verified" => security_note(SecurityLevel::Verified).to_string(),
        _ => security_note(SecurityLevel::Shared).to_string(),
    }
}

fn str_of<'a>(c: &'a serde_json::Value, k: &str) -> &'a str {
    c[k].as_str().unwrap_or_default()
}

/// One line per contact, from what [`contact_json`] says of it (so that
/// a list from the daemon prints the same).
fn print_short(c: &serde_json::Value) {
    let devices = c["devices"].as_u64().unwrap_or(1);
    let devices = if devices > 1 {
        format!(
            "  {devices} devices (newest since {})",
            str_of(c, "newest_device_since")
        )
    } else {
        String::new()
    };
    line(&format!(
        "{} {} {} {} last {}  rotated {}{devices}  ({})",
        pad(&text(str_of(c, "name")), 20),
        pad(str_of(c, "state"), 10),
        pad(str_of(c, "security"), 10),
        pad(pq_word(c["post_quantum"] == true), 12),
        str_of(c, "last_activity"),
        c["last_rotated"].as_str().unwrap_or("never"),
        security_why(c),
    ));
}

fn print_long(c: &serde_json::Value) {
    let name = str_of(c, "name");
    line(&text(name));
    let field = |k: &str, v: &str| line(&format!("  {} {v}", pad(k, 15)));
    let p = &c["profile"];
    if p.is_object() {
        field("their name:", &text(str_of(p, "name")));
        let status = if str_of(p, "status").is_empty() {
            "(none)".to_string()
        } else {
            // A status may span lines: shown on one, `\n` visible.
            text(str_of(p, "status")).into_owned()
        };
        field("status:", &status);
        let avatar = match p["avatar_bytes"].as_u64() {
            Some(n) => format!(
                "{n} bytes ({}; `tern contacts show {} --save-avatar FILE`)",
                str_of(p, "avatar_type"),
                text(name)
            ),
            None => "none".to_string(),
        };
        field("avatar:", &avatar);
    } else {
        field("their name:", "(no profile received yet)");
    }
    let list = |k: &str| {
        c[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    field("state:", str_of(c, "state"));
    field(
        "security:",
        &format!("{} ({})", str_of(c, "security"), security_why(c)),
    );
    field("protection:", pq_word(c["post_quantum"] == true));
    field("devices:", &c["devices"].to_string());
    field("receive via:", &list("receive_relays"));
    field("send via:", &list("send_relays"));
    field("last activity:", str_of(c, "last_activity"));
    field("rotated:", c["last_rotated"].as_str().unwrap_or("never"));
    let pending = c["pending_jobs"].as_u64().unwrap_or(0);
    if pending > 0 {
        field("pending:", &format!("{pending} job(s) waiting for a relay"));
    }
}

fn show(list: &[Listed], opts: &ShowArgs, long: bool) {
    let list: Vec<serde_json::Value> = list.iter().map(contact_json).collect();
    show_json(&list, opts, long);
}

/// Prints contacts as [`contact_json`] gives them (or the daemon does).
fn show_json(list: &[serde_json::Value], opts: &ShowArgs, long: bool) {
    for c in list {
        if opts.json {
            json(c);
        } else if long {
            print_long(c);
        } else {
            print_short(c);
        }
    }
}

fn one<'a>(client: &Client, list: &'a [Listed], name: &str) -> anyhow::Result<&'a Listed> {
    let id = client.contact_id(name)?;
    let group = client.contact(&id)?.group().to_string();
    list.iter()
        .find(|l| l.contact.group() == group)
        .ok_or_else(|| ClientError::UnknownContact(name.to_string()).into())
}

/// A name the user typed, checked as names from contacts are
/// (PROTOCOL.md §5.5), trimmed.
pub fn valid_name(what: &str, name: &str) -> anyhow::Result<String> {
    let n = name.trim();
    if let Some(why) = name_problem(n, MAX_NAME) {
        return Err(fail(USAGE, format!("{what}: the name {why}")));
    }
    Ok(n.to_string())
}

fn rename(client: &mut Client, old: &str, new: &str) -> anyhow::Result<()> {
    let new = valid_name("rename", new)?;
    let id = client.contact_id(old)?;
    client.update_contact(&id, |tx, c| {
        let free = Client::unique_name(tx, &new, &c.id).map_err(ClientError::Store)?;
        if free != new {
            return Err(ClientError::NameTaken(new.clone()));
        }
        Client::rename_in(tx, c, new.clone()).map_err(ClientError::Store)?;
        // A name given by hand is never replaced by the one they send.
        c.provisional_name = false;
        Ok(())
    })?;
    note(&format!("{old} is now called {new}"));
    Ok(())
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let home = unlock::home(cli)?;
    if let Some(mut daemon) = super::daemon::client::find(&home)? {
        if via_daemon(&mut daemon, &home, args)? {
            return Ok(());
        }
    }
    let mut client = unlock::open_at(cli, &home)?;
    if let Some(Action::Rename { contact, new_name }) = &args.action {
        return rename(&mut client, contact, new_name);
    }
    if let Some(Action::Receipts { contact, setting }) = &args.action {
        return receipts(&mut client, contact, *setting);
    }
    let list = listed(&client)?;
    match (&args.action, &args.contact) {
        (
            Some(Action::Show {
                contact,
                show: opts,
                save_avatar,
                force,
            }),
            _,
        ) => {
            let l = one(&client, &list, contact)?;
            if let Some(path) = save_avatar {
                let Some(a) = l.profile.as_ref().and_then(|p| p.avatar.as_ref()) else {
                    return Err(fail(USAGE, format!("{contact} has sent no avatar")));
                };
                files::write_private(path, a, *force)?;
                note(&format!(
                    "{}'s avatar ({}) written to {}",
                    l.contact.name,
                    avatar_type(a),
                    path.display()
                ));
                return Ok(());
            }
            show(std::slice::from_ref(l), opts, true);
        }
        (None, Some(name)) => {
            let l = one(&client, &list, name)?;
            show(std::slice::from_ref(l), &args.show, true);
        }
        (Some(Action::List { show: opts }), _) => show(&list, opts, opts.long),
        (None, None) => show(&list, &args.show, args.show.long),
        (Some(Action::Rename { .. } | Action::Receipts { .. }), _) => {
            unreachable!("handled above")
        }
    }
    if list.is_empty() && !args.show.json {
        note("no contacts yet: `tern invite` or `tern accept`");
    }
    Ok(())
}
