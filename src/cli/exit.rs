//! Exit codes. They are part of tern's interface: scripts branch on them,
//! and the man page lists them. Never renumber.

use tern_wire::ErrorCode;

use crate::client::ClientError;
use crate::net::NetError;
use crate::proto::ProtoError;
use crate::store::StoreError;

pub const OK: u8 = 0;
/// Any error not listed below.
pub const FAILURE: u8 = 1;
/// Bad arguments (also what clap uses).
pub const USAGE: u8 = 2;
/// The contact (or, for `tern device`, the device) named does not exist.
pub const UNKNOWN_CONTACT: u8 = 3;
/// `tern verify`: the security codes differ.
pub const CODE_MISMATCH: u8 = 4;
/// Wrong passphrase, or no way to ask for one (stdin is not a terminal).
pub const LOCKED: u8 = 5;
/// Not a usable invitation: damaged or bad link, no QR code in the image,
/// wrong version.
pub const BAD_INVITATION: u8 = 6;
/// No profile in the home directory: run `tern init`.
pub const NO_PROFILE: u8 = 7;
/// Gone for good: the contact deleted the connection, or this device was
/// removed from the profile. Retrying cannot help.
pub const GONE: u8 = 8;
/// `tern send --wait-delivered SECS`: the message is on a relay, but no
/// device of the contact confirmed storing it within SECS (it may still
/// arrive later; the contact may also have turned receipts off). Distinct
/// from 75: nothing is wrong here, and sending again would send a copy.
pub const NOT_DELIVERED: u8 = 9;
/// `tern recv --fail-if-empty`: no message arrived (EX_NOINPUT).
pub const NOTHING_RECEIVED: u8 = 66;
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
        if let Some(code) = code_of(cause) {
            return code;
        }
    }
    FAILURE
}

fn code_of(cause: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if let Some(e) = cause.downcast_ref::<Exit>() {
        return Some(e.code);
    }
    if let Some(e) = cause.downcast_ref::<ClientError>() {
        // Wrapped library errors are transparent: look inside them, since
        // `source()` of a transparent wrapper skips the wrapped error.
        return match e {
            ClientError::UnknownContact(_) => Some(UNKNOWN_CONTACT),
            ClientError::NameTaken(_) | ClientError::NoRelays => Some(USAGE),
            ClientError::DeviceRemoved { .. } => Some(GONE),
            ClientError::Store(s) => code_of(s),
            ClientError::Proto(p) => code_of(p),
            ClientError::Net(n) => code_of(n),
            e if e.is_transient() => Some(TRY_AGAIN),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<StoreError>() {
        return match e {
            StoreError::WrongPassphrase
            | StoreError::WrongIdentity(_)
            | StoreError::RetiredKey(_) => Some(LOCKED),
            StoreError::Rekeyed => Some(TRY_AGAIN),
            StoreError::NoProfile(_) => Some(NO_PROFILE),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<NetError>() {
        return (e.is_transient() || e.code() == Some(ErrorCode::QueueFull)).then_some(TRY_AGAIN);
    }
    if let Some(e) = cause.downcast_ref::<ProtoError>() {
        return match e {
            ProtoError::NotAnInvitation
            | ProtoError::LinkDamaged
            | ProtoError::UnsupportedVersion(_)
            | ProtoError::UnsupportedInvitation(_)
            | ProtoError::Address(_) => Some(BAD_INVITATION),
            ProtoError::TooLong { .. } => Some(USAGE),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_errors_keep_their_codes() {
        let wrapped = anyhow::Error::from(ClientError::Store(StoreError::WrongPassphrase));
        assert_eq!(code_for(&wrapped), LOCKED);
        let wrapped = anyhow::Error::from(ClientError::Proto(ProtoError::NotAnInvitation));
        assert_eq!(code_for(&wrapped), BAD_INVITATION);
        let ctx = anyhow::Error::from(StoreError::NoProfile("x".into())).context("opening");
        assert_eq!(code_for(&ctx), NO_PROFILE);
        assert_eq!(code_for(&anyhow::anyhow!("other")), FAILURE);
    }
}
