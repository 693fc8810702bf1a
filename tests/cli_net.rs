//! Relays reached the ways hosting and privacy need: through a SOCKS5 proxy
//! (as Tor offers), and behind an HTTPS reverse proxy that forwards
//! WebSockets (as PaaS routers do). Real packaged servers on loopback:
//! microsocks and nginx, started by the tests (a note says so when one is
//! not installed; `.ci/run` installs both).

mod cli_common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::*;

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn microsocks(port: u16) -> Daemon {
    let child = Command::new("microsocks")
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("microsocks starts");
    wait_for_port(port);
    Daemon(child)
}

#[test]
fn relays_through_a_socks5_proxy_with_names_resolved_by_the_proxy() {
    if !have("microsocks") {
        eprintln!("note: microsocks is not installed; skipping the SOCKS5 test");
        return;
    }
    let r = Relay::start();
    let port = free_port();
    let proxy = microsocks(port);
    // A host name, so that socks5h hands it to the proxy to resolve.
    let addr = r.addr.replace("127.0.0.1", "localhost");
    let via = format!("socks5h://127.0.0.1:{port}");
    let env = [("TERN_PROXY", via.as_str())];
    let a = Profile::with_env("Ada", &[&addr], &env, &[]);
    // Bob isolates: every queue its own connection, with SOCKS credentials
    // of its own (which Tor puts on circuits of their own).
    let b = Profile::with_env("Bob", &[&addr], &env, &["--isolate"]);
    connect(&a, "bob", &b, "ada");
    a.send("bob", "through the proxy");
    assert_eq!(b.recv_texts(), vec!["through the proxy"]);
    b.send("ada", "and back");
    assert_eq!(a.recv_texts(), vec!["and back"]);

    // With the proxy gone the relays cannot be reached, though the relay
    // itself is up: the traffic really went through the proxy.
    drop(proxy);
    let o = a.run(&["send", "bob", "while the proxy is down"]);
    assert_code(&o, 75, "send with the proxy down");
    assert!(stderr(&o).contains("kept"), "{}", show(&o));
    let _proxy = microsocks(port);
    a.ok(&["recv"]);
    assert_eq!(b.recv_texts(), vec!["while the proxy is down"]);

    // A proxy URL that is not one is a usage error, changing nothing.
    let o = a.run(&["--proxy", "http://127.0.0.1:1", "recv"]);
    assert_code(&o, 2, "a bad proxy URL");
}

fn nginx(dir: &Path, port: u16, relay_port: u16) -> Daemon {
    let conf = format!(
        r#"
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /tern/ {{
            proxy_pass http://127.0.0.1:{relay_port}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 300s;
            proxy_buffering off;
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx starts");
    wait_for_port(port);
    Daemon(child)
}

#[test]
fn relays_behind_an_https_reverse_proxy() {
    if !have("nginx") || !have("openssl") {
        eprintln!("note: nginx or openssl is not installed; skipping the reverse proxy test");
        return;
    }
    let r = Relay::start();
    let dir = tempfile::tempdir().unwrap();
    // A private CA and a certificate it issued for localhost (webpki does
    // not take a self-signed CA certificate as a server's).
    let script = r#"
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=tern-test-ca -keyout ca.key -out ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=localhost -keyout key.pem -out leaf.csr
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile leaf.ext -out cert.pem
"#;
    let ok = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl made the certificates");
    let port = free_port();
    let _front = nginx(dir.path(), port, r.port);
    let key = r
        .addr
        .split('@')
        .next()
        .unwrap()
        .trim_start_matches("tern://");
    let addr = format!("tern+https://{key}@localhost:{port}/tern");
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_string_lossy();
    let env = [("TERN_TLS_CA", ca.as_ref())];
    let a = Profile::with_env("Ada", &[&addr], &env, &[]);
    let b = Profile::with_env("Bob", &[&addr], &env, &[]);
    connect(&a, "bob", &b, "ada");
    a.send("bob", "through the front");
    assert_eq!(b.recv_texts(), vec!["through the front"]);

    // A subscription through the front: pushed while following.
    let mut f = b.follow();
    a.send("bob", "pushed through the front");
    let (msgs, _) = f.next_messages(1);
    assert_eq!(msgs, vec!["pushed through the front"]);
    f.kill();

    // Without the front's CA the TLS check fails, and says so.
    let stranger = Profile::with_env("Eve", &[&addr], &[], &[]);
    let o = stranger.run(&["invite", "--link", "--name", "x"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("TLS"), "{}", show(&o));
}
