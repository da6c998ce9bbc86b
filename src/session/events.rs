//! A session's event log: the SSE events of its last streamed turn, each numbered `TURN-SEQ`,
//! written as the turn streams ([`EventLog`]) and read back by a follower that replays them and
//! then follows the live turn ([`follow`]), so a client that lost its connection picks up
//! where it stopped. The log holds the answer's events but not `[DONE]`, which a live client
//! gets only once the turn is committed: a follower sends it when it finds the commit. A
//! follower never takes a turn over itself (that needs the chat pipeline):
//! it reports why it stopped, and the sessions API decides.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::checkpoint::now_ms;
use super::{SessionKey, Sessions, Stored};
use crate::body::FrameSender;
use crate::openai::events::is_done;
use crate::openai::sse::{with_id, DONE};

/// How often a replay that has caught up looks for events another replica wrote (and at the
/// lease alone); in this process, writes wake it.
const FOLLOW_POLL: Duration = Duration::from_millis(25);

/// Writes a turn's events to the store in the background, in batches, so a slow store does not
/// hold back the client's stream event by event. The backlog waiting for the writer is bounded
/// in bytes (`sessions.max_event_backlog_bytes`): past it [`EventLog::push`] waits for the
/// store (backpressure) rather than buffering more, or dropping events a replay needs. Each
/// store write is bounded by `sessions.store_timeout`, so the wait is too.
pub struct EventLog {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    backlog: Arc<Semaphore>,
    budget: usize,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    /// A writer of `turn`'s events from number `first` on (1 starts the log afresh).
    pub(super) fn start(sessions: Arc<Sessions>, key: SessionKey, turn: u64, first: u64) -> Self {
        let budget = sessions.config.max_event_backlog_bytes.get().min(u32::MAX as usize);
        let backlog = Arc::new(Semaphore::new(budget));
        // Unbounded as a queue, bounded by the semaphore: every entry holds its bytes' permits.
        let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
        let task = tokio::spawn(async move {
            let mut next = first;
            let mut batch = Vec::with_capacity(64);
            while rx.recv_many(&mut batch, 64).await > 0 {
                let (events, permits): (Vec<Bytes>, Vec<OwnedSemaphorePermit>) = batch.drain(..).unzip();
                if let Err(err) = sessions.log_events(&key, turn, next, &events).await {
                    tracing::warn!(session = ?key, error = %err, "cannot log stream events for replay");
                }
                next += events.len() as u64;
                drop(permits);
            }
        });
        Self { tx, backlog, budget, task }
    }

    /// Queues `event` for the log, waiting while the backlog is full.
    pub async fn push(&self, event: Bytes) {
        // An event larger than the whole budget waits for an empty backlog, then goes alone.
        let wanted = event.len().clamp(1, self.budget) as u32;
        let Ok(permit) = self.backlog.clone().acquire_many_owned(wanted).await else { return };
        let _ = self.tx.send((event, permit));
    }

    /// Waits until every event pushed is written.
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// A follower's wake-up: events logged in this process under one key (see
/// [`Sessions::log_watch`]); another replica's writes are not heard, so a follower on a shared
/// store also polls.
pub(crate) struct LogWatch {
    pub(super) _gate: Arc<super::waiters::Gate>,
    pub(super) logged: tokio::sync::watch::Receiver<u64>,
}

impl LogWatch {
    /// Forgets the wake-ups so far: called before reading the log, so a write between the
    /// read and [`Self::changed`] still wakes it.
    pub(crate) fn seen(&mut self) {
        self.logged.borrow_and_update();
    }

    pub(crate) async fn changed(&mut self) {
        if self.logged.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Where a follower starts: the turn whose events the log holds, and the last event the
/// client has (`TURN-SEQ` from `Last-Event-ID`).
pub(crate) fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (turn, seq) = id.trim().split_once('-')?;
    Some((turn.parse().ok()?, seq.parse().ok()?))
}

/// How a [`follow`] ended.
pub(crate) enum Followed {
    /// `[DONE]` was sent.
    Done,
    /// The client went away.
    Gone,
    /// The turn's owner is gone (see [`Sessions::lapsed`]) and its request is stored: the
    /// caller may take it over.
    Lapsed(Box<Stored>),
    /// The log now holds another turn (the interrupted one, re-issued under a new number).
    Moved(u64),
    /// The turn ended, or cannot go on, without `[DONE]`: the caller owes the client an error.
    Ended(&'static str),
}

/// Where a follower of `turn` starts: after the client's last event of that turn (from
/// `Last-Event-ID`), else at the turn's start.
pub(crate) fn start_of(turn: u64, last: Option<(u64, u64)>) -> u64 {
    match last {
        Some((t, seq)) if t == turn => seq,
        _ => 0,
    }
}

/// Replays turn `turn`'s events after `after` into `tx`, each with its `id:` line, then follows
/// the live turn until `[DONE]` or until it stops being served. `after` moves with each event
/// sent, so a caller that follows the same turn again sends nothing twice.
pub(crate) async fn follow(
    sessions: &Arc<Sessions>,
    key: &SessionKey,
    turn: u64,
    after: &mut u64,
    tx: &FrameSender,
) -> Followed {
    let start = *after;
    // A client whose last event was a logged `[DONE]` (logs written by earlier versions hold
    // it) has the whole turn already.
    if let Some(before) = start.checked_sub(1) {
        if let Ok(last) = sessions.events_after(key, turn, before, 1).await {
            if last.first().is_some_and(|(seq, event)| *seq == start && is_done(event)) {
                return Followed::Done;
            }
        }
    }
    // Held while following, so this process's event writes and releases on the session wake us.
    let gate = sessions.waiters.gate(key);
    // When the serving turn's lease ends, as last read; `None`: read the turn's state again.
    let mut serving_until: Option<u64> = None;
    // Kept for the whole follow, so no release is missed between a read and the wait, nor
    // while a pass sends events (a fresh receiver would take a release as already seen).
    let mut logged = gate.logs();
    let mut released = gate.releases();
    loop {
        // Events logged from here on wake the wait below; earlier ones the read finds.
        logged.borrow_and_update();
        if released.has_changed().unwrap_or(true) {
            released.borrow_and_update();
            serving_until = None;
        }
        let events = match sessions.events_after(key, turn, *after, 256).await {
            Ok(events) => events,
            Err(_) => return Followed::Ended("the session store is unavailable"),
        };
        for (seq, event) in &events {
            *after = *seq;
            if tx.send(Ok(Frame::data(with_id(turn, *seq, event)))).await.is_err() {
                return Followed::Gone;
            }
            if is_done(event) {
                return Followed::Done;
            }
        }
        if !events.is_empty() {
            continue;
        }
        // Caught up: go on only while the turn is still being served. The checkpoint is read
        // when that is unknown (first, after a release, once the lease it showed has ended), not
        // on every wake.
        let until = match serving_until.filter(|until| *until > now_ms()) {
            Some(until) => until,
            None => match serving(sessions, key, turn, after, tx).await {
                Ok(until) => *serving_until.insert(until),
                Err(end) => return end,
            },
        };
        let lease_end = tokio::time::Instant::now() + Duration::from_millis(until.saturating_sub(now_ms()));
        tokio::select! {
            _ = logged.changed() => {}
            _ = released.changed() => serving_until = None,
            () = tokio::time::sleep_until(lease_end) => serving_until = None,
            // Another replica may be the one serving: its writes and release are not heard
            // here, so look at the log and the lease alone now and then.
            () = tokio::time::sleep(FOLLOW_POLL), if sessions.store.shared() => {
                match sessions.lease_until(key).await {
                    Ok(Some(until)) if until > now_ms() => serving_until = Some(until),
                    _ => serving_until = None,
                }
            }
            () = tx.closed() => return Followed::Gone,
        }
    }
}

/// Reads whether `turn` is still being served: `Ok` with the end of its owner's lease when it
/// is; otherwise how the follow ends (after sending events written meanwhile).
async fn serving(
    sessions: &Arc<Sessions>,
    key: &SessionKey,
    turn: u64,
    after: &mut u64,
    tx: &FrameSender,
) -> Result<u64, Followed> {
    let stored = match sessions.load(key).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(Followed::Ended("the session no longer exists")),
        Err(_) => return Err(Followed::Ended("the session store is unavailable")),
    };
    match stored.checkpoint.stream_turn {
        Some(t) if t != turn => return Err(Followed::Moved(t)),
        _ => {}
    }
    let Some(f) = stored.checkpoint.in_flight.as_ref().filter(|f| f.turn == turn) else {
        if let Some(end) = catch_up(sessions, key, turn, after, tx).await {
            return Err(end);
        }
        if stored.checkpoint.stream_committed != Some(turn) {
            return Err(Followed::Ended("the turn ended without completing its answer"));
        }
        return Err(committed(sessions, key, turn, *after, tx).await);
    };
    if !sessions.lapsed(f, now_ms()) {
        return Ok(f.lease_until_ms);
    }
    // Events written between the read and the load come first.
    if let Some(end) = catch_up(sessions, key, turn, after, tx).await {
        return Err(end);
    }
    if f.request.is_none() {
        return Err(Followed::Ended("the gateway serving the turn stopped"));
    }
    Err(Followed::Lapsed(Box::new(stored)))
}

/// Ends the follow of a committed turn whose logged events were all sent, with `[DONE]`
/// numbered after them, unless the client's last event was past the log: that was `[DONE]`.
async fn committed(
    sessions: &Arc<Sessions>,
    key: &SessionKey,
    turn: u64,
    after: u64,
    tx: &FrameSender,
) -> Followed {
    if let Some(before) = after.checked_sub(1) {
        match sessions.events_after(key, turn, before, 1).await {
            Ok(last) if last.first().is_some_and(|(seq, _)| *seq == after) => {}
            Ok(_) => return Followed::Done,
            Err(_) => return Followed::Ended("the session store is unavailable"),
        }
    }
    if tx.send(Ok(Frame::data(with_id(turn, after + 1, DONE)))).await.is_err() {
        return Followed::Gone;
    }
    Followed::Done
}

/// Sends the events logged after `after`; `Some` when that ended the follow (`[DONE]`, the
/// client gone).
async fn catch_up(
    sessions: &Arc<Sessions>,
    key: &SessionKey,
    turn: u64,
    after: &mut u64,
    tx: &FrameSender,
) -> Option<Followed> {
    loop {
        let rest = sessions.events_after(key, turn, *after, 256).await.ok()?;
        if rest.is_empty() {
            return None;
        }
        for (seq, event) in rest {
            *after = seq;
            if tx.send(Ok(Frame::data(with_id(turn, seq, &event)))).await.is_err() {
                return Some(Followed::Gone);
            }
            if is_done(&event) {
                return Some(Followed::Done);
            }
        }
    }
}
