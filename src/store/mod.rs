//! The client's encrypted profile store.
//!
//! # On-disk layout
//!
//! A profile is a directory (`--home DIR`, created with mode 0700):
//!
//! | file | content |
//! | --- | --- |
//! | `store.db` (+ `store.db-wal`, `store.db-shm`) | SQLite database, WAL mode, mode 0600: every value encrypted |
//! | `key.age` | passphrase-protected profiles: a standard age file (scrypt, N = 2^[`SCRYPT_LOG_N`]) holding the identity; `age -d key.age` opens it |
//! | `identity-unprotected.txt` | `--no-passphrase` profiles only: the identity in the clear, mode 0600 |
//!
//! `store.db` is the profile's commit point: [`Store::exists`] is true once it
//! is in place, and `tern init` creates it last (under a temporary name,
//! renamed when complete), so an interrupted init leaves no half profile.
//!
//! # Keys
//!
//! The root secret is an age X25519 identity (`AGE-SECRET-KEY-1…`),
//! generated at init. It can be presented three ways ([`KeySource`]): the
//! passphrase that decrypts `key.age` (about 0.2 s of scrypt), an exported
//! identity file (`tern` reads it directly: milliseconds, for cron jobs), or
//! nothing at all for an unprotected profile. From the identity, HKDF-SHA256
//! derives two 32-byte keys (`info` "tern/v1 store key" and "tern/v1 store
//! name key"):
//!
//! - every value is sealed with XChaCha20-Poly1305 under the first, with a
//!   random 24-byte nonce, and associated data naming its table and row (and
//!   sequence number, for logs): a ciphertext moved to another row does not
//!   decrypt. Plaintexts are padded to a multiple of 64 bytes.
//! - every name is replaced by its HMAC-SHA256 under the second. Record
//!   keys, log names, set names and seen digests never appear on disk, so
//!   the database shows how many rows there are and roughly how big they
//!   are, and nothing else. Callers should still use opaque ids
//!   (`contact/3f9a…`), not names: it costs nothing and guards against a
//!   future layout that stores less carefully.
//!
//! [`ReadTx::keys`] lists names by prefix even though rows are keyed by HMAC:
//! each record also stores its name sealed, and a `bucket` column holding a
//! (truncated) HMAC of the name's first segment up to and including the
//! first `/`. A prefix with a `/` in it reads one bucket (`contact/` reads
//! only contacts); a prefix without one scans all records. The price is
//! that the database shows which records share a first segment (how many
//! contacts, say), not what the segment is.
//!
//! Every [`Tx::put`] seals the record's name afresh too, with a new random
//! nonce: that nonce is the record's [`Stamp`], which [`ReadTx::stamp`]
//! reads from the small name column without opening the value. A small
//! record written with a big one can so carry the big one's stamp and tell
//! a reader whether the big one has been written since (the client's
//! contact summaries, `client::records`).
//!
//! # Re-keying
//!
//! [`Store::rekey`] (`tern key passwd --rekey`) replaces the identity: a new
//! data key, and a new name key that hashes every stored id once more (the
//! name ids are a chain over all name keys the profile has had, see
//! `crypto::Keys`, since log names and seen digests are stored only as ids
//! and cannot be hashed afresh). The earlier name keys are kept in `meta`,
//! sealed under the new data key; the format becomes 2, so a tern that
//! knows only format 1 refuses the store instead of missing its records.
//! Identities that were retired are remembered by the hash of their public
//! key and reported as such ([`StoreError::RetiredKey`]).
//!
//! # Concurrency and crashes
//!
//! Each [`Store`] has its own SQLite connection; several processes (`tern
//! recv --follow` and `tern send`) and several handles in one process can
//! use one profile at once. [`Store::transaction`] starts with `BEGIN
//! IMMEDIATE`, taking the write lock before reading, so a read-modify-write
//! inside one transaction never loses an update; a writer waits up to
//! [`BUSY_TIMEOUT`] for another, then fails with [`StoreError::Locked`].
//! Readers never wait for writers (WAL).
//!
//! A transaction is atomic and durable: SQLite's WAL with `synchronous=FULL`
//! fsyncs each commit, and a process killed at any instant (or a power cut)
//! leaves the database at the last committed transaction, readable.
//! Files outside the database (`key.age`, the unprotected identity,
//! exports) are replaced by write-to-temporary, fsync, rename; changing the
//! passphrase records the new key file in the database before renaming it
//! into place, and a change interrupted half-way is rolled back or finished
//! by the next `open`.

mod crypto;
mod db;
mod error;
mod keyfile;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde::{de::DeserializeOwned, Serialize};
use zeroize::Zeroizing;

use crypto::{Keys, NameKind, Slot};
use keyfile::Unlocked;

pub use age::secrecy::SecretString;
pub use error::StoreError;
pub(crate) use keyfile::create_private;
pub use keyfile::{MAX_SCRYPT_LOG_N, SCRYPT_LOG_N};

/// How long a writer waits for another process's transaction before giving
/// up with [`StoreError::Locked`]. Transactions are short (milliseconds),
/// so 10 s only runs out if another process is stuck.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many digests a seen-set keeps; past this the oldest are evicted.
pub const SEEN_CAP: u64 = 10_000;

const DB_FILE: &str = "store.db";
const DB_PARTIAL_FILE: &str = "store.db.partial";
const KEY_FILE: &str = "key.age";
const UNPROTECTED_FILE: &str = "identity-unprotected.txt";

/// How to unlock an existing profile.
#[derive(Debug)]
pub enum KeySource {
    /// The passphrase that decrypts `key.age`.
    Passphrase(SecretString),
    /// An identity file written by [`Store::export_identity`] (or any file
    /// with this profile's `AGE-SECRET-KEY-1…`). Must not be accessible to
    /// other users (mode 0600), like an ssh key.
    IdentityFile(PathBuf),
    /// A profile created with `--no-passphrase`.
    Unprotected,
}

/// How a new profile (or a profile changing its key) protects its identity.
#[derive(Debug)]
pub enum NewKey {
    /// Encrypt the identity to this passphrase in `key.age`.
    Passphrase(SecretString),
    /// Store the identity in the clear (`--no-passphrase`).
    Unprotected,
}

/// Whether a profile has a passphrase; readable without unlocking it, so
/// the CLI knows whether to prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Passphrase,
    Unprotected,
}

impl Protection {
    fn as_str(self) -> &'static str {
        match self {
            Protection::Passphrase => "passphrase",
            Protection::Unprotected => "unprotected",
        }
    }

    fn parse(raw: &[u8]) -> Option<Protection> {
        match raw {
            b"passphrase" => Some(Protection::Passphrase),
            b"unprotected" => Some(Protection::Unprotected),
            _ => None,
        }
    }
}

struct Paths {
    home: PathBuf,
    db: PathBuf,
    db_partial: PathBuf,
    key: PathBuf,
    unprotected: PathBuf,
}

impl Paths {
    fn new(home: &Path) -> Paths {
        Paths {
            home: home.to_path_buf(),
            db: home.join(DB_FILE),
            db_partial: home.join(DB_PARTIAL_FILE),
            key: home.join(KEY_FILE),
            unprotected: home.join(UNPROTECTED_FILE),
        }
    }

    /// The key file a profile with this protection must have, and the one
    /// it must not.
    fn key_files(&self, protection: Protection) -> (&Path, &Path) {
        match protection {
            Protection::Passphrase => (&self.key, &self.unprotected),
            Protection::Unprotected => (&self.unprotected, &self.key),
        }
    }
}

/// An open, unlocked profile. Dropping it closes the database; the keys are
/// zeroized.
pub struct Store {
    conn: Connection,
    keys: Keys,
    unlocked: Unlocked,
    paths: Paths,
    /// The re-key count these keys belong to (see [`Store::rekey`]).
    epoch: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("home", &self.paths.home)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Whether `home` holds a profile (its `store.db`).
    pub fn exists(home: &Path) -> bool {
        Paths::new(home).db.is_file()
    }

    /// Whether the profile in `home` has a passphrase, without unlocking it.
    pub fn protection(home: &Path) -> Result<Protection, StoreError> {
        let paths = Paths::new(home);
        let mut conn = open_db(&paths)?;
        let tx = conn.transaction()?;
        Ok(db::Meta::load(&tx)?.protection)
    }

    /// Create a new profile in `home` (created if missing, mode 0700) with a
    /// fresh identity. Fails with [`StoreError::AlreadyExists`] if there is
    /// one. Leftovers of an interrupted `create` (`store.db.partial`, and a
    /// key file beside it) are discarded: nothing was ever encrypted under
    /// them. A key file without either is refused
    /// ([`StoreError::StrayKeyFile`]): it may belong to a moved `store.db`.
    ///
    /// Do not run two `create`s on the same directory at once.
    pub fn create(home: &Path, key: NewKey) -> Result<Store, StoreError> {
        if let NewKey::Passphrase(p) = &key {
            use age::secrecy::ExposeSecret;
            if p.expose_secret().is_empty() {
                return Err(StoreError::EmptyPassphrase);
            }
        }
        let paths = Paths::new(home);
        if paths.db.exists() {
            return Err(StoreError::AlreadyExists(home.to_path_buf()));
        }
        create_home(home)?;
        // `store.db.partial` is created before anything else, so a key file
        // without it did not come from an interrupted `create`: it may be
        // the only key to a `store.db` that was moved away. Keep it.
        if !paths.db_partial.exists() {
            for key_file in [&paths.key, &paths.unprotected] {
                if key_file.exists() {
                    return Err(StoreError::StrayKeyFile(key_file.clone()));
                }
            }
        }
        for stale in [&paths.key, &paths.unprotected, &paths.db_partial] {
            keyfile::remove_if_exists(stale)?;
        }
        keyfile::remove_if_exists(&home.join(format!("{DB_PARTIAL_FILE}-journal")))?;
        remove_stale_tmps(&paths)?;

        // SQLite would create the file with the umask's mode; create it
        // first with 0600 (the -wal and -shm files inherit the mode).
        drop(
            keyfile::create_private(&paths.db_partial)
                .map_err(|e| StoreError::io(&paths.db_partial, e))?,
        );
        keyfile::sync_parent(&paths.db_partial).map_err(|e| StoreError::io(home, e))?;

        let unlocked = Unlocked::generate();
        let keys = Keys::derive(&unlocked.identity);
        let (protection, key_hash) = match key {
            NewKey::Passphrase(p) => {
                let bytes = keyfile::encrypt_key_file(&paths.key, &unlocked.text, p)?;
                keyfile::write_atomic(&paths.key, &bytes)?;
                (Protection::Passphrase, Some(keyfile::key_file_hash(&bytes)))
            }
            NewKey::Unprotected => {
                keyfile::write_atomic(&paths.unprotected, unlocked.text.as_bytes())?;
                (Protection::Unprotected, None)
            }
        };
        db::initialize(&paths.db_partial, &keys, protection, key_hash)?;
        if paths.db.exists() {
            return Err(StoreError::AlreadyExists(home.to_path_buf()));
        }
        fs::rename(&paths.db_partial, &paths.db).map_err(|e| StoreError::io(&paths.db, e))?;
        keyfile::sync_parent(&paths.db).map_err(|e| StoreError::io(home, e))?;

        let conn = open_db(&paths)?;
        Ok(Store {
            conn,
            keys,
            unlocked,
            paths,
            epoch: 0,
        })
    }

    /// Open and unlock the profile in `home`.
    ///
    /// Errors worth telling apart: [`StoreError::NoProfile`],
    /// [`StoreError::WrongPassphrase`] (nothing on disk is changed),
    /// [`StoreError::KeyFileCorrupt`] / [`StoreError::KeyFileMissing`],
    /// [`StoreError::PassphraseRequired`] /
    /// [`StoreError::NotPassphraseProtected`] (use [`Store::protection`]
    /// to choose), [`StoreError::WrongIdentity`], [`StoreError::Locked`].
    pub fn open(home: &Path, key: KeySource) -> Result<Store, StoreError> {
        let paths = Paths::new(home);
        let mut conn = open_db(&paths)?;
        let meta = {
            let tx = conn.transaction()?;
            db::Meta::load(&tx)?
        };

        let from_key_file = matches!(key, KeySource::Passphrase(_));
        let unlocked = match key {
            KeySource::Passphrase(p) => {
                if meta.protection != Protection::Passphrase {
                    return Err(StoreError::NotPassphraseProtected(paths.home));
                }
                unlock_current(&paths.key, p, &meta)?
            }
            KeySource::IdentityFile(path) => keyfile::read_identity_file(&path)?,
            KeySource::Unprotected => {
                if meta.protection != Protection::Unprotected {
                    return Err(StoreError::PassphraseRequired(paths.home));
                }
                read_current_unprotected(&paths.unprotected, &meta)?
            }
        };
        let base = Keys::derive(&unlocked.identity);
        if !meta.key_matches(&base) {
            if meta.retired.contains(&recipient_hash(&unlocked)) {
                return Err(StoreError::RetiredKey(paths.home));
            }
            return Err(if from_key_file {
                StoreError::KeyFileCorrupt {
                    path: paths.key,
                    detail: "it holds the identity of another profile".into(),
                }
            } else {
                StoreError::WrongIdentity(paths.home)
            });
        }
        let keys = keys_for(&unlocked, &meta)?;
        let epoch = {
            let tx = conn.transaction()?;
            db::epoch(&tx)?
        };

        let mut store = Store {
            conn,
            keys,
            unlocked,
            paths,
            epoch,
        };
        store.finish_interrupted()?;
        db::maybe_vacuum(&store.conn)?;
        Ok(store)
    }

    /// A second handle on the same unlocked profile, with a database
    /// connection of its own, for another thread: SQLite serialises the
    /// writers exactly as it does for two tern processes.
    pub fn another_handle(&self) -> Result<Store, StoreError> {
        let conn = open_db(&self.paths)?;
        let unlocked = Unlocked {
            identity: self.unlocked.identity.clone(),
            text: self.unlocked.text.clone(),
        };
        let keys = Keys::with_history(&unlocked.identity, self.earlier_name_keys());
        Ok(Store {
            conn,
            keys,
            unlocked,
            paths: Paths::new(&self.paths.home),
            epoch: self.epoch,
        })
    }

    /// The profile directory.
    pub fn home(&self) -> &Path {
        &self.paths.home
    }

    /// The profile's age recipient (`age1…`): files encrypted to it can be
    /// opened with an exported identity.
    pub fn recipient(&self) -> String {
        self.unlocked.identity.to_public().to_string()
    }

    /// Write the profile's identity to `path` (mode 0600), in the format
    /// `age-keygen` writes: it unlocks the profile with
    /// [`KeySource::IdentityFile`], no passphrase needed, and works with
    /// `age -d -i`. Anyone who has it can read the whole profile.
    ///
    /// Refuses an existing file ([`StoreError::FileExists`]) unless
    /// `overwrite`; an overwrite is atomic.
    pub fn export_identity(&self, path: &Path, overwrite: bool) -> Result<(), StoreError> {
        if overwrite {
            keyfile::write_atomic(path, self.unlocked.text.as_bytes())
        } else {
            keyfile::write_new(path, self.unlocked.text.as_bytes())
        }
    }

    /// Change how the identity is protected: a new passphrase, a passphrase
    /// for an unprotected profile, or none. The identity stays the same, so
    /// exported identity files keep working and nothing is re-encrypted.
    /// A store opened with an exported identity can do this too, which is
    /// how a forgotten passphrase is reset.
    pub fn set_key(&mut self, key: NewKey) -> Result<(), StoreError> {
        let (protection, content): (Protection, Zeroizing<Vec<u8>>) = match key {
            NewKey::Passphrase(p) => {
                use age::secrecy::ExposeSecret;
                if p.expose_secret().is_empty() {
                    return Err(StoreError::EmptyPassphrase);
                }
                let bytes = keyfile::encrypt_key_file(&self.paths.key, &self.unlocked.text, p)?;
                // First make the new key file known, so that if we stop
                // after the rename below, a wrong passphrase on it is still
                // reported as such.
                let hash = keyfile::key_file_hash(&bytes);
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                db::add_key_hash(&tx, hash)?;
                tx.commit()?;
                (Protection::Passphrase, Zeroizing::new(bytes))
            }
            NewKey::Unprotected => (
                Protection::Unprotected,
                Zeroizing::new(self.unlocked.text.as_bytes().to_vec()),
            ),
        };
        let (target, other) = self.paths.key_files(protection);
        // The file swap happens under the database write lock, so it cannot
        // interleave with another process's `set_key` or `open` clean-up.
        // The protection mode switches only at COMMIT; until then the old
        // key file is still in place and authoritative.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        keyfile::write_atomic(target, &content)?;
        db::set_protection(&tx, protection)?;
        tx.commit()?;
        if keyfile::remove_if_exists(other)? {
            keyfile::sync_parent(other).map_err(|e| StoreError::io(other, e))?;
        }
        Ok(())
    }

    /// The name keys before the current identity's, oldest first.
    fn earlier_name_keys(&self) -> Vec<Zeroizing<[u8; 32]>> {
        let all = self.keys.name_keys();
        all[..all.len() - 1].to_vec()
    }

    /// Re-key the profile: a new identity, a new data key and a new name
    /// key; every record, log entry, name and seen digest re-sealed or
    /// re-hashed under them in one transaction; the key file replaced. Old
    /// copies of `key.age`, and every identity exported before, stop
    /// opening the profile (they are reported as retired). Contacts see
    /// nothing: connection keys are not the store's keys.
    ///
    /// Crash safety: the new key file is written as `key.age.next`
    /// (`identity-unprotected.txt.next`) and synced first; the transaction
    /// switches the database; then the file is renamed into place. Stopped
    /// before the commit, the profile is as it was and `open` removes the
    /// `.next`; stopped after it, `open` unlocks with the `.next` and
    /// finishes the rename. Other processes that have the profile open
    /// fail their next transaction with [`StoreError::Rekeyed`].
    pub fn rekey(&mut self, key: NewKey) -> Result<(), StoreError> {
        let plan = self.rekey_prepare(key)?;
        self.rekey_commit(&plan)?;
        self.rekey_finish(plan)
    }

    /// Writes the new key file beside the current one.
    pub(crate) fn rekey_prepare(&mut self, key: NewKey) -> Result<RekeyPlan, StoreError> {
        let unlocked = Unlocked::generate();
        let (protection, content, hash) = match key {
            NewKey::Passphrase(p) => {
                use age::secrecy::ExposeSecret;
                if p.expose_secret().is_empty() {
                    return Err(StoreError::EmptyPassphrase);
                }
                let bytes = keyfile::encrypt_key_file(&self.paths.key, &unlocked.text, p)?;
                let hash = keyfile::key_file_hash(&bytes);
                (Protection::Passphrase, Zeroizing::new(bytes), Some(hash))
            }
            NewKey::Unprotected => (
                Protection::Unprotected,
                Zeroizing::new(unlocked.text.as_bytes().to_vec()),
                None,
            ),
        };
        let (target, _) = self.paths.key_files(protection);
        keyfile::write_atomic(&next_of(target), &content)?;
        // The current name key becomes an earlier one.
        let keys = Keys::with_history(&unlocked.identity, self.keys.name_keys().to_vec());
        Ok(RekeyPlan {
            unlocked,
            keys,
            protection,
            key_hash: hash,
        })
    }

    /// The transaction that moves everything to the new keys.
    pub(crate) fn rekey_commit(&mut self, plan: &RekeyPlan) -> Result<(), StoreError> {
        let old = &self.keys;
        let new = &plan.keys;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        check_epoch(&tx, self.epoch)?;
        let meta = db::Meta::load(&tx)?;
        // Records: new id, bucket, sealed name and value.
        let rows: Vec<KvRow> = {
            let mut stmt = tx.prepare("SELECT id, bucket, name, value FROM kv")?;
            let it = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            it.collect::<Result<_, _>>()?
        };
        tx.execute("DELETE FROM kv", [])?;
        for (id, bucket, name, value) in rows {
            let id: [u8; 32] = id
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("malformed record id".into()))?;
            let damaged = || StoreError::Corrupt("a record fails authentication".into());
            let name = old.open(Slot::KvName(&id), &name).ok_or_else(damaged)?;
            let value = old.open(Slot::KvValue(&id), &value).ok_or_else(damaged)?;
            let new_id = Keys::step(new, NameKind::Kv, &id);
            let new_bucket = Keys::step(new, NameKind::KvBucket, &bucket)[..SHORT_ID].to_vec();
            tx.execute(
                "INSERT INTO kv (id, bucket, name, value) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    &new_id[..],
                    new_bucket,
                    new.seal(Slot::KvName(&new_id), trim_padding(&name)),
                    new.seal(Slot::KvValue(&new_id), trim_padding(&value)),
                ],
            )?;
        }
        // Logs: new log id, each entry re-sealed at its sequence number.
        let entries: Vec<(Vec<u8>, i64)> = {
            let mut stmt = tx.prepare("SELECT log, seq FROM log")?;
            let it = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            it.collect::<Result<_, _>>()?
        };
        for (log, seq) in entries {
            let id: [u8; 32] = log
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("malformed log id".into()))?;
            let value: Vec<u8> = tx.query_row(
                "SELECT value FROM log WHERE log = ?1 AND seq = ?2",
                rusqlite::params![&log, seq],
                |r| r.get(0),
            )?;
            let seq_u = seq_from_db(seq)?;
            let plain = old
                .open(Slot::Log(&id, seq_u), &value)
                .ok_or_else(|| StoreError::Corrupt("a log entry fails authentication".into()))?;
            let new_id = Keys::step(new, NameKind::Log, &id);
            tx.execute(
                "UPDATE log SET log = ?1, value = ?2 WHERE log = ?3 AND seq = ?4",
                rusqlite::params![
                    &new_id[..],
                    new.seal(Slot::Log(&new_id, seq_u), trim_padding(&plain)),
                    &log,
                    seq
                ],
            )?;
        }
        // Seen sets: ids only, nothing sealed.
        let seen: Vec<(Vec<u8>, Vec<u8>)> = {
            let mut stmt = tx.prepare("SELECT set_id, digest FROM seen")?;
            let it = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            it.collect::<Result<_, _>>()?
        };
        for (set_id, digest) in seen {
            let new_set = Keys::step(new, NameKind::SeenSet, &set_id);
            let new_digest = Keys::step(new, NameKind::SeenDigest, &digest)[..SHORT_ID].to_vec();
            tx.execute(
                "UPDATE seen SET set_id = ?1, digest = ?2 WHERE set_id = ?3 AND digest = ?4",
                rusqlite::params![&new_set[..], new_digest, &set_id, &digest],
            )?;
        }
        let earlier: Vec<String> = new.name_keys()[..new.name_keys().len() - 1]
            .iter()
            .map(|k| data_encoding::HEXLOWER.encode(&k[..]))
            .collect();
        let earlier = Zeroizing::new(to_json("(name keys)", &earlier)?);
        let mut retired = meta.retired.clone();
        retired.push(recipient_hash(&self.unlocked));
        db::set_rekeyed(
            &tx,
            new,
            &new.seal(Slot::Meta("name_keys"), &earlier),
            plan.protection,
            plan.key_hash,
            &retired,
            self.epoch + 1,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Puts the new key file in place and the new keys in this handle.
    pub(crate) fn rekey_finish(&mut self, plan: RekeyPlan) -> Result<(), StoreError> {
        let (target, other) = self.paths.key_files(plan.protection);
        let next = next_of(target);
        fs::rename(&next, target).map_err(|e| StoreError::io(target, e))?;
        keyfile::remove_if_exists(other)?;
        keyfile::sync_parent(target).map_err(|e| StoreError::io(target, e))?;
        self.keys = plan.keys;
        self.unlocked = plan.unlocked;
        self.epoch += 1;
        // Free pages still hold the old ciphertexts (zeroed by
        // secure_delete where rows were deleted, not where updated).
        let _ = self.conn.execute_batch("VACUUM");
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        Ok(())
    }

    /// Whether `passphrase` opens the current key file (to refuse a "new"
    /// passphrase that is the old one). Costs one scrypt.
    pub fn passphrase_opens(&self, passphrase: SecretString) -> bool {
        let Ok(meta) = ({
            let tx = self.conn.unchecked_transaction();
            tx.map_err(StoreError::from)
                .and_then(|tx| db::Meta::load(&tx))
        }) else {
            return false;
        };
        meta.protection == Protection::Passphrase
            && unlock_current(&self.paths.key, passphrase, &meta)
                .is_ok_and(|u| meta.key_matches(&Keys::derive(&u.identity)))
    }

    /// Run `f` in a write transaction (`BEGIN IMMEDIATE … COMMIT`): it sees
    /// a stable view, no other writer runs meanwhile, and its writes land
    /// all together or (on `Err`, or a panic) not at all. Waits up to
    /// [`BUSY_TIMEOUT`] for another writer. To abort with an error of your
    /// own, return [`StoreError::abort`]`(e)`.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        check_epoch(&tx, self.epoch)?;
        let out = f(&Tx {
            read: ReadTx {
                conn: &tx,
                keys: &self.keys,
            },
        })?; // Dropping `tx` on the error path rolls back.
        tx.commit()?;
        Ok(out)
    }

    /// [`Store::transaction`] whose commit need not reach the disk before
    /// it returns: it is atomic and survives the process being killed (the
    /// operating system has it), and it becomes durable with the next
    /// ordinary commit or checkpoint, which write the log in order; only a
    /// power cut or an operating system crash before then can undo it.
    /// For bookkeeping whose loss only repeats work that is safe to repeat
    /// (an upload a relay took, which the peer drops as the duplicate it
    /// is), never for a received message or key material: it saves one
    /// fsync where a caller is waiting.
    pub fn transaction_lazy<T>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // In WAL mode the setting in force when the transaction commits
        // decides whether the log is fsynced; SQLite refuses to change it
        // inside one. Set back whatever the transaction gave.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let out = self.transaction(f);
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        out
    }

    /// Run `f` on a read-only snapshot: it sees the database as of its
    /// first read, unaffected by concurrent writers, and never blocks them.
    /// A [`Tx`] derefs to [`ReadTx`], so reading helpers written against
    /// `&ReadTx` work in both.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ReadTx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        check_epoch(&tx, self.epoch)?;
        let out = f(&ReadTx {
            conn: &tx,
            keys: &self.keys,
        })?;
        // Nothing to commit; ending the transaction releases the snapshot.
        tx.rollback()?;
        Ok(out)
    }

    /// Finish or roll back a key change that was interrupted, and remove
    /// temporary files a crash left behind: an unprotected identity lying
    /// around in a passphrase profile would defeat the passphrase.
    fn finish_interrupted(&mut self) -> Result<(), StoreError> {
        let paths = &self.paths;
        let needs_work = |protection: Protection| -> Result<bool, StoreError> {
            let (_, other) = paths.key_files(protection);
            Ok(other.exists()
                || !stale_tmps(paths)?.is_empty()
                || next_of(&paths.key).exists()
                || next_of(&paths.unprotected).exists())
        };
        // Cheap unlocked check first; the common case takes no write lock.
        let protection = {
            let tx = self.conn.transaction()?;
            db::Meta::load(&tx)?.protection
        };
        if !needs_work(protection)? {
            return Ok(());
        }
        // Under the write lock, no `set_key` is between its rename and its
        // commit, so what meta says is what the files should be.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let protection = db::Meta::load(&tx)?.protection;
        let (target, other) = self.paths.key_files(protection);
        // A re-key that committed but stopped before its rename: the new
        // key file opened this profile (`open` tried it), so put it in
        // place. One that never committed left a `.next` with an identity
        // nothing was sealed under: remove it.
        let next = next_of(target);
        if next.exists() {
            let meta = db::Meta::load(&tx)?;
            let current = match protection {
                Protection::Passphrase => fs::read(&next)
                    .is_ok_and(|b| meta.key_hashes.contains(&keyfile::key_file_hash(&b))),
                Protection::Unprotected => keyfile::read_identity_file(&next)
                    .is_ok_and(|u| meta.key_matches(&Keys::derive(&u.identity))),
            };
            if current {
                fs::rename(&next, target).map_err(|e| StoreError::io(target, e))?;
            } else {
                keyfile::remove_if_exists(&next)?;
            }
        }
        keyfile::remove_if_exists(&next_of(other))?;
        keyfile::remove_if_exists(other)?;
        remove_stale_tmps(&self.paths)?;
        tx.commit()?;
        keyfile::sync_parent(other).map_err(|e| StoreError::io(&self.paths.home, e))?;
        Ok(())
    }
}

/// `key.age.next` beside `key.age`: where a re-key puts the new key file
/// until its transaction has committed.
fn next_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    path.with_file_name(name)
}

/// SHA-256 of the identity's public key: how retired identities are
/// recognised without keeping anything secret about them.
fn recipient_hash(u: &Unlocked) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(u.identity.to_public().to_string().as_bytes()).into()
}

/// The keys for an identity that passed the key check: with the earlier
/// name keys of a re-keyed profile.
fn keys_for(u: &Unlocked, meta: &db::Meta) -> Result<Keys, StoreError> {
    let Some(sealed) = &meta.name_keys else {
        return Ok(Keys::derive(&u.identity));
    };
    let plain = Keys::derive(&u.identity)
        .open(Slot::Meta("name_keys"), sealed)
        .ok_or_else(|| StoreError::Corrupt("the name keys fail authentication".into()))?;
    let list: Vec<String> = from_json("(name keys)", &plain)?;
    let mut earlier = Vec::with_capacity(list.len());
    for k in list {
        let mut key = Zeroizing::new([0u8; 32]);
        let raw = Zeroizing::new(
            data_encoding::HEXLOWER
                .decode(k.as_bytes())
                .map_err(|_| StoreError::Corrupt("malformed name key".into()))?,
        );
        if raw.len() != 32 {
            return Err(StoreError::Corrupt("malformed name key".into()));
        }
        key.copy_from_slice(&raw);
        earlier.push(key);
    }
    Ok(Keys::with_history(&u.identity, earlier))
}

/// Unlocks `key.age`, or the `key.age.next` of a re-key that committed but
/// was stopped before renaming it into place.
fn unlock_current(
    path: &Path,
    passphrase: SecretString,
    meta: &db::Meta,
) -> Result<Unlocked, StoreError> {
    use age::secrecy::ExposeSecret;
    let next = next_of(path);
    if next.exists() {
        let again = SecretString::from(passphrase.expose_secret().to_string());
        if let Ok(u) = keyfile::unlock_key_file(&next, again, &meta.key_hashes) {
            if meta.key_matches(&Keys::derive(&u.identity)) {
                return Ok(u);
            }
        }
    }
    keyfile::unlock_key_file(path, passphrase, &meta.key_hashes)
}

/// The unprotected identity, or its `.next` after an interrupted re-key.
fn read_current_unprotected(path: &Path, meta: &db::Meta) -> Result<Unlocked, StoreError> {
    let next = next_of(path);
    if next.exists() {
        if let Ok(u) = keyfile::read_identity_file(&next) {
            if meta.key_matches(&Keys::derive(&u.identity)) {
                return Ok(u);
            }
        }
    }
    keyfile::read_identity_file(path)
}

fn check_epoch(conn: &Connection, epoch: u64) -> Result<(), StoreError> {
    if db::epoch(conn)? != epoch {
        return Err(StoreError::Rekeyed);
    }
    Ok(())
}

/// What tells one write of a record from any other: the record's row, and
/// the random nonce its name was sealed with, which every [`Tx::put`] of
/// the record (in any version of tern, and a re-key) draws afresh.
/// [`ReadTx::stamp`] and [`ReadTx::is_current`] read it without opening the
/// value, so a small record written beside a big one can say which write
/// of the big one it belongs to, and a reader can tell cheaply whether the
/// big one was written again since. It is not authenticated on its own: it
/// only ever decides whether to read the record itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    row: [u8; 32],
    nonce: [u8; crypto::NONCE_LEN],
}

const STAMP_LEN: usize = 32 + crypto::NONCE_LEN;

impl Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut raw = [0u8; STAMP_LEN];
        raw[..32].copy_from_slice(&self.row);
        raw[32..].copy_from_slice(&self.nonce);
        s.serialize_str(&data_encoding::HEXLOWER.encode(&raw))
    }
}

impl<'de> serde::Deserialize<'de> for Stamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Stamp, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let raw = data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        if raw.len() != STAMP_LEN {
            return Err(serde::de::Error::custom("a stamp is 56 bytes"));
        }
        let mut stamp = Stamp {
            row: [0; 32],
            nonce: [0; crypto::NONCE_LEN],
        };
        stamp.row.copy_from_slice(&raw[..32]);
        stamp.nonce.copy_from_slice(&raw[32..]);
        Ok(stamp)
    }
}

/// The stamp of row `row`, from its sealed name (`version || nonce || …`).
fn stamp_of(row: &[u8; 32], sealed_name: &[u8]) -> Result<Stamp, StoreError> {
    sealed_name
        .get(1..1 + crypto::NONCE_LEN)
        .and_then(|n| <[u8; crypto::NONCE_LEN]>::try_from(n).ok())
        .map(|nonce| Stamp { row: *row, nonce })
        .ok_or_else(|| StoreError::Corrupt("a record name is too short".into()))
}

/// A `kv` row as stored: id, bucket, sealed name, sealed value.
type KvRow = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// A re-key between its steps (see [`Store::rekey`]).
pub(crate) struct RekeyPlan {
    unlocked: Unlocked,
    keys: Keys,
    protection: Protection,
    key_hash: Option<[u8; 32]>,
}

/// A decrypted value without its padding (JSON white space), so that
/// sealing it again pads it to the same size, not one block more.
fn trim_padding(plain: &[u8]) -> &[u8] {
    let end = plain.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &plain[..end]
}

fn open_db(paths: &Paths) -> Result<Connection, StoreError> {
    if !paths.db.is_file() {
        return Err(StoreError::NoProfile(paths.home.clone()));
    }
    db::open(&paths.db)
}

fn create_home(home: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(home).map_err(|e| StoreError::io(home, e))?;
    // A directory that was there already (made by hand, or by an older
    // tern with the umask's 0755) is narrowed too: others must not see the
    // profile's file names, sizes and times.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(home, fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io(home, e))?;
    }
    Ok(())
}

/// Temporary files from an interrupted `write_atomic` of a profile file.
fn stale_tmps(paths: &Paths) -> Result<Vec<PathBuf>, StoreError> {
    let entries = fs::read_dir(&paths.home).map_err(|e| StoreError::io(&paths.home, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&paths.home, e))?;
        let name = entry.file_name();
        if keyfile::is_tmp_for(&name, KEY_FILE) || keyfile::is_tmp_for(&name, UNPROTECTED_FILE) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn remove_stale_tmps(paths: &Paths) -> Result<(), StoreError> {
    for tmp in stale_tmps(paths)? {
        keyfile::remove_if_exists(&tmp)?;
    }
    Ok(())
}

/// A read-only view inside [`Store::read`] (and, through `Deref`, inside
/// [`Store::transaction`]).
///
/// Names (record keys, log names, set names) are arbitrary strings; they
/// are never stored as given (see the module docs), but keep them opaque
/// anyway.
pub struct ReadTx<'a> {
    conn: &'a Connection,
    keys: &'a Keys,
}

/// A write transaction inside [`Store::transaction`]. All reading methods
/// of [`ReadTx`] are available too.
pub struct Tx<'a> {
    read: ReadTx<'a>,
}

impl<'a> std::ops::Deref for Tx<'a> {
    type Target = ReadTx<'a>;
    fn deref(&self) -> &ReadTx<'a> {
        &self.read
    }
}

/// Truncated HMACs are enough where the column only groups rows (buckets)
/// or tests membership among at most `SEEN_CAP` entries: 128 bits leaves
/// collisions out of reach while halving the index size.
const SHORT_ID: usize = 16;

fn corrupt_record(what: &str, name: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} {name:?} fails authentication (damaged, or moved from another row)"
    ))
}

/// Serialize into zeroizing memory. The length is measured first so the
/// buffer never reallocates: values such as ratchet states hold keys, and a
/// reallocation would leave copies of them in freed memory.
fn to_json<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = |source| StoreError::Encode {
        key: name.to_string(),
        source,
    };
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_err(err)?;
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *out, value).map_err(err)?;
    Ok(out)
}

fn from_json<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: name.to_string(),
        source,
    })
}

fn seq_from_db(seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("negative sequence number {seq}")))
}

fn limit_to_db(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl ReadTx<'_> {
    fn kv_id(&self, key: &str) -> [u8; 32] {
        self.keys.name_id(NameKind::Kv, key.as_bytes())
    }

    /// The bucket of a name or prefix: its first segment through the first
    /// `/`, or the whole string if it has none.
    fn bucket(&self, name: &str) -> Vec<u8> {
        let segment = match name.find('/') {
            Some(i) => &name[..=i],
            None => name,
        };
        self.keys.name_id(NameKind::KvBucket, segment.as_bytes())[..SHORT_ID].to_vec()
    }

    fn log_id(&self, log: &str) -> [u8; 32] {
        self.keys.name_id(NameKind::Log, log.as_bytes())
    }

    fn seen_ids(&self, set: &str, digest: &[u8; 32]) -> ([u8; 32], Vec<u8>) {
        let set_id = self.keys.name_id(NameKind::SeenSet, set.as_bytes());
        let digest = self.keys.name_id(NameKind::SeenDigest, digest)[..SHORT_ID].to_vec();
        (set_id, digest)
    }

    /// The record stored under `key`, if any.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let id = self.kv_id(key);
        let sealed: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE id = ?1")?
            .query_row([&id[..]], |r| r.get(0))
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let plain = self
            .keys
            .open(Slot::KvValue(&id), &sealed)
            .ok_or_else(|| corrupt_record("record", key))?;
        from_json(key, &plain).map(Some)
    }

    /// The [`Stamp`] of the record under `key`, if there is one: without
    /// opening its value (one small column of its row).
    pub fn stamp(&self, key: &str) -> Result<Option<Stamp>, StoreError> {
        let id = self.kv_id(key);
        let sealed: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT name FROM kv WHERE id = ?1")?
            .query_row([&id[..]], |r| r.get(0))
            .optional()?;
        sealed.map(|s| stamp_of(&id, &s)).transpose()
    }

    /// Whether `stamp` is the stamp of its record as it is now (false if the
    /// record was written again, deleted, or moved by a re-key): one lookup,
    /// no name to hash, nothing opened.
    pub fn is_current(&self, stamp: &Stamp) -> Result<bool, StoreError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT name FROM kv WHERE id = ?1")?
            .query_row([&stamp.row[..]], |r| r.get(0))
            .optional()?;
        Ok(match sealed {
            Some(s) => stamp_of(&stamp.row, &s)? == *stamp,
            None => false,
        })
    }

    /// The value of every record in bucket `bucket` (a first segment with
    /// its `/`, such as `"summary/"`), in no particular order, each opened
    /// and decoded on its own: one that fails to is an `Err` in the list,
    /// not a failure of the whole. Costs no name hash per record; the
    /// values must say themselves which record they are.
    pub fn bucket_values<T: DeserializeOwned>(
        &self,
        bucket: &str,
    ) -> Result<Vec<Result<T, StoreError>>, StoreError> {
        debug_assert!(bucket.ends_with('/') && bucket.matches('/').count() == 1);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, value FROM kv WHERE bucket = ?1")?;
        let mut rows = stmt.query([self.bucket(bucket)])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
            let sealed = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            let value = <&[u8; 32]>::try_from(id)
                .ok()
                .and_then(|id| self.keys.open(Slot::KvValue(id), sealed))
                .ok_or_else(|| corrupt_record("a record of bucket", bucket))
                .and_then(|plain| from_json(bucket, &plain));
            out.push(value);
        }
        Ok(out)
    }

    /// All record keys starting with `prefix`, sorted. A prefix containing
    /// `/` reads only the records whose first segment matches; a prefix
    /// without one (including `""`) reads every record's name.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if prefix.contains('/') {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id, name FROM kv WHERE bucket = ?1")?;
            let iter = stmt.query_map([self.bucket(prefix)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in iter {
                rows.push(row?);
            }
        } else {
            let mut stmt = self.conn.prepare_cached("SELECT id, name FROM kv")?;
            let iter = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in iter {
                rows.push(row?);
            }
        }
        let mut names = Vec::new();
        for (id, sealed) in rows {
            let id: [u8; 32] = id
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("malformed record id".into()))?;
            let plain = self.keys.open(Slot::KvName(&id), &sealed).ok_or_else(|| {
                corrupt_record(
                    "the name of record",
                    &data_encoding::HEXLOWER.encode(&id[..8]),
                )
            })?;
            let name: String = from_json("(record name)", &plain)?;
            // A name sealed under another row's id would have failed above;
            // this catches a name that does not hash to its own row.
            if self.kv_id(&name) != id {
                return Err(corrupt_record("the name of record", &name));
            }
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// The last `limit` entries of `log`, oldest first, with their sequence
    /// numbers. One index range scan: cost depends on `limit`, not on the
    /// length of the log.
    pub fn tail<T: DeserializeOwned>(
        &self,
        log: &str,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        self.tail_before(log, u64::MAX, limit)
    }

    /// Like [`ReadTx::tail`], but only entries with sequence number below
    /// `before`: pass the oldest `seq` you have to page further back.
    pub fn tail_before<T: DeserializeOwned>(
        &self,
        log: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let id = self.log_id(log);
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, value FROM log WHERE log = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            rusqlite::params![&id[..], before, limit_to_db(limit)],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )?;
        let mut out = self.open_log_rows(log, &id, rows)?;
        out.reverse();
        Ok(out)
    }

    /// Up to `limit` entries of `log` after sequence number `after` (0: from
    /// the start), oldest first, with their sequence numbers.
    pub fn head_after<T: DeserializeOwned>(
        &self,
        log: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let id = self.log_id(log);
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, value FROM log WHERE log = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(rusqlite::params![&id[..], after, limit_to_db(limit)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        self.open_log_rows(log, &id, rows)
    }

    /// Opens `(seq, sealed value)` rows of `log` (whose id is `id`), in the
    /// order the query gave them.
    fn open_log_rows<T: DeserializeOwned>(
        &self,
        log: &str,
        id: &[u8; 32],
        rows: impl Iterator<Item = rusqlite::Result<(i64, Vec<u8>)>>,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let mut out = Vec::new();
        for row in rows {
            let (seq, sealed) = row?;
            let seq = seq_from_db(seq)?;
            let plain = self
                .keys
                .open(Slot::Log(id, seq), &sealed)
                .ok_or_else(|| corrupt_record("log entry", &format!("{log}#{seq}")))?;
            out.push((seq, from_json(log, &plain)?));
        }
        Ok(out)
    }

    /// Whether `digest` is in the seen-set `set`.
    pub fn seen(&self, set: &str, digest: &[u8; 32]) -> Result<bool, StoreError> {
        let (set_id, digest) = self.seen_ids(set, digest);
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM seen WHERE set_id = ?1 AND digest = ?2")?
            .query_row(rusqlite::params![&set_id[..], digest], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

impl Tx<'_> {
    /// Run `f` inside a savepoint of this transaction: if it returns `Err`,
    /// everything it wrote is undone and the transaction goes on as if `f`
    /// had never run, so one failed step of a batch does not take the
    /// others with it. Savepoints nest.
    pub fn savepoint<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.read.conn;
        conn.execute_batch("SAVEPOINT tern_step")?;
        let out = f(self);
        // On a failure to end the savepoint the caller gets that error and,
        // returning it, rolls the whole transaction back.
        match &out {
            Ok(_) => conn.execute_batch("RELEASE tern_step")?,
            Err(_) => conn.execute_batch("ROLLBACK TO tern_step; RELEASE tern_step")?,
        }
        out
    }

    /// Store `value` under `key`, replacing any previous value.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put_stamped(key, value).map(|_| ())
    }

    /// [`Tx::put`], returning the record's new [`Stamp`].
    pub fn put_stamped<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Stamp, StoreError> {
        let r = &self.read;
        let id = r.kv_id(key);
        let json = to_json(key, value)?;
        let name = to_json(key, key)?;
        let sealed_value = r.keys.seal(Slot::KvValue(&id), &json);
        let sealed_name = r.keys.seal(Slot::KvName(&id), &name);
        r.conn
            .prepare_cached(
                "INSERT INTO kv (id, bucket, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET value = excluded.value, name = excluded.name",
            )?
            .execute(rusqlite::params![
                &id[..],
                r.bucket(key),
                &sealed_name,
                sealed_value
            ])?;
        stamp_of(&id, &sealed_name)
    }

    /// Remove the record under `key` (no error if there is none).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let id = self.read.kv_id(key);
        self.read
            .conn
            .prepare_cached("DELETE FROM kv WHERE id = ?1")?
            .execute([&id[..]])?;
        Ok(())
    }

    /// Append `value` to `log`; returns its sequence number (1 for the
    /// first entry, then consecutive). One index lookup and one insert,
    /// whatever the log's length. After [`Tx::remove_log`] numbering starts
    /// again at 1.
    pub fn append<T: Serialize + ?Sized>(&self, log: &str, value: &T) -> Result<u64, StoreError> {
        let r = &self.read;
        let id = r.log_id(log);
        let last: Option<i64> = r
            .conn
            .prepare_cached("SELECT seq FROM log WHERE log = ?1 ORDER BY seq DESC LIMIT 1")?
            .query_row([&id[..]], |row| row.get(0))
            .optional()?;
        let seq = match last {
            None => 1,
            Some(last) => seq_from_db(last)?
                .checked_add(1)
                .filter(|s| i64::try_from(*s).is_ok())
                .ok_or_else(|| StoreError::Corrupt("log sequence number overflow".into()))?,
        };
        let json = to_json(log, value)?;
        let sealed = r.keys.seal(Slot::Log(&id, seq), &json);
        r.conn
            .prepare_cached("INSERT INTO log (log, seq, value) VALUES (?1, ?2, ?3)")?
            .execute(rusqlite::params![&id[..], seq as i64, sealed])?;
        Ok(seq)
    }

    /// Delete the entries of `log` with these sequence numbers.
    pub fn remove_log_entries(&self, log: &str, seqs: &[u64]) -> Result<(), StoreError> {
        let id = self.read.log_id(log);
        let mut stmt = self
            .read
            .conn
            .prepare_cached("DELETE FROM log WHERE log = ?1 AND seq = ?2")?;
        for seq in seqs {
            stmt.execute(rusqlite::params![
                &id[..],
                i64::try_from(*seq).unwrap_or(i64::MAX)
            ])?;
        }
        Ok(())
    }

    /// Delete every entry of `log`.
    pub fn remove_log(&self, log: &str) -> Result<(), StoreError> {
        let id = self.read.log_id(log);
        self.read
            .conn
            .prepare_cached("DELETE FROM log WHERE log = ?1")?
            .execute([&id[..]])?;
        Ok(())
    }

    /// Add `digest` to the seen-set `set` (or mark it as seen again, which
    /// makes it the newest). When the set holds more than [`SEEN_CAP`]
    /// digests, the oldest go. Constant cost: index lookups, no count.
    pub fn mark_seen(&self, set: &str, digest: &[u8; 32]) -> Result<(), StoreError> {
        self.mark_seen_capped(set, digest, SEEN_CAP)
    }

    fn mark_seen_capped(&self, set: &str, digest: &[u8; 32], cap: u64) -> Result<(), StoreError> {
        let r = &self.read;
        let (set_id, digest) = r.seen_ids(set, digest);
        let last: Option<i64> = r
            .conn
            .prepare_cached("SELECT ord FROM seen WHERE set_id = ?1 ORDER BY ord DESC LIMIT 1")?
            .query_row([&set_id[..]], |row| row.get(0))
            .optional()?;
        let ord = last.unwrap_or(0).saturating_add(1);
        r.conn
            .prepare_cached(
                "INSERT INTO seen (set_id, digest, ord) VALUES (?1, ?2, ?3)
                 ON CONFLICT (set_id, digest) DO UPDATE SET ord = excluded.ord",
            )?
            .execute(rusqlite::params![&set_id[..], digest, ord])?;
        // `ord` values in a set are distinct and at most `ord`, so keeping
        // those above `ord - cap` keeps at most `cap` entries.
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        if ord > cap {
            r.conn
                .prepare_cached("DELETE FROM seen WHERE set_id = ?1 AND ord <= ?2")?
                .execute(rusqlite::params![&set_id[..], ord - cap])?;
        }
        Ok(())
    }

    /// Forget the whole seen-set `set` (for a deleted conversation).
    pub fn clear_seen(&self, set: &str) -> Result<(), StoreError> {
        let set_id = self.read.keys.name_id(NameKind::SeenSet, set.as_bytes());
        self.read
            .conn
            .prepare_cached("DELETE FROM seen WHERE set_id = ?1")?
            .execute([&set_id[..]])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
