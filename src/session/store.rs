//! The [`SessionStore`] trait: load a checkpoint and commit a new one with an optimistic
//! version check. A commit is one atomic write (a redb write transaction, a Redis Lua script),
//! so a checkpoint is never half written and two writers never interleave.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::checkpoint::{Checkpoint, Encoded};
use crate::body::BoxError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A session, scoped to the caller that created it: the same id under another credential is
/// another session, so one caller can never read another's.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Hex of the first 16 bytes of SHA-256 over the caller's credential.
    pub scope: String,
    pub id: String,
}

impl SessionKey {
    pub fn new(credential: &[u8], id: &str) -> Self {
        let digest = Sha256::digest(credential);
        let scope = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self { scope, id: id.to_string() }
    }

    /// `scope:id`, the key's one string form inside a store.
    pub fn storage_key(&self) -> String {
        format!("{}:{}", self.scope, self.id)
    }

    /// The key back from its [`Self::storage_key`] (the scope is hex: the first `:` splits).
    pub fn from_storage_key(key: &str) -> Option<Self> {
        let (scope, id) = key.split_once(':')?;
        Some(Self { scope: scope.to_string(), id: id.to_string() })
    }
}

impl fmt::Debug for SessionKey {
    // The scope is derived from a secret: keep it out of logs beyond a short prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({}…:{})", &self.scope[..6.min(self.scope.len())], self.id)
    }
}

/// A checkpoint and the version it was stored at.
#[derive(Clone, Debug)]
pub struct Stored {
    pub version: u64,
    pub checkpoint: Checkpoint,
}

/// The result of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Written; the session is now at this version.
    Committed(u64),
    /// Someone else committed first; the session is at this version.
    Conflict(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("stored checkpoint is unreadable: {0}")]
    Corrupt(String),
}

impl From<StoreError> for crate::error::GatewayError {
    fn from(err: StoreError) -> Self {
        Self::SessionStore(Box::new(err))
    }
}

pub trait SessionStore: Send + Sync + fmt::Debug {
    /// The checkpoint, or `None` for a session that does not exist (or expired).
    fn load<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;

    /// Writes `checkpoint` if the session is still at `expected` (0: it must not exist yet).
    fn commit<'a>(
        &'a self,
        key: &'a SessionKey,
        expected: u64,
        checkpoint: &'a Encoded,
    ) -> BoxFuture<'a, Result<Commit, StoreError>>;

    /// Removes the session; false if there was none. Its version is kept (a tombstone, for at
    /// least the TTL) and a session created after it numbers on from there, so a version is
    /// never reused: a turn admitted before the delete can only conflict at its commit, never
    /// land in the new session.
    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Appends events `first_seq..` of turn `turn` to the session's event log, for replay.
    /// Appending event 1 of a turn first clears the log: it holds one turn at a time.
    fn append_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        first_seq: u64,
        events: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Up to `limit` events of `turn` after `after_seq`, in order.
    fn read_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>>;

    /// A value stored beside the sessions under `key` (compression state of stateless
    /// conversations, state sheets written in the background), or `None`. Expires with the
    /// session TTL after its last write.
    fn get_blob<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>>;

    /// Writes `value` under `key`, replacing any previous value, in one atomic write.
    fn put_blob<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Writes several blobs; a store that can batches them (one transaction, one pipeline).
    fn put_blobs<'a>(&'a self, items: &'a [(String, Bytes)]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for (key, value) in items {
                self.put_blob(key, value.clone()).await?;
            }
            Ok(())
        })
    }

    /// Reachability, for `/readyz`.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Up to `limit` sessions of the in-flight index whose lease ended by `now_ms`, oldest
    /// first. A commit places a session there while a turn any process may re-issue is in
    /// flight (see [`Encoded::sweepable_until`]) and drops it at the turn's end; the index may
    /// hold a few stale entries (a commit that lost its race), which the sweep drops.
    fn lapsed(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<SessionKey>, StoreError>>;

    /// Drops a session from the in-flight index.
    fn unindex<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Whether other processes write this store (replicas on Redis): a request waiting for a
    /// busy session cannot rely on this process hearing of every release, and polls
    /// [`Self::lease_until`]. The embedded store's file is this process's alone.
    fn shared(&self) -> bool {
        false
    }

    /// When the session's turn lease ends (ms since the epoch; 0 when no turn holds it or there
    /// is no session), read without the checkpoint. `None` when the store cannot tell that
    /// cheaply (the caller reads the checkpoint instead).
    fn lease_until<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_by_credential() {
        let a = SessionKey::new(b"Bearer sk-a", "s1");
        let b = SessionKey::new(b"Bearer sk-b", "s1");
        assert_ne!(a.storage_key(), b.storage_key());
        assert_eq!(a, SessionKey::new(b"Bearer sk-a", "s1"));
        assert_eq!(a.scope.len(), 32);
        assert!(!format!("{a:?}").contains(&a.scope));
        assert_eq!(SessionKey::from_storage_key(&a.storage_key()), Some(a));
        let odd = SessionKey::new(b"k", "a:b");
        assert_eq!(SessionKey::from_storage_key(&odd.storage_key()), Some(odd));
    }
}
