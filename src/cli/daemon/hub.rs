//! Handing received messages to the clients that subscribed, without losing
//! any: the delivery half of the daemon's contract.
//!
//! The client engine stores every new message in the profile's inbox in the
//! transaction that stores the message, and takes it out only when its
//! caller says the message was shown ([`Shown::Yes`]). The hub is that
//! caller. A message is shown when its notification line was written whole
//! to at least one subscribed connection; with `--manual-ack`, only when a
//! client acknowledges it (`ack`). Until then it stays in the inbox, which
//! is in the profile store, so a message survives a client that went away,
//! a daemon killed with SIGKILL, a power cut: the next daemon's engine
//! starts by reading the inbox again (at least once; ids make duplicates
//! easy to drop).

use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::client::events::Shown;

/// One client connection's output: responses and notifications, one JSON
/// object per line, written whole under one lock so lines never mix.
pub struct Conn {
    pub id: u64,
    out: Mutex<Box<dyn Write + Send>>,
    /// For a socket: shut down when a write fails, so that the client sees
    /// the end of the stream instead of the rest of a torn line.
    socket: Option<UnixStream>,
    alive: AtomicBool,
    /// This client acknowledges what it was sent (`subscribe` with
    /// `manual_ack`, as `tern recv` through the daemon does): writing a
    /// message to it does not deliver it; its `ack` does.
    manual: AtomicBool,
}

impl Conn {
    pub fn new(id: u64, out: Box<dyn Write + Send>, socket: Option<UnixStream>) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            out: Mutex::new(out),
            socket,
            alive: AtomicBool::new(true),
            manual: AtomicBool::new(false),
        })
    }

    pub fn set_manual_ack(&self) {
        self.manual.store(true, Ordering::SeqCst);
    }

    pub fn manual_ack(&self) -> bool {
        self.manual.load(Ordering::SeqCst)
    }

    /// Writes `line` and a newline and flushes; `false` once the client
    /// cannot be written to (it is then closed for good).
    pub fn send_line(&self, line: &str) -> bool {
        if !self.is_alive() {
            return false;
        }
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = out
            .write_all(buf.as_bytes())
            .and_then(|()| out.flush())
            .is_ok();
        drop(out);
        if !ok {
            self.close();
        }
        ok
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A message not yet counted as delivered: its notification line and id.
struct Pending {
    id: String,
    line: String,
}

#[derive(Default)]
struct State {
    subscribers: Vec<Arc<Conn>>,
    /// By inbox sequence number, so oldest first.
    pending: BTreeMap<u64, Pending>,
    /// Inbox entries delivered (or acknowledged) by this daemon: the engine
    /// may read one again from the inbox, in the moment before its removal
    /// commits (when it starts its receiving again), and it must not be
    /// delivered twice for that. By sequence number and message id: the
    /// inbox reuses the number of an entry it no longer holds.
    done: BTreeSet<(u64, String)>,
}

/// How many delivered inbox entries are remembered (the newest).
const DONE_KEPT: usize = 100_000;

impl State {
    /// Remembers these pending entries as delivered, and forgets them as
    /// pending.
    fn mark_done(&mut self, seqs: &[u64]) {
        for s in seqs {
            if let Some(p) = self.pending.remove(s) {
                self.done.insert((*s, p.id));
            }
        }
        while self.done.len() > DONE_KEPT {
            self.done.pop_first();
        }
    }

    /// Writes to every live subscriber; whether at least one that does
    /// not acknowledge by itself took it (a delivery).
    fn broadcast(&mut self, line: &str) -> bool {
        self.subscribers.retain(|c| c.is_alive());
        let mut any = false;
        for c in &self.subscribers {
            any |= c.send_line(line) && !c.manual_ack();
        }
        any
    }
}

/// How many recent delivery receipts (message id, device) the hub keeps
/// for `send` calls waiting on one (`wait_delivered`).
const RECEIPTS_KEPT: usize = 1024;

/// The delivery state of one served profile.
pub struct Hub {
    manual_ack: bool,
    state: Mutex<State>,
    /// Receipts the engine recorded lately, newest last: a `send` waiting
    /// for its message looks here (the store has them too).
    receipts: Mutex<VecDeque<(String, String)>>,
    receipt_came: Condvar,
}

impl Hub {
    pub fn new(manual_ack: bool) -> Hub {
        Hub {
            manual_ack,
            state: Mutex::new(State::default()),
            receipts: Mutex::new(VecDeque::new()),
            receipt_came: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message the engine stored (`seq`: its place in the inbox), as a
    /// notification `line`. What to tell the engine: whether it may leave
    /// the inbox now.
    pub fn message(&self, seq: Option<u64>, id: String, line: String) -> Shown {
        let mut st = self.state();
        if seq.is_some_and(|s| st.pending.contains_key(&s)) {
            // The engine restarted and read the inbox again: already here.
            return Shown::Later;
        }
        if seq.is_some_and(|s| st.done.contains(&(s, id.clone()))) {
            // Read again before its removal committed: delivered already.
            return Shown::Yes;
        }
        let written = st.broadcast(&line);
        match seq {
            // Not in the inbox (nothing to keep it by): best effort.
            None => Shown::Yes,
            Some(s) if written && !self.manual_ack => {
                st.done.insert((s, id));
                Shown::Yes
            }
            Some(s) => {
                st.pending.insert(s, Pending { id, line });
                Shown::Later
            }
        }
    }

    /// A device of the contact confirmed message `id` (hex): wakes the
    /// `send` calls waiting for it.
    pub fn receipt(&self, id: String, device: String) {
        let mut r = self.receipts.lock().unwrap_or_else(PoisonError::into_inner);
        r.push_back((id, device));
        while r.len() > RECEIPTS_KEPT {
            r.pop_front();
        }
        self.receipt_came.notify_all();
    }

    /// Waits until a receipt for message `id` (hex) comes or `deadline`
    /// passes; the device that sent it.
    pub fn wait_receipt(&self, id: &str, deadline: Instant) -> Option<String> {
        let mut r = self.receipts.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((_, d)) = r.iter().find(|(i, _)| i == id) {
                return Some(d.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            r = self
                .receipt_came
                .wait_timeout(r, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Any other notification: to the subscribers connected now, not kept.
    pub fn notify(&self, line: &str) {
        self.state().broadcast(line);
    }

    /// Subscribes `conn` (once) and writes it every pending message, oldest
    /// first, before anything newer. Returns how many were pending and the
    /// inbox entries now delivered (without `--manual-ack`), which the
    /// caller removes from the inbox.
    pub fn subscribe(&self, conn: &Arc<Conn>) -> (usize, Vec<u64>) {
        let mut st = self.state();
        if !st.subscribers.iter().any(|c| c.id == conn.id) {
            st.subscribers.push(conn.clone());
        }
        let count = st.pending.len();
        let mut delivered = Vec::new();
        for (seq, p) in &st.pending {
            if !conn.send_line(&p.line) {
                break;
            }
            delivered.push(*seq);
        }
        if self.manual_ack || conn.manual_ack() {
            return (count, Vec::new());
        }
        st.mark_done(&delivered);
        (count, delivered)
    }

    pub fn unsubscribe(&self, conn_id: u64) {
        self.state().subscribers.retain(|c| c.id != conn_id);
    }

    /// Takes the messages with this id off the pending list; returns their
    /// inbox entries, for the caller to remove from the inbox.
    pub fn ack(&self, id: &str) -> Vec<u64> {
        let mut st = self.state();
        let seqs: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.id == id)
            .map(|(s, _)| *s)
            .collect();
        st.mark_done(&seqs);
        seqs
    }

    /// How many messages wait for a subscriber (or an `ack`).
    pub fn pending_count(&self) -> usize {
        self.state().pending.len()
    }

    pub fn manual_ack(&self) -> bool {
        self.manual_ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records lines, or fails every write.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>, bool);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.1 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(s: &Sink) -> Vec<String> {
        String::from_utf8(s.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn kept_until_a_subscriber_takes_it() {
        let hub = Hub::new(false);
        assert_eq!(hub.message(Some(1), "a".into(), "m1".into()), Shown::Later);
        let sink = Sink::default();
        let conn = Conn::new(1, Box::new(sink.clone()), None);
        assert_eq!(hub.subscribe(&conn), (1, vec![1]));
        assert_eq!(hub.message(Some(2), "b".into(), "m2".into()), Shown::Yes);
        assert_eq!(lines(&sink), ["m1", "m2"]);
        assert_eq!(hub.pending_count(), 0);
    }

    #[test]
    fn a_failed_write_keeps_the_message() {
        let hub = Hub::new(false);
        let broken = Conn::new(1, Box::new(Sink(Default::default(), true)), None);
        hub.subscribe(&broken);
        assert_eq!(hub.message(Some(7), "a".into(), "m".into()), Shown::Later);
        assert!(!broken.is_alive());
        let sink = Sink::default();
        let conn = Conn::new(2, Box::new(sink.clone()), None);
        assert_eq!(hub.subscribe(&conn), (1, vec![7]));
        assert_eq!(lines(&sink), ["m"]);
    }

    #[test]
    fn a_client_that_acknowledges_delivers_only_by_its_ack() {
        let hub = Hub::new(false);
        let sink = Sink::default();
        let conn = Conn::new(1, Box::new(sink.clone()), None);
        conn.set_manual_ack();
        assert_eq!(hub.subscribe(&conn), (0, vec![]));
        assert_eq!(hub.message(Some(4), "r".into(), "m".into()), Shown::Later);
        assert_eq!(lines(&sink), ["m"]);
        assert_eq!(hub.pending_count(), 1);
        // Another such client gets it too, and it stays pending.
        let other = Conn::new(2, Box::new(Sink::default()), None);
        other.set_manual_ack();
        assert_eq!(hub.subscribe(&other), (1, vec![]));
        assert_eq!(hub.ack("r"), vec![4]);
        assert_eq!(hub.pending_count(), 0);
    }

    #[test]
    fn manual_ack_keeps_it_until_acknowledged() {
        let hub = Hub::new(true);
        let sink = Sink::default();
        let conn = Conn::new(1, Box::new(sink.clone()), None);
        hub.subscribe(&conn);
        assert_eq!(hub.message(Some(3), "x".into(), "m".into()), Shown::Later);
        // A second delivery of the same inbox entry is not written twice.
        assert_eq!(hub.message(Some(3), "x".into(), "m".into()), Shown::Later);
        assert_eq!(lines(&sink), ["m"]);
        // Reconnecting gets it again, and nothing is removed from the inbox.
        let again = Sink::default();
        let conn2 = Conn::new(2, Box::new(again.clone()), None);
        assert_eq!(hub.subscribe(&conn2), (1, vec![]));
        assert_eq!(lines(&again), ["m"]);
        assert!(hub.ack("nope").is_empty());
        assert_eq!(hub.ack("x"), vec![3]);
        assert_eq!(hub.pending_count(), 0);
        // Read again from the inbox before its removal committed: not
        // pending again.
        assert_eq!(hub.message(Some(3), "x".into(), "m".into()), Shown::Yes);
        assert_eq!(hub.pending_count(), 0);
        // The inbox reuses a number it no longer holds: a new message.
        assert_eq!(hub.message(Some(3), "y".into(), "n".into()), Shown::Later);
        assert_eq!(hub.pending_count(), 1);
    }
}
