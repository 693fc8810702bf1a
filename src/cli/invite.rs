//! `tern invite`: make a one-time invitation (or a re-key invitation for an
//! existing contact) and show it.

use std::path::PathBuf;

use rand::rngs::OsRng;
use tern_wire::Command;

use super::exit::{fail, USAGE};
use super::output::{json, line, note, stdout_is_terminal};
use super::{files, qr, unlock, Cli};
use crate::client::model::{Contact, MAX_PENDING_REKEYS};
use crate::client::{new_contact_id, now, Client, MAX_RELAYS_PER_CONNECTION};
use crate::proto::connection::{ConnState, Connection, RecvQueue};
use crate::proto::hello::Channel;
use crate::proto::invitation::{Invitation, SendQueue};
use crate::proto::keys::Secret32;
use crate::proto::rekey::RekeyInvitation;

/// Make a one-time invitation: a QR code to show, a link or a PNG file
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern invite --name bob             # QR code on this terminal\n  tern invite --name bob --link      # a link to send\n  tern invite --png invite.png       # a picture to print or send\n  tern invite --rekey bob            # new keys and queues for Bob, shown in person"
)]
#[command(group(clap::ArgGroup::new("form").args(["qr", "link", "png"])))]
pub struct Args {
    /// What to call the contact [default: their own name, once they accept]
    #[arg(long, conflicts_with = "rekey")]
    pub name: Option<String>,
    /// Re-key an existing contact: replace the connection's keys and queues
    /// with ones exchanged through this invitation (useless to anyone else)
    #[arg(long, value_name = "CONTACT")]
    pub rekey: Option<String>,
    /// Show a QR code on the terminal (the default when stdout is a terminal
    /// and the code fits it; refused, before anything is made, when it
    /// cannot fit)
    #[arg(long)]
    pub qr: bool,
    /// Print the link (the default when stdout is not a terminal)
    #[arg(long)]
    pub link: bool,
    /// Write the QR code to a PNG file
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// Withdraw the invitation if nobody used it within DURATION (30m, 2h,
    /// 7d); see `tern invitations`
    #[arg(long, value_name = "DURATION", conflicts_with = "rekey")]
    pub expires: Option<String>,
    /// Replace the --png FILE if it exists
    #[arg(long, requires = "png")]
    pub force: bool,
    /// Print one JSON object (link, name, png) instead of the QR code or link
    #[arg(long, conflicts_with = "qr")]
    pub json: bool,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let expires = args
        .expires
        .as_deref()
        .map(|e| super::device::parse_expiry(e, std::time::Duration::from_secs(365 * 24 * 3600)))
        .transpose()?;
    // The picture's place is checked before anything is made on a relay.
    if let Some(path) = &args.png {
        if !args.force {
            files::refuse_existing(path)?;
        }
        files::create_parents(path)?;
    }
    let mut client = unlock::open(cli)?;
    let wants_qr =
        args.qr || (!args.link && !args.json && args.png.is_none() && stdout_is_terminal());
    let show_qr = wants_qr && qr_fits(&client, args)?;
    // Only a code shown on a screen can have been scanned in person.
    let channel = if show_qr {
        Channel::Screen
    } else {
        Channel::Shared
    };
    let (link, name, pending) = match &args.rekey {
        Some(contact) => (rekey(&mut client, contact, channel)?, contact.clone(), None),
        None => {
            let (link, contact) = new_contact(
                &mut client,
                args.name.as_deref(),
                channel,
                expires.map_or(0, |d| now() + d.as_millis() as u64),
            )?;
            (link, contact.name.clone(), Some(contact))
        }
    };
    if let Some(path) = &args.png {
        if let Err(e) = qr::png(&link, path) {
            // Nothing kept: no contact that a retry with the same name
            // would collide with, no queues left on the relays.
            if let Some(c) = &pending {
                delete_queues(&client, c.conn.recv_queues.iter());
            }
            return Err(e.context("nothing was kept"));
        }
    }
    if let Some(c) = &pending {
        client.add_contact(c)?;
    }
    if let Some(path) = &args.png {
        note(&format!(
            "invitation for {name} written to {}",
            path.display()
        ));
    }
    if args.json {
        json(&serde_json::json!({
            "link": link,
            "name": name,
            "rekey": args.rekey.is_some(),
            "png": args.png.as_ref().map(|p| p.display().to_string()),
        }));
    } else if show_qr {
        note(&format!(
            "one-time invitation for {name}: let them scan the code below with `tern accept --image`, \
             or give them this link:"
        ));
        line(&link);
        note(&format!(
            "then run `tern recv --wait 60` to complete the connection ({name})"
        ));
        // Last, so that the whole code stays on screen.
        qr::show(&link, "use --png FILE or --link")?;
        return Ok(());
    } else if args.link || args.png.is_none() {
        line(&link);
    }
    note(&format!(
        "then run `tern recv --wait 60` to complete the connection ({name})"
    ));
    Ok(())
}

/// Deletes our receiving queues from their relays (best effort: a relay
/// that is down keeps an unusable queue until its TTL).
fn delete_queues<'a>(client: &Client, queues: impl Iterator<Item = &'a RecvQueue>) {
    for q in queues {
        let delete = Command::Delete {
            recipient_id: q.recipient_id,
            if_empty: false,
        };
        if let Err(e) = client.net.call_for(
            &q.relay,
            Some(&q.recipient_id),
            &delete,
            Some(&q.signing_key()),
        ) {
            note(&format!("warning: could not delete a queue: {e}"));
        }
    }
}

/// Whether the QR code will fit this terminal, decided before anything is
/// made (the channel depends on it): from a stand-in link as long as the
/// real one will be, over the same relays. An explicit `--qr` that cannot
/// fit is refused; the default falls back to the link.
fn qr_fits(client: &Client, args: &Args) -> anyhow::Result<bool> {
    let Some(size) = qr::terminal_size() else {
        return Ok(true);
    };
    let queues: Vec<SendQueue> = client
        .settings()?
        .relay_addresses()
        .into_iter()
        .take(MAX_RELAYS_PER_CONNECTION)
        .map(|relay| SendQueue {
            relay,
            sender_id: [0; 16],
        })
        .collect();
    if queues.is_empty() {
        // Making the invitation will say there is no relay.
        return Ok(true);
    }
    let stand_in = Invitation {
        invitation_key: [0; 32],
        ratchet_key: [0; 32],
        queues,
    };
    let link = match args.rekey {
        Some(_) => RekeyInvitation::seal(&stand_in, &Secret32([0; 32]), &mut OsRng).to_link(),
        None => stand_in.to_link(),
    };
    match qr::terminal_fit(&link, qr::Palette::from_env(), Some(size))? {
        Ok(_) => Ok(true),
        Err(small) if args.qr => Err(fail(
            USAGE,
            format!(
                "{small}: enlarge the window (or use a smaller font), or use --png FILE or --link; \
                 no invitation was made"
            ),
        )),
        Err(small) => {
            note(&format!(
                "{small}: showing the link instead (for the code, enlarge the window and run \
                 `tern invite --qr`, or write a picture with --png FILE)"
            ));
            Ok(false)
        }
    }
}

/// A new invitation and the contact it will be, not yet saved.
pub(crate) fn new_contact(
    client: &mut Client,
    name: Option<&str>,
    channel: Channel,
    expires_ms: u64,
) -> anyhow::Result<(String, Contact)> {
    let id = new_contact_id();
    let (name, provisional) = match name {
        Some(n) => (super::contacts::valid_name("--name", n)?, false),
        None => (format!("invited-{}", &id[..6]), true),
    };
    // Before any queue is made on a relay.
    if client.contact_id(&name).is_ok() {
        return Err(crate::client::ClientError::NameTaken(name).into());
    }
    let queues = client.create_queues()?;
    let (conn, invitation) = Connection::invite(queues, channel, &mut OsRng);
    let mut contact = Contact::new(id, name, provisional, conn, now());
    contact.expires_ms = expires_ms;
    Ok((invitation.to_link(), contact))
}

fn rekey(client: &mut Client, name: &str, channel: Channel) -> anyhow::Result<String> {
    let id = client.contact_id(name)?;
    let contact = client.contact(&id)?;
    if contact.conn.state != ConnState::Connected {
        return Err(fail(
            USAGE,
            format!("{name} is not connected yet: nothing to re-key"),
        ));
    }
    if contact.old.is_some() {
        return Err(fail(
            USAGE,
            format!("a re-key with {name} is still completing: run `tern recv` first"),
        ));
    }
    let Some(secret) = contact.conn.connection_secret.clone() else {
        return Err(fail(USAGE, format!("{name} has no connection keys yet")));
    };
    let queues = client.create_queues()?;
    let (conn, invitation) = Connection::invite(queues, channel, &mut OsRng);
    let link = RekeyInvitation::seal(&invitation, &secret, &mut OsRng).to_link();
    // Earlier re-key invitations stay usable (whichever the contact accepts
    // first wins), up to a few; the oldest beyond that is void: delete its
    // queues (best effort).
    let dropped = client.update_contact(&id, |_, c| {
        c.rekeys.push(conn);
        let excess = c.rekeys.len().saturating_sub(MAX_PENDING_REKEYS);
        Ok(c.rekeys.drain(..excess).collect::<Vec<_>>())
    })?;
    delete_queues(client, dropped.iter().flat_map(|r| r.recv_queues.iter()));
    Ok(link)
}
