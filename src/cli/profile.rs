//! `tern profile`: show or change your profile.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::exit::{fail, USAGE};
use super::output::{json, line, note, text};
use super::{unlock, Cli};
use crate::client::model::{Settings, SETTINGS};
use crate::client::Client;
use crate::proto::hello::{MAX_AVATAR, MAX_STATUS};
use crate::proto::text::status_problem;

/// Show or change your profile; changes are sent to connected contacts
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern profile\n  tern profile --status 'on holiday until Monday'\n  tern profile --avatar me.png\n  tern profile --receipts off             # tell no contact what this device stored"
)]
pub struct Args {
    /// Your display name (1 to 64 bytes, no control or format characters)
    #[arg(long)]
    pub name: Option<String>,
    /// A status line shown to contacts (up to 512 bytes; may span lines)
    #[arg(long)]
    pub status: Option<String>,
    /// A PNG or JPEG of at most 11 KiB
    #[arg(long, value_name = "FILE")]
    pub avatar: Option<PathBuf>,
    /// Remove the avatar
    #[arg(long, conflicts_with = "avatar")]
    pub no_avatar: bool,
    /// Send delivery receipts from this device (on by default; a setting
    /// of each device): contacts see which of their messages it stored,
    /// never whether you read them. Off: no contact ever sees "delivered"
    /// from this device
    #[arg(long, value_name = "on|off", value_parser = super::contacts::parse_on_off)]
    pub receipts: Option<bool>,
    /// Print the profile as one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let changing =
        args.name.is_some() || args.status.is_some() || args.avatar.is_some() || args.no_avatar;
    if let Some(on) = args.receipts {
        // A setting of this device's, sent to nobody; written on the
        // settings as they are now (the daemon may write them meanwhile).
        let before = client.settings()?;
        client.store.transaction(|tx| {
            let mut current = tx
                .get::<Settings>(SETTINGS)?
                .unwrap_or_else(|| before.clone());
            current.receipts = on;
            tx.put::<Settings>(SETTINGS, &current)
        })?;
        note(&format!(
            "delivery receipts {}",
            if on {
                "on: contacts see which of their messages this device stored"
            } else {
                "off: no contact sees that this device stored their messages"
            }
        ));
    }
    if changing {
        let avatar = match (&args.avatar, args.no_avatar) {
            (Some(path), _) => Some(Some(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let sent = update(
            &mut client,
            args.name.as_deref(),
            args.status.as_deref(),
            avatar,
        )?;
        note(&format!(
            "profile updated; sent to {} contact(s){}",
            sent.contacts,
            if sent.waiting > 0 {
                format!(", {} still to be delivered", sent.waiting)
            } else {
                String::new()
            }
        ));
    }
    let settings = client.settings()?;
    let p = &settings.profile;
    if args.json {
        json(
            &json!({"name": p.name, "status": p.status, "avatar_bytes": p.avatar.as_ref().map(Vec::len), "receipts": settings.receipts}),
        );
    } else if !changing && args.receipts.is_none() {
        // Another device of ours can set these: escaped like a contact's.
        line(&format!("name:   {}", text(&p.name)));
        line(&format!("status: {}", text(&p.status)));
        line(&format!(
            "avatar: {}",
            p.avatar
                .as_ref()
                .map_or("none".to_string(), |a| format!("{} bytes", a.len()))
        ));
        line(&format!(
            "receipts: {}",
            if settings.receipts { "on" } else { "off" }
        ));
    }
    Ok(())
}

/// A profile change, as sent to the contacts.
pub struct Sent {
    pub contacts: usize,
    /// Contacts it could not be delivered to yet (sent later).
    pub waiting: usize,
}

/// Changes what is given (`avatar`: `Some(None)` removes it), checks the
/// result, stores it (one transaction) and sends it to every contact.
pub fn update(
    client: &mut Client,
    name: Option<&str>,
    status: Option<&str>,
    avatar: Option<Option<Vec<u8>>>,
) -> anyhow::Result<Sent> {
    let settings = client.settings()?;
    let mut p = settings.profile.clone();
    let avatar_given = avatar.is_some();
    if let Some(n) = name {
        p.name = super::contacts::valid_name("--name", n)?;
    }
    if let Some(s) = status {
        if let Some(why) = status_problem(s, MAX_STATUS) {
            return Err(fail(USAGE, format!("--status: the status {why}")));
        }
        p.status = s.to_string();
    }
    if let Some(a) = avatar {
        if let Some(bytes) = &a {
            if bytes.len() > MAX_AVATAR {
                return Err(fail(
                    USAGE,
                    format!("the avatar is {} bytes; at most {MAX_AVATAR}", bytes.len()),
                ));
            }
        }
        p.avatar = a;
    }
    p.validate().map_err(|e| fail(USAGE, e.to_string()))?;
    // Written as a change of these fields in one transaction that reads
    // the settings again: the daemon's receiving may write them meanwhile
    // (a device event), and that must not be undone.
    let changed = p.clone();
    let p = client.store.transaction(|tx| {
        let mut current = tx
            .get::<Settings>(SETTINGS)?
            .unwrap_or_else(|| settings.clone());
        if name.is_some() {
            current.profile.name = changed.name.clone();
        }
        if status.is_some() {
            current.profile.status = changed.status.clone();
        }
        if avatar_given {
            current.profile.avatar = changed.avatar.clone();
        }
        tx.put::<Settings>(SETTINGS, &current)?;
        Ok(current.profile)
    })?;
    let reports = client.broadcast_profile(&p.to_bytes())?;
    Ok(Sent {
        contacts: reports.len(),
        waiting: reports.iter().filter(|r| r.waiting > 0).count(),
    })
}
