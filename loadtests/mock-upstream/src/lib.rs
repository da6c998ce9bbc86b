//! A scriptable fake OpenAI server: owns the public API ([`Server`], [`Builder`], [`Recorded`])
//! and the accept loop. ctxgate's integration tests script replies and inspect recorded
//! requests; the `mock-upstream` bin serves default-mode traffic as the load-test target
//! (optionally answering with parallel tool calls, and serving a stand-in tool at
//! `POST /tools/...`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use mock_upstream::{fixtures, Server};
//! let server = Server::builder().chat(fixtures::completion("hi")).fail(429).start().await?;
//! let _base = server.base_url(); // http://127.0.0.1:PORT/v1
//! # Ok(()) }
//! ```

pub mod fixtures;
mod reply;
mod service;
mod sse;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub use reply::{Chunk, Gate, Reply, ReplyBody};
use service::{lock, Defaults, Shared};

/// A running server. Dropping it aborts the accept task, which also aborts every connection.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Server {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in arrival order (empty when recording is off).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.recorded).clone()
    }

    /// Queues one more scripted reply behind any already queued.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
        self.shared.scripted.store(true, Ordering::Release);
    }

    /// SSE response bodies created and not yet finished or dropped.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Waits until [`open_streams`](Self::open_streams) equals `n`; false if `within` passes
    /// first.
    pub async fn wait_for_open_streams(&self, n: usize, within: Duration) -> bool {
        // Polling keeps the stream hot path to a single atomic; tests wait milliseconds at most.
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.open_streams() == n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Configures a [`Server`]. Scripted replies are served FIFO, one per request, to any path;
/// once they run out, requests get default-mode answers.
pub struct Builder {
    replies: VecDeque<Reply>,
    latency: Duration,
    record: bool,
    stream_chunks: usize,
    chunk_delay: Duration,
    tool_calls: Option<(String, usize)>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            replies: VecDeque::new(),
            latency: Duration::ZERO,
            record: true,
            stream_chunks: 8,
            chunk_delay: Duration::ZERO,
            tool_calls: None,
        }
    }
}

impl Builder {
    pub fn reply(mut self, r: Reply) -> Self {
        self.replies.push_back(r);
        self
    }

    pub fn chat(self, body: serde_json::Value) -> Self {
        self.reply(Reply::json(200, body))
    }

    pub fn stream(self, chunks: Vec<Chunk>) -> Self {
        self.reply(Reply::sse(chunks))
    }

    pub fn fail(self, status: u16) -> Self {
        self.reply(Reply::error(status))
    }

    /// Delay before the response headers of every request, scripted or default.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Whether to keep every request for [`Server::requests`] (default on).
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }

    /// Number of content chunks in a default-mode stream (default 8).
    pub fn stream_chunks(mut self, n: usize) -> Self {
        self.stream_chunks = n;
        self
    }

    /// Delay between content chunks of a default-mode stream (default none).
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }

    /// Default-mode tool calls: a chat request whose last message is not a `tool` result is
    /// answered with `n` parallel calls of the tool `name` (arguments `{"q":"item-I"}`); one
    /// that ends with tool results gets the normal answer. Lets a stateless mock drive a
    /// gateway's tool loop under load. `n = 0` turns it off (the default).
    pub fn tool_calls(mut self, name: &str, n: usize) -> Self {
        self.tool_calls = Some((name.to_owned(), n));
        self
    }

    /// Starts on an ephemeral port of 127.0.0.1.
    pub async fn start(self) -> std::io::Result<Server> {
        self.start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(self, addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            record: self.record,
            recorded: Mutex::new(Vec::new()),
            scripted: AtomicBool::new(!self.replies.is_empty()),
            script: Mutex::new(self.replies),
            latency: self.latency,
            open_streams: Arc::new(AtomicUsize::new(0)),
            defaults: Defaults::new(
                self.stream_chunks,
                self.chunk_delay,
                self.tool_calls.as_ref().map(|(name, n)| (name.as_str(), *n)),
            ),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Server { addr, shared, accept })
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: http::Method,
    /// Path plus `?query`, if any.
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The body as JSON, or `Value::Null` if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set so that aborting the accept task tears them all down.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                // Typically fd exhaustion under load; back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // SSE frames are tiny; Nagle would coalesce them and blur the chunk timing tests rely on.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| Arc::clone(&shared).handle(req));
    // Errors here are clients going away mid-request, which is routine for a mock.
    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
}

#[cfg(test)]
mod tests;
