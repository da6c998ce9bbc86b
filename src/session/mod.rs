//! Sessions: conversations that survive client disconnects and gateway restarts, checkpointed
//! in a [`SessionStore`] (an embedded redb file by default, or Redis shared by replicas).
//!
//! This module owns identity ([`SessionKey`], scoped to the caller's credential), the
//! checkpoint format, and the stores. It does not speak HTTP.

pub mod checkpoint;
pub mod embedded;
pub mod redis;
pub mod store;

use std::path::Path;
use std::sync::Arc;

pub use checkpoint::{Checkpoint, GoalLock, InFlight, OnGoalConflict, StoredRequest, UsageTotals};
pub use store::{Commit, SessionKey, SessionStore, StoreError, Stored};

use crate::config::SessionConfig;

/// The session store in use and the settings around it.
#[derive(Debug)]
pub struct Sessions {
    pub store: Arc<dyn SessionStore>,
    pub config: SessionConfig,
    /// This process's identity in in-flight markers: random per start, so a restarted process
    /// never mistakes a dead predecessor's marker for its own.
    pub owner: String,
}

impl Sessions {
    /// Opens the configured store: `embedded:PATH` or a Redis URL.
    pub async fn open(config: &SessionConfig) -> Result<Self, StoreError> {
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
        let owner = format!("{:016x}", fastrand::u64(..));
        Ok(Self { store, config: config.clone(), owner })
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
