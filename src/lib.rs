//! ctxgate: an OpenAI-compatible gateway in front of LLM APIs.
//!
//! Layout, request path first. Dependencies point down this list: handlers → features →
//! foundations; a feature never names [`AppState`] or another layer above it.
//!
//! The edge:
//! - [`server`]: accept loop, HTTP/1 + HTTP/2, connection limits (count, head size and time,
//!   idle), graceful shutdown.
//! - [`stack`]: the tower layers, in their one documented order, and the extension contract.
//! - [`request_path`]: the path normalised once (dot segments), so keys, routes and upstreams agree.
//! - [`router`]: the route table, `(method, path)` → handler, and the routes' metric labels.
//! - [`observe`], [`limit`]: per-request metrics; body and concurrency limits.
//! - [`tunnel`]: HTTP/1.1 upgrades (WebSocket): on passthrough routes copied both ways
//!   between client and upstream, or served by a handler (the Responses API's WebSocket
//!   mode); run by the server as the connection it is.
//!
//! Handlers:
//! - [`chat`]: `POST /v1/chat/completions`, the one pipeline (read → prepare → send → relay →
//!   finish); stateless, session and degraded turns differ in its `Mode` only; the takeover
//!   sweep that re-issues turns whose process died.
//! - [`responses`]: `POST /v1/responses` (OpenAI's Responses API) as a second front end of the
//!   chat pipeline, and the stored responses a `previous_response_id` chain continues from;
//!   background responses, their cancel and the replay of their streams;
//!   `POST /v1/responses/compact` answered by the gateway's own compaction; the Responses
//!   API's WebSocket mode, each `response.create` run as that `POST`.
//! - [`handlers`]: the model list and passthrough routes; the sessions API.
//!
//! Features (each gets plain values or narrow handles, never the application):
//! - [`compress`]: rule passes, compaction epochs and the prefix-stable layout; pure.
//! - [`tools`]: gateway tools (HTTP, MCP), run concurrently; what a session keeps of them.
//! - [`session`]: the session protocol: which session a request names, checkpoints, stores,
//!   the lease, the event log.
//! - [`upstream`]: routing by model, endpoint pools (balancing, affinity, ejection, DNS),
//!   retries and failover, streamed bodies.
//! - [`auth`]: gateway keys and per-key limits (requests, tokens, in flight), local or Redis.
//!
//! Foundations:
//! - [`openai`]: wire types: the chat request parsed once, messages, answers, SSE, `usage`.
//! - [`body`], [`error`], [`headers`]: the body type, `GatewayError` and its one mapping, the
//!   public header names; [`http_util`], [`http_client`], [`retry`], [`redis_conn`], [`tokens`].
//! - [`config`]: loading, env overrides, validation in one collector; [`telemetry`]: logs and
//!   metric names.

pub mod auth;
pub mod body;
mod chat;
pub mod compress;
pub mod config;
pub mod error;
mod handlers;
mod headers;
mod http_client;
mod http_util;
mod limit;
mod memo;
mod observe;
pub mod openai;
pub mod redis_conn;
mod request_path;
/// Public for the items bench (`responses::items`); the rest is the crate's.
pub mod responses;
mod retry;
mod router;
mod server;
pub mod session;
mod stack;
pub mod telemetry;
pub mod tokens;
pub mod tools;
mod tunnel;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::{Config, EnvSource, ValidConfig};
use crate::session::Sessions;
use crate::telemetry::{Metrics, ModelLabels};
use crate::upstream::Upstreams;

/// Shared state behind every request: built once at start-up, read by the handlers. Features
/// below the handlers get the parts they need, never this.
#[derive(Debug)]
pub struct AppState {
    pub(crate) config: Config,
    pub(crate) upstreams: Upstreams,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) compressor: compress::Compressor,
    /// Public for the tool fan-out bench, which runs calls without a model in between.
    pub tools: tools::Registry,
    pub(crate) auth: Arc<auth::Auth>,
    pub(crate) metrics: Arc<Metrics>,
    /// Requests served at once (`server.max_concurrent_requests`): HTTP requests and the turns
    /// of terminated WebSockets draw on the same permits.
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    model_labels: ModelLabels,
    sheets: chat::compression::Sheets,
    /// The front end that finishes a resumed turn it began (background responses).
    resumer: chat::Resumer,
    /// Background responses running in this process.
    background: responses::Running,
    /// Work that outlives its request (session turns, stream relays, state sheets, replays),
    /// waited for on shutdown.
    tasks: TaskTracker,
}

/// A failure to start: the configuration is invalid or a resource could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot open the session store: {0}")]
    Store(#[from] session::StoreError),
    #[error("cannot set up gateway keys and limits: {0}")]
    Auth(#[from] auth::OpenError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl AppState {
    /// Builds the upstream clients and tools and opens the session store, from a config
    /// validated once before.
    pub async fn new(config: ValidConfig, env: &dyn EnvSource) -> Result<Arc<Self>, StartupError> {
        let config = config.into_inner();
        // MCP's HTTP client (reqwest) takes rustls's process-wide provider: the same ring
        // provider the upstream clients use. Installing it twice (tests) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(Metrics::new());
        let upstreams = Upstreams::from_config(&config, env, metrics.clone())?;
        let sessions = Arc::new(Sessions::open(&config.sessions, metrics.clone()).await?);
        let compressor = compress::Compressor::new(&config)?;
        let tools = tools::Registry::from_config(&config, env, metrics.clone())?;
        let auth = Arc::new(auth::Auth::open(&config, metrics.clone()).await?);
        let model_labels = ModelLabels::new(&config);
        let permits = Arc::new(tokio::sync::Semaphore::new(config.server.max_concurrent_requests.get()));
        Ok(Arc::new(Self {
            config,
            upstreams,
            sessions,
            compressor,
            tools,
            auth,
            metrics,
            permits,
            model_labels,
            sheets: chat::compression::Sheets::default(),
            resumer: responses::resumed,
            background: responses::Running::default(),
            tasks: TaskTracker::new(),
        }))
    }

    /// The upstreams (a test scripts a DNS pool's resolver through them).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Runs `task` detached from the request that started it, tracked so shutdown waits for it.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Every model named in config: upstreams' `models` and exact route names, deduplicated.
    pub(crate) fn configured_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .config
            .upstreams
            .iter()
            .flat_map(|u| u.models.iter().cloned())
            .chain(
                self.config
                    .routes
                    .iter()
                    .flat_map(|r| r.models.iter().filter(|m| !m.contains(['*', '?', '[', '{'])).cloned()),
            )
            .collect();
        let mut seen = std::collections::HashSet::new();
        models.retain(|m| seen.insert(m.clone()));
        models
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains in-flight requests
/// and detached work (session turns committing) for up to `server.shutdown_timeout` in all.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let drain = state.config.server.shutdown_timeout;
    let (signaled, at) = tokio::sync::oneshot::channel();
    let stop = tokio_util::sync::CancellationToken::new();
    // Interrupted turns are taken over now, not when a client next asks.
    state.spawn(chat::takeover::sweep(state.clone(), stop.clone()));
    let shutdown = async move {
        shutdown.await;
        stop.cancel();
        let _ = signaled.send(tokio::time::Instant::now());
    };
    let service = stack::build(state.clone());
    server::run(listener, service, shutdown, &state.config.server, state.metrics.clone()).await;
    let deadline = at.await.unwrap_or_else(|_| tokio::time::Instant::now()) + drain;
    state.tasks.close();
    if tokio::time::timeout_at(deadline, state.tasks.wait()).await.is_err() {
        tracing::warn!(tasks = state.tasks.len(), "shutdown: detached work still running at the deadline");
    }
}
