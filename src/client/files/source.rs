//! An outgoing file's bytes: read from the user's file (checked unchanged
//! since it was offered), or from standard input, which is spooled first —
//! encrypted under a key of its own, so that nothing of it lies on disk in
//! the clear — because an offer needs the size and digest before the first
//! chunk goes out.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

use super::{SourceRecord, Transfer};
use crate::proto::file::{chunk_data_len, CHUNK_LEN};
use crate::proto::keys::Secret32;

/// A spooled chunk: its bytes and the tag.
const SPOOL_CHUNK_LEN: usize = CHUNK_LEN + 16;

/// Why an outgoing file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: io::Error },
    #[error(
        "{path} changed since it was offered (its size or time is not what it was): \
         send it again with `tern send --file`"
    )]
    Changed { path: String },
    #[error("the spooled copy of standard input is damaged ({0}): send it again")]
    Spool(String),
}

/// The size, SHA-256 and record of the user's file at `path`.
pub fn from_path(path: &Path) -> Result<(u64, [u8; 32], SourceRecord), SourceError> {
    let read_err = |err| SourceError::Read {
        path: path.display().to_string(),
        err,
    };
    let path = std::fs::canonicalize(path).map_err(read_err)?;
    let mut f = File::open(&path).map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::other("not a regular file")));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    if size != meta.len() {
        return Err(SourceError::Changed {
            path: path.display().to_string(),
        });
    }
    let record = SourceRecord::Path {
        modified_ns: modified_ns(&meta),
        size,
        path,
    };
    Ok((size, h.finalize().into(), record))
}

fn modified_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

fn spool_nonce(index: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..8].copy_from_slice(&index.to_be_bytes());
    XNonce::from(n)
}

/// Spools `input` into `dir` (encrypted chunk by chunk), returning its size,
/// SHA-256 and record. The spool file is private (0600) and fsynced.
pub fn spool(
    input: &mut dyn Read,
    dir: &Path,
    name: &str,
) -> Result<(u64, [u8; 32], SourceRecord), SourceError> {
    let path = dir.join(format!(
        "{}.spool",
        data_encoding::HEXLOWER.encode(&super::super::random_id())
    ));
    let err = |err| SourceError::Read {
        path: name.to_string(),
        err,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(&path)
        .map_err(err)?;
    let key = Secret32::random(&mut OsRng);
    let cipher = XChaCha20Poly1305::new_from_slice(key.as_bytes()).expect("32-byte key");
    let mut h = Sha256::new();
    let mut size = 0u64;
    let mut index = 0u64;
    let mut chunk = vec![0u8; CHUNK_LEN];
    let result = (|| {
        loop {
            let n = read_full(input, &mut chunk)?;
            h.update(&chunk[..n]);
            size += n as u64;
            chunk[n..].fill(0);
            let tag = cipher
                .encrypt_in_place_detached(&spool_nonce(index), b"", &mut chunk)
                .expect("within the AEAD's limit");
            out.write_all(&chunk)?;
            out.write_all(&tag)?;
            index += 1;
            if n < CHUNK_LEN {
                break;
            }
        }
        out.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&path);
        return Err(err(e));
    }
    // A size that is an exact multiple of a chunk spooled one chunk of
    // zeros more than it needs; reading never asks for it.
    Ok((size, h.finalize().into(), SourceRecord::Spool { path, key }))
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// An open outgoing file, read chunk by chunk from any thread.
pub struct Source {
    file: File,
    size: u64,
    spool: Option<XChaCha20Poly1305>,
    label: String,
}

impl Source {
    pub fn open(t: &Transfer) -> Result<Self, SourceError> {
        match &t.source {
            Some(SourceRecord::Path {
                path,
                size,
                modified_ns: m,
            }) => {
                let label = path.display().to_string();
                let file = File::open(path).map_err(|err| SourceError::Read {
                    path: label.clone(),
                    err,
                })?;
                let meta = file.metadata().map_err(|err| SourceError::Read {
                    path: label.clone(),
                    err,
                })?;
                if meta.len() != *size || modified_ns(&meta) != *m {
                    return Err(SourceError::Changed { path: label });
                }
                Ok(Self {
                    file,
                    size: *size,
                    spool: None,
                    label,
                })
            }
            Some(SourceRecord::Spool { path, key }) => {
                let file = File::open(path).map_err(|e| SourceError::Spool(e.to_string()))?;
                Ok(Self {
                    file,
                    size: t.size,
                    spool: Some(
                        XChaCha20Poly1305::new_from_slice(key.as_bytes()).expect("32-byte key"),
                    ),
                    label: t.name.clone(),
                })
            }
            None => Err(SourceError::Spool("no source recorded".into())),
        }
    }

    /// The file's bytes in chunk `index`.
    pub fn chunk(&self, index: u64) -> Result<Vec<u8>, SourceError> {
        let n = chunk_data_len(self.size, index);
        match &self.spool {
            None => {
                let mut buf = vec![0u8; n];
                self.file
                    .read_exact_at(&mut buf, index * CHUNK_LEN as u64)
                    .map_err(|err| SourceError::Read {
                        path: self.label.clone(),
                        err,
                    })?;
                Ok(buf)
            }
            Some(cipher) => {
                let mut buf = vec![0u8; SPOOL_CHUNK_LEN];
                self.file
                    .read_exact_at(&mut buf, index * SPOOL_CHUNK_LEN as u64)
                    .map_err(|e| SourceError::Spool(e.to_string()))?;
                let tag = *Tag::from_slice(&buf[CHUNK_LEN..]);
                buf.truncate(CHUNK_LEN);
                cipher
                    .decrypt_in_place_detached(&spool_nonce(index), b"", &mut buf, &tag)
                    .map_err(|_| SourceError::Spool("a chunk does not decrypt".into()))?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }
}

/// Removes a transfer's spool file, if it has one.
pub fn remove_spool(t: &Transfer) {
    if let Some(r) = &t.source {
        remove_spool_record(r);
    }
}

/// Removes the spool file of a source, if it is one.
pub fn remove_spool_record(r: &SourceRecord) {
    if let SourceRecord::Spool { path, .. } = r {
        let _ = std::fs::remove_file(path);
    }
}

/// Where spools of standard input go: inside the profile.
pub fn spool_dir(home: &Path) -> PathBuf {
    home.join("files").join("spool")
}
