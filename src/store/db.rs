//! SQLite connection settings, schema and the plaintext `meta` table.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::crypto::{Keys, Slot};
use super::{Protection, StoreError, BUSY_TIMEOUT};

/// Version of the on-disk layout, stored in `meta`. Bump on incompatible
/// changes; an older tern refuses a newer store instead of misreading it.
/// Format 2 is format 1 after a re-key: name ids are chained through
/// several name keys (`meta.name_keys`), which a tern that reads only
/// format 1 would not find its records with.
pub(crate) const FORMAT: i64 = 1;
pub(crate) const FORMAT_REKEYED: i64 = 2;

/// The sealed constant in `meta.key_check` proves that an identity belongs
/// to this profile before anything else is read or written with it.
const KEY_CHECK: &[u8] = b"\"tern/v1 key check\"";

/// How many key-file hashes `meta.key_hashes` keeps (see `keyfile`): the
/// current key file plus a few past ones, so a restored older `key.age`
/// still gets "wrong passphrase" rather than "damaged".
const MAX_KEY_HASHES: usize = 8;

const SCHEMA: &str = "
    -- Plaintext bookkeeping: format version, protection mode, key check,
    -- key-file hashes. Nothing here is secret.
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    );
    -- Encrypted records. id = HMAC(name); bucket = truncated HMAC of the
    -- name's first path segment (for keys(prefix)); name and value sealed.
    CREATE TABLE kv (
        id     BLOB PRIMARY KEY NOT NULL,
        bucket BLOB NOT NULL,
        name   BLOB NOT NULL,
        value  BLOB NOT NULL
    );
    CREATE INDEX kv_bucket ON kv (bucket);
    -- Append-only logs. The (log, seq) primary key is the index that keeps
    -- append and tail independent of history size.
    CREATE TABLE log (
        log   BLOB NOT NULL,
        seq   INTEGER NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (log, seq)
    );
    -- Bounded dedup sets: HMAC(set), truncated HMAC(digest), insertion order.
    CREATE TABLE seen (
        set_id BLOB NOT NULL,
        digest BLOB NOT NULL,
        ord    INTEGER NOT NULL,
        PRIMARY KEY (set_id, digest)
    );
    CREATE INDEX seen_ord ON seen (set_id, ord);
";

/// Open an existing store (never creates one: a missing file is reported
/// by the caller as "no profile", not silently replaced by an empty one).
pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    // WAL lets `tern recv --follow` read while `tern send` writes. The mode
    // is persistent; on an already-WAL database this is a no-op.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "cannot switch the database to WAL mode (got {mode})"
        )));
    }
    Ok(conn)
}

/// Settings that are per connection, not stored in the file.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    // Wait for another process's write transaction instead of failing.
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL: in WAL mode every commit is fsynced, so a committed transaction
    // survives power loss, not just a process kill.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Overwrite deleted content with zeros, so removed records and logs do
    // not linger in free pages (they are encrypted, but a later key
    // compromise would expose them).
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(())
}

/// Build a new database at `path` (an empty file created by the caller with
/// mode 0600) in a single transaction. It stays in rollback-journal mode
/// until the caller has renamed it into place, so there is never a `-wal`
/// file that would have to move with it.
pub(crate) fn initialize(
    path: &Path,
    keys: &Keys,
    protection: Protection,
    key_hash: Option<[u8; 32]>,
) -> Result<(), StoreError> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    set_meta(&tx, "format", &FORMAT.to_be_bytes())?;
    set_meta(&tx, "protection", protection.as_str().as_bytes())?;
    set_meta(
        &tx,
        "key_check",
        &keys.seal(Slot::Meta("key_check"), KEY_CHECK),
    )?;
    let hashes: Vec<u8> = key_hash.map(|h| h.to_vec()).unwrap_or_default();
    set_meta(&tx, "key_hashes", &hashes)?;
    tx.commit()?;
    conn.close().map_err(|(_, e)| StoreError::from(e))
}

fn set_meta(conn: &Connection, name: &str, value: &[u8]) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        rusqlite::params![name, value],
    )?;
    Ok(())
}

fn get_meta(conn: &Connection, name: &str) -> Result<Vec<u8>, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get::<_, Vec<u8>>(0)
    })
    .optional()?
    .ok_or_else(|| StoreError::Corrupt(format!("the database has no `{name}` entry")))
}

/// The plaintext facts about a profile, readable without its key.
pub(crate) struct Meta {
    pub(crate) protection: Protection,
    pub(crate) key_check: Vec<u8>,
    pub(crate) key_hashes: Vec<[u8; 32]>,
    /// After a re-key: the earlier name keys, sealed under the data key.
    pub(crate) name_keys: Option<Vec<u8>>,
    /// SHA-256 of the age recipients (public keys) of identities retired
    /// by a re-key, to say so when one is used.
    pub(crate) retired: Vec<[u8; 32]>,
}

fn hashes(raw: &[u8]) -> Result<Vec<[u8; 32]>, StoreError> {
    if raw.len() % 32 != 0 {
        return Err(StoreError::Corrupt("malformed hash list in meta".into()));
    }
    Ok(raw
        .chunks_exact(32)
        .map(|c| <[u8; 32]>::try_from(c).expect("chunks_exact(32)"))
        .collect())
}

fn get_meta_opt(conn: &Connection, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .optional()?)
}

/// How many times the profile was re-keyed: every handle checks it at the
/// start of each transaction, so a process that still holds the old keys
/// stops instead of writing records nobody can read.
pub(crate) fn epoch(conn: &Connection) -> Result<u64, StoreError> {
    let raw: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE name = 'epoch'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(raw
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// What a re-key writes into `meta`, inside its transaction.
pub(crate) fn set_rekeyed(
    conn: &Connection,
    keys: &Keys,
    sealed_name_keys: &[u8],
    protection: Protection,
    key_hash: Option<[u8; 32]>,
    retired: &[[u8; 32]],
    epoch: u64,
) -> Result<(), StoreError> {
    set_meta(conn, "format", &FORMAT_REKEYED.to_be_bytes())?;
    set_meta(
        conn,
        "key_check",
        &keys.seal(Slot::Meta("key_check"), KEY_CHECK),
    )?;
    set_meta(conn, "name_keys", sealed_name_keys)?;
    set_meta(conn, "protection", protection.as_str().as_bytes())?;
    // Only the new key file is this profile's now: an old one that still
    // decrypts holds a retired identity (reported as such).
    let hashes: Vec<u8> = key_hash.map(|h| h.to_vec()).unwrap_or_default();
    set_meta(conn, "key_hashes", &hashes)?;
    let retired: Vec<u8> = retired.iter().flatten().copied().collect();
    set_meta(conn, "retired", &retired)?;
    set_meta(conn, "epoch", &epoch.to_be_bytes())
}

impl Meta {
    /// Read and validate `meta` (call inside a transaction for a consistent
    /// view).
    pub(crate) fn load(conn: &Connection) -> Result<Meta, StoreError> {
        let has_meta: bool = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !has_meta {
            return Err(StoreError::Corrupt(
                "this is a SQLite database, but not a tern store".into(),
            ));
        }
        let format = get_meta(conn, "format")?;
        let format = <[u8; 8]>::try_from(format.as_slice())
            .map(i64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("malformed format version".into()))?;
        if format != FORMAT && format != FORMAT_REKEYED {
            return Err(StoreError::UnsupportedFormat {
                found: format,
                supported: FORMAT_REKEYED,
            });
        }
        let protection = Protection::parse(&get_meta(conn, "protection")?)
            .ok_or_else(|| StoreError::Corrupt("unknown protection mode".into()))?;
        let key_check = get_meta(conn, "key_check")?;
        let raw = get_meta(conn, "key_hashes")?;
        let key_hashes = hashes(&raw)?;
        let retired = hashes(&get_meta_opt(conn, "retired")?.unwrap_or_default())?;
        Ok(Meta {
            protection,
            key_check,
            key_hashes,
            name_keys: get_meta_opt(conn, "name_keys")?,
            retired,
        })
    }

    pub(crate) fn key_matches(&self, keys: &Keys) -> bool {
        keys.open(Slot::Meta("key_check"), &self.key_check)
            .is_some_and(|pt| pt.starts_with(KEY_CHECK))
    }
}

pub(crate) fn set_protection(conn: &Connection, protection: Protection) -> Result<(), StoreError> {
    set_meta(conn, "protection", protection.as_str().as_bytes())
}

/// Remember the hash of a key file we are about to put in place.
pub(crate) fn add_key_hash(conn: &Connection, hash: [u8; 32]) -> Result<(), StoreError> {
    let mut hashes = Meta::load(conn)?.key_hashes;
    hashes.retain(|h| *h != hash);
    hashes.push(hash);
    let skip = hashes.len().saturating_sub(MAX_KEY_HASHES);
    let raw: Vec<u8> = hashes[skip..].iter().flatten().copied().collect();
    set_meta(conn, "key_hashes", &raw)
}

/// Free pages past which `open` compacts the database: a quarter of the
/// file, and at least this many pages (1 MiB of 4 KiB pages: below that
/// the space is not worth a rewrite).
const VACUUM_MIN_FREE_PAGES: i64 = 256;

/// Compacts the database when most of it is free pages (after `tern
/// forget`, a rotation's clean-up, a long history deleted): `VACUUM`
/// rewrites it in one transaction, atomically like any other. Best effort:
/// if another process holds the database, it is left for another time.
/// Returns whether it ran.
pub(crate) fn maybe_vacuum(conn: &Connection) -> Result<bool, StoreError> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    if free < VACUUM_MIN_FREE_PAGES || free * 4 < pages {
        return Ok(false);
    }
    // Never make a command wait for the space: a short lock wait, then
    // the usual one back.
    conn.busy_timeout(std::time::Duration::from_millis(200))?;
    let done = conn.execute_batch("VACUUM").is_ok();
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if done {
        // Move the rewritten pages from the WAL into the file, so the
        // space is given back now.
        let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    }
    Ok(done)
}
