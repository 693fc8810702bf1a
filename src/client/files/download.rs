//! Receiving a file: the chunks of one copy at a time (the next copy only
//! for what the first could not give), written in place into a hidden
//! partial file beside where it will be saved. A batch is fsynced, then
//! recorded, then acknowledged, so a killed recipient loses nothing and
//! stores nothing twice. Once every chunk is there the SHA-256 of the whole
//! is checked, and only then is the file linked under its name (never over
//! another file) and its queues deleted from the relays.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tern_wire::delivery::delivery_open;
use tern_wire::Id;

use super::{FileProgress, FileState, Transfer};
use crate::client::model::Direction;
use crate::client::{Client, ClientError};
use crate::net::{SubEvent, SubSpec};
use crate::proto::file::{open_chunk, queue_auth, safe_file_name, set_key, FileOffer, CHUNK_LEN};

/// Messages taken between two commits (512 KiB): half the window, so the
/// relay never waits for an acknowledgement (copies and junk count too, or
/// a window full of them would stall the queue).
const FLUSH_EVERY: u64 = 32;
/// Pushed and unacknowledged chunks per queue.
const WINDOW: u16 = 64;
/// A relay that sends nothing for this long while it has more is left.
const SILENT: Duration = Duration::from_secs(30);

/// The store record listing incoming transfers still to finish, so that a
/// `tern recv` does not read every file record ever received.
pub(crate) const OPEN_FILES: &str = "files-open";

/// Where and what to download.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    pub dir: PathBuf,
    /// Larger offers are kept, not downloaded (`tern files get` takes them).
    pub max_size: u64,
    /// Once a copy has given everything it has, wait this long for more
    /// (a sender still uploading) before leaving the rest for later.
    pub linger: Duration,
    /// Only this transfer (`tern files get`), whatever its size.
    pub only: Option<[u8; 16]>,
}

/// What happened to a file.
#[derive(Debug, Clone)]
pub enum FileEvent {
    Progress(FileProgress),
    /// Verified and saved at `transfer.saved`.
    Saved {
        transfer: Transfer,
        contact: String,
    },
    /// Not downloaded: larger than the limit.
    TooLarge {
        transfer: Transfer,
        contact: String,
        limit: u64,
    },
    /// Part of it is here; the rest comes with a later `tern recv`.
    Incomplete {
        transfer: Transfer,
        contact: String,
    },
    /// Given up (`permanent`), or failed this time (no space, say).
    Failed {
        transfer: Transfer,
        contact: String,
        error: String,
        permanent: bool,
    },
}

enum SetEnd {
    /// Everything this copy had now is on disk.
    Drained,
    /// The copy is gone from its relay (cancelled, expired, deleted).
    Gone,
    Unreachable(String),
}

impl Client {
    /// The ids of incoming transfers still open.
    pub fn open_incoming(&self) -> Result<Vec<String>, ClientError> {
        Ok(self
            .store
            .read(|tx| tx.get::<Vec<String>>(OPEN_FILES))?
            .unwrap_or_default())
    }

    /// Downloads every open incoming file (or `opts.only`).
    pub fn download_files(
        &mut self,
        opts: &DownloadOptions,
        on: &mut dyn FnMut(FileEvent),
    ) -> Result<(), ClientError> {
        let ids: Vec<String> = match opts.only {
            Some(id) => vec![data_encoding::HEXLOWER.encode(&id)],
            None => self.open_incoming()?,
        };
        for hex in ids {
            let Some(t) = self
                .store
                .read(|tx| tx.get::<Transfer>(&format!("file/{hex}")))?
            else {
                set_open(self, &hex, false)?;
                continue;
            };
            if t.dir != Direction::In {
                continue;
            }
            let forced = opts.only == Some(t.id);
            if !(t.state.is_open() || forced && t.state == FileState::Failed) {
                set_open(self, &hex, false)?;
                continue;
            }
            if t.state == FileState::TooLarge && !forced {
                continue;
            }
            let contact = self
                .contact(&t.contact)
                .map(|c| c.name)
                .unwrap_or_else(|_| "a forgotten contact".into());
            self.download_one(t, &contact, opts, forced, on)?;
        }
        Ok(())
    }

    fn download_one(
        &mut self,
        mut t: Transfer,
        contact: &str,
        opts: &DownloadOptions,
        forced: bool,
        on: &mut dyn FnMut(FileEvent),
    ) -> Result<(), ClientError> {
        if t.size > opts.max_size && !forced {
            t.state = FileState::TooLarge;
            self.put_transfer(&t)?;
            on(FileEvent::TooLarge {
                transfer: t,
                contact: contact.to_string(),
                limit: opts.max_size,
            });
            return Ok(());
        }
        let offer = t.decode_offer()?;
        let dir = t
            .part
            .as_ref()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| opts.dir.clone());
        let fail = |t: Transfer, error: String, permanent: bool| FileEvent::Failed {
            transfer: t,
            contact: contact.to_string(),
            error,
            permanent,
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            on(fail(
                t,
                format!("cannot make {}: {e}", dir.display()),
                false,
            ));
            return Ok(());
        }
        // Refused before anything is written, rather than a disk filled
        // half-way: what is still to come must fit, with a margin.
        let need = t.size.saturating_sub(t.done_bytes());
        if let Ok(free) = free_bytes(&dir) {
            if free < need.saturating_add(1 << 20) {
                on(fail(
                    t,
                    format!(
                        "not enough space in {}: it needs {}, {} is free; make room (or use \
                         --files-dir) and run `tern recv` again",
                        dir.display(),
                        super::upload::human_size(need),
                        super::upload::human_size(free)
                    ),
                    false,
                ));
                return Ok(());
            }
        }
        let part = t
            .part
            .clone()
            .unwrap_or_else(|| dir.join(format!(".{}.tern-part", t.id_hex())));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&part)
        {
            Ok(f) => f,
            Err(e) => {
                on(fail(
                    t,
                    format!("cannot write {}: {e}", part.display()),
                    false,
                ));
                return Ok(());
            }
        };
        if t.part.is_none() || t.state != FileState::Receiving {
            t.part = Some(part.clone());
            t.state = FileState::Receiving;
            t.error = None;
            self.put_transfer(&t)?;
        }
        let count = t.chunk_count();
        let mut gone = 0;
        let mut reasons = Vec::new();
        for s in 0..offer.sets.len() {
            if t.have_count >= count {
                break;
            }
            if t.refused_sets.contains(&s) {
                gone += 1;
                continue;
            }
            match self.download_set(&mut t, &offer, s, &file, opts.linger, on) {
                Ok(SetEnd::Drained) => {}
                Ok(SetEnd::Gone) => gone += 1,
                Ok(SetEnd::Unreachable(why)) => reasons.push(why),
                Err(DownloadError::Write(e)) => {
                    on(fail(
                        t,
                        format!(
                            "cannot write {} into {}: {e}; what arrived is kept, and the \
                             next `tern recv` goes on",
                            t_name(&offer),
                            dir.display()
                        ),
                        false,
                    ));
                    return Ok(());
                }
                Err(DownloadError::Client(e)) => return Err(e),
                Err(DownloadError::Cancelled) => return Ok(()),
            }
        }
        if t.have_count >= count {
            return self.finish(t, &file, &dir, contact, on);
        }
        if gone == offer.sets.len() {
            // No copy is left anywhere: the sender cancelled, or the relays
            // expired or lost it.
            drop(file);
            let _ = std::fs::remove_file(&part);
            t.state = FileState::Failed;
            t.part = None;
            t.error = Some(
                "the file is no longer on any relay (the sender cancelled it, or it expired)"
                    .into(),
            );
            self.put_transfer(&t)?;
            set_open(self, &t.id_hex(), false)?;
            let e = t.error.clone().unwrap_or_default();
            on(fail(t, e, true));
            return Ok(());
        }
        let _ = reasons;
        on(FileEvent::Incomplete {
            transfer: t,
            contact: contact.to_string(),
        });
        Ok(())
    }

    fn download_set(
        &mut self,
        t: &mut Transfer,
        offer: &FileOffer,
        s: usize,
        file: &File,
        linger: Duration,
        on: &mut dyn FnMut(FileEvent),
    ) -> Result<SetEnd, DownloadError> {
        let set = &offer.sets[s];
        let key = set_key(&offer.key, s as u8);
        let cpq = offer.chunks_per_queue as u64;
        let keys: Vec<_> = (0..set.queues.len())
            .map(|q| queue_auth(&set.seed, q as u16))
            .collect();
        // Only queues that can still give a chunk this side lacks.
        let wanted: Vec<usize> = (0..set.queues.len())
            .filter(|&q| {
                let start = q as u64 * cpq;
                let end = (start + cpq).min(t.chunk_count());
                (start..end).any(|i| !t.has(i))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(SetEnd::Drained);
        }
        let (etx, erx) = mpsc::channel();
        let specs = wanted
            .iter()
            .map(|&q| SubSpec {
                token: q,
                recipient_id: set.queues[q].recipient_id,
                key: keys[q].clone(),
                window: WINDOW,
            })
            .collect();
        let sub =
            match self
                .net
                .subscribe(&set.relay, Some(&set.queues[0].recipient_id), specs, &etx)
            {
                Ok(s) => s,
                Err(e) => return Ok(SetEnd::Unreachable(e.to_string())),
            };
        let mut quiet: HashSet<usize> = HashSet::new();
        let mut ended: HashSet<usize> = HashSet::new();
        let mut to_ack: Vec<(usize, Id)> = Vec::new();
        let mut fresh = 0u64;
        let mut taken = 0u64;
        let mut last_event = Instant::now();
        let count = t.chunk_count();
        let mut end = SetEnd::Drained;
        loop {
            let settled = wanted
                .iter()
                .all(|q| quiet.contains(q) || ended.contains(q));
            let timeout = if settled { linger } else { SILENT };
            let ev = match erx.recv_timeout(timeout.saturating_sub(last_event.elapsed())) {
                Ok(ev) => ev,
                Err(_) => break,
            };
            last_event = Instant::now();
            match ev {
                SubEvent::Message {
                    token,
                    msg_id,
                    body,
                    ..
                } => {
                    quiet.remove(&token);
                    taken += 1;
                    to_ack.retain(|(q, _)| *q != token);
                    to_ack.push((token, msg_id));
                    let Some(oq) = set.queues.get(token) else {
                        continue;
                    };
                    // Junk, a chunk of another queue or a flipped bit: dropped
                    // (and acknowledged); another copy may have it whole.
                    if let Ok(mut m) = delivery_open(oq.queue_secret.as_bytes(), &msg_id, &body) {
                        if let Ok((i, data)) = open_chunk(&key, t.size, &mut m) {
                            let i = i as u64;
                            if i / cpq == token as u64 && !t.has(i) {
                                file.write_all_at(data, i * CHUNK_LEN as u64)
                                    .map_err(DownloadError::Write)?;
                                t.set_have(i);
                                fresh += 1;
                            }
                        }
                    }
                    if taken >= FLUSH_EVERY || t.have_count >= count {
                        taken = 0;
                        self.flush(t, file, &sub, &keys, set, &mut to_ack, &mut fresh, on)?;
                    }
                    if t.have_count >= count {
                        break;
                    }
                }
                SubEvent::Idle { token } => {
                    quiet.insert(token);
                    if wanted
                        .iter()
                        .all(|q| quiet.contains(q) || ended.contains(q))
                    {
                        self.flush(t, file, &sub, &keys, set, &mut to_ack, &mut fresh, on)?;
                    }
                }
                SubEvent::Subscribed { .. } => {}
                SubEvent::Refused { token, .. } | SubEvent::Ended { token } => {
                    ended.insert(token);
                    if wanted.iter().all(|q| ended.contains(q)) {
                        end = SetEnd::Gone;
                        break;
                    }
                }
                SubEvent::Lost { error, .. } => {
                    end = SetEnd::Unreachable(error);
                    break;
                }
            }
        }
        self.flush(t, file, &sub, &keys, set, &mut to_ack, &mut fresh, on)?;
        Ok(end)
    }

    /// Makes what was written durable, records it, then acknowledges it.
    #[allow(clippy::too_many_arguments)]
    fn flush(
        &mut self,
        t: &mut Transfer,
        file: &File,
        sub: &crate::net::Subscription,
        keys: &[ed25519_dalek::SigningKey],
        set: &crate::proto::file::OfferSet,
        to_ack: &mut Vec<(usize, Id)>,
        fresh: &mut u64,
        on: &mut dyn FnMut(FileEvent),
    ) -> Result<(), DownloadError> {
        if *fresh > 0 {
            file.sync_data().map_err(DownloadError::Write)?;
            let cancelled = self
                .store
                .transaction(|tx| {
                    let key = super::transfer_key(&t.id);
                    let cur: Option<Transfer> = tx.get(&key)?;
                    if cur
                        .as_ref()
                        .is_some_and(|c| c.state == FileState::Cancelled)
                    {
                        return Ok(true);
                    }
                    tx.put(&key, &*t)?;
                    Ok(false)
                })
                .map_err(|e| DownloadError::Client(e.into()))?;
            if cancelled {
                return Err(DownloadError::Cancelled);
            }
            *fresh = 0;
            on(FileEvent::Progress(FileProgress {
                id: t.id,
                name: t.name.clone(),
                done: t.done_bytes(),
                size: t.size,
            }));
        }
        for (q, msg_id) in to_ack.drain(..) {
            let _ = sub.ack_upto(set.queues[q].recipient_id, msg_id, &keys[q]);
        }
        Ok(())
    }

    fn finish(
        &mut self,
        mut t: Transfer,
        file: &File,
        dir: &Path,
        contact: &str,
        on: &mut dyn FnMut(FileEvent),
    ) -> Result<(), ClientError> {
        let part = t.part.clone().expect("a download has a partial file");
        let digest = match sha256_of(file, t.size) {
            Ok(d) => d,
            Err(e) => {
                on(FileEvent::Failed {
                    error: format!("cannot read back {}: {e}", part.display()),
                    transfer: t,
                    contact: contact.to_string(),
                    permanent: false,
                });
                return Ok(());
            }
        };
        if !bool::from(digest.ct_eq(&t.sha256)) {
            let _ = std::fs::remove_file(&part);
            t.state = FileState::Failed;
            t.part = None;
            t.have.clear();
            t.have_count = 0;
            t.error = Some(format!(
                "{} arrived corrupt (its SHA-256 is not the one offered): nothing was saved",
                safe_file_name(&t.name)
            ));
            self.put_transfer(&t)?;
            set_open(self, &t.id_hex(), false)?;
            self.delete_file_queues(&t);
            let error = t.error.clone().unwrap_or_default();
            on(FileEvent::Failed {
                transfer: t,
                contact: contact.to_string(),
                error,
                permanent: true,
            });
            return Ok(());
        }
        // Where it goes is recorded before it is linked there, so a kill in
        // between finds it (the same inode) instead of saving it twice.
        let part_ino = file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let already = t.saved.as_ref().is_some_and(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino()))
                .is_some_and(|x| Some(x) == part_ino)
        });
        if !already {
            let base = safe_file_name(&t.name);
            let mut n = 0;
            loop {
                let candidate = dir.join(numbered(&base, n));
                t.saved = Some(candidate.clone());
                self.put_transfer(&t)?;
                match std::fs::hard_link(&part, &candidate) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                    Err(e) if !candidate.exists() => {
                        // A file system without hard links: a rename (the
                        // name was free a moment ago).
                        if std::fs::rename(&part, &candidate).is_err() {
                            on(FileEvent::Failed {
                                error: format!("cannot save {}: {e}", candidate.display()),
                                transfer: t,
                                contact: contact.to_string(),
                                permanent: false,
                            });
                            return Ok(());
                        }
                        break;
                    }
                    Err(_) => n += 1,
                }
                if n > 10_000 {
                    return Err(ClientError::Invalid(format!(
                        "no free name for {base} in {}",
                        dir.display()
                    )));
                }
            }
        }
        sync_dir(dir);
        t.state = FileState::Received;
        t.part = None;
        t.have = Vec::new();
        self.put_transfer(&t)?;
        set_open(self, &t.id_hex(), false)?;
        let _ = std::fs::remove_file(&part);
        sync_dir(dir);
        self.delete_file_queues(&t);
        on(FileEvent::Saved {
            transfer: t,
            contact: contact.to_string(),
        });
        Ok(())
    }
}

enum DownloadError {
    Write(std::io::Error),
    Client(ClientError),
    Cancelled,
}

impl From<ClientError> for DownloadError {
    fn from(e: ClientError) -> Self {
        DownloadError::Client(e)
    }
}

fn t_name(offer: &FileOffer) -> String {
    safe_file_name(&offer.name)
}

/// Adds or removes `hex` from the list of open incoming transfers.
pub(crate) fn set_open(client: &mut Client, hex: &str, open: bool) -> Result<(), ClientError> {
    client.store.transaction(|tx| set_open_in(tx, hex, open))?;
    Ok(())
}

pub(crate) fn set_open_in(
    tx: &crate::store::Tx<'_>,
    hex: &str,
    open: bool,
) -> Result<(), crate::store::StoreError> {
    let mut ids: Vec<String> = tx.get(OPEN_FILES)?.unwrap_or_default();
    let has = ids.iter().any(|i| i == hex);
    if open && !has {
        ids.push(hex.to_string());
    } else if !open && has {
        ids.retain(|i| i != hex);
    } else {
        return Ok(());
    }
    tx.put(OPEN_FILES, &ids)
}

/// `name`, or `stem (n).ext`.
fn numbered(base: &str, n: u32) -> String {
    if n == 0 {
        return base.to_string();
    }
    match base.rfind('.').filter(|&i| i > 0) {
        Some(i) => format!("{} ({n}){}", &base[..i], &base[i..]),
        None => format!("{base} ({n})"),
    }
}

fn sha256_of(file: &File, size: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut r = ReadAt {
        file,
        off: &mut off,
    };
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the partial file is shorter than the file",
            ));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().into())
}

struct ReadAt<'a> {
    file: &'a File,
    off: &'a mut u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, *self.off)?;
        *self.off += n as u64;
        Ok(n)
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}
