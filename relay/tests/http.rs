//! The HTTP and WebSocket layers against hostile, broken and slow clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_relay::AccessKey;
use tern_wire::session::{ClientHandshake, MSG1_LEN};
use tern_wire::{Command, Reply};
use tungstenite::Message;

fn still_serving(relay: &Relay) {
    let mut c = relay.client();
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
}

const UPGRADE: &str =
    "GET /v2 HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn bodies_and_bad_heads_are_refused_from_the_head_alone() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});

    // Announced as huge: refused on the head, the body is never read.
    let mut c = Conn::connect(relay.addr);
    c.write_raw(b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        .unwrap();
    let _ = c.write_raw(&vec![7u8; 64 * 1024]);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(5)));

    for (head, status) in [
        (
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            411,
        ),
        ("GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
        ("GET / HTTP/3\r\nHost: x\r\n\r\n", 505),
        (&UPGRADE.replace("Version: 13", "Version: 12"), 426),
        (&UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "AAAA"), 400),
        ("GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    ] {
        let mut c = Conn::connect(relay.addr);
        c.write_raw(head.as_bytes()).unwrap();
        assert_eq!(c.read_response().unwrap().status, status, "{head:?}");
    }
    still_serving(&relay);
    relay.stop();
}

#[test]
fn garbage_before_and_after_the_upgrade() {
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

    // After the upgrade: raw bytes that are no WebSocket frame, a text
    // message, a handshake of the wrong size, random handshake bytes, a
    // message far over the limit. Each ends that connection, nothing else.
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let mut head = [0u8; 129];
    let n = s.read(&mut head).unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));
    s.write_all(&[0xff; 64]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    for msg in [
        Message::Text("hello".into()),
        Message::Binary(vec![1u8; 10].into()),
        Message::Binary(vec![2u8; MSG1_LEN].into()),
        Message::Binary(vec![3u8; 200_000].into()),
    ] {
        let mut ws = websocket(relay.addr);
        let _ = ws.send(msg);
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => {}
            Ok(other) => panic!("answered garbage with {other:?}"),
        }
    }

    // Truncated: half a head, half a handshake, then hang up.
    for cut in [10, 60] {
        let mut s = TcpStream::connect(relay.addr).unwrap();
        s.write_all(&UPGRADE.as_bytes()[..cut]).unwrap();
    }
    let mut ws = websocket(relay.addr);
    let (_, msg1) = ClientHandshake::start(&relay.key(), &mut OsRng).unwrap();
    let _ = ws
        .get_mut()
        .write_all(&[0x82, 0x7e, 0x04, 0xd2, 1, 2, 3, 4]);
    let _ = ws.get_mut().write_all(&msg1[..100]);
    drop(ws);
    still_serving(&relay);
    relay.stop();
}

#[test]
fn slow_silent_and_idle_peers_are_cut_off_in_every_state() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.request_timeout = Duration::from_millis(400);
        cfg.idle_timeout = Duration::from_millis(700);
        cfg.subscribed_idle_timeout = Duration::from_millis(1200);
    });

    // Slowloris: a head that trickles in never completes.
    let mut c = Conn::connect(relay.addr);
    let start = Instant::now();
    c.write_raw(b"GET / HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = c.write_raw(b"Host: x\r\n");
    assert!(c.closed_within(Duration::from_secs(5)));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Upgraded, but the handshake never comes.
    let mut ws = websocket(relay.addr);
    let start = Instant::now();
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match ws.read() {
        Ok(Message::Close(_)) | Err(_) => {}
        Ok(other) => panic!("sent {other:?} before any handshake"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // A session that says nothing.
    let mut c = relay.client();
    assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
    let start = Instant::now();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(start.elapsed() >= Duration::from_millis(600));

    // A subscribed session lives longer, as long as it pings.
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    assert_eq!(c.request(&q.sub(1), Some(&q.recipient_key)), Reply::Ok);
    assert_eq!(c.next().1, Reply::Idle);
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(
        c.request(&q.check(), None),
        Reply::Count(0),
        "alive after the plain idle timeout"
    );
    let start = Instant::now();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(start.elapsed() >= Duration::from_millis(1000));

    still_serving(&relay);
    relay.stop();
}

#[test]
fn operator_page_keep_alive_and_404() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.access_keys = vec![AccessKey::new("s3cret-key")]
    });
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
        "GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n",
        "DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /v2/../ HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        c.write_raw(req.as_bytes()).unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 404, "{req:?}");
        assert!(r.body.is_empty());
    }
    // Still the same keep-alive connection.
    assert_eq!(c.get("/").status, 200);
    // HTTP/1.0 and Connection: close end the connection after the response.
    for version_and_header in [
        "HTTP/1.0\r\n",
        "HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
    ] {
        let mut c = Conn::connect(relay.addr);
        c.write_raw(format!("GET / {version_and_header}\r\n").as_bytes())
            .unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed_within(Duration::from_secs(5)));
    }
    relay.stop();
}

#[test]
fn connection_caps_in_all_and_per_address() {
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
        if let Ok(mut c) = Client::try_new(relay.addr, relay.key()) {
            if matches!(c.request(&Command::Info, None), Reply::Info(_)) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "capacity never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.stop();

    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_connections_per_address = 2);
    let _a = relay.client();
    let _b = relay.client();
    let mut extra = Conn::connect(relay.addr);
    if let Ok(r) = extra.read_response() {
        assert_eq!(r.status, 503);
    }
    drop(_a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Client::try_new(relay.addr, relay.key()).is_err() {
        assert!(
            Instant::now() < deadline,
            "the address's capacity never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.stop();
}

#[test]
fn thousands_of_sessions_opened_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let key = relay.key();
    let addr = relay.addr;
    // Half complete the handshake, half hang up after the upgrade or in it.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..500 {
                    if (i + t) % 2 == 0 {
                        let mut c = Client::new(addr, key);
                        if i % 10 == 0 {
                            assert!(matches!(c.request(&Command::Info, None), Reply::Info(_)));
                        }
                    } else {
                        let mut ws = websocket(addr);
                        if i % 3 == 0 {
                            let (_, msg1) = ClientHandshake::start(&key, &mut OsRng).unwrap();
                            let _ = ws.send(Message::Binary(msg1.into()));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    still_serving(&relay);
    relay.stop();
}
