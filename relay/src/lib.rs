//! The tern relay and the wire protocol it shares with clients.
//!
//! The sans-IO part ([`address`], [`codec`], [`seal`], [`wire`]) turns bytes into
//! bytes and is used by both sides; the server part holds queues durably and
//! answers HTTP.
#![forbid(unsafe_code)]

pub mod address;
pub mod codec;
pub mod seal;
pub mod wire;

// The server: `tern relay serve`.
pub mod config;
pub mod error;
mod event_loop;
pub mod handler;
pub mod hooks;
pub mod http;
mod identity;
mod lock;
mod log;
mod page;
mod replay;
pub mod server;
pub mod store;
mod waiters;

pub use address::{RelayAddress, Transport};
pub use config::ServeConfig;
pub use error::RelayError;
pub use server::{load_address, shutdown_on_signals, Server, ShutdownHandle};
