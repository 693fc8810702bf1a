//! `tern invite`: make a one-time invitation and show it.

use std::path::PathBuf;

use rand::rngs::OsRng;

use super::output::{line, note, stdout_is_terminal};
use super::{qr, unlock, Cli};
use crate::client::model::Contact;
use crate::client::{new_contact_id, now};
use crate::proto::connection::Connection;
use crate::proto::hello::Channel;

/// Make a one-time invitation: a QR code to show, a link or a PNG file
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern invite --name bob             # QR code on this terminal\n  tern invite --name bob --link      # a link to send\n  tern invite --png invite.png       # a picture to print or send"
)]
#[command(group(clap::ArgGroup::new("form").args(["qr", "link", "png"])))]
pub struct Args {
    /// What to call the contact [default: their own name, once they accept]
    #[arg(long)]
    pub name: Option<String>,
    /// Show a QR code on the terminal (the default when stdout is a terminal)
    #[arg(long)]
    pub qr: bool,
    /// Print the link (the default when stdout is not a terminal)
    #[arg(long)]
    pub link: bool,
    /// Write the QR code to a PNG file
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let show_qr = args.qr || (!args.link && args.png.is_none() && stdout_is_terminal());
    // Only a code shown on a screen can have been scanned in person.
    let channel = if show_qr {
        Channel::Screen
    } else {
        Channel::Shared
    };
    let queues = client.create_queues()?;
    let (conn, invitation) = Connection::invite(queues, channel, &mut OsRng);
    let id = new_contact_id();
    let (name, provisional) = match &args.name {
        Some(n) => (n.trim().to_string(), false),
        None => (format!("invited-{}", &id[..6]), true),
    };
    if name.is_empty() {
        return Err(super::exit::fail(
            super::exit::USAGE,
            "--name must not be empty",
        ));
    }
    let t = now();
    client.add_contact(&Contact::new(id, name.clone(), provisional, conn, t))?;
    let link = invitation.to_link();
    if let Some(path) = &args.png {
        qr::png(&link, path)?;
        note(&format!(
            "invitation for {name} written to {}",
            path.display()
        ));
    }
    if show_qr {
        let art = qr::terminal(&link, std::env::var_os("NO_COLOR").is_none())?;
        print!("{art}");
        note(&format!(
            "one-time invitation for {name}: let them scan it with `tern accept --image`, or give them the link below"
        ));
        line(&link);
    } else if args.link || args.png.is_none() {
        line(&link);
    }
    note(&format!(
        "then run `tern recv --wait 60` to complete the connection (contact {name})"
    ));
    Ok(())
}
