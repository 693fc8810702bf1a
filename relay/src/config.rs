//! What an operator can tune, with defaults that suit a small public relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern_wire::command::MAX_ACCESS_KEY_LEN;

use crate::error::RelayError;
use crate::hooks::RelayHooks;
use crate::limits::Rate;

/// Default time a message waits for its recipient before it is dropped;
/// a secured queue unused for as long is deleted too.
pub const DEFAULT_TTL: Duration = Duration::from_secs(21 * 24 * 3600);
/// Default number of undelivered messages a queue may hold.
pub const DEFAULT_MAX_PENDING: u32 = 1000;
/// Default cap on open connections. Every subscribed recipient holds one, so
/// this is the number of recipients that can wait at once; the process
/// needs about as many file descriptors (`ulimit -n`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_240;
/// Default cap on connections from one address (an IPv6 /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: u32 = 1000;
/// Default worker threads. Much of their time is spent waiting for the
/// database to commit, and every concurrent SEND can share one commit, so a
/// few more workers than cores improves throughput.
pub const DEFAULT_WORKERS: usize = 16;
/// Default size of the database beyond which new queues and messages are
/// refused (`Unavailable`) until deliveries make room.
pub const DEFAULT_MAX_DATA_BYTES: u64 = 4 << 30;
/// Default number of queues created without an access key, in all.
pub const DEFAULT_MAX_OPEN_QUEUES: u64 = 1_000_000;
/// Default number of queues one access key may have, unless its line in the
/// access key file says otherwise.
pub const DEFAULT_KEY_QUOTA: u64 = 100_000;
/// Days a queue that was never secured lives (an invitation nobody answered).
pub const DEFAULT_UNSECURED_DAYS: u32 = 1;
/// Queue creations per connection: a burst, then a steady rate.
pub const DEFAULT_CREATE_RATE_CONNECTION: Rate = Rate {
    burst: 128,
    per_minute: 60,
};
/// Queue creations per address (an IPv6 /64).
pub const DEFAULT_CREATE_RATE_ADDRESS: Rate = Rate {
    burst: 512,
    per_minute: 240,
};
/// Most subscriptions one session may hold.
pub const DEFAULT_MAX_SUBSCRIPTIONS: u16 = 4096;
/// Largest window one subscription may ask for.
pub const DEFAULT_MAX_WINDOW: u16 = 64;
/// Most messages pushed and not yet acknowledged on one session, whatever
/// the windows: bounds what one session can make the relay buffer.
pub const DEFAULT_SESSION_PUSH_BUDGET: usize = 128;

/// One access key and how many queues it may have.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub key: String,
    pub max_queues: u64,
}

impl AccessKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            max_queues: DEFAULT_KEY_QUOTA,
        }
    }

    /// Parses an access key file: one key a line, optionally followed by the
    /// number of queues it may have; `#` starts a comment.
    pub fn parse_file(text: &str) -> Result<Vec<AccessKey>, RelayError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let key = parts.next().unwrap_or_default();
            let max_queues = match parts.next() {
                None => DEFAULT_KEY_QUOTA,
                Some(m) => m.parse().map_err(|_| {
                    RelayError::Config(format!(
                        "access key file, line {}: after the key comes the most queues it may have, a number",
                        n + 1
                    ))
                })?,
            };
            if parts.next().is_some() {
                return Err(RelayError::Config(format!(
                    "access key file, line {}: a line holds a key and at most one number",
                    n + 1
                )));
            }
            keys.push(AccessKey {
                key: key.to_string(),
                max_queues,
            });
        }
        Ok(keys)
    }
}

/// Everything `Server::bind` needs. Build it with [`ServeConfig::new`] and
/// adjust the public fields.
#[derive(Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Holds `identity.key` (the relay's secret key) and the queue database
    /// (SQLite). Unused with [`database_url`](Self::database_url).
    pub data_dir: PathBuf,
    /// A PostgreSQL connection string (`postgres://USER:PASSWORD@HOST/DB`):
    /// the queues and the identity key are kept there instead of in
    /// `data_dir`, and any number of relays given the same one serve as one
    /// relay. It holds a password: never logged.
    pub database_url: Option<String>,
    /// When not empty, creating a queue needs one of these keys; sending
    /// never does. The first is the one printed in the relay's address.
    pub access_keys: Vec<AccessKey>,
    /// The host (and port) clients reach the relay at, when it is not the
    /// address the relay listens on (behind NAT, a front, or 0.0.0.0).
    pub public_address: Option<String>,
    /// Behind a trusted front: the header it puts the client's address in
    /// (`X-Forwarded-For`), so that per-address limits count clients, not
    /// the front. Never logged or stored.
    pub forwarded_header: Option<String>,
    /// Undelivered messages older than this are dropped (hour granularity);
    /// secured queues unused for as long are deleted.
    pub ttl: Duration,
    /// Undelivered messages per queue; a SEND beyond it gets `QueueFull`.
    pub max_pending: u32,
    /// Open connections beyond this are answered 503 and closed.
    pub max_connections: usize,
    /// Connections from one address beyond this are answered 503.
    pub max_connections_per_address: u32,
    /// Threads that run handshakes and execute commands.
    pub workers: usize,
    /// Beyond this database size, new queues and messages are refused.
    pub max_data_bytes: u64,
    /// Most queues created without an access key.
    pub max_open_queues: u64,
    /// Days a never-secured queue lives (0: for ever).
    pub unsecured_days: u32,
    pub create_rate_connection: Rate,
    pub create_rate_address: Rate,
    pub max_subscriptions: u16,
    pub max_window: u16,
    pub session_push_budget: usize,
    /// A session that holds no subscription and sends nothing is closed
    /// after this.
    pub idle_timeout: Duration,
    /// A session with subscriptions that sends nothing (not even a ping) is
    /// closed after this.
    pub subscribed_idle_timeout: Duration,
    /// An HTTP request head, and the session handshake after it, must
    /// arrive within this time.
    pub request_timeout: Duration,
    /// Output must be taken by the client within this time.
    pub write_timeout: Duration,
    /// On shutdown, connections still busy after this are dropped.
    pub shutdown_timeout: Duration,
    /// How often expired messages and queues are deleted from disk (they are
    /// never delivered once expired, whatever this is).
    pub purge_interval: Duration,
    /// Adversarial test instrument (see [`crate::hooks`]): makes the relay
    /// misbehave as the hooks say. `None` (the default, and always so for
    /// `tern relay serve`) costs nothing and changes nothing.
    pub hooks: Option<Arc<dyn RelayHooks>>,
}

// Access keys are credentials: keep them out of debug output and logs.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("access_keys", &self.access_keys.len())
            .field("public_address", &self.public_address)
            .field("ttl", &self.ttl)
            .field("max_pending", &self.max_pending)
            .field("max_connections", &self.max_connections)
            .field("workers", &self.workers)
            .field("max_data_bytes", &self.max_data_bytes)
            .field("hooks", &self.hooks.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl ServeConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            database_url: None,
            access_keys: Vec::new(),
            public_address: None,
            forwarded_header: None,
            ttl: DEFAULT_TTL,
            max_pending: DEFAULT_MAX_PENDING,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            workers: DEFAULT_WORKERS,
            max_data_bytes: DEFAULT_MAX_DATA_BYTES,
            max_open_queues: DEFAULT_MAX_OPEN_QUEUES,
            unsecured_days: DEFAULT_UNSECURED_DAYS,
            create_rate_connection: DEFAULT_CREATE_RATE_CONNECTION,
            create_rate_address: DEFAULT_CREATE_RATE_ADDRESS,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_window: DEFAULT_MAX_WINDOW,
            session_push_budget: DEFAULT_SESSION_PUSH_BUDGET,
            idle_timeout: Duration::from_secs(60),
            subscribed_idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(10),
            purge_interval: Duration::from_secs(600),
            hooks: None,
        }
    }

    /// The key printed in the relay's address, if it needs one.
    pub fn address_key(&self) -> Option<String> {
        self.access_keys.first().map(|k| k.key.clone())
    }

    /// Refuses settings the protocol cannot express or the relay cannot honour.
    pub fn validate(&self) -> Result<(), RelayError> {
        let bad = |m: &str| Err(RelayError::Config(m.to_string()));
        for k in &self.access_keys {
            let ok = !k.key.is_empty()
                && k.key.len() <= MAX_ACCESS_KEY_LEN
                && k.key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return bad("an access key must be 1 to 64 characters of A-Z a-z 0-9 _ -");
            }
        }
        if self.ttl < Duration::from_secs(3600) || self.ttl.as_secs() > u64::from(u32::MAX) {
            return bad("the message TTL must be between 1 hour and about 136 years");
        }
        if self.max_pending == 0 {
            return bad("max pending messages per queue must be at least 1");
        }
        if self.max_connections == 0 || self.max_connections > (u32::MAX as usize) {
            return bad("max connections must be at least 1");
        }
        if self.max_connections_per_address == 0 {
            return bad("max connections per address must be at least 1");
        }
        if self.workers == 0 || self.workers > 1024 {
            return bad("workers must be between 1 and 1024");
        }
        if self.max_window == 0 || self.max_subscriptions == 0 || self.session_push_budget == 0 {
            return bad("subscription limits must be at least 1");
        }
        if self.create_rate_connection.burst == 0 || self.create_rate_address.burst == 0 {
            return bad("queue creation rates must allow at least one");
        }
        if let Some(p) = &self.public_address {
            crate::server::public_host(p)?;
        }
        if let Some(url) = &self.database_url {
            // The parser's message never repeats the string, which may hold
            // a password.
            match crate::store::check_database_url(url) {
                Ok(()) => {}
                Err(crate::store::StoreError::Config(m)) => return Err(RelayError::Config(m)),
                Err(e) => {
                    return Err(RelayError::Config(format!(
                        "the database connection string is not one PostgreSQL accepts ({e}); \
                         give postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                    )))
                }
            }
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (name, d, max) in [
            ("idle timeout", self.idle_timeout, DAY),
            ("subscribed idle timeout", self.subscribed_idle_timeout, DAY),
            ("request timeout", self.request_timeout, DAY),
            ("write timeout", self.write_timeout, DAY),
            ("shutdown timeout", self.shutdown_timeout, DAY),
            ("purge interval", self.purge_interval, 30 * DAY),
        ] {
            if d.is_zero() && name != "shutdown timeout" {
                return Err(RelayError::Config(format!("the {name} must be above zero")));
            }
            if d > max {
                return Err(RelayError::Config(format!(
                    "the {name} must be at most {} hours",
                    max.as_secs() / 3600
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_key_file() {
        let keys = AccessKey::parse_file("# ours\nalpha\n  beta 12 # a friend\n\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].max_queues, DEFAULT_KEY_QUOTA);
        assert_eq!((keys[1].key.as_str(), keys[1].max_queues), ("beta", 12));
        assert!(AccessKey::parse_file("alpha many").is_err());
        assert!(AccessKey::parse_file("alpha 1 2").is_err());
    }
}
