//! `tern device`: use one profile from several devices.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use super::exit::{fail, BAD_INVITATION, FAILURE, TRY_AGAIN, UNKNOWN_CONTACT, USAGE};
use super::output::{json, line, note, pad, stdin_is_terminal, stdout_is_terminal, text, time};
use super::{qr, unlock, Cli};
use crate::client::devices::default_device_name;
use crate::client::fetch::{Event, FetchOptions, Shown};
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
    after_help = "Examples:\n  tern device link --wait 300               # on the laptop: show a QR code and wait\n  tern --home ~/.tern device join --image qr.png --name server --wait 300   # on the server\n  tern device confirm                       # on the laptop, if `link` was not waiting\n  tern device list\n  tern device remove server\n\nA device link is good for one device, for 10 minutes (--expires). The new\ndevice gets the profile, contacts and history only while `tern device link`\nruns, or once you run `tern device confirm`: never from a `tern recv` alone.\nEvery device gets every message and sees what the others send. Contacts\nneed do nothing: their tern connects to the new device by itself."
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
        /// Then wait up to SECS for the new device to join and link it (without
        /// this, confirm the new device afterwards with `tern device confirm`);
        /// a link nobody answered meanwhile is withdrawn
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// How long the link stays usable (30s, 10m, 1h; at most 24h)
        #[arg(long, value_name = "DURATION", default_value = "10m")]
        expires: String,
    },
    /// Link the device that answered a device link shown without --wait
    Confirm {
        /// The link, as `tern device list` names it (needed if several wait)
        #[arg(value_name = "LINK")]
        link: Option<String>,
        /// Do not ask (needed when stdin is not a terminal)
        #[arg(long)]
        yes: bool,
        /// Then wait up to SECS for the new device to finish joining
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Withdraw a device link nobody should use any more
    Revoke {
        /// The link, as `tern device list` names it
        #[arg(value_name = "LINK")]
        link: String,
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
            expires,
        } => run_link(
            cli,
            name.as_deref(),
            (*qr, *link, png.as_ref()),
            *wait,
            expires,
        ),
        DeviceCommand::Confirm { link, yes, wait } => {
            run_confirm(cli, link.as_deref(), *yes, *wait)
        }
        DeviceCommand::Revoke { link } => run_revoke(cli, link),
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

/// An `--expires` value: a duration such as `30s`, `10m` or `2h`, more
/// than nothing and at most `max`.
pub fn parse_expiry(text: &str, max: Duration) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        fail(
            USAGE,
            format!("--expires {text}: {e} (say 30s, 10m, 2h, 7d)"),
        )
    })?;
    if d.is_zero() || d > max {
        return Err(fail(
            USAGE,
            format!(
                "--expires {text}: between 1s and {}",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// The longest a device link may stay usable.
const MAX_LINK_LIFE: Duration = Duration::from_secs(24 * 3600);

/// Linked once the new device has the profile and has sent back its
/// invitations for every contact and device (forwarded from here).
fn link_done(c: &Contact) -> bool {
    c.conn.state == ConnState::Connected
        && !c.sync_on_connect
        && c.awaiting_offers == 0
        && c.jobs.is_empty()
}

fn run_link(
    cli: &Cli,
    name: Option<&str>,
    (qr_flag, link_flag, png): (bool, bool, Option<&PathBuf>),
    wait: Option<u64>,
    expires: &str,
) -> anyhow::Result<()> {
    let name = name.map(valid_name).transpose()?;
    let life = parse_expiry(expires, MAX_LINK_LIFE)?;
    let mut client = unlock::open(cli)?;
    if let Some(e) = client.removed_error()? {
        return Err(e.into());
    }
    if let Some(n) = &name {
        set_device_name(&mut client, n)?;
    }
    let show_qr = qr_flag || (!link_flag && png.is_none() && stdout_is_terminal());
    let channel = if show_qr {
        Channel::Screen
    } else {
        Channel::Shared
    };
    let expires_ms = now() + life.as_millis() as u64;
    let (link, id) = client.link_device(channel, expires_ms)?;
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
    let link_name = client.contact(&id)?.name;
    note(&format!(
        "this link ({link_name}) gives the whole profile — contacts and history — to whoever \
         uses it: show it only to your own device; it expires at {}",
        time(expires_ms)
    ));
    let Some(secs) = wait else {
        note(
            "once the new device has joined, run `tern device confirm` here to link it \
             (a `tern recv` alone never does)",
        );
        return Ok(());
    };
    // This command is the user watching: it may complete the link.
    client.linking = Some(id.clone());
    let secs = secs.min(life.as_secs().max(1));
    if wait_for(&mut client, &id, secs, link_done)? {
        note("the new device is linked; contacts' tern meets it when they next run `tern recv`");
        return Ok(());
    }
    match client.contact(&id) {
        Ok(c) if c.conn.state == ConnState::Invited && !c.removed => {
            // Nobody answered while we waited: nobody may later.
            client.revoke_invitation(&id)?;
            Err(fail(
                FAILURE,
                format!(
                    "no device answered within {secs} s: the link is withdrawn; make a new one"
                ),
            ))
        }
        Ok(c) if !c.removed => Err(fail(
            TRY_AGAIN,
            "the new device has not finished joining yet: run `tern device confirm` here to go on",
        )),
        _ => Err(fail(
            FAILURE,
            "the link was withdrawn (see the warnings above); make a new one",
        )),
    }
}

/// The pending device link named `name`, or the only one.
fn pending_link(client: &Client, name: Option<&str>) -> anyhow::Result<Contact> {
    let pending: Vec<Contact> = client
        .devices()?
        .into_iter()
        .filter(Contact::is_pending_link)
        .collect();
    match name {
        Some(n) => pending.into_iter().find(|c| c.name == n).ok_or_else(|| {
            fail(
                UNKNOWN_CONTACT,
                format!("no device link named {n:?} is waiting: see `tern device list`"),
            )
        }),
        None => match pending.len() {
            0 => Err(fail(
                USAGE,
                "no device link is waiting: make one with `tern device link`",
            )),
            1 => Ok(pending.into_iter().next().expect("one")),
            _ => Err(fail(
                USAGE,
                format!(
                    "{} device links are waiting: name one ({})",
                    pending.len(),
                    pending
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

fn run_confirm(cli: &Cli, name: Option<&str>, yes: bool, wait: Option<u64>) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let link = pending_link(&client, name)?;
    // What has arrived for it (kept, not answered: nothing is confirmed yet).
    let opts = FetchOptions {
        contact_id: Some(link.id.clone()),
        ..FetchOptions::default()
    };
    client.fetch(&opts, &mut |e| match e {
        Event::Warning(w) => {
            note(&format!("warning: {w}"));
            Shown::Yes
        }
        // Messages are for `tern recv`: they stay in the inbox.
        Event::Message { .. } => Shown::Later,
        _ => Shown::Yes,
    })?;
    let Ok(link) = client.contact(&link.id) else {
        return Err(fail(
            FAILURE,
            "the link was withdrawn (see the warnings above); make a new one",
        ));
    };
    if link.removed {
        return Err(fail(
            FAILURE,
            "the link was withdrawn (see the warnings above); make a new one",
        ));
    }
    let answered = !link.held.is_empty() || link.conn.state != ConnState::Invited;
    if !answered {
        return Err(fail(
            TRY_AGAIN,
            format!(
                "no device has answered link {} yet: run `tern device join` on the new \
                 device first (the link expires at {})",
                link.name,
                time(link.expires_ms)
            ),
        ));
    }
    let who = link
        .held
        .first()
        .map(|h| h.name.clone())
        .or_else(|| link.conn.peer_profile.as_ref().map(|p| p.name.clone()))
        .unwrap_or_default();
    if !yes {
        if !stdin_is_terminal() {
            return Err(fail(
                USAGE,
                format!(
                    "a device calling itself {who:?} answered link {}: pass --yes to give it \
                     the profile, contacts and history; nothing was changed",
                    link.name
                ),
            ));
        }
        eprint!(
            "A device calling itself {who:?} answered link {}. Is it yours, and should it get \
             the whole profile, contacts and history? [y/N] ",
            link.name
        );
        let _ = std::io::Write::flush(&mut std::io::stderr());
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(fail(
                USAGE,
                format!(
                    "not confirmed; nothing was sent (withdraw the link with `tern device \
                     revoke {}`)",
                    link.name
                ),
            ));
        }
    }
    client.confirm_link(&link.id).map_err(|e| match e {
        ClientError::Invalid(why) => fail(FAILURE, why),
        other => other.into(),
    })?;
    let Some(secs) = wait else {
        note(&format!(
            "confirmed {who:?}: it gets the profile as you both run `tern recv` (or use --wait)"
        ));
        return Ok(());
    };
    if !wait_for(&mut client, &link.id, secs, link_done)? {
        return Err(fail(
            TRY_AGAIN,
            "the new device has not finished joining yet: run `tern recv` (there, then here) to go on",
        ));
    }
    note("the new device is linked; contacts' tern meets it when they next run `tern recv`");
    Ok(())
}

fn run_revoke(cli: &Cli, name: &str) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let link = pending_link(&client, Some(name))?;
    client.revoke_invitation(&link.id)?;
    note(&format!(
        "device link {name} withdrawn: nobody can use it any more"
    ));
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
        client.fetch(&opts, &mut |e| {
            match e {
                Event::Notice(n) => note(&n),
                Event::Warning(w) => note(&format!("warning: {w}")),
                Event::Connected { contact } => note(&format!("connected with device {contact}")),
                // Texts wait for the next `tern recv`.
                Event::Message { .. } => return Shown::Later,
                _ => {}
            }
            Shown::Yes
        })?;
        if done(&client.contact(id)?) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // Each round is a CHECK per queue on the pooled session (no new
        // handshake): polling the one connection twice a second is cheap.
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
        let a: tern_wire::address::RelayAddress = r
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
            profile_changed_on: None,
            removed: None,
            receipts: true,
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
    for d in devices_json(&client)? {
        if as_json {
            json(&d);
            continue;
        }
        let name = d["name"].as_str().unwrap_or_default();
        let state = d["state"].as_str().unwrap_or_default();
        let field = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        if d["this_device"] == true {
            if state == "removed" {
                line(&format!(
                    "{name:<20} this device: removed from the profile by {} at {}",
                    field("removed_by"),
                    field("removed_at")
                ));
            } else {
                line(&format!("{} this device", pad(&text(name), 20)));
            }
        } else if d["pending_link"] == true && state != "linking" {
            let what = match d["answered_by"].as_str() {
                Some(n) => format!(
                    "answered by a device calling itself {n:?}: `tern device confirm` links it"
                ),
                None => "nobody has answered yet".to_string(),
            };
            line(&format!(
                "{name:<20} {state:<10} expires {}  {what}; `tern device revoke {name}` withdraws it",
                d["expires"].as_str().unwrap_or("never"),
            ));
        } else {
            line(&format!(
                "{} {} last {}  {} connection(s) known",
                pad(&text(name), 20),
                pad(state, 10),
                field("last_activity"),
                d["connections"]
            ));
        }
    }
    Ok(())
}

/// This device, then the profile's other devices by name, each as `tern
/// device list --json` prints it.
pub fn devices_json(client: &Client) -> anyhow::Result<Vec<serde_json::Value>> {
    let settings = client.settings()?;
    let this = crate::client::devices::device_profile(&settings).name;
    let mut out = vec![match &settings.removed {
        Some(r) => json!({
            "name": this, "this_device": true, "state": "removed",
            "removed_by": r.by, "removed_at": time(r.at_ms),
        }),
        None => json!({"name": this, "this_device": true, "state": "connected"}),
    }];
    let mut devices = client.devices()?;
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    for d in devices {
        let state = if d.removed {
            "removing"
        } else if d.is_pending_link() && !d.link_confirmed {
            if d.held.is_empty() && d.conn.state == ConnState::Invited {
                "link shown"
            } else {
                "answered"
            }
        } else {
            match d.conn.state {
                ConnState::Invited => "link shown",
                ConnState::Joining | ConnState::Accepted => "linking",
                ConnState::Connected if d.sync_on_connect => "linking",
                ConnState::Connected => "connected",
            }
        };
        let answered_by = d.held.first().map(|h| h.name.clone());
        let introduced_by = d
            .introduced_by
            .as_ref()
            .and_then(|i| client.contact(i).ok())
            .map(|i| i.name);
        out.push(json!({
            "name": d.name,
            "this_device": false,
            "state": state,
            "last_activity": time(d.last_activity_ms),
            "connections": d.announced.len(),
            "pending_link": d.is_pending_link(),
            "expires": (d.is_pending_link() && d.expires_ms != 0).then(|| time(d.expires_ms)),
            "answered_by": answered_by,
            "introduced_by": introduced_by,
        }));
    }
    Ok(out)
}

/// What removing a device did.
pub struct Removed {
    /// It was a link nobody had used yet: withdrawn.
    pub withdrawn: bool,
    pub contacts_told: usize,
    pub devices_removed: Vec<String>,
    pub contacts_dropped: Vec<String>,
    /// Its queues that could not be deleted yet (retried).
    pub queues_left: usize,
}

/// Removes the device named `device` from the profile (a link not used
/// yet is withdrawn instead).
pub fn remove_device(client: &mut Client, device: &str) -> anyhow::Result<Removed> {
    let id = client
        .device_id(device)
        .map_err(|e| fail(UNKNOWN_CONTACT, e.to_string()))?;
    if client.contact(&id)?.is_pending_link() {
        // Not linked yet: removing it is withdrawing the link.
        client.revoke_invitation(&id)?;
        return Ok(Removed {
            withdrawn: true,
            contacts_told: 0,
            devices_removed: Vec::new(),
            contacts_dropped: Vec::new(),
            queues_left: 0,
        });
    }
    let report = client.remove_device(&id).map_err(|e| match e {
        ClientError::Invalid(why) => fail(USAGE, why),
        other => other.into(),
    })?;
    Ok(Removed {
        withdrawn: false,
        contacts_told: report.contacts_told,
        devices_removed: report.devices_removed.clone(),
        contacts_dropped: report.contacts_dropped.clone(),
        queues_left: report.queues_left,
    })
}

fn run_remove(cli: &Cli, device: &str) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let report = remove_device(&mut client, device)?;
    if report.withdrawn {
        note(&format!(
            "device link {device} withdrawn: nobody can use it any more"
        ));
        return Ok(());
    }
    note(&format!(
        "{device} removed: {} contact(s) told to drop it",
        report.contacts_told
    ));
    for d in &report.devices_removed {
        note(&format!(
            "device {d} removed with it: it was linked (or introduced) by {device}"
        ));
    }
    if !report.contacts_dropped.is_empty() {
        note(&format!(
            "dropped with it, as they rested on its word alone (met through {device}, not              verified here): {}; invite them again from here if you want them",
            report.contacts_dropped.join(", ")
        ));
    }
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
