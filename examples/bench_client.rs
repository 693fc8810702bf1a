//! Client benchmarks, run by `scripts/bench` (see BENCHMARKS.md).
//!
//! ```text
//! bench_client --tern PATH [--quick]
//! ```
//!
//! Times one-shot `tern` processes (a new process each, release build) against
//! a relay on 127.0.0.1 started as its own process. Profiles are made with the
//! real commands (`tern init`, `invite`, `accept`, `recv`); big histories and
//! the contacts beyond the real handshakes are written through the library
//! (see `fill_history` and `copy_contacts`), because building them through
//! the protocol would take hours. Every loop is bounded.
//!
//! Results go to stdout as Markdown; progress goes to stderr.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tern::client::model::{history_log, Contact, Direction, HistoryEntry};
use tern::client::{new_contact_id, Client};
use tern::proto::connection::ConnState;
use tern::proto::envelope::Kind;
use tern::store::KeySource;

fn progress(msg: &str) {
    eprintln!("bench_client: {msg}");
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v.to_vec());
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// "median (p10–p90)".
fn spread(v: &[f64]) -> String {
    let s = sorted(v.to_vec());
    if s.is_empty() {
        return "n/a".into();
    }
    let digits = if median(&s) >= 100.0 { 0 } else { 1 };
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        median(&s),
        percentile(&s, 10.0),
        percentile(&s, 90.0)
    )
}

/// "median (min–max)", for few runs.
fn spread_min_max(v: &[f64]) -> String {
    let s = sorted(v.to_vec());
    if s.is_empty() {
        return "n/a".into();
    }
    format!("{:.0} ({:.0}–{:.0})", median(&s), s[0], s[s.len() - 1])
}

/// 16 KiB write + fdatasync latency in `dir` (p50, p99 in ms): every
/// figure below waits for several of these.
fn fsync_probe(dir: &Path) -> Result<(f64, f64)> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = vec![0x5au8; 16 * 1024];
    let mut out = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let out = sorted(out);
    Ok((percentile(&out, 50.0), percentile(&out, 99.0)))
}

/// The relay, as its own process.
struct Relay {
    child: Child,
    address: String,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Relay {
    fn start(tern: &Path, base: &Path) -> Result<Relay> {
        let log = File::create(base.join("relay.log"))?;
        let mut child = Command::new(tern)
            .args(["relay", "serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(base.join("relay"))
            // Room for every message the benchmarks leave queued.
            .args(["--max-pending", "100000"])
            // One address (127.0.0.1) makes every queue of 1,000 contacts,
            // which the relay's defaults would (rightly) slow down.
            .args(["--max-connections-per-address", "100000"])
            .args(["--create-rate-per-connection", "1000000/1000000"])
            .args(["--create-rate-per-address", "1000000/1000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting the relay")?;
        let mut out = BufReader::new(child.stdout.take().context("relay stdout")?);
        let mut address = String::new();
        out.read_line(&mut address)?;
        let address = address.trim().to_string();
        if !address.starts_with("tern://") {
            bail!("the relay printed {address:?}");
        }
        Ok(Relay {
            child,
            address,
            _stdout: out,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A profile and how to unlock it without a prompt.
#[derive(Clone)]
struct Profile {
    home: PathBuf,
    /// An exported identity (`tern key export`), or none for a
    /// `--no-passphrase` profile.
    identity: Option<PathBuf>,
}

struct Bench {
    tern: PathBuf,
    base: PathBuf,
    relay: String,
    passphrase_file: PathBuf,
    /// Profiles made with `tern init --isolate`: a session per queue.
    isolate: bool,
}

impl Bench {
    fn command(&self, p: &Profile, args: &[&str]) -> Command {
        let mut c = Command::new(&self.tern);
        for v in [
            "TERN_HOME",
            "TERN_PASSPHRASE",
            "TERN_PASSPHRASE_FILE",
            "TERN_IDENTITY",
        ] {
            c.env_remove(v);
        }
        c.arg("--home").arg(&p.home);
        if let Some(id) = &p.identity {
            c.arg("--identity").arg(id);
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Runs a command to completion; fails unless it exits with 0.
    fn run(&self, p: &Profile, args: &[&str]) -> Result<Output> {
        run_checked(self.command(p, args))
    }

    /// How a command is shown in the report, with paths shortened.
    fn shown(&self, p: &Profile, args: &[&str]) -> String {
        let mut s = format!("tern --home {}", short(&self.base, &p.home));
        if let Some(id) = &p.identity {
            s.push_str(&format!(" --identity {}", short(&self.base, id)));
        }
        for a in args {
            if a.contains(' ') {
                s.push_str(&format!(" '{a}'"));
            } else {
                s.push_str(&format!(" {a}"));
            }
        }
        s
    }

    /// `tern init` with a passphrase (scrypt at the default work factor)
    /// and an exported identity, or without a passphrase.
    fn profile(&self, name: &str, passphrase: bool) -> Result<Profile> {
        let home = self.base.join(name);
        let mut p = Profile {
            home: home.clone(),
            identity: None,
        };
        let mut init = self.command(&p, &["init", "--name", name, "--relay", &self.relay]);
        if self.isolate {
            init.arg("--isolate");
        }
        if passphrase {
            init.env("TERN_PASSPHRASE_FILE", &self.passphrase_file);
        } else {
            init.arg("--no-passphrase");
        }
        run_checked(init)?;
        if passphrase {
            let id = self.base.join(format!("{name}.identity"));
            let mut export = self.command(&p, &["key", "export", "--out"]);
            export
                .arg(&id)
                .env("TERN_PASSPHRASE_FILE", &self.passphrase_file);
            run_checked(export)?;
            p.identity = Some(id);
        }
        Ok(p)
    }

    /// A real handshake: `inviter` invites, each peer accepts, then both
    /// sides run `tern recv` until connected.
    fn handshake(
        &self,
        inviter: &Profile,
        peers: &[(&Profile, &str)],
        inviter_name: &str,
    ) -> Result<()> {
        for (peer, name) in peers {
            let out = self.run(inviter, &["invite", "--name", name, "--link"])?;
            let link = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("TERN:"))
                .context("invite printed no link")?
                .to_string();
            self.run(peer, &["accept", &link, "--name", inviter_name])?;
        }
        self.run(inviter, &["recv"])?;
        for (peer, _) in peers {
            self.run(peer, &["recv"])?;
        }
        self.run(inviter, &["recv"])?;
        Ok(())
    }
}

fn short(base: &Path, p: &Path) -> String {
    match p.strip_prefix(base) {
        Ok(rel) => format!("$TMP/{}", rel.display()),
        Err(_) => p.display().to_string(),
    }
}

fn run_checked(mut c: Command) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn key_source(p: &Profile) -> KeySource {
    match &p.identity {
        Some(id) => KeySource::IdentityFile(id.clone()),
        None => KeySource::Unprotected,
    }
}

fn open(p: &Profile) -> Result<Client> {
    Client::open(&p.home, key_source(p), None)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", p.home.display()))
}

/// Number of connected contacts.
fn connected(p: &Profile) -> Result<usize> {
    let client = open(p)?;
    let contacts = client.contacts().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(contacts
        .iter()
        .filter(|c| c.conn.state == ConnState::Connected)
        .count())
}

/// Empties the history with `contact` (`Tx::remove_log`).
fn clear_history(p: &Profile, contact: &str) -> Result<()> {
    let mut client = open(p)?;
    let id = client
        .contact_id(contact)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    client
        .store
        .transaction(|tx| tx.remove_log(&history_log(&id)))?;
    Ok(())
}

/// JSON size of the record of `contact`: what `tern send` and `tern recv`
/// read, re-serialize, seal and write back for every message.
fn record_size(p: &Profile, contact: &str) -> Result<usize> {
    let client = open(p)?;
    let id = client
        .contact_id(contact)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let c = client.contact(&id).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(serde_json::to_vec(&c)?.len())
}

/// Appends entries to the history with `contact` until it holds `target`
/// messages (alternating in and out, ~90 bytes of text each), in
/// transactions of 5,000 through `Store::transaction` + `Tx::append`,
/// exactly the calls `tern send` and `tern recv` make for each message.
fn fill_history(p: &Profile, contact: &str, target: u64) -> Result<u64> {
    let mut client = open(p)?;
    let id = client
        .contact_id(contact)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let log = history_log(&id);
    let last = client
        .store
        .read(|tx| tx.tail::<HistoryEntry>(&log, 1))?
        .last()
        .map_or(0, |(seq, _)| *seq);
    let mut n = last;
    let t0 = tern::client::now() - 400 * 24 * 3600 * 1000;
    while n < target {
        let batch = (target - n).min(5_000);
        client.store.transaction(|tx| {
            for i in n..n + batch {
                let entry = HistoryEntry {
                    dir: if i % 2 == 0 {
                        Direction::Out
                    } else {
                        Direction::In
                    },
                    id: tern::client::random_id(),
                    text: format!(
                        "history message {i}: the quick brown fox jumps over the lazy dog, twice over"
                    ),
                    sent_at_ms: t0 + i * 60_000,
                    received_at_ms: (i % 2 == 1).then_some(t0 + i * 60_000 + 500),
                    device: None,
                };
                tx.append(&log, &entry)?;
            }
            Ok(())
        })?;
        n += batch;
    }
    Ok(n)
}

/// Adds contacts until `p` has `target`: each is a copy of the connected
/// contact `template` with a new id and name and its own fresh receiving
/// queue (a real CREATE on the relay, through `Client::create_queues`),
/// saved with `Client::add_contact`. `tern recv` therefore polls one real,
/// distinct queue per copy. The copies' sending side still points at the
/// template's peer, and nothing is ever sent to them.
fn copy_contacts(p: &Profile, template: &str, target: usize) -> Result<usize> {
    let mut client = open(p)?;
    let tid = client
        .contact_id(template)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let template = client.contact(&tid).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut have = client.index().map_err(|e| anyhow::anyhow!("{e}"))?.len();
    let mut i = 0;
    while have < target {
        let queues = client.create_queues().map_err(|e| anyhow::anyhow!("{e}"))?;
        // Edited as JSON, so that fields added to `Contact` later keep
        // their defaults here instead of breaking this benchmark.
        let mut v = serde_json::to_value(&template)?;
        let o = v.as_object_mut().context("a contact is a JSON object")?;
        o.insert("id".into(), new_contact_id().into());
        o.insert("name".into(), format!("copy-{i:04}").into());
        o.insert("provisional_name".into(), false.into());
        for k in ["jobs", "outbox", "rekeys"] {
            if o.contains_key(k) {
                o.insert(k.into(), serde_json::json!([]));
            }
        }
        for k in ["old", "rekey"] {
            o.remove(k);
        }
        let conn = o
            .get_mut("conn")
            .and_then(|c| c.as_object_mut())
            .context("a contact has a connection")?;
        conn.insert("recv_queues".into(), serde_json::to_value(&queues)?);
        if conn.contains_key("retired_queues") {
            conn.insert("retired_queues".into(), serde_json::json!([]));
        }
        conn.remove("rotation");
        let c: Contact = serde_json::from_value(v)?;
        client.add_contact(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
        have += 1;
        i += 1;
    }
    Ok(have)
}

/// Sends `n` messages from `p` to `contact` in this process (untimed setup).
fn queue_messages(p: &Profile, contact: &str, n: usize) -> Result<()> {
    let mut client = open(p)?;
    let id = client
        .contact_id(contact)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for i in 0..n {
        let out = client
            .send(&id, Kind::Text, format!("queued message {i}").into_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !out.delivered {
            bail!("queued message {i} did not reach the relay");
        }
    }
    Ok(())
}

/// Prints the JSON size of a contact record and of its largest parts.
fn inspect(p: &Profile, contact: &str) -> Result<()> {
    let client = open(p)?;
    let id = client
        .contact_id(contact)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let c = client.contact(&id).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = serde_json::to_value(&c)?;
    let size = |v: &serde_json::Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    println!("contact record: {} bytes of JSON", size(&v));
    let mut parts: Vec<(String, usize)> = Vec::new();
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            parts.push((k.clone(), size(x)));
            if let Some(inner) = x.as_object() {
                for (k2, y) in inner {
                    parts.push((format!("{k}.{k2}"), size(y)));
                    if let Some(inner2) = y.as_object() {
                        for (k3, z) in inner2 {
                            parts.push((format!("{k}.{k2}.{k3}"), size(z)));
                        }
                    }
                }
            }
        }
    }
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    for (k, n) in parts.iter().take(12) {
        println!("{n:>9}  {k}");
    }
    Ok(())
}

/// Times `runs` executions of `cmd` (plus one untimed warm-up unless
/// `warmup` is false). `prepare` runs before each, untimed; `check` looks at
/// each output. Returns wall times in ms.
fn time_runs(
    runs: usize,
    warmup: bool,
    mut cmd: impl FnMut() -> Command,
    mut prepare: impl FnMut() -> Result<()>,
    check: impl Fn(&Output) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + usize::from(warmup) {
        prepare()?;
        let mut c = cmd();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let t = Instant::now();
        let o = c.output()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !o.status.success() {
            bail!(
                "{c:?} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        check(&o)?;
        if !(warmup && i == 0) {
            out.push(ms);
        }
    }
    Ok(out)
}

fn lines_out(o: &Output) -> usize {
    String::from_utf8_lossy(&o.stdout).lines().count()
}

struct Row {
    profile: &'static str,
    history: u64,
    contacts: usize,
    how: String,
    send: Vec<f64>,
    recv: Vec<f64>,
    /// JSON bytes of the contact record that send and recv rewrite.
    record: usize,
}

/// Times `tern send` (to `to`) and `tern recv` with one message waiting
/// (sent by `from` to `me_name` just before, untimed) for each subject,
/// interleaved (subject 1, 2, 3, 1, 2, 3, …) so that a change in the
/// machine's load affects every subject alike. One untimed round first.
fn time_send_recv(
    b: &Bench,
    subjects: &[(&Profile, &str, &str)],
    from: &Profile,
    runs: usize,
) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let mut out = vec![(Vec::new(), Vec::new()); subjects.len()];
    for round in 0..=runs {
        for (i, (me, to, me_name)) in subjects.iter().enumerate() {
            let send = time_runs(
                1,
                false,
                || b.command(me, &["send", to, "bench message"]),
                || Ok(()),
                |_| Ok(()),
            )?;
            let recv = time_runs(
                1,
                false,
                || b.command(me, &["recv"]),
                || b.run(from, &["send", me_name, "ping"]).map(|_| ()),
                |o| {
                    if lines_out(o) == 1 {
                        Ok(())
                    } else {
                        bail!("recv printed {} lines, expected 1 message", lines_out(o))
                    }
                },
            )?;
            if round > 0 {
                out[i].0.extend(send);
                out[i].1.extend(recv);
            }
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut tern = None;
    let mut quick = false;
    let mut isolate = false;
    // For profiling by hand: `bench_client queue-messages --home DIR
    // [--identity FILE] --to NAME --count N` sends N messages in-process.
    let mut queue_cmd = false;
    // `bench_client inspect --home DIR [--identity FILE] --to NAME`: the
    // size of each part of a contact record, as stored (JSON, before sealing).
    let mut inspect_cmd = false;
    // `bench_client fill-history --home DIR [--identity FILE] --to NAME
    // --count N`: the history with NAME grows to N entries.
    let mut fill_cmd = false;
    let (mut home, mut identity, mut to, mut count) = (None, None, None, 0usize);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--tern") => tern = it.next().map(PathBuf::from),
            Some("--quick") => quick = true,
            Some("--isolate") => isolate = true,
            Some("queue-messages") => queue_cmd = true,
            Some("inspect") => inspect_cmd = true,
            Some("fill-history") => fill_cmd = true,
            Some("--home") => home = it.next().map(PathBuf::from),
            Some("--identity") => identity = it.next().map(PathBuf::from),
            Some("--to") => to = it.next().and_then(|v| v.into_string().ok()),
            Some("--count") => {
                count = it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .and_then(|v| v.parse().ok())
                    .context("--count N")?
            }
            _ => bail!(
                "usage: bench_client --tern PATH [--quick] [--isolate]\n       \
                 bench_client queue-messages --home DIR [--identity FILE] --to NAME --count N\n       \
                 bench_client inspect --home DIR [--identity FILE] --to NAME\n       \
                 bench_client fill-history --home DIR [--identity FILE] --to NAME --count N"
            ),
        }
    }
    if fill_cmd {
        let p = Profile {
            home: home.context("--home DIR")?,
            identity,
        };
        let n = fill_history(&p, &to.context("--to NAME")?, count.min(1_000_000) as u64)?;
        println!("history now holds {n} entries");
        return Ok(());
    }
    if inspect_cmd {
        let p = Profile {
            home: home.context("--home DIR")?,
            identity,
        };
        return inspect(&p, &to.context("--to NAME")?);
    }
    if queue_cmd {
        let p = Profile {
            home: home.context("--home DIR")?,
            identity,
        };
        return queue_messages(&p, &to.context("--to NAME")?, count.min(100_000));
    }
    let tern = std::fs::canonicalize(tern.context("usage: bench_client --tern PATH [--quick]")?)?;
    let runs = if quick { 6 } else { 30 };
    let runs_1000 = if quick { 1 } else { 5 };
    let (real_peers, contact_levels): (usize, &[usize]) = if quick {
        (9, &[1, 10, 100])
    } else {
        (99, &[1, 100, 1_000])
    };
    let history_levels: &[u64] = &[0, 10_000, 100_000];
    // Enough received messages for a contact record to reach its steady
    // size (512 remembered envelope hashes).
    let warmup_msgs = 520;

    let tmp = tempfile::Builder::new()
        .prefix("tern-bench-client-")
        .tempdir()?;
    let base = tmp.path().to_path_buf();
    let (fsync_p50, fsync_p99) = fsync_probe(&base)?;
    let relay = Relay::start(&tern, &base)?;
    let passphrase_file = base.join("passphrase");
    std::fs::write(&passphrase_file, "correct horse battery staple\n")?;
    let b = Bench {
        tern,
        base: base.clone(),
        relay: relay.address.clone(),
        passphrase_file,
        isolate,
    };

    progress("profiles alice (passphrase) and bob, and a real handshake");
    let alice = b.profile("alice", true)?;
    let bob = b.profile("bob", false)?;
    b.handshake(&alice, &[(&bob, "bob")], "alice")?;
    if connected(&alice)? != 1 || connected(&bob)? != 1 {
        bail!("alice and bob did not connect");
    }

    let mut rows = Vec::new();
    let mut history_rows = Vec::new();

    // Unlocking: the same light command with the passphrase and with the
    // exported identity; the difference is the scrypt work.
    progress("unlock");
    let with_pass = time_runs(
        runs,
        true,
        || {
            let mut c = b.command(
                &Profile {
                    home: alice.home.clone(),
                    identity: None,
                },
                &["contacts"],
            );
            c.env("TERN_PASSPHRASE_FILE", &b.passphrase_file);
            c
        },
        || Ok(()),
        |_| Ok(()),
    )?;
    let with_id = time_runs(
        runs,
        true,
        || b.command(&alice, &["contacts"]),
        || Ok(()),
        |_| Ok(()),
    )?;

    // A long conversation's steady state: alice has received more than 512
    // messages from bob, so her record of bob remembers the most hashes it
    // ever will (`ChainReceiver`, 512 recent envelopes). Untimed.
    progress(&format!("warm-up: bob sends alice {warmup_msgs} messages"));
    queue_messages(&bob, "alice", warmup_msgs)?;
    b.run(&alice, &["recv"])?;

    // `tern recv` of 1,000 queued messages.
    progress("recv of 1,000 queued messages");
    let recv_1000 = time_runs(
        runs_1000,
        false,
        || b.command(&alice, &["recv"]),
        || queue_messages(&bob, "alice", 1_000),
        |o| {
            if lines_out(o) == 1_000 {
                Ok(())
            } else {
                bail!(
                    "recv printed {} lines, expected 1,000 messages",
                    lines_out(o)
                )
            }
        },
    )?;

    // History: alice's emptied (so the first row really has none); two more
    // profiles, each with its own real handshake and the same warm-up, get
    // 10,000 and 100,000 messages of history. All three are timed in turns.
    clear_history(&alice, "bob")?;
    let mut subjects = vec![(alice.clone(), "alice".to_string())];
    for &h in &history_levels[1..] {
        let name = format!("alice{}k", h / 1000);
        progress(&format!(
            "profile {name}: handshake, warm-up, {h} history messages"
        ));
        let p = b.profile(&name, true)?;
        b.handshake(&p, &[(&bob, "bob")], &name)?;
        queue_messages(&bob, &name, warmup_msgs)?;
        b.run(&p, &["recv"])?;
        clear_history(&p, "bob")?;
        fill_history(&p, "bob", h)?;
        subjects.push((p, name));
    }
    progress("timing send and recv with 0, 10,000 and 100,000 history messages");
    let refs: Vec<(&Profile, &str, &str)> = subjects
        .iter()
        .map(|(p, n)| (p, "bob", n.as_str()))
        .collect();
    let times = time_send_recv(&b, &refs, &bob, runs)?;
    for ((&h, (p, _)), (send, recv)) in history_levels.iter().zip(&subjects).zip(times) {
        history_rows.push((h, median(&send), median(&recv)));
        rows.push(Row {
            profile: if h == 0 { "alice" } else if h == 10_000 { "alice10k" } else { "alice100k" },
            history: h,
            contacts: 1,
            record: record_size(p, "bob")?,
            how: if h == 0 {
                format!(
                    "real handshake; {} messages received, then history emptied",
                    warmup_msgs + runs_1000 * 1_000
                )
            } else {
                format!(
                    "real handshake; {warmup_msgs} messages received; history filled to {h} through the library"
                )
            },
            send,
            recv,
        });
    }

    // Contacts: eve connects to bob and to real peers, then gets copies.
    progress("profile eve, connected to bob");
    let eve = b.profile("eve", true)?;
    b.handshake(&eve, &[(&bob, "bob")], "eve")?;
    for &c in contact_levels {
        let have = open(&eve)?
            .index()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len();
        let how = if c > have {
            let real_target = (real_peers + 1).min(c);
            if have < real_target {
                progress(&format!(
                    "real handshakes: eve with {} peers",
                    real_target - have
                ));
                let peers: Vec<(Profile, String)> = (have..real_target)
                    .map(|i| {
                        let name = format!("peer{i:03}");
                        b.profile(&name, false).map(|p| (p, name))
                    })
                    .collect::<Result<_>>()?;
                for chunk in peers.chunks(10) {
                    let refs: Vec<(&Profile, &str)> =
                        chunk.iter().map(|(p, n)| (p, n.as_str())).collect();
                    b.handshake(&eve, &refs, "eve")?;
                }
                let ok = connected(&eve)?;
                if ok < real_target {
                    bail!("only {ok} of eve's {real_target} real contacts connected");
                }
            }
            let now = open(&eve)?
                .index()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .len();
            if c > now {
                progress(&format!("copying contacts: eve to {c}"));
                copy_contacts(&eve, "peer001", c)?;
            }
            let real = connected(&eve)?.min(real_target);
            if c > real_target {
                format!(
                    "{real} real handshakes + {} copied records",
                    c - real_target
                )
            } else {
                format!("{real} real handshakes")
            }
        } else {
            "real handshake".to_string()
        };
        let record = record_size(&eve, "bob")?;
        let total = open(&eve)?
            .index()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len();
        progress(&format!("eve with {total} contacts"));
        let (send, recv) = time_send_recv(&b, &[(&eve, "bob", "eve")], &bob, runs)?
            .pop()
            .context("one subject")?;
        rows.push(Row {
            profile: "eve",
            history: 0,
            contacts: total,
            record,
            how,
            send,
            recv,
        });
    }

    // ------------------------------------------------------------ report
    if isolate {
        println!("### Client: one-shot commands, profiles made with `tern init --isolate`\n");
    } else {
        println!("### Client: one-shot commands\n");
    }
    println!(
        "Wall time of a new `tern` process (release build), unlocked with an exported identity \
         (`--identity`), one relay on 127.0.0.1. {runs} timed runs after one warm-up; median (p10–p90) ms. \
         `recv` has exactly one message waiting (sent just before, untimed). \
         Disk under the temporary directory before the runs: 16 KiB write + fdatasync \
         p50 {fsync_p50:.2} ms, p99 {fsync_p99:.2} ms.\n"
    );
    println!("| profile | history | contacts | how the profile was made | contact record KiB | `tern send` ms | `tern recv` ms |");
    println!("|---|---:|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {} |",
            r.profile,
            r.history,
            r.contacts,
            r.how,
            r.record as f64 / 1024.0,
            spread(&r.send),
            spread(&r.recv)
        );
    }
    println!();
    println!("| measurement | result ms | runs |");
    println!("|---|---:|---:|");
    println!(
        "| `tern recv` of 1,000 queued messages, median (min–max) | {} | {runs_1000} |",
        spread_min_max(&recv_1000)
    );
    println!(
        "| `tern contacts`, unlocked with the passphrase (scrypt log_n {}), median (p10–p90) | {} | {runs} |",
        tern::store::SCRYPT_LOG_N,
        spread(&with_pass)
    );
    println!(
        "| `tern contacts`, unlocked with the exported identity, median (p10–p90) | {} | {runs} |",
        spread(&with_id)
    );
    println!(
        "| → interactive unlock cost (difference of medians) | {:.0} | |",
        median(&with_pass) - median(&with_id)
    );
    println!();
    println!("Commands (`$TMP` is the benchmark's temporary directory):\n");
    println!("```sh");
    println!("{}", b.shown(&alice, &["send", "bob", "bench message"]));
    println!(
        "{}    # after: {}",
        b.shown(&alice, &["recv"]),
        b.shown(&bob, &["send", "alice", "ping"])
    );
    println!("TERN_PASSPHRASE_FILE=$TMP/passphrase tern --home $TMP/alice contacts");
    println!("{}", b.shown(&alice, &["contacts"]));
    println!("```\n");

    // Targets.
    let base_row = &rows[0];
    let send_ms = median(&base_row.send);
    let verdict = |ok: bool, aim: bool| match (ok, aim) {
        (true, true) => "met (aim met)",
        (true, false) => "met",
        _ => "**not met**",
    };
    let (h0s, h0r) = (history_rows[0].1, history_rows[0].2);
    let last = history_rows[history_rows.len() - 1];
    let (rs, rr) = (last.1 / h0s, last.2 / h0r);
    let r1000 = median(&recv_1000);
    println!("| client target | measured | verdict |");
    println!("|---|---:|---|");
    println!(
        "| one-shot `tern send` median ≤ 25 ms (aim ≤ 10): long conversation (alice, no history) | {send_ms:.1} ms | {} |",
        verdict(send_ms <= 25.0, send_ms <= 10.0)
    );
    if let Some(fresh) = rows.iter().find(|r| r.profile == "eve" && r.contacts == 1) {
        let ms = median(&fresh.send);
        println!(
            "| one-shot `tern send` median ≤ 25 ms (aim ≤ 10): new contact (eve, 1 contact) | {ms:.1} ms | {} |",
            verdict(ms <= 25.0, ms <= 10.0)
        );
    }
    println!(
        "| `tern recv` of 1,000 messages ≤ 1 s | {:.2} s | {} |",
        r1000 / 1000.0,
        verdict(r1000 <= 1000.0, r1000 <= 1000.0)
    );
    println!(
        "| {} history messages within 1.5× of empty (aim 1.1×): send | {rs:.2}× | {} |",
        last.0,
        verdict(rs <= 1.5, rs <= 1.1)
    );
    println!(
        "| {} history messages within 1.5× of empty (aim 1.1×): recv | {rr:.2}× | {} |",
        last.0,
        verdict(rr <= 1.5, rr <= 1.1)
    );
    println!();
    drop(relay);
    Ok(())
}
