//! Files (PROTOCOL.md §16): what a file offer says, and how its chunks are
//! sealed.
//!
//! A file travels outside the ratchet. The sender creates *file queues* of
//! its own on the recipient's relays (fresh keys, fresh ids: nothing links
//! them to the conversation's queues), uploads the file into them as
//! 16,000-byte queue messages of type 0x05, and sends one offer (envelope
//! kind 9) inside the ratchet with what the recipient needs to read them:
//! the queues' recipient ids and secrets, the file key, size and SHA-256.
//!
//! ```text
//! offer body (kind 9):
//! u8    format               1
//! u64   size                 bytes of the file
//! [32]  sha256               SHA-256 of the file's bytes
//! [32]  key                  the file key
//! u8    name length 1..=255, then the name (UTF-8; the recipient sanitises it)
//! u16   caption length, then the caption (UTF-8)
//! u32   chunks per queue     1..=MAX_CHUNKS_PER_QUEUE
//! u8    set count            1..=MAX_SETS
//! per set (a copy of the whole file on one relay):
//!       relay address        binary form (§3.1), no access key
//!       [32] set seed        the queues' recipient signing keys derive from it
//!       u16  queue count     = ceil(chunk count / chunks per queue)
//!       per queue: [16] recipient id, [32] queue secret (§3.9)
//!
//! chunk (queue message type 0x05, 16,000 bytes):
//! u8    0x05
//! u32   index                0 .. chunk count − 1
//! [15,979] XChaCha20-Poly1305(set key, nonce, chunk data, aad = 0x05 || index)
//! [16]  tag
//!
//! set key = HKDF-SHA256(salt = "", ikm = file key,
//!                       info = "tern/v1 file chunks" || u8 set number)
//! nonce   = u32 index || u8 last (1 for the final chunk, else 0) || 0^19
//! ```
//!
//! Every chunk but the last carries `CHUNK_LEN` bytes of the file; the last
//! carries the rest, zero-filled (a 0-byte file is one chunk of zeros). The
//! index is bound by the nonce and the associated data, the end by the
//! `last` flag, the total by the offer (inside the ratchet), and the whole
//! by the SHA-256 checked before the file is moved into place: a relay can
//! drop, delay or repeat chunks, never reorder, truncate or alter a file
//! unnoticed. Each set has its own key, so the uploads to two relays differ
//! byte for byte.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use tern_wire::address::RelayAddress;
use tern_wire::codec::{CodecError, Reader, Writer};
use tern_wire::{Id, QUEUE_MSG_LEN};
use zeroize::Zeroizing;

use super::envelope::MAX_BODY_LEN;
use super::keys::Secret32;
use super::text::is_forbidden;
use super::ProtoError;

/// The queue message type of a file chunk.
pub const TYPE_FILE_CHUNK: u8 = 0x05;
/// Bytes of the file in one chunk.
pub const CHUNK_LEN: usize = QUEUE_MSG_LEN - 1 - 4 - 16;
/// The offer format this version writes and reads.
pub const FORMAT: u8 = 1;
/// Most copies (relays) one offer lists: the recipient's up to three, and
/// as many of the sender's own for relays that would not take a queue.
pub const MAX_SETS: usize = 6;
/// Most chunks one file queue holds (no relay needs to allow more).
pub const MAX_CHUNKS_PER_QUEUE: u32 = 100_000;
/// The longest name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// The longest caption, in bytes.
pub const MAX_CAPTION_LEN: usize = 4_096;
const SET_KEY_INFO: &[u8] = b"tern/v1 file chunks";
const QUEUE_AUTH_INFO: &[u8] = b"tern/v1 file queue auth";
/// Bytes one queue adds to an offer.
pub const OFFER_QUEUE_LEN: usize = 16 + 32;

/// How many chunks a file of `size` bytes takes (at least one).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_LEN as u64).max(1)
}

/// How many bytes of the file chunk `index` holds.
pub fn chunk_data_len(size: u64, index: u64) -> usize {
    let start = index * CHUNK_LEN as u64;
    (size.saturating_sub(start)).min(CHUNK_LEN as u64) as usize
}

/// One file queue, as the recipient reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferQueue {
    pub recipient_id: Id,
    pub queue_secret: Secret32,
}

/// One copy of the file: its queues on one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSet {
    pub relay: RelayAddress,
    pub seed: Secret32,
    pub queues: Vec<OfferQueue>,
}

/// What a file offer (envelope kind 9) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOffer {
    pub size: u64,
    pub sha256: [u8; 32],
    pub key: Secret32,
    pub name: String,
    pub caption: String,
    pub chunks_per_queue: u32,
    pub sets: Vec<OfferSet>,
}

impl FileOffer {
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size)
    }

    /// How many queues each set has.
    pub fn queue_count(&self) -> usize {
        self.chunk_count().div_ceil(self.chunks_per_queue as u64) as usize
    }

    /// The body, or `TooLong` if it does not fit one envelope (too many
    /// queues: a bigger file than one offer can describe with that many
    /// relays).
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut w = Writer::with_capacity(512);
        w.u8(FORMAT)
            .u64(self.size)
            .bytes(&self.sha256)
            .bytes(self.key.as_bytes())
            .short_bytes(self.name.as_bytes());
        w.u16(self.caption.len() as u16)
            .bytes(self.caption.as_bytes())
            .u32(self.chunks_per_queue)
            .u8(self.sets.len() as u8);
        for s in &self.sets {
            s.relay.without_access_key().encode(&mut w);
            w.bytes(s.seed.as_bytes()).u16(s.queues.len() as u16);
            for q in &s.queues {
                w.bytes(&q.recipient_id).bytes(q.queue_secret.as_bytes());
            }
        }
        let body = w.into_vec();
        if body.len() > MAX_BODY_LEN {
            return Err(ProtoError::TooLong {
                len: body.len(),
                max: MAX_BODY_LEN,
            });
        }
        Ok(body)
    }

    /// Reads an offer, checking every count against the size. The name is
    /// kept as sent (valid UTF-8, non-empty); [`safe_file_name`] makes it
    /// something to save under.
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(body);
        let format = r.u8()?;
        if format != FORMAT {
            return Err(CodecError::Invalid("file offer format").into());
        }
        let size = r.u64()?;
        let sha256 = r.array()?;
        let key = Secret32(r.array()?);
        let name = utf8(r.short_bytes()?, "file name")?;
        if name.is_empty() {
            return Err(CodecError::Invalid("empty file name").into());
        }
        let caption_len = r.u16()? as usize;
        if caption_len > MAX_CAPTION_LEN {
            return Err(CodecError::Invalid("caption length").into());
        }
        let caption = utf8(r.bytes(caption_len)?, "caption")?;
        let chunks_per_queue = r.u32()?;
        if chunks_per_queue == 0 || chunks_per_queue > MAX_CHUNKS_PER_QUEUE {
            return Err(CodecError::Invalid("chunks per queue").into());
        }
        let queue_count = chunk_count(size).div_ceil(chunks_per_queue as u64);
        let set_count = r.u8()? as usize;
        if set_count == 0 || set_count > MAX_SETS {
            return Err(CodecError::Invalid("set count").into());
        }
        let mut sets = Vec::with_capacity(set_count);
        for _ in 0..set_count {
            let relay =
                RelayAddress::decode(&mut r).map_err(|e| ProtoError::Address(e.to_string()))?;
            if relay.access_key.is_some() {
                return Err(ProtoError::Address(
                    "an access key has no place in a file offer".into(),
                ));
            }
            let seed = Secret32(r.array()?);
            let n = r.u16()? as u64;
            if n != queue_count {
                return Err(CodecError::Invalid("queue count").into());
            }
            let mut queues = Vec::with_capacity(n as usize);
            for _ in 0..n {
                queues.push(OfferQueue {
                    recipient_id: r.array()?,
                    queue_secret: Secret32(r.array()?),
                });
            }
            sets.push(OfferSet {
                relay,
                seed,
                queues,
            });
        }
        r.finish()?;
        Ok(Self {
            size,
            sha256,
            key,
            name,
            caption,
            chunks_per_queue,
            sets,
        })
    }

    /// The encoded length of an offer with these counts (to decide how many
    /// relays a file can go to before anything is created).
    pub fn encoded_len(name: &str, caption: &str, relays: &[RelayAddress], queues: usize) -> usize {
        let mut fixed = 1 + 8 + 32 + 32 + 1 + name.len() + 2 + caption.len() + 4 + 1;
        for relay in relays {
            let mut w = Writer::new();
            relay.without_access_key().encode(&mut w);
            fixed += w.len() + 32 + 2 + queues * OFFER_QUEUE_LEN;
        }
        fixed
    }
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::Invalid(what).into())
}

/// The key of set number `set` of a file.
pub fn set_key(file_key: &Secret32, set: u8) -> Zeroizing<[u8; 32]> {
    let mut info = SET_KEY_INFO.to_vec();
    info.push(set);
    let mut k = Zeroizing::new([0u8; 32]);
    Hkdf::<sha2::Sha256>::new(None, file_key.as_bytes())
        .expand(&info, k.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    k
}

/// The recipient signing key of queue `queue` of a set.
pub fn queue_auth(seed: &Secret32, queue: u16) -> SigningKey {
    let mut info = QUEUE_AUTH_INFO.to_vec();
    info.extend_from_slice(&queue.to_be_bytes());
    let mut k = Zeroizing::new([0u8; 32]);
    Hkdf::<sha2::Sha256>::new(None, seed.as_bytes())
        .expand(&info, k.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    SigningKey::from_bytes(&k)
}

fn chunk_nonce(index: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..4].copy_from_slice(&index.to_be_bytes());
    n[4] = last as u8;
    XNonce::from(n)
}

fn aad(index: u32) -> [u8; 5] {
    let mut a = [0u8; 5];
    a[0] = TYPE_FILE_CHUNK;
    a[1..].copy_from_slice(&index.to_be_bytes());
    a
}

/// Seals `data` (at most [`CHUNK_LEN`] bytes) as chunk `index` of a file of
/// `count` chunks, under a set key.
pub fn seal_chunk(set_key: &[u8; 32], index: u32, count: u64, data: &[u8]) -> Vec<u8> {
    assert!(data.len() <= CHUNK_LEN);
    let mut msg = vec![0u8; QUEUE_MSG_LEN];
    msg[0] = TYPE_FILE_CHUNK;
    msg[1..5].copy_from_slice(&index.to_be_bytes());
    let body = &mut msg[5..5 + CHUNK_LEN];
    body[..data.len()].copy_from_slice(data);
    let cipher = XChaCha20Poly1305::new_from_slice(set_key).expect("32-byte key");
    let last = index as u64 + 1 == count;
    let tag = cipher
        .encrypt_in_place_detached(&chunk_nonce(index, last), &aad(index), body)
        .expect("a chunk is far below the AEAD's limit");
    msg[5 + CHUNK_LEN..].copy_from_slice(&tag);
    msg
}

/// Why a chunk was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("not a file chunk")]
    NotAChunk,
    #[error("a chunk index beyond the file")]
    Index,
    #[error("the chunk does not decrypt: altered, or from another file")]
    Decrypt,
    #[error("the last chunk's fill is not zero")]
    Padding,
}

/// The chunk number of a queue message, if it is a chunk of a file of
/// `count` chunks (before decrypting it).
pub fn chunk_index(msg: &[u8], count: u64) -> Result<u32, ChunkError> {
    if msg.len() != QUEUE_MSG_LEN || msg[0] != TYPE_FILE_CHUNK {
        return Err(ChunkError::NotAChunk);
    }
    let index = u32::from_be_bytes(msg[1..5].try_into().expect("4 bytes"));
    if index as u64 >= count {
        return Err(ChunkError::Index);
    }
    Ok(index)
}

/// Opens chunk `index` of a file of `size` bytes in place and returns its
/// data (the file's bytes it holds).
pub fn open_chunk<'m>(
    set_key: &[u8; 32],
    size: u64,
    msg: &'m mut [u8],
) -> Result<(u32, &'m [u8]), ChunkError> {
    let count = chunk_count(size);
    let index = chunk_index(msg, count)?;
    let last = index as u64 + 1 == count;
    let tag = *Tag::from_slice(&msg[5 + CHUNK_LEN..]);
    let cipher = XChaCha20Poly1305::new_from_slice(set_key).expect("32-byte key");
    let body = &mut msg[5..5 + CHUNK_LEN];
    cipher
        .decrypt_in_place_detached(&chunk_nonce(index, last), &aad(index), body, &tag)
        .map_err(|_| ChunkError::Decrypt)?;
    let n = chunk_data_len(size, index as u64);
    if body[n..].iter().any(|&b| b != 0) {
        return Err(ChunkError::Padding);
    }
    Ok((index, &msg[5..5 + n]))
}

/// A name to save a received file under: the sender's name with any path
/// taken off (the part after the last `/` or `\`), every control, format
/// (bidi, zero-width) and line-separator character and every character
/// file systems refuse or shells trip on (`/ \ : * ? " < > |`) replaced by
/// `_`, leading dots and spaces dropped (no hidden files, no `..`), at most
/// 255 bytes (cut at a character boundary, the extension kept when it is
/// short), and `file` if nothing is left.
pub fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut s: String = base
        .chars()
        .map(|c| {
            if is_forbidden(c) || matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|') {
                '_'
            } else {
                c
            }
        })
        .collect();
    s = s
        .trim_start_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_end()
        .to_string();
    if s.len() > MAX_NAME_LEN {
        let ext = s
            .rfind('.')
            .map(|i| s[i..].to_string())
            .filter(|e| e.len() <= 16)
            .unwrap_or_default();
        let mut cut = MAX_NAME_LEN - ext.len();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s = format!("{}{ext}", &s[..cut]);
    }
    if s.is_empty() {
        "file".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn offer(size: u64, sets: usize) -> FileOffer {
        let key =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random_from_rng(OsRng));
        let relay = RelayAddress::new(
            tern_wire::address::Host::V4([127, 0, 0, 1].into()),
            5223,
            key.to_bytes(),
        );
        let cpq = 1000;
        let n = chunk_count(size).div_ceil(cpq) as usize;
        FileOffer {
            size,
            sha256: [7; 32],
            key: Secret32::random(&mut OsRng),
            name: "report.pdf".into(),
            caption: "the numbers".into(),
            chunks_per_queue: cpq as u32,
            sets: (0..sets)
                .map(|_| OfferSet {
                    relay: relay.clone(),
                    seed: Secret32::random(&mut OsRng),
                    queues: (0..n)
                        .map(|i| OfferQueue {
                            recipient_id: [i as u8; 16],
                            queue_secret: Secret32::random(&mut OsRng),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_offer_reads_back_and_its_counts_are_checked() {
        let o = offer(100 << 20, 2);
        let body = o.encode().unwrap();
        assert_eq!(FileOffer::decode(&body).unwrap(), o);
        // A queue count that does not match the size is refused.
        let mut bad = o.clone();
        bad.size = 1;
        assert!(FileOffer::decode(&bad.encode().unwrap()).is_err());
        // Every truncation is refused.
        for n in 0..body.len() {
            assert!(FileOffer::decode(&body[..n]).is_err(), "truncated to {n}");
        }
        // A gibibyte with three relays fits one envelope.
        assert!(offer(1 << 30, 3).encode().is_ok());
    }

    #[test]
    fn chunks_open_only_in_place_and_whole() {
        let key = set_key(&Secret32([1; 32]), 0);
        let size = (CHUNK_LEN * 2 + 5) as u64;
        let count = chunk_count(size);
        assert_eq!(count, 3);
        let data: Vec<u8> = (0..5).collect();
        let mut m = seal_chunk(&key, 2, count, &data);
        let mut copy = m.clone();
        let (i, d) = open_chunk(&key, size, &mut copy).unwrap();
        assert_eq!((i, d), (2, &data[..]));
        // A bit flipped anywhere is refused.
        for pos in [0, 1, 4, 5, 100, QUEUE_MSG_LEN - 1] {
            let mut x = m.clone();
            x[pos] ^= 1;
            assert!(open_chunk(&key, size, &mut x).is_err(), "flip at {pos}");
        }
        // Moved to another position (the index rewritten) it does not open.
        m[1..5].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(open_chunk(&key, size, &mut m), Err(ChunkError::Decrypt));
        // The last chunk presented as a file that goes on does not open
        // (truncation): the same bytes, a bigger size.
        let mut last = seal_chunk(&key, 2, count, &data);
        assert_eq!(
            open_chunk(&key, size + CHUNK_LEN as u64, &mut last),
            Err(ChunkError::Decrypt)
        );
        // Another set's key does not open it.
        let mut other = seal_chunk(&key, 0, count, &[0; CHUNK_LEN]);
        assert!(open_chunk(&set_key(&Secret32([1; 32]), 1), size, &mut other).is_err());
    }

    #[test]
    fn an_empty_file_is_one_chunk_of_zeros() {
        let key = set_key(&Secret32([2; 32]), 0);
        assert_eq!(chunk_count(0), 1);
        let mut m = seal_chunk(&key, 0, 1, &[]);
        assert_eq!(open_chunk(&key, 0, &mut m).unwrap().1, &[] as &[u8]);
    }

    #[test]
    fn names_lose_paths_and_tricks() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name(".bashrc"), "bashrc");
        assert_eq!(safe_file_name("a\u{202e}gpj.exe"), "a_gpj.exe");
        assert_eq!(safe_file_name("line\nbreak\r.txt"), "line_break_.txt");
        assert_eq!(safe_file_name("x\u{200b}y"), "x_y");
        assert_eq!(safe_file_name("a:b*c?.txt"), "a_b_c_.txt");
        assert_eq!(safe_file_name(""), "file");
        let long = format!("{}.tar.gz", "é".repeat(300));
        let s = safe_file_name(&long);
        assert!(s.len() <= MAX_NAME_LEN && s.ends_with(".gz"), "{s}");
    }
}
