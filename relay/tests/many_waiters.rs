//! Thousands of idle long polls. In a file of its own so that it runs in its
//! own process: it counts the process's threads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_relay::seal::ResponseKey;
use tern_relay::wire::{Command, Reply};

/// Thousands of idle long polls need sockets, not threads, and do not slow
/// down anyone else.
#[test]
fn many_idle_waiters_few_threads() {
    // Two descriptors per waiter in this process (client and server end).
    let waiters = 2000.min(fd_limit().saturating_sub(200) / 2);
    assert!(waiters >= 200, "open-file limit too low for this test");
    let queues = 10;

    let dir = tempfile::tempdir().unwrap();
    let threads_before = thread_count();
    let relay = Relay::start(dir.path(), |cfg| cfg.max_connections = waiters + 50);
    let mut c = relay.client();
    let qs: Vec<Queue> = (0..queues).map(|_| create_queue(&mut c, None)).collect();
    // Counted once the relay is serving: its event loop, workers, store
    // writer and maintenance thread.
    let relay_threads = thread_count() - threads_before;
    for q in &qs {
        assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    }

    let t0 = Instant::now();
    let mut parked: Vec<(usize, Conn, ResponseKey)> = Vec::with_capacity(waiters);
    for i in 0..waiters {
        let q = &qs[i % queues];
        let (block, key) = seal_request(
            &relay.key(),
            &q.fetch(30_000),
            Some(&q.recipient_key),
            now_ms(),
        );
        let mut conn = Conn::connect(relay.addr);
        conn.send_post(&block).unwrap();
        parked.push((i % queues, conn, key));
    }

    eprintln!("{waiters} FETCHes sent in {:?}", t0.elapsed());

    // Another client is served promptly while they all wait.
    let start = Instant::now();
    let mut other = relay.client();
    assert!(matches!(
        other.request(&Command::Info, None),
        Reply::Info(_)
    ));
    let q0 = &qs[0];
    let m = message();
    assert_eq!(other.request(&q0.send(&m), Some(&q0.sender_key)), Reply::Ok);
    eprintln!("INFO and SEND among the waiters took {:?}", start.elapsed());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // Queue 0's waiters got the message; the others are still waiting.
    for (qi, conn, key) in parked.iter_mut().filter(|(qi, ..)| *qi == 0) {
        let r = conn.read_response().unwrap();
        let (_, body) = qs[*qi].open(&open_response(key, &r.body).reply);
        assert_eq!(body, m);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut probe = [0u8; 1];
    for (_, conn, _) in parked.iter().filter(|(qi, ..)| *qi != 0).step_by(37) {
        conn.stream().set_nonblocking(true).unwrap();
        let r = conn.stream().peek(&mut probe);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a waiter was answered early: {r:?}"
        );
        conn.stream().set_nonblocking(false).unwrap();
    }
    let threads_waiting = thread_count() - threads_before;
    eprintln!(
        "{waiters} parked FETCHes: relay threads {relay_threads} at start, {threads_waiting} while waiting"
    );
    assert!(
        threads_waiting <= relay_threads + 2,
        "threads grew with waiters"
    );

    // Shutting down answers everyone (EMPTY) and returns.
    let start = Instant::now();
    relay.stop();
    eprintln!(
        "shutdown with {} waiters took {:?}",
        waiters,
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let mut answered = 0;
    for (qi, conn, key) in parked.iter_mut().filter(|(qi, ..)| *qi != 0) {
        let r = conn.read_response().unwrap();
        assert_eq!(
            open_response(key, &r.body).reply,
            Reply::Empty,
            "queue {qi}"
        );
        answered += 1;
    }
    assert_eq!(answered, waiters - waiters.div_ceil(queues));
}
