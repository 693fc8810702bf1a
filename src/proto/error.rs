use thiserror::Error;

use tern_wire::codec::CodecError;

/// Everything that can be wrong with protocol input. Every variant leaves the
/// caller's state untouched: functions that update state do so only on success.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("malformed data: {0}")]
    Malformed(#[from] CodecError),
    #[error("not a tern invitation link")]
    NotAnInvitation,
    #[error(
        "the link is damaged: a character is wrong, missing or extra (its checksum does not match); \
         copy it again exactly, or ask for a new invitation"
    )]
    LinkDamaged,
    #[error("this invitation needs a newer tern (protocol version {0})")]
    UnsupportedVersion(u8),
    #[error("invalid relay address in the invitation: {0}")]
    Address(String),
    #[error("key agreement failed: a peer key is invalid (low-order point)")]
    KeyAgreement,
    #[error("message does not decrypt: tampered, or not for this connection")]
    Decrypt,
    #[error("duplicate or replayed message")]
    Duplicate,
    #[error("too many skipped messages ({0}); the connection must be re-keyed")]
    TooManySkipped(u32),
    #[error("message is too long: {len} bytes, at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message does not link to the conversation's history: the sender's history was altered or forked")]
    ChainMismatch,
    #[error(
        "a second, different request arrived for a one-time invitation: it may have been copied"
    )]
    InvitationReused,
    #[error("this invitation is of a kind ({0}) that needs a newer tern")]
    UnsupportedInvitation(u8),
    #[error("ratchet cannot send yet: no message received from the peer")]
    NotReady,
    #[error("the peer answered without the post-quantum key exchange this side offered: refused as a downgrade")]
    Downgrade,
}
