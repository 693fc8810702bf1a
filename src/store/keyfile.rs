//! The profile's root secret on disk: an age X25519 identity, either wrapped
//! in a standard passphrase-encrypted age file (`key.age`) or, for profiles
//! created with `--no-passphrase`, stored in the clear in
//! `identity-unprotected.txt`. Exported identity files use the same text
//! format, the one `age-keygen` writes, so `age -i FILE` accepts them too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::iter;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::StoreError;

/// scrypt work factor (N = 2^16) for the key files we write.
///
/// Chosen so that unlocking stays well inside the 0.5 s budget on the
/// project's reference machine (2 cores, 24 GiB). Measured there with the
/// ignored test `store::keyfile::tests::measure_scrypt_unlock`, which times
/// the real unlock path (read `key.age`, age-crate scrypt, decrypt, parse),
/// best of 3:
///
/// ```text
/// cargo test --release --lib store::keyfile::tests::measure_scrypt_unlock -- --ignored --nocapture
/// log_n 15: 0.079 s   16: 0.162 s   17: 0.321 s   18: 0.637 s
/// ```
///
/// (the dev profile, whose dependencies are built at opt-level 2, gives
/// 0.178 s at 16). The Go `age` CLI 1.1.1 opens such a file in about 0.28 s,
/// pseudo-terminal setup included (see the `age_cli_interop` test). 17
/// would fit too, but leaves no headroom for a busy or slower machine; 18
/// (and age's automatic choice, which aims at 1 s and overshoots to about
/// 2 s here) does not fit.
pub const SCRYPT_LOG_N: u8 = 16;

/// The largest scrypt work factor we accept when decrypting `key.age`.
///
/// scrypt with r = 8 needs 2^log_n KiB of memory: 2^20 is 1 GiB and about
/// 3 s here, 2^22 would be 4 GiB and over 10 s. A damaged or hostile key file
/// could otherwise make `tern` spin and swap. 20 still opens a key file that
/// a user re-encrypted by hand with `age -p` (which picks 18 on most
/// machines).
pub const MAX_SCRYPT_LOG_N: u8 = 20;

/// Key and identity files are a few hundred bytes; refuse to read more so a
/// wrong path (a disk image, /dev/zero) fails fast.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// The identity plus its canonical text form (what `key.age` decrypts to and
/// what `export_identity` writes).
pub(crate) struct Unlocked {
    pub(crate) identity: age::x25519::Identity,
    pub(crate) text: Zeroizing<String>,
}

/// Never prints the secret.
impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unlocked")
            .field("recipient", &self.identity.to_public().to_string())
            .finish_non_exhaustive()
    }
}

impl Unlocked {
    pub(crate) fn generate() -> Unlocked {
        let identity = age::x25519::Identity::generate();
        let text = identity_text(&identity, &rfc3339_now());
        Unlocked { identity, text }
    }
}

/// `age-keygen`'s format: `# created:` and `# public key:` comments, then
/// the secret key.
fn identity_text(identity: &age::x25519::Identity, created: &str) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let secret = identity.to_string();
    // Pre-sized (the text is about 190 bytes) so the secret is never copied
    // by a reallocation.
    let mut text = Zeroizing::new(String::with_capacity(512));
    // Writing to a String cannot fail.
    let _ = write!(
        text,
        "# created: {created}\n# public key: {}\n{}\n",
        identity.to_public(),
        secret.expose_secret()
    );
    text
}

/// Parse an identity file: comments and blank lines, exactly one
/// `AGE-SECRET-KEY-1…` line. Errors never quote the file's content, which
/// may be a secret.
fn parse_identity(bytes: &[u8]) -> Result<Unlocked, String> {
    if bytes.starts_with(b"age-encryption.org/") {
        return Err(
            "this is an encrypted age file (like key.age), not an identity: \
                    unlock with the passphrase instead"
                .into(),
        );
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not a text file".to_string())?;
    let mut created: Option<&str> = None;
    let mut found: Option<age::x25519::Identity> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix("# created:") {
            let c = c.trim();
            // Only carried over if it looks like a timestamp.
            if c.len() <= 40 && c.bytes().all(|b| b.is_ascii_graphic()) {
                created = Some(c);
            }
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with("AGE-SECRET-KEY-1") {
            return Err(format!(
                "line {} is not an age X25519 identity (AGE-SECRET-KEY-1…)",
                i + 1
            ));
        }
        let id = age::x25519::Identity::from_str(line)
            .map_err(|e| format!("line {} is not a valid age identity: {e}", i + 1))?;
        if found.is_some() {
            return Err("it holds more than one identity; tern needs exactly one".into());
        }
        found = Some(id);
    }
    let identity = found.ok_or_else(|| "no AGE-SECRET-KEY-1… line in it".to_string())?;
    let text = identity_text(&identity, created.unwrap_or("unknown"));
    Ok(Unlocked { identity, text })
}

/// Read at most `MAX_KEY_FILE_LEN` bytes into zeroizing memory.
fn read_small(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    let file = File::open(path)?;
    // Pre-sized so a real key file is read without reallocating, which
    // would leave copies of the secret in freed memory.
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    file.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_KEY_FILE_LEN} bytes: not a key file"),
        ));
    }
    Ok(buf)
}

/// Read an identity file (exported, or the unprotected profile's). Like ssh,
/// refuse one that other users can read or write: it is the whole profile.
pub(crate) fn read_identity_file(path: &Path) -> Result<Unlocked, StoreError> {
    let err = |detail: String| StoreError::IdentityFile {
        path: path.to_path_buf(),
        detail,
    };
    let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "other users can access it (mode {mode:04o}): run `chmod 600 {}`",
                path.display()
            )));
        }
    }
    let bytes = read_small(path).map_err(|e| err(e.to_string()))?;
    parse_identity(&bytes).map_err(err)
}

/// SHA-256 of a key file. The store records the hashes of the key files it
/// wrote, which lets `open` tell a wrong passphrase from a damaged key file:
/// a flipped bit in the scrypt stanza fails exactly like a wrong passphrase.
pub(crate) fn key_file_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Encrypt the identity text to a passphrase, as a standard binary age file.
pub(crate) fn encrypt_key_file(
    path: &Path,
    text: &str,
    passphrase: SecretString,
) -> Result<Vec<u8>, StoreError> {
    let mut recipient = age::scrypt::Recipient::new(passphrase);
    recipient.set_work_factor(SCRYPT_LOG_N);
    let io_err = |e: io::Error| StoreError::io(path, e);
    // A lone scrypt recipient is always accepted; the error is mapped, not
    // unwrapped, so a future age change cannot turn into a panic.
    let encryptor = age::Encryptor::with_recipients(iter::once(&recipient as &dyn age::Recipient))
        .map_err(|e| io_err(io::Error::other(e.to_string())))?;
    let mut out = Vec::with_capacity(512);
    let mut writer = encryptor.wrap_output(&mut out).map_err(io_err)?;
    writer.write_all(text.as_bytes()).map_err(io_err)?;
    writer.finish().map_err(io_err)?;
    Ok(out)
}

/// Decrypt `key.age` with a passphrase.
///
/// `known_hashes` are the hashes of key files this profile wrote; they only
/// matter when decryption fails, to choose between "wrong passphrase" and
/// "damaged key file".
pub(crate) fn unlock_key_file(
    path: &Path,
    passphrase: SecretString,
    known_hashes: &[[u8; 32]],
) -> Result<Unlocked, StoreError> {
    let corrupt = |detail: String| StoreError::KeyFileCorrupt {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = match read_small(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::KeyFileMissing(path.to_path_buf()))
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(corrupt(e.to_string())),
        Err(e) => return Err(StoreError::io(path, e)),
    };

    let decryptor = age::Decryptor::new_buffered(&bytes[..])
        .map_err(|e| corrupt(format!("not a readable age file ({e})")))?;
    if !decryptor.is_scrypt() {
        return Err(corrupt("not a passphrase-encrypted age file".into()));
    }
    let mut identity = age::scrypt::Identity::new(passphrase);
    identity.set_max_work_factor(MAX_SCRYPT_LOG_N);

    let mut reader = match decryptor.decrypt(iter::once(&identity as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::DecryptionFailed) => {
            // Same error for a wrong passphrase and for a damaged stanza:
            // only a key file we wrote ourselves proves it is the former.
            let hash = key_file_hash(&bytes);
            let ours = known_hashes
                .iter()
                .fold(subtle::Choice::from(0), |acc, h| acc | h.ct_eq(&hash));
            return Err(if bool::from(ours) {
                StoreError::WrongPassphrase
            } else {
                corrupt(
                    "it does not decrypt, and it is not a key file this profile wrote \
                     (if you re-encrypted it by hand, check the passphrase)"
                        .into(),
                )
            });
        }
        Err(age::DecryptError::ExcessiveWork { required, .. }) => {
            return Err(corrupt(format!(
                "it asks for scrypt work factor 2^{required}, tern accepts at most \
                 2^{MAX_SCRYPT_LOG_N}"
            )))
        }
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let mut plain = Zeroizing::new(Vec::with_capacity(4096));
    (&mut reader)
        .take(MAX_KEY_FILE_LEN)
        .read_to_end(&mut plain)
        .map_err(|_| corrupt("its content is truncated or damaged".into()))?;
    parse_identity(&plain).map_err(|d| corrupt(format!("decrypted, but {d}")))
}

/// Write `data` to `path` atomically with mode 0600: a fresh temporary file
/// next to it (random name, so nothing of the user's is clobbered), fsync,
/// rename over, fsync the directory. A crash leaves either the old file or
/// the new one, never a mix; at worst a stray `.NAME.*.tmp`, which `open`
/// removes for the profile's own files.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| StoreError::io(path, e))
}

/// Write a new file with mode 0600, failing if it exists.
pub(crate) fn write_new(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let result = (|| {
        let mut f = create_private(path)?;
        if let Err(e) = f.write_all(data).and_then(|()| f.sync_all()) {
            drop(f);
            let _ = fs::remove_file(path);
            return Err(e);
        }
        sync_parent(path)
    })();
    match result {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(StoreError::FileExists(path.to_path_buf()))
        }
        r => r.map_err(|e| StoreError::io(path, e)),
    }
}

/// `O_CREAT | O_EXCL`, mode 0600 from the start (not chmod after, which
/// would leave a window where the file is readable).
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// `.NAME.<random>.tmp` beside `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    path.with_file_name(name)
}

/// Whether `name` is a temporary file left by `write_atomic` for `target`.
pub(crate) fn is_tmp_for(name: &std::ffi::OsStr, target: &str) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(target))
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.strip_suffix(".tmp"))
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Make a rename or unlink durable (the directory entry lives in the
/// directory's own data).
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Remove a file if present; returns whether something was removed.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// UTC now as RFC 3339, the format of age-keygen's `# created:` line.
fn rfc3339_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    crate::time::rfc3339(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pass(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[test]
    fn identity_text_round_trip() {
        let u = Unlocked::generate();
        assert!(u.text.starts_with("# created: 20"));
        assert!(u.text.contains("\nAGE-SECRET-KEY-1"));
        let back = parse_identity(u.text.as_bytes()).unwrap();
        assert_eq!(back.text, u.text);
    }

    #[test]
    fn identity_parse_errors_do_not_quote_content() {
        let e = parse_identity(b"hello secret\n").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(parse_identity(b"# only a comment\n").is_err());
        assert!(parse_identity(&[0xff, 0xfe]).is_err());
        let u = Unlocked::generate();
        let two = format!("{}{}", &*u.text, &*Unlocked::generate().text);
        assert!(parse_identity(two.as_bytes()).is_err());
        assert!(parse_identity(b"age-encryption.org/v1\n").is_err());
    }

    #[test]
    fn timestamp_format() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn excessive_work_factor_is_refused_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.age");
        let mut r = age::scrypt::Recipient::new(pass("pw"));
        // Writing at 2^21 would itself take seconds, so forge the header:
        // write at 2^10, then edit the work factor in the stanza line.
        r.set_work_factor(10);
        let bytes = age::encrypt(&r, b"x").unwrap();
        let text_end = bytes.windows(4).position(|w| w == b"\n---").unwrap();
        let header = std::str::from_utf8(&bytes[..text_end]).unwrap();
        let forged = header.replace(" 10\n", " 21\n");
        let mut out = forged.into_bytes();
        out.extend_from_slice(&bytes[text_end..]);
        fs::write(&path, &out).unwrap();
        let t = Instant::now();
        let err = unlock_key_file(&path, pass("pw"), &[]).err().unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(&err, StoreError::KeyFileCorrupt { detail, .. } if detail.contains("2^21")),
            "{err}"
        );
    }

    /// Times the real unlock path at several work factors. Ignored: it is a
    /// measurement, not a check. Run it with
    /// `cargo test --lib store::keyfile::tests::measure_scrypt_unlock -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_scrypt_unlock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.age");
        let u = Unlocked::generate();
        for log_n in 14..=18u8 {
            let mut r = age::scrypt::Recipient::new(pass("correct horse"));
            r.set_work_factor(log_n);
            fs::write(&path, age::encrypt(&r, u.text.as_bytes()).unwrap()).unwrap();
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    unlock_key_file(&path, pass("correct horse"), &[]).unwrap();
                    t.elapsed()
                })
                .min()
                .unwrap();
            println!("log_n {log_n}: unlock {:.3} s", best.as_secs_f64());
        }
    }
}
