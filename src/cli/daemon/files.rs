//! Files through the daemon: every served profile downloads the files
//! offered to it (as `tern recv --follow` does) into its files folder, and
//! says so with `file` and `file_progress` notifications; the methods
//! `send_file`, `files`, `file_get`, `file_cancel` and `file_retry` are
//! `tern send --file` and `tern files`. docs/JSONRPC.md is their reference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use data_encoding::HEXLOWER;
use serde_json::{json, Value};

use super::hub::{Conn, Hub};
use super::rpc::{notification, only, opt_str, opt_u64, req_str, RpcError};
use super::{Daemon, Ready};
use crate::cli::exit::{FAILURE, TRY_AGAIN, USAGE};
use crate::cli::output::note;
use crate::cli::transfers::{contact_name, state_json};
use crate::client::files::download::{DownloadOptions, FileEvent};
use crate::client::files::upload::{FileInput, UploadOptions, Uploaded};
use crate::client::files::{FileProgress, FileState, Transfer};
use crate::client::model::Direction;
use crate::client::Client;

/// Where a profile's received files go, and the largest it takes unasked.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub dir: PathBuf,
    pub max_size: u64,
}

/// `--files-dir` and `--max-file-size`, as `tern recv` takes them.
#[derive(Debug, Clone, clap::Args)]
pub struct FileArgs {
    /// Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or
    /// downloads/ in each profile]; never over another file
    #[arg(long, env = "TERN_FILES_DIR", value_name = "DIR")]
    pub files_dir: Option<PathBuf>,
    /// Offers of larger files are kept, not downloaded (the method
    /// `file_get` takes one): a number of bytes, or with K, M, G
    /// [default: 100M]
    #[arg(long, env = "TERN_MAX_FILE_SIZE", value_name = "SIZE", value_parser = crate::cli::transfers::parse_size)]
    pub max_file_size: Option<u64>,
}

impl FileArgs {
    /// The configuration for the profile in `home`.
    pub fn config(&self, home: &std::path::Path) -> FilesConfig {
        FilesConfig {
            dir: self
                .files_dir
                .clone()
                .unwrap_or_else(|| crate::cli::transfers::default_files_dir(home)),
            max_size: self
                .max_file_size
                .unwrap_or(crate::client::files::DEFAULT_MAX_FILE_SIZE),
        }
    }
}

/// How long a download waits for chunks still being uploaded before it
/// leaves the rest for the next round.
const LINGER: Duration = Duration::from_secs(10);
/// How often the files thread looks for new offers.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// A relay that makes no progress on an upload for this long is given up
/// on (`stall` overrides it).
const DEFAULT_STALL: u64 = 30;

/// `file_progress` at most once per MiB of each file (and at its end).
struct ProgressNotes {
    last: Option<([u8; 16], u64)>,
}

impl ProgressNotes {
    fn new() -> Self {
        Self { last: None }
    }

    /// The notification for `p`, when one is due.
    fn line(&mut self, label: &str, dir: Direction, p: &FileProgress) -> Option<String> {
        let step = p.done >> 20;
        if self.last == Some((p.id, step)) && p.done != p.size {
            return None;
        }
        self.last = Some((p.id, step));
        Some(notification(
            "file_progress",
            json!({
                "profile": label,
                "id": HEXLOWER.encode(&p.id),
                "direction": dir,
                "name": p.name,
                "done": p.done,
                "size": p.size,
            }),
        ))
    }
}

fn file_value(label: &str, client: &Client, t: &Transfer) -> Value {
    let mut v = state_json(t, &contact_name(client, t));
    v["profile"] = json!(label);
    v
}

/// A download's events as notifications: progress to `progress` (the
/// subscribers, or one caller), how each file ended to the subscribers.
fn download_sink<'a>(
    label: &'a str,
    hub: &'a Hub,
    progress: &'a dyn Fn(&str),
    notes: &'a mut ProgressNotes,
) -> impl FnMut(FileEvent) + 'a {
    move |e| {
        let (transfer, contact, error) = match e {
            FileEvent::Progress(p) => {
                if let Some(line) = notes.line(label, Direction::In, &p) {
                    progress(&line);
                }
                return;
            }
            FileEvent::Saved { transfer, contact } => (transfer, contact, None),
            FileEvent::TooLarge {
                transfer, contact, ..
            } => (transfer, contact, None),
            FileEvent::Incomplete { transfer, contact } => (transfer, contact, None),
            FileEvent::Failed {
                transfer,
                contact,
                error,
                ..
            } => (transfer, contact, Some(error)),
        };
        let mut v = state_json(&transfer, &contact);
        v["profile"] = json!(label);
        if let Some(e) = error {
            v["error"] = json!(e);
        }
        hub.notify(&notification("file", v));
    }
}

/// A profile's files thread: downloads whatever is offered, for ever.
pub(super) fn files_thread(label: String, mut client: Client, hub: Arc<Hub>, cfg: FilesConfig) {
    let opts = DownloadOptions {
        dir: cfg.dir.clone(),
        max_size: cfg.max_size,
        linger: LINGER,
        only: None,
    };
    let mut notes = ProgressNotes::new();
    loop {
        let open = client
            .open_incoming()
            .map(|v| !v.is_empty())
            .unwrap_or(false);
        if open {
            let broadcast = |line: &str| hub.notify(line);
            let mut sink = download_sink(&label, &hub, &broadcast, &mut notes);
            if let Err(e) = client.download_files(&opts, &mut sink) {
                note(&format!("{label}: files: {e}"));
                hub.notify(&notification(
                    "error",
                    json!({"profile": label, "kind": "warning", "message": format!("files: {e}")}),
                ));
            }
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

impl Daemon {
    /// The file methods; `None` for any other method.
    pub(super) fn files(&self, p: &Value) -> Result<Value, RpcError> {
        only(p, &["profile"])?;
        let (s, r) = self.ready(p)?;
        let c = r.client();
        let all = c.transfers()?;
        Ok(Value::Array(
            all.iter().map(|t| file_value(&s.label, &c, t)).collect(),
        ))
    }

    /// A handle of its own for a long transfer, so that the profile's other
    /// methods are not held up meanwhile.
    fn transfer_handle(r: &Ready) -> Result<Client, RpcError> {
        Ok(r.client().another_handle()?)
    }

    pub(super) fn send_file(&self, p: &Value, conn: &Arc<Conn>) -> Result<Value, RpcError> {
        only(
            p,
            &["profile", "contact", "path", "name", "caption", "stall"],
        )?;
        let contact = req_str(p, "contact")?;
        let path = PathBuf::from(req_str(p, "path")?);
        // The daemon's working directory is not the caller's.
        if !path.is_absolute() {
            return Err(RpcError::params(
                "path must be absolute (the daemon's working directory is not yours)",
            ));
        }
        let name = opt_str(p, "name")?.map(str::to_string);
        let caption = opt_str(p, "caption")?.unwrap_or("");
        let stall = opt_u64(p, "stall")?.unwrap_or(DEFAULT_STALL);
        let (s, r) = self.ready(p)?;
        let mut c = Self::transfer_handle(r)?;
        let id = c.contact_id(contact)?;
        let mut notes = ProgressNotes::new();
        let label = s.label.clone();
        let uploads = c
            .send_file(
                &id,
                FileInput::Path(path.clone()),
                name,
                caption,
                UploadOptions {
                    stall: Duration::from_secs(stall),
                },
                &mut |fp| {
                    if let Some(line) = notes.line(&label, Direction::Out, fp) {
                        conn.send_line(&line);
                    }
                },
            )
            .map_err(|e| {
                let code = if e.is_transient() { TRY_AGAIN } else { FAILURE };
                RpcError::exit(code, format!("{}: {e}", path.display()))
            })?;
        uploads_result(&s.label, &c, &uploads)
    }

    pub(super) fn file_get(&self, p: &Value, conn: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "id"])?;
        let (s, r) = self.ready(p)?;
        let mut c = Self::transfer_handle(r)?;
        let t = c.transfer(req_str(p, "id")?)?;
        self.download_now(&s.label, r, &mut c, t, conn)
    }

    /// Downloads one incoming file whatever its size, with progress to the
    /// caller; the file's state after.
    fn download_now(
        &self,
        label: &str,
        r: &Ready,
        c: &mut Client,
        t: Transfer,
        conn: &Arc<Conn>,
    ) -> Result<Value, RpcError> {
        if t.dir != Direction::In {
            return Err(RpcError::exit(
                USAGE,
                format!("file {} is one you sent", t.id_hex()),
            ));
        }
        if !t.state.is_open() && t.state != FileState::Failed {
            return Err(RpcError::exit(
                USAGE,
                format!("file {} is {} already", t.id_hex(), t.state.word()),
            ));
        }
        let opts = DownloadOptions {
            dir: r.files.dir.clone(),
            max_size: u64::MAX,
            linger: Duration::from_secs(2),
            only: Some(t.id),
        };
        let mut notes = ProgressNotes::new();
        let to_caller = |line: &str| {
            conn.send_line(line);
        };
        let mut sink = download_sink(label, &r.hub, &to_caller, &mut notes);
        c.download_files(&opts, &mut sink)?;
        let after = c.transfer(&t.id_hex())?;
        let v = file_value(label, c, &after);
        match after.state {
            FileState::Received => Ok(v),
            FileState::Failed => Err(RpcError::exit(
                FAILURE,
                format!(
                    "{}: {}",
                    after.name,
                    after.error.as_deref().unwrap_or("failed")
                ),
            )
            .with(v)),
            _ => Err(RpcError::exit(
                TRY_AGAIN,
                format!(
                    "{} is not here whole yet; the daemon goes on with it",
                    after.name
                ),
            )
            .with(v)),
        }
    }

    pub(super) fn file_cancel(&self, p: &Value) -> Result<Value, RpcError> {
        only(p, &["profile", "id"])?;
        let (s, r) = self.ready(p)?;
        let mut c = r.client();
        let t = c.cancel_transfer(req_str(p, "id")?)?;
        Ok(file_value(&s.label, &c, &t))
    }

    pub(super) fn file_retry(&self, p: &Value, conn: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "id", "stall"])?;
        let stall = opt_u64(p, "stall")?.unwrap_or(DEFAULT_STALL);
        let (s, r) = self.ready(p)?;
        let mut c = Self::transfer_handle(r)?;
        let t = c.transfer(req_str(p, "id")?)?;
        if t.dir == Direction::In {
            return self.download_now(&s.label, r, &mut c, t, conn);
        }
        if t.state != FileState::Uploading {
            return Err(RpcError::exit(
                USAGE,
                format!(
                    "file {} is {}: nothing to retry",
                    t.id_hex(),
                    t.state.word()
                ),
            ));
        }
        let mut notes = ProgressNotes::new();
        let label = s.label.clone();
        let u = c.resume_upload(
            t,
            UploadOptions {
                stall: Duration::from_secs(stall),
            },
            &mut |fp| {
                if let Some(line) = notes.line(&label, Direction::Out, fp) {
                    conn.send_line(&line);
                }
            },
        )?;
        uploads_result(&s.label, &c, &[u])
    }
}

/// `{files: [...]}`, one per device of the contact; an error (with the
/// same data) unless every copy is whole on a relay.
fn uploads_result(label: &str, c: &Client, uploads: &[Uploaded]) -> Result<Value, RpcError> {
    let files: Vec<Value> = uploads
        .iter()
        .map(|u| {
            let mut v = file_value(label, c, &u.transfer);
            v["given_up"] = json!(u.failed);
            v["stalled"] = json!(u.stalled);
            v
        })
        .collect();
    let result = json!({ "files": files });
    let states: Vec<FileState> = uploads.iter().map(|u| u.transfer.state).collect();
    if states.contains(&FileState::Uploading) {
        return Err(RpcError::exit(
            TRY_AGAIN,
            "not on any relay whole yet; `file_retry` goes on where it stopped",
        )
        .with(result));
    }
    if let Some(u) = uploads
        .iter()
        .find(|u| !matches!(u.transfer.state, FileState::Sent | FileState::Cancelled))
    {
        return Err(RpcError::exit(
            FAILURE,
            format!(
                "{} could not be sent: {}",
                u.transfer.name,
                u.transfer
                    .error
                    .as_deref()
                    .unwrap_or("every relay refused it")
            ),
        )
        .with(result));
    }
    Ok(result)
}
