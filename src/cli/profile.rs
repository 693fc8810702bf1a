//! `tern profile`: show or change your profile.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::exit::{fail, USAGE};
use super::output::{json, line, note, text};
use super::{unlock, Cli};
use crate::client::model::{Settings, SETTINGS};
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
    let mut settings = client.settings()?;
    let changing =
        args.name.is_some() || args.status.is_some() || args.avatar.is_some() || args.no_avatar;
    if let Some(on) = args.receipts {
        // A setting of this device's, sent to nobody.
        settings.receipts = on;
        client
            .store
            .transaction(|tx| tx.put::<Settings>(SETTINGS, &settings))?;
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
        let mut p = settings.profile.clone();
        if let Some(n) = &args.name {
            p.name = super::contacts::valid_name("--name", n)?;
        }
        if let Some(s) = &args.status {
            if let Some(why) = status_problem(s, MAX_STATUS) {
                return Err(fail(USAGE, format!("--status: the status {why}")));
            }
            p.status = s.clone();
        }
        if let Some(path) = &args.avatar {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if bytes.len() > MAX_AVATAR {
                return Err(fail(
                    USAGE,
                    format!("the avatar is {} bytes; at most {MAX_AVATAR}", bytes.len()),
                ));
            }
            p.avatar = Some(bytes);
        }
        if args.no_avatar {
            p.avatar = None;
        }
        p.validate().map_err(|e| fail(USAGE, e.to_string()))?;
        settings.profile = p.clone();
        client
            .store
            .transaction(|tx| tx.put::<Settings>(SETTINGS, &settings))?;
        let reports = client.broadcast_profile(&p.to_bytes())?;
        let failed = reports.iter().filter(|r| r.waiting > 0).count();
        note(&format!(
            "profile updated; sent to {} contact(s){}",
            reports.len(),
            if failed > 0 {
                format!(", {failed} still to be delivered")
            } else {
                String::new()
            }
        ));
    }
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
