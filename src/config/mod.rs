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

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

pub use auth::{read_keys_file, AuthConfig, KeyConfig, KeyLimits, RateLimitConfig};
pub use compression::{
    CompressionConfig, Encoding, Mode as CompressionMode, ModelPolicy, Policy, RulesConfig, SummarizerConfig,
};
pub use env::{EnvSource, ProcessEnv};
pub use pool::{BalanceMode, PoolConfig, PoolHealthConfig};
pub use tools::{HttpBackend, McpBackend, ToolConfig, ToolLoopConfig};
pub use validate::{ConfigError, Issue, Issues, ValidConfig};

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
    /// The Responses API front end.
    pub responses: ResponsesConfig,
    /// Keys set by environment overrides, as key path segments and the variable that set them.
    #[serde(skip)]
    overrides: Vec<(Vec<String>, String)>,
    /// Top-level sections that did not parse (their parse error is reported; they hold
    /// defaults, whose own checks are left out).
    #[serde(skip)]
    unparsed: Vec<String>,
    /// Problems found while parsing, reported by [`Config::validate`].
    #[serde(skip)]
    parse_issues: Issues,
}

/// The top-level sections, as they are spelled in TOML.
const SECTIONS: [&str; 12] = [
    "server",
    "telemetry",
    "retry",
    "upstreams",
    "routes",
    "sessions",
    "compression",
    "tools",
    "tool_loop",
    "auth",
    "rate_limits",
    "responses",
];

/// `[responses]`: the Responses API front end.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesConfig {
    /// What a WebSocket upgrade on `/v1/responses` (the Responses API's WebSocket mode) gets.
    pub websocket: WebSocketMode,
}

/// Who answers the Responses API's WebSocket mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebSocketMode {
    /// ctxgate: each `response.create` runs as `POST /v1/responses` with `stream: true` does
    /// (translation, compression, sessions, gateway tools), so a chat-only upstream serves it.
    #[default]
    Terminate,
    /// The upstream: the socket is tunnelled to it as any passthrough upgrade is.
    Tunnel,
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
    /// The request headers naming the session, tried in order (a single name is a list of one).
    pub header: SessionHeaders,
    /// Whether a request's `prompt_cache_key` names its session when no header does.
    pub prompt_cache_key: bool,
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
    /// Largest locked goal (goal, strategy and constraints together), in bytes: it is sent
    /// with every turn of the session.
    pub max_goal_bytes: NonZeroUsize,
    /// Stream events a turn may have waiting for the event log's writer, in bytes; past it
    /// the stream waits for the store rather than buffering more.
    pub max_event_backlog_bytes: NonZeroUsize,
    /// How often the embedded store removes expired sessions and blobs (also once at
    /// start-up); Redis expires keys itself.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl SessionConfig {
    fn validate(&self, issues: &mut Issues) {
        let store = &self.store;
        if store.starts_with("rediss+cluster://") {
            issues.push(
                "sessions.store",
                "TLS to a Redis Cluster (`rediss+cluster://`) is not supported; use `redis+cluster://`",
            );
        } else if !(store.starts_with("embedded:") && store.len() > "embedded:".len()
            || crate::redis_conn::is_redis_url(store))
        {
            issues.push(
                "sessions.store",
                "must be `embedded:PATH`, `redis://...`, `rediss://...` or `redis+cluster://HOST:PORT,HOST:PORT`",
            );
        }
        // A brace in the prefix would move (or empty) the hash tag that keeps a session's keys
        // on one Cluster slot.
        if store.starts_with("redis+cluster://") && self.key_prefix.contains(['{', '}']) {
            issues.push("sessions.key_prefix", "must not contain `{` or `}` on a Redis Cluster");
        }
        self.header.validate(issues);
        issues.positive("sessions.ttl", self.ttl);
        issues.positive("sessions.lease", self.lease);
        issues.positive("sessions.store_timeout", self.store_timeout);
        issues.positive("sessions.sweep_interval", self.sweep_interval);
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            store: "embedded:data/ctxgate.redb".into(),
            header: SessionHeaders::default(),
            prompt_cache_key: false,
            key_prefix: "ctxgate:".into(),
            ttl: Duration::from_secs(7 * 24 * 3600),
            busy_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(5),
            store_timeout: Duration::from_secs(2),
            on_store_error: OnStoreError::FailClosed,
            max_goal_bytes: NonZeroUsize::new(64 * 1024).unwrap_or(NonZeroUsize::MIN),
            max_event_backlog_bytes: NonZeroUsize::new(8 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            sweep_interval: Duration::from_secs(600),
        }
    }
}

/// `sessions.header`: the headers naming a request's session, in the order they are tried. The
/// first is the gateway's own: a client sends it to name a session on purpose. The others are
/// clients' own conversation ids (Codex CLI's `thread-id`), taken when the first is absent
/// ([`crate::session::identify`] says what each may do). Written as one name or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionHeaders(Vec<String>);

impl SessionHeaders {
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self(names.into_iter().map(Into::into).collect())
    }

    /// The header a client names a session with on purpose.
    pub fn primary(&self) -> &str {
        self.0.first().map_or(crate::headers::SESSION_ID, String::as_str)
    }

    /// Every name, in order, the primary first.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    fn validate(&self, issues: &mut Issues) {
        if self.0.is_empty() {
            issues.push("sessions.header", "needs at least one header name");
        }
        for (i, name) in self.0.iter().enumerate() {
            if HeaderName::try_from(name.as_str()).is_err() {
                issues.push(format!("sessions.header[{i}]"), format!("`{name}` is not a valid header name"));
            } else if self.0[..i].iter().any(|earlier| earlier.eq_ignore_ascii_case(name)) {
                issues.push(format!("sessions.header[{i}]"), format!("`{name}` is listed twice"));
            }
        }
    }
}

impl Default for SessionHeaders {
    /// The gateway's own header, then Codex CLI's id of one conversation (a thread; its
    /// `session-id` is shared by a thread's sub-agents, so it names no one conversation).
    fn default() -> Self {
        Self::new([crate::headers::SESSION_ID, crate::headers::CODEX_THREAD_ID])
    }
}

impl<'de> Deserialize<'de> for SessionHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = SessionHeaders;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a header name or a list of header names")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(SessionHeaders(vec![name.to_string()]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(SessionHeaders(names))
            }
        }
        deserializer.deserialize_any(Names)
    }
}

/// The largest `server.max_json_depth`: a request's parts are parsed again later (a message
/// into a `Value`, under serde_json's limit of 128) inside a few levels of the gateway's own.
pub const MAX_JSON_DEPTH: usize = 120;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: NonZeroUsize,
    /// Deepest JSON nesting a chat request may have (objects and arrays, the body itself
    /// counting as 1); deeper ones get 400 `json_too_deep`. What a session stores stays under
    /// serde_json's recursion limit (128) with room for the gateway's own wrapping.
    pub max_json_depth: NonZeroUsize,
    /// Largest upstream answer the gateway holds whole (a session turn's or the tool loop's):
    /// a JSON body, or a streamed answer as assembled; a larger one fails the turn with 502.
    pub max_answer_bytes: NonZeroUsize,
    /// Largest single SSE event the gateway reads from an upstream stream it relays event by
    /// event; a larger one ends the stream with an error event.
    pub max_sse_event_bytes: NonZeroUsize,
    /// Deadline for the response headers of one request, retries included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests (streams included, until their last byte) served at once; more are shed with 503.
    pub max_concurrent_requests: NonZeroUsize,
    /// How long in-flight requests and streams may run after SIGTERM/SIGINT; tunnels (upgraded
    /// connections) are closed when it ends.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A request head must be complete this long after its first byte, or the connection is
    /// closed (slow-loris heads).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and nothing sent is closed after this long; so is
    /// a tunnel (an upgraded connection) with no byte either way.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request body must arrive in full this long after the handler starts reading it; 408
    /// after.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest request head (request line and headers) accepted, in bytes; larger gets 431.
    pub max_header_bytes: NonZeroUsize,
    /// Client connections open at once; more are refused with 503 and closed. Unset: half the
    /// process's soft open-files limit (`ulimit -n`), leaving the rest for upstream connections.
    pub max_connections: Option<NonZeroUsize>,
}

/// hyper's HTTP/1 read buffer cannot be smaller than this, and the buffer is what bounds a head.
pub(crate) const MIN_HEADER_BYTES: usize = 8 * 1024;
/// Above hyper's own default buffer (about 400 KiB); no client needs a head this large.
const MAX_HEADER_BYTES: usize = 1024 * 1024;

impl ServerConfig {
    fn validate(&self, issues: &mut Issues) {
        issues.positive("server.request_timeout", self.request_timeout);
        issues.positive("server.header_read_timeout", self.header_read_timeout);
        issues.positive("server.idle_timeout", self.idle_timeout);
        issues.positive("server.body_read_timeout", self.body_read_timeout);
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&self.max_header_bytes.get()) {
            issues.push(
                "server.max_header_bytes",
                format!("must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"),
            );
        }
        if self.max_json_depth.get() > MAX_JSON_DEPTH {
            issues.push(
                "server.max_json_depth",
                format!("must be at most {MAX_JSON_DEPTH} (parts of a stored request are parsed again)"),
            );
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: NonZeroUsize::new(16 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            // Deeply nested tool schemas reach 30-40; nothing real comes near 100.
            max_json_depth: NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN),
            max_answer_bytes: NonZeroUsize::new(32 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            max_sse_event_bytes: NonZeroUsize::new(4 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            request_timeout: Duration::from_secs(600),
            max_concurrent_requests: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_header_bytes: NonZeroUsize::new(64 * 1024).unwrap_or(NonZeroUsize::MIN),
            max_connections: None,
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

impl TelemetryConfig {
    fn validate(&self, issues: &mut Issues) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            issues.push("telemetry.log_level", format!("invalid filter: {e}"));
        }
    }
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
    /// Client paths (no query) whose 429/5xx answers are retried although they are `POST`s:
    /// the inference endpoints, which create nothing upstream. Other non-idempotent requests
    /// are retried only when they never reached the upstream (a connect error).
    pub inference_paths: Vec<String>,
    /// Retries after an upstream answer, as a share of requests over `budget_window`
    /// (tower's `TpsBudget`): a failing upstream gets at most this much extra load.
    pub budget_ratio: f32,
    /// Retries per second allowed whatever the ratio, so a quiet gateway still retries.
    pub budget_min_per_second: u32,
    /// How long a request counts towards the budget (1s to 60s).
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
}

impl RetryConfig {
    fn validate(&self, issues: &mut Issues) {
        if self.base_delay > self.max_delay {
            issues.push("retry.base_delay", "must not exceed retry.max_delay");
        }
        if !(0.0..=1000.0).contains(&self.budget_ratio) {
            issues.push("retry.budget_ratio", "must be between 0 and 1000 (0.2 retries a fifth of requests)");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.budget_window) {
            issues.push("retry.budget_window", "must be between 1s and 60s");
        }
        if self.budget_min_per_second >= i32::MAX as u32 {
            issues.push("retry.budget_min_per_second", "is too large");
        }
        for (i, path) in self.inference_paths.iter().enumerate() {
            if !path.starts_with("/v1/") || path.contains('?') {
                issues.push(format!("retry.inference_paths[{i}]"), "must be a /v1/ path without a query");
            }
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(5),
            inference_paths: ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
                .map(String::from)
                .to_vec(),
            budget_ratio: 0.2,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(10),
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
    /// The upstream takes no credential (a local model server). With gateway keys on, an
    /// upstream must hold a credential (`api_key_env`, a credential header) or say this.
    pub keyless: bool,
    /// Which API the upstream speaks for `POST /v1/responses`: unset, `responses` for the
    /// OpenAI API and `chat` for any other base URL (see [`UpstreamConfig::api`]).
    pub api: Option<UpstreamApi>,
}

/// The protocol an upstream is sent Responses API requests in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamApi {
    /// OpenAI's Responses API: `/v1/responses` is passed on as the client sent it.
    Responses,
    /// Chat Completions only: the gateway translates Responses requests and answers.
    Chat,
}

/// Headers that carry a provider credential: OpenAI's, Azure OpenAI's, Anthropic's.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "api-key", "x-api-key"];

impl UpstreamConfig {
    /// The API the upstream speaks: as configured, else `responses` when its base URL is the
    /// OpenAI API (it has both), else `chat`, which every OpenAI-compatible server has.
    pub fn api(&self) -> UpstreamApi {
        self.api.unwrap_or_else(|| {
            let host = self.base_url.split_once("://").map_or("", |(_, rest)| rest);
            let host = host.split(['/', ':']).next().unwrap_or("");
            if self.pool.is_none() && host.eq_ignore_ascii_case("api.openai.com") {
                UpstreamApi::Responses
            } else {
                UpstreamApi::Chat
            }
        })
    }

    /// Whether the gateway holds this upstream's credential (`api_key_env`, or a credential
    /// header in `headers`).
    pub fn holds_credential(&self) -> bool {
        self.api_key_env.is_some()
            || self.headers.keys().any(|k| CREDENTIAL_HEADERS.contains(&k.to_ascii_lowercase().as_str()))
    }
}

impl UpstreamConfig {
    fn validate(&self, at: &str, env: &dyn EnvSource, issues: &mut Issues) {
        if self.name.is_empty() {
            issues.push(format!("{at}.name"), "must not be empty");
        }
        issues.url(format!("{at}.base_url"), &self.base_url);
        if let Some(pool) = &self.pool {
            if self.base_url != UpstreamConfig::default().base_url {
                issues.push(
                    format!("{at}.base_url"),
                    "a pooled upstream takes its URLs from `pool`; remove base_url",
                );
            }
            pool.validate(&format!("{at}.pool"), issues);
        }
        if let Some(var) = &self.api_key_env {
            issues.env_set(format!("{at}.api_key_env"), env, var);
        }
        for (name, value) in &self.headers {
            if HeaderName::try_from(name.as_str()).is_err() {
                issues.push(format!("{at}.headers"), format!("`{name}` is not a valid header name"));
            }
            if HeaderValue::try_from(value.as_str()).is_err() {
                issues.push(
                    format!("{at}.headers"),
                    format!("the value of `{name}` is not a valid header value"),
                );
            }
        }
        issues.positive(format!("{at}.connect_timeout"), self.connect_timeout);
        issues.positive(format!("{at}.first_byte_timeout"), self.first_byte_timeout);
        issues.positive(format!("{at}.idle_timeout"), self.idle_timeout);
    }
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
            keyless: false,
            api: None,
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

impl RouteConfig {
    /// The route's own fields; the upstreams it names are checked against the config's.
    fn validate(&self, at: &str, issues: &mut Issues) {
        if self.models.is_empty() {
            issues.push(format!("{at}.models"), "must name at least one model or glob");
        }
        for (j, pattern) in self.models.iter().enumerate() {
            issues.glob(format!("{at}.models[{j}]"), pattern);
        }
        if self.upstreams.is_empty() {
            issues.push(format!("{at}.upstreams"), "must name at least one upstream");
        }
    }
}

impl Config {
    /// Loads `path` (if given), applies environment overrides from `env`, then validates:
    /// every problem, parse errors included, in one error.
    pub fn load(path: Option<&Path>, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let config = Self::read(path, env)?;
        config.validate(env)?;
        Ok(config)
    }

    /// Reads `path` (if given) with environment overrides, keeping what parsed (see
    /// [`Self::validate`], which reports the rest).
    pub fn read(path: Option<&Path>, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?,
            None => String::new(),
        };
        Self::parse_partial(&text, env)
    }

    /// [`Self::read`] of TOML text.
    pub fn read_text(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        Self::parse_partial(text, env)
    }

    /// Reads and parses a file, with environment overrides, without semantic validation.
    pub fn parse_file(path: &Path, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, env)
    }

    /// Parses TOML text with environment overrides applied, without semantic validation. A
    /// section that does not parse is reported and the others are still read, so one pass lists
    /// a problem per broken section; the config is returned only when every section parsed.
    pub fn parse(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let config = Self::parse_partial(text, env)?;
        config.parse_issues.clone().into_result()?;
        Ok(config)
    }

    /// [`Self::parse`], keeping what parsed: broken sections hold defaults and are named in
    /// `unparsed`, and [`Self::validate`] reports their parse errors with everything else.
    fn parse_partial(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::single("", format!("invalid TOML: {}", e.message())))?;
        let mut issues = Issues::default();
        let overrides = env::apply_overrides(&mut value, env, &mut issues);
        let Some(table) = value.as_table_mut() else {
            return Err(ConfigError::single("", "the configuration must be a TOML table"));
        };
        let mut unparsed = Vec::new();
        let unknown: Vec<String> =
            table.keys().filter(|k| !SECTIONS.contains(&k.as_str())).cloned().collect();
        for key in unknown {
            table.remove(&key);
            issues.push(&key, format!("unknown section `{key}`, expected one of {}", SECTIONS.join(", ")));
        }
        let mut config = loop {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
                Ok(config) => break config,
                Err(e) => {
                    let path = e.path().to_string();
                    let section = path.split(['.', '[']).next().unwrap_or("").to_string();
                    issues.push(if path == "." { "" } else { &path }, e.into_inner().to_string());
                    if table.remove(&section).is_none() {
                        // Not inside a section: nothing left to isolate.
                        issues.attribute(&overrides);
                        return issues.into_result().map(|()| Config::default());
                    }
                    unparsed.push(section);
                }
            }
        };
        issues.attribute(&overrides);
        config.overrides = overrides;
        config.unparsed = unparsed;
        config.parse_issues = issues;
        Ok(config)
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
    fn the_responses_websocket_is_terminated_unless_told_to_tunnel() {
        assert_eq!(Config::default().responses.websocket, WebSocketMode::Terminate);
        let config = Config::parse("[responses]\nwebsocket = \"tunnel\"", &no_env()).unwrap();
        assert_eq!(config.responses.websocket, WebSocketMode::Tunnel);
        let err = Config::parse("[responses]\nwebsocket = \"proxy\"", &no_env()).unwrap_err();
        assert!(err.to_string().contains("responses.websocket"), "{err}");
    }

    #[test]
    fn zero_limits_fail_to_parse() {
        let err = Config::parse("[server]\nmax_concurrent_requests = 0", &no_env()).unwrap_err();
        assert!(err.to_string().contains("server.max_concurrent_requests"), "{err}");
    }
}
