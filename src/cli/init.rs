//! `tern init`: create a profile.

use tern_wire::address::RelayAddress;
use tern_wire::{Command, Reply};

use super::exit::{fail, USAGE};
use super::output::note;
use super::{unlock, Cli};
use crate::client::model::{IndexEntry, Settings, INDEX, SETTINGS};
use crate::client::now;
use crate::net::RelayClient;
use crate::proto::hello::Profile;
use crate::store::{NewKey, Store};

/// Create a profile: display name, relays, and the passphrase that protects it
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  tern init --name Ada --relay 'tern://KEY@203.0.113.7:5223' --relay 'tern://KEY2@relay.example.org'"
)]
pub struct Args {
    /// Your display name, shown to contacts only (never sent to relays)
    #[arg(long)]
    pub name: String,

    /// A relay to receive messages on (repeat for redundancy; up to 3 are
    /// used per connection). Addresses look like tern://KEY@HOST:PORT
    #[arg(long = "relay", value_name = "ADDR", required = true)]
    pub relays: Vec<String>,

    /// Keep the profile key unencrypted on disk (no passphrase to type;
    /// anyone who can read the home directory can read the profile)
    #[arg(long)]
    pub no_passphrase: bool,

    /// Give every queue a relay session and TCP connection of its own (and,
    /// with --proxy, its own SOCKS credentials), so nothing on the wire
    /// links two queues on one relay
    #[arg(long)]
    pub isolate: bool,

    /// Move each connection to fresh queues about every DAYS days (0: only
    /// with `tern rotate`)
    #[arg(long, value_name = "DAYS", default_value_t = 7)]
    pub rotate_days: u32,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let home = unlock::home(cli)?;
    let profile = Profile {
        name: super::contacts::valid_name("--name", &args.name)?,
        ..Profile::default()
    };
    profile
        .validate()
        .map_err(|e| fail(USAGE, format!("--name: {e}")))?;
    let mut relays = Vec::new();
    for r in &args.relays {
        let a: RelayAddress = r
            .parse()
            .map_err(|e| fail(USAGE, format!("--relay {r}: {e}")))?;
        if !relays.iter().any(|b: &RelayAddress| b.same_relay(&a)) {
            relays.push(a);
        }
    }
    if Store::exists(&home) {
        return Err(fail(
            USAGE,
            format!(
                "a profile already exists in {}; use another --home",
                home.display()
            ),
        ));
    }
    let key = if args.no_passphrase {
        NewKey::Unprotected
    } else {
        NewKey::Passphrase(unlock::passphrase(cli, "New passphrase: ", true)?)
    };
    let mut store = Store::create(&home, key)?;
    let settings = Settings {
        profile,
        relays: relays.iter().map(ToString::to_string).collect(),
        isolate: args.isolate,
        rotate_days: args.rotate_days,
        created_ms: now(),
        device_name: String::new(),
        profile_changed_on: None,
        removed: None,
        receipts: true,
    };
    store.transaction(|tx| {
        tx.put(SETTINGS, &settings)?;
        tx.put(INDEX, &Vec::<IndexEntry>::new())?;
        Ok(())
    })?;
    note(&format!("profile created in {}", home.display()));
    check_relays(&relays, cli.proxy.clone());
    Ok(())
}

/// Warns about relays that do not answer; not fatal, they may come up later.
fn check_relays(relays: &[RelayAddress], proxy: Option<crate::net::Proxy>) {
    let net = RelayClient::with_proxy(false, proxy);
    for r in relays {
        match net.call(r, &Command::Info, None) {
            Ok(Reply::Info(info)) if !info.open && r.access_key.is_none() => note(&format!(
                "warning: relay {} needs an access key to create queues; add it to the address (tern://KEY:ACCESS@HOST:PORT)",
                r.label()
            )),
            Ok(_) => {}
            Err(e) => note(&format!("warning: {e}")),
        }
    }
}
