//! The Redis store: one hash per session (`v` version, `doc` checkpoint JSON) under
//! `{prefix}{scope:id}`; the braces are a hash tag, so all of a session's keys share one Cluster
//! slot. Commits are a Lua compare-and-set, atomic on the server; loads refresh the TTL. The
//! hash also holds `lease`, when the in-flight turn's lease ends (0: none), written by every
//! commit, so a request waiting on a busy session polls that field and not the document.
//!
//! On a Redis Cluster every command, pipeline, transaction and script here touches one session
//! (its hash and its `:events` stream, both under the same hash tag) or one blob key, so each
//! runs on the one master owning that slot; different sessions spread over the masters.
//!
//! The in-flight index (`{prefix}in_flight`, a sorted set of `scope:id` scored by lease end)
//! lives on one slot of its own, so it is written beside the commit, not inside its script:
//! added before a commit that marks a turn in flight and removed after the one that clears it,
//! it holds every such session and a few stale ones, which the sweep drops.

use std::time::Duration;

use bytes::Bytes;
use redis::{AsyncCommands, Script};

use super::checkpoint::{Checkpoint, Encoded};
use super::store::{BoxFuture, Commit, SessionKey, SessionStore, StoreError, Stored};
use crate::redis_conn::{self, RedisConn};

/// KEYS[1] session hash; ARGV[1] expected version, ARGV[2] document, ARGV[3] TTL in ms,
/// ARGV[4] the lease's end in ms (0: no turn in flight).
/// Returns {1, new_version} or {0, current_version}. Expecting 0 (a new session) also matches a
/// deleted one (a hash without `doc`), numbering on from its version.
const COMMIT: &str = r"
local current = redis.call('HGET', KEYS[1], 'v') or '0'
if current ~= ARGV[1] and (ARGV[1] ~= '0' or redis.call('HEXISTS', KEYS[1], 'doc') == 1) then
  return {0, tonumber(current)}
end
local version = tonumber(current) + 1
redis.call('HSET', KEYS[1], 'v', version, 'doc', ARGV[2], 'lease', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, version}
";

/// KEYS[1] session hash, KEYS[2] its event log; ARGV[1] TTL in ms. Drops the document and
/// the log and keeps the version, one on, as a tombstone for the TTL: a turn admitted before
/// the delete can never commit into a session created after it. Returns 1 if there was one.
const DELETE: &str = r"
redis.call('DEL', KEYS[2])
if redis.call('HEXISTS', KEYS[1], 'doc') == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], 'doc', 'lease')
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    ttl: Duration,
    commit: Script,
    delete: Script,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

impl RedisStore {
    /// Connects to a server or a Cluster (see [`redis_conn::connect`]), and reconnects on its
    /// own later. `timeout` bounds every command, so a hung Redis turns into a store error
    /// instead of a hung request.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let conn = redis_conn::connect(url, timeout).await.map_err(unavailable)?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            ttl,
            commit: Script::new(COMMIT),
            delete: Script::new(DELETE),
            timeout,
        })
    }

    fn key(&self, key: &SessionKey) -> String {
        format!("{}{{{}}}", self.prefix, key.storage_key())
    }

    fn index_key(&self) -> String {
        format!("{}in_flight", self.prefix)
    }

    /// The session's event log: a Redis Stream whose entry ids are `turn-seq`.
    fn events_key(&self, key: &SessionKey) -> String {
        format!("{}{{{}}}:events", self.prefix, key.storage_key())
    }

    async fn bounded<T>(&self, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, f).await.map_err(unavailable)?.map_err(unavailable)
    }
}

use std::future::Future;

impl SessionStore for RedisStore {
    fn get_blob<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = format!("{}blob:{key}", self.prefix);
            let value: Option<Vec<u8>> =
                self.bounded(redis::cmd("GET").arg(&k).query_async(&mut conn)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn put_blob<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = format!("{}blob:{key}", self.prefix);
            let ttl_ms = self.ttl.as_millis() as u64;
            self.bounded(
                redis::cmd("SET")
                    .arg(&k)
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn),
            )
            .await
        })
    }

    /// One pipeline. Callers keep a batch in one hash tag (one Cluster slot).
    fn put_blobs<'a>(&'a self, items: &'a [(String, Bytes)]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let ttl_ms = self.ttl.as_millis() as u64;
            let mut pipe = redis::pipe();
            for (key, value) in items {
                pipe.cmd("SET")
                    .arg(format!("{}blob:{key}", self.prefix))
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
            self.bounded(pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn load<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = self.key(key);
            let ttl_ms = self.ttl.as_millis() as u64;
            let ((version, doc), _): ((Option<u64>, Option<Vec<u8>>), i64) = self
                .bounded(
                    redis::pipe()
                        .cmd("HMGET")
                        .arg(&k)
                        .arg("v")
                        .arg("doc")
                        .pexpire(&k, ttl_ms as i64)
                        .query_async(&mut conn),
                )
                .await?;
            match (version, doc) {
                (Some(version), Some(doc)) => {
                    let checkpoint =
                        Checkpoint::from_bytes(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    Ok(Some(Stored { version, checkpoint }))
                }
                _ => Ok(None),
            }
        })
    }

    fn commit<'a>(
        &'a self,
        key: &'a SessionKey,
        expected: u64,
        checkpoint: &'a Encoded,
    ) -> BoxFuture<'a, Result<Commit, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let member = key.storage_key();
            if let Some(until) = checkpoint.sweepable_until() {
                self.bounded(conn.zadd::<_, _, _, ()>(self.index_key(), &member, until)).await?;
            }
            let (written, version): (u8, u64) = self
                .bounded(
                    self.commit
                        .key(self.key(key))
                        .arg(expected)
                        .arg(checkpoint.as_bytes())
                        .arg(self.ttl.as_millis() as u64)
                        .arg(checkpoint.lease_until_ms())
                        .invoke_async(&mut conn),
                )
                .await?;
            if written == 1 && checkpoint.sweepable_until().is_none() {
                self.bounded(conn.zrem::<_, _, ()>(self.index_key(), &member)).await?;
            }
            Ok(if written == 1 { Commit::Committed(version) } else { Commit::Conflict(version) })
        })
    }

    fn append_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        first_seq: u64,
        events: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = self.events_key(key);
            let mut pipe = redis::pipe();
            pipe.atomic();
            if first_seq == 1 {
                pipe.del(&k).ignore();
            }
            for (i, event) in events.iter().enumerate() {
                let id = format!("{turn}-{}", first_seq + i as u64);
                pipe.cmd("XADD").arg(&k).arg(id).arg("data").arg(event.as_ref()).ignore();
            }
            pipe.pexpire(&k, self.ttl.as_millis() as i64).ignore();
            self.bounded(pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn read_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let entries: Vec<(String, Vec<Vec<u8>>)> = self
                .bounded(
                    redis::cmd("XRANGE")
                        .arg(self.events_key(key))
                        .arg(format!("({turn}-{after_seq}"))
                        .arg(format!("{turn}-{}", u64::MAX))
                        .arg("COUNT")
                        .arg(limit)
                        .query_async(&mut conn),
                )
                .await?;
            Ok(entries
                .into_iter()
                .filter_map(|(id, mut fields)| {
                    let seq = id.split_once('-')?.1.parse().ok()?;
                    (fields.len() == 2).then(|| (seq, Bytes::from(fields.swap_remove(1))))
                })
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let removed: u8 = self
                .bounded(
                    self.delete
                        .key(self.key(key))
                        .key(self.events_key(key))
                        .arg(self.ttl.as_millis() as u64)
                        .invoke_async(&mut conn),
                )
                .await?;
            self.bounded(conn.zrem::<_, _, ()>(self.index_key(), key.storage_key())).await?;
            Ok(removed == 1)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    /// `HMGET v lease`: a few bytes, however large the checkpoint. A hash an older version
    /// wrote has no `lease` field: unknown.
    fn lease_until<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (version, lease): (Option<u64>, Option<u64>) = self
                .bounded(redis::cmd("HMGET").arg(self.key(key)).arg("v").arg("lease").query_async(&mut conn))
                .await?;
            Ok(match (version, lease) {
                (None, _) => Some(0),
                (Some(_), lease) => lease,
            })
        })
    }

    /// On a Cluster, PING fans out to the masters, and redis-rs leaves out one it has no live
    /// connection to: one master down does not take every replica out of rotation (requests on
    /// that master's sessions still fail, as store errors).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn lapsed(&self, now_ms: u64, limit: usize) -> BoxFuture<'_, Result<Vec<SessionKey>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let members: Vec<String> = self
                .bounded(conn.zrangebyscore_limit(self.index_key(), "-inf", now_ms, 0, limit as isize))
                .await?;
            Ok(members.iter().filter_map(|m| SessionKey::from_storage_key(m)).collect())
        })
    }

    fn unindex<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.bounded(conn.zrem::<_, _, ()>(self.index_key(), key.storage_key())).await
        })
    }
}
