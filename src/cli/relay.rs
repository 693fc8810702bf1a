//! `tern relay`: run a relay, or print its address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tern_relay::config::ServeConfig;
use tern_relay::server::{load_address, shutdown_on_signals, Server};

use super::exit::{fail, USAGE};
use super::output::line;

/// Run a relay, or print the address users add with `tern init --relay`
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern relay serve --data /var/lib/tern-relay\n  tern relay address --data /var/lib/tern-relay"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Where the relay keeps its identity key and queues
    /// [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]
    #[arg(long, value_name = "DIR", env = "TERN_RELAY_DATA")]
    pub data: Option<PathBuf>,
    /// A file holding the access key needed to create queues (sending never
    /// needs it); it becomes part of the address you hand out
    #[arg(long, value_name = "FILE")]
    pub access_key_file: Option<PathBuf>,
    /// Address and port to listen on; the PORT environment variable, as set
    /// by container platforms, overrides the port
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:5223")]
    pub listen: SocketAddr,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Serve until SIGTERM or SIGINT; prints the relay's address on the first line of stdout
    #[command(
        after_help = "Examples:\n  tern relay serve --data /var/lib/tern-relay\n  tern relay serve --listen 127.0.0.1:0 --data ./relay   # any free port\n  PORT=8080 tern relay serve                             # on a platform that sets PORT"
    )]
    Serve {
        #[command(flatten)]
        common: Common,
        /// Delete undelivered messages after this many days
        #[arg(long, value_name = "DAYS", default_value_t = 21)]
        ttl_days: u64,
        /// Most messages waiting in one queue; senders get "queue full" past it
        #[arg(long, value_name = "N", default_value_t = tern_relay::config::DEFAULT_MAX_PENDING)]
        max_pending: u32,
        /// Longest long-poll a client may ask for, in seconds
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        max_wait: u64,
        /// Most simultaneous connections
        #[arg(long, value_name = "N", default_value_t = tern_relay::config::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
    /// Print the address of the relay in --data
    #[command(after_help = "Example:\n  tern relay address --data /var/lib/tern-relay")]
    Address {
        #[command(flatten)]
        common: Common,
    },
}

fn read_access_key(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the access key file {}", path.display()))?;
    let key = raw.trim().to_string();
    Ok(Some(key))
}

fn listen_addr(common: &Common) -> anyhow::Result<SocketAddr> {
    let mut addr = common.listen;
    if let Ok(port) = std::env::var("PORT") {
        let p: u16 = port
            .trim()
            .parse()
            .map_err(|_| fail(USAGE, format!("PORT={port} is not a port number")))?;
        addr.set_port(p);
    }
    Ok(addr)
}

fn data_dir(common: &Common) -> anyhow::Result<PathBuf> {
    match &common.data {
        Some(d) => Ok(d.clone()),
        None => super::data_dir("tern-relay"),
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    match &args.action {
        Action::Serve {
            common,
            ttl_days,
            max_pending,
            max_wait,
            max_connections,
        } => {
            let mut cfg = ServeConfig::new(listen_addr(common)?, data_dir(common)?);
            cfg.access_key = read_access_key(common.access_key_file.as_deref())?;
            cfg.ttl = Duration::from_secs(ttl_days.saturating_mul(86_400));
            cfg.max_pending = *max_pending;
            cfg.max_wait = Duration::from_secs(*max_wait);
            cfg.max_connections = *max_connections;
            let server = Server::bind(cfg)?;
            line(&server.address().to_string());
            shutdown_on_signals(server.shutdown_handle())?;
            server.run()?;
            Ok(())
        }
        Action::Address { common } => {
            let access = read_access_key(common.access_key_file.as_deref())?;
            line(&load_address(&data_dir(common)?, access, listen_addr(common)?)?.to_string());
            Ok(())
        }
    }
}
