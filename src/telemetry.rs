//! Logging setup and every Prometheus metric ctxgate exports, named in one place.
//!
//! Logs never carry `Authorization`, API keys or prompt and response bodies: spans record the
//! method, path, status and request id only.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: logs written to a file or a pipe stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests start many gateways in one process) is harmless.
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabel {
    pub upstream: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabel {
    pub upstream: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorKind {
    pub kind: &'static str,
}

/// The `model` label of per-model metrics: the request's model when config names it (routes,
/// upstream model lists), else the `compression.models[]` pattern it matched, else `other`, so
/// clients cannot grow the label set.
#[derive(Debug)]
pub struct ModelLabels {
    known: std::collections::HashSet<String>,
    patterns: Vec<(globset::GlobMatcher, String)>,
}

impl ModelLabels {
    pub fn new(config: &crate::config::Config) -> Self {
        let known = config
            .upstreams
            .iter()
            .flat_map(|u| u.models.iter().cloned())
            .chain(config.routes.iter().flat_map(|r| r.models.iter().cloned()))
            .collect();
        let patterns = config
            .compression
            .models
            .iter()
            .flat_map(|m| m.matches.iter())
            .filter_map(|p| Some((globset::Glob::new(p).ok()?.compile_matcher(), p.clone())))
            .collect();
        Self { known, patterns }
    }

    pub fn label(&self, model: &str) -> String {
        if self.known.contains(model) {
            return model.to_string();
        }
        self.patterns
            .iter()
            .find(|(glob, _)| glob.is_match(model))
            .map_or_else(|| "other".into(), |(_, p)| p.clone())
    }
}

/// Every metric, registered once at start-up.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub errors: Family<ErrorKind, Counter>,
    pub request_duration: Family<RouteLabel, Histogram>,
    pub time_to_first_byte: Family<RouteLabel, Histogram>,
    pub gateway_overhead: Family<RouteLabel, Histogram>,
    pub in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub upstream_duration: Family<UpstreamLabel, Histogram>,
    pub upstream_retries: Family<RetryLabel, Counter>,
    /// Error answers that could have been retried but were not: `not_idempotent`, `budget`.
    pub upstream_retries_withheld: Family<RetryLabel, Counter>,
    pub upstream_failovers: Family<UpstreamLabel, Counter>,
    pub upstream_stream_aborts: Family<UpstreamLabel, Counter>,
    pub tokens: Family<TokenLabel, Counter<u64, AtomicU64>>,
    pub session_commits: Family<OutcomeLabel, Counter>,
    pub session_busy: Counter,
    pub session_resumes: Family<OutcomeLabel, Counter>,
    pub session_history_rewrites: Counter,
    pub session_store_errors: Counter,
    pub session_store_duration: Family<OpLabel, Histogram>,
    pub checkpoint_bytes: Histogram,
    pub compression_tokens: Family<ModelStage, Counter<u64, AtomicU64>>,
    pub compression_requests: Family<ModelStage, Counter>,
    pub compression_saved_tokens: Family<RuleLabel, Counter<u64, AtomicU64>>,
    pub compression_epochs: Family<ModelStage, Counter>,
    pub compression_prefix_bytes: Family<ModelStage, Counter<u64, AtomicU64>>,
    pub model_tokens: Family<ModelStage, Counter<u64, AtomicU64>>,
    pub summarizer_duration: Histogram,
    pub summarizer_failures: Family<ReasonLabel, Counter>,
    pub tools: ToolMetrics,
    pub limits: LimitMetrics,
    pub pools: PoolMetrics,
    pub connections: ConnectionMetrics,
    pub websocket: WebSocketMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolOutcomeLabel {
    pub tool: String,
    pub outcome: &'static str,
}

/// Gateway tool runs. Tool labels are configured names (or `unknown`), so they stay bounded.
#[derive(Debug)]
pub struct ToolMetrics {
    pub calls: Family<ToolOutcomeLabel, Counter>,
    pub duration: Family<ToolLabel, Histogram>,
    pub attempts: Family<ToolLabel, Histogram>,
    pub rounds: Histogram,
    pub tasks_in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl ToolMetrics {
    fn register(registry: &mut Registry) -> Self {
        let calls = Family::<ToolOutcomeLabel, Counter>::default();
        registry.register("tool_calls", "Gateway tool calls by tool and outcome", calls.clone());
        let duration =
            Family::<ToolLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register("tool_duration_seconds", "Gateway tool calls, start to result", duration.clone());
        let attempts = Family::<ToolLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 10.0])
        });
        registry.register("tool_attempts", "Attempts per gateway tool call", attempts.clone());
        let rounds = Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0]);
        registry.register("tool_rounds", "Rounds of gateway tool runs per chat request", rounds.clone());
        let tasks_in_flight = Gauge::default();
        registry.register(
            "tool_tasks_in_flight",
            "Durable tool tasks being run or polled",
            tasks_in_flight.clone(),
        );
        Self { calls, duration, attempts, rounds, tasks_in_flight }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLimitLabel {
    pub key: String,
    pub limit: &'static str,
}

/// Gateway keys and their limits. Key labels are key names, set by the operator.
#[derive(Debug)]
pub struct LimitMetrics {
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub rate_limited: Family<KeyLimitLabel, Counter>,
    /// Checks decided by this replica alone because the shared Redis did not answer.
    pub fallbacks: Counter,
    /// 1 while the shared limiter is unreachable and limits are per replica.
    pub degraded: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Requests the local pre-check refused without asking Redis.
    pub prechecked: Counter,
    /// Tokens of keys with a token limit: `estimated` before the call, `used` by `usage`.
    pub tokens: Family<KeyKindLabel, Counter<u64, AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyKindLabel {
    pub key: String,
    pub kind: &'static str,
}

impl LimitMetrics {
    fn register(registry: &mut Registry) -> Self {
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused for their gateway key, by reason",
            auth_failures.clone(),
        );
        let rate_limited = Family::<KeyLimitLabel, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429, by key and limit",
            rate_limited.clone(),
        );
        let fallbacks = Counter::default();
        registry.register(
            "rate_limit_fallbacks",
            "Limit checks decided per replica because Redis did not answer",
            fallbacks.clone(),
        );
        let degraded = Gauge::default();
        registry.register(
            "rate_limit_degraded",
            "1 while limits are enforced per replica because Redis is unreachable",
            degraded.clone(),
        );
        let prechecked = Counter::default();
        registry.register(
            "rate_limit_local_rejections",
            "Requests refused by the local pre-check without a Redis round trip",
            prechecked.clone(),
        );
        let tokens = Family::<KeyKindLabel, Counter<u64, AtomicU64>>::default();
        registry.register(
            "rate_limit_tokens",
            "Tokens of keys with a token limit, estimated before the call and used by the upstream's usage",
            tokens.clone(),
        );
        Self { auth_failures, rate_limited, fallbacks, degraded, prechecked, tokens }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub upstream: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointChoiceLabel {
    pub upstream: String,
    pub endpoint: String,
    pub choice: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointReasonLabel {
    pub upstream: String,
    pub endpoint: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOutcomeLabel {
    pub upstream: String,
    pub outcome: &'static str,
}

/// Client connections.
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    pub open: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Connections tunnelled to an upstream after an HTTP/1.1 upgrade (counted in `open` too).
    pub tunnels: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Connections ctxgate closed itself, by reason: `refused` (over `server.max_connections`),
    /// `header_timeout`, `idle_timeout`, `shutdown` (a tunnel at the end of the drain).
    pub closed: Family<ReasonLabel, Counter>,
}

impl ConnectionMetrics {
    fn register(registry: &mut Registry) -> Self {
        let open = Gauge::default();
        registry.register("connections_open", "Client connections open", open.clone());
        let tunnels = Gauge::default();
        registry.register(
            "tunnels_open",
            "Client connections upgraded (WebSocket) and tunnelled to an upstream",
            tunnels.clone(),
        );
        let closed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_closed",
            "Client connections ctxgate closed itself, by reason (refused, header_timeout, idle_timeout, shutdown)",
            closed.clone(),
        );
        Self { open, tunnels, closed }
    }
}

/// The Responses API's WebSocket mode, terminated by ctxgate (the connections are counted in
/// `connections_open` and `tunnels_open` too).
#[derive(Clone, Debug)]
pub struct WebSocketMetrics {
    /// WebSocket connections accepted on `/v1/responses`.
    pub connections: Counter,
    /// `response.create` messages, by outcome: `completed` (`response.completed` or
    /// `response.incomplete`), `failed` (the response failed once it had begun), `error` (an
    /// error frame instead of a response), `cancelled` (the client left mid-turn).
    pub turns: Family<OutcomeLabel, Counter>,
}

impl WebSocketMetrics {
    fn register(registry: &mut Registry) -> Self {
        let connections = Counter::default();
        registry.register(
            "responses_websocket_connections",
            "WebSocket connections accepted on /v1/responses (the Responses API's WebSocket mode)",
            connections.clone(),
        );
        let turns = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "responses_websocket_turns",
            "response.create messages over WebSocket, by outcome (completed, failed, error, cancelled)",
            turns.clone(),
        );
        Self { connections, turns }
    }
}

/// Upstream pools, by endpoint. Endpoint labels are `host:port` of configured endpoints or of
/// addresses found in DNS; an endpoint that leaves the pool has its series removed, so the
/// label set follows the pool's membership.
#[derive(Clone, Debug)]
pub struct PoolMetrics {
    pub requests: Family<EndpointChoiceLabel, Counter>,
    pub in_flight: Family<EndpointLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub failures: Family<EndpointReasonLabel, Counter>,
    pub ejections: Family<EndpointLabel, Counter>,
    pub available: Family<EndpointLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub endpoints: Family<UpstreamLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub resolutions: Family<UpstreamOutcomeLabel, Counter>,
}

impl PoolMetrics {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<EndpointChoiceLabel, Counter>::default();
        registry.register(
            "upstream_endpoint_requests",
            "Attempts sent to a pool endpoint, by how it was chosen (home, spill, moved, balanced)",
            requests.clone(),
        );
        let in_flight = Family::default();
        registry.register(
            "upstream_endpoint_in_flight",
            "Requests (and their streams, until the last byte; tunnels, until they close) in flight on a pool endpoint",
            in_flight.clone(),
        );
        let failures = Family::<EndpointReasonLabel, Counter>::default();
        registry.register(
            "upstream_endpoint_failures",
            "Attempts on a pool endpoint that count against its health, by reason (connect, transport, timeout, status)",
            failures.clone(),
        );
        let ejections = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "upstream_endpoint_ejections",
            "Times a pool endpoint was taken out after consecutive failures or a failed check",
            ejections.clone(),
        );
        let available = Family::default();
        registry.register(
            "upstream_endpoint_available",
            "1 while a pool endpoint takes requests, 0 while it is ejected",
            available.clone(),
        );
        let endpoints = Family::default();
        registry.register("upstream_pool_endpoints", "Endpoints in a pool", endpoints.clone());
        let resolutions = Family::<UpstreamOutcomeLabel, Counter>::default();
        registry.register(
            "upstream_pool_resolutions",
            "DNS resolutions of a pool's name, by outcome (ok, error)",
            resolutions.clone(),
        );
        Self { requests, in_flight, failures, ejections, available, endpoints, resolutions }
    }
}

/// Handles on one model's upstream-reported token counters.
#[derive(Clone, Debug)]
pub struct ModelUsage {
    prompt: Counter<u64, AtomicU64>,
    cached: Counter<u64, AtomicU64>,
}

impl crate::openai::UsageObserver for ModelUsage {
    fn record(&self, usage: &crate::openai::Usage) {
        self.prompt.inc_by(usage.prompt_tokens);
        self.cached.inc_by(usage.cached_tokens());
    }
}

/// A model (as named in config, or `other`) and a stage or kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStage {
    pub model: String,
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0].into_iter()
}

/// Overhead is tens of microseconds when healthy, so its buckets start at 10µs.
fn overhead_buckets() -> impl Iterator<Item = f64> {
    [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]
        .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ctxgate");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "Requests served, by route and status", requests.clone());
        let errors = Family::<ErrorKind, Counter>::default();
        registry.register("errors", "Errors ctxgate produced itself, by kind", errors.clone());
        let request_duration =
            Family::<RouteLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "request_duration_seconds",
            "From request arrival to the last response byte",
            request_duration.clone(),
        );
        let time_to_first_byte =
            Family::<RouteLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "time_to_first_byte_seconds",
            "From request arrival to the first response body byte",
            time_to_first_byte.clone(),
        );
        let gateway_overhead =
            Family::<RouteLabel, Histogram>::new_with_constructor(|| Histogram::new(overhead_buckets()));
        registry.register(
            "gateway_overhead_seconds",
            "Time to response headers minus the time spent waiting on upstreams (attempts and backoff)",
            gateway_overhead.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("requests_in_flight", "Requests and streams being served", in_flight.clone());
        let upstream_duration =
            Family::<UpstreamLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "upstream_duration_seconds",
            "From sending the upstream request to the upstream's last body byte",
            upstream_duration.clone(),
        );
        let upstream_retries = Family::<RetryLabel, Counter>::default();
        registry.register(
            "upstream_retries",
            "Upstream attempts retried, by reason",
            upstream_retries.clone(),
        );
        let upstream_retries_withheld = Family::<RetryLabel, Counter>::default();
        registry.register(
            "upstream_retries_withheld",
            "Upstream error answers returned without the retry the policy would otherwise make, by reason",
            upstream_retries_withheld.clone(),
        );
        let upstream_failovers = Family::<UpstreamLabel, Counter>::default();
        registry.register(
            "upstream_failovers",
            "Requests moved from this upstream to the next of their route",
            upstream_failovers.clone(),
        );
        let upstream_stream_aborts = Family::<UpstreamLabel, Counter>::default();
        registry.register(
            "upstream_stream_aborts",
            "Upstream bodies that failed or went idle past idle_timeout mid-response",
            upstream_stream_aborts.clone(),
        );
        let tokens = Family::<TokenLabel, Counter<u64, AtomicU64>>::default();
        registry.register(
            "tokens",
            "Tokens reported by upstream usage objects, by kind (prompt, completion, cached)",
            tokens.clone(),
        );
        let session_commits = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "session_commits",
            "Checkpoint commits by outcome (committed, conflict, error)",
            session_commits.clone(),
        );
        let session_resumes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "session_resumes",
            "Interrupted turns taken over, by outcome (resumed, taken_by_another, unreadable, error)",
            session_resumes.clone(),
        );
        let session_busy = Counter::default();
        registry.register("session_busy", "Requests refused with 409 session_busy", session_busy.clone());
        let session_history_rewrites = Counter::default();
        registry.register(
            "session_history_rewrites",
            "Full-history requests whose earlier messages differed from the transcript",
            session_history_rewrites.clone(),
        );
        let session_store_errors = Counter::default();
        registry.register(
            "session_store_errors",
            "Session store operations that failed (unreachable, timed out)",
            session_store_errors.clone(),
        );
        let session_store_duration = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0])
        });
        registry.register(
            "session_store_duration_seconds",
            "Session store latency by operation (load, commit)",
            session_store_duration.clone(),
        );
        let checkpoint_bytes =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1024.0, 4.0, 10));
        registry.register("checkpoint_bytes", "Size of committed checkpoints", checkpoint_bytes.clone());
        let compression_tokens = Family::<ModelStage, Counter<u64, AtomicU64>>::default();
        registry.register(
            "compression_tokens",
            "Prompt tokens of chat requests before and after compression, by model and stage",
            compression_tokens.clone(),
        );
        let compression_requests = Family::<ModelStage, Counter>::default();
        registry.register(
            "compression_requests",
            "Chat requests by what shaped them (off, none, rules, hybrid)",
            compression_requests.clone(),
        );
        let compression_saved_tokens = Family::<RuleLabel, Counter<u64, AtomicU64>>::default();
        registry.register(
            "compression_saved_tokens",
            "Tokens each rule removed at compaction epochs",
            compression_saved_tokens.clone(),
        );
        let compression_epochs = Family::<ModelStage, Counter>::default();
        registry.register(
            "compression_epochs",
            "Compaction epochs by kind (rules, hybrid), plus resets and sheet fallbacks",
            compression_epochs.clone(),
        );
        let compression_prefix_bytes = Family::<ModelStage, Counter<u64, AtomicU64>>::default();
        registry.register(
            "compression_prefix_bytes",
            "Session requests' message bytes: previous request's (previous), and shared with it as a prefix (shared)",
            compression_prefix_bytes.clone(),
        );
        let model_tokens = Family::<ModelStage, Counter<u64, AtomicU64>>::default();
        registry.register(
            "model_tokens",
            "Upstream-reported prompt and cached prompt tokens of chat requests, by model",
            model_tokens.clone(),
        );
        let summarizer_duration = Histogram::new(latency_buckets());
        registry.register(
            "summarizer_duration_seconds",
            "State sheet calls, start to answer (or failure)",
            summarizer_duration.clone(),
        );
        let summarizer_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "summarizer_failures",
            "State sheet calls that failed, by reason",
            summarizer_failures.clone(),
        );
        let tools = ToolMetrics::register(&mut registry);
        let limits = LimitMetrics::register(&mut registry);
        let pools = PoolMetrics::register(&mut registry);
        let connections = ConnectionMetrics::register(&mut registry);
        let websocket = WebSocketMetrics::register(&mut registry);
        Self {
            websocket,
            tools,
            limits,
            pools,
            connections,
            compression_tokens,
            compression_requests,
            compression_saved_tokens,
            compression_epochs,
            compression_prefix_bytes,
            model_tokens,
            summarizer_duration,
            summarizer_failures,
            session_commits,
            session_busy,
            session_resumes,
            session_history_rewrites,
            session_store_errors,
            session_store_duration,
            checkpoint_bytes,
            registry,
            requests,
            errors,
            request_duration,
            time_to_first_byte,
            gateway_overhead,
            in_flight,
            upstream_duration,
            upstream_retries,
            upstream_retries_withheld,
            upstream_failovers,
            upstream_stream_aborts,
            tokens,
        }
    }

    /// Token counters for chat requests to `model` (a bounded label, see `compress::Active`).
    pub fn for_model(&self, model: &str) -> ModelUsage {
        let stage = |stage| ModelStage { model: model.to_string(), stage };
        // One statement each: a family's read guard lives to the end of its statement, and
        // creating the second entry needs the write lock.
        let prompt = self.model_tokens.get_or_create(&stage("prompt")).clone();
        let cached = self.model_tokens.get_or_create(&stage("cached")).clone();
        ModelUsage { prompt, cached }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// One upstream's handles, resolved once at start-up.
    pub fn for_upstream(&self, name: &str) -> UpstreamMetrics {
        let label = UpstreamLabel { upstream: name.to_string() };
        let tokens =
            |kind| self.tokens.get_or_create(&TokenLabel { upstream: name.to_string(), kind }).clone();
        UpstreamMetrics {
            pool: self.pools.clone(),
            duration: self.upstream_duration.get_or_create(&label).clone(),
            stream_aborts: self.upstream_stream_aborts.get_or_create(&label).clone(),
            failovers: self.upstream_failovers.get_or_create(&label).clone(),
            prompt_tokens: tokens("prompt"),
            completion_tokens: tokens("completion"),
            cached_tokens: tokens("cached"),
        }
    }
}

/// One upstream's metric handles: clones sharing the registered metrics, so the request path
/// neither allocates label strings nor looks up label families.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    /// The pool families, for an upstream that is a pool (its endpoints resolve their own).
    pub pool: PoolMetrics,
    pub duration: Histogram,
    pub stream_aborts: Counter,
    pub failovers: Counter,
    prompt_tokens: Counter<u64, AtomicU64>,
    completion_tokens: Counter<u64, AtomicU64>,
    cached_tokens: Counter<u64, AtomicU64>,
}

impl UpstreamMetrics {
    pub fn record_usage(&self, usage: &crate::openai::Usage) {
        self.prompt_tokens.inc_by(usage.prompt_tokens);
        self.completion_tokens.inc_by(usage.completion_tokens);
        self.cached_tokens.inc_by(usage.cached_tokens());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_handles_update_the_registered_metrics() {
        let metrics = Metrics::new();
        let handles = metrics.for_upstream("u");
        handles.record_usage(&crate::openai::Usage { prompt_tokens: 7, ..Default::default() });
        handles.failovers.inc();
        let text = metrics.encode();
        assert!(text.contains(r#"ctxgate_tokens_total{upstream="u",kind="prompt"} 7"#), "{text}");
        assert!(text.contains(r#"ctxgate_upstream_failovers_total{upstream="u"} 1"#), "{text}");
    }
}
