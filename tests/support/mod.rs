//! Test harness: a real ctxgate bound on `127.0.0.1:0` through [`ctxgate::serve`], in front of
//! one or more real `mock-upstream` servers, each on its own ephemeral port. Nothing is shared
//! between tests, so they run in parallel.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod codex;
pub mod gateway;
pub mod mcp;
pub mod python;
pub mod recorder;
pub mod redis;
pub mod stores;
pub mod tool_server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ctxgate::config::{Config, UpstreamConfig};
use ctxgate::AppState;
use mock_upstream::Server;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[allow(unused_imports)]
pub use mock_upstream::{fixtures, Chunk, Gate, Reply};

type ConfigFn = Box<dyn FnOnce(&mut Config) + Send>;

pub struct HarnessBuilder {
    upstreams: Vec<mock_upstream::Builder>,
    config: Vec<ConfigFn>,
}

pub struct Harness {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    /// Holds the embedded session store's file.
    _data: tempfile::TempDir,
    upstreams: Vec<Option<Server>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder { upstreams: Vec::new(), config: Vec::new() }
    }

    /// A gateway in front of one default-mode mock upstream.
    pub async fn start() -> Harness {
        Self::builder().start().await
    }

    pub fn upstream(&self, i: usize) -> &Server {
        self.upstreams[i].as_ref().expect("upstream was killed")
    }

    /// Drops upstream `i`: its listener and every open connection close at once.
    pub fn kill_upstream(&mut self, i: usize) {
        self.upstreams[i] = None;
    }

    pub fn v1(&self, path: &str) -> String {
        format!("{}/v1{path}", self.url)
    }

    /// A request to `/v1{path}` as the test client (with [`gateway::AUTH`], as [`Self::chat`]).
    pub fn v1_as_client(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.v1(path)).header("authorization", gateway::AUTH)
    }

    pub fn chat(&self) -> reqwest::RequestBuilder {
        self.client
            .post(self.v1("/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", gateway::AUTH)
    }

    pub async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }

    /// The value of one metric sample, e.g. `ctxgate_requests_in_flight`, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        sample_value(&self.metrics().await, sample)
    }

    /// Polls a metric sample until it has `value`; fails after 10 s.
    #[allow(dead_code)] // not every test binary polls a metric
    pub async fn metric_becomes(&self, sample: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(sample).await;
            if now == value {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sample} is {now}, never {value}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signals shutdown; the gateway stops accepting and drains.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the serve task to return (after [`begin_shutdown`](Self::begin_shutdown)).
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Reads one sample (name plus labels, exactly as exposed) from Prometheus text.
pub fn sample_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

impl HarnessBuilder {
    /// Adds a mock upstream. Several are named `u0`, `u1`, ... and all of them form the route
    /// for every model, in that failover order. None added: one default-mode mock.
    pub fn upstream(mut self, mock: mock_upstream::Builder) -> Self {
        self.upstreams.push(mock);
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.config.push(Box::new(f));
        self
    }

    pub async fn start(self) -> Harness {
        self.start_with_env::<0>([]).await
    }

    /// Starts with these variables in the gateway's (injected) environment.
    pub async fn start_with_env<const N: usize>(mut self, env: [(&str, &str); N]) -> Harness {
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if self.upstreams.is_empty() {
            self.upstreams.push(Server::builder());
        }
        let mut servers = Vec::new();
        for mock in self.upstreams {
            servers.push(mock.start().await.unwrap());
        }
        let mut config = Config::default();
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.shutdown_timeout = Duration::from_secs(10);
        // Fast retries keep failure tests quick; the policy is the same.
        config.retry.base_delay = Duration::from_millis(1);
        config.retry.max_delay = Duration::from_millis(5);
        config.upstreams = servers
            .iter()
            .enumerate()
            .map(|(i, s)| UpstreamConfig {
                name: format!("u{i}"),
                base_url: s.base_url(),
                first_byte_timeout: Duration::from_secs(10),
                ..UpstreamConfig::default()
            })
            .collect();
        if servers.len() > 1 {
            config.routes = vec![ctxgate::config::RouteConfig {
                models: vec!["*".into()],
                upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            }];
        }
        let data = tempfile::tempdir().unwrap();
        config.sessions.store = format!("embedded:{}", data.path().join("sessions.redb").display());
        for f in self.config {
            f(&mut config);
        }

        let state = AppState::new(config.validated(&env).unwrap(), &env).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(ctxgate::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Harness {
            url: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap(),
            state,
            _data: data,
            upstreams: servers.into_iter().map(Some).collect(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

/// A streamed answer of `words` (one content chunk each), a stop chunk and `[DONE]`; with
/// `gate_after = (i, gate)` the stream holds before word `i` until the gate opens.
pub fn chunks(words: &[&str], gate_after: Option<(usize, &Gate)>) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if let Some((at, gate)) = gate_after {
            if i == at {
                chunks.push(Chunk::Wait(gate.clone()));
            }
        }
        chunks.push(Chunk::json(fixtures::content_chunk(i, w)));
    }
    chunks.push(Chunk::json(fixtures::finish_chunk("stop")));
    chunks.push(Chunk::done());
    chunks
}

/// A small valid chat request body.
pub fn chat_body(stream: bool) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": "mock-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."}
        ]
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// A gateway key named `name` whose secret is `raw`, with no limits: tests set what they need.
#[allow(dead_code)] // not every test binary uses keys
pub fn key(name: &str, raw: &str) -> ctxgate::config::KeyConfig {
    ctxgate::config::KeyConfig {
        name: name.into(),
        sha256: ctxgate::auth::hash_key(raw.as_bytes()),
        models: Vec::new(),
        requests_per_minute: None,
        burst: None,
        tokens_per_minute: None,
        max_concurrent: None,
    }
}
