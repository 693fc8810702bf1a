//! `tern device`: use one profile from several devices.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use super::exit::{fail, BAD_INVITATION, TRY_AGAIN, UNKNOWN_CONTACT, USAGE};
use super::output::{json, line, note, pad, stdout_is_terminal, text, time};
use super::{qr, unlock, Cli};
use crate::client::devices::default_device_name;
use crate::client::fetch::{Event, FetchOptions};
use crate::client::jobs::reached_a_relay;
use crate::client::model::{Contact, IndexEntry, Job, Settings, INDEX, SETTINGS};
use crate::client::{now, Client, ClientError};
use crate::proto::connection::ConnState;
use crate::proto::hello::{Channel, Profile};
use crate::proto::rekey::AnyInvitation;
use crate::store::{NewKey, Store};

/// Link, list and remove the devices that share this profile
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern device link                          # on the laptop: show a QR code\n  tern --home ~/.tern device join --image qr.png --name server   # on the server\n  tern recv                                 # on the laptop: send the new device contacts and history\n  tern device list\n  tern device remove server\n\nEvery device gets every message and sees what the others send. Contacts\nneed do nothing: their tern connects to the new device by itself."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: DeviceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Show a one-time device link (QR code or text) for a new device
    #[command(group(clap::ArgGroup::new("form").args(["qr", "link", "png"])))]
    Link {
        /// Name this device (default: its host name, or the name it has)
        #[arg(long)]
        name: Option<String>,
        /// Show a QR code on the terminal (the default on a terminal)
        #[arg(long)]
        qr: bool,
        /// Print the link as text
        #[arg(long)]
        link: bool,
        /// Write the QR code to a PNG file
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// Then wait up to SECS for the new device to join and answer
        /// (instead of running `tern recv` by hand)
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// On the new device: join a profile with a device link
    Join {
        /// The device link (`-` or nothing: read it from stdin)
        #[arg(value_name = "LINK", conflicts_with = "image")]
        link: Option<String>,
        /// Read the QR code from a picture (PNG or JPEG)
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// This device's name among your devices (default: its host name)
        #[arg(long)]
        name: Option<String>,
        /// For a new --home: keep the profile key unencrypted on disk
        #[arg(long)]
        no_passphrase: bool,
        /// A relay for this device's first queues (repeat), when the linking
        /// device's relays need an access key (tern://KEY:ACCESS@HOST:PORT);
        /// the profile's relay list replaces it once linked
        #[arg(long = "relay", value_name = "ADDR")]
        relays: Vec<String>,
        /// Then wait up to SECS for the profile, contacts and history
        /// (instead of running `tern recv` by hand)
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// List this profile's devices
    List {
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Cut a device off: it receives nothing new, even if lost or hostile
    Remove {
        /// The device's name (see `tern device list`)
        device: String,
    },
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    match &args.command {
        DeviceCommand::Link {
            name,
            qr,
            link,
            png,
            wait,
        } => run_link(cli, name.as_deref(), *qr, *link, png.as_ref(), *wait),
        DeviceCommand::Join {
            link,
            image,
            name,
            no_passphrase,
            relays,
            wait,
        } => run_join(
            cli,
            link.as_deref(),
            image.as_ref(),
            name.as_deref(),
            *no_passphrase,
            relays,
            *wait,
        ),
        DeviceCommand::List { json } => run_list(cli, *json),
        DeviceCommand::Remove { device } => run_remove(cli, device),
    }
}

fn valid_name(name: &str) -> anyhow::Result<String> {
    let n = name.trim().to_string();
    let p = Profile {
        name: n.clone(),
        ..Profile::default()
    };
    p.validate()
        .map_err(|e| fail(USAGE, format!("--name: {e}")))?;
    Ok(n)
}

fn set_device_name(client: &mut Client, name: &str) -> anyhow::Result<()> {
    update_settings(client, |s| s.device_name = name.to_string())
}

fn update_settings(client: &mut Client, f: impl FnOnce(&mut Settings)) -> anyhow::Result<()> {
    let mut s = client.settings()?;
    f(&mut s);
    client.store.transaction(|tx| tx.put(SETTINGS, &s))?;
    Ok(())
}

fn run_link(
    cli: &Cli,
    name: Option<&str>,
    qr_flag: bool,
    link_flag: bool,
    png: Option<&PathBuf>,
    wait: Option<u64>,
) -> anyhow::Result<()> {
    let name = name.map(valid_name).transpose()?;
    let mut client = unlock::open(cli)?;
    if let Some(n) = &name {
        set_device_name(&mut client, n)?;
    }
    let show_qr = qr_flag || (!link_flag && png.is_none() && stdout_is_terminal());
    let channel = if show_qr {
        Channel::Screen
    } else {
        Channel::Shared
    };
    let (link, id) = client.link_device(channel)?;
    if let Some(path) = png {
        qr::png(&link, path)?;
        note(&format!("device link written to {}", path.display()));
    }
    if show_qr {
        print!(
            "{}",
            qr::terminal(&link, std::env::var_os("NO_COLOR").is_none())?
        );
        note("one-time device link: scan it on the new device with `tern device join --image`, or use the link below");
        line(&link);
    } else if link_flag || png.is_none() {
        line(&link);
    }
    note(
        "this link gives the whole profile — contacts and history — to whoever uses it: \
         show it only to your own device",
    );
    let Some(secs) = wait else {
        note("then run `tern recv` here to send it everything");
        return Ok(());
    };
    // Linked once the new device has the profile and has sent back its
    // invitations for every contact and device (forwarded from here).
    let done = |c: &Contact| {
        c.conn.state == ConnState::Connected
            && !c.sync_on_connect
            && c.awaiting_offers == 0
            && c.jobs.is_empty()
    };
    if !wait_for(&mut client, &id, secs, done)? {
        return Err(fail(
            TRY_AGAIN,
            "the new device has not finished joining yet: run `tern recv` here to go on",
        ));
    }
    note("the new device is linked; contacts' tern meets it when they next run `tern recv`");
    Ok(())
}

/// Receives on connection `id` (only) until `done` holds or `secs` pass;
/// `false` on time-out.
fn wait_for(
    client: &mut Client,
    id: &str,
    secs: u64,
    done: impl Fn(&Contact) -> bool,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let opts = FetchOptions {
        contact_id: Some(id.to_string()),
        ..FetchOptions::default()
    };
    loop {
        client.fetch(&opts, &mut |e| match e {
            Event::Notice(n) => note(&n),
            Event::Warning(w) => note(&format!("warning: {w}")),
            Event::Connected { contact } => note(&format!("connected with device {contact}")),
            _ => {}
        })?;
        if done(&client.contact(id)?) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // Loopback or not, a relay answers a FETCH in milliseconds: polling
        // the one connection twice a second is cheap and needs no thread.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn run_join(
    cli: &Cli,
    link: Option<&str>,
    image: Option<&PathBuf>,
    name: Option<&str>,
    no_passphrase: bool,
    relays: &[String],
    wait: Option<u64>,
) -> anyhow::Result<()> {
    let mut given = Vec::new();
    for r in relays {
        let a: tern_relay::address::RelayAddress = r
            .parse()
            .map_err(|e| fail(USAGE, format!("--relay {r}: {e}")))?;
        given.push(a.to_string());
    }
    let (invitation, channel) = super::accept::read_any_invitation(link, image)?;
    let AnyInvitation::Device(invitation) = invitation else {
        return Err(fail(
            BAD_INVITATION,
            "this is a contact invitation, not a device link: use `tern accept`; nothing was changed",
        ));
    };
    let device_name = valid_name(&name.map_or_else(default_device_name, str::to_string))?;
    let home = unlock::home(cli)?;
    let mut client = if Store::exists(&home) {
        let client = unlock::open(cli)?;
        if client.index()?.iter().any(|e: &IndexEntry| !e.device) {
            return Err(fail(
                USAGE,
                format!(
                    "the profile in {} has contacts of its own: a device joins with an empty \
                     profile; use a new --home",
                    home.display()
                ),
            ));
        }
        client
    } else {
        let key = if no_passphrase {
            NewKey::Unprotected
        } else {
            NewKey::Passphrase(unlock::passphrase(
                cli,
                "New passphrase for this device: ",
                true,
            )?)
        };
        let mut store = Store::create(&home, key)?;
        // The linking device's relays until it sends its own list (with any
        // access keys) moments after the handshake.
        let relays: Vec<String> = if given.is_empty() {
            invitation
                .queues
                .iter()
                .map(|q| q.relay.to_string())
                .collect()
        } else {
            given.clone()
        };
        let settings = Settings {
            profile: Profile {
                name: device_name.clone(),
                ..Profile::default()
            },
            relays,
            isolate: false,
            rotate_days: 7,
            created_ms: now(),
            device_name: device_name.clone(),
        };
        store.transaction(|tx| {
            tx.put(SETTINGS, &settings)?;
            tx.put(INDEX, &Vec::<IndexEntry>::new())
        })?;
        drop(store);
        note(&format!("profile created in {}", home.display()));
        unlock::open(cli)?
    };
    set_device_name(&mut client, &device_name)?;
    if !given.is_empty() {
        update_settings(&mut client, |s| s.relays = given.clone())?;
    }
    // The same link joined before by a tern that was interrupted: go on
    // with that connection instead of making a second one, whose request
    // would leave the first stuck.
    let wanted: Vec<[u8; 16]> = invitation.queues.iter().map(|q| q.sender_id).collect();
    let earlier = client.devices()?.into_iter().find(|d| {
        d.conn.state == ConnState::Joining
            && d.conn
                .peer_queues
                .iter()
                .map(|q| q.sender_id)
                .eq(wanted.iter().copied())
    });
    let resumed = earlier.is_some();
    let (id, request_id) = match earlier {
        Some(d) => {
            let request = d.jobs.iter().find_map(|j| match j {
                Job::Deliver {
                    envelope_id,
                    raw: true,
                    ..
                } => Some(*envelope_id),
                _ => None,
            });
            // No request left to send: it went out the first time.
            (d.id, request.unwrap_or_default())
        }
        None => client.join_device(&invitation, channel)?,
    };
    let report = client.run_jobs(&id)?;
    if resumed && report.refused.contains(&request_id) {
        // Refused because our first try's copy used the queue's one slot
        // (most likely), or because another device took the link: only the
        // linking device can tell. Keep the connection; recv finishes it.
        note(
            "this link was answered before (by an earlier, interrupted try, or by someone else): \
             run `tern recv` to finish; if nothing comes, make a new link",
        );
    } else if report.refused.contains(&request_id) {
        client.remove_contact(&id)?;
        return Err(fail(
            BAD_INVITATION,
            "this device link was already used or withdrawn: make a new one with `tern device link`",
        ));
    }
    if !reached_a_relay(&client.contact(&id)?, &request_id) {
        return Err(fail(
            TRY_AGAIN,
            format!(
                "joined, but the request could not be sent yet ({}); `tern recv` retries it",
                report.describe()
            ),
        ));
    }
    let Some(secs) = wait else {
        note(&format!(
            "request sent as device {device_name}: run `tern recv` on the other device, then `tern recv` here \
             to receive the profile, contacts and history"
        ));
        return Ok(());
    };
    // The linking device's own announcement comes last in what it sends
    // (PROTOCOL.md §12.4): once it is here and our invitations are out,
    // this side is done.
    let done = |c: &Contact| {
        c.conn.state == ConnState::Connected
            && !c.announced.is_empty()
            && c.device_jobs.is_empty()
            && c.jobs.is_empty()
    };
    if !wait_for(&mut client, &id, secs, done)? {
        return Err(fail(
            TRY_AGAIN,
            "the other device has not answered yet: run `tern recv` (there, then here) to go on",
        ));
    }
    note(&format!(
        "linked as device {device_name}: profile, contacts and history received; each contact's tern \
         connects to this device when they next run `tern recv`"
    ));
    Ok(())
}

fn run_list(cli: &Cli, as_json: bool) -> anyhow::Result<()> {
    let client = unlock::open(cli)?;
    let settings = client.settings()?;
    let this = crate::client::devices::device_profile(&settings).name;
    if as_json {
        json(&json!({"name": this, "this_device": true, "state": "connected"}));
    } else {
        line(&format!("{} this device", pad(&text(&this), 20)));
    }
    let mut devices = client.devices()?;
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    for d in devices {
        let state = if d.removed {
            "removing"
        } else {
            match d.conn.state {
                ConnState::Invited => "link shown",
                ConnState::Joining | ConnState::Accepted => "linking",
                ConnState::Connected => "connected",
            }
        };
        if as_json {
            json(&json!({
                "name": d.name,
                "this_device": false,
                "state": state,
                "last_activity": time(d.last_activity_ms),
                "connections": d.announced.len(),
            }));
        } else {
            line(&format!(
                "{} {} last {}  {} connection(s) known",
                pad(&text(&d.name), 20),
                pad(state, 10),
                time(d.last_activity_ms),
                d.announced.len()
            ));
        }
    }
    Ok(())
}

fn run_remove(cli: &Cli, device: &str) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let id = client
        .device_id(device)
        .map_err(|e| fail(UNKNOWN_CONTACT, e.to_string()))?;
    let report = client.remove_device(&id).map_err(|e| match e {
        ClientError::Invalid(why) => fail(USAGE, why),
        other => other.into(),
    })?;
    note(&format!(
        "{device} removed: {} contact(s) told to drop it",
        report.contacts_told
    ));
    if report.queues_left > 0 {
        return Err(fail(
            TRY_AGAIN,
            format!(
                "{} of its queues could not be deleted yet (relay unreachable); \
                 `tern recv` keeps trying",
                report.queues_left
            ),
        ));
    }
    Ok(())
}
