//! A session's event log: the SSE events of its last streamed turn, each numbered `TURN-SEQ`,
//! written as the turn streams ([`EventLog`]) and read back by a follower that replays them and
//! then follows the live turn ([`follow`]), so a client that lost its connection picks up
//! where it stopped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::checkpoint::now_ms;
use super::{SessionKey, Sessions};
use crate::body::FrameSender;
use crate::openai::events::is_done;
use crate::openai::sse::with_id;

/// How often a replay that has caught up looks for new events.
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
    pub(super) fn start(sessions: Arc<Sessions>, key: SessionKey, turn: u64) -> Self {
        let budget = sessions.config.max_event_backlog_bytes.get().min(u32::MAX as usize);
        let backlog = Arc::new(Semaphore::new(budget));
        // Unbounded as a queue, bounded by the semaphore: every entry holds its bytes' permits.
        let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
        let task = tokio::spawn(async move {
            let mut next = 1;
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

/// Where a follower starts: the turn whose events the log holds, and the last event the
/// client has (`TURN-SEQ` from `Last-Event-ID`).
pub(crate) fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (turn, seq) = id.trim().split_once('-')?;
    Some((turn.parse().ok()?, seq.parse().ok()?))
}

/// Replays turn `turn`'s events after `last` (or from its start) into `frames`, each with its
/// `id:` line, then follows the live turn until `[DONE]`, the turn's end, or its owner's
/// lease having run out for a lease period.
pub(crate) async fn follow(
    sessions: Arc<Sessions>,
    key: SessionKey,
    turn: u64,
    last: Option<(u64, u64)>,
    tx: FrameSender,
) {
    let mut after = match last {
        Some((t, seq)) if t == turn => seq,
        _ => 0,
    };
    // A lease a moment past its end is more often a busy owner about to renew than a dead one:
    // the follower gives up only one more lease period after it (a dead owner's turn, resumed,
    // gets a new turn number anyway, which ends this follower at once).
    let grace = sessions.config.lease.as_millis() as u64;
    loop {
        let events = match sessions.events_after(&key, turn, after, 256).await {
            Ok(events) => events,
            Err(err) => {
                let _ = tx.send(Err(Box::new(err))).await;
                return;
            }
        };
        for (seq, event) in &events {
            after = *seq;
            if tx.send(Ok(Frame::data(with_id(turn, *seq, event)))).await.is_err() {
                return;
            }
            if is_done(event) {
                return;
            }
        }
        if !events.is_empty() {
            continue;
        }
        // Caught up: go on only while the turn is still being served.
        let live = match sessions.load(&key).await {
            Ok(Some(s)) => {
                s.checkpoint.stream_turn == Some(turn)
                    && s.checkpoint
                        .in_flight
                        .as_ref()
                        .is_some_and(|f| f.turn == turn && f.lease_until_ms + grace > now_ms())
            }
            _ => false,
        };
        if !live {
            // One last read: events written between the read and the load.
            if let Ok(rest) = sessions.events_after(&key, turn, after, 256).await {
                for (seq, event) in rest {
                    if tx.send(Ok(Frame::data(with_id(turn, seq, &event)))).await.is_err() {
                        return;
                    }
                }
            }
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_POLL) => {}
            () = tx.closed() => return,
        }
    }
}
