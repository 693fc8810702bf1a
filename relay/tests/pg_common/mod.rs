//! A real PostgreSQL server for the tests: `initdb` and `postgres` from the
//! system packages (`/usr/lib/postgresql/*/bin`), in a temporary directory,
//! listening only on a Unix socket in that directory, stopped on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (CI
//! does) the server runs as the `postgres` user (or `nobody`) through
//! `setpriv`, in a directory handed to that user. Where the binaries are
//! missing, [`PgServer::start`] prints a note and returns `None`, and the
//! test skips; `.ci/run` installs them.
//!
//! `fsync=off`: the tests kill the server's processes, never the machine,
//! and a commit is in the kernel's page cache before PostgreSQL answers it.
#![allow(dead_code, unused_macros)]

/// Runs each named case, a `fn(&Db)`, on both stores: on SQLite as a test of
/// its own (`on_sqlite::NAME`), and on PostgreSQL all in one test
/// (`on_postgres::all`), on one server started for them with a fresh database
/// each. Skipped with a note where PostgreSQL is not installed.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::common::Db::Sqlite)
                }
            )*
        }
        mod on_postgres {
            #[test]
            fn all() {
                let Some(pg) = super::pg_common::PgServer::start() else {
                    return;
                };
                $(
                    eprintln!("on PostgreSQL: {}", stringify!($case));
                    super::$case(&super::common::Db::Postgres(pg.database()));
                )*
            }
        }
    };
}

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// uid and gid to run as, when this process is root.
    user: Option<(u32, u32)>,
    child: Option<Child>,
    /// The port, which names the Unix socket and, with TLS, the loopback
    /// TCP port (PostgreSQL speaks TLS over TCP only).
    port: u16,
    tls: bool,
}

/// The newest installed server's bin directory.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Who the server runs as: `None` to run as ourselves (not root).
fn server_user() -> Option<(u32, u32)> {
    if id(&["-u"]) != Some(0) {
        return None;
    }
    ["postgres", "nobody"]
        .iter()
        .find_map(|u| Some((id(&["-u", u])?, id(&["-g", u])?)))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

impl PgServer {
    /// Initialises and starts a server, or `None` (with a note) where
    /// PostgreSQL is not installed.
    pub fn start() -> Option<PgServer> {
        Self::start_with(false)
    }

    /// A server that also listens on 127.0.0.1 with TLS (a self-signed
    /// certificate made with openssl), or `None` with a note where
    /// PostgreSQL or openssl is missing.
    pub fn start_tls() -> Option<PgServer> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("note: no openssl to make the server's certificate; skipping");
            return None;
        }
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "note: no PostgreSQL server under /usr/lib/postgresql/*/bin \
                 (apt-get install postgresql); skipping"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tern-pg-")
            .tempdir()
            .unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            chown_tree(dir.path(), uid, gid);
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let port = if tls {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        } else {
            5432
        };
        let mut server = PgServer {
            dir,
            bin,
            user,
            child: None,
            port,
            tls,
        };
        let data = server.data_dir();
        let out = server
            .command("initdb")
            .args(["-D", data.to_str().unwrap()])
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            // A CA of the test's own and a server certificate it signed, for
            // `localhost` only: so that verify-ca passes when connecting to
            // 127.0.0.1 and verify-full does not. P-256 keys: quick to make.
            let dir = server.dir.path();
            make_ca(&dir.join("ca"));
            make_ca(&dir.join("other-ca"));
            let key = data.join("server.key");
            let csr = dir.join("server.csr");
            openssl(
                &["req", "-new", "-nodes", "-subj", "/CN=localhost"],
                &[
                    ("-newkey", "ec"),
                    ("-pkeyopt", "ec_paramgen_curve:prime256v1"),
                    ("-keyout", key.to_str().unwrap()),
                    ("-out", csr.to_str().unwrap()),
                ],
            );
            let ext = dir.join("server.ext");
            std::fs::write(
                &ext,
                "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
            )
            .unwrap();
            let ca = dir.join("ca");
            openssl(
                &["x509", "-req", "-days", "2", "-CAcreateserial"],
                &[
                    ("-in", csr.to_str().unwrap()),
                    ("-CA", ca.with_extension("crt").to_str().unwrap()),
                    ("-CAkey", ca.with_extension("key").to_str().unwrap()),
                    ("-extfile", ext.to_str().unwrap()),
                    ("-out", data.join("server.crt").to_str().unwrap()),
                ],
            );
            for f in ["server.key", "server.crt"] {
                let p = data.join(f);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
                }
            }
        }
        server.run();
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server program, run as the server's user.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match self.user {
            None => Command::new(exe),
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(exe);
                c
            }
        }
    }

    /// Starts the server on the existing data directory and waits until it
    /// takes connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let data = self.data_dir();
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.path().join("server.log"), Some(uid), Some(gid))
                .unwrap();
        }
        // setpriv execs the server: the child is the postmaster itself.
        let mut command = self.command("postgres");
        command
            .args(["-D", data.to_str().unwrap()])
            .args(["-k", self.socket_dir().to_str().unwrap()])
            .args(["-p", &self.port.to_string()]);
        if self.tls {
            command.args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"]);
        } else {
            command.args(["-c", "listen_addresses="]);
        }
        let child = command
            .args(["-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "PostgreSQL did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server: `fast` (SIGINT, a clean shutdown) or not (SIGQUIT,
    /// an immediate shutdown: every backend dies, recovery runs at the next
    /// start, as after a crash).
    pub fn stop(&mut self, fast: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let signal = if fast { "-INT" } else { "-QUIT" };
        let _ = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    }

    /// An immediate stop and a start, on the same socket.
    pub fn restart(&mut self) {
        self.stop(false);
        self.run();
    }

    /// A connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db} connect_timeout=5",
            self.socket_dir().display(),
            self.port
        )
    }

    /// A connection string for database `db` over TCP that insists on TLS
    /// (servers from [`PgServer::start_tls`]).
    pub fn tls_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=require",
            self.port
        )
    }

    /// The certificate of the CA that signed the server's (servers from
    /// [`PgServer::start_tls`]), and of one that did not.
    pub fn ca_file(&self, signed_it: bool) -> PathBuf {
        let name = if signed_it { "ca.crt" } else { "other-ca.crt" };
        self.dir.path().join(name)
    }

    /// A URL for database `db` over TCP to 127.0.0.1 with `sslmode` and
    /// `sslrootcert` as given.
    pub fn verify_url(&self, db: &str, mode: &str, root: &Path) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode={mode}&sslrootcert={}",
            self.port,
            root.display()
        )
    }

    /// Creates a fresh database and returns its connection string.
    pub fn database(&self) -> String {
        let name = self.database_name();
        self.url(&name)
    }

    /// Creates a fresh database and returns its name.
    pub fn database_name(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("relay{}", N.fetch_add(1, Ordering::SeqCst));
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        name
    }

    /// A plain client, for looking at what the relay wrote.
    pub fn client(&self, url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop(false);
    }
}

/// Runs openssl with flags and flag-value pairs; panics if it fails.
fn openssl(flags: &[&str], pairs: &[(&str, &str)]) {
    let mut c = Command::new("openssl");
    c.args(flags);
    for (k, v) in pairs {
        c.args([k, v]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "openssl {flags:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: `PATH.key` and `PATH.crt`.
fn make_ca(path: &Path) {
    openssl(
        &["req", "-x509", "-new", "-nodes", "-days", "2"],
        &[
            ("-subj", "/CN=tern test CA"),
            ("-newkey", "ec"),
            ("-pkeyopt", "ec_paramgen_curve:prime256v1"),
            ("-keyout", path.with_extension("key").to_str().unwrap()),
            ("-out", path.with_extension("crt").to_str().unwrap()),
        ],
    );
}
