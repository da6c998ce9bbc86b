//! The embedded store: one redb file, the single-node default that needs nothing installed.
//! redb is synchronous, so each operation runs on the blocking pool; its write transactions
//! are serialised and durable on commit, which gives the atomic compare-and-set.
//!
//! Nothing expires by itself in a file: reads treat an expired session or blob as absent, and a
//! sweeper ([`spawn_sweeper`]) removes them at start-up and every `sessions.sweep_interval`, so
//! their pages are reused and the file stops growing with sessions no one will read.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::checkpoint::{now_ms, Checkpoint, Encoded};
use super::store::{BoxFuture, Commit, SessionKey, SessionStore, StoreError, Stored};

/// `scope:id` → 8-byte big-endian version followed by the checkpoint JSON; a deleted session
/// is its version and when it was deleted (a tombstone, see [`SessionStore::delete`]; files
/// from before hold the version alone).
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// `(scope:id, turn, seq)` → one SSE event as sent to the client.
const EVENTS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("events");
/// Blob key → 8-byte big-endian write time (ms) followed by the value.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// The in-flight index: `scope:id` → lease end (ms) of a turn any process may re-issue.
const IN_FLIGHT: TableDefinition<&str, u64> = TableDefinition::new("in_flight");

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    ttl: Duration,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// redb's page cache. Its default (1 GiB) lets the process's memory follow the file as it
/// grows over the session TTL (measured by the soak test: RSS tracked the file, and a first
/// open after an unclean shutdown read all of it in); pages past this are read from the file.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
impl EmbeddedStore {
    /// Opens or creates the file, creating its directory if needed.
    pub fn open(path: &Path, ttl: Duration) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(|err| match err {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(
                format!(
                    "{} is already open in another process (the embedded store is single-process \
                     and locks its file). Stop that process, or give this one another file \
                     (`--store embedded:PATH`, or `sessions.store` in the config, env \
                     CTXGATE__SESSIONS__STORE), or share sessions between processes through \
                     Redis (`--store redis://HOST:PORT`)",
                    path.display()
                )
                .into(),
            ),
            other => unavailable(other),
        })?;
        // Create the table up front so readers never see it missing.
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(CHECKPOINTS).map_err(unavailable)?;
        txn.open_table(EVENTS).map_err(unavailable)?;
        txn.open_table(BLOBS).map_err(unavailable)?;
        txn.open_table(IN_FLIGHT).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db), ttl })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(unavailable)?
    }
}

impl EmbeddedStore {
    /// Removes expired sessions (checkpoint and event log), the tombstones of deleted ones
    /// ([`tombstone_expired`]) and expired blobs (with their event logs); returns how many sessions and tombstones,
    /// and how many blobs. Expiry is checked again inside the write, so a session committed
    /// since the scan stays. `opening`: the first sweep after the file was opened.
    pub async fn sweep(&self, opening: bool) -> Result<(usize, usize), StoreError> {
        let ttl = self.ttl;
        self.blocking(move |db| {
            let now = now_ms();
            let (sessions, blobs) = {
                let txn = db.begin_read().map_err(unavailable)?;
                let checkpoints = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
                let mut sessions = Vec::new();
                for entry in checkpoints.iter().map_err(unavailable)? {
                    let (key, value) = entry.map_err(unavailable)?;
                    if sweepable(value.value(), ttl, now, opening) {
                        sessions.push(key.value().to_string());
                    }
                }
                let table = txn.open_table(BLOBS).map_err(unavailable)?;
                let mut blobs = Vec::new();
                for entry in table.iter().map_err(unavailable)? {
                    let (key, value) = entry.map_err(unavailable)?;
                    if blob_expired(value.value(), ttl, now) {
                        blobs.push(key.value().to_string());
                    }
                }
                (sessions, blobs)
            };
            if sessions.is_empty() && blobs.is_empty() {
                return Ok((0, 0));
            }
            let txn = db.begin_write().map_err(unavailable)?;
            let mut removed = (0, 0);
            {
                let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
                let mut events = txn.open_table(EVENTS).map_err(unavailable)?;
                let mut in_flight = txn.open_table(IN_FLIGHT).map_err(unavailable)?;
                for key in &sessions {
                    let still = checkpoints
                        .get(key.as_str())
                        .map_err(unavailable)?
                        .is_some_and(|value| sweepable(value.value(), ttl, now, opening));
                    if still {
                        checkpoints.remove(key.as_str()).map_err(unavailable)?;
                        clear_events(&mut events, key)?;
                        in_flight.remove(key.as_str()).map_err(unavailable)?;
                        removed.0 += 1;
                    }
                }
                let mut table = txn.open_table(BLOBS).map_err(unavailable)?;
                for key in &blobs {
                    let still = table
                        .get(key.as_str())
                        .map_err(unavailable)?
                        .is_some_and(|value| blob_expired(value.value(), ttl, now));
                    if still {
                        table.remove(key.as_str()).map_err(unavailable)?;
                        // A blob's own event log (see `session::blob_log`) goes with it.
                        clear_events(&mut events, key)?;
                        removed.1 += 1;
                    }
                }
            }
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        })
        .await
    }
}

/// Sweeps `store` now and then every `every`, until the store is dropped.
pub(super) fn spawn_sweeper(store: &Arc<EmbeddedStore>, every: Duration) {
    let store: Weak<EmbeddedStore> = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut opening = true;
        loop {
            let Some(live) = store.upgrade() else { return };
            match live.sweep(std::mem::take(&mut opening)).await {
                Ok((0, 0)) => {}
                Ok((sessions, blobs)) => tracing::info!(sessions, blobs, "swept expired sessions and blobs"),
                Err(err) => tracing::warn!(error = %err, "cannot sweep expired sessions"),
            }
            drop(live);
            tokio::time::sleep(every).await;
        }
    });
}

/// Whether the sweep removes a checkpoint record: an expired session, or a tombstone it no
/// longer needs.
fn sweepable(record: &[u8], ttl: Duration, now: u64, opening: bool) -> bool {
    if record.len() <= TOMBSTONE_LEN {
        tombstone_expired(record, ttl, now, opening)
    } else {
        stale(record, ttl, now)
    }
}

/// A tombstone's length: the version, then the deletion time (ms, big-endian).
const TOMBSTONE_LEN: usize = 16;

fn tombstone(version: u64, now: u64) -> [u8; TOMBSTONE_LEN] {
    let mut record = [0; TOMBSTONE_LEN];
    record[..8].copy_from_slice(&version.to_be_bytes());
    record[8..].copy_from_slice(&now.to_be_bytes());
    record
}

/// Whether a tombstone can go. It exists so that a turn admitted before the delete cannot
/// commit into a later incarnation (which would number on from it); such a turn lives in this
/// process, as the file is this process's alone. So when the file is opened every tombstone
/// can go, and later one older than the session TTL: a turn is not still running a TTL after
/// its session was deleted. (Without its tombstone, such a turn's commit would still conflict
/// unless the new incarnation had reached the very same version.)
fn tombstone_expired(record: &[u8], ttl: Duration, now: u64, opening: bool) -> bool {
    if opening {
        return true;
    }
    record
        .get(8..TOMBSTONE_LEN)
        .and_then(|at| at.try_into().ok())
        .is_some_and(|at| u64::from_be_bytes(at).saturating_add(ttl.as_millis() as u64) < now)
}

/// Whether a checkpoint record has expired (as `load` would treat it); an unreadable one is
/// kept for someone to look at.
fn stale(record: &[u8], ttl: Duration, now: u64) -> bool {
    /// Only the stamp is read (the rest of the document is skipped, not built).
    #[derive(serde::Deserialize)]
    struct Stamp {
        updated_ms: u64,
    }
    let Some((_, doc)) = record.split_first_chunk::<8>() else { return false };
    serde_json::from_slice::<Stamp>(doc)
        .is_ok_and(|stamp| stamp.updated_ms.saturating_add(ttl.as_millis() as u64) < now)
}

fn blob_expired(record: &[u8], ttl: Duration, now: u64) -> bool {
    record
        .split_first_chunk::<8>()
        .is_some_and(|(written, _)| u64::from_be_bytes(*written).saturating_add(ttl.as_millis() as u64) < now)
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn decode(bytes: &[u8]) -> Result<Stored, StoreError> {
    let (version, doc) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| StoreError::Corrupt("record shorter than its version".into()))?;
    let checkpoint = Checkpoint::from_bytes(doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Stored { version: u64::from_be_bytes(*version), checkpoint })
}

/// The version a record holds, and whether it is a live session: not deleted (a tombstone),
/// not expired, readable. A commit expecting 0 (a new session) may replace any record that is
/// not live, and numbers on from its version.
fn state(bytes: &[u8], ttl: Duration) -> (u64, bool) {
    let Some((version, _)) = bytes.split_first_chunk::<8>() else { return (0, false) };
    let live = bytes.len() > TOMBSTONE_LEN && decode(bytes).is_ok_and(|s| !expired(&s, ttl));
    (u64::from_be_bytes(*version), live)
}

fn clear_events(table: &mut redb::Table<'_, (&str, u64, u64), &[u8]>, key: &str) -> Result<(), StoreError> {
    table.retain_in((key, 0, 0)..=(key, u64::MAX, u64::MAX), |_, _| false).map_err(unavailable)
}

fn expired(stored: &Stored, ttl: Duration) -> bool {
    stored.checkpoint.updated_ms.saturating_add(ttl.as_millis() as u64) < now_ms()
}

impl SessionStore for EmbeddedStore {
    fn get_blob<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        let k = key.to_string();
        let ttl = self.ttl.as_millis() as u64;
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(BLOBS).map_err(unavailable)?;
            let Some(value) = table.get(k.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            let Some((written, data)) = value.value().split_first_chunk::<8>() else {
                return Err(StoreError::Corrupt("blob shorter than its header".into()));
            };
            let fresh = u64::from_be_bytes(*written).saturating_add(ttl) >= now_ms();
            Ok(fresh.then(|| Bytes::copy_from_slice(data)))
        }))
    }

    fn put_blob<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        let k = key.to_string();
        Box::pin(self.blocking(move |db| {
            let mut record = Vec::with_capacity(8 + value.len());
            record.extend_from_slice(&now_ms().to_be_bytes());
            record.extend_from_slice(&value);
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(BLOBS)
                .map_err(unavailable)?
                .insert(k.as_str(), record.as_slice())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        }))
    }

    /// One write transaction.
    fn put_blobs<'a>(&'a self, items: &'a [(String, Bytes)]) -> BoxFuture<'a, Result<(), StoreError>> {
        let items = items.to_vec();
        Box::pin(self.blocking(move |db| {
            let now = now_ms().to_be_bytes();
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(BLOBS).map_err(unavailable)?;
                for (key, value) in &items {
                    let record = [now.as_slice(), value.as_ref()].concat();
                    table.insert(key.as_str(), record.as_slice()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        }))
    }

    fn load<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let k = key.storage_key();
        let ttl = self.ttl;
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
            let Some(value) = table.get(k.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            if value.value().len() <= TOMBSTONE_LEN {
                return Ok(None); // deleted
            }
            let stored = decode(value.value())?;
            Ok((!expired(&stored, ttl)).then_some(stored))
        }))
    }

    fn commit<'a>(
        &'a self,
        key: &'a SessionKey,
        expected: u64,
        checkpoint: &'a Encoded,
    ) -> BoxFuture<'a, Result<Commit, StoreError>> {
        let k = key.storage_key();
        let doc = checkpoint.clone();
        let ttl = self.ttl;
        let sweepable = checkpoint.sweepable_until();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let outcome = {
                let mut table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
                // A deleted or expired session counts as absent, as `load` reports it, but its
                // version goes on: a lease from before can never match a later incarnation.
                let (current, live) =
                    table.get(k.as_str()).map_err(unavailable)?.map_or((0, false), |v| state(v.value(), ttl));
                if current != expected && (expected != 0 || live) {
                    Commit::Conflict(current)
                } else {
                    let version = current + 1;
                    // Written in place: a large checkpoint is not copied into a record first.
                    let mut record = table.insert_reserve(k.as_str(), 8 + doc.len()).map_err(unavailable)?;
                    let (head, body) = record.as_mut().split_at_mut(8);
                    head.copy_from_slice(&version.to_be_bytes());
                    body.copy_from_slice(doc.as_bytes());
                    Commit::Committed(version)
                }
            };
            if let Commit::Committed(_) = outcome {
                // In the same transaction: the index never disagrees with the checkpoints.
                let mut index = txn.open_table(IN_FLIGHT).map_err(unavailable)?;
                match sweepable {
                    Some(until) => index.insert(k.as_str(), until).map(drop),
                    None => index.remove(k.as_str()).map(drop),
                }
                .map_err(unavailable)?;
            }
            match outcome {
                Commit::Committed(_) => txn.commit().map_err(unavailable)?,
                Commit::Conflict(_) => txn.abort().map_err(unavailable)?,
            }
            Ok(outcome)
        }))
    }

    fn append_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        first_seq: u64,
        events: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let k = key.storage_key();
        let events = events.to_vec();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(EVENTS).map_err(unavailable)?;
                if first_seq == 1 {
                    clear_events(&mut table, &k)?;
                }
                for (i, event) in events.iter().enumerate() {
                    table
                        .insert((k.as_str(), turn, first_seq + i as u64), event.as_ref())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        }))
    }

    fn read_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        let k = key.storage_key();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(EVENTS).map_err(unavailable)?;
            let range = table
                .range((k.as_str(), turn, after_seq.saturating_add(1))..=(k.as_str(), turn, u64::MAX))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in range.take(limit) {
                let (key, value) = entry.map_err(unavailable)?;
                out.push((key.value().2, Bytes::copy_from_slice(value.value())));
            }
            Ok(out)
        }))
    }

    /// Leaves a tombstone one version on (see [`state`]).
    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let k = key.storage_key();
        let ttl = self.ttl;
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            clear_events(&mut txn.open_table(EVENTS).map_err(unavailable)?, &k)?;
            txn.open_table(IN_FLIGHT).map_err(unavailable)?.remove(k.as_str()).map_err(unavailable)?;
            let removed = {
                let mut table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
                let found = table.get(k.as_str()).map_err(unavailable)?.map(|v| state(v.value(), ttl));
                match found {
                    Some((version, live)) if live => {
                        table
                            .insert(k.as_str(), tombstone(version + 1, now_ms()).as_slice())
                            .map_err(unavailable)?;
                        true
                    }
                    _ => false,
                }
            };
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn lapsed(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<SessionKey>, StoreError>> {
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(IN_FLIGHT).map_err(unavailable)?;
            let mut lapsed = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (key, until) = entry.map_err(unavailable)?;
                if until.value() <= now_ms {
                    lapsed.extend(SessionKey::from_storage_key(key.value()).map(|k| (until.value(), k)));
                }
            }
            lapsed.sort_by_key(|(until, _)| *until);
            Ok(lapsed.into_iter().take(limit).map(|(_, key)| key).collect())
        }))
    }

    fn unindex<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>> {
        let k = key.storage_key();
        Box::pin(self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(IN_FLIGHT).map_err(unavailable)?.remove(k.as_str()).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_names_the_file_and_the_ways_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let _first = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
        let err = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("--store") && err.contains("sessions.store") && err.contains("redis://"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tombstones_go_when_the_file_is_opened_or_past_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(300);
        let store = EmbeddedStore::open(&dir.path().join("t.redb"), ttl).unwrap();
        let key = SessionKey::new(b"k", "s");
        let doc = Checkpoint::new(now_ms()).encode();
        assert!(matches!(store.commit(&key, 0, &doc).await.unwrap(), Commit::Committed(1)));
        assert!(store.delete(&key).await.unwrap());

        // A fresh tombstone stays: a turn admitted before the delete still conflicts
        assert_eq!(store.sweep(false).await.unwrap(), (0, 0));
        assert!(matches!(store.commit(&key, 1, &doc).await.unwrap(), Commit::Conflict(2)));

        // Past the TTL it goes, and the next incarnation starts over
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert_eq!(store.sweep(false).await.unwrap(), (1, 0));
        let doc = Checkpoint::new(now_ms()).encode();
        assert!(matches!(store.commit(&key, 0, &doc).await.unwrap(), Commit::Committed(1)));

        // And when the file is opened, every tombstone goes at once (a live session stays)
        assert!(store.delete(&key).await.unwrap());
        let other = SessionKey::new(b"k", "live");
        assert!(matches!(store.commit(&other, 0, &doc).await.unwrap(), Commit::Committed(1)));
        assert_eq!(store.sweep(true).await.unwrap(), (1, 0));
        assert!(store.load(&other).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_blobs_event_log_goes_with_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(300);
        let store = EmbeddedStore::open(&dir.path().join("b.redb"), ttl).unwrap();
        let owner = SessionKey::new(b"k", "resp_1");
        let log = crate::session::blob_log(crate::session::BlobKind::Response, &owner);
        store.put_blob(&log.storage_key(), Bytes::from_static(b"record")).await.unwrap();
        store.append_events(&log, 0, 1, &[Bytes::from_static(b"event")]).await.unwrap();
        assert_eq!(store.read_events(&log, 0, 0, 10).await.unwrap().len(), 1);

        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert_eq!(store.sweep(false).await.unwrap(), (0, 1));
        assert!(store.get_blob(&log.storage_key()).await.unwrap().is_none());
        assert!(store.read_events(&log, 0, 0, 10).await.unwrap().is_empty());
    }
}
