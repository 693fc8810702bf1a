//! Sending a file: file queues created on the recipient's relays (ours
//! where theirs take no queue from us), the offer sent through the
//! conversation, then the chunks uploaded to every copy at once. Each
//! batch the relay took is recorded before the next goes, so a killed
//! sender resumes (`tern files retry`) with the first chunk no relay
//! confirmed; a chunk sent twice that way is dropped by the recipient.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tern_wire::address::RelayAddress;
use tern_wire::delivery::queue_secret;
use tern_wire::{Command, Reply};

use super::source::{self, Source};
use super::{FileProgress, FileState, OutSet, SenderQueue, Transfer};
use crate::client::devices::record_history;
use crate::client::jobs::flush_outbox;
use crate::client::model::{Contact, Direction, HistoryEntry, Queued};
use crate::client::records;
use crate::client::{
    abort, now, random_id, unwrap_abort, Client, ClientError, MAX_RELAYS_PER_CONNECTION,
};
use crate::net::{Call, NetError, RelayClient};
use crate::proto::connection::ConnState;
use crate::proto::envelope::{Kind, MAX_BODY_LEN};
use crate::proto::file::{
    chunk_count, queue_auth, seal_chunk, set_key, FileOffer, OfferQueue, OfferSet, MAX_SETS,
};
use crate::proto::keys::Secret32;

/// Chunks per round trip to one relay (1 MiB).
const BATCH: u64 = 64;
/// Round trips in flight to one relay.
const DEPTH: u64 = 4;
/// Most commands in one CREATE or SECURE batch (below the relay's
/// per-session burst of 128 queues).
const CREATE_BATCH: usize = 64;

/// What to send.
pub enum FileInput {
    Path(PathBuf),
    /// Standard input (or any reader), under this name.
    Reader(Box<dyn Read>),
}

/// How long to keep trying.
#[derive(Debug, Clone, Copy)]
pub struct UploadOptions {
    /// A copy whose relay made no progress this long is left for `tern
    /// files retry` (or given up, when another copy is complete).
    pub stall: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(30),
        }
    }
}

/// How an upload ended.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub transfer: Transfer,
    /// Copies left incomplete for now (relay unreachable or full): a later
    /// `tern files retry` goes on with them.
    pub stalled: Vec<String>,
    /// Copies given up (the relay refused them for good).
    pub failed: Vec<String>,
}

enum SetEvent {
    Progress(usize, u64),
    /// The recipient deleted the queues: it has the whole file (or turned
    /// it down); nothing more to upload to this copy.
    Ended(usize),
    Failed(usize, String),
    Stalled(usize, String),
}

impl Client {
    /// Offers a file to a contact (each of its devices gets its own copy)
    /// and uploads it. Returns one [`Uploaded`] per device.
    pub fn send_file(
        &mut self,
        contact_id: &str,
        input: FileInput,
        name: Option<String>,
        caption: &str,
        opts: UploadOptions,
        progress: &mut dyn FnMut(&FileProgress),
    ) -> Result<Vec<Uploaded>, ClientError> {
        if let Some(e) = self.removed_error()? {
            return Err(e);
        }
        if caption.len() > crate::proto::file::MAX_CAPTION_LEN {
            return Err(ClientError::Invalid(format!(
                "the caption is {} bytes, at most {} fit",
                caption.len(),
                crate::proto::file::MAX_CAPTION_LEN
            )));
        }
        let members: Vec<Contact> = self
            .group_members(contact_id)?
            .iter()
            .map(|m| self.contact(m))
            .collect::<Result<_, _>>()?;
        let ready: Vec<&Contact> = members
            .iter()
            .filter(|c| c.conn.state == ConnState::Connected && !c.removed && !c.peer_gone)
            .collect();
        if ready.is_empty() {
            return Err(ClientError::Invalid(format!(
                "{} is not connected yet (or has deleted the conversation): files go only over \
                 a connection that is up; `tern recv --wait 60` completes it",
                members.first().map_or(contact_id, |c| c.name.as_str())
            )));
        }
        let (name, size, sha256, record) = match input {
            FileInput::Path(p) => {
                let name = name.unwrap_or_else(|| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "file".into())
                });
                let (size, sha, rec) = source::from_path(&p).map_err(invalid)?;
                (name, size, sha, rec)
            }
            FileInput::Reader(mut r) => {
                let name = name.ok_or_else(|| {
                    ClientError::Invalid("a file from standard input needs a --name".into())
                })?;
                let dir = source::spool_dir(self.store.home());
                let (size, sha, rec) = source::spool(&mut r, &dir, &name).map_err(invalid)?;
                (name, size, sha, rec)
            }
        };
        let name = fit_name(&name);
        let mut out = Vec::new();
        let mut made: Vec<Transfer> = Vec::new();
        for c in &ready {
            match self.offer(c, &name, size, sha256, caption, record.clone()) {
                Ok(t) => made.push(t),
                Err(e) => {
                    if made.is_empty() && ready.len() == 1 {
                        source::remove_spool_record(&record);
                        return Err(e);
                    }
                    eprintln!(
                        "tern: warning: the file was not offered to one device of {}: {}",
                        crate::proto::text::escape_text(&c.name),
                        crate::proto::text::escape_text(&e.to_string())
                    );
                }
            }
        }
        if made.is_empty() {
            source::remove_spool_record(&record);
        }
        // One spool for every device's copy: removed when the last ends.
        let n = made.len();
        for (i, t) in made.into_iter().enumerate() {
            let u = self.upload(t, opts, i + 1 == n, progress)?;
            out.push(u);
        }
        Ok(out)
    }

    /// Goes on with an upload that stopped (a killed sender, a relay that
    /// was down).
    pub fn resume_upload(
        &mut self,
        t: Transfer,
        opts: UploadOptions,
        progress: &mut dyn FnMut(&FileProgress),
    ) -> Result<Uploaded, ClientError> {
        let last = !self
            .transfers()?
            .iter()
            .any(|o| o.id != t.id && o.state == FileState::Uploading && same_source(o, &t));
        // The offer itself may still be waiting to go out (a sender killed
        // right after recording it).
        let report = self.run_jobs(&t.contact)?;
        for e in report.errors {
            eprintln!(
                "tern: warning: the offer is kept and sent again later: {}",
                crate::proto::text::escape_text(&e.to_string())
            );
        }
        self.upload(t, opts, last, progress)
    }

    /// Creates the file queues for one device of the contact, records the
    /// transfer and sends the offer, in one transaction.
    fn offer(
        &mut self,
        c: &Contact,
        name: &str,
        size: u64,
        sha256: [u8; 32],
        caption: &str,
        record: super::SourceRecord,
    ) -> Result<Transfer, ClientError> {
        let theirs = distinct(c.conn.peer_queues.iter().map(|q| q.relay.clone()));
        let ours = self.settings()?.relay_addresses();
        let plan = plan_relays(&self.net, &theirs, &ours);
        if plan.relays.is_empty() {
            return Err(ClientError::AllRelaysFailed {
                reasons: plan.errors.join("; "),
                transient: true,
            });
        }
        let count = chunk_count(size);
        let cpq = plan.chunks_per_queue.max(1);
        let nq = count.div_ceil(cpq as u64) as usize;
        if nq > u16::MAX as usize {
            return Err(too_large(size));
        }
        // As many copies as one offer can describe.
        let mut relays = plan.relays;
        while !relays.is_empty()
            && FileOffer::encoded_len(name, caption, &relays, nq) > MAX_BODY_LEN
        {
            relays.pop();
        }
        if relays.is_empty() {
            return Err(too_large(size));
        }
        let key = Secret32::random(&mut OsRng);
        let created: Vec<Result<(OfferSet, OutSet), ClientError>> = std::thread::scope(|s| {
            let hs: Vec<_> = relays
                .iter()
                .map(|r| {
                    let net = &*self.net;
                    s.spawn(move || create_set(net, r, nq))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClientError::Invalid("queue creation panicked".into()))
                    })
                })
                .collect()
        });
        let mut sets = Vec::new();
        let mut out_sets = Vec::new();
        let mut errors = plan.errors;
        for r in created {
            match r {
                Ok((o, s)) => {
                    sets.push(o);
                    out_sets.push(s);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if sets.is_empty() {
            return Err(ClientError::AllRelaysFailed {
                reasons: errors.join("; "),
                transient: true,
            });
        }
        for e in &errors {
            eprintln!("tern: warning: {}", crate::proto::text::escape_text(e));
        }
        let offer = FileOffer {
            size,
            sha256,
            key,
            name: name.to_string(),
            caption: caption.to_string(),
            chunks_per_queue: cpq,
            sets,
        };
        let body = offer.encode()?;
        let id = random_id();
        let t_now = now();
        let transfer = Transfer {
            id,
            dir: Direction::Out,
            contact: c.id.clone(),
            name: name.to_string(),
            size,
            sha256,
            caption: caption.to_string(),
            created_ms: t_now,
            state: FileState::Uploading,
            error: None,
            offer: body.clone(),
            source: Some(record),
            sets: out_sets,
            have: Vec::new(),
            have_count: 0,
            part: None,
            saved: None,
            refused_sets: Vec::new(),
        };
        let member = c.id.clone();
        self.store
            .transaction(|tx| {
                let Some(mut c) = records::load(tx, &member)? else {
                    return Err(abort(ClientError::UnknownContact(member.clone())));
                };
                c.outbox.push(Queued {
                    kind: Kind::File,
                    id,
                    body: body.clone(),
                    created_ms: t_now,
                });
                flush_outbox(&mut c, t_now).map_err(abort)?;
                c.last_activity_ms = t_now;
                records::save(tx, &c)?;
                tx.put(&super::transfer_key(&id), &transfer)?;
                record_history(
                    tx,
                    c.group(),
                    &HistoryEntry {
                        dir: Direction::Out,
                        id,
                        text: history_text(name, size, caption),
                        sent_at_ms: t_now,
                        received_at_ms: None,
                        device: None,
                    },
                )?;
                Ok(())
            })
            .map_err(unwrap_abort)?;
        // The offer goes out now, so the recipient can start while we upload.
        let report = self.run_jobs(&c.id)?;
        for e in report.errors {
            eprintln!(
                "tern: warning: the offer is kept and sent again later: {}",
                crate::proto::text::escape_text(&e.to_string())
            );
        }
        Ok(transfer)
    }

    fn upload(
        &mut self,
        mut t: Transfer,
        opts: UploadOptions,
        last_user_of_source: bool,
        progress: &mut dyn FnMut(&FileProgress),
    ) -> Result<Uploaded, ClientError> {
        let offer = t.decode_offer()?;
        let count = t.chunk_count();
        let src = match Source::open(&t) {
            Ok(s) => s,
            Err(e) => {
                t.state = FileState::Failed;
                t.error = Some(e.to_string());
                self.put_transfer(&t)?;
                self.delete_file_queues(&t);
                return Err(invalid(e));
            }
        };
        let stop = AtomicBool::new(false);
        let mut stalled = Vec::new();
        let mut failed = Vec::new();
        let sets = t.sets.clone();
        let (tx, rx) = mpsc::channel();
        progress(&FileProgress {
            id: t.id,
            name: t.name.clone(),
            done: t.done_bytes(),
            size: t.size,
        });
        let result: Result<(), ClientError> = std::thread::scope(|s| {
            for (i, set) in sets.iter().enumerate() {
                if set.failed.is_some() || set.next >= count {
                    continue;
                }
                let tx = tx.clone();
                let (net, src, stop, offer) = (&*self.net, &src, &stop, &offer);
                s.spawn(move || upload_set(net, src, set, i, offer, count, opts, stop, &tx));
            }
            drop(tx);
            for ev in rx {
                match ev {
                    SetEvent::Progress(i, next) => t.sets[i].next = next,
                    SetEvent::Ended(i) => t.sets[i].next = count,
                    SetEvent::Failed(i, why) => {
                        failed.push(format!("{}: {why}", t.sets[i].relay.label()));
                        t.sets[i].failed = Some(why);
                    }
                    SetEvent::Stalled(i, why) => {
                        stalled.push((i, format!("{}: {why}", t.sets[i].relay.label())))
                    }
                }
                // Recorded before anything more is counted as sent; a
                // cancel from another process wins.
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
                        tx.put(&key, &t)?;
                        Ok(false)
                    })
                    .map_err(ClientError::from);
                match cancelled {
                    Ok(false) => {}
                    Ok(true) => {
                        stop.store(true, Ordering::Relaxed);
                        t.state = FileState::Cancelled;
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                progress(&FileProgress {
                    id: t.id,
                    name: t.name.clone(),
                    done: t.done_bytes(),
                    size: t.size,
                });
            }
            Ok(())
        });
        result?;
        if t.state == FileState::Cancelled {
            return Ok(Uploaded {
                transfer: t,
                stalled: Vec::new(),
                failed,
            });
        }
        let complete = t.sets.iter().any(|s| s.failed.is_none() && s.next >= count);
        let mut stalled_text: Vec<String> = Vec::new();
        if complete {
            // The file is whole on at least one relay: a copy that stalled
            // is given up rather than left half-way for ever.
            for (i, why) in stalled {
                t.sets[i].failed = Some(why.clone());
                failed.push(why);
            }
            t.state = FileState::Sent;
        } else if t.sets.iter().all(|s| s.failed.is_some()) {
            t.state = FileState::Failed;
            t.error = Some(failed.join("; "));
        } else {
            stalled_text = stalled.into_iter().map(|(_, w)| w).collect();
        }
        self.put_transfer(&t)?;
        if t.state != FileState::Uploading && last_user_of_source {
            source::remove_spool(&t);
        }
        if t.state == FileState::Failed {
            self.delete_file_queues(&t);
        }
        Ok(Uploaded {
            transfer: t,
            stalled: stalled_text,
            failed,
        })
    }
}

fn invalid(e: impl std::fmt::Display) -> ClientError {
    ClientError::Invalid(e.to_string())
}

fn too_large(size: u64) -> ClientError {
    ClientError::Invalid(format!(
        "a file of {size} bytes is larger than one offer can describe with these relays \
         (about 4 GiB with one relay); split it (`split -b 1G`) and send the parts"
    ))
}

fn same_source(a: &Transfer, b: &Transfer) -> bool {
    match (&a.source, &b.source) {
        (
            Some(super::SourceRecord::Spool { path: p, .. }),
            Some(super::SourceRecord::Spool { path: q, .. }),
        ) => p == q,
        _ => false,
    }
}

/// The history line of a file.
pub fn history_text(name: &str, size: u64, caption: &str) -> String {
    let mut s = format!("[file] {} ({})", name, human_size(size));
    if !caption.is_empty() {
        s.push('\n');
        s.push_str(caption);
    }
    s
}

/// 1,234,567 bytes as "1.2 MiB".
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} {}", if n == 1 { "byte" } else { "bytes" });
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The name as sent: at most 255 bytes, cut at a character boundary.
fn fit_name(name: &str) -> String {
    let mut cut = name.len().min(crate::proto::file::MAX_NAME_LEN);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let n = &name[..cut];
    if n.is_empty() {
        "file".into()
    } else {
        n.to_string()
    }
}

fn distinct(relays: impl Iterator<Item = RelayAddress>) -> Vec<RelayAddress> {
    let mut out: Vec<RelayAddress> = Vec::new();
    for r in relays {
        if !out.iter().any(|o| o.same_relay(&r)) {
            out.push(r);
        }
    }
    out
}

struct Plan {
    relays: Vec<RelayAddress>,
    chunks_per_queue: u32,
    errors: Vec<String>,
}

/// The relays a file goes to: the recipient's (those that let anyone
/// create queues), and for each of theirs that does not, one of ours not
/// used yet. Asks each for its policy (INFO) at once: a queue holds at most
/// what the strictest allows, less a margin for chunks a killed sender
/// uploads twice.
fn plan_relays(net: &RelayClient, theirs: &[RelayAddress], ours: &[RelayAddress]) -> Plan {
    let infos = |list: &[RelayAddress]| -> Vec<Result<tern_wire::RelayInfo, NetError>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = list
                .iter()
                .map(|r| {
                    s.spawn(move || match net.call(r, &Command::Info, None)? {
                        Reply::Info(i) => Ok(i),
                        other => Err(NetError::Unreachable {
                            relay: r.label(),
                            reason: format!("unexpected answer {other:?} to INFO"),
                        }),
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(NetError::Unreachable {
                            relay: String::new(),
                            reason: "INFO panicked".into(),
                        })
                    })
                })
                .collect()
        })
    };
    let mut relays = Vec::new();
    let mut pending = Vec::new();
    let mut errors = Vec::new();
    let mut closed = 0;
    for (r, info) in theirs.iter().zip(infos(theirs)) {
        match info {
            Ok(i) if i.open => {
                relays.push(r.clone());
                pending.push(i.max_pending);
            }
            Ok(_) => closed += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    if closed > 0 {
        let spare: Vec<RelayAddress> = ours
            .iter()
            .filter(|o| !relays.iter().any(|r: &RelayAddress| r.same_relay(o)))
            .take(closed)
            .cloned()
            .collect();
        for (r, info) in spare.iter().zip(infos(&spare)) {
            match info {
                Ok(i) => {
                    relays.push(r.clone());
                    pending.push(i.max_pending);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    relays.truncate(MAX_SETS.min(2 * MAX_RELAYS_PER_CONNECTION));
    let min = pending.iter().copied().min().unwrap_or(1000);
    Plan {
        relays,
        chunks_per_queue: (min - min / 16).clamp(1, crate::proto::file::MAX_CHUNKS_PER_QUEUE),
        errors,
    }
}

/// Creates and secures the `n` queues of one copy on `relay`.
fn create_set(
    net: &RelayClient,
    relay: &RelayAddress,
    n: usize,
) -> Result<(OfferSet, OutSet), ClientError> {
    let seed = Secret32::random(&mut OsRng);
    let sender_seed = Secret32::random(&mut OsRng);
    // With --isolate the copy has a session of its own.
    let session = random_id();
    let auth: Vec<SigningKey> = (0..n).map(|q| queue_auth(&seed, q as u16)).collect();
    let dh: Vec<x25519_dalek::StaticSecret> = (0..n)
        .map(|_| x25519_dalek::StaticSecret::random_from_rng(OsRng))
        .collect();
    let mut queues: Vec<(OfferQueue, tern_wire::Id)> = Vec::with_capacity(n);
    let mut start = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while start < n {
        let end = (start + CREATE_BATCH).min(n);
        let calls = (start..end)
            .map(|q| Call {
                command: Command::Create {
                    access_key: relay.access_key.clone(),
                    recipient_auth: auth[q].verifying_key().to_bytes(),
                    recipient_dh: x25519_dalek::PublicKey::from(&dh[q]).to_bytes(),
                },
                key: Some(&auth[q]),
            })
            .collect();
        let mut made = 0;
        let mut error = None;
        for r in net.batch_for(relay, Some(&session), calls) {
            match r {
                Ok(Reply::Queue {
                    recipient_id,
                    sender_id,
                    relay_dh,
                }) if error.is_none() => {
                    let q = start + made;
                    let secret = queue_secret(&dh[q], &relay_dh)
                        .map_err(|e| ClientError::Invalid(format!("{}: {e}", relay.label())))?;
                    queues.push((
                        OfferQueue {
                            recipient_id,
                            queue_secret: Secret32(*secret),
                        },
                        sender_id,
                    ));
                    made += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        start += made;
        match error {
            None => {}
            // A burst of queue creation waits for the relay's rate limit.
            Some(e) if e.is_transient() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_secs(2))
            }
            Some(e) => return Err(e.into()),
        }
    }
    let sender_auth: Vec<SigningKey> = (0..n).map(|q| queue_auth(&sender_seed, q as u16)).collect();
    let calls = queues
        .iter()
        .enumerate()
        .map(|(q, (oq, _))| Call {
            command: Command::Secure {
                recipient_id: oq.recipient_id,
                sender_auth: sender_auth[q].verifying_key().to_bytes(),
            },
            key: Some(&auth[q]),
        })
        .collect();
    for r in net.batch_for(relay, Some(&session), calls) {
        r?;
    }
    let offer_set = OfferSet {
        relay: relay.without_access_key(),
        seed,
        queues: queues.iter().map(|(q, _)| q.clone()).collect(),
    };
    let out = OutSet {
        relay: relay.clone(),
        sender_seed,
        queues: queues
            .into_iter()
            .map(|(_, sender_id)| SenderQueue { sender_id })
            .collect(),
        next: 0,
        failed: None,
    };
    Ok((offer_set, out))
}

#[allow(clippy::too_many_arguments)]
fn upload_set(
    net: &RelayClient,
    src: &Source,
    set: &OutSet,
    idx: usize,
    offer: &FileOffer,
    count: u64,
    opts: UploadOptions,
    stop: &AtomicBool,
    events: &mpsc::Sender<SetEvent>,
) {
    let key = set_key(&offer.key, idx as u8);
    let cpq = offer.chunks_per_queue as u64;
    let signers: Vec<SigningKey> = (0..set.queues.len())
        .map(|q| queue_auth(&set.sender_seed, q as u16))
        .collect();
    let session = set.queues[0].sender_id;
    let mut next = set.next;
    let mut backoff = Duration::from_millis(200);
    let mut since: Option<Instant> = None;
    while next < count && !stop.load(Ordering::Relaxed) {
        let end = (next + BATCH * DEPTH).min(count);
        let mut calls = Vec::with_capacity((end - next) as usize);
        for j in next..end {
            let data = match src.chunk(j) {
                Ok(d) => d,
                Err(e) => {
                    let _ = events.send(SetEvent::Failed(idx, e.to_string()));
                    return;
                }
            };
            let q = (j / cpq) as usize;
            calls.push(Call {
                command: Command::Send {
                    sender_id: set.queues[q].sender_id,
                    message: seal_chunk(&key, j as u32, count, &data),
                },
                key: Some(&signers[q]),
            });
        }
        // DEPTH batches in flight on the one session: the relay commits
        // one while the next arrives.
        let mut batches: Vec<Vec<Call<'_>>> = Vec::new();
        let mut rest = calls.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(BATCH as usize).collect());
        }
        let replies: Vec<Result<Reply, NetError>> = std::thread::scope(|s| {
            let hs: Vec<_> = batches
                .into_iter()
                .map(|b| s.spawn(|| net.batch_for(&set.relay, Some(&session), b)))
                .collect();
            hs.into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(NetError::Unreachable {
                            relay: set.relay.label(),
                            reason: "an upload thread panicked".into(),
                        })]
                    })
                })
                .collect()
        });
        let ok = replies.iter().take_while(|r| r.is_ok()).count() as u64;
        if ok > 0 {
            next += ok;
            since = None;
            backoff = Duration::from_millis(200);
            if events.send(SetEvent::Progress(idx, next)).is_err() {
                return;
            }
        }
        if let Some(Err(e)) = replies.get(ok as usize) {
            if e.code() == Some(tern_wire::ErrorCode::Auth) {
                let _ = events.send(SetEvent::Ended(idx));
                return;
            }
            if !e.is_transient() {
                let _ = events.send(SetEvent::Failed(idx, e.to_string()));
                return;
            }
            let start = *since.get_or_insert_with(Instant::now);
            if start.elapsed() >= opts.stall {
                let _ = events.send(SetEvent::Stalled(idx, e.to_string()));
                return;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
