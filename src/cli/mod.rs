//! The command line: argument definitions (clap) and one module per
//! subcommand. Each `run` returns `anyhow::Result`; `main` maps errors to the
//! documented exit codes ([`exit`]).

pub mod accept;
pub mod contacts;
pub mod daemon;
pub mod device;
pub mod exit;
pub mod files;
pub mod forget;
pub mod generate;
pub mod init;
pub mod invitations;
pub mod invite;
pub mod jsonrpc;
pub mod key;
pub mod log;
pub mod output;
pub mod profile;
pub mod qr;
pub mod recv;
#[cfg(feature = "relay-server")]
pub mod relay;
pub mod relays;
pub mod rotate;
pub mod send;
pub mod transfers;
pub mod unlock;
pub mod verify;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const ABOUT: &str = "Federated end-to-end encrypted chat with no identifiers";

const LONG_ABOUT: &str = "\
tern connects people through one-time invitations (a QR code or a link) and \
carries their messages through relays that hold only padded ciphertext. \
There are no accounts, user names or phone numbers: every conversation uses \
fresh keys and queues of its own.";

const EXAMPLES: &str = "\
Examples:
  tern init --name Ada --relay 'tern://KEY@relay.example.org:5223'
  tern invite --name bob            # show a QR code to Bob
  tern accept 'TERN:…'              # Bob joins with the link
  tern recv --wait 30               # complete the handshake, read messages
  echo 'backup done' | tern send bob
  tern send bob --file photo.jpg    # files are saved by `tern recv`";

#[derive(Debug, Parser)]
#[command(name = "tern", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    /// Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern];
    /// `tern daemon` and `tern jsonrpc` take it more than once, to serve
    /// several profiles
    #[arg(long, global = true, env = "TERN_HOME", value_name = "DIR", action = clap::ArgAction::Append)]
    pub home: Vec<PathBuf>,

    /// Read the passphrase from the first line of FILE (for scripts; the
    /// TERN_PASSPHRASE variable works too)
    #[arg(long, global = true, env = "TERN_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,

    /// Unlock with an identity file written by `tern key export` instead of
    /// the passphrase (fast, for cron jobs)
    #[arg(long, global = true, env = "TERN_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// Connect to relays through this SOCKS5 proxy, such as Tor:
    /// socks5h://HOST:PORT resolves relay host names at the proxy (with
    /// --isolate, each queue gets credentials of its own, so Tor keeps
    /// them on separate circuits)
    #[arg(long, global = true, env = "TERN_PROXY", value_name = "URL", value_parser = parse_proxy)]
    pub proxy: Option<crate::net::Proxy>,
    /// Accept a new passphrase that the strength check (zxcvbn) finds
    /// easy to guess
    #[arg(long, global = true)]
    pub allow_weak_passphrase: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Init(init::Args),
    Invite(invite::Args),
    Invitations(invitations::Args),
    Accept(accept::Args),
    Send(send::Args),
    Recv(recv::Args),
    Contacts(contacts::Args),
    Verify(verify::Args),
    Profile(profile::Args),
    Log(log::Args),
    Files(transfers::Args),
    Forget(forget::Args),
    Relays(relays::Args),
    Rotate(rotate::Args),
    Key(key::Args),
    Device(device::Args),
    Daemon(daemon::Args),
    Jsonrpc(jsonrpc::Args),
    #[cfg(feature = "relay-server")]
    Relay(relay::Args),
    #[command(hide = true)]
    Generate(generate::Args),
}

fn parse_proxy(text: &str) -> Result<crate::net::Proxy, String> {
    crate::net::Proxy::parse(text)
}

/// The profile directory: --home, $TERN_HOME, or the XDG data directory.
pub fn home_dir(cli_home: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match cli_home {
        Some(h) => Ok(h.clone()),
        None => data_dir("tern"),
    }
}

/// `$XDG_DATA_HOME/NAME`, falling back to `~/.local/share/NAME`. With
/// neither variable set there is no sensible place (the current directory
/// would scatter profiles wherever a cron job happens to run): refused.
pub fn data_dir(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join(name));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share").join(name)),
        None => Err(exit::fail(
            exit::USAGE,
            format!(
                "neither HOME nor XDG_DATA_HOME is set, so there is no default place for the \
                 {name} directory: give it with --{} DIR (or set {})",
                if name == "tern" { "home" } else { "data" },
                if name == "tern" {
                    "TERN_HOME"
                } else {
                    "TERN_RELAY_DATA"
                }
            ),
        )),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init(a) => init::run(&cli, a),
        Command::Invite(a) => invite::run(&cli, a),
        Command::Invitations(a) => invitations::run(&cli, a),
        Command::Accept(a) => accept::run(&cli, a),
        Command::Send(a) => send::run(&cli, a),
        Command::Recv(a) => recv::run(&cli, a),
        Command::Contacts(a) => contacts::run(&cli, a),
        Command::Verify(a) => verify::run(&cli, a),
        Command::Profile(a) => profile::run(&cli, a),
        Command::Log(a) => log::run(&cli, a),
        Command::Files(a) => transfers::run(&cli, a),
        Command::Forget(a) => forget::run(&cli, a),
        Command::Relays(a) => relays::run(&cli, a),
        Command::Rotate(a) => rotate::run(&cli, a),
        Command::Key(a) => key::run(&cli, a),
        Command::Device(a) => device::run(&cli, a),
        Command::Daemon(a) => daemon::run(&cli, a),
        Command::Jsonrpc(a) => jsonrpc::run(&cli, a),
        #[cfg(feature = "relay-server")]
        Command::Relay(a) => relay::run(a),
        Command::Generate(a) => generate::run(a),
    }
}
