//! Relay commands and replies: the records carried inside session frames
//! (PROTOCOL.md §3.4–§3.7).
//!
//! A command record is `u8 code || u32 tag || body || [64] signature` (the
//! signature only for commands that carry one); a reply record is
//! `u8 kind || u32 tag || body`. The tag is the client's: a reply carries the
//! tag of the command it answers, and every message a subscription pushes
//! carries the tag of its SUB. A signature covers
//! `"tern/v2 command" || session hash || record[..signature]`, so a signed
//! command is valid in exactly one session.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::codec::{CodecError, Reader, Writer};
use crate::delivery::DELIVERY_OVERHEAD;

/// Length of recipient ids, sender ids and message ids.
pub const ID_LEN: usize = 16;
/// A queue id or message id.
pub type Id = [u8; ID_LEN];
/// Every message a sender uploads is exactly this long (the client pads).
pub const QUEUE_MSG_LEN: usize = 16_000;
/// Every message the relay delivers is exactly this long.
pub const DELIVERED_LEN: usize = QUEUE_MSG_LEN + DELIVERY_OVERHEAD;
/// Longest access key, in bytes.
pub const MAX_ACCESS_KEY_LEN: usize = 64;
/// An Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The length of a session's handshake hash, to which signatures are bound.
pub const SESSION_HASH_LEN: usize = 32;
/// Longest command record (a SEND).
pub const MAX_COMMAND_LEN: usize = 1 + 4 + ID_LEN + 1 + QUEUE_MSG_LEN + SIGNATURE_LEN;
/// Longest reply record (a MSG).
pub const MAX_REPLY_LEN: usize = 1 + 4 + ID_LEN + 8 + DELIVERED_LEN;

const SIGNATURE_CONTEXT: &[u8] = b"tern/v2 command";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("malformed: {0}")]
    Codec(#[from] CodecError),
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    #[error("unknown reply kind {0:#04x}")]
    UnknownReply(u8),
    #[error("unknown error code {0}")]
    UnknownError(u8),
}

/// What the client asks of the relay.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// Relay version and policy. Unsigned.
    Info,
    /// Create a queue; signed by `recipient_auth` to prove possession.
    Create {
        access_key: Option<String>,
        recipient_auth: [u8; 32],
        recipient_dh: [u8; 32],
    },
    /// Register the sender's key; from then on every send must be signed by it.
    Secure {
        recipient_id: Id,
        sender_auth: [u8; 32],
    },
    /// Upload one message of [`QUEUE_MSG_LEN`] bytes. Signed by the sender key
    /// once the queue is secured; before that exactly one unsigned message
    /// (the first handshake message) is accepted.
    Send { sender_id: Id, message: Vec<u8> },
    /// Push the queue's messages, oldest first, as they are there or arrive,
    /// with at most `window` pushed and not yet acknowledged on this session.
    Subscribe { recipient_id: Id, window: u16 },
    /// Delete message `msg_id`.
    Ack { recipient_id: Id, msg_id: Id },
    /// Delete message `msg_id` and every message queued before it.
    AckUpTo { recipient_id: Id, msg_id: Id },
    /// Delete the queue (only if it holds no live message, with `if_empty`).
    Delete { recipient_id: Id, if_empty: bool },
    /// End the subscription made by the SUB with tag `sub_tag` on this session.
    Unsubscribe { sub_tag: u32 },
    /// How many live messages the queue holds. Unsigned: it answers only
    /// someone who knows the recipient id, which the relay itself never
    /// stores (PROTOCOL.md §3.8 says why this is enough).
    Check { recipient_id: Id },
}

// Message bodies and keys are not for debug output.
impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Command {
    pub fn code(&self) -> u8 {
        match self {
            Command::Info => 0x01,
            Command::Create { .. } => 0x02,
            Command::Secure { .. } => 0x03,
            Command::Send { .. } => 0x04,
            Command::Subscribe { .. } => 0x05,
            Command::Ack { .. } => 0x06,
            Command::AckUpTo { .. } => 0x07,
            Command::Delete { .. } => 0x08,
            Command::Unsubscribe { .. } => 0x09,
            Command::Check { .. } => 0x0A,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Info => "INFO",
            Command::Create { .. } => "CREATE",
            Command::Secure { .. } => "SECURE",
            Command::Send { .. } => "SEND",
            Command::Subscribe { .. } => "SUB",
            Command::Ack { .. } => "ACK",
            Command::AckUpTo { .. } => "ACK_UPTO",
            Command::Delete { .. } => "DELETE",
            Command::Unsubscribe { .. } => "UNSUB",
            Command::Check { .. } => "CHECK",
        }
    }

    /// Whether the record carries a signature field (always present for
    /// SEND, all zero when unsigned).
    pub fn has_signature_field(&self) -> bool {
        !matches!(
            self,
            Command::Info | Command::Unsubscribe { .. } | Command::Check { .. }
        )
    }

    /// The queue a recipient command names, if any.
    pub fn recipient_id(&self) -> Option<&Id> {
        match self {
            Command::Secure { recipient_id, .. }
            | Command::Subscribe { recipient_id, .. }
            | Command::Ack { recipient_id, .. }
            | Command::AckUpTo { recipient_id, .. }
            | Command::Delete { recipient_id, .. }
            | Command::Check { recipient_id } => Some(recipient_id),
            _ => None,
        }
    }
}

/// The message a command's signature covers.
fn signed_message(session_hash: &[u8; SESSION_HASH_LEN], record: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + SESSION_HASH_LEN + record.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(session_hash);
    m.extend_from_slice(record);
    m
}

/// A decoded command record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub tag: u32,
    pub command: Command,
    /// The signature, if the record carries a non-zero one (a SEND's
    /// all-zero field means unsigned).
    pub signature: Option<[u8; SIGNATURE_LEN]>,
    /// The record up to its signature field: what the signature covers.
    signed: Vec<u8>,
}

impl Request {
    /// Appends the record for `command` with `tag` to `out`, signing it with
    /// `key` for the session with hash `session_hash`. `key` must be `None`
    /// only for commands without a signature field and for the one unsigned
    /// SEND.
    pub fn encode(
        tag: u32,
        command: &Command,
        session_hash: &[u8; SESSION_HASH_LEN],
        key: Option<&SigningKey>,
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        let mut w = Writer::with_capacity(MAX_COMMAND_LEN);
        w.u8(command.code()).u32(tag);
        match command {
            Command::Info => {}
            Command::Create {
                access_key,
                recipient_auth,
                recipient_dh,
            } => {
                w.short_bytes(access_key.as_deref().unwrap_or("").as_bytes())
                    .bytes(recipient_auth)
                    .bytes(recipient_dh);
            }
            Command::Secure {
                recipient_id,
                sender_auth,
            } => {
                w.bytes(recipient_id).bytes(sender_auth);
            }
            Command::Send { sender_id, message } => {
                assert_eq!(
                    message.len(),
                    QUEUE_MSG_LEN,
                    "queue messages are padded by the caller"
                );
                w.bytes(sender_id).u8(key.is_some() as u8).bytes(message);
            }
            Command::Subscribe {
                recipient_id,
                window,
            } => {
                w.bytes(recipient_id).u16(*window);
            }
            Command::Ack {
                recipient_id,
                msg_id,
            }
            | Command::AckUpTo {
                recipient_id,
                msg_id,
            } => {
                w.bytes(recipient_id).bytes(msg_id);
            }
            Command::Delete {
                recipient_id,
                if_empty,
            } => {
                w.bytes(recipient_id).u8(*if_empty as u8);
            }
            Command::Unsubscribe { sub_tag } => {
                w.u32(*sub_tag);
            }
            Command::Check { recipient_id } => {
                w.bytes(recipient_id);
            }
        }
        out.extend_from_slice(&w.into_vec());
        if command.has_signature_field() {
            let sig = match key {
                Some(k) => k
                    .sign(&signed_message(session_hash, &out[start..]))
                    .to_bytes(),
                None => [0u8; SIGNATURE_LEN],
            };
            out.extend_from_slice(&sig);
        }
    }

    /// Reads one command record from `r`. Signatures are checked separately
    /// by [`Request::verify`], once the relay knows which key should have
    /// signed.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let before = r.clone();
        let code = r.u8()?;
        let tag = r.u32()?;
        let mut unsigned_send = false;
        let command = match code {
            0x01 => Command::Info,
            0x02 => {
                let ak = r.short_bytes()?;
                if ak.len() > MAX_ACCESS_KEY_LEN {
                    return Err(CodecError::Invalid("access key").into());
                }
                let access_key = if ak.is_empty() {
                    None
                } else {
                    Some(
                        std::str::from_utf8(ak)
                            .map_err(|_| CodecError::Invalid("access key"))?
                            .to_string(),
                    )
                };
                Command::Create {
                    access_key,
                    recipient_auth: r.array()?,
                    recipient_dh: r.array()?,
                }
            }
            0x03 => Command::Secure {
                recipient_id: r.array()?,
                sender_auth: r.array()?,
            },
            0x04 => {
                let sender_id = r.array()?;
                unsigned_send = match r.u8()? {
                    0 => true,
                    1 => false,
                    _ => return Err(CodecError::Invalid("send flag").into()),
                };
                Command::Send {
                    sender_id,
                    message: r.bytes(QUEUE_MSG_LEN)?.to_vec(),
                }
            }
            0x05 => Command::Subscribe {
                recipient_id: r.array()?,
                window: r.u16()?,
            },
            0x06 => Command::Ack {
                recipient_id: r.array()?,
                msg_id: r.array()?,
            },
            0x07 => Command::AckUpTo {
                recipient_id: r.array()?,
                msg_id: r.array()?,
            },
            0x08 => Command::Delete {
                recipient_id: r.array()?,
                if_empty: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(CodecError::Invalid("delete flag").into()),
                },
            },
            0x09 => Command::Unsubscribe { sub_tag: r.u32()? },
            0x0A => Command::Check {
                recipient_id: r.array()?,
            },
            other => return Err(WireError::UnknownCommand(other)),
        };
        let signed_len = before.remaining() - r.remaining();
        let signed = before.clone().bytes(signed_len)?.to_vec();
        let signature = if command.has_signature_field() {
            let sig: [u8; SIGNATURE_LEN] = r.array()?;
            if unsigned_send {
                // An unsigned SEND carries an all-zero field, never a
                // signature that nobody checks.
                if sig != [0u8; SIGNATURE_LEN] {
                    return Err(CodecError::Invalid("unsigned send signature").into());
                }
                None
            } else {
                Some(sig)
            }
        } else {
            None
        };
        Ok(Self {
            tag,
            command,
            signature,
            signed,
        })
    }

    /// Whether the signature verifies against `key` for the session with
    /// hash `session_hash`, by the strict rule (PROTOCOL.md §2.1). A missing
    /// signature or a key that does not decode never verifies.
    pub fn verify(&self, session_hash: &[u8; SESSION_HASH_LEN], key: &[u8; 32]) -> bool {
        let Some(sig) = &self.signature else {
            return false;
        };
        let Ok(vk) = VerifyingKey::from_bytes(key) else {
            return false;
        };
        vk.verify_strict(
            &signed_message(session_hash, &self.signed),
            &Signature::from_bytes(sig),
        )
        .is_ok()
    }
}

/// Why a relay refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The record could not be parsed, or CREATE's `recipient_dh` is a
    /// low-order point.
    BadRequest = 1,
    /// No such queue, or not authorised. The relay never says which.
    Auth = 2,
    /// The queue holds as many messages as the relay allows.
    QueueFull = 3,
    /// Creating queues needs an access key, and it was missing or wrong.
    Access = 4,
    /// ACK or ACK_UPTO named a message that is not in the queue.
    NoMessage = 5,
    /// The relay failed internally.
    Internal = 6,
    /// The relay is busy, out of room, or shutting down.
    Unavailable = 7,
    /// DELETE with `if_empty` found a live message.
    NotEmpty = 8,
    /// Too many queues created from this connection or address lately.
    RateLimited = 9,
    /// The access key (or, on an open relay, this relay) has as many queues
    /// as it allows.
    Quota = 10,
    /// The session asked for more than the relay allows at once (too many
    /// subscriptions, say).
    Limit = 11,
    /// A signed SEND to a queue its recipient has not secured yet (its
    /// SECURE is still to come).
    NotSecured = 12,
}

impl ErrorCode {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::BadRequest,
            2 => Self::Auth,
            3 => Self::QueueFull,
            4 => Self::Access,
            5 => Self::NoMessage,
            6 => Self::Internal,
            7 => Self::Unavailable,
            8 => Self::NotEmpty,
            9 => Self::RateLimited,
            10 => Self::Quota,
            11 => Self::Limit,
            12 => Self::NotSecured,
            _ => return None,
        })
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::QueueFull
                | Self::Internal
                | Self::Unavailable
                | Self::RateLimited
                | Self::NotSecured
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::Auth => "Auth",
            Self::QueueFull => "QueueFull",
            Self::Access => "Access",
            Self::NoMessage => "NoMessage",
            Self::Internal => "Internal",
            Self::Unavailable => "Unavailable",
            Self::NotEmpty => "NotEmpty",
            Self::RateLimited => "RateLimited",
            Self::Quota => "Quota",
            Self::Limit => "Limit",
            Self::NotSecured => "NotSecured",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Self::BadRequest => "bad request",
            Self::Auth => "no such queue, or not authorised",
            Self::QueueFull => "queue full",
            Self::Access => "an access key is needed to create queues on this relay (add it to the address: tern://KEY:ACCESS@host)",
            Self::NoMessage => "no such message",
            Self::Internal => "internal relay error",
            Self::Unavailable => "relay unavailable (busy, out of room, or shutting down)",
            Self::NotEmpty => "the queue still holds messages",
            Self::RateLimited => "too many new queues lately; try again in a minute",
            Self::Quota => "the relay's queue quota for this access key is used up; use another relay",
            Self::Limit => "the session asked for more than the relay allows",
            Self::NotSecured => "the recipient has not secured this queue yet",
        };
        f.write_str(text)
    }
}

/// The relay's version and policy (the INFO reply, also sent in the
/// session handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayInfo {
    pub min_version: u8,
    pub max_version: u8,
    /// Queues can be created without an access key.
    pub open: bool,
    /// Most live messages one queue may hold.
    pub max_pending: u32,
    /// Message lifetime, seconds.
    pub ttl_secs: u32,
    /// Largest subscription window.
    pub max_window: u16,
    /// Most subscriptions one session may hold.
    pub max_subscriptions: u16,
    /// A queue never secured is deleted this long after its creation or its
    /// one unsigned message (0: never), so invitations must be answered,
    /// and answers processed, within it.
    pub unsecured_ttl_secs: u32,
}

/// Encoded length of a [`RelayInfo`] body.
pub const RELAY_INFO_LEN: usize = 1 + 1 + 1 + 4 + 4 + 2 + 2 + 4;

impl RelayInfo {
    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.min_version)
            .u8(self.max_version)
            .u8(self.open as u8)
            .u32(self.max_pending)
            .u32(self.ttl_secs)
            .u16(self.max_window)
            .u16(self.max_subscriptions)
            .u32(self.unsecured_ttl_secs);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let min_version = r.u8()?;
        let max_version = r.u8()?;
        let open = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(CodecError::Invalid("open flag").into()),
        };
        let info = Self {
            min_version,
            max_version,
            open,
            max_pending: r.u32()?,
            ttl_secs: r.u32()?,
            max_window: r.u16()?,
            max_subscriptions: r.u16()?,
            unsecured_ttl_secs: r.u32()?,
        };
        if info.min_version == 0 || info.min_version > info.max_version {
            return Err(CodecError::Invalid("relay versions").into());
        }
        Ok(info)
    }
}

/// What the relay answers, or pushes.
#[derive(Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Info(RelayInfo),
    Queue {
        recipient_id: Id,
        sender_id: Id,
        relay_dh: [u8; 32],
    },
    /// A message pushed by a subscription.
    Message {
        msg_id: Id,
        /// Seconds since the Unix epoch, rounded down to the hour.
        received_at: u64,
        /// [`DELIVERED_LEN`] bytes of delivery ciphertext.
        body: Vec<u8>,
    },
    /// The subscription has pushed every message there is for now.
    Idle,
    /// The subscription ended: its queue was deleted.
    Ended,
    /// The answer to CHECK.
    Count(u32),
    Error(ErrorCode),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Ok => f.write_str("OK"),
            Reply::Info(i) => write!(f, "INFO({i:?})"),
            Reply::Queue { .. } => f.write_str("QUEUE"),
            Reply::Message { .. } => f.write_str("MSG"),
            Reply::Idle => f.write_str("IDLE"),
            Reply::Ended => f.write_str("ENDED"),
            Reply::Count(n) => write!(f, "COUNT({n})"),
            Reply::Error(c) => write!(f, "ERROR({c:?})"),
        }
    }
}

impl Reply {
    pub fn kind(&self) -> u8 {
        match self {
            Reply::Ok => 0x80,
            Reply::Info(_) => 0x81,
            Reply::Queue { .. } => 0x82,
            Reply::Message { .. } => 0x83,
            Reply::Idle => 0x84,
            Reply::Ended => 0x85,
            Reply::Count(_) => 0x86,
            Reply::Error(_) => 0xFF,
        }
    }

    /// Appends the record for this reply with `tag` to `out`.
    pub fn encode(&self, tag: u32, out: &mut Vec<u8>) {
        let mut w = Writer::with_capacity(match self {
            Reply::Message { .. } => MAX_REPLY_LEN,
            _ => 96,
        });
        w.u8(self.kind()).u32(tag);
        match self {
            Reply::Ok | Reply::Idle | Reply::Ended => {}
            Reply::Info(i) => i.encode(&mut w),
            Reply::Queue {
                recipient_id,
                sender_id,
                relay_dh,
            } => {
                w.bytes(recipient_id).bytes(sender_id).bytes(relay_dh);
            }
            Reply::Message {
                msg_id,
                received_at,
                body,
            } => {
                assert_eq!(
                    body.len(),
                    DELIVERED_LEN,
                    "delivered messages have one size"
                );
                w.bytes(msg_id).u64(*received_at).bytes(body);
            }
            Reply::Count(n) => {
                w.u32(*n);
            }
            Reply::Error(code) => {
                w.u8(*code as u8);
            }
        }
        out.extend_from_slice(&w.into_vec());
    }

    /// Reads one reply record (its tag and the reply) from `r`.
    pub fn decode(r: &mut Reader<'_>) -> Result<(u32, Self), WireError> {
        let kind = r.u8()?;
        let tag = r.u32()?;
        let reply = match kind {
            0x80 => Reply::Ok,
            0x81 => Reply::Info(RelayInfo::decode(r)?),
            0x82 => Reply::Queue {
                recipient_id: r.array()?,
                sender_id: r.array()?,
                relay_dh: r.array()?,
            },
            0x83 => Reply::Message {
                msg_id: r.array()?,
                received_at: r.u64()?,
                body: r.bytes(DELIVERED_LEN)?.to_vec(),
            },
            0x84 => Reply::Idle,
            0x85 => Reply::Ended,
            0x86 => Reply::Count(r.u32()?),
            0xFF => {
                let code = r.u8()?;
                Reply::Error(ErrorCode::from_u8(code).ok_or(WireError::UnknownError(code))?)
            }
            other => return Err(WireError::UnknownReply(other)),
        };
        Ok((tag, reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Info,
            Command::Create {
                access_key: Some("k3y".into()),
                recipient_auth: [1; 32],
                recipient_dh: [2; 32],
            },
            Command::Create {
                access_key: None,
                recipient_auth: [1; 32],
                recipient_dh: [2; 32],
            },
            Command::Secure {
                recipient_id: [3; 16],
                sender_auth: [4; 32],
            },
            Command::Send {
                sender_id: [5; 16],
                message: vec![6; QUEUE_MSG_LEN],
            },
            Command::Subscribe {
                recipient_id: [7; 16],
                window: 64,
            },
            Command::Ack {
                recipient_id: [8; 16],
                msg_id: [9; 16],
            },
            Command::AckUpTo {
                recipient_id: [8; 16],
                msg_id: [9; 16],
            },
            Command::Delete {
                recipient_id: [10; 16],
                if_empty: true,
            },
            Command::Unsubscribe { sub_tag: 77 },
            Command::Check {
                recipient_id: [11; 16],
            },
        ]
    }

    #[test]
    fn commands_round_trip_and_signatures_bind_to_the_session() {
        let key = SigningKey::generate(&mut OsRng);
        let public = key.verifying_key().to_bytes();
        let h = [0x42; 32];
        for (i, c) in all_commands().into_iter().enumerate() {
            let signing = c.has_signature_field().then_some(&key);
            let mut out = Vec::new();
            Request::encode(i as u32, &c, &h, signing, &mut out);
            assert!(out.len() <= MAX_COMMAND_LEN);
            let mut r = Reader::new(&out);
            let req = Request::decode(&mut r).unwrap();
            assert_eq!(r.remaining(), 0, "{c:?}");
            assert_eq!(req.command, c);
            assert_eq!(req.tag, i as u32);
            if c.has_signature_field() {
                assert!(req.verify(&h, &public), "{c:?}");
                assert!(
                    !req.verify(&[0x43; 32], &public),
                    "{c:?} in another session"
                );
                let other = SigningKey::generate(&mut OsRng).verifying_key().to_bytes();
                assert!(!req.verify(&h, &other));
            } else {
                assert!(!req.verify(&h, &public));
            }
        }
    }

    #[test]
    fn unsigned_send_has_a_zero_signature_field() {
        let c = Command::Send {
            sender_id: [5; 16],
            message: vec![6; QUEUE_MSG_LEN],
        };
        let mut out = Vec::new();
        Request::encode(1, &c, &[0; 32], None, &mut out);
        let req = Request::decode(&mut Reader::new(&out)).unwrap();
        assert_eq!(req.signature, None);
        let n = out.len();
        out[n - 1] = 1;
        assert!(Request::decode(&mut Reader::new(&out)).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let replies = vec![
            Reply::Ok,
            Reply::Info(RelayInfo {
                min_version: 2,
                max_version: 2,
                open: true,
                max_pending: 1000,
                ttl_secs: 3600,
                max_window: 64,
                max_subscriptions: 4096,
                unsecured_ttl_secs: 86_400,
            }),
            Reply::Queue {
                recipient_id: [1; 16],
                sender_id: [2; 16],
                relay_dh: [3; 32],
            },
            Reply::Message {
                msg_id: [4; 16],
                received_at: 3600,
                body: vec![5; DELIVERED_LEN],
            },
            Reply::Idle,
            Reply::Ended,
            Reply::Count(7),
            Reply::Error(ErrorCode::Quota),
        ];
        for (i, reply) in replies.into_iter().enumerate() {
            let mut out = Vec::new();
            reply.encode(i as u32, &mut out);
            assert!(out.len() <= MAX_REPLY_LEN);
            let mut r = Reader::new(&out);
            assert_eq!(Reply::decode(&mut r).unwrap(), (i as u32, reply));
            assert_eq!(r.remaining(), 0);
        }
        for bad in [[0x87u8, 0, 0, 0, 0], [0xFF, 0, 0, 0, 1]] {
            assert!(Reply::decode(&mut Reader::new(&bad)).is_err());
        }
        assert!(Reply::decode(&mut Reader::new(&[0xFF, 0, 0, 0, 1, 13])).is_err());
        assert_eq!(
            Reply::decode(&mut Reader::new(&[0xFF, 0, 0, 0, 1, 12]))
                .unwrap()
                .1,
            Reply::Error(ErrorCode::NotSecured)
        );
    }
}
