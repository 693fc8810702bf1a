//! `tern daemon`: keeps profiles unlocked, holds their relay subscriptions,
//! and serves JSON-RPC 2.0 (one object per line) on a Unix socket; `tern
//! jsonrpc` serves the same on stdin and stdout.
//!
//! Threads, no async runtime: one engine thread per profile runs the
//! client engine's receiving loop (`Client::fetch`, as `tern recv --follow`
//! does, with its own thread for uploads), one thread per client
//! connection runs that client's requests in order, on the profile's
//! command handle (a second store handle on the same relay sessions).
//! Received messages reach clients through the [`hub`]. A profile that
//! cannot be opened, or whose receiving fails, is reported (to the log and
//! as `error` notifications) and does not stop the others.

pub mod client;
pub mod files;
pub mod hub;
pub mod lock;
mod methods;
pub use methods::method_names;

/// The longest `log` answer, in messages.
pub const MAX_LOG: usize = 10_000;
pub mod rpc;

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use data_encoding::HEXLOWER;
use serde_json::{json, Value};

use super::exit::code_for;
use super::output::{json_text, note};
use super::{recv, unlock, Cli};
use crate::client::fetch::{Event, FetchOptions, Shown};
use crate::client::{now, Client, ClientError};
use crate::store::{Store, StoreError};
use hub::{Conn, Hub};
use rpc::{notification, parse_request, read_line, response, Line, RpcError};

/// Most clients connected at once; more are refused with an error.
const MAX_CLIENTS: usize = 256;
/// A client that does not read for this long is disconnected: a write to
/// it must not hold up the delivery to everyone else.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Restarting a profile's receiving after it failed: first after this,
/// doubling up to [`MAX_RESTART`].
const FIRST_RESTART: Duration = Duration::from_secs(1);
const MAX_RESTART: Duration = Duration::from_secs(60);

/// Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern daemon --home ~/bots/alerts &\n  tern daemon --home A --home B --socket /run/user/1000/tern/bots.sock --manual-ack\n  tern daemon --homes-dir ~/bots\n  echo '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"contacts\"}' | socat - UNIX-CONNECT:SOCKET\n\nOnce listening, the daemon prints the socket's path on stdout. It unlocks\neach profile once, as other commands do (--passphrase-file,\nTERN_PASSPHRASE_FILE, --identity; the same for every --home); a profile\nthat cannot be opened is reported and the others are served. A second\ndaemon for a home is refused. `tern send`, `tern recv`, `tern contacts`\nand `tern log` go through a daemon serving their home (TERN_NO_DAEMON=1: not). Methods,\nnotifications and error codes: man tern-daemon, docs/JSONRPC.md and\ndocs/jsonrpc.schema.json."
)]
pub struct Args {
    /// The socket to listen on [default: $XDG_RUNTIME_DIR/tern/ID.sock, or
    /// daemon.sock in the (first) profile]; its directory must be private
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Keep each received message pending (and send it again to every
    /// client that subscribes) until a client acknowledges it with `ack`
    #[arg(long)]
    pub manual_ack: bool,
    #[command(flatten)]
    pub files: files::FileArgs,
    /// Serve every profile in this directory (each subdirectory holding
    /// one, as `tern init --home DIR/NAME` makes it), beside any --home;
    /// profiles added later are served after a restart
    #[arg(long, value_name = "DIR")]
    pub homes_dir: Option<PathBuf>,
}

/// The homes to serve: each --home, then each profile in `dir` (by name).
pub fn homes(cli: &Cli, dir: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    let Some(dir) = dir else {
        return unlock::homes(cli);
    };
    let mut homes = if cli.home.is_empty() {
        Vec::new()
    } else {
        unlock::homes(cli)?
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory of profiles {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    let seen: Vec<PathBuf> = homes.iter().filter_map(|h| h.canonicalize().ok()).collect();
    for p in found {
        if !Store::exists(&p) {
            note(&format!("{}: no profile here, skipped", p.display()));
            continue;
        }
        if !p.canonicalize().is_ok_and(|c| seen.contains(&c)) {
            homes.push(p);
        }
    }
    if homes.is_empty() {
        return Err(crate::cli::exit::fail(
            crate::cli::exit::NO_PROFILE,
            format!(
                "no profile in {} (make one with `tern init --home {}/NAME`)",
                dir.display(),
                dir.display()
            ),
        ));
    }
    Ok(homes)
}

/// Why a profile is not served.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

/// An open profile.
pub struct Ready {
    /// For the methods (the engine thread has a handle of its own).
    client: Mutex<Client>,
    hub: Arc<Hub>,
    files: files::FilesConfig,
}

/// One profile the daemon was asked to serve.
pub struct Served {
    /// How methods name it: its home, as given.
    pub label: String,
    pub home: PathBuf,
    /// Its name, when open.
    pub name: String,
    state: Result<Ready, Failure>,
}

pub struct Daemon {
    profiles: Vec<Served>,
    manual_ack: bool,
    next_conn: AtomicU64,
    connections: AtomicUsize,
}

/// One profile, open under its lock.
struct Opened {
    lock: lock::Lock,
    /// For the engine thread, and for the methods.
    engine: Client,
    commands: Client,
    /// For the files thread.
    downloads: Client,
    name: String,
    /// What earlier runs stored and did not deliver.
    inbox: Vec<Event>,
}

fn open_one(cli: &Cli, home: &Path, socket: &str) -> anyhow::Result<Opened> {
    if !Store::exists(home) {
        return Err(StoreError::NoProfile(home.to_path_buf()).into());
    }
    let lock = lock::lock_home(home, socket)?;
    let engine = unlock::open_at(cli, home)?;
    let commands = engine.another_handle()?;
    let downloads = engine.another_handle()?;
    let name = engine.settings()?.profile.name;
    let inbox = engine.inbox()?;
    Ok(Opened {
        lock,
        engine,
        commands,
        downloads,
        name,
        inbox,
    })
}

impl Daemon {
    /// Opens every profile and starts receiving for those that opened.
    /// `Err` only if none did. The locks must live as long as the daemon.
    pub fn start(
        cli: &Cli,
        homes: Vec<PathBuf>,
        manual_ack: bool,
        socket: &str,
        file_args: &files::FileArgs,
    ) -> anyhow::Result<(Arc<Daemon>, Vec<lock::Lock>)> {
        let mut locks = Vec::new();
        let mut profiles = Vec::new();
        let mut engines = Vec::new();
        let mut first_error = None;
        for home in homes {
            let label = home.display().to_string();
            match open_one(cli, &home, socket) {
                Ok(o) => {
                    let name = o.name;
                    let hub = Arc::new(Hub::new(manual_ack));
                    // Pending before the first client can ask.
                    for e in o.inbox {
                        on_event(&label, &name, &hub, e);
                    }
                    let files = file_args.config(&home);
                    engines.push((
                        label.clone(),
                        o.engine,
                        o.downloads,
                        hub.clone(),
                        files.clone(),
                    ));
                    locks.push(o.lock);
                    note(&format!("serving {label} ({name})"));
                    profiles.push(Served {
                        label,
                        home,
                        name,
                        state: Ok(Ready {
                            client: Mutex::new(o.commands),
                            hub,
                            files,
                        }),
                    });
                }
                Err(e) => {
                    let message = rpc::chain(&e);
                    note(&format!("not serving {label}: {message}"));
                    profiles.push(Served {
                        label,
                        home,
                        name: String::new(),
                        state: Err(Failure {
                            code: code_for(&e),
                            message,
                        }),
                    });
                    first_error.get_or_insert(e);
                }
            }
        }
        if engines.is_empty() {
            return Err(first_error
                .unwrap_or_else(|| anyhow::anyhow!("no profile to serve"))
                .context("no profile could be opened, so there is nothing to serve"));
        }
        for (label, client, downloads, hub, files) in engines {
            let (l, h) = (label.clone(), hub.clone());
            std::thread::Builder::new()
                .name(format!("engine {label}"))
                .spawn(move || engine(l, client, h))?;
            std::thread::Builder::new()
                .name(format!("files {label}"))
                .spawn(move || files::files_thread(label, downloads, hub, files))?;
        }
        Ok((
            Arc::new(Daemon {
                profiles,
                manual_ack,
                next_conn: AtomicU64::new(1),
                connections: AtomicUsize::new(0),
            }),
            locks,
        ))
    }

    /// The one connection of `tern jsonrpc`.
    pub fn stdio_conn(&self, out: Box<dyn std::io::Write + Send>) -> Arc<Conn> {
        self.new_conn(out, None)
    }

    fn new_conn(
        &self,
        out: Box<dyn std::io::Write + Send>,
        socket: Option<UnixStream>,
    ) -> Arc<Conn> {
        Conn::new(self.next_conn.fetch_add(1, Ordering::SeqCst), out, socket)
    }

    /// Answers one request object (`None`: it was a notification).
    fn handle(&self, v: Value, conn: &Arc<Conn>) -> Option<Value> {
        let req = match parse_request(v) {
            Ok(r) => r,
            Err(resp) => return Some(resp),
        };
        let result = self.call(&req.method, &req.params, conn);
        req.id.map(|id| response(&id, result))
    }

    /// Serves one client until it hangs up (or cannot be written to).
    pub fn serve(&self, input: impl std::io::Read, conn: Arc<Conn>) {
        let mut reader = BufReader::new(input);
        loop {
            let text = match read_line(&mut reader, rpc::MAX_LINE) {
                Ok(Line::Text(t)) => t,
                Ok(Line::TooLong) => {
                    let e = RpcError::new(
                        rpc::INVALID_REQUEST,
                        format!(
                            "the line is longer than {} bytes; it was skipped",
                            rpc::MAX_LINE
                        ),
                    );
                    conn.send_line(&json_text(&response(&Value::Null, Err(e))));
                    continue;
                }
                Ok(Line::Eof) | Err(_) => break,
            };
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = match serde_json::from_slice::<Value>(&text) {
                Err(e) => Some(response(
                    &Value::Null,
                    Err(RpcError::new(rpc::PARSE_ERROR, format!("not JSON: {e}"))),
                )),
                Ok(Value::Array(batch)) if batch.is_empty() => Some(response(
                    &Value::Null,
                    Err(RpcError::new(rpc::INVALID_REQUEST, "an empty batch")),
                )),
                Ok(Value::Array(batch)) => {
                    let out: Vec<Value> = batch
                        .into_iter()
                        .filter_map(|v| self.handle(v, &conn))
                        .collect();
                    (!out.is_empty()).then_some(Value::Array(out))
                }
                Ok(v) => self.handle(v, &conn),
            };
            if let Some(r) = reply {
                conn.send_line(&json_text(&r));
            }
            if !conn.is_alive() {
                break;
            }
        }
        conn.close();
        for s in &self.profiles {
            if let Ok(r) = &s.state {
                r.hub.unsubscribe(conn.id);
            }
        }
    }

    /// Accepts clients on the socket, a thread each, for ever.
    fn listen(self: &Arc<Daemon>, socket: &lock::Socket) {
        for stream in socket.listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let (Ok(reader), Ok(closer)) = (stream.try_clone(), stream.try_clone()) else {
                continue;
            };
            let conn = self.new_conn(Box::new(BufWriter::new(stream)), Some(closer));
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                let e = RpcError::new(
                    rpc::BUSY,
                    format!("{MAX_CLIENTS} clients are connected already; try again later"),
                );
                conn.send_line(&json_text(&response(&Value::Null, Err(e))));
                conn.close();
                continue;
            }
            let daemon = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("client {}", conn.id))
                .spawn(move || {
                    daemon.serve(reader, conn);
                    daemon.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// A profile's receiving loop: `fetch` as `recv --follow` runs it, started
/// again (with a growing pause) whenever it stops.
fn engine(label: String, mut client: Client, hub: Arc<Hub>) {
    let mut pause = FIRST_RESTART;
    loop {
        let me = client
            .settings()
            .map(|s| s.profile.name)
            .unwrap_or_default();
        let started = Instant::now();
        let opts = FetchOptions {
            follow: true,
            ..FetchOptions::default()
        };
        let result = client.fetch(&opts, &mut |e| on_event(&label, &me, &hub, e));
        let (message, permanent) = match result {
            Ok(_) => ("receiving stopped; starting again".to_string(), false),
            Err(e) => {
                let permanent = matches!(e, ClientError::DeviceRemoved { .. });
                (rpc::chain(&anyhow::Error::from(e)), permanent)
            }
        };
        note(&format!("{label}: {message}"));
        hub.notify(&notification(
            "error",
            json!({"profile": label, "kind": "receiving", "message": message, "retryable": !permanent}),
        ));
        if permanent {
            return;
        }
        if started.elapsed() > MAX_RESTART {
            pause = FIRST_RESTART;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_RESTART);
    }
}

/// What the engine tells the daemon, as notifications; for a message,
/// whether it may leave the inbox ([`Hub::message`]).
fn on_event(label: &str, me: &str, hub: &Hub, e: Event) -> Shown {
    let (method, params) = match e {
        Event::Message {
            contact,
            mut entry,
            chain,
            delivery,
        } => {
            entry.received_at_ms.get_or_insert_with(now);
            let mut v = recv::message_json(&contact, me, &entry, Some(recv::chain_word(chain)));
            v["profile"] = json!(label);
            let id = v["id"].as_str().unwrap_or_default().to_string();
            return hub.message(delivery, id, notification("message", v));
        }
        Event::Connected { contact } => ("connected", json!({"contact": contact})),
        Event::Delivered {
            contact,
            id,
            device,
            ..
        } => {
            let id = HEXLOWER.encode(&id);
            hub.receipt(id.clone(), device.clone());
            (
                "delivered",
                json!({"contact": contact, "id": id, "device": device}),
            )
        }
        Event::ProfileUpdated { contact } => ("contact_updated", json!({"contact": contact})),
        Event::Warning(w) => ("error", json!({"kind": "warning", "message": w})),
        Event::Refused {
            contact,
            what,
            reason,
        } => (
            "error",
            json!({
                "kind": "refused",
                "contact": contact,
                "message": format!("dropped a {what} from {contact} that breaks the protocol's rules: {reason}"),
            }),
        ),
        Event::Unsupported { contact, kind } => (
            "error",
            json!({
                "kind": "unsupported",
                "contact": contact,
                "message": format!("{contact} sent a message of a kind ({kind}) this tern does not know: upgrade tern"),
            }),
        ),
        Event::Notice(n) => ("notice", json!({"message": n})),
        Event::Pending(_) => return Shown::Yes,
    };
    let mut params = params;
    params["profile"] = json!(label);
    hub.notify(&notification(method, params));
    Shown::Yes
}

/// Removes the socket on SIGTERM, SIGINT or SIGHUP, then exits: the
/// locks go with the process.
fn on_signals(socket: PathBuf) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = std::fs::remove_file(&socket);
                note("stopped");
                std::process::exit(0);
            }
        })?;
    Ok(())
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let homes = homes(cli, args.homes_dir.as_deref())?;
    let path = args
        .socket
        .clone()
        .unwrap_or_else(|| lock::default_socket(&homes));
    // The homes' locks first: a second daemon is told which one runs.
    let (daemon, _locks) = Daemon::start(
        cli,
        homes,
        args.manual_ack,
        &path.display().to_string(),
        &args.files,
    )?;
    let socket = lock::bind(&path)?;
    on_signals(socket.path.clone())?;
    // Scripts wait for this line before they connect (a closed stdout is
    // no reason to stop serving).
    let _ = super::output::try_line(&super::output::text(&path.display().to_string()));
    note(&format!("listening on {}", path.display()));
    daemon.listen(&socket);
    Ok(())
}
