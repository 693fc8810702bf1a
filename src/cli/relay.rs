//! `tern relay`: run a relay, or print its address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tern_relay::config::{self, AccessKey, ServeConfig};
use tern_relay::limits::Rate;
use tern_relay::server::{load_address, load_database_address, shutdown_on_signals, Server};

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
    /// A file of access keys needed to create queues (sending never needs
    /// one): one key a line, optionally followed by the most queues it may
    /// have; the first key becomes part of the address you hand out
    #[arg(long, value_name = "FILE")]
    pub access_key_file: Option<PathBuf>,
    /// Address and port to listen on; the PORT environment variable, as set
    /// by container platforms, overrides the port
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:5223")]
    pub listen: SocketAddr,
    /// Keep the queues and the identity key in this PostgreSQL database
    /// (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under
    /// --data; every relay started with the same database serves as one
    /// relay. DATABASE_URL, as PaaS add-ons set it, is read when not given
    #[arg(long, value_name = "URL", env = "DATABASE_URL", hide_env_values = true)]
    pub store: Option<String>,
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
        /// Delete undelivered messages after this many days; a queue unused
        /// for as long is deleted too
        #[arg(long, value_name = "DAYS", default_value_t = 21)]
        ttl_days: u64,
        /// Most messages waiting in one queue; senders get "queue full" past it
        #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_PENDING)]
        max_pending: u32,
        /// Most simultaneous connections
        #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Most simultaneous connections from one address (an IPv6 /64)
        #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
        max_connections_per_address: u32,
        /// Beyond this database size, in MiB, new queues and messages are
        /// refused ("temporarily unavailable") until deliveries make room
        #[arg(long, value_name = "MIB", default_value_t = config::DEFAULT_MAX_DATA_BYTES >> 20)]
        max_data_mib: u64,
        /// Most queues created without an access key, in all
        #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_OPEN_QUEUES)]
        max_open_queues: u64,
        /// Days a queue that was never secured lives: an invitation must be
        /// answered within it (0: no limit of its own; like every queue it
        /// still goes once unused for --ttl-days)
        #[arg(long, value_name = "DAYS", default_value_t = config::DEFAULT_UNSECURED_DAYS)]
        unsecured_days: u32,
        /// The host clients reach this relay at, when it is not the listen
        /// address: HOST[:PORT] (behind NAT, on 0.0.0.0), or
        /// https://HOST[:PORT][/PATH] behind an HTTPS front; remembered in
        /// --data for `tern relay address`
        #[arg(long, value_name = "ADDR", env = "TERN_RELAY_PUBLIC_ADDRESS")]
        public_address: Option<String>,
        /// Behind a reverse proxy or PaaS router you trust: the header it
        /// puts the client's address in (X-Forwarded-For), so that the
        /// per-address limits count clients rather than the front
        #[arg(long, value_name = "HEADER", env = "TERN_RELAY_FORWARDED_HEADER")]
        forwarded_header: Option<String>,
        /// Threads that run handshakes and execute commands
        #[arg(long, value_name = "N", default_value_t = config::DEFAULT_WORKERS)]
        workers: usize,
        /// Queues one connection may create: BURST/PER_MINUTE
        #[arg(long, value_name = "RATE", value_parser = parse_rate, default_value = "128/60")]
        create_rate_per_connection: Rate,
        /// Queues one address (an IPv6 /64) may create: BURST/PER_MINUTE
        #[arg(long, value_name = "RATE", value_parser = parse_rate, default_value = "512/240")]
        create_rate_per_address: Rate,
    },
    /// Print the address of the relay in --data (or in the --store database)
    #[command(
        after_help = "Examples:\n  tern relay address --data /var/lib/tern-relay\n  tern relay address --store postgres://tern@db/tern --public-address relay.example.net"
    )]
    Address {
        #[command(flatten)]
        common: Common,
        /// With --store: the host clients reach the relay at, HOST[:PORT] or
        /// https://HOST[:PORT][/PATH] (a database remembers no address; a
        /// relay under --data remembers the one it printed)
        #[arg(long, value_name = "ADDR", env = "TERN_RELAY_PUBLIC_ADDRESS")]
        public_address: Option<String>,
    },
}

/// `BURST/PER_MINUTE`, as the creation rate flags take it.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad =
        || format!("{text:?} is not BURST/PER_MINUTE (two whole numbers, the burst at least 1)");
    let (b, m) = text.split_once('/').ok_or_else(bad)?;
    let burst: u32 = b.trim().parse().map_err(|_| bad())?;
    let per_minute: u32 = m.trim().parse().map_err(|_| bad())?;
    if burst == 0 {
        return Err(bad());
    }
    Ok(Rate { burst, per_minute })
}

fn read_access_keys(path: Option<&Path>) -> anyhow::Result<Vec<AccessKey>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the access key file {}", path.display()))?;
    let keys = AccessKey::parse_file(&raw)?;
    if keys.is_empty() {
        return Err(fail(
            USAGE,
            format!("the access key file {} holds no key", path.display()),
        ));
    }
    Ok(keys)
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
            max_connections,
            max_connections_per_address,
            max_data_mib,
            max_open_queues,
            unsecured_days,
            public_address,
            forwarded_header,
            workers,
            create_rate_per_connection,
            create_rate_per_address,
        } => {
            let mut cfg = ServeConfig::new(listen_addr(common)?, data_dir(common)?);
            cfg.database_url = common.store.clone();
            cfg.access_keys = read_access_keys(common.access_key_file.as_deref())?;
            cfg.ttl = Duration::from_secs(ttl_days.saturating_mul(86_400));
            cfg.max_pending = *max_pending;
            cfg.max_connections = *max_connections;
            cfg.max_connections_per_address = *max_connections_per_address;
            cfg.max_data_bytes = max_data_mib.saturating_mul(1 << 20);
            cfg.max_open_queues = *max_open_queues;
            cfg.unsecured_days = *unsecured_days;
            cfg.public_address = public_address.clone();
            cfg.forwarded_header = forwarded_header.clone();
            cfg.workers = *workers;
            cfg.create_rate_connection = *create_rate_per_connection;
            cfg.create_rate_address = *create_rate_per_address;
            let server = Server::bind(cfg)?;
            line(&server.address().to_string());
            shutdown_on_signals(server.shutdown_handle())?;
            server.run()?;
            Ok(())
        }
        Action::Address {
            common,
            public_address,
        } => {
            let access = read_access_keys(common.access_key_file.as_deref())?
                .into_iter()
                .next()
                .map(|k| k.key);
            let address = match &common.store {
                Some(url) => load_database_address(
                    url,
                    access,
                    listen_addr(common)?,
                    public_address.as_deref(),
                )?,
                None => load_address(&data_dir(common)?, access, listen_addr(common)?)?,
            };
            line(&address.to_string());
            Ok(())
        }
    }
}
