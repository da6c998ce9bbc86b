//! Request handling: state shared by all connections, recording, popping scripted replies, and
//! the default OpenAI-like routes served when nothing is scripted.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use crate::sse::SseBody;
use crate::{fixtures, Chunk, Recorded, Reply, ReplyBody};

pub(crate) type ResBody = Either<Full<Bytes>, SseBody>;

/// Everything connections share; built once by `Builder::start_on`.
pub(crate) struct Shared {
    pub(crate) record: bool,
    pub(crate) recorded: Mutex<Vec<Recorded>>,
    pub(crate) script: Mutex<VecDeque<Reply>>,
    /// Set once anything has been queued, so the load-test bin (which never scripts) takes no
    /// lock on the request path.
    pub(crate) scripted: AtomicBool,
    pub(crate) latency: Duration,
    pub(crate) open_streams: Arc<AtomicUsize>,
    pub(crate) defaults: Defaults,
}

/// Default-mode bodies, serialised once at start so a request only clones `Bytes`.
pub(crate) struct Defaults {
    completion: Bytes,
    models: Bytes,
    embeddings: Bytes,
    stream: Vec<Chunk>,
    stream_with_usage: Vec<Chunk>,
    tool: Option<ToolAnswers>,
    tool_result: Bytes,
}

/// Default tool-call mode: the first answer of a conversation calls a tool `n` times in
/// parallel; once the request ends with `tool` results, the normal answer follows.
pub(crate) struct ToolAnswers {
    completion: Bytes,
    stream: Vec<Chunk>,
    stream_with_usage: Vec<Chunk>,
}

/// The content of default-mode chunk `i`.
pub(crate) fn default_token(i: usize) -> String {
    format!("tok{i} ")
}

/// The content of the default non-streamed completion.
pub(crate) const DEFAULT_CONTENT: &str = "Hello from mock-upstream.";

impl Defaults {
    /// `tool_calls`: the tool's name and how many parallel calls a first answer makes.
    pub(crate) fn new(
        stream_chunks: usize,
        chunk_delay: Duration,
        tool_calls: Option<(&str, usize)>,
    ) -> Defaults {
        Defaults {
            completion: json_bytes(&fixtures::completion(DEFAULT_CONTENT)),
            models: json_bytes(&fixtures::models()),
            embeddings: json_bytes(&fixtures::embeddings()),
            stream: default_stream(stream_chunks, chunk_delay, false),
            stream_with_usage: default_stream(stream_chunks, chunk_delay, true),
            tool: tool_calls.filter(|&(_, n)| n > 0).map(|(name, n)| ToolAnswers {
                completion: json_bytes(&fixtures::tool_call_completion(name, n)),
                stream: tool_stream(name, n, false),
                stream_with_usage: tool_stream(name, n, true),
            }),
            tool_result: json_bytes(&fixtures::tool_result()),
        }
    }
}

fn tool_stream(name: &str, n: usize, include_usage: bool) -> Vec<Chunk> {
    let frame = |v: Value| Chunk::Raw(Bytes::from(format!("data: {v}\n\n")));
    let mut chunks: Vec<Chunk> =
        fixtures::tool_call_completion_chunks(name, n).into_iter().map(frame).collect();
    if include_usage {
        chunks.push(frame(fixtures::usage_chunk()));
    }
    chunks.push(Chunk::Raw(Bytes::from_static(b"data: [DONE]\n\n")));
    chunks
}

fn default_stream(n: usize, delay: Duration, include_usage: bool) -> Vec<Chunk> {
    // Pre-rendered as Raw frames: replaying them costs a refcount bump per chunk.
    let frame = |v: Value| Chunk::Raw(Bytes::from(format!("data: {v}\n\n")));
    let mut chunks = Vec::new();
    for i in 0..n {
        if i > 0 && !delay.is_zero() {
            chunks.push(Chunk::Delay(delay));
        }
        chunks.push(frame(fixtures::content_chunk(i, &default_token(i))));
    }
    chunks.push(frame(fixtures::finish_chunk("stop")));
    if include_usage {
        chunks.push(frame(fixtures::usage_chunk()));
    }
    chunks.push(Chunk::Raw(Bytes::from_static(b"data: [DONE]\n\n")));
    chunks
}

fn json_bytes(v: &Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// Locks, shrugging off poisoning: a panicking test thread must not cascade into every
/// later request.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResBody>, Infallible> {
        let (parts, body) = req.into_parts();
        let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
            // The client is most likely gone; this answer is for the rare one still listening.
            return Ok(error(StatusCode::BAD_REQUEST, "could not read request body"));
        };
        if self.record {
            let path = parts.uri.path_and_query().map_or(parts.uri.path(), |pq| pq.as_str());
            lock(&self.recorded).push(Recorded {
                method: parts.method.clone(),
                path: path.to_owned(),
                headers: parts.headers,
                body: body.clone(),
            });
        }
        // Popped before the delay so replies follow arrival order, not delay order.
        let reply = if self.scripted.load(Ordering::Acquire) { lock(&self.script).pop_front() } else { None };
        let delay = self.latency + reply.as_ref().map_or(Duration::ZERO, |r| r.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(match reply {
            Some(reply) => self.scripted_response(reply),
            None => self.default_response(&parts.method, parts.uri.path(), &body),
        })
    }

    fn scripted_response(&self, reply: Reply) -> Response<ResBody> {
        let mut head = Response::builder().status(reply.status);
        for (name, value) in &reply.headers {
            head = head.header(name.as_str(), value.as_str());
        }
        // Validate the head before building the body so a bad script never starts a stream.
        match head.body(()) {
            Ok(head) => head.map(|()| match reply.body {
                ReplyBody::Full(b) => Either::Left(Full::new(b)),
                ReplyBody::Sse(chunks) => Either::Right(SseBody::spawn(chunks, &self.open_streams)),
            }),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("mock-upstream: invalid scripted reply: {e}"),
            ),
        }
    }

    fn default_response(&self, method: &Method, path: &str, body: &[u8]) -> Response<ResBody> {
        let d = &self.defaults;
        match *method {
            Method::POST if path.ends_with("/chat/completions") => {
                let Ok(req) = serde_json::from_slice::<ChatRequest>(body) else {
                    return error(StatusCode::BAD_REQUEST, "request body is not a JSON object");
                };
                // Tool-call mode reads the roles, so plain default mode does not pay for them.
                let tool = d.tool.as_ref().filter(|_| !ends_with_tool_results(body));
                if req.stream.as_bool() != Some(true) {
                    return json(StatusCode::OK, tool.map_or(&d.completion, |t| &t.completion).clone());
                }
                let usage = req.stream_options.get("include_usage").and_then(Value::as_bool) == Some(true);
                let chunks = match (tool, usage) {
                    (Some(t), true) => &t.stream_with_usage,
                    (Some(t), false) => &t.stream,
                    (None, true) => &d.stream_with_usage,
                    (None, false) => &d.stream,
                };
                let mut res =
                    Response::new(Either::Right(SseBody::spawn(chunks.clone(), &self.open_streams)));
                let headers = res.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                res
            }
            Method::GET if path.ends_with("/models") => json(StatusCode::OK, d.models.clone()),
            Method::POST if path.ends_with("/embeddings") => json(StatusCode::OK, d.embeddings.clone()),
            // A stand-in HTTP tool for gateway-tool load tests.
            Method::POST if path.starts_with("/tools/") => json(StatusCode::OK, d.tool_result.clone()),
            _ => error(StatusCode::NOT_FOUND, &format!("mock-upstream: no route for {method} {path}")),
        }
    }
}

/// The fields default mode reads; serde skips the rest without building a `Value` tree, which
/// matters for the large prompts of load tests.
#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    stream: Value,
    #[serde(default)]
    stream_options: Value,
}

/// Only the messages' roles; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Roles {
    #[serde(default)]
    messages: Vec<Role>,
}

#[derive(Deserialize)]
struct Role {
    #[serde(default)]
    role: String,
}

/// Whether the request's last message is a `tool` result, i.e. the tool round is over.
fn ends_with_tool_results(body: &[u8]) -> bool {
    serde_json::from_slice::<Roles>(body)
        .ok()
        .and_then(|r| r.messages.last().map(|m| m.role == "tool"))
        .unwrap_or(false)
}

fn json(status: StatusCode, body: Bytes) -> Response<ResBody> {
    let mut res = Response::new(Either::Left(Full::new(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error(status: StatusCode, message: &str) -> Response<ResBody> {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    json(status, json_bytes(&fixtures::error(message, kind)))
}
