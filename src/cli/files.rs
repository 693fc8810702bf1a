//! Files tern writes outside the profile store (exported identities,
//! avatars, invitation pictures): private from the first byte, parent
//! directories made as needed (mode 0700), an existing file replaced only
//! when asked to (`--force`), atomically.

use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::exit::{fail, USAGE};

/// Creates the missing parent directories of `path`, mode 0700 (as ssh and
/// gpg do for theirs: they hold secrets).
pub fn create_parents(path: &Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() && !p.exists() => private_dir(p),
        _ => Ok(()),
    }
}

/// Creates `dir` and its missing parents with mode 0700.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("creating the directory {}", dir.display()))
}

/// The refusal every command gives for an existing output file.
pub fn refuse_existing(path: &Path) -> anyhow::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(fail(
            USAGE,
            format!(
                "{} exists: pass --force to replace it; nothing was written",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn tmp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()))
}

/// Writes `data` to `path` with mode 0600: refused if it exists unless
/// `force`; written to a private temporary file beside it, synced and
/// renamed over, so a reader never sees half a file.
pub fn write_private(path: &Path, data: &[u8], force: bool) -> anyhow::Result<()> {
    if !force {
        refuse_existing(path)?;
    }
    create_parents(path)?;
    let tmp = tmp_beside(path);
    let r = (|| {
        let mut f = crate::store::create_private(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        if !force && fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.with_context(|| format!("writing {}", path.display()))
}
