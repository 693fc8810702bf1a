//! Subscriptions waiting for messages: which sessions to wake when a queue
//! gets a message, or goes away.
//!
//! A SUB registers its session *before* it first looks for messages, and a
//! SEND notifies only *after* its transaction is committed. So a message
//! committed while the SUB was looking is either seen by the look or
//! triggers a wake: it is never missed. Registrations stay until the
//! session unsubscribes or ends. Tickets are opaque here; the server maps
//! them back to connections.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::store::QueueRef;

/// Called with a session's ticket, the queue, and whether the queue is gone.
pub type WakeFn = Box<dyn Fn(u64, QueueRef, bool) + Send + Sync>;

pub struct Waiters {
    map: Mutex<HashMap<QueueRef, Vec<u64>>>,
    wake: WakeFn,
}

impl Waiters {
    pub fn new(wake: WakeFn) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            wake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QueueRef, Vec<u64>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn register(&self, queue: QueueRef, ticket: u64) {
        let mut map = self.lock();
        let list = map.entry(queue).or_default();
        if !list.contains(&ticket) {
            list.push(ticket);
        }
    }

    pub fn cancel(&self, queue: QueueRef, ticket: u64) {
        let mut map = self.lock();
        if let Some(list) = map.get_mut(&queue) {
            list.retain(|t| *t != ticket);
            if list.is_empty() {
                map.remove(&queue);
            }
        }
    }

    /// Wakes every session subscribed to `queue` (they stay subscribed).
    pub fn notify(&self, queue: QueueRef) {
        let tickets = self.lock().get(&queue).cloned();
        for t in tickets.into_iter().flatten() {
            (self.wake)(t, queue, false);
        }
    }

    /// Wakes and forgets every session subscribed to `queue`: it was deleted.
    pub fn notify_gone(&self, queue: QueueRef) {
        let tickets = self.lock().remove(&queue);
        for t in tickets.into_iter().flatten() {
            (self.wake)(t, queue, true);
        }
    }

    /// Wakes every subscribed session for every queue it waits on: after
    /// a gap in the notifications from other relay nodes, any of them may
    /// have missed a message.
    pub fn wake_all(&self) {
        let all: Vec<(QueueRef, Vec<u64>)> =
            self.lock().iter().map(|(q, t)| (*q, t.clone())).collect();
        for (q, tickets) in all {
            for t in tickets {
                (self.wake)(t, q, false);
            }
        }
    }

    /// Number of registered subscriptions (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}
