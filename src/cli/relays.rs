//! `tern relays`: the relays you receive on.

use serde_json::json;
use tern_wire::address::RelayAddress;
use tern_wire::{Command, Reply};

use super::exit::{code_for, fail, FAILURE, USAGE};
use super::output::{json, line, note, text};
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
    /// Add a relay for new connections (after checking that it answers as
    /// the key in its address)
    Add {
        /// The relay's address, tern://KEY@HOST:PORT (with :ACCESS after
        /// KEY for a relay that needs an access key)
        address: String,
        /// Add it without asking it first (a relay that is not up yet)
        #[arg(long)]
        no_test: bool,
    },
    /// Stop using a relay for new connections; connections that receive
    /// through it move to your other relays
    Remove {
        /// The relay's address, as `tern relays` lists it
        address: String,
    },
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
        Action::Add { address, no_test } => {
            let a: RelayAddress = address
                .parse()
                .map_err(|e| fail(USAGE, format!("{address}: {e}")))?;
            if settings.relay_addresses().iter().any(|b| b.same_relay(&a)) {
                return Err(fail(USAGE, "that relay is already in the list"));
            }
            if !no_test {
                test_before_adding(&client, &a)?;
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
            note(&match affected.len() {
                0 => "relay removed; no connection receives through it".to_string(),
                n => format!(
                    "relay removed; {n} connection(s) receive through it: moving them to your other relays"
                ),
            });
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
                    line(&format!("{}  {}", r.label(), text(&detail)));
                }
            }
            if bad > 0 {
                return Err(fail(FAILURE, format!("{bad} relay(s) failed the test")));
            }
        }
    }
    Ok(())
}

/// `relays add` asks the relay for its INFO first: a wrong key, a closed
/// port or a relay that needs an access key the address lacks is found now,
/// not when the first invitation fails. Nothing is changed on failure;
/// exit 75 when the relay is unreachable (it may come up), 1 otherwise.
fn test_before_adding(client: &crate::client::Client, a: &RelayAddress) -> anyhow::Result<()> {
    let hint = "nothing was changed; check the address, or add it anyway with --no-test";
    match client.net.call(a, &Command::Info, None) {
        Ok(Reply::Info(i)) if !i.open && a.access_key.is_none() => Err(fail(
            USAGE,
            format!(
                "relay {} needs an access key to create queues: add it to the address \
                 (tern://KEY:ACCESS@HOST:PORT); {hint}",
                a.label()
            ),
        )),
        Ok(Reply::Info(_)) => Ok(()),
        Ok(other) => Err(fail(
            FAILURE,
            format!("relay {} answered INFO with {other:?}; {hint}", a.label()),
        )),
        Err(e) => {
            let e = anyhow::Error::from(e);
            let code = code_for(&e);
            Err(fail(code, format!("{e}; {hint}")))
        }
    }
}
