//! One relay per data directory.
//!
//! Two relays on one SQLite directory would not wake each other's
//! subscriptions (a SEND through one would wait unseen by a subscriber of
//! the other until it resubscribed), so only one may serve it. The lock is an
//! exclusive SQLite lock on `relay.lock`, held for the life of the relay:
//! SQLite already does portable file locking without `unsafe`, and the
//! operating system drops the lock when the process dies, even by SIGKILL.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use crate::error::RelayError;
use crate::store::StoreError;

const LOCK_FILE: &str = "relay.lock";

pub(crate) struct DirLock {
    _conn: Connection,
}

impl DirLock {
    pub(crate) fn acquire(data_dir: &Path) -> Result<DirLock, RelayError> {
        let store_err = |e: rusqlite::Error| RelayError::Store(StoreError::from(e));
        let conn = Connection::open(data_dir.join(LOCK_FILE)).map_err(store_err)?;
        conn.busy_timeout(Duration::ZERO).map_err(store_err)?;
        // In exclusive locking mode a connection keeps the lock of its first
        // write transaction until it is closed.
        let locked = conn
            .pragma_update(None, "locking_mode", "EXCLUSIVE")
            .and_then(|_| conn.execute_batch("BEGIN EXCLUSIVE; PRAGMA user_version = 1; COMMIT;"));
        match locked {
            Ok(()) => Ok(DirLock { _conn: conn }),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                Err(RelayError::Locked {
                    path: data_dir.to_path_buf(),
                })
            }
            Err(e) => Err(store_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(RelayError::Locked { .. })
        ));
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
