//! Exit codes. They are part of tern's interface: scripts branch on them,
//! and the man page lists them. Never renumber.

use tern_relay::wire::ErrorCode;

use crate::client::ClientError;
use crate::net::NetError;
use crate::proto::ProtoError;
use crate::store::StoreError;

pub const OK: u8 = 0;
/// Any error not listed below.
pub const FAILURE: u8 = 1;
/// Bad arguments (also what clap uses).
pub const USAGE: u8 = 2;
/// The contact named does not exist.
pub const UNKNOWN_CONTACT: u8 = 3;
/// `tern verify`: the security codes differ.
pub const CODE_MISMATCH: u8 = 4;
/// Wrong passphrase, or no way to ask for one (stdin is not a terminal).
pub const LOCKED: u8 = 5;
/// Not a usable invitation: bad link, no QR code in the image, wrong version.
pub const BAD_INVITATION: u8 = 6;
/// No profile in the home directory: run `tern init`.
pub const NO_PROFILE: u8 = 7;
/// Temporary failure: relays unreachable or full. Work is kept and retried
/// by the next `tern send` or `tern recv` (EX_TEMPFAIL).
pub const TRY_AGAIN: u8 = 75;

/// An error that carries its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error, from the first cause in its chain that has one.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<Exit>() {
            return e.code;
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            match e {
                ClientError::UnknownContact(_) => return UNKNOWN_CONTACT,
                ClientError::NameTaken(_) | ClientError::NoRelays => return USAGE,
                e if e.is_transient() => return TRY_AGAIN,
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            match e {
                StoreError::WrongPassphrase | StoreError::WrongIdentity(_) => return LOCKED,
                StoreError::NoProfile(_) => return NO_PROFILE,
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<NetError>() {
            if e.is_transient() || e.code() == Some(ErrorCode::QueueFull) {
                return TRY_AGAIN;
            }
        }
        if let Some(e) = cause.downcast_ref::<ProtoError>() {
            match e {
                ProtoError::NotAnInvitation
                | ProtoError::UnsupportedVersion(_)
                | ProtoError::Address(_) => return BAD_INVITATION,
                ProtoError::TooLong { .. } => return USAGE,
                _ => {}
            }
        }
    }
    FAILURE
}
