//! What survives a restart, and what never reaches the disk.

mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tern_relay::{load_address, AccessKey, RelayError, ServeConfig, Server};
use tern_wire::address::Host;
use tern_wire::frame::FrameBuilder;
use tern_wire::{ErrorCode, Reply, Request};

/// Every file under `dir`, read whole.
fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn restart_delivers_every_acknowledged_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // A quota that 1.5 s of sending cannot reach: this test is about
    // durability, and an optimised relay takes well over 1,000 a second.
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.workers = 8;
        cfg.max_pending = 1_000_000;
    });
    let key = relay.key();
    let mut c = relay.client();
    let q = Arc::new(create_queue(&mut c, None));
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);

    // Concurrent senders (so commits are shared) keep going while the relay
    // shuts down under them. Every OK must survive; nothing may be duplicated.
    let acked: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let attempted: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..6)
        .map(|_| {
            let (q, acked, attempted, stop) =
                (q.clone(), acked.clone(), attempted.clone(), stop.clone());
            let addr = relay.addr;
            std::thread::spawn(move || {
                let Ok(mut c) = Client::try_new(addr, key) else {
                    return;
                };
                while !stop.load(Ordering::SeqCst) {
                    // Four SENDs a frame, so that commits are shared.
                    let batch: Vec<Vec<u8>> = (0..4).map(|_| message()).collect();
                    attempted.lock().unwrap().extend(batch.iter().cloned());
                    let hash = c.hash();
                    let mut frames = FrameBuilder::new();
                    for (i, m) in batch.iter().enumerate() {
                        let mut rec = Vec::new();
                        Request::encode(
                            i as u32 + 1,
                            &q.send(m),
                            &hash,
                            Some(&q.sender_key),
                            &mut rec,
                        );
                        frames.push(&rec);
                    }
                    for f in frames.finish() {
                        let sealed = c.seal(&f);
                        if c.send_raw(sealed).is_err() {
                            return;
                        }
                    }
                    let mut answered = 0;
                    while answered < batch.len() {
                        let Ok(records) = c.read_frame() else {
                            return; // the relay closed the session
                        };
                        for (tag, reply) in records {
                            match reply {
                                Reply::Ok => {
                                    acked.lock().unwrap().push(batch[tag as usize - 1].clone())
                                }
                                other => panic!("SEND answered {other:?}"),
                            }
                            answered += 1;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    relay.stop();
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    assert!(acked.len() >= 10, "only {} sends got through", acked.len());
    eprintln!("{} sends answered OK before shutdown", acked.len());

    let relay = Relay::start(dir.path(), |_| {});
    assert_eq!(relay.key(), key, "the identity survives a restart");
    let mut c = relay.client();
    let delivered = drain_acking(&mut c, &q);
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    for d in &delivered {
        *count.entry(d.as_slice()).or_default() += 1;
    }
    for m in &acked {
        assert_eq!(
            count.get(m.as_slice()),
            Some(&1),
            "an acknowledged message was lost or duplicated"
        );
    }
    // Unacknowledged sends (in flight at shutdown) may have landed, once at most.
    for d in &delivered {
        assert!(attempted.contains(d));
        assert_eq!(count[d.as_slice()], 1);
    }
    assert!(delivered.len() <= acked.len() + 6 * 4);
    // And after acknowledging, a restart delivers nothing again.
    relay.stop();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    assert_eq!(c.request(&q.check(), None), Reply::Count(0));
    relay.stop();
}

#[test]
fn nothing_readable_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    let hello = message();
    assert_eq!(c.request(&q.send(&hello), None), Reply::Ok);
    assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    let msgs: Vec<Vec<u8>> = (0..5).map(|_| message()).collect();
    for m in &msgs {
        assert_eq!(c.request(&q.send(m), Some(&q.sender_key)), Reply::Ok);
    }
    let tag = c.submit(&[(q.sub(1), Some(&q.recipient_key))])[0];
    assert_eq!(c.wait_for(tag), Reply::Ok);
    let delivered = c.wait_for(tag);
    let Reply::Message {
        body: stored_form, ..
    } = &delivered
    else {
        panic!("{delivered:?}")
    };

    let check = |when: &str| {
        let files = all_files(dir.path());
        let everything: Vec<u8> = files.iter().flat_map(|(_, b)| b.clone()).collect();
        // Control: the scan does see the database (hashed id and stored ciphertext).
        let rhash: [u8; 32] = Sha256::digest(q.recipient_id).into();
        assert!(
            contains(&everything, &rhash),
            "{when}: hashed id not found; is the scan blind?"
        );
        assert!(
            contains(&everything, &stored_form[..64]),
            "{when}: stored ciphertext not found"
        );
        for (name, bytes) in &files {
            for m in msgs.iter().chain([&hello]) {
                for at in [0, 5000, 15_968] {
                    assert!(
                        !contains(bytes, &m[at..at + 32]),
                        "{when}: message bytes in {name}"
                    );
                }
            }
            assert!(
                !contains(bytes, &q.recipient_id),
                "{when}: recipient id in {name}"
            );
            assert!(
                !contains(bytes, &q.sender_id),
                "{when}: sender id in {name}"
            );
        }
    };
    check("while running");
    relay.stop();
    check("after shutdown");

    // Files are private to the relay's user.
    for (name, _) in all_files(dir.path()) {
        let mode = std::fs::metadata(dir.path().join(&name))
            .unwrap()
            .permissions()
            .mode();
        if name == "identity.key" || name.starts_with("relay.db") {
            assert_eq!(mode & 0o077, 0, "{name} has mode {:o}", mode & 0o777);
        }
    }
}

#[test]
fn identity_file_address_and_single_instance() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let listen = "127.0.0.1:5999".parse().unwrap();
    assert!(matches!(
        load_address(&data, None, listen),
        Err(RelayError::NoIdentity { .. })
    ));

    let relay = Relay::start(&data, |cfg| cfg.access_keys = vec![AccessKey::new("k3y")]);
    let key_file = data.join("identity.key");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        relay.address.to_string().split('@').nth(1),
        Some(&*format!("{}", relay.addr))
    );
    assert_eq!(relay.address.access_key.as_deref(), Some("k3y"));

    // `tern relay address` prints what `serve` printed.
    let a = load_address(&data, None, "0.0.0.0:5223".parse().unwrap()).unwrap();
    assert_eq!(a, relay.address);
    assert_eq!(a.access_key.as_deref(), Some("k3y"));
    let fresh = dir.path().join("never-served");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::copy(&key_file, fresh.join("identity.key")).unwrap();
    // A relay that never ran: the address it would print for `listen`.
    let unspecified = load_address(&fresh, None, "0.0.0.0:5223".parse().unwrap()).unwrap();
    assert_eq!(unspecified.host, Host::V4(Ipv4Addr::LOCALHOST));
    assert_eq!((unspecified.port, unspecified.key), (5223, relay.key()));
    assert_eq!(unspecified.access_key, None);
    let v6 = load_address(&fresh, None, "[::]:5223".parse().unwrap()).unwrap();
    assert!(v6.to_string().ends_with("@[::1]:5223"));
    assert!(load_address(&fresh, None, "127.0.0.1:0".parse().unwrap()).is_err());

    // A second relay on the same directory is refused.
    let second = Server::bind(ServeConfig::new("127.0.0.1:0".parse().unwrap(), &data));
    assert!(
        matches!(second, Err(RelayError::Locked { .. })),
        "second relay was not refused"
    );
    relay.stop();

    // Bad configuration is refused with a message.
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), &data);
    cfg.access_keys = vec![AccessKey::new("no spaces")];
    match Server::bind(cfg) {
        Err(e @ RelayError::Config(_)) => assert!(e.to_string().contains("access key")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted a bad access key"),
    }
    // A damaged identity is reported, not replaced.
    std::fs::write(&key_file, b"short").unwrap();
    match Server::bind(ServeConfig::new("127.0.0.1:0".parse().unwrap(), &data)) {
        Err(e @ RelayError::IdentityCorrupt { .. }) => assert!(e.to_string().contains("backup")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("replaced a damaged identity"),
    }
}

#[test]
fn deleted_queue_is_gone_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    let q = create_queue(&mut c, None);
    assert_eq!(c.request(&q.send(&message()), None), Reply::Ok);
    assert_eq!(c.request(&q.delete(), Some(&q.recipient_key)), Reply::Ok);
    relay.stop();
    let relay = Relay::start(dir.path(), |_| {});
    let mut c = relay.client();
    assert_eq!(c.request(&q.check(), None), Reply::Error(ErrorCode::Auth));
    relay.stop();
}

#[test]
fn the_public_address_is_printed_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.public_address = Some("relay.example.org".into())
    });
    // The port of the listening socket, the host the operator gave.
    assert_eq!(relay.address.host, Host::Name("relay.example.org".into()));
    assert_eq!(relay.address.port, relay.addr.port());
    let port = relay.addr.port();
    relay.stop();
    let a = load_address(dir.path(), None, "127.0.0.1:5223".parse().unwrap()).unwrap();
    assert_eq!(a.host, Host::Name("relay.example.org".into()));
    assert_eq!(a.port, port);

    let relay = Relay::start(dir.path(), |cfg| {
        cfg.public_address = Some("https://app.example.net/tern".into())
    });
    assert_eq!(
        relay.address.to_string(),
        format!(
            "tern+https://{}@app.example.net:443/tern",
            data_encoding::BASE64URL_NOPAD.encode(&relay.key())
        )
    );
    relay.stop();
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    cfg.public_address = Some("not a host".into());
    assert!(matches!(Server::bind(cfg), Err(RelayError::Config(_))));
}

#[test]
fn beyond_the_high_water_mark_new_queues_and_messages_wait() {
    let dir = tempfile::tempdir().unwrap();
    // Room for the first messages only.
    let relay = Relay::start(dir.path(), |cfg| cfg.max_data_bytes = 200_000);
    let mut c = relay.client();
    let q = secured_queue(&mut c);
    let mut refused = None;
    for i in 0..40 {
        match c.request(&q.send(&message()), Some(&q.sender_key)) {
            Reply::Ok => {}
            Reply::Error(ErrorCode::Unavailable) => {
                refused = Some(i);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let n = refused.expect("the relay kept taking messages past its high-water mark");
    assert!(n >= 3, "refused after {n} messages");
    let (cmd, key, _) = create_command(None);
    assert_eq!(
        c.request(&cmd, Some(&key)),
        Reply::Error(ErrorCode::Unavailable)
    );
    // Deliveries still work, and make room again once measured.
    let got = drain_acking(&mut c, &q);
    assert_eq!(got.len(), n);
    relay.stop();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_data_bytes = 200_000);
    let mut c = relay.client();
    assert_eq!(
        c.request(&q.send(&message()), Some(&q.sender_key)),
        Reply::Ok
    );
    relay.stop();
}
