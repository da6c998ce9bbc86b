//! [`Lease`]: a session admitted for one turn, the heart of the session protocol. It holds the
//! in-flight marker (with its lease and the upstream request), renews the lease while the turn
//! runs, and commits or releases the session at the end. Every write is a compare-and-set on
//! the version it last wrote, and only this type writes checkpoints of live sessions: callers
//! change a checkpoint through its intent methods.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::checkpoint::now_ms;
use super::events::EventLog;
use super::{Checkpoint, Commit, GoalLock, InFlight, SessionKey, Sessions, Stored, StoredRequest};
use crate::error::GatewayError;
use crate::openai::Usage;
use crate::telemetry::OutcomeLabel;

/// A change to the checkpoint made while the turn runs (a tool task's new state), written with
/// the next lease renewal or the commit.
pub(crate) type Amendment = Box<dyn FnOnce(&mut Checkpoint) + Send>;

pub struct Lease {
    sessions: Arc<Sessions>,
    key: SessionKey,
    /// The version last written by this lease.
    version: u64,
    /// The turn's id (the version its admission created); names its events.
    turn: u64,
    checkpoint: Checkpoint,
    amendments: mpsc::UnboundedReceiver<Amendment>,
    amender: mpsc::UnboundedSender<Amendment>,
}

/// The outcome of an admission attempt.
pub enum Admitted<T> {
    Turn(Lease, T),
    /// A dead owner's turn is still marked in flight with its request: it should be resumed
    /// before the session takes a new one.
    Interrupted(Stored),
}

impl Lease {
    fn new(
        sessions: Arc<Sessions>,
        key: SessionKey,
        version: u64,
        turn: u64,
        checkpoint: Checkpoint,
    ) -> Self {
        let (amender, amendments) = mpsc::unbounded_channel();
        Self { sessions, key, version, turn, checkpoint, amendments, amender }
    }

    /// Marks the session in flight for a new turn. `prepare` composes the turn from the
    /// current checkpoint (it may change it) and returns the upstream request to record; it
    /// runs again if another writer got in first. While a live marker is held by someone
    /// else, waits up to `sessions.busy_timeout`, then 409 `session_busy`.
    ///
    /// Waiting reads nothing: admissions on one session queue in this process (only the first
    /// reads the checkpoint), and the first sleeps until the turn is released here, its lease
    /// runs out, or (on a store replicas share) a poll of the lease alone finds it free.
    pub async fn admit<T>(
        sessions: Arc<Sessions>,
        key: SessionKey,
        request_id: &str,
        mut prepare: impl FnMut(&mut Checkpoint) -> Result<(T, Option<StoredRequest>), GatewayError>,
    ) -> Result<Admitted<T>, GatewayError> {
        let deadline = tokio::time::Instant::now() + sessions.config.busy_timeout;
        let busy = |sessions: &Sessions| {
            sessions.metrics.session_busy.inc();
            GatewayError::SessionBusy { id: key.id.clone() }
        };
        let gate = sessions.waiters.gate(&key);
        let Ok(_head) = tokio::time::timeout_at(deadline, gate.head()).await else {
            return Err(busy(&sessions));
        };
        loop {
            let mut released = gate.releases();
            let loaded = sessions.load(&key).await?;
            let now = now_ms();
            let (version, mut checkpoint) = match loaded {
                Some(stored) => {
                    if let Some(in_flight) = &stored.checkpoint.in_flight {
                        if sessions.lapsed(in_flight, now) && in_flight.request.is_some() {
                            return Ok(Admitted::Interrupted(stored));
                        }
                    }
                    (stored.version, stored.checkpoint)
                }
                None => (0, Checkpoint::new(now)),
            };
            if let Some(held_until) =
                checkpoint.in_flight.as_ref().filter(|f| !sessions.lapsed(f, now)).map(|f| f.lease_until_ms)
            {
                if tokio::time::Instant::now() >= deadline {
                    return Err(busy(&sessions));
                }
                let lease_end =
                    tokio::time::Instant::now() + Duration::from_millis(held_until.saturating_sub(now));
                tokio::select! {
                    _ = released.changed() => {}
                    () = tokio::time::sleep_until(lease_end.min(deadline)) => {}
                    () = released_elsewhere(&sessions, &key), if sessions.store.shared() => {}
                }
                continue;
            }
            let (prepared, request) = prepare(&mut checkpoint)?;
            let turn = version + 1;
            if request.as_ref().is_some_and(|r| r.stream) {
                checkpoint.stream_turn = Some(turn);
            }
            checkpoint.in_flight = Some(InFlight {
                request_id: request_id.to_string(),
                owner: sessions.owner.clone(),
                lease_until_ms: now + sessions.config.lease.as_millis() as u64,
                started_ms: now,
                turn,
                request,
            });
            match sessions.commit(&key, version, &checkpoint.encode()).await? {
                Commit::Committed(version) => {
                    let lease = Self::new(sessions, key, version, turn, checkpoint);
                    return Ok(Admitted::Turn(lease, prepared));
                }
                // Someone admitted first; look again.
                Commit::Conflict(_) => continue,
            }
        }
    }

    /// Admits the session for a change that is not a turn (a goal lock): no upstream request
    /// is recorded. An interrupted turn is handed back for the caller to resume first.
    pub async fn admit_update(
        sessions: Arc<Sessions>,
        key: SessionKey,
    ) -> Result<Admitted<()>, GatewayError> {
        Self::admit(sessions, key, "update", |_| Ok(((), None))).await
    }

    /// Takes over an interrupted turn whose owner's lease expired. `None` if another process
    /// took it first or the session moved on.
    pub async fn take_over(
        sessions: Arc<Sessions>,
        key: SessionKey,
        stored: Stored,
    ) -> Result<Option<(Lease, StoredRequest)>, GatewayError> {
        let Stored { version, mut checkpoint } = stored;
        let Some(mut in_flight) = checkpoint.in_flight.take() else { return Ok(None) };
        let Some(request) = in_flight.request.clone() else { return Ok(None) };
        let now = now_ms();
        let turn = version + 1;
        in_flight.owner = sessions.owner.clone();
        in_flight.lease_until_ms = now + sessions.config.lease.as_millis() as u64;
        in_flight.turn = turn;
        if request.stream {
            checkpoint.stream_turn = Some(turn);
        }
        checkpoint.in_flight = Some(in_flight);
        match sessions.commit(&key, version, &checkpoint.encode()).await? {
            Commit::Committed(version) => {
                Ok(Some((Self::new(sessions, key, version, turn, checkpoint), request)))
            }
            Commit::Conflict(_) => Ok(None),
        }
    }

    pub fn key(&self) -> &SessionKey {
        &self.key
    }

    /// The version this lease last wrote.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The turn's id: the version its admission created.
    pub fn turn(&self) -> u64 {
        self.turn
    }

    /// The checkpoint as it will be committed.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The request id that admitted the turn (a resumed turn keeps its original one).
    pub fn request_id(&self) -> &str {
        self.checkpoint.in_flight.as_ref().map_or("", |f| f.request_id.as_str())
    }

    /// Locks (or with `None` unlocks) the session's goal; returns the previous lock.
    pub fn set_goal(&mut self, goal: Option<GoalLock>) -> Option<GoalLock> {
        std::mem::replace(&mut self.checkpoint.goal, goal)
    }

    /// Replaces the checkpoint's gateway-tool record (opaque to sessions).
    pub fn set_tools(&mut self, tools: Option<Box<RawValue>>) {
        self.checkpoint.tools = tools;
    }

    /// A handle that changes the checkpoint while the turn runs, from other tasks; each change
    /// is written with the next renewal or the commit.
    pub fn amender(&self) -> mpsc::UnboundedSender<Amendment> {
        self.amender.clone()
    }

    /// A writer for this turn's stream events, for replay.
    pub fn event_log(&self) -> EventLog {
        EventLog::start(self.sessions.clone(), self.key.clone(), self.turn, 1)
    }

    /// Extends the lease. A lost lease (someone took the session over) is logged; the turn
    /// still answers its client, but its commit will conflict.
    async fn renew(&mut self) {
        let Some(in_flight) = self.checkpoint.in_flight.as_mut() else { return };
        in_flight.lease_until_ms = now_ms() + self.sessions.config.lease.as_millis() as u64;
        let encoded = self.checkpoint.encode();
        match self.sessions.commit(&self.key, self.version, &encoded).await {
            Ok(Commit::Committed(version)) => self.version = version,
            Ok(Commit::Conflict(_)) => {
                tracing::warn!(session = ?self.key, "session lease lost to another request")
            }
            Err(err) => tracing::warn!(session = ?self.key, error = %err, "session lease renewal failed"),
        }
    }

    /// Runs `future`, renewing the lease every third of it meanwhile, and writing amendments
    /// as they arrive.
    pub async fn while_renewing<F: Future>(&mut self, future: F) -> F::Output {
        let period = self.sessions.config.lease / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return output,
                _ = tick.tick() => self.renew().await,
                Some(amend) = self.amendments.recv() => {
                    amend(&mut self.checkpoint);
                    self.renew().await;
                }
            }
        }
    }

    /// Clears the marker, and with a turn records it: the transcript it leaves (the
    /// conversation and the answer) and the turn's usage. Returns the committed version.
    pub async fn finish(
        mut self,
        turn: Option<(Vec<Box<RawValue>>, Option<Usage>)>,
    ) -> Result<u64, NotCommitted> {
        while let Ok(amend) = self.amendments.try_recv() {
            amend(&mut self.checkpoint);
        }
        self.checkpoint.in_flight = None;
        self.checkpoint.updated_ms = now_ms();
        if let Some((transcript, answer_usage)) = turn {
            self.checkpoint.transcript = transcript;
            if self.checkpoint.stream_turn == Some(self.turn) {
                self.checkpoint.stream_committed = Some(self.turn);
            }
            let usage = &mut self.checkpoint.usage;
            usage.requests += 1;
            if let Some(u) = answer_usage {
                usage.prompt_tokens += u.prompt_tokens;
                usage.completion_tokens += u.completion_tokens;
                usage.cached_tokens += u.cached_tokens();
            }
        }
        let encoded = self.checkpoint.encode();
        // The transcript can hold a large answer: free it before the store copies the document.
        let Self { sessions, key, version, .. } = self;
        let metrics = &sessions.metrics;
        let committed = sessions.commit(&key, version, &encoded).await;
        // Whatever the outcome, this turn no longer holds the session.
        sessions.waiters.release(&key);
        let failure = match committed {
            Ok(Commit::Committed(version)) => {
                metrics.checkpoint_bytes.observe(encoded.len() as f64);
                metrics.session_commits.get_or_create(&OutcomeLabel { outcome: "committed" }).inc();
                return Ok(version);
            }
            Ok(Commit::Conflict(_)) => NotCommitted::Conflict,
            Err(err) => NotCommitted::Store(err),
        };
        let outcome = match failure {
            NotCommitted::Conflict => "conflict",
            NotCommitted::Store(_) => "error",
        };
        tracing::warn!(session = ?key, outcome, "session turn was not committed");
        metrics.session_commits.get_or_create(&OutcomeLabel { outcome }).inc();
        Err(failure)
    }
}

/// Why a lease's final write did not happen.
#[derive(Debug)]
pub enum NotCommitted {
    /// The session moved on without this turn: it was deleted, or another process took the
    /// turn over after this one's lease ran out.
    Conflict,
    /// The store failed (or timed out): whether the session holds the turn is unknown.
    Store(super::StoreError),
}

impl NotCommitted {
    /// The error a client of session `id` gets for it.
    pub(crate) fn into_error(self, id: &str) -> GatewayError {
        match self {
            Self::Conflict => GatewayError::SessionConflict { id: id.to_string() },
            Self::Store(err) => err.into(),
        }
    }
}

/// How often a request waiting on a session that replicas share polls its lease.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Resolves once the session's lease, polled alone, is free or has run out (released by another
/// replica), or cannot be read cheaply or at all (the caller then reads the checkpoint).
async fn released_elsewhere(sessions: &Sessions, key: &SessionKey) {
    loop {
        tokio::time::sleep(LEASE_POLL + Duration::from_millis(fastrand::u64(..10))).await;
        match sessions.lease_until(key).await {
            Ok(Some(until)) if until > now_ms() => continue,
            _ => return,
        }
    }
}
