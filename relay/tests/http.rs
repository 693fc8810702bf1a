//! The HTTP layer against hostile, broken and slow clients.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_relay::seal::BLOCK_LEN;
use tern_relay::wire::{Command, Reply};

fn still_serving(relay: &Relay) {
    let mut c = relay.client();
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
}

#[test]
fn oversized_and_wrongly_sized_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});

    // Announced as huge: refused on the head, the body is never read.
    let mut c = Conn::connect(relay.addr);
    c.write_raw(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        .unwrap();
    c.write_raw(&vec![7u8; 64 * 1024]).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(5)));

    let mut c = Conn::connect(relay.addr);
    c.write_raw(
        format!(
            "POST /v1 HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            BLOCK_LEN + 1
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.read_response().unwrap().status, 413);

    for len in [0, 1, BLOCK_LEN - 1] {
        let mut c = Conn::connect(relay.addr);
        let r = c.post(&vec![1u8; len]);
        assert_eq!(r.status, 400, "length {len}");
        assert!(r.body.is_empty());
    }

    // No Content-Length, or chunked: 411.
    for head in [
        "POST /v1 HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let mut c = Conn::connect(relay.addr);
        c.write_raw(head.as_bytes()).unwrap();
        assert_eq!(c.read_response().unwrap().status, 411);
    }

    // A right-sized body of random bytes is not a sealed block: bare 400,
    // and the connection stays open.
    let mut c = Conn::connect(relay.addr);
    let mut junk = vec![0u8; BLOCK_LEN];
    OsRng.fill_bytes(&mut junk);
    let r = c.post(&junk);
    assert_eq!((r.status, r.body.len()), (400, 0));
    assert_eq!(r.header("connection"), None);
    junk[0] = 1;
    assert_eq!(c.post(&junk).status, 400);
    still_serving(&relay);
    relay.stop();
}

#[test]
fn garbage_and_truncated_requests() {
    let dir = tempfile::tempdir().unwrap();
    // Short garbage can look like the start of a request: it is cut off by
    // the request timeout.
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.request_timeout = Duration::from_secs(1)
    });

    // Binary garbage: an error or a closed socket, nothing else.
    for size in [1, 100, 5000, 40_000] {
        let mut junk = vec![0u8; size];
        OsRng.fill_bytes(&mut junk);
        let mut c = Conn::connect(relay.addr);
        let _ = c.write_raw(&junk);
        // Err: the relay closed the connection without answering.
        if let Ok(r) = c.read_response() {
            assert!(r.status >= 400, "status {}", r.status);
        }
    }
    // A TLS ClientHello by mistake.
    let mut c = Conn::connect(relay.addr);
    c.write_raw(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ])
    .unwrap();
    assert_eq!(c.read_response().unwrap().status, 400);
    // Text garbage and a head that never ends.
    let mut c = Conn::connect(relay.addr);
    c.write_raw(b"HELLO\r\n\r\n").unwrap();
    assert_eq!(c.read_response().unwrap().status, 400);
    let mut c = Conn::connect(relay.addr);
    let _ = c.write_raw(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(20_000)).as_bytes());
    if let Ok(r) = c.read_response() {
        assert_eq!(r.status, 431);
    }

    // Truncated: half a head, or a head and half a body, then hang up.
    let (block, _) = seal_request(&relay.key(), &Command::Info, None, now_ms());
    for cut in [10, 60, 100 + BLOCK_LEN / 2] {
        let mut s = TcpStream::connect(relay.addr).unwrap();
        let mut req =
            format!("POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: {BLOCK_LEN}\r\n\r\n")
                .into_bytes();
        req.extend_from_slice(&block);
        s.write_all(&req[..cut]).unwrap();
        drop(s);
    }
    still_serving(&relay);
    relay.stop();
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.request_timeout = Duration::from_millis(400);
        cfg.idle_timeout = Duration::from_millis(700);
    });

    // Slowloris: a request that trickles in never completes.
    let mut c = Conn::connect(relay.addr);
    let start = Instant::now();
    c.write_raw(b"POST /v1 HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = c.write_raw(b"Host: x\r\n");
    assert!(c.closed_within(Duration::from_secs(5)));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A head with a body that stops halfway.
    let mut c = Conn::connect(relay.addr);
    c.write_raw(format!("POST /v1 HTTP/1.1\r\nContent-Length: {BLOCK_LEN}\r\n\r\n").as_bytes())
        .unwrap();
    c.write_raw(&[0u8; 1000]).unwrap();
    assert!(c.closed_within(Duration::from_secs(5)));

    // Idle keep-alive connection.
    let mut c = relay.client();
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
    let start = Instant::now();
    assert!(c.conn.closed_within(Duration::from_secs(5)));
    assert!(start.elapsed() >= Duration::from_millis(600));
    still_serving(&relay);
    relay.stop();
}

#[test]
fn keep_alive_pipelining_and_expect_continue() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});

    // Two requests in one write: two responses, in order.
    let mut c = Conn::connect(relay.addr);
    let (b1, k1) = seal_request(&relay.key(), &Command::Info, None, now_ms());
    let (b2, k2) = seal_request(&relay.key(), &Command::Info, None, now_ms());
    let mut both = Vec::new();
    for b in [&b1, &b2] {
        both.extend_from_slice(
            format!("POST /v1 HTTP/1.1\r\nContent-Length: {BLOCK_LEN}\r\n\r\n").as_bytes(),
        );
        both.extend_from_slice(b);
    }
    c.write_raw(&both).unwrap();
    for k in [&k1, &k2] {
        let r = c.read_response().unwrap();
        assert!(matches!(open_response(k, &r.body).reply, Reply::Info(_)));
    }

    // Expect: 100-continue gets the interim response before the body.
    let mut c = Conn::connect(relay.addr);
    let (b, k) = seal_request(&relay.key(), &Command::Info, None, now_ms());
    c.write_raw(
        format!("POST /v1 HTTP/1.1\r\nContent-Length: {BLOCK_LEN}\r\nExpect: 100-continue\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream(), &mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_raw(&b).unwrap();
    let r = c.read_response().unwrap();
    assert!(matches!(open_response(&k, &r.body).reply, Reply::Info(_)));

    // HTTP/1.0 and Connection: close end the connection after the response.
    for version_and_header in ["HTTP/1.0\r\n", "HTTP/1.1\r\nConnection: close\r\n"] {
        let mut c = Conn::connect(relay.addr);
        let (b, _) = seal_request(&relay.key(), &Command::Info, None, now_ms());
        let mut req = format!("POST /v1 {version_and_header}Content-Length: {BLOCK_LEN}\r\n\r\n")
            .into_bytes();
        req.extend_from_slice(&b);
        c.write_raw(&req).unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed_within(Duration::from_secs(5)));
    }
    relay.stop();
}

#[test]
fn operator_page_and_404() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| cfg.access_key = Some("s3cret-key".into()));
    let mut c = Conn::connect(relay.addr);
    let r = c.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let page = String::from_utf8(r.body).unwrap();
    assert!(page.contains(&relay.address.without_access_key().to_string()));
    assert!(!page.contains("s3cret-key"));
    assert!(page.contains("<svg"));
    assert!(page.contains(env!("CARGO_PKG_VERSION")));
    assert!(page.contains("Closed"));

    for req in [
        "GET /v1 HTTP/1.1\r\n\r\n",
        "GET /index.html HTTP/1.1\r\n\r\n",
        "POST /v2 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "DELETE / HTTP/1.1\r\n\r\n",
        "GET /v1/../ HTTP/1.1\r\n\r\n",
    ] {
        c.write_raw(req.as_bytes()).unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 404, "{req:?}");
        assert!(r.body.is_empty());
    }
    // Still the same keep-alive connection.
    assert_eq!(c.get("/").status, 200);
    relay.stop();
}

#[test]
fn connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_connections = 3);
    let mut held: Vec<Client> = (0..3).map(|_| relay.client()).collect();
    for c in &mut held {
        assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
    }
    let mut extra = Conn::connect(relay.addr);
    // Err: closed before the 503 could be read.
    if let Ok(r) = extra.read_response() {
        assert_eq!(r.status, 503);
    }
    assert!(extra.closed_within(Duration::from_secs(5)));
    // Capacity returns when a connection closes.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = relay.client();
        let (b, k) = seal_request(&relay.key(), &Command::Info, None, now_ms());
        if c.conn.send_post(&b).is_ok() {
            if let Ok(r) = c.conn.read_response() {
                if r.status == 200 {
                    assert!(matches!(open_response(&k, &r.body).reply, Reply::Info(_)));
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "capacity never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.stop();
}
