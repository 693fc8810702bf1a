//! A rough SEND throughput measurement (concurrent clients, each SEND
//! answered only after its commit). Ignored by default; run with
//! `cargo test -p tern-relay --test throughput -- --ignored --nocapture`,
//! preferably with optimisations for tern-relay itself.

mod common;

use std::time::Instant;

use common::*;
use tern_relay::wire::Reply;

#[test]
#[ignore]
fn send_throughput() {
    let clients = 32;
    let per_client = 100;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), |cfg| {
        cfg.workers = 32;
        cfg.max_pending = 100_000;
    });
    let mut c = relay.client();
    let queues: Vec<Queue> = (0..clients).map(|_| create_queue(&mut c, None)).collect();
    for q in &queues {
        assert_eq!(c.request(&q.secure(), Some(&q.recipient_key)), Reply::Ok);
    }
    // Sealing is client work: prepare every block before the clock starts.
    let m = message();
    let work: Vec<Vec<_>> = queues
        .iter()
        .map(|q| {
            (0..per_client)
                .map(|_| seal_request(&relay.key(), &q.send(&m), Some(&q.sender_key), now_ms()))
                .collect()
        })
        .collect();
    let start = Instant::now();
    let threads: Vec<_> = work
        .into_iter()
        .map(|blocks| {
            let addr = relay.addr;
            let key = relay.key();
            std::thread::spawn(move || {
                let mut c = Client::new(addr, key);
                for (block, rkey) in blocks {
                    let r = c.conn.post(&block);
                    assert_eq!(open_response(&rkey, &r.body).reply, Reply::Ok);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = start.elapsed();
    let n = clients * per_client;
    eprintln!(
        "{n} durable SENDs from {clients} clients in {took:?}: {:.0}/s",
        n as f64 / took.as_secs_f64()
    );
    relay.stop();
}
