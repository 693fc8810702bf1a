use std::path::PathBuf;

use rusqlite::ErrorCode;
use thiserror::Error;

/// Everything that can go wrong with a profile. Messages are written for the
/// person at the terminal: they say what happened and what to do about it.
///
/// No message ever contains a secret or a decrypted value; record names
/// appear only in [`StoreError::Encode`] / [`StoreError::Decode`], and those
/// are opaque ids chosen by the caller.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `open` on a directory that holds no `store.db`.
    #[error("no profile in {}: run `tern init`", .0.display())]
    NoProfile(PathBuf),

    /// `create` on a directory that already holds a profile.
    #[error("a profile already exists in {}: open it, or choose another --home", .0.display())]
    AlreadyExists(PathBuf),

    /// `create` found a key file but no `store.db` and no sign of an
    /// interrupted `create`.
    #[error(
        "{} exists but there is no store.db beside it: if you moved store.db, \
         put it back; otherwise remove the key file to create a new profile",
        .0.display()
    )]
    StrayKeyFile(PathBuf),

    /// The passphrase does not open `key.age`. The CLI maps this to its own
    /// exit code. Nothing on disk was touched.
    #[error("wrong passphrase")]
    WrongPassphrase,

    /// An empty passphrase was given to `create` or `set_key`.
    #[error("the passphrase is empty: choose one, or create the profile with --no-passphrase")]
    EmptyPassphrase,

    /// `key.age` is unreadable as a key file: truncated, bit-flipped, not an
    /// age file, or asking for an absurd scrypt work factor.
    #[error(
        "the key file {} is damaged: {detail}; restore it from a backup, \
         or unlock with an exported identity file",
        path.display()
    )]
    KeyFileCorrupt { path: PathBuf, detail: String },

    /// The profile is passphrase-protected but `key.age` is gone.
    #[error(
        "the key file {} is missing: restore it from a backup, \
         or unlock with an exported identity file",
        .0.display()
    )]
    KeyFileMissing(PathBuf),

    /// An identity file (exported, or the unprotected profile's own) cannot
    /// be used: missing, unreadable, readable by others, or not an age
    /// identity.
    #[error("identity file {}: {detail}", path.display())]
    IdentityFile { path: PathBuf, detail: String },

    /// A well-formed identity that belongs to some other profile.
    #[error(
        "this identity does not unlock the profile in {}: it belongs to another profile",
        .0.display()
    )]
    WrongIdentity(PathBuf),

    /// A key file or identity this profile used before `tern key passwd
    /// --rekey` retired it.
    #[error(
        "this key was retired when the profile in {} was re-keyed (`tern key passwd --rekey`): \
         use the current passphrase, or an identity exported since",
        .0.display()
    )]
    RetiredKey(PathBuf),

    /// Another process re-keyed the profile while this one had it open.
    #[error("the profile was re-keyed by another tern process meanwhile: run the command again")]
    Rekeyed,

    /// Opened without a passphrase, but the profile has one.
    #[error(
        "the profile in {} is protected by a passphrase: give the passphrase, \
         or an exported identity file",
        .0.display()
    )]
    PassphraseRequired(PathBuf),

    /// Opened with a passphrase, but the profile was created without one.
    #[error(
        "the profile in {} has no passphrase (it was created with --no-passphrase): \
         open it without one",
        .0.display()
    )]
    NotPassphraseProtected(PathBuf),

    /// `export_identity` would overwrite a file and was not told to.
    #[error("{} already exists: choose another path, or allow overwriting it", .0.display())]
    FileExists(PathBuf),

    /// Another process held the write lock for longer than the busy timeout.
    #[error(
        "the profile is locked by another tern process (waited {} s): \
         try again once it is done",
        crate::store::BUSY_TIMEOUT.as_secs()
    )]
    Locked,

    /// The database, or a record in it, fails its integrity checks.
    #[error("the store is corrupt: {0}; restore the profile from a backup")]
    Corrupt(String),

    /// The profile was written by a newer tern.
    #[error(
        "the profile was written by a newer tern (store format {found}, \
         this tern reads {supported}): upgrade tern"
    )]
    UnsupportedFormat { found: i64, supported: i64 },

    /// A value could not be serialized (a bug in the caller's type, e.g. a
    /// map with non-string keys).
    #[error("cannot encode record {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    /// A record decrypted fine but is not the type the caller asked for:
    /// the caller's types changed incompatibly, or a newer tern wrote it.
    #[error("record {key} cannot be read as the expected type ({source}): is this tern older than the one that wrote it?")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    /// File-system trouble outside SQLite.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Db(#[source] rusqlite::Error),

    /// The caller's own error, used to abort a [`transaction`] (the
    /// transaction is rolled back). Build it with [`StoreError::abort`];
    /// get the original back with `downcast` on the box.
    ///
    /// [`transaction`]: crate::store::Store::transaction
    #[error("{0}")]
    Aborted(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Wrap the caller's own error so it can abort a transaction.
    pub fn abort(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::Aborted(err.into())
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}

/// SQLite errors are sorted into the variants the CLI cares about: a busy
/// lock is not corruption, and corruption is not a generic failure.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            match f.code {
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => return StoreError::Locked,
                ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => {
                    return StoreError::Corrupt(e.to_string())
                }
                _ => {}
            }
        }
        StoreError::Db(e)
    }
}
