//! Sessions: conversations that survive client disconnects and gateway restarts, checkpointed
//! in a [`SessionStore`] (an embedded redb file by default, or Redis shared by replicas).
//!
//! This module owns the session protocol: identity ([`SessionKey`], scoped to the caller's
//! credential), the checkpoint format, the stores behind a timing decorator ([`timed`]), the
//! lease that admits, renews and commits a turn ([`lease`]), the stream event log and its
//! replay ([`events`]), and the typed blobs kept beside the sessions ([`BlobKind`]). It does not
//! speak HTTP, and it knows nothing of compression or tools: their parts of a checkpoint are
//! opaque JSON here.

pub mod checkpoint;
pub mod embedded;
pub(crate) mod events;
pub(crate) mod lease;
pub mod redis;
pub mod store;
mod timed;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;

pub use checkpoint::{Checkpoint, GoalLock, InFlight, OnGoalConflict, StoredRequest, UsageTotals};
pub use lease::{Admitted, Lease};
pub use store::{Commit, SessionKey, SessionStore, StoreError, Stored};

use crate::config::SessionConfig;
use crate::error::GatewayError;
use crate::telemetry::Metrics;

/// The session store in use and the settings around it.
#[derive(Debug)]
pub struct Sessions {
    /// The store, behind the timing decorator.
    pub store: Arc<dyn SessionStore>,
    pub config: SessionConfig,
    /// This process's identity in in-flight markers: random per start, so a restarted process
    /// never mistakes a dead predecessor's marker for its own.
    pub owner: String,
    metrics: Arc<Metrics>,
}

/// What is kept beside the sessions, each kind under its own key namespace. Values expire with
/// the session TTL after their last write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// The frozen compaction epoch of a conversation without a session.
    CompressionState,
    /// A state sheet written in the background, waiting for the epoch that places it.
    Sheet,
}

impl BlobKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::CompressionState => "cmp:",
            Self::Sheet => "sum:",
        }
    }
}

impl Sessions {
    /// Opens the configured store: `embedded:PATH` or a Redis URL.
    pub async fn open(config: &SessionConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let store: Arc<dyn SessionStore> = match config.store.strip_prefix("embedded:") {
            Some(path) => Arc::new(embedded::EmbeddedStore::open(Path::new(path), config.ttl)?),
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
        let store = Arc::new(timed::TimedStore::new(store, metrics.clone()));
        let owner = format!("{:016x}", fastrand::u64(..));
        Ok(Self { store, config: config.clone(), owner, metrics })
    }

    /// The session id a request names in `sessions.header`, if any; 400 when it is malformed.
    pub fn id_of(&self, headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
        let Some(value) = headers.get(self.config.header.as_str()) else {
            return Ok(None);
        };
        match value.to_str() {
            Ok(id) if valid_id(id) => Ok(Some(id.to_string())),
            _ => Err(GatewayError::invalid(
                format!("Invalid {}: 1 to 128 visible ASCII characters.", self.config.header),
                None,
                "invalid_session_id",
            )),
        }
    }

    pub async fn get_blob(&self, kind: BlobKind, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.store.get_blob(&format!("{}{key}", kind.prefix())).await
    }

    pub async fn put_blob(&self, kind: BlobKind, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.store.put_blob(&format!("{}{key}", kind.prefix()), value).await
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
