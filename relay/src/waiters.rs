//! Long-poll waiters: which parked FETCH requests to wake when a queue gets a
//! message.
//!
//! A FETCH registers its ticket *before* it looks for a message, and a SEND
//! notifies only *after* its transaction is committed. So a message committed
//! while the FETCH was looking is either seen by the look or triggers a wake:
//! it is never missed. Tickets are opaque to this module; the server maps
//! them back to connections.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::store::QueueRef;

/// Called with a ticket when its queue may have a message.
pub type WakeFn = Box<dyn Fn(u64) + Send + Sync>;

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

    pub fn register(&self, queue: QueueRef, ticket: u64) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(queue).or_default();
        if !list.contains(&ticket) {
            list.push(ticket);
        }
    }

    pub fn cancel(&self, queue: QueueRef, ticket: u64) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = map.get_mut(&queue) {
            list.retain(|t| *t != ticket);
            if list.is_empty() {
                map.remove(&queue);
            }
        }
    }

    /// Wakes (and forgets) every waiter on `queue`.
    pub fn notify(&self, queue: QueueRef) {
        let tickets = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&queue);
        for t in tickets.into_iter().flatten() {
            (self.wake)(t);
        }
    }

    /// Number of registered waiters (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }
}
