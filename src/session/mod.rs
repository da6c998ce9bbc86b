//! Sessions: conversations that survive client disconnects and gateway restarts, checkpointed
//! in a [`SessionStore`] (an embedded redb file by default, or Redis shared by replicas).
//!
//! This module owns the session protocol: identity (which session a request names,
//! [`identify`]; its [`SessionKey`], scoped to the caller's credential), the checkpoint format, the stores (reached only through [`Sessions`], which
//! times every operation), the lease that admits, renews and commits a turn ([`lease`]), the
//! stream event log and its replay ([`events`]), and the typed blobs kept beside the sessions
//! ([`BlobKind`]). It does not
//! speak HTTP, and it knows nothing of compression or tools: their parts of a checkpoint are
//! opaque JSON here.

pub mod checkpoint;
pub mod embedded;
pub(crate) mod events;
mod identity;
pub(crate) mod lease;
pub mod redis;
pub mod store;
mod waiters;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;

pub use checkpoint::{Checkpoint, GoalLock, InFlight, OnGoalConflict, StoredRequest, UsageTotals};
pub use identity::{identify, Identity};
pub use lease::{Admitted, Lease, NotCommitted};
pub use store::{Commit, SessionKey, SessionStore, StoreError, Stored};

use crate::config::SessionConfig;
use crate::error::GatewayError;
use crate::telemetry::{Metrics, OpLabel};

/// The session store in use and the settings around it. The store is reached only through
/// this type's methods, each timed into `ctxgate_session_store_duration_seconds{op}` (failures
/// into `ctxgate_session_store_errors_total`), so no call site can skip the instrumentation.
#[derive(Debug)]
pub struct Sessions {
    store: Arc<dyn SessionStore>,
    pub config: SessionConfig,
    /// This process's identity in in-flight markers: random per start, so a restarted process
    /// never mistakes a dead predecessor's marker for its own.
    pub owner: String,
    /// The store is this process's alone (the embedded file, locked while open): every
    /// marker another process wrote is a dead one's, lapsed whatever its lease says.
    exclusive: bool,
    metrics: Arc<Metrics>,
    /// Requests waiting for busy sessions in this process.
    waiters: waiters::Waiters,
}

/// What is kept beside the sessions, each kind under its own key namespace. Values expire with
/// the session TTL after their last write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// The frozen compaction epoch of a conversation without a session.
    CompressionState,
    /// A state sheet written in the background, waiting for the epoch that places it.
    Sheet,
    /// An original a marker names, kept for `ctxgate_expand` (stateless callers; a session's
    /// transcript holds its own).
    Original,
    /// A stored Responses API response: the object, its input items, and the conversation a
    /// `previous_response_id` continues.
    Response,
}

/// The key of the event log kept beside blob `key` of `kind` (a background response's stream
/// events): its storage key is the blob's own, so it expires with the blob (Redis: the TTL
/// set on each append; the embedded store: its sweep drops the two together), and no session
/// key (its scope is hex) can name it.
pub(crate) fn blob_log(kind: BlobKind, key: &SessionKey) -> SessionKey {
    SessionKey { scope: format!("{}{}", kind.prefix(), key.scope), id: key.id.clone() }
}

impl BlobKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::CompressionState => "cmp:",
            Self::Sheet => "sum:",
            Self::Original => "orig:",
            Self::Response => "resp:",
        }
    }
}

impl Sessions {
    /// Opens the configured store: `embedded:PATH` or a Redis URL.
    pub async fn open(config: &SessionConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let exclusive = config.store.starts_with("embedded:");
        let store: Arc<dyn SessionStore> = match config.store.strip_prefix("embedded:") {
            Some(path) => {
                let store = Arc::new(embedded::EmbeddedStore::open(Path::new(path), config.ttl)?);
                embedded::spawn_sweeper(&store, config.sweep_interval);
                store
            }
            None => Arc::new(
                redis::RedisStore::connect(
                    &config.store,
                    &config.key_prefix,
                    config.ttl,
                    config.store_timeout,
                )
                .await?,
            ),
        };
        let owner = format!("{:016x}", fastrand::u64(..));
        Ok(Self {
            store,
            config: config.clone(),
            owner,
            exclusive,
            metrics,
            waiters: waiters::Waiters::default(),
        })
    }

    /// Whether a turn's owner is gone: its lease ran out, or (on a store only this process
    /// opens) another process wrote the marker. A lapsed turn may be taken over.
    pub fn lapsed(&self, in_flight: &InFlight, now_ms: u64) -> bool {
        in_flight.lease_until_ms <= now_ms || (self.exclusive && in_flight.owner != self.owner)
    }

    /// Whether the takeover sweep should keep looking (Redis, where replicas die while this
    /// process runs) or look once at start-up (the embedded store, whose only writer is this
    /// process from then on).
    pub fn shared(&self) -> bool {
        !self.exclusive
    }

    /// Sessions whose turn any process may re-issue and whose owner is gone, up to `limit`.
    pub(crate) async fn lapsed_turns(&self, limit: usize) -> Result<Vec<SessionKey>, StoreError> {
        // On an exclusive store every marker present at start-up is a dead process's.
        let now = if self.exclusive { u64::MAX } else { checkpoint::now_ms() };
        self.timed("lapsed", self.store.lapsed(now, limit)).await
    }

    /// Drops a session the sweep found not in flight from the in-flight index.
    pub(crate) async fn unindex(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.timed("unindex", self.store.unindex(key)).await
    }

    /// The session a request names ([`identify`]).
    pub fn identify(
        &self,
        headers: &HeaderMap,
        prompt_cache_key: Option<&str>,
        scoped: bool,
    ) -> Result<Option<Identity>, GatewayError> {
        identify(&self.config, headers, prompt_cache_key, scoped)
    }

    pub async fn get_blob(&self, kind: BlobKind, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.timed("get_blob", self.store.get_blob(&format!("{}{key}", kind.prefix()))).await
    }

    pub async fn put_blob(&self, kind: BlobKind, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.timed("put_blob", self.store.put_blob(&format!("{}{key}", kind.prefix()), value)).await
    }

    /// Writes several values of one kind at once (one transaction or pipeline).
    pub async fn put_blobs(&self, kind: BlobKind, items: Vec<(String, Bytes)>) -> Result<(), StoreError> {
        let items: Vec<(String, Bytes)> =
            items.into_iter().map(|(k, v)| (format!("{}{k}", kind.prefix()), v)).collect();
        self.timed("put_blob", self.store.put_blobs(&items)).await
    }

    pub async fn load(&self, key: &SessionKey) -> Result<Option<Stored>, StoreError> {
        self.timed("load", self.store.load(key)).await
    }

    pub async fn delete(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let deleted = self.timed("delete", self.store.delete(key)).await;
        self.waiters.release(key);
        deleted
    }

    /// When the session's turn lease ends (0: free), without reading the checkpoint; `None`
    /// when the store cannot tell cheaply.
    async fn lease_until(&self, key: &SessionKey) -> Result<Option<u64>, StoreError> {
        self.timed("lease", self.store.lease_until(key)).await
    }

    /// Reachability, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.store.ping()).await
    }

    /// Up to `limit` events of `turn` after `after`, in order.
    pub(crate) async fn events_after(
        &self,
        key: &SessionKey,
        turn: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        self.timed("read_events", self.store.read_events(key, turn, after, limit)).await
    }

    /// A writer of `turn`'s events in the log `key` (a session's, or a [`blob_log`]), from
    /// number `first` on.
    pub(crate) fn event_log(self: &Arc<Self>, key: SessionKey, turn: u64, first: u64) -> events::EventLog {
        events::EventLog::start(self.clone(), key, turn, first)
    }

    /// Wakes on each batch of events this process logs under `key` from now on.
    pub(crate) fn log_watch(&self, key: &SessionKey) -> events::LogWatch {
        let gate = self.waiters.gate(key);
        let logged = gate.logs();
        events::LogWatch { _gate: gate, logged }
    }

    /// Appends `batch` as events `first..` of `turn`.
    pub(crate) async fn log_events(
        &self,
        key: &SessionKey,
        turn: u64,
        first: u64,
        batch: &[Bytes],
    ) -> Result<(), StoreError> {
        self.timed("append_events", self.store.append_events(key, turn, first, batch)).await?;
        self.waiters.logged(key);
        Ok(())
    }

    /// The compare-and-set behind every checkpoint write ([`Lease`] is its only caller).
    async fn commit(
        &self,
        key: &SessionKey,
        expected: u64,
        checkpoint: &checkpoint::Encoded,
    ) -> Result<Commit, StoreError> {
        self.timed("commit", self.store.commit(key, expected, checkpoint)).await
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = operation.await;
        let duration = self.metrics.session_store_duration.get_or_create(&OpLabel { op }).clone();
        duration.observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.session_store_errors.inc();
        }
        result
    }
}

/// Checks a session id: 1 to 128 visible ASCII characters.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(valid_id("sess-42"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(129)));
        assert!(!valid_id("has space"));
        assert!(!valid_id("naïve"));
    }
}
