//! The key ring: which gateway keys exist, by the SHA-256 of the secret. Keys come from config
//! (inline or `keys_file`), read once, and optionally from a Redis hash, read on first use and
//! cached for `auth.cache_ttl` so a change there takes effect without a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis_conn::RedisConn;
use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::body::BoxError;
use crate::config::{AuthConfig, ConfigError, Issues, KeyConfig, KeyLimits};
use crate::error::GatewayError;

/// One key's identity and policy; the secret itself is never held.
#[derive(Debug)]
pub struct KeyPolicy {
    pub name: String,
    /// `None`: every model.
    models: Option<GlobSet>,
    pub limits: KeyLimits,
}

impl KeyPolicy {
    pub fn from_config(key: &KeyConfig) -> Result<Self, String> {
        let mut issues = Issues::default();
        key.validate("", &mut issues);
        if let Some(issue) = issues.first() {
            return Err(issue.to_string().trim_start_matches('.').to_string());
        }
        let models = if key.models.is_empty() {
            None
        } else {
            let mut set = GlobSetBuilder::new();
            for pattern in &key.models {
                set.add(Glob::new(pattern).map_err(|e| e.to_string())?);
            }
            Some(set.build().map_err(|e| e.to_string())?)
        };
        Ok(Self { name: key.name.clone(), models, limits: key.limits() })
    }

    /// Whether the key is limited to some models (a request naming none cannot be checked).
    pub fn restricts_models(&self) -> bool {
        self.models.is_some()
    }

    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|set| set.is_match(model))
    }
}

/// Lower-case hex SHA-256 of a raw key, as keys are configured.
pub fn hash_key(raw: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(raw) {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Negative answers from Redis are trusted for at most this long (or `cache_ttl` if shorter),
/// so a key added there works within a second even if it was tried before.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Bound on cached Redis answers; past it the cache starts over (unknown keys sprayed at the
/// gateway must not grow memory).
const CACHE_LIMIT: usize = 10_000;

#[derive(Debug)]
pub struct KeyRing {
    configured: HashMap<String, Arc<KeyPolicy>>,
    redis: Option<RedisKeys>,
}

struct RedisKeys {
    conn: RedisConn,
    hash: String,
    ttl: Duration,
    timeout: Duration,
    cache: Mutex<HashMap<String, Cached>>,
}

/// A Redis answer and when it was read; `None`: no such key.
type Cached = (Instant, Option<Arc<KeyPolicy>>);

impl std::fmt::Debug for RedisKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeys").field("hash", &self.hash).finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Keys from config and `keys_file`; `redis` is the connection for Redis-held keys when
    /// `auth.redis` is set.
    pub fn new(
        config: &AuthConfig,
        redis: Option<(RedisConn, String, Duration)>,
    ) -> Result<Self, ConfigError> {
        let mut keys = config.keys.clone();
        if let Some(path) = &config.keys_file {
            // Read again at start-up: the file is a mounted Secret that may change.
            keys.extend(
                crate::config::read_keys_file(path).map_err(|e| ConfigError::single("auth.keys_file", e))?,
            );
        }
        let mut configured = HashMap::new();
        for key in &keys {
            let policy = KeyPolicy::from_config(key)
                .map_err(|e| ConfigError::single("auth.keys", format!("key `{}`: {e}", key.name)))?;
            configured.insert(key.sha256.clone(), Arc::new(policy));
        }
        let redis = redis.filter(|_| config.redis).map(|(conn, prefix, timeout)| RedisKeys {
            conn,
            hash: format!("{prefix}auth:keys"),
            ttl: config.cache_ttl,
            timeout,
            cache: Mutex::new(HashMap::new()),
        });
        Ok(Self { configured, redis })
    }

    /// The policy of the key presented, `None` for an unknown key.
    pub async fn lookup(&self, raw: &[u8]) -> Result<Option<Arc<KeyPolicy>>, GatewayError> {
        let hash = hash_key(raw);
        if let Some(policy) = self.configured.get(&hash) {
            return Ok(Some(policy.clone()));
        }
        match &self.redis {
            Some(redis) => redis.lookup(hash).await,
            None => Ok(None),
        }
    }
}

impl RedisKeys {
    async fn lookup(&self, hash: String) -> Result<Option<Arc<KeyPolicy>>, GatewayError> {
        let now = Instant::now();
        let cached = self.cached(&hash);
        if let Some((fetched, policy)) = &cached {
            let ttl = if policy.is_some() { self.ttl } else { NEGATIVE_TTL.min(self.ttl) };
            if now.duration_since(*fetched) < ttl {
                return Ok(policy.clone());
            }
        }
        let mut conn = self.conn.clone();
        let read = tokio::time::timeout(
            self.timeout,
            redis::cmd("HGET").arg(&self.hash).arg(&hash).query_async::<Option<String>>(&mut conn),
        )
        .await;
        let json = match read {
            Ok(Ok(json)) => json,
            failed => {
                // Redis cannot answer: a key known before keeps working; an unknown one cannot
                // be told apart from a revoked one, so it is refused as unavailable (503).
                if let Some((_, Some(policy))) = cached {
                    return Ok(Some(policy));
                }
                let err: BoxError = match failed {
                    Err(elapsed) => Box::new(elapsed),
                    Ok(Err(err)) => Box::new(err),
                    Ok(Ok(_)) => "unreachable".into(),
                };
                return Err(GatewayError::KeyStore(err));
            }
        };
        let policy = json.and_then(|json| match parse_redis_key(&hash, &json) {
            Ok(policy) => Some(Arc::new(policy)),
            Err(message) => {
                // The name is safe to log; the hash identifies the entry to fix.
                tracing::warn!(key_hash = &hash[..12], %message, "ignoring an invalid key in Redis");
                None
            }
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(hash, (now, policy.clone()));
        Ok(policy)
    }

    fn cached(&self, hash: &str) -> Option<Cached> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(hash).cloned()
    }
}

/// A Redis entry: the key's fields as JSON, without `sha256` (the hash field names it).
fn parse_redis_key(hash: &str, json: &str) -> Result<KeyPolicy, String> {
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let object = value.as_object_mut().ok_or("not a JSON object")?;
    object.insert("sha256".into(), hash.into());
    let key: KeyConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
    KeyPolicy::from_config(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(models: &[&str]) -> KeyConfig {
        KeyConfig {
            name: "team-a".into(),
            sha256: hash_key(b"sk-team-a"),
            models: models.iter().map(|m| m.to_string()).collect(),
            requests_per_minute: None,
            burst: None,
            tokens_per_minute: None,
            max_concurrent: None,
        }
    }

    #[test]
    fn hashes_are_lower_hex_sha256() {
        assert_eq!(hash_key(b"test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    }

    #[test]
    fn models_are_matched_by_glob() {
        let policy = KeyPolicy::from_config(&key(&["gpt-4o*", "o3"])).unwrap();
        assert!(policy.allows("gpt-4o-mini"));
        assert!(policy.allows("o3"));
        assert!(!policy.allows("o3-pro"));
        assert!(KeyPolicy::from_config(&key(&[])).unwrap().allows("anything"));
    }

    #[tokio::test]
    async fn configured_keys_are_found_by_their_hash_only() {
        let config = AuthConfig { keys: vec![key(&[])], ..AuthConfig::default() };
        let ring = KeyRing::new(&config, None).unwrap();
        assert_eq!(ring.lookup(b"sk-team-a").await.unwrap().unwrap().name, "team-a");
        assert!(ring.lookup(b"sk-team-b").await.unwrap().is_none());
        assert!(ring.lookup(hash_key(b"sk-team-a").as_bytes()).await.unwrap().is_none());
    }

    #[test]
    fn redis_entries_are_checked_like_config() {
        let hash = hash_key(b"k");
        let policy =
            parse_redis_key(&hash, r#"{"name":"b","models":["m"],"requests_per_minute":5}"#).unwrap();
        assert_eq!(policy.name, "b");
        assert_eq!(policy.limits.requests_per_minute.map(|n| n.get()), Some(5));
        assert!(parse_redis_key(&hash, r#"{"name":"b","rpm":5}"#).is_err());
        assert!(parse_redis_key(&hash, r#"{"name":"b","burst":5}"#).is_err());
        assert!(parse_redis_key(&hash, "[1]").is_err());
    }
}
