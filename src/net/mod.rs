//! Talking to relays: one sealed request, one sealed response.
//!
//! Each call seals a fresh request to the relay's pinned key, so nothing on
//! the network (or in an HTTPS front) can read it or answer in the relay's
//! name. A relay whose clock disagrees with ours answers `Stale` with its
//! own time; we remember the offset and retry once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_relay::address::RelayAddress;
use tern_relay::seal::{RequestSealer, SealError, BLOCK_LEN};
use tern_relay::wire::{Command, ErrorCode, Reply, Request, Response, WireError};
use thiserror::Error;

/// How long a request may take beyond any long-poll wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum NetError {
    #[error("relay {relay} is unreachable: {reason}")]
    Unreachable { relay: String, reason: String },
    #[error("relay {relay} answered HTTP {status}: is this a tern relay, and is its key in the address right?")]
    Http { relay: String, status: u16 },
    #[error("relay {relay} did not answer as the key in its address: wrong address, or something in between is tampering")]
    NotThatRelay { relay: String },
    #[error("relay {relay} sent a malformed answer: {source}")]
    Malformed {
        relay: String,
        #[source]
        source: WireError,
    },
    #[error("relay {relay}: {code}")]
    Refused { relay: String, code: ErrorCode },
}

impl NetError {
    /// Whether trying again later may succeed (the relay is down, busy, or full).
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Unreachable { .. } => true,
            NetError::Http { status, .. } => *status >= 500,
            NetError::Refused { code, .. } => code.is_transient() || *code == ErrorCode::Stale,
            _ => false,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            NetError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Milliseconds since the Unix epoch. `TERN_TEST_CLOCK_OFFSET_SECS` moves
/// tern's clock (for tests of time-driven behaviour such as automatic
/// rotation); relays' clocks are corrected for as usual.
pub fn now_ms() -> u64 {
    static OFFSET_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET_MS.get_or_init(|| {
        std::env::var("TERN_TEST_CLOCK_OFFSET_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1000))
    });
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(offset)
}

/// The HPKE context for one future request, from [`RelayClient::prepare`].
pub struct Prepared {
    relay_key: [u8; 32],
    sealer: RequestSealer,
}

/// A client for any number of relays.
pub struct RelayClient {
    shared: ureq::Agent,
    /// A fresh connection per request, so no TCP connection carries requests
    /// for two queues (`--isolate`).
    isolate: bool,
    /// Relay clock minus ours, per relay key, learned from `Stale` answers.
    offsets: Mutex<HashMap<[u8; 32], i64>>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .user_agent("tern")
        .build()
        .into()
}

impl RelayClient {
    pub fn new(isolate: bool) -> Self {
        Self {
            shared: agent(),
            isolate,
            offsets: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `command` (signed with `key` if given) and returns the relay's
    /// reply; relay errors come back as [`NetError::Refused`].
    pub fn call(
        &self,
        relay: &RelayAddress,
        command: &Command,
        key: Option<&SigningKey>,
    ) -> Result<Reply, NetError> {
        self.call_prepared(relay, command, key, None)
    }

    /// Sets up the sealing of a request to `relay` ahead of time: the two
    /// X25519 operations of an HPKE context, about half of a small request's
    /// client-side cost. A caller that knows its next request before it may
    /// send it (an ACK waiting for a commit) does this while it waits.
    /// `None` if the relay's key is not a valid X25519 key; `call` reports that.
    pub fn prepare(&self, relay: &RelayAddress) -> Option<Prepared> {
        let sealer = RequestSealer::new(&relay.key, &mut OsRng).ok()?;
        Some(Prepared {
            relay_key: relay.key,
            sealer,
        })
    }

    /// [`RelayClient::call`], sealing with `prepared` if it was made for
    /// this relay. Each context seals one request only: a retry after
    /// `Stale` sets up a new one.
    pub fn call_prepared(
        &self,
        relay: &RelayAddress,
        command: &Command,
        key: Option<&SigningKey>,
        mut prepared: Option<Prepared>,
    ) -> Result<Reply, NetError> {
        let wait = match command {
            Command::Fetch { wait_ms, .. } => Duration::from_millis(u64::from(*wait_ms)),
            _ => Duration::ZERO,
        };
        let mut retried = false;
        loop {
            let offset = self
                .offsets
                .lock()
                .map(|m| m.get(&relay.key).copied().unwrap_or(0))
                .unwrap_or(0);
            let time = now_ms().saturating_add_signed(offset);
            let sealer = prepared
                .take()
                .filter(|p| p.relay_key == relay.key)
                .map(|p| p.sealer);
            let resp = self.exchange(relay, command, key, time, wait, sealer)?;
            match resp.reply {
                Reply::Error(ErrorCode::Stale) if !retried => {
                    retried = true;
                    let skew = resp.time_ms as i64 - now_ms() as i64;
                    if let Ok(mut m) = self.offsets.lock() {
                        m.insert(relay.key, skew);
                    }
                }
                Reply::Error(code) => {
                    return Err(NetError::Refused {
                        relay: relay.label(),
                        code,
                    })
                }
                reply => return Ok(reply),
            }
        }
    }

    fn exchange(
        &self,
        relay: &RelayAddress,
        command: &Command,
        key: Option<&SigningKey>,
        time_ms: u64,
        wait: Duration,
        sealer: Option<RequestSealer>,
    ) -> Result<Response, NetError> {
        let label = relay.label();
        let sealer = match sealer {
            Some(s) => s,
            None => {
                RequestSealer::new(&relay.key, &mut OsRng).map_err(|_| NetError::NotThatRelay {
                    relay: label.clone(),
                })?
            }
        };
        let plaintext = Request::encode(command, time_ms, sealer.enc(), key);
        let (block, response_key) = sealer.seal(&plaintext).map_err(|e| match e {
            SealError::KeyAgreement => NetError::NotThatRelay {
                relay: label.clone(),
            },
            _ => unreachable_seal(),
        })?;
        let fresh;
        let agent = if self.isolate {
            fresh = agent();
            &fresh
        } else {
            &self.shared
        };
        let mut resp = agent
            .post(relay.endpoint())
            .config()
            .timeout_global(Some(REQUEST_TIMEOUT + wait))
            .build()
            .header("content-type", "application/octet-stream")
            .send(&block[..])
            .map_err(|e| NetError::Unreachable {
                relay: label.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(NetError::Http {
                relay: label,
                status,
            });
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(BLOCK_LEN as u64 + 1)
            .read_to_vec()
            .map_err(|e| NetError::Unreachable {
                relay: label.clone(),
                reason: e.to_string(),
            })?;
        let plaintext = response_key
            .open_response(&body)
            .map_err(|_| NetError::NotThatRelay {
                relay: label.clone(),
            })?;
        Response::decode(&plaintext).map_err(|source| NetError::Malformed {
            relay: label,
            source,
        })
    }
}

fn unreachable_seal() -> NetError {
    // `Request::encode` always yields exactly REQUEST_LEN bytes.
    unreachable!("request plaintext has the fixed length")
}
