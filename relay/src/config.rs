//! What an operator can tune, with defaults that suit a small public relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::RelayError;
use crate::hooks::RelayHooks;
use crate::wire::MAX_ACCESS_KEY_LEN;

/// Default time a message waits for its recipient before it is dropped.
pub const DEFAULT_TTL: Duration = Duration::from_secs(21 * 24 * 3600);
/// Default number of undelivered messages a queue may hold.
pub const DEFAULT_MAX_PENDING: u32 = 1000;
/// Default cap on how long a FETCH may wait for a message.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);
/// Default cap on open connections. Every idle long-poll holds one, so this is
/// the number of recipients that can wait at once; the process needs about as
/// many file descriptors (`ulimit -n`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_240;
/// Default worker threads. Most of their time is spent waiting for the
/// database to commit, and every concurrent SEND can share one commit, so a
/// few more workers than cores improves throughput.
pub const DEFAULT_WORKERS: usize = 16;

/// Everything `Server::bind` needs. Build it with [`ServeConfig::new`] and
/// adjust the public fields.
#[derive(Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Holds `identity.key` (the relay's secret key) and the queue database.
    pub data_dir: PathBuf,
    /// When set, creating a queue needs this key; sending never does.
    pub access_key: Option<String>,
    /// Undelivered messages older than this are dropped (hour granularity).
    pub ttl: Duration,
    /// Undelivered messages per queue; a SEND beyond it gets `QueueFull`.
    pub max_pending: u32,
    /// Longest a FETCH may wait for a message (long poll).
    pub max_wait: Duration,
    /// Open connections beyond this are answered 503 and closed.
    pub max_connections: usize,
    /// Threads that open, check and execute requests.
    pub workers: usize,
    /// A keep-alive connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// A request must arrive completely within this time of its first byte.
    pub request_timeout: Duration,
    /// A response must be taken by the client within this time.
    pub write_timeout: Duration,
    /// On shutdown, connections still busy after this are dropped.
    pub shutdown_timeout: Duration,
    /// How often expired messages are deleted from disk (they are never
    /// delivered once expired, whatever this is).
    pub purge_interval: Duration,
    /// Adversarial test instrument (see [`crate::hooks`]): makes the relay
    /// misbehave as the hooks say. `None` (the default, and always so for
    /// `tern relay serve`) costs nothing and changes nothing.
    pub hooks: Option<Arc<dyn RelayHooks>>,
}

// The access key is a credential: keep it out of debug output and logs.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("ttl", &self.ttl)
            .field("max_pending", &self.max_pending)
            .field("max_wait", &self.max_wait)
            .field("max_connections", &self.max_connections)
            .field("workers", &self.workers)
            .field("idle_timeout", &self.idle_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("purge_interval", &self.purge_interval)
            .field("hooks", &self.hooks.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ServeConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            access_key: None,
            ttl: DEFAULT_TTL,
            max_pending: DEFAULT_MAX_PENDING,
            max_wait: DEFAULT_MAX_WAIT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            workers: DEFAULT_WORKERS,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(10),
            purge_interval: Duration::from_secs(600),
            hooks: None,
        }
    }

    /// Refuses settings the protocol cannot express or the relay cannot honour.
    pub fn validate(&self) -> Result<(), RelayError> {
        let bad = |m: &str| Err(RelayError::Config(m.to_string()));
        if let Some(k) = &self.access_key {
            let ok = !k.is_empty()
                && k.len() <= MAX_ACCESS_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return bad("the access key must be 1 to 64 characters of A-Z a-z 0-9 _ -");
            }
        }
        if self.ttl < Duration::from_secs(3600) || self.ttl.as_secs() > u64::from(u32::MAX) {
            return bad("the message TTL must be between 1 hour and about 136 years");
        }
        if self.max_pending == 0 {
            return bad("max pending messages per queue must be at least 1");
        }
        if self.max_wait.as_millis() > u128::from(u32::MAX) {
            return bad("the long-poll cap must be below 49 days");
        }
        if self.max_connections == 0 || self.max_connections > (u32::MAX as usize) {
            return bad("max connections must be at least 1");
        }
        if self.workers == 0 || self.workers > 1024 {
            return bad("workers must be between 1 and 1024");
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (name, d, max) in [
            ("idle timeout", self.idle_timeout, DAY),
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
