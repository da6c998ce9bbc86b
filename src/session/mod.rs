//! Sessions: conversations that survive client disconnects and gateway restarts, checkpointed
//! in a [`SessionStore`] (an embedded redb file by default, or Redis shared by replicas).
//!
//! This module owns identity ([`SessionKey`], scoped to the caller's credential), the
//! checkpoint format, and the stores. It does not speak HTTP.

pub mod checkpoint;
pub mod embedded;
pub mod redis;
pub mod store;

pub use checkpoint::{Checkpoint, GoalLock, InFlight, UsageTotals};
pub use store::{Commit, SessionKey, SessionStore, StoreError, Stored};

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
