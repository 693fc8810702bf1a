//! `tern accept`: join with someone's invitation.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use rand::rngs::OsRng;

use super::exit::{fail, BAD_INVITATION, TRY_AGAIN};
use super::output::{json, note, stdin_is_terminal};
use super::{qr, unlock, Cli};
use crate::client::jobs::{push_request, reached_a_relay};
use crate::client::model::Contact;
use crate::client::{new_contact_id, now};
use crate::client::{Client, ClientError};
use crate::proto::connection::ConnState;
use crate::proto::connection::Connection;
use crate::proto::hello::Channel;
use crate::proto::invitation::Invitation;
use crate::proto::rekey::{parse_link, AnyInvitation, RekeyInvitation};
use crate::proto::ProtoError;

/// Accept an invitation given as a link, on stdin, or as a picture of its QR code
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern accept 'TERN:AEB…'\n  tern accept --image photo.jpg --name ada\n  pbpaste | tern accept -"
)]
pub struct Args {
    /// The invitation link, or - to read it from stdin
    #[arg(value_name = "LINK", conflicts_with = "image")]
    pub link: Option<String>,
    /// A PNG or JPEG picture (photo or screenshot) of the QR code
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// What to call the contact [default: contact-XXXXXX until the
    /// connection completes, then the name they give themselves]
    #[arg(long)]
    pub name: Option<String>,
    /// Print one JSON object (contact, state) when the request is sent
    #[arg(long)]
    pub json: bool,
}

fn read_invitation(args: &Args) -> anyhow::Result<(AnyInvitation, Channel)> {
    read_any_invitation(args.link.as_deref(), args.image.as_ref())
}

/// An invitation of any kind from `--image FILE`, a link, or stdin (`-` or
/// no link, never from a terminal), with the channel it came through.
/// Shared with `tern device join`.
pub fn read_any_invitation(
    link: Option<&str>,
    image: Option<&PathBuf>,
) -> anyhow::Result<(AnyInvitation, Channel)> {
    if let Some(path) = image {
        let text = qr::decode_file(path)?;
        let inv = parse_link(&text).map_err(|e| {
            fail(
                BAD_INVITATION,
                format!(
                    "the QR code in {} is not a tern invitation: {e}",
                    path.display()
                ),
            )
        })?;
        // A picture of a QR code usually comes from a screen shown in person.
        return Ok((inv, Channel::Screen));
    }
    let text = match link {
        Some("-") | None => {
            if link.is_none() && stdin_is_terminal() {
                return Err(fail(
                    super::exit::USAGE,
                    "give the invitation link, --image FILE, or - to read stdin",
                ));
            }
            let mut s = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut s)
                .context("reading the invitation from stdin")?;
            s
        }
        Some(l) => l.to_string(),
    };
    let inv = parse_link(&text).map_err(|e| match e {
        ProtoError::LinkDamaged => fail(BAD_INVITATION, e.to_string()),
        e => fail(BAD_INVITATION, format!("not a usable invitation: {e}")),
    })?;
    Ok((inv, Channel::Shared))
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let (invitation, channel) = read_invitation(args)?;
    let mut client = unlock::open(cli)?;
    let out = accept_invitation(&mut client, invitation, channel, args.name.as_deref())?;
    if args.json {
        json(&out);
    }
    if out["rekey"] == false {
        note(&format!(
            "request sent to {}; the connection completes when they run `tern recv` — then run `tern recv` here",
            out["contact"].as_str().unwrap_or_default()
        ));
    }
    Ok(())
}

/// Joins with an invitation (or accepts a re-key invitation) and sends the
/// request; returns what `tern accept --json` prints (the daemon's `accept`
/// method too).
pub fn accept_invitation(
    client: &mut Client,
    invitation: AnyInvitation,
    channel: Channel,
    name: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let invitation = match invitation {
        AnyInvitation::Contact(i) => i,
        AnyInvitation::Rekey(r) => {
            let name = accept_rekey(client, &r, channel)?;
            return Ok(
                serde_json::json!({"type": "accepted", "contact": name, "rekey": true, "state": "rekeying"}),
            );
        }
        AnyInvitation::Device(_) => {
            return Err(fail(
                BAD_INVITATION,
                "this is a device link, for another device of your own profile: run \
                 `tern device join` with it on the new device (nothing was changed)",
            ))
        }
    };
    let id = new_contact_id();
    let (name, provisional) = match name {
        Some(n) => (super::contacts::valid_name("--name", n)?, false),
        None => (format!("contact-{}", &id[..6]), true),
    };
    // Before any queue is made on a relay.
    if client.contact_id(&name).is_ok() {
        return Err(ClientError::NameTaken(name).into());
    }
    let (conn, request, t) = join(client, &invitation, channel)?;
    let mut contact = Contact::new(id.clone(), name.clone(), provisional, conn, t);
    let request_id = push_request(&mut contact, request, t);
    client.add_contact(&contact)?;
    if !send_request(client, &id, &request_id, "invitation accepted")? {
        client.remove_contact(&id)?;
        return Err(fail(
            BAD_INVITATION,
            "this invitation was already used or withdrawn: ask for a new one; nothing was kept",
        ));
    }
    Ok(serde_json::json!({
        "type": "accepted",
        "contact": name,
        "rekey": false,
        "state": "pending",
        "provisional_name": provisional,
    }))
}

/// Creates our reply queues and the connection request for `invitation`.
fn join(
    client: &Client,
    invitation: &Invitation,
    channel: Channel,
) -> anyhow::Result<(Connection, Vec<u8>, u64)> {
    let settings = client.settings()?;
    let queues = client.create_queues()?;
    let t = now();
    let (conn, request) = Connection::accept(
        invitation,
        queues,
        &settings.profile,
        channel,
        t,
        &mut OsRng,
    )?;
    Ok((conn, request, t))
}

/// Uploads the request: `Ok(true)` when a relay took it, `Ok(false)` when
/// every queue refused it (the invitation is used up or withdrawn), exit 75
/// (work kept) when no relay could be reached.
fn send_request(
    client: &mut Client,
    id: &str,
    request_id: &[u8; 16],
    what: &str,
) -> anyhow::Result<bool> {
    let report = client.run_jobs(id)?;
    if report.refused.contains(request_id) {
        return Ok(false);
    }
    if !reached_a_relay(&client.contact(id)?, request_id) {
        return Err(fail(
            TRY_AGAIN,
            format!(
                "{what}, but the request could not be sent yet ({}); `tern recv` retries it",
                report.describe()
            ),
        ));
    }
    Ok(true)
}

/// A re-key invitation from an existing contact: a new handshake whose
/// connection replaces the current one once it completes.
/// Returns the contact's name.
fn accept_rekey(
    client: &mut Client,
    r: &RekeyInvitation,
    channel: Channel,
) -> anyhow::Result<String> {
    let contact = client
        .contacts()?
        .into_iter()
        .find(|c| {
            c.conn
                .connection_secret
                .as_ref()
                .is_some_and(|s| r.is_for(s))
        })
        .ok_or_else(|| {
            fail(
                BAD_INVITATION,
                "this re-key invitation is not for any of your contacts (or was already used)",
            )
        })?;
    if contact.conn.state != ConnState::Connected || contact.old.is_some() {
        return Err(fail(
            super::exit::USAGE,
            format!(
                "{}: a re-key is already completing; run `tern recv` first",
                contact.name
            ),
        ));
    }
    let secret = contact.conn.connection_secret.clone().expect("found by it");
    let invitation = r.open(&secret).map_err(|e| {
        fail(
            BAD_INVITATION,
            format!("the re-key invitation does not open: {e}"),
        )
    })?;
    let (conn, request, t) = join(client, &invitation, channel)?;
    let request_id = client.update_contact(&contact.id, |_, c| {
        c.replace_connection(conn);
        Ok(push_request(c, request, t))
    })?;
    if !send_request(client, &contact.id, &request_id, "re-key accepted")? {
        client.update_contact(&contact.id, |_, c| {
            c.restore_old_connection();
            Ok(())
        })?;
        return Err(fail(
            BAD_INVITATION,
            "this re-key invitation was withdrawn or already used: nothing changed; ask for a new one",
        ));
    }
    note(&format!(
        "re-keying {}: completes when they run `tern recv`, then run `tern recv` here",
        contact.name
    ));
    Ok(contact.name)
}
