//! `[auth]` and `[rate_limits]`: gateway keys (who may call, which models, how much) and where
//! the limits are counted.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Config, Issues};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Keys listed inline (their SHA-256 only: the config file holds no secret).
    pub keys: Vec<KeyConfig>,
    /// A TOML file of more `[[keys]]` (a mounted Kubernetes Secret, say), read at start-up.
    pub keys_file: Option<PathBuf>,
    /// Also look keys up in the Redis hash `{key_prefix}auth:keys` (field: the key's SHA-256;
    /// value: the key's JSON), so keys change without a restart.
    pub redis: bool,
    /// How long a key read from Redis is trusted before it is read again.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { keys: Vec::new(), keys_file: None, redis: false, cache_ttl: Duration::from_secs(10) }
    }
}

impl AuthConfig {
    /// Whether clients must present a gateway key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.keys_file.is_some() || self.redis
    }
}

/// One gateway key: its name (for metrics, logs and session scope), the SHA-256 of the secret,
/// the models it may call and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    /// Lower-case hex SHA-256 of the raw key (`ctxgate hash-key` prints it).
    pub sha256: String,
    /// Model names or globs this key may call; empty: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<NonZeroU32>,
    /// Requests admitted at once from idle; default `requests_per_minute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
    /// Prompt tokens counted before the call, corrected with the upstream's `usage` after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<NonZeroU32>,
    /// Requests in flight at once (streams until their last byte), per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<NonZeroU32>,
}

impl KeyConfig {
    pub fn limits(&self) -> KeyLimits {
        KeyLimits {
            requests_per_minute: self.requests_per_minute,
            burst: self.burst,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
        }
    }
}

/// A key's limits; an absent limit is not enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
    pub max_concurrent: Option<NonZeroU32>,
}

/// The `keys_file` format.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// Reads a keys file.
pub fn read_keys_file(path: &Path) -> Result<Vec<KeyConfig>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: toml::Value = toml::from_str(&text).map_err(|e| format!("invalid TOML: {}", e.message()))?;
    let file: KeysFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })?;
    Ok(file.keys)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// `sessions` (the sessions' Redis when sessions are on Redis, else `local`), `local` (per
    /// replica), or a Redis URL of its own.
    pub store: String,
    /// Bound on one Redis check; past it the replica decides alone and says so in metrics.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { store: "sessions".into(), timeout: Duration::from_millis(100) }
    }
}

impl Config {
    /// The Redis that holds limits and Redis-held keys, if any.
    pub fn shared_redis_url(&self) -> Option<&str> {
        match self.rate_limits.store.as_str() {
            "local" => None,
            "sessions" => Some(self.sessions.store.as_str()).filter(|s| crate::redis_conn::is_redis_url(s)),
            url => Some(url),
        }
    }
}

impl AuthConfig {
    /// Every key, inline and in `keys_file`, each checked; names must be unique across both.
    pub(super) fn validate(&self, issues: &mut Issues) {
        let mut names = std::collections::HashSet::new();
        let mut check = |at: &str, key: &KeyConfig, issues: &mut Issues| {
            if !valid_key_name(&key.name) {
                issues.push(format!("{at}.name"), "must be 1 to 64 letters, digits, `.`, `_` or `-`");
            } else if !names.insert(key.name.clone()) {
                issues.push(format!("{at}.name"), format!("duplicate key name `{}`", key.name));
            }
            key.validate(at, issues);
        };
        for (i, key) in self.keys.iter().enumerate() {
            check(&format!("auth.keys[{i}]"), key, issues);
        }
        if let Some(path) = &self.keys_file {
            match read_keys_file(path) {
                Ok(keys) => {
                    for (i, key) in keys.iter().enumerate() {
                        check(&format!("auth.keys_file({}).keys[{i}]", path.display()), key, issues);
                    }
                }
                Err(message) => issues.push("auth.keys_file", message),
            }
        }
        issues.positive("auth.cache_ttl", self.cache_ttl);
    }
}

impl RateLimitConfig {
    pub(super) fn validate(&self, issues: &mut Issues) {
        let store = &self.store;
        if !matches!(store.as_str(), "local" | "sessions") && !crate::redis_conn::is_redis_url(store) {
            issues.push("rate_limits.store", "must be `sessions`, `local` or a Redis URL");
        }
        issues.positive("rate_limits.timeout", self.timeout);
    }
}

impl KeyConfig {
    /// The key's fields other than its name (keys read from Redis are checked the same way when
    /// they are loaded).
    pub fn validate(&self, at: &str, issues: &mut Issues) {
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if self.sha256.len() != 64 || !self.sha256.bytes().all(hex) {
            issues.push(
                format!("{at}.sha256"),
                "must be 64 lower-case hex digits (`ctxgate hash-key` prints them)",
            );
        }
        for pattern in &self.models {
            if let Err(e) = globset::Glob::new(pattern) {
                issues.push(format!("{at}.models"), format!("invalid glob `{pattern}`: {e}"));
            }
        }
        if self.burst.is_some() && self.requests_per_minute.is_none() {
            issues.push(format!("{at}.burst"), "needs requests_per_minute");
        }
    }
}

fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, &BTreeMap::new()).unwrap()
    }

    /// The paths of the problems `validate` finds in `[auth]` and `[rate_limits]`.
    fn auth_issues(c: &Config) -> Vec<String> {
        let with_upstream = Config { upstreams: vec![super::super::UpstreamConfig::default()], ..c.clone() };
        match with_upstream.validate(&BTreeMap::new()) {
            Ok(()) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|i| i.path)
                    .filter(|p| p.starts_with("auth") || p.starts_with("rate_limits"))
                    .collect()
            }
        }
    }

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn keys_parse_with_their_limits() {
        let c = config(&format!(
            "[[auth.keys]]\nname = \"team-a\"\nsha256 = \"{HASH}\"\nmodels = [\"gpt-4o*\"]\n\
             requests_per_minute = 60\nburst = 5\ntokens_per_minute = 1000\nmax_concurrent = 2\n"
        ));
        assert!(c.auth.enabled());
        let key = &c.auth.keys[0];
        assert_eq!(key.requests_per_minute.map(NonZeroU32::get), Some(60));
        assert_eq!(key.burst.map(NonZeroU32::get), Some(5));
        assert_eq!(key.max_concurrent.map(NonZeroU32::get), Some(2));
        assert!(auth_issues(&c).is_empty());
    }

    #[test]
    fn bad_keys_are_reported_with_their_paths() {
        let c = config(&format!(
            "[[auth.keys]]\nname = \"a b\"\nsha256 = \"xyz\"\nburst = 3\n\
             [[auth.keys]]\nname = \"dup\"\nsha256 = \"{HASH}\"\nmodels = [\"[\"]\n\
             [[auth.keys]]\nname = \"dup\"\nsha256 = \"{}\"\n\
             [auth]\nredis = true\n[sessions]\nstore = \"embedded:x.redb\"\n",
            HASH.to_uppercase()
        ));
        let issues = auth_issues(&c);
        let paths: Vec<&str> = issues.iter().map(String::as_str).collect();
        for expected in [
            "auth.keys[0].name",
            "auth.keys[0].sha256",
            "auth.keys[0].burst",
            "auth.keys[1].models",
            "auth.keys[2].name",
            "auth.keys[2].sha256",
            "auth.redis",
        ] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
        let issues = auth_issues(&config("[rate_limits]\nstore = \"nope\"\ntimeout = \"0s\"\n"));
        assert_eq!(issues, ["rate_limits.store", "rate_limits.timeout"]);
    }

    #[test]
    fn a_keys_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, format!("[[keys]]\nname = \"f\"\nsha256 = \"{HASH}\"\nmax_concurrent = 1\n"))
            .unwrap();
        let keys = read_keys_file(&path).unwrap();
        assert_eq!(keys[0].name, "f");
        std::fs::write(&path, "[[keys]]\nname = \"f\"\nsha = \"x\"\n").unwrap();
        let err = read_keys_file(&path).unwrap_err();
        assert!(err.contains("sha"), "{err}");
        let c = config(&format!("[auth]\nkeys_file = \"{}\"\n", dir.path().join("missing").display()));
        assert_eq!(auth_issues(&c), ["auth.keys_file"]);
    }

    #[test]
    fn the_shared_redis_follows_the_sessions_store() {
        assert_eq!(config("").shared_redis_url(), None);
        let c = config("[sessions]\nstore = \"redis://127.0.0.1:1/\"\n");
        assert_eq!(c.shared_redis_url(), Some("redis://127.0.0.1:1/"));
        let c = config("[sessions]\nstore = \"redis://127.0.0.1:1/\"\n[rate_limits]\nstore = \"local\"\n");
        assert_eq!(c.shared_redis_url(), None);
    }
}
