//! One daemon per profile, and a socket only its user can reach.
//!
//! Each served home gets `daemon.lock`, held with `flock` for as long as
//! the daemon runs: the kernel drops it when the process ends, however it
//! ends, so a SIGKILL leaves no lock behind, and a second daemon is
//! refused with the first one's pid and socket (which the file records).
//! The socket has a lock of its own (`PATH.lock`), so that removing a
//! stale socket left by a killed daemon can never remove a live one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustix::fs::{flock, FlockOperation};
use sha2::{Digest, Sha256};

use crate::cli::exit::{fail, FAILURE};

/// The lock file in a served home.
pub const LOCK_FILE: &str = "daemon.lock";
/// The socket's name beside the profile, without `$XDG_RUNTIME_DIR`.
pub const SOCKET_FILE: &str = "daemon.sock";

/// A held lock; released when dropped (or when the process ends).
pub struct Lock {
    _file: File,
}

/// What a lock file says about the daemon holding it.
fn holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.read_to_string(&mut s);
    let mut lines = s.lines();
    match (lines.next(), lines.next()) {
        (Some(pid), Some(sock)) => format!("pid {pid}, socket {sock}"),
        _ => "starting".to_string(),
    }
}

/// Takes `path` (created 0600) without waiting; `Ok(Err(who))` if another
/// process holds it, with what the file says about that process.
fn try_lock(path: &Path) -> anyhow::Result<Result<Lock, String>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Ok(Lock { _file: file })),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(Err(holder(&mut file))),
        Err(e) => Err(anyhow::Error::from(std::io::Error::from(e))
            .context(format!("locking {}", path.display()))),
    }
}

/// Locks `home` for this daemon, recording its pid and socket; refuses if
/// another daemon (or `tern jsonrpc`) serves it.
pub fn lock_home(home: &Path, socket: &str) -> anyhow::Result<Lock> {
    let path = home.join(LOCK_FILE);
    let lock = try_lock(&path)?.map_err(|who| {
        fail(
            FAILURE,
            format!(
                "another tern daemon serves {} ({who}): talk to it through its socket, or stop \
                 it first",
                home.display()
            ),
        )
    })?;
    let mut f = &lock._file;
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}\n{socket}", std::process::id())?;
    Ok(lock)
}

/// The socket the lock file of `home` names (for the one-shot commands,
/// which then see whether something answers there). Takes no lock, so that
/// it never stands in a starting daemon's way.
pub fn socket_of(home: &Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string(home.join(LOCK_FILE)).ok()?;
    let sock = s.lines().nth(1).filter(|l| *l != "-")?;
    Some(PathBuf::from(sock))
}

/// Where the socket goes by default: `$XDG_RUNTIME_DIR/tern/ID.sock`, ID
/// naming the set of served homes, or else beside the (first) profile.
pub fn default_socket(homes: &[PathBuf]) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let mut h = Sha256::new();
            for home in homes {
                let canon = home.canonicalize().unwrap_or_else(|_| home.clone());
                h.update(canon.as_os_str().as_encoded_bytes());
                h.update([0]);
            }
            let id = data_encoding::HEXLOWER.encode(&h.finalize()[..8]);
            PathBuf::from(dir).join("tern").join(format!("{id}.sock"))
        }
        None => homes[0].join(SOCKET_FILE),
    }
}

/// Checks that `dir` is ours and closed to everyone else.
fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let uid = rustix::process::getuid().as_raw();
    if meta.uid() != uid {
        return Err(fail(
            FAILURE,
            format!(
                "the socket's directory {} belongs to another user: choose --socket in a \
                 directory of your own",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(fail(
            FAILURE,
            format!(
                "the socket's directory {} is open to other users (mode {:o}): `chmod 700` it, \
                 or choose --socket in a private directory",
                dir.display(),
                meta.mode() & 0o777
            ),
        ));
    }
    Ok(())
}

/// A bound socket and the lock that makes it ours; the socket file is
/// removed when this is dropped.
pub struct Socket {
    pub listener: UnixListener,
    pub path: PathBuf,
    _lock: Lock,
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path`, mode 0600 in a 0700 directory (created if
/// missing). A socket left by a daemon that was killed is replaced; a
/// live one, a file that is not a socket, or one of another user is
/// refused.
pub fn bind(path: &Path) -> anyhow::Result<Socket> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    check_private_dir(&dir)?;
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = try_lock(Path::new(&lock_name))?.map_err(|_| {
        fail(
            FAILURE,
            format!("another tern daemon serves {}", path.display()),
        )
    })?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(
                FAILURE,
                format!(
                    "{} exists and is not a socket: remove it, or choose another --socket",
                    path.display()
                ),
            ));
        }
        if meta.uid() != rustix::process::getuid().as_raw() {
            return Err(fail(
                FAILURE,
                format!(
                    "the socket {} belongs to another user: not touched; choose another --socket",
                    path.display()
                ),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(fail(
                FAILURE,
                format!("another process serves the socket {}", path.display()),
            ));
        }
        // Left by a daemon that was killed: ours, and nobody listens.
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "creating the socket {} (a path longer than about 100 bytes does not fit: choose a \
             shorter --socket)",
            path.display()
        )
    })?;
    // The directory keeps others out meanwhile.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    Ok(Socket {
        listener,
        path: path.to_path_buf(),
        _lock: lock,
    })
}
