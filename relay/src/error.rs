//! The relay server's errors, phrased for the operator who has to fix them.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("invalid relay configuration: {0}")]
    Config(String),
    #[error("cannot use the data directory {path}: {source}; check that it exists (or can be created) and is writable by this user")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("cannot read or write the relay identity {path}: {source}; check the permissions of the data directory")]
    Identity { path: PathBuf, source: io::Error },
    #[error("{path} is not a relay identity (it must be exactly 32 bytes); restore it from a backup, or move it away to start a new relay with a new address")]
    IdentityCorrupt { path: PathBuf },
    #[error("there is no relay identity at {path}; run `tern relay serve` once with this data directory to create it")]
    NoIdentity { path: PathBuf },
    #[error("another relay is already running with the data directory {path}; stop it, or give this one its own data directory")]
    Locked { path: PathBuf },
    #[error("the relay database failed: {0}; check free disk space and the permissions of the data directory")]
    Store(#[from] StoreError),
    #[error("the relay's PostgreSQL database failed: {0}; check the connection string (--store or DATABASE_URL), that the server is up, and that its role may create tables")]
    Database(StoreError),
    #[error("the relay's PostgreSQL database holds no relay identity yet; run `tern relay serve` once with this database to create it")]
    NoDatabaseIdentity,
    #[error("cannot listen on {addr}: {source}; choose another listen address or stop whatever is using it")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("the relay's event loop failed: {0}; restart the relay")]
    Io(#[from] io::Error),
}
