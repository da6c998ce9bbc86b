//! Configuration: the typed [`Config`], its defaults, and loading in the order
//! defaults → TOML file → `CTXGATE__SECTION__KEY` environment overrides.
//!
//! Parsing names the exact key that failed (`upstreams[1].connect_timeout`); semantic checks
//! live in [`validate`] and report every problem at once. This module does no network I/O.

mod auth;
mod compression;
mod env;
mod pool;
mod tools;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use auth::{check_key, read_keys_file, AuthConfig, KeyConfig, KeyLimits, RateLimitConfig};
pub use compression::{
    CompressionConfig, Encoding, Mode as CompressionMode, ModelPolicy, Policy, RulesConfig, SummarizerConfig,
};
pub use env::{EnvSource, ProcessEnv};
pub use pool::{BalanceMode, PoolConfig, PoolHealthConfig};
pub use tools::{HttpBackend, McpBackend, ToolConfig, ToolLoopConfig};
pub use validate::{ConfigError, Issue};

/// Prefix of environment overrides: `CTXGATE__SERVER__LISTEN=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "CTXGATE__";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub telemetry: TelemetryConfig,
    pub retry: RetryConfig,
    /// Named upstreams; the first is the default for routes that match nothing.
    pub upstreams: Vec<UpstreamConfig>,
    /// Model routes, tried exact names first, then globs in order.
    pub routes: Vec<RouteConfig>,
    pub sessions: SessionConfig,
    pub compression: CompressionConfig,
    /// Tools ctxgate runs itself when the model calls them.
    pub tools: Vec<ToolConfig>,
    pub tool_loop: ToolLoopConfig,
    /// Gateway keys; none configured: clients are not authenticated.
    pub auth: AuthConfig,
    pub rate_limits: RateLimitConfig,
}

/// What a request gets when the session store is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// 503: no request on a session is served without its checkpoint.
    #[default]
    FailClosed,
    /// Proxied without the session, marked `x-ctxgate-session: degraded`.
    FailOpen,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// `embedded:PATH` (a redb file), a `redis://` / `rediss://` URL, or a Redis Cluster's seeds
    /// as `redis+cluster://host:port,host:port`.
    pub store: String,
    /// The request header naming the session.
    pub header: String,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Sessions unused this long expire (Redis TTL, refreshed on use).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a request waits for another request on the same session before 409.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// How long an in-flight marker holds without its owner renewing it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Bound on every store operation.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    pub on_store_error: OnStoreError,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            store: "embedded:data/ctxgate.redb".into(),
            header: "x-session-id".into(),
            key_prefix: "ctxgate:".into(),
            ttl: Duration::from_secs(7 * 24 * 3600),
            busy_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            store_timeout: Duration::from_secs(2),
            on_store_error: OnStoreError::FailClosed,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: NonZeroUsize,
    /// Deadline for the response headers of one request, retries included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests (streams included, until their last byte) served at once; more are shed with 503.
    pub max_concurrent_requests: NonZeroUsize,
    /// How long in-flight requests and streams may run after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: NonZeroUsize::new(16 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            request_timeout: Duration::from_secs(600),
            max_concurrent_requests: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Pretty, log_level: "info".into() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries per upstream after the first attempt, before failing over to the next one.
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for: ctxgate fails over (or gives the
    /// client the upstream's 429) instead of holding the request.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL including the API version prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding this upstream's API key. Unset: the client's
    /// `Authorization` header is passed through.
    pub api_key_env: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers (LLM prefill of a long prompt is slow).
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed between two body chunks of a response.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Extra headers sent on every request to this upstream.
    pub headers: BTreeMap<String, String>,
    /// Models served from config by `GET /v1/models` when the upstream has no such endpoint.
    pub models: Vec<String>,
    /// Set OpenAI's `prompt_cache_key` from the session (or conversation) when the client did
    /// not, so one conversation's requests land on the same prompt cache.
    pub prompt_cache_key: bool,
    /// Several endpoints instead of `base_url`: see [`PoolConfig`].
    pub pool: Option<PoolConfig>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            name: "openai".into(),
            base_url: "https://api.openai.com/v1".into(),
            api_key_env: None,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            headers: BTreeMap::new(),
            models: Vec::new(),
            prompt_cache_key: false,
            pool: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Exact model names or globs (`gpt-4o*`).
    pub models: Vec<String>,
    /// Upstream names, in failover order.
    pub upstreams: Vec<String>,
}

impl Config {
    /// Loads `path` (if given), applies environment overrides from `env`, then validates.
    pub fn load(path: Option<&Path>, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let config = match path {
            Some(path) => Self::parse_file(path, env)?,
            None => Self::parse("", env)?,
        };
        config.validate(env)?;
        Ok(config)
    }

    /// Reads and parses a file, with environment overrides, without semantic validation.
    pub fn parse_file(path: &Path, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, env)
    }

    /// Parses TOML text with environment overrides applied, without semantic validation.
    pub fn parse(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::single("", format!("invalid TOML: {}", e.message())))?;
        env::apply_overrides(&mut value, env)?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::single(if path == "." { "" } else { &path }, e.into_inner().to_string())
        })
    }

    /// Overrides the default (first) upstream's base URL, as `--upstream` does.
    pub fn set_default_upstream(&mut self, base_url: String) {
        match self.upstreams.first_mut() {
            Some(first) => first.base_url = base_url,
            None => self.upstreams.push(UpstreamConfig { base_url, ..UpstreamConfig::default() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    #[test]
    fn empty_text_gives_defaults() {
        let config = Config::parse("", &no_env()).unwrap();
        assert_eq!(config.server.listen.port(), 8080);
        assert!(config.upstreams.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let err = Config::parse("[server]\nlisten_addr = \"x\"", &no_env()).unwrap_err();
        assert!(err.to_string().contains("server"), "{err}");
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nconnect_timeout = \"250ms\"\n";
        let config = Config::parse(text, &no_env()).unwrap();
        assert_eq!(config.upstreams[0].connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn bad_duration_names_its_key() {
        let text = "[[upstreams]]\nname = \"a\"\n[[upstreams]]\nname = \"b\"\nconnect_timeout = \"soon\"\n";
        let err = Config::parse(text, &no_env()).unwrap_err();
        assert!(err.to_string().contains("upstreams[1].connect_timeout"), "{err}");
    }

    #[test]
    fn zero_limits_fail_to_parse() {
        let err = Config::parse("[server]\nmax_concurrent_requests = 0", &no_env()).unwrap_err();
        assert!(err.to_string().contains("server.max_concurrent_requests"), "{err}");
    }
}
