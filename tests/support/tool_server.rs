//! An in-process HTTP tool endpoint with scripted behaviour per path: latency, failures
//! before success, `Retry-After`, oversized bodies. It records every call with its start and
//! end, and the most calls it ever held at once per path, so tests can assert overlap and
//! limits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// How a path answers.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    pub delay: Duration,
    /// Statuses answered before succeeding, one per call (e.g. `[503, 503]`).
    pub failures: Vec<u16>,
    /// `Retry-After` seconds sent with failures.
    pub retry_after: Option<u64>,
    /// Bytes of filler in a successful body instead of the echo.
    pub body_bytes: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub path: String,
    pub body: String,
    pub start: Instant,
    pub end: Instant,
}

#[derive(Default)]
struct Shared {
    behaviours: HashMap<String, Behaviour>,
    calls: HashMap<String, usize>,
    hits: Vec<Hit>,
    running: HashMap<String, usize>,
    peak: HashMap<String, usize>,
}

#[derive(Clone)]
pub struct ToolServer {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

impl ToolServer {
    pub async fn start() -> ToolServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let server = ToolServer { addr, shared };
        let accept = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let server = accept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, behaviour: Behaviour) {
        self.shared.lock().unwrap().behaviours.insert(path.to_string(), behaviour);
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared.lock().unwrap().hits.clone()
    }

    pub fn hits_on(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }

    /// The most calls on `path` that were running at once.
    pub fn peak(&self, path: &str) -> usize {
        self.shared.lock().unwrap().peak.get(path).copied().unwrap_or(0)
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let start = Instant::now();
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        let key = request.uri().path().to_string();
        let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let (behaviour, attempt) = {
            let mut shared = self.shared.lock().unwrap();
            let attempt = {
                let n = shared.calls.entry(key.clone()).or_default();
                *n += 1;
                *n
            };
            let running = {
                let r = shared.running.entry(key.clone()).or_default();
                *r += 1;
                *r
            };
            let peak = shared.peak.entry(key.clone()).or_default();
            *peak = (*peak).max(running);
            (shared.behaviours.get(&key).cloned().unwrap_or_default(), attempt)
        };
        tokio::time::sleep(behaviour.delay).await;
        let response = match behaviour.failures.get(attempt - 1) {
            Some(&status) => {
                let mut r = Response::new(Full::new(Bytes::from(format!("failure {attempt}"))));
                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                if let Some(secs) = behaviour.retry_after {
                    r.headers_mut().insert("retry-after", secs.into());
                }
                r
            }
            None => {
                let text = match behaviour.body_bytes {
                    Some(n) => "x".repeat(n),
                    None => format!("{{\"path\":{:?},\"args\":{}}}", path, String::from_utf8_lossy(&body)),
                };
                Response::new(Full::new(Bytes::from(text)))
            }
        };
        let mut shared = self.shared.lock().unwrap();
        *shared.running.entry(key).or_default() -= 1;
        shared.hits.push(Hit {
            path,
            body: String::from_utf8_lossy(&body).into_owned(),
            start,
            end: Instant::now(),
        });
        response
    }
}

/// A gateway HTTP tool `name` at `url` (a path of a [`ToolServer`]): one string parameter `q`,
/// not injected, no retries, up to 16 calls at once. Tests change what they need with
/// `ToolConfig { .., ..http_tool(..) }`.
pub fn http_tool(name: &str, url: String) -> ctxgate::config::ToolConfig {
    ctxgate::config::ToolConfig {
        name: name.into(),
        description: format!("The {name} tool."),
        parameters: serde_json::json!({"type": "object", "properties": {"q": {"type": "string"}}}),
        inject: false,
        timeout: Duration::from_secs(10),
        retries: 0,
        max_concurrency: 16,
        run_as_task: false,
        http: Some(ctxgate::config::HttpBackend {
            url,
            method: "POST".into(),
            headers: Default::default(),
            headers_env: Default::default(),
        }),
        mcp: None,
    }
}
