//! The tern relay server: blind, durable one-directional queues behind
//! forward-secret sessions over WebSocket. The wire protocol it speaks is the
//! `tern-wire` crate, shared with the client.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
mod event_loop;
pub mod handler;
pub mod hooks;
pub mod http;
mod identity;
mod jobs;
pub mod limits;
mod lock;
mod log;
mod page;
pub mod server;
pub mod store;
mod waiters;

pub use config::{AccessKey, ServeConfig};
pub use error::RelayError;
pub use server::{
    load_address, load_database_address, shutdown_on_signals, Server, ShutdownHandle,
};
pub use tern_wire::{RelayAddress, Transport};
