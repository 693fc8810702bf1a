//! The relay's identity key file, `identity.key` in the data directory.
//!
//! The file holds the 32 secret bytes of the X25519 key whose public half is
//! the relay's address. Losing it changes the address and orphans every
//! queue, so it is written atomically (temp file, fsync, rename, fsync of the
//! directory) and only ever created, never rewritten.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::error::RelayError;
use crate::log::warning;

/// The relay's X25519 identity key pair: the public half is pinned in the
/// relay's address, the secret half answers session handshakes.
pub struct RelayIdentity {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl RelayIdentity {
    pub fn generate(rng: &mut OsRng) -> Self {
        let s = x25519_dalek::StaticSecret::random_from_rng(rng);
        Self::from_secret(&Zeroizing::new(s.to_bytes()))
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let s = x25519_dalek::StaticSecret::from(*secret);
        Self {
            public: x25519_dalek::PublicKey::from(&s).to_bytes(),
            secret: Zeroizing::new(*secret),
        }
    }

    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.secret.clone()
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

pub(crate) const IDENTITY_FILE: &str = "identity.key";
const IDENTITY_TMP: &str = "identity.key.tmp";

pub(crate) fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// Creates the data directory (owner-only) if it does not exist yet.
pub(crate) fn ensure_data_dir(data_dir: &Path) -> Result<(), RelayError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| RelayError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })
}

/// Reads the identity; `Ok(None)` when there is none yet.
pub(crate) fn load(data_dir: &Path) -> Result<Option<RelayIdentity>, RelayError> {
    let path = identity_path(data_dir);
    let io_err = |source| RelayError::Identity {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mode = file.metadata().map_err(io_err)?.permissions().mode();
    if mode & 0o077 != 0 {
        warning!(
            "{} is readable by other users (mode {:o}); restrict it with chmod 600",
            path.display(),
            mode & 0o777
        );
    }
    // Read one byte more than needed so a longer file is detected, not truncated.
    let mut buf = Zeroizing::new([0u8; 33]);
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    if len != 32 {
        return Err(RelayError::IdentityCorrupt { path });
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&buf[..32]);
    Ok(Some(RelayIdentity::from_secret(&secret)))
}

/// Reads the identity, creating it on first start. The caller must hold the
/// data directory lock.
pub(crate) fn load_or_create(data_dir: &Path) -> Result<RelayIdentity, RelayError> {
    if let Some(id) = load(data_dir)? {
        return Ok(id);
    }
    let identity = RelayIdentity::generate(&mut OsRng);
    let path = identity_path(data_dir);
    write_atomically(data_dir, &identity.secret_bytes()[..]).map_err(|source| {
        RelayError::Identity {
            path: path.clone(),
            source,
        }
    })?;
    Ok(identity)
}

fn write_atomically(data_dir: &Path, secret: &[u8]) -> std::io::Result<()> {
    let tmp = data_dir.join(IDENTITY_TMP);
    // A temp file left by a crash holds a key that was never used: replace it.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret)?;
    f.sync_all()?;
    drop(f);
    // The caller holds the data directory lock, so no other relay can be
    // creating an identity at the same time.
    fs::rename(&tmp, identity_path(data_dir))?;
    File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_600() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        let meta = fs::metadata(identity_path(dir.path())).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        assert!(!dir.path().join(IDENTITY_TMP).exists());
    }

    #[test]
    fn wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(identity_path(dir.path()), [1u8; 31]).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(RelayError::IdentityCorrupt { .. })
        ));
        fs::write(identity_path(dir.path()), [1u8; 33]).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(RelayError::IdentityCorrupt { .. })
        ));
    }
}
