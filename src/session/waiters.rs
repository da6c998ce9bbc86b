//! [`Waiters`]: requests waiting for a busy session, without reading its checkpoint.
//!
//! Per session key (in this process) there is one [`Gate`]: admissions queue on it in arrival
//! order, so only its head reads the checkpoint; the head then sleeps until the turn holding
//! the session is released (announced in-process by the lease that finished), the lease's end
//! (an owner that died), or, on a store other processes write (Redis), until a poll of the
//! lease alone, never the checkpoint, says it is free. Followers of the session's stream hold
//! the gate too, to hear of events this process logs. The gate is dropped with its last user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{watch, Mutex as AsyncMutex, MutexGuard};

use super::SessionKey;

#[derive(Debug, Default)]
pub(crate) struct Waiters {
    gates: Mutex<HashMap<SessionKey, Weak<Gate>>>,
}

#[derive(Debug)]
pub(crate) struct Gate {
    /// Held by the one admission that reads the session; the others queue here (FIFO).
    queue: AsyncMutex<()>,
    /// Bumped each time a turn on the session ends in this process.
    released: watch::Sender<u64>,
    /// Bumped each time this process logs stream events of the session (followers wake on it).
    logged: watch::Sender<u64>,
}

impl Waiters {
    /// The session's gate, shared by every admission on it in this process.
    pub(crate) fn gate(&self, key: &SessionKey) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gate) = gates.get(key).and_then(Weak::upgrade) {
            return gate;
        }
        // Forget the gates no one holds any more, now and then (amortised over insertions).
        if gates.len() >= 64 && gates.len().is_power_of_two() {
            gates.retain(|_, gate| gate.strong_count() > 0);
        }
        let gate = Arc::new(Gate {
            queue: AsyncMutex::new(()),
            released: watch::Sender::new(0),
            logged: watch::Sender::new(0),
        });
        gates.insert(key.clone(), Arc::downgrade(&gate));
        gate
    }

    /// Wakes this process's admissions waiting on `key`: its turn ended (or it was deleted).
    pub(crate) fn release(&self, key: &SessionKey) {
        if let Some(gate) = self.existing(key) {
            gate.released.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes this process's followers of `key`: more of its stream events are in the store.
    pub(crate) fn logged(&self, key: &SessionKey) {
        if let Some(gate) = self.existing(key) {
            gate.logged.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The session's gate if anyone in this process holds it (no one to wake otherwise).
    fn existing(&self, key: &SessionKey) -> Option<Arc<Gate>> {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.get(key).and_then(Weak::upgrade)
    }
}

impl Gate {
    /// Waits for this admission's turn at the head of the queue.
    pub(crate) async fn head(&self) -> MutexGuard<'_, ()> {
        self.queue.lock().await
    }

    /// A receiver that sees releases from now on: taken before reading the session, so a
    /// release between the read and the wait is not missed.
    pub(crate) fn releases(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    /// A receiver that sees events logged from now on (taken before reading the log, likewise).
    pub(crate) fn logs(&self) -> watch::Receiver<u64> {
        self.logged.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_wakes_a_receiver_taken_before_it() {
        let waiters = Waiters::default();
        let key = SessionKey::new(b"k", "s");
        let gate = waiters.gate(&key);
        let mut rx = gate.releases();
        waiters.release(&key);
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed()).await.unwrap().unwrap();
        // Another key's release wakes nothing.
        waiters.release(&SessionKey::new(b"k", "other"));
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn gates_are_shared_while_held_and_forgotten_after() {
        let waiters = Waiters::default();
        let key = SessionKey::new(b"k", "s");
        let a = waiters.gate(&key);
        assert!(Arc::ptr_eq(&a, &waiters.gate(&key)));
        drop(a);
        for i in 0..200 {
            drop(waiters.gate(&SessionKey::new(b"k", &i.to_string())));
        }
        assert!(waiters.gates.lock().unwrap().len() < 200);
    }
}
