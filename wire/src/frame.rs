//! Session frames: the plaintext of one Noise transport message, carrying
//! any number of whole records and then zero padding (PROTOCOL.md §3.3).
//!
//! ```text
//! frame = record* [ 0x00 0x00* ]      length a multiple of FRAME_QUANTUM,
//!                                     at most MAX_FRAME_LEN
//! ```
//!
//! A record starts with its code (never 0), so the first zero byte where a
//! record would start ends the records; everything after it must be zero.
//! Padding to a multiple of [`FRAME_QUANTUM`] keeps an observer (or a TLS
//! front) from telling small commands apart by size; frames carrying
//! messages are larger, as they were in every earlier version.

use crate::codec::{CodecError, Reader};
use crate::command::{Reply, Request, WireError, MAX_COMMAND_LEN, MAX_REPLY_LEN};

/// Frame plaintexts are padded to a multiple of this many bytes.
pub const FRAME_QUANTUM: usize = 1024;
/// Longest frame plaintext: the largest multiple of [`FRAME_QUANTUM`] that,
/// with the 16-byte AEAD tag, fits a Noise message (65,535 bytes).
pub const MAX_FRAME_LEN: usize = (65_535 - 16) / FRAME_QUANTUM * FRAME_QUANTUM;

const _: () = assert!(MAX_COMMAND_LEN * 4 <= MAX_FRAME_LEN);
const _: () = assert!(MAX_REPLY_LEN * 4 <= MAX_FRAME_LEN);

/// Packs records into as few frames as they fit, in order.
#[derive(Default)]
pub struct FrameBuilder {
    frames: Vec<Vec<u8>>,
    current: Vec<u8>,
}

impl FrameBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one encoded record (at most [`MAX_FRAME_LEN`] bytes).
    pub fn push(&mut self, record: &[u8]) {
        assert!(record.len() <= MAX_FRAME_LEN, "a record fits a frame");
        assert_ne!(record.first(), Some(&0), "records never start with 0");
        if self.current.len() + record.len() > MAX_FRAME_LEN {
            self.finish_current();
        }
        self.current.extend_from_slice(record);
    }

    /// Adds a record written by `f` into the current frame's buffer.
    pub fn push_with(&mut self, max_len: usize, f: impl FnOnce(&mut Vec<u8>)) {
        if self.current.len() + max_len > MAX_FRAME_LEN {
            self.finish_current();
        }
        let before = self.current.len();
        f(&mut self.current);
        debug_assert!(self.current.len() - before <= max_len);
        debug_assert_ne!(self.current.get(before), Some(&0));
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.current.is_empty()
    }

    fn finish_current(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let mut f = std::mem::take(&mut self.current);
        f.resize(padded_len(f.len()), 0);
        self.frames.push(f);
    }

    /// The padded frame plaintexts, in order.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.finish_current();
        self.frames
    }
}

/// The padded length of a frame whose records take `n` bytes.
pub fn padded_len(n: usize) -> usize {
    n.div_ceil(FRAME_QUANTUM).max(1) * FRAME_QUANTUM
}

/// Checks a frame plaintext's length and returns a reader over it.
fn checked(frame: &[u8]) -> Result<Reader<'_>, WireError> {
    if frame.is_empty() || frame.len() % FRAME_QUANTUM != 0 || frame.len() > MAX_FRAME_LEN {
        return Err(CodecError::Invalid("frame length").into());
    }
    Ok(Reader::new(frame))
}

/// Whether the records end here: the frame is over, or padding starts.
fn at_end(r: &Reader<'_>) -> Result<bool, WireError> {
    if r.remaining() == 0 {
        return Ok(true);
    }
    let mut peek = r.clone();
    if peek.u8()? == 0 {
        peek.finish_padding()?;
        return Ok(true);
    }
    Ok(false)
}

/// Every command record of a client frame. Any malformed record makes the
/// whole frame malformed: a relay closes the session on it.
pub fn parse_commands(frame: &[u8]) -> Result<Vec<Request>, WireError> {
    let mut r = checked(frame)?;
    let mut out = Vec::new();
    while !at_end(&r)? {
        out.push(Request::decode(&mut r)?);
    }
    Ok(out)
}

/// Every reply record (tag, reply) of a relay frame.
pub fn parse_replies(frame: &[u8]) -> Result<Vec<(u32, Reply)>, WireError> {
    let mut r = checked(frame)?;
    let mut out = Vec::new();
    while !at_end(&r)? {
        out.push(Reply::decode(&mut r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, DELIVERED_LEN, QUEUE_MSG_LEN};

    #[test]
    fn records_are_packed_padded_and_parsed_back() {
        let mut b = FrameBuilder::new();
        let mut cmds = Vec::new();
        for tag in 0..9u32 {
            let c = if tag % 3 == 0 {
                Command::Send {
                    sender_id: [tag as u8; 16],
                    message: vec![1; QUEUE_MSG_LEN],
                }
            } else {
                Command::Check {
                    recipient_id: [tag as u8; 16],
                }
            };
            let mut rec = Vec::new();
            Request::encode(tag, &c, &[0; 32], None, &mut rec);
            b.push(&rec);
            cmds.push(c);
        }
        let frames = b.finish();
        assert_eq!(frames.len(), 1, "three SENDs and six CHECKs fit one frame");
        let got: Vec<Command> = frames
            .iter()
            .flat_map(|f| parse_commands(f).unwrap())
            .map(|r| r.command)
            .collect();
        assert_eq!(got, cmds);
        for f in &frames {
            assert_eq!(f.len() % FRAME_QUANTUM, 0);
        }
    }

    #[test]
    fn five_messages_need_two_frames() {
        let mut b = FrameBuilder::new();
        for tag in 0..5 {
            let mut rec = Vec::new();
            Reply::Message {
                msg_id: [1; 16],
                received_at: 0,
                body: vec![2; DELIVERED_LEN],
            }
            .encode(tag, &mut rec);
            b.push(&rec);
        }
        let frames = b.finish();
        assert_eq!(frames.len(), 2);
        let n: usize = frames.iter().map(|f| parse_replies(f).unwrap().len()).sum();
        assert_eq!(n, 5);
    }

    #[test]
    fn bad_lengths_and_padding_are_refused() {
        assert!(parse_replies(&[]).is_err());
        assert!(parse_replies(&[0; 1000]).is_err());
        assert!(parse_replies(&vec![0; MAX_FRAME_LEN + FRAME_QUANTUM]).is_err());
        assert_eq!(parse_replies(&[0; FRAME_QUANTUM]).unwrap(), vec![]);
        let mut f = vec![0u8; FRAME_QUANTUM];
        Reply::Ok.encode(5, &mut Vec::new());
        f[..5].copy_from_slice(&[0x80, 0, 0, 0, 5]);
        assert_eq!(parse_replies(&f).unwrap(), vec![(5, Reply::Ok)]);
        f[100] = 1;
        assert!(parse_replies(&f).is_err(), "non-zero padding");
        let mut g = vec![0u8; FRAME_QUANTUM];
        g[..5].copy_from_slice(&[0x80, 0, 0, 0, 5]);
        g[5] = 0x77;
        assert!(parse_replies(&g).is_err(), "an unknown record");
    }
}
