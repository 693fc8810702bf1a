//! Relay commands and responses: the plaintext inside sealed blocks.
//!
//! Request plaintext ([`REQUEST_LEN`] bytes):
//!
//! ```text
//! u8  command
//! u64 client time, milliseconds since the Unix epoch
//! ... command body
//! [64] Ed25519 signature (signed commands only)
//! zero padding
//! ```
//!
//! A signature covers `"tern/v1 signed request" || enc || plaintext[..start of signature]`,
//! where `enc` is the HPKE encapsulated key of the block carrying it, so a
//! signed request is valid in exactly one sealed block.
//!
//! Response plaintext ([`RESPONSE_LEN`] bytes): `u8 kind`, `u64 relay time`,
//! body, zero padding.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::codec::{CodecError, Reader, Writer};
use crate::seal::{DELIVERY_OVERHEAD, REQUEST_LEN, RESPONSE_LEN};

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

const SIGNATURE_CONTEXT: &[u8] = b"tern/v1 signed request";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("malformed: {0}")]
    Codec(#[from] CodecError),
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    #[error("unknown response kind {0:#04x}")]
    UnknownResponse(u8),
    #[error("message is {0} bytes, expected {QUEUE_MSG_LEN}")]
    MessageLength(usize),
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
    /// (the connection request) is accepted.
    Send { sender_id: Id, message: Vec<u8> },
    /// Oldest pending message, waiting up to `wait_ms` for one.
    Fetch { recipient_id: Id, wait_ms: u32 },
    /// Delete message `msg_id` and return the next one, if any.
    Ack { recipient_id: Id, msg_id: Id },
    /// Delete the queue and everything in it.
    Delete { recipient_id: Id },
    /// The oldest pending message that comes after `after` in the queue,
    /// without waiting and without deleting anything: lets a recipient read
    /// ahead and store several messages in one commit.
    Peek { recipient_id: Id, after: Id },
    /// Delete message `msg_id` and every message before it in the queue,
    /// and return the next one, if any: acknowledges a run of messages read
    /// with FETCH and PEEK in one request.
    AckUpTo { recipient_id: Id, msg_id: Id },
}

// Message bodies and keys are not for debug output.
impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Command {
    fn code(&self) -> u8 {
        match self {
            Command::Info => 0x01,
            Command::Create { .. } => 0x02,
            Command::Secure { .. } => 0x03,
            Command::Send { .. } => 0x04,
            Command::Fetch { .. } => 0x05,
            Command::Ack { .. } => 0x06,
            Command::Delete { .. } => 0x07,
            Command::Peek { .. } => 0x08,
            Command::AckUpTo { .. } => 0x09,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Info => "INFO",
            Command::Create { .. } => "CREATE",
            Command::Secure { .. } => "SECURE",
            Command::Send { .. } => "SEND",
            Command::Fetch { .. } => "FETCH",
            Command::Ack { .. } => "ACK",
            Command::Delete { .. } => "DELETE",
            Command::Peek { .. } => "PEEK",
            Command::AckUpTo { .. } => "ACK_UPTO",
        }
    }

    /// Whether the encoding carries a signature field. `Send` carries a flag
    /// byte and the field always; the others carry it when they need it.
    fn has_signature_field(&self) -> bool {
        !matches!(self, Command::Info)
    }
}

/// A decoded request: the command, the client's clock, and the signature if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub time_ms: u64,
    pub command: Command,
    pub signature: Option<[u8; 64]>,
    /// Length of the signed prefix of the plaintext.
    signed_len: usize,
}

impl Request {
    /// Builds the plaintext for `command`, signing it with `key` (bound to the
    /// sealer's `enc`). `key` must be `None` only for `Info` and unsigned sends.
    pub fn encode(
        command: &Command,
        time_ms: u64,
        enc: &[u8; 32],
        key: Option<&SigningKey>,
    ) -> Vec<u8> {
        let mut w = Writer::with_capacity(REQUEST_LEN);
        w.u8(command.code()).u64(time_ms);
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
            Command::Fetch {
                recipient_id,
                wait_ms,
            } => {
                w.bytes(recipient_id).u32(*wait_ms);
            }
            Command::Ack {
                recipient_id,
                msg_id,
            }
            | Command::AckUpTo {
                recipient_id,
                msg_id,
            }
            | Command::Peek {
                recipient_id,
                after: msg_id,
            } => {
                w.bytes(recipient_id).bytes(msg_id);
            }
            Command::Delete { recipient_id } => {
                w.bytes(recipient_id);
            }
        }
        if command.has_signature_field() {
            let sig = match key {
                Some(k) => {
                    let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + 32 + w.len());
                    msg.extend_from_slice(SIGNATURE_CONTEXT);
                    msg.extend_from_slice(enc);
                    let mut tmp = w.clone().into_vec();
                    msg.append(&mut tmp);
                    k.sign(&msg).to_bytes()
                }
                None => [0u8; 64],
            };
            w.bytes(&sig);
        }
        w.pad_to(REQUEST_LEN)
            .expect("every command fits a request block")
    }

    /// Parses a request plaintext. Signatures are checked separately by
    /// [`Request::verify`], once the relay knows which key should have signed.
    pub fn decode(plaintext: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(plaintext);
        let code = r.u8()?;
        let time_ms = r.u64()?;
        let mut signed_flag = true;
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
                signed_flag = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(CodecError::Invalid("signed flag").into()),
                };
                let message = r.bytes(QUEUE_MSG_LEN)?.to_vec();
                Command::Send { sender_id, message }
            }
            0x05 => Command::Fetch {
                recipient_id: r.array()?,
                wait_ms: r.u32()?,
            },
            0x06 => Command::Ack {
                recipient_id: r.array()?,
                msg_id: r.array()?,
            },
            0x07 => Command::Delete {
                recipient_id: r.array()?,
            },
            0x08 => Command::Peek {
                recipient_id: r.array()?,
                after: r.array()?,
            },
            0x09 => Command::AckUpTo {
                recipient_id: r.array()?,
                msg_id: r.array()?,
            },
            other => return Err(WireError::UnknownCommand(other)),
        };
        let signed_len = plaintext.len() - r.remaining();
        let signature = if command.has_signature_field() {
            let sig: [u8; 64] = r.array()?;
            if signed_flag {
                Some(sig)
            } else if sig != [0u8; 64] {
                return Err(CodecError::Invalid("unsigned request with a signature").into());
            } else {
                None
            }
        } else {
            None
        };
        r.finish_padding()?;
        Ok(Self {
            time_ms,
            command,
            signature,
            signed_len,
        })
    }

    /// Checks the signature against `key` with Ed25519's strict rule. Callers
    /// that have no key (unknown queue) verify against a dummy key anyway so
    /// that both failures cost the same.
    pub fn verify(&self, plaintext: &[u8], enc: &[u8; 32], key: &[u8; 32]) -> bool {
        let Some(sig) = &self.signature else {
            return false;
        };
        let Ok(vk) = VerifyingKey::from_bytes(key) else {
            return false;
        };
        let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + 32 + self.signed_len);
        msg.extend_from_slice(SIGNATURE_CONTEXT);
        msg.extend_from_slice(enc);
        msg.extend_from_slice(&plaintext[..self.signed_len]);
        let sig = Signature::from_bytes(sig);
        vk.verify_strict(&msg, &sig).is_ok()
    }
}

/// Why the relay refused a request. Wrong key and unknown queue are both
/// [`ErrorCode::Auth`]: the relay never reveals whether a queue exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ErrorCode {
    #[error("the relay could not parse the request")]
    BadRequest,
    #[error("no such queue, or not authorised")]
    Auth,
    #[error("the queue is full; try again later")]
    QueueFull,
    #[error("request time outside the relay's window, or a replay")]
    Stale,
    #[error("this relay needs an access key to create queues")]
    Access,
    #[error("no such message")]
    NoMessage,
    #[error("the relay failed internally; try again later")]
    Internal,
    #[error("the relay is busy or shutting down; try again later")]
    Unavailable,
}

impl ErrorCode {
    fn code(self) -> u8 {
        match self {
            ErrorCode::BadRequest => 1,
            ErrorCode::Auth => 2,
            ErrorCode::QueueFull => 3,
            ErrorCode::Stale => 4,
            ErrorCode::Access => 5,
            ErrorCode::NoMessage => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Unavailable => 8,
        }
    }

    fn from_code(c: u8) -> Result<Self, WireError> {
        Ok(match c {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::Auth,
            3 => ErrorCode::QueueFull,
            4 => ErrorCode::Stale,
            5 => ErrorCode::Access,
            6 => ErrorCode::NoMessage,
            7 => ErrorCode::Internal,
            8 => ErrorCode::Unavailable,
            _ => return Err(CodecError::Invalid("error code").into()),
        })
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::QueueFull | ErrorCode::Internal | ErrorCode::Unavailable
        )
    }
}

/// The relay's policy, as INFO reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    pub min_version: u8,
    pub max_version: u8,
    /// Whether queues can be created without an access key.
    pub open: bool,
    pub max_pending: u32,
    pub ttl_secs: u32,
    pub max_wait_ms: u32,
}

/// What the relay answers.
#[derive(Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Info(RelayInfo),
    Queue {
        recipient_id: Id,
        sender_id: Id,
        relay_dh: [u8; 32],
    },
    /// A pending message, encrypted for the recipient ([`DELIVERED_LEN`] bytes).
    Message {
        msg_id: Id,
        /// When the relay received it, seconds since the Unix epoch.
        received_at: u64,
        body: Vec<u8>,
    },
    Empty,
    Error(ErrorCode),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Ok => f.write_str("OK"),
            Reply::Info(i) => write!(f, "INFO({i:?})"),
            Reply::Queue { .. } => f.write_str("QUEUE"),
            Reply::Message { .. } => f.write_str("MSG"),
            Reply::Empty => f.write_str("EMPTY"),
            Reply::Error(e) => write!(f, "ERR({e:?})"),
        }
    }
}

/// A response: the relay's clock (so clients can correct their own for the
/// freshness window) and the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub time_ms: u64,
    pub reply: Reply,
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(RESPONSE_LEN);
        let kind = match &self.reply {
            Reply::Ok => 0x80,
            Reply::Info(_) => 0x81,
            Reply::Queue { .. } => 0x82,
            Reply::Message { .. } => 0x83,
            Reply::Empty => 0x84,
            Reply::Error(_) => 0xff,
        };
        w.u8(kind).u64(self.time_ms);
        match &self.reply {
            Reply::Ok | Reply::Empty => {}
            Reply::Info(i) => {
                w.u8(i.min_version)
                    .u8(i.max_version)
                    .u8(i.open as u8)
                    .u32(i.max_pending)
                    .u32(i.ttl_secs)
                    .u32(i.max_wait_ms);
            }
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
                assert_eq!(body.len(), DELIVERED_LEN);
                w.bytes(msg_id).u64(*received_at).bytes(body);
            }
            Reply::Error(e) => {
                w.u8(e.code());
            }
        }
        w.pad_to(RESPONSE_LEN)
            .expect("every reply fits a response block")
    }

    pub fn decode(plaintext: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(plaintext);
        let kind = r.u8()?;
        let time_ms = r.u64()?;
        let reply = match kind {
            0x80 => Reply::Ok,
            0x81 => {
                let min_version = r.u8()?;
                let max_version = r.u8()?;
                let open = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(CodecError::Invalid("open flag").into()),
                };
                Reply::Info(RelayInfo {
                    min_version,
                    max_version,
                    open,
                    max_pending: r.u32()?,
                    ttl_secs: r.u32()?,
                    max_wait_ms: r.u32()?,
                })
            }
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
            0x84 => Reply::Empty,
            0xff => Reply::Error(ErrorCode::from_code(r.u8()?)?),
            other => return Err(WireError::UnknownResponse(other)),
        };
        r.finish_padding()?;
        Ok(Self { time_ms, reply })
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
                access_key: Some("key".into()),
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
            Command::Fetch {
                recipient_id: [7; 16],
                wait_ms: 5000,
            },
            Command::Ack {
                recipient_id: [8; 16],
                msg_id: [9; 16],
            },
            Command::Delete {
                recipient_id: [10; 16],
            },
            Command::Peek {
                recipient_id: [11; 16],
                after: [12; 16],
            },
            Command::AckUpTo {
                recipient_id: [13; 16],
                msg_id: [14; 16],
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_verify() {
        let key = SigningKey::generate(&mut OsRng);
        let other = SigningKey::generate(&mut OsRng);
        let enc = [42u8; 32];
        for cmd in all_commands() {
            let signer = (!matches!(cmd, Command::Info)).then_some(&key);
            let pt = Request::encode(&cmd, 1234, &enc, signer);
            assert_eq!(pt.len(), REQUEST_LEN);
            let req = Request::decode(&pt).unwrap();
            assert_eq!(req.command, cmd);
            assert_eq!(req.time_ms, 1234);
            if signer.is_some() {
                assert!(req.verify(&pt, &enc, key.verifying_key().as_bytes()));
                assert!(!req.verify(&pt, &enc, other.verifying_key().as_bytes()));
                assert!(!req.verify(&pt, &[43u8; 32], key.verifying_key().as_bytes()));
            }
        }
    }

    #[test]
    fn unsigned_send_has_no_signature() {
        let cmd = Command::Send {
            sender_id: [5; 16],
            message: vec![6; QUEUE_MSG_LEN],
        };
        let pt = Request::encode(&cmd, 1, &[0; 32], None);
        let req = Request::decode(&pt).unwrap();
        assert_eq!(req.signature, None);
        assert!(!req.verify(&pt, &[0; 32], &[0; 32]));
    }

    #[test]
    fn nonzero_padding_and_unknown_codes_rejected() {
        let mut pt = Request::encode(&Command::Info, 1, &[0; 32], None);
        pt[REQUEST_LEN - 1] = 1;
        assert!(Request::decode(&pt).is_err());
        let mut pt = Request::encode(&Command::Info, 1, &[0; 32], None);
        pt[0] = 0x77;
        assert_eq!(Request::decode(&pt), Err(WireError::UnknownCommand(0x77)));
    }

    #[test]
    fn responses_round_trip() {
        for reply in [
            Reply::Ok,
            Reply::Empty,
            Reply::Error(ErrorCode::QueueFull),
            Reply::Info(RelayInfo {
                min_version: 1,
                max_version: 1,
                open: true,
                max_pending: 1000,
                ttl_secs: 86400,
                max_wait_ms: 30000,
            }),
            Reply::Queue {
                recipient_id: [1; 16],
                sender_id: [2; 16],
                relay_dh: [3; 32],
            },
            Reply::Message {
                msg_id: [4; 16],
                received_at: 99,
                body: vec![5; DELIVERED_LEN],
            },
        ] {
            let resp = Response { time_ms: 7, reply };
            let pt = resp.encode();
            assert_eq!(pt.len(), RESPONSE_LEN);
            assert_eq!(Response::decode(&pt).unwrap(), resp);
        }
    }
}
