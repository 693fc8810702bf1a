//! Thousands of idle subscribed sessions. In a file of its own so that it
//! runs in its own process: it counts the process's threads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_wire::{Command, Reply};

/// Thousands of idle subscriptions need sockets, not threads, and do not
/// slow down anyone else.
#[test]
fn many_idle_subscribers_few_threads() {
    // Two descriptors per session in this process (client and server end).
    let sessions = 2000.min(fd_limit().saturating_sub(200) / 2);
    assert!(sessions >= 200, "open-file limit too low for this test");
    let queues = 10;

    let dir = tempfile::tempdir().unwrap();
    let threads_before = thread_count();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.max_connections = sessions + 50;
        cfg.max_connections_per_address = sessions as u32 + 50;
    });
    let mut c = relay.client();
    let qs: Vec<Queue> = (0..queues).map(|_| secured_queue(&mut c)).collect();
    // Counted once the relay is serving: its event loop, workers, store
    // writer and maintenance thread.
    let relay_threads = thread_count() - threads_before;

    let t0 = Instant::now();
    let mut subscribed: Vec<(usize, Client, u32)> = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let q = &qs[i % queues];
        let mut s = relay.client();
        let tag = s.submit(&[(q.sub(1), Some(&q.recipient_key))])[0];
        assert_eq!(s.wait_for(tag), Reply::Ok);
        assert_eq!(s.wait_for(tag), Reply::Idle);
        subscribed.push((i % queues, s, tag));
    }
    eprintln!("{sessions} sessions subscribed in {:?}", t0.elapsed());

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
    eprintln!(
        "INFO and SEND among the subscribers took {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // Queue 0's subscribers got the message; the others nothing.
    for (qi, s, tag) in subscribed.iter_mut().filter(|(qi, ..)| *qi == 0) {
        let r = s.wait_for(*tag);
        assert_eq!(qs[*qi].open(&r).1, m);
    }
    for (_, s, _) in subscribed
        .iter_mut()
        .filter(|(qi, ..)| *qi != 0)
        .step_by(37)
    {
        assert_eq!(
            s.next_within(Duration::from_millis(5)),
            None,
            "pushed early"
        );
    }
    let threads_waiting = thread_count() - threads_before;
    eprintln!(
        "{sessions} subscribed sessions: relay threads {relay_threads} at start, {threads_waiting} while waiting"
    );
    assert!(
        threads_waiting <= relay_threads + 2,
        "threads grew with sessions"
    );

    // Shutting down closes everyone and returns.
    let start = Instant::now();
    relay.stop();
    eprintln!(
        "shutdown with {sessions} sessions took {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for (_, s, _) in subscribed.iter_mut().step_by(97) {
        assert!(s.closed_within(Duration::from_secs(5)));
    }
}
