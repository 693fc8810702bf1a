//! `tern relays`: the relays you receive on.

use serde_json::json;
use tern_relay::address::RelayAddress;
use tern_relay::wire::{Command, Reply};

use super::exit::{fail, FAILURE, USAGE};
use super::output::{json, line, note};
use super::{unlock, Cli};
use crate::client::model::{Settings, SETTINGS};
use crate::proto::connection::ConnState;

/// List, add, remove or test your relays
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern relays\n  tern relays add 'tern://KEY@relay.example.org:5223'\n  tern relays test"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// One JSON object per line (list and test)
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List your relays (the default)
    List,
    /// Add a relay for new connections
    Add { address: String },
    /// Stop using a relay for new connections
    Remove { address: String },
    /// Check that each relay answers and holds the key its address names
    Test,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let mut settings = client.settings()?;
    match args.action.as_ref().unwrap_or(&Action::List) {
        Action::List => {
            for r in settings.relay_addresses() {
                if args.json {
                    json(
                        &json!({"address": r.without_access_key().to_string(), "access_key": r.access_key.is_some()}),
                    );
                } else {
                    line(&r.without_access_key().to_string());
                }
            }
        }
        Action::Add { address } => {
            let a: RelayAddress = address
                .parse()
                .map_err(|e| fail(USAGE, format!("{address}: {e}")))?;
            if settings.relay_addresses().iter().any(|b| b.same_relay(&a)) {
                return Err(fail(USAGE, "that relay is already in the list"));
            }
            settings.relays.push(a.to_string());
            client
                .store
                .transaction(|tx| tx.put::<Settings>(SETTINGS, &settings))?;
            note("relay added; new connections may use it");
        }
        Action::Remove { address } => {
            let a: RelayAddress = address
                .parse()
                .map_err(|e| fail(USAGE, format!("{address}: {e}")))?;
            let before = settings.relays.len();
            settings.relays.retain(|r| {
                r.parse::<RelayAddress>()
                    .map_or(true, |b| !b.same_relay(&a))
            });
            if settings.relays.len() == before {
                return Err(fail(USAGE, "that relay is not in the list"));
            }
            if settings.relays.is_empty() {
                return Err(fail(
                    USAGE,
                    "that is your only relay: add another one first (tern relays add)",
                ));
            }
            let affected: Vec<(String, String, bool)> = client
                .contacts()?
                .into_iter()
                .filter(|c| c.conn.all_recv_queues().any(|q| q.relay.same_relay(&a)))
                .map(|c| (c.id, c.name, c.conn.state == ConnState::Connected))
                .collect();
            client
                .store
                .transaction(|tx| tx.put::<Settings>(SETTINGS, &settings))?;
            note(&format!(
                "relay removed; {} connection(s) receive through it: moving them to your other relays",
                affected.len()
            ));
            for (id, name, connected) in affected {
                if !connected {
                    note(&format!(
                        "{name} is not connected yet: its invitation still uses that relay"
                    ));
                    continue;
                }
                match client.rotate(&id, false) {
                    Ok(_) => note(&format!(
                        "{name}: moving (completes as you both run `tern recv`)"
                    )),
                    Err(e) => note(&format!(
                        "{name}: could not start moving yet ({e}); `tern rotate {name}` retries"
                    )),
                }
            }
        }
        Action::Test => {
            let mut bad = 0;
            for r in settings.relay_addresses() {
                let result = client.net.call(&r, &Command::Info, None);
                let (ok, detail) = match &result {
                    Ok(Reply::Info(i)) => (
                        true,
                        format!(
                            "ok, version {}-{}, {}",
                            i.min_version,
                            i.max_version,
                            if i.open { "open" } else { "access key needed" }
                        ),
                    ),
                    Ok(other) => (false, format!("unexpected answer {other:?}")),
                    Err(e) => (false, e.to_string()),
                };
                bad += usize::from(!ok);
                if args.json {
                    json(
                        &json!({"address": r.without_access_key().to_string(), "ok": ok, "detail": detail}),
                    );
                } else {
                    line(&format!("{}  {detail}", r.label()));
                }
            }
            if bad > 0 {
                return Err(fail(FAILURE, format!("{bad} relay(s) failed the test")));
            }
        }
    }
    Ok(())
}
