//! Files at the command line: `tern send --file`, what `tern recv` does
//! with offers, and `tern files` (list, get, cancel, retry). Progress goes
//! to stderr as a bar on a terminal, as JSON objects with `--json`, and
//! nowhere on a pipe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use data_encoding::HEXLOWER;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::exit::{fail, FAILURE, TRY_AGAIN, USAGE};
use super::output::{json, note, text, try_line};
use super::{unlock, Cli};
use crate::client::files::download::{DownloadOptions, FileEvent};
use crate::client::files::upload::{human_size, FileInput, UploadOptions, Uploaded};
use crate::client::files::{FileProgress, FileState, Transfer, DEFAULT_MAX_FILE_SIZE};
use crate::client::model::Direction;
use crate::client::Client;

/// Shows a transfer's progress the way the output allows.
pub struct Progress {
    bar: Option<ProgressBar>,
    json: bool,
    last_json: u64,
}

impl Progress {
    pub fn new(as_json: bool) -> Self {
        Self {
            bar: None,
            json: as_json,
            last_json: u64::MAX,
        }
    }

    pub fn update(&mut self, p: &FileProgress) {
        if self.json {
            // At most one object per MiB (and the ends).
            let step = p.done >> 20;
            if step != self.last_json || p.done == p.size {
                self.last_json = step;
                let _ = try_line(&super::output::json_text(&json!({
                    "type": "progress",
                    "file": HEXLOWER.encode(&p.id),
                    "name": p.name,
                    "done": p.done,
                    "size": p.size,
                })));
            }
            return;
        }
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::with_draw_target(Some(p.size), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(text(&p.name).into_owned());
            b
        });
        bar.set_length(p.size);
        bar.set_position(p.done);
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A transfer as `tern files --json` and the daemon show it.
pub(crate) fn state_json(t: &Transfer, contact: &str) -> Value {
    json!({
        "type": "file",
        "id": t.id_hex(),
        "direction": t.dir,
        "contact": contact,
        "name": t.name,
        "saved_as": t.saved.as_ref().map(|p| p.display().to_string()),
        "size": t.size,
        "sha256": HEXLOWER.encode(&t.sha256),
        "caption": t.caption,
        "state": t.state.word(),
        "done": t.done_bytes(),
        "error": t.error,
    })
}

/// `tern send CONTACT --file PATH…`: each file offered and uploaded in
/// turn; the words of the message, if any, are the caption.
pub fn send_files(cli: &Cli, args: &super::send::Args) -> anyhow::Result<()> {
    let stdin_files = args.file.iter().filter(|p| p.as_os_str() == "-").count();
    if stdin_files > 1 {
        return Err(fail(USAGE, "standard input (`--file -`) can be sent once"));
    }
    if stdin_files == 1 && args.name.is_none() {
        return Err(fail(
            USAGE,
            "a file from standard input needs a name: add --name NAME",
        ));
    }
    if args.name.is_some() && args.file.len() > 1 {
        return Err(fail(
            USAGE,
            "--name names one file: send the files one by one",
        ));
    }
    let caption = args.text.join(" ");
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    let name = client.contact(&id)?.name;
    let opts = UploadOptions {
        stall: Duration::from_secs(args.stall),
    };
    let mut worst: Option<anyhow::Error> = None;
    for path in &args.file {
        let input = if path.as_os_str() == "-" {
            FileInput::Reader(Box::new(std::io::stdin()))
        } else {
            FileInput::Path(path.clone())
        };
        let mut progress = Progress::new(args.json);
        let result = client.send_file(&id, input, args.name.clone(), &caption, opts, &mut |p| {
            progress.update(p)
        });
        progress.finish();
        let uploads = match result {
            Ok(u) => u,
            Err(e) => {
                let transient = e.is_transient();
                let e = fail(
                    if transient { TRY_AGAIN } else { FAILURE },
                    format!("{}: {e}", path.display()),
                );
                worst = Some(e);
                continue;
            }
        };
        if let Some(e) = report_uploads(&name, &uploads, args.json) {
            worst = Some(e);
        }
    }
    match worst {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Prints how uploads ended; the error to exit with, if one did not end
/// well.
fn report_uploads(contact: &str, uploads: &[Uploaded], as_json: bool) -> Option<anyhow::Error> {
    let mut error = None;
    for u in uploads {
        let t = &u.transfer;
        if as_json {
            json(&state_json(t, contact));
        }
        for f in &u.failed {
            note(&format!("warning: a copy was given up: {}", text(f)));
        }
        match t.state {
            FileState::Sent => {
                if !as_json {
                    note(&format!(
                        "sent {} ({}) to {} (file {})",
                        text(&t.name),
                        human_size(t.size),
                        text(contact),
                        &t.id_hex()[..8]
                    ));
                }
            }
            FileState::Uploading => {
                error = Some(fail(
                    TRY_AGAIN,
                    format!(
                        "{} is not on any relay whole yet ({}); `tern files retry {}` goes on \
                         where it stopped",
                        text(&t.name),
                        u.stalled.join("; "),
                        &t.id_hex()[..8]
                    ),
                ));
            }
            FileState::Cancelled => {
                note(&format!("{} was cancelled", text(&t.name)));
            }
            _ => {
                error = Some(fail(
                    FAILURE,
                    format!(
                        "{} could not be sent: {}",
                        text(&t.name),
                        text(t.error.as_deref().unwrap_or("every relay refused it"))
                    ),
                ));
            }
        }
    }
    error
}

/// Where received files go by default: `$XDG_DOWNLOAD_DIR/tern`, or
/// `downloads` in the profile.
pub fn default_files_dir(home: &Path) -> PathBuf {
    match std::env::var_os("XDG_DOWNLOAD_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("tern"),
        None => home.join("downloads"),
    }
}

/// Parses `100M`, `1G`, `512k`, `2MiB` or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 100M, 1G or a number of bytes)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// What `tern recv` does with files: downloads every open offer (at most
/// `max_size` each) into `dir`, printing what was saved. The error to exit
/// with if a file failed.
pub fn receive_files(
    client: &mut Client,
    dir: &Path,
    max_size: u64,
    linger: Duration,
    only: Option<[u8; 16]>,
    as_json: bool,
) -> anyhow::Result<Option<anyhow::Error>> {
    let opts = DownloadOptions {
        dir: dir.to_path_buf(),
        max_size,
        linger,
        only,
    };
    let mut progress = Progress::new(as_json);
    let mut error = None;
    let mut write_error = None;
    client.download_files(&opts, &mut |e| {
        if !matches!(e, FileEvent::Progress(_)) {
            progress.finish();
        }
        match e {
            FileEvent::Progress(p) => progress.update(&p),
            FileEvent::Saved { transfer, contact } => {
                let path = transfer
                    .saved
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let line = if as_json {
                    super::output::json_text(&state_json(&transfer, &contact))
                } else {
                    format!(
                        "{} sent {} ({}) → saved as {}",
                        text(&contact),
                        text(&transfer.name),
                        human_size(transfer.size),
                        text(&path)
                    )
                };
                if let Err(e) = try_line(&line) {
                    write_error.get_or_insert(e);
                }
            }
            FileEvent::TooLarge {
                transfer,
                contact,
                limit,
            } => {
                if as_json {
                    let _ = try_line(&super::output::json_text(&state_json(&transfer, &contact)));
                }
                note(&format!(
                    "{} offers {} ({}), larger than your limit of {}: not downloaded; \
                     `tern files get {}` downloads it",
                    text(&contact),
                    text(&transfer.name),
                    human_size(transfer.size),
                    human_size(limit),
                    &transfer.id_hex()[..8]
                ));
            }
            FileEvent::Incomplete { transfer, contact } => {
                if as_json {
                    let _ = try_line(&super::output::json_text(&state_json(&transfer, &contact)));
                }
                note(&format!(
                    "{} from {}: {} of {} here; the rest comes with the next `tern recv`",
                    text(&transfer.name),
                    text(&contact),
                    human_size(transfer.done_bytes()),
                    human_size(transfer.size)
                ));
            }
            FileEvent::Failed {
                transfer,
                contact,
                error: why,
                permanent,
            } => {
                if as_json {
                    let mut v = state_json(&transfer, &contact);
                    v["error"] = json!(why);
                    let _ = try_line(&super::output::json_text(&v));
                }
                let msg = format!(
                    "{} from {}: {}",
                    text(&transfer.name),
                    text(&contact),
                    text(&why)
                );
                error = Some(fail(if permanent { FAILURE } else { TRY_AGAIN }, msg));
            }
        }
    })?;
    progress.finish();
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Ok(Some(fail(
                FAILURE,
                format!("could not write to standard output ({e}); see `tern files`"),
            )));
        }
    }
    Ok(error)
}

/// Files in and out
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern files                    # every file in and out, newest first\n  tern files get 3fa2c1d0       # download an offer over your size limit\n  tern files retry 3fa2c1d0     # go on with an upload or download that stopped\n  tern files cancel 3fa2c1d0    # stop, and delete it from the relays"
)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// One JSON object per line
    #[arg(long, global = true)]
    pub json: bool,
    /// Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or
    /// downloads/ in the profile]
    #[arg(long, global = true, env = "TERN_FILES_DIR", value_name = "DIR")]
    pub files_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Download an offered file, whatever its size
    Get {
        /// The file's id, or its first digits (at least 4; see `tern files`)
        id: String,
    },
    /// Stop a file in or out and delete it from the relays
    Cancel {
        /// The file's id, or its first digits (at least 4; see `tern files`)
        id: String,
    },
    /// Go on with an upload or download that stopped
    Retry {
        /// The file's id, or its first digits (at least 4; see `tern files`)
        id: String,
        /// Give up on a relay that makes no progress for this long
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        stall: u64,
    },
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let home = client.store.home().to_path_buf();
    let dir = args
        .files_dir
        .clone()
        .unwrap_or_else(|| default_files_dir(&home));
    match &args.action {
        None => list(&client, args.json),
        Some(Action::Cancel { id }) => {
            let t = client.cancel_transfer(id)?;
            if args.json {
                json(&state_json(&t, &contact_name(&client, &t)));
            } else {
                note(&format!(
                    "cancelled {} and deleted it from the relays",
                    text(&t.name)
                ));
            }
            Ok(())
        }
        Some(Action::Get { id }) => {
            let t = client.transfer(id)?;
            get(&mut client, t, &dir, args.json)
        }
        Some(Action::Retry { id, stall }) => {
            let t = client.transfer(id)?;
            match t.dir {
                Direction::In => get(&mut client, t, &dir, args.json),
                Direction::Out => {
                    if t.state != FileState::Uploading {
                        return Err(fail(
                            USAGE,
                            format!(
                                "file {} is {}: nothing to retry",
                                t.id_hex(),
                                t.state.word()
                            ),
                        ));
                    }
                    let contact = contact_name(&client, &t);
                    let mut progress = Progress::new(args.json);
                    let u = client.resume_upload(
                        t,
                        UploadOptions {
                            stall: Duration::from_secs(*stall),
                        },
                        &mut |p| progress.update(p),
                    )?;
                    progress.finish();
                    match report_uploads(&contact, &[u], args.json) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    }
                }
            }
        }
    }
}

fn get(client: &mut Client, t: Transfer, dir: &Path, as_json: bool) -> anyhow::Result<()> {
    if t.dir != Direction::In {
        return Err(fail(USAGE, format!("file {} is one you sent", t.id_hex())));
    }
    if !t.state.is_open() && t.state != FileState::Failed {
        return Err(fail(
            USAGE,
            format!("file {} is {} already", t.id_hex(), t.state.word()),
        ));
    }
    match receive_files(
        client,
        dir,
        u64::MAX,
        Duration::from_secs(2),
        Some(t.id),
        as_json,
    )? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The name of a transfer's contact, as `tern files` and the daemon show it.
pub(crate) fn contact_name(client: &Client, t: &Transfer) -> String {
    client
        .contact(&t.contact)
        .map(|c| c.name)
        .unwrap_or_else(|_| "(forgotten)".into())
}

fn list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let all = client.transfers()?;
    if all.is_empty() && !as_json {
        note("no files yet: `tern send CONTACT --file PATH` sends one");
    }
    for t in &all {
        let contact = contact_name(client, t);
        if as_json {
            json(&state_json(t, &contact));
            continue;
        }
        let arrow = match t.dir {
            Direction::In => format!("from {}", text(&contact)),
            Direction::Out => format!("to {}", text(&contact)),
        };
        let mut line = format!(
            "{}  {:<10} {}  {} ({})",
            &t.id_hex()[..8],
            t.state.word(),
            arrow,
            text(&t.name),
            human_size(t.size)
        );
        if t.state.is_open() {
            line.push_str(&format!(
                ", {}%",
                (t.done_bytes() as u128 * 100 / t.size.max(1) as u128).min(100)
            ));
        }
        if let Some(p) = &t.saved {
            if t.state == FileState::Received {
                line.push_str(&format!(" → {}", text(&p.display().to_string())));
            }
        }
        if let Some(e) = &t.error {
            line.push_str(&format!(": {}", text(e)));
        }
        if let Err(e) = try_line(&line) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// The `--max-file-size` default, for help texts.
pub fn default_max() -> u64 {
    DEFAULT_MAX_FILE_SIZE
}
