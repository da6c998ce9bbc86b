//! [`Holder`]: a session admitted for one turn. It holds the in-flight marker (with its lease
//! and the upstream request), renews the lease while the turn runs, and commits or releases
//! the session at the end. Every write is a compare-and-set on the version it last wrote.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::error::GatewayError;
use crate::openai::answer::Answer;
use crate::session::checkpoint::now_ms;
use crate::session::{Checkpoint, Commit, InFlight, SessionKey, Sessions, StoreError, Stored, StoredRequest};
use crate::telemetry::{Metrics, OpLabel, OutcomeLabel};

pub struct Holder {
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub key: SessionKey,
    /// The version last written by this holder.
    pub version: u64,
    /// The turn's id (the version its admission created); names its events.
    pub turn: u64,
    pub checkpoint: Checkpoint,
    /// State changes of the turn's tool tasks, written into the checkpoint as they come.
    task_updates: Option<tokio::sync::mpsc::UnboundedReceiver<crate::tools::record::TaskEntry>>,
}

/// The outcome of an admission attempt.
pub enum Admitted<T> {
    Turn(Holder, T),
    /// A dead owner's turn is still marked in flight with its request: it should be resumed
    /// before the session takes a new one.
    Interrupted(Stored),
}

impl Holder {
    /// Marks the session in flight for a new turn. `prepare` composes the turn from the
    /// current checkpoint (it may change it) and returns the upstream request to record; it
    /// runs again if another writer got in first. While a live marker is held by someone
    /// else, waits up to `sessions.busy_timeout`, then 409 `session_busy`.
    pub async fn admit<T>(
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        key: SessionKey,
        request_id: &str,
        mut prepare: impl FnMut(&mut Checkpoint) -> Result<(T, Option<StoredRequest>), GatewayError>,
    ) -> Result<Admitted<T>, GatewayError> {
        let deadline = Instant::now() + sessions.config.busy_timeout;
        loop {
            let loaded = timed(&metrics, "load", sessions.store.load(&key)).await?;
            let now = now_ms();
            let (version, mut checkpoint) = match loaded {
                Some(stored) => {
                    if let Some(in_flight) = &stored.checkpoint.in_flight {
                        if in_flight.lease_until_ms <= now && in_flight.request.is_some() {
                            return Ok(Admitted::Interrupted(stored));
                        }
                    }
                    (stored.version, stored.checkpoint)
                }
                None => (0, Checkpoint::new(now)),
            };
            if checkpoint.in_flight.as_ref().is_some_and(|f| f.lease_until_ms > now) {
                if Instant::now() >= deadline {
                    metrics.session_busy.inc();
                    return Err(GatewayError::SessionBusy { id: key.id.clone() });
                }
                tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(..10))).await;
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
            match timed(&metrics, "commit", sessions.store.commit(&key, version, &checkpoint.encode()))
                .await?
            {
                Commit::Committed(version) => {
                    let holder =
                        Self { sessions, metrics, key, version, turn, checkpoint, task_updates: None };
                    return Ok(Admitted::Turn(holder, prepared));
                }
                // Someone admitted first; look again.
                Commit::Conflict(_) => continue,
            }
        }
    }

    /// Takes over an interrupted turn whose owner's lease expired. `None` if another process
    /// took it first or the session moved on.
    pub async fn take_over(
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        key: SessionKey,
        stored: Stored,
    ) -> Result<Option<(Holder, StoredRequest)>, GatewayError> {
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
        match timed(&metrics, "commit", sessions.store.commit(&key, version, &checkpoint.encode())).await? {
            Commit::Committed(version) => Ok(Some((
                Self { sessions, metrics, key, version, turn, checkpoint, task_updates: None },
                request,
            ))),
            Commit::Conflict(_) => Ok(None),
        }
    }

    /// Extends the lease. A lost lease (someone took the session over) is logged; the turn
    /// still answers its client, but its commit will conflict.
    async fn renew(&mut self) {
        let Some(in_flight) = self.checkpoint.in_flight.as_mut() else { return };
        in_flight.lease_until_ms = now_ms() + self.sessions.config.lease.as_millis() as u64;
        let encoded = self.checkpoint.encode();
        let commit = self.sessions.store.commit(&self.key, self.version, &encoded);
        match timed(&self.metrics, "commit", commit).await {
            Ok(Commit::Committed(version)) => self.version = version,
            Ok(Commit::Conflict(_)) => {
                tracing::warn!(session = ?self.key, "session lease lost to another request")
            }
            Err(err) => tracing::warn!(session = ?self.key, error = %err, "session lease renewal failed"),
        }
    }

    /// A task log for this turn's tool calls; its updates are committed while the turn runs.
    pub fn task_log(&mut self) -> std::sync::Arc<crate::tools::tasks::TaskLog> {
        let request_id = self.checkpoint.in_flight.as_ref().map(|f| f.request_id.clone()).unwrap_or_default();
        let record = crate::tools::record::ToolRecord::from_raw(self.checkpoint.tools.as_deref());
        let (log, updates) = crate::tools::tasks::TaskLog::new(&request_id, record.tasks);
        self.task_updates = Some(updates);
        std::sync::Arc::new(log)
    }

    /// Runs `future`, renewing the lease every third of it meanwhile, and committing task
    /// updates as they arrive.
    pub async fn while_renewing<F: std::future::Future>(&mut self, future: F) -> F::Output {
        let period = self.sessions.config.lease / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(future);
        loop {
            let update = async {
                match self.task_updates.as_mut() {
                    Some(updates) => updates.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                output = &mut future => return output,
                _ = tick.tick() => self.renew().await,
                Some(entry) = update => {
                    let mut record = crate::tools::record::ToolRecord::from_raw(self.checkpoint.tools.as_deref());
                    record.upsert(entry);
                    self.checkpoint.tools = record.to_raw();
                    self.renew().await;
                }
            }
        }
    }

    /// Applies task updates not yet written (the commit that follows writes them).
    fn drain_task_updates(&mut self) {
        let Some(updates) = self.task_updates.as_mut() else { return };
        let mut record = crate::tools::record::ToolRecord::from_raw(self.checkpoint.tools.as_deref());
        let mut any = false;
        while let Ok(entry) = updates.try_recv() {
            record.upsert(entry);
            any = true;
        }
        if any {
            self.checkpoint.tools = record.to_raw();
        }
    }

    /// Clears the marker, and with an answer appends the turn: the conversation sent upstream
    /// and the assistant's message. Returns the committed version.
    pub async fn finish(mut self, turn: Option<(Vec<Box<RawValue>>, Answer)>) -> Option<u64> {
        self.drain_task_updates();
        self.checkpoint.in_flight = None;
        self.checkpoint.updated_ms = now_ms();
        if let Some((mut messages, answer)) = turn {
            messages.push(answer.message);
            self.checkpoint.transcript = messages;
            let usage = &mut self.checkpoint.usage;
            usage.requests += 1;
            if let Some(u) = answer.usage {
                usage.prompt_tokens += u.prompt_tokens;
                usage.completion_tokens += u.completion_tokens;
                usage.cached_tokens += u.cached_tokens();
            }
        }
        let encoded = self.checkpoint.encode();
        let commit = self.sessions.store.commit(&self.key, self.version, &encoded);
        let outcome = match timed(&self.metrics, "commit", commit).await {
            Ok(Commit::Committed(version)) => {
                self.metrics.checkpoint_bytes.observe(encoded.len() as f64);
                self.metrics.session_commits.get_or_create(&OutcomeLabel { outcome: "committed" }).inc();
                return Some(version);
            }
            Ok(Commit::Conflict(_)) => "conflict",
            Err(_) => "error",
        };
        tracing::warn!(session = ?self.key, outcome, "session turn was not committed");
        self.metrics.session_commits.get_or_create(&OutcomeLabel { outcome }).inc();
        None
    }
}

/// Runs a store operation, recording its latency; failures become `SessionStore` errors.
pub async fn timed<T>(
    metrics: &Metrics,
    op: &'static str,
    future: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, GatewayError> {
    let started = Instant::now();
    let result = future.await;
    metrics.session_store_duration.get_or_create(&OpLabel { op }).observe(started.elapsed().as_secs_f64());
    result.map_err(|err| {
        metrics.session_store_errors.inc();
        GatewayError::SessionStore(err)
    })
}
