//! Chat requests on a session (`X-Session-Id`), and the sessions API.
//!
//! A turn runs in its own task, detached from the client's connection, so a client that
//! disconnects cancels nothing: the upstream answer is read to its end and committed.
//!
//! 1. **Admit**: load the checkpoint and mark it in flight (compare-and-set); while another
//!    request holds a live marker, wait up to `sessions.busy_timeout`, then 409 `session_busy`.
//!    The marker's lease is renewed while the turn runs.
//! 2. **Compose**: full-history clients send the whole conversation, which goes upstream as
//!    sent; if its earlier messages differ from the transcript, the transcript follows the
//!    client. Append clients (`X-Session-Mode: append`) send only new messages; the stored
//!    transcript is spliced in front of them, the rest of the body untouched.
//! 3. **Commit**: the messages sent upstream plus the assistant's answer, in one atomic write
//!    that also clears the marker. A failed upstream call or a cut stream records nothing.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, request, HeaderName, HeaderValue, Method, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::body::{self, Body};
use crate::config::OnStoreError;
use crate::error::{BoxError, GatewayError};
use crate::openai::answer::{Answer, AnswerBuilder};
use crate::session::checkpoint::now_ms;
use crate::session::{
    Checkpoint, Commit, GoalLock, InFlight, OnGoalConflict, SessionKey, Sessions, StoreError,
};
use crate::telemetry::{Metrics, OpLabel, OutcomeLabel};
use crate::upstream::{Outgoing, OutgoingBody};
use crate::AppState;

pub const MODE_HEADER: HeaderName = HeaderName::from_static("x-session-mode");
/// On a non-streamed answer, the version it was committed at; on a stream, the version that
/// admitted it (the answer commits after the stream ends).
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-session-version");
pub const DEGRADED_HEADER: HeaderName = HeaderName::from_static("x-ctxgate-session");

/// One chat request on a session, owned so it can outlive the client's connection.
pub struct Turn {
    pub key: SessionKey,
    pub parts: request::Parts,
    pub body: Bytes,
    pub messages: Vec<Box<RawValue>>,
    pub messages_span: Range<usize>,
    pub model: String,
    pub stream: bool,
}

/// The session id a request names, if any; 400 when it is malformed.
pub fn session_id(sessions: &Sessions, headers: &http::HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get(sessions.config.header.as_str()) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(id) if crate::session::valid_id(id) => Ok(Some(id.to_string())),
        _ => Err(GatewayError::invalid(
            format!("Invalid {}: 1 to 128 visible ASCII characters.", sessions.config.header),
            None,
            "invalid_session_id",
        )),
    }
}

/// The session key for a request: its id under the caller's credential.
pub fn session_key(headers: &http::HeaderMap, id: &str) -> SessionKey {
    let credential = headers.get(header::AUTHORIZATION).map_or(&b""[..], HeaderValue::as_bytes);
    SessionKey::new(credential, id)
}

pub async fn chat(state: Arc<AppState>, turn: Turn) -> Result<Response<Body>, GatewayError> {
    let (reply, response) = oneshot::channel();
    // Detached on purpose: the turn must finish and commit even if the client goes away.
    tokio::spawn(run_turn(state, turn, reply));
    response
        .await
        .unwrap_or_else(|_| Err(GatewayError::Internal("the session turn ended without a response".into())))
}

type Reply = oneshot::Sender<Result<Response<Body>, GatewayError>>;

async fn run_turn(state: Arc<AppState>, turn: Turn, reply: Reply) {
    let sessions = state.sessions.clone();
    let metrics = state.metrics.clone();
    let request_id =
        turn.parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut holder = match Holder::admit(sessions.clone(), metrics.clone(), turn.key.clone(), request_id)
        .await
    {
        Ok(holder) => holder,
        Err(GatewayError::SessionStore(err)) if sessions.config.on_store_error == OnStoreError::FailOpen => {
            tracing::warn!(error = %err, "session store unavailable; serving without the session");
            let _ = reply.send(degraded(&state, turn).await);
            return;
        }
        Err(err) => {
            let _ = reply.send(Err(err));
            return;
        }
    };

    let append =
        turn.parts.headers.get(&MODE_HEADER).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"append"));
    let conversation = if append {
        let mut messages = holder.checkpoint.transcript.clone();
        messages.extend(turn.messages.iter().cloned());
        messages
    } else {
        if !is_prefix(&holder.checkpoint.transcript, &turn.messages) {
            holder.checkpoint.history_rewrites += 1;
            metrics.session_history_rewrites.inc();
        }
        turn.messages
    };
    let (conversation, with_goal) = match apply_goal(holder.checkpoint.goal.as_mut(), conversation) {
        Ok(composed) => composed,
        Err(GoalConflict) => {
            holder.finish(None).await;
            let _ = reply.send(Err(GatewayError::GoalLocked { id: turn.key.id.clone() }));
            return;
        }
    };
    // A full-history request without a goal goes upstream byte for byte; otherwise only the
    // messages array is replaced.
    let body = match (&with_goal, append) {
        (Some(messages), _) => splice_messages(&turn.body, turn.messages_span.clone(), messages),
        (None, true) => splice_messages(&turn.body, turn.messages_span.clone(), &conversation),
        (None, false) => turn.body,
    };

    let route = state.upstreams.router.route(Some(&turn.model));
    let mut headers = turn.parts.headers;
    headers.remove(sessions.config.header.as_str());
    headers.remove(&MODE_HEADER);
    headers.remove(header::CONTENT_LENGTH);
    let outgoing = Outgoing {
        method: turn.parts.method,
        path_and_query: turn
            .parts
            .uri
            .path_and_query()
            .map_or("/v1/chat/completions", |p| p.as_str())
            .to_string(),
        headers,
        body: OutgoingBody::Replayable(body),
    };
    let forwarded = match holder.while_renewing(state.upstreams.forward(route, outgoing)).await {
        Ok(forwarded) => forwarded,
        Err(err) => {
            holder.finish(None).await;
            let _ = reply.send(Err(err));
            return;
        }
    };
    let mut response = forwarded.into_response(metrics.clone());
    if !response.status().is_success() {
        // The upstream's error passes through; the turn did not happen.
        holder.finish(None).await;
        let _ = reply.send(Ok(response));
        return;
    }

    let upstream_body = std::mem::replace(response.body_mut(), body::empty());
    let mut answer = AnswerBuilder::new(turn.stream);
    if turn.stream {
        set_version(&mut response, holder.version);
        let (frames, receiver) = mpsc::channel(32);
        *response.body_mut() = ChannelBody { receiver }.boxed_unsync();
        let _ = reply.send(Ok(response));
        let mut frames = Some(frames);
        let complete = holder.while_renewing(pump(upstream_body, &mut answer, &mut frames)).await;
        let answer = if complete { answer.finish() } else { None };
        holder.finish(answer.map(|a| (conversation, a))).await;
        // The client's body ends only now, so a client that has read to the end can rely on
        // the turn being committed.
        drop(frames);
    } else {
        let collected = holder.while_renewing(upstream_body.collect()).await;
        let bytes = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                holder.finish(None).await;
                let _ = reply.send(Err(GatewayError::UpstreamUnreachable {
                    upstream: "upstream".into(),
                    source: err,
                }));
                return;
            }
        };
        answer.observe(&bytes);
        let version = holder.finish(answer.finish().map(|a| (conversation, a))).await;
        if let Some(version) = version {
            set_version(&mut response, version);
        }
        *response.body_mut() = body::full(bytes);
        let _ = reply.send(Ok(response));
    }
}

/// Serves a turn without its session (`on_store_error = "fail_open"`), marked degraded.
async fn degraded(state: &AppState, turn: Turn) -> Result<Response<Body>, GatewayError> {
    let route = state.upstreams.router.route(Some(&turn.model));
    let outgoing = Outgoing {
        method: turn.parts.method,
        path_and_query: turn
            .parts
            .uri
            .path_and_query()
            .map_or("/v1/chat/completions", |p| p.as_str())
            .to_string(),
        headers: turn.parts.headers,
        body: OutgoingBody::Replayable(turn.body),
    };
    let mut response = state.upstreams.forward(route, outgoing).await?.into_response(state.metrics.clone());
    response.headers_mut().insert(DEGRADED_HEADER, HeaderValue::from_static("degraded"));
    Ok(response)
}

/// Reads the upstream body to its end, feeding `answer` and, while the client is there,
/// `frames`. True when the body ended cleanly.
async fn pump(
    mut upstream: Body,
    answer: &mut AnswerBuilder,
    frames: &mut Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
) -> bool {
    loop {
        match upstream.frame().await {
            None => return true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    answer.observe(data);
                }
                if let Some(tx) = frames.as_ref() {
                    if tx.send(Ok(frame)).await.is_err() {
                        // The client left: keep reading so the answer is still committed.
                        *frames = None;
                    }
                }
            }
            Some(Err(err)) => {
                if let Some(tx) = frames.take() {
                    let _ = tx.send(Err(err)).await;
                }
                return false;
            }
        }
    }
}

fn set_version(response: &mut Response<Body>, version: u64) {
    response.headers_mut().insert(VERSION_HEADER, HeaderValue::from(version));
}

/// Replaces the `messages` array at `span` with `messages`, leaving every other byte as sent.
fn splice_messages(body: &[u8], span: Range<usize>, messages: &[Box<RawValue>]) -> Bytes {
    let len: usize = messages.iter().map(|m| m.get().len() + 1).sum();
    let mut out = Vec::with_capacity(body.len() - span.len() + len + 2);
    out.extend_from_slice(&body[..span.start]);
    out.push(b'[');
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(message.get().as_bytes());
    }
    out.push(b']');
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// The request changes the system prompt a goal lock guards.
struct GoalConflict;

/// With a locked goal: checks (or, on the first request after locking, captures) the leading
/// system messages, and places the goal block right after them. Returns the conversation as
/// the transcript records it (without the block) and, under a goal, the messages to send.
#[allow(clippy::type_complexity)]
fn apply_goal(
    goal: Option<&mut GoalLock>,
    mut conversation: Vec<Box<RawValue>>,
) -> Result<(Vec<Box<RawValue>>, Option<Vec<Box<RawValue>>>), GoalConflict> {
    let Some(goal) = goal else {
        return Ok((conversation, None));
    };
    let leading = conversation.iter().take_while(|m| is_system(m)).count();
    match &goal.system {
        None => goal.system = Some(conversation[..leading].to_vec()),
        Some(locked) => {
            let same =
                locked.len() == leading && locked.iter().zip(&conversation).all(|(a, b)| same_message(a, b));
            if !same {
                match goal.on_conflict {
                    OnGoalConflict::Reject => return Err(GoalConflict),
                    OnGoalConflict::Keep => {
                        conversation.splice(..leading, locked.iter().cloned());
                    }
                }
            }
        }
    }
    let leading = goal.system.as_ref().map_or(0, Vec::len);
    let mut upstream = Vec::with_capacity(conversation.len() + 1);
    upstream.extend_from_slice(&conversation[..leading]);
    upstream.push(goal.block());
    upstream.extend_from_slice(&conversation[leading..]);
    Ok((conversation, Some(upstream)))
}

fn is_system(message: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Role<'_>>(message.get())
        .is_ok_and(|r| matches!(r.role.as_deref(), Some("system" | "developer")))
}

/// Whether the stored transcript is the start of what the client sent: byte-identical, or
/// equal as JSON (a client may re-serialise with other spacing or key order).
fn is_prefix(transcript: &[Box<RawValue>], sent: &[Box<RawValue>]) -> bool {
    transcript.len() <= sent.len() && transcript.iter().zip(sent).all(|(a, b)| same_message(a, b))
}

fn same_message(a: &RawValue, b: &RawValue) -> bool {
    a.get() == b.get()
        || matches!(
            (serde_json::from_str::<Value>(a.get()), serde_json::from_str::<Value>(b.get())),
            (Ok(x), Ok(y)) if x == y
        )
}

// === impl Holder ===

/// A session admitted for one turn: holds the in-flight marker and the version it was
/// written at, renews its lease, and commits or releases it at the end.
struct Holder {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    key: SessionKey,
    version: u64,
    checkpoint: Checkpoint,
}

impl Holder {
    async fn admit(
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        key: SessionKey,
        request_id: String,
    ) -> Result<Self, GatewayError> {
        let deadline = Instant::now() + sessions.config.busy_timeout;
        loop {
            let loaded = timed(&metrics, "load", sessions.store.load(&key)).await?;
            let now = now_ms();
            let (version, mut checkpoint) = match loaded {
                Some(stored) => (stored.version, stored.checkpoint),
                None => (0, Checkpoint::new(now)),
            };
            if checkpoint.in_flight.as_ref().is_some_and(|f| f.lease_until_ms > now) {
                if Instant::now() >= deadline {
                    metrics.session_busy.inc();
                    return Err(GatewayError::SessionBusy { id: key.id.clone() });
                }
                tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(..10))).await;
                continue;
            }
            checkpoint.in_flight = Some(InFlight {
                request_id: request_id.clone(),
                owner: sessions.owner.clone(),
                lease_until_ms: now + sessions.config.lease.as_millis() as u64,
                started_ms: now,
            });
            match timed(&metrics, "commit", sessions.store.commit(&key, version, &checkpoint)).await? {
                Commit::Committed(version) => {
                    return Ok(Self { sessions, metrics, key, version, checkpoint })
                }
                // Someone admitted first; look again.
                Commit::Conflict(_) => continue,
            }
        }
    }

    /// Extends the lease. A lost lease (someone took the session over) is logged; the turn
    /// still answers its client, but its commit will conflict.
    async fn renew(&mut self) {
        let Some(in_flight) = self.checkpoint.in_flight.as_mut() else { return };
        in_flight.lease_until_ms = now_ms() + self.sessions.config.lease.as_millis() as u64;
        match timed(
            &self.metrics,
            "commit",
            self.sessions.store.commit(&self.key, self.version, &self.checkpoint),
        )
        .await
        {
            Ok(Commit::Committed(version)) => self.version = version,
            Ok(Commit::Conflict(_)) => {
                tracing::warn!(session = ?self.key, "session lease lost to another request")
            }
            Err(err) => tracing::warn!(session = ?self.key, error = %err, "session lease renewal failed"),
        }
    }

    /// Runs `future`, renewing the lease every third of it meanwhile.
    async fn while_renewing<F: std::future::Future>(&mut self, future: F) -> F::Output {
        let period = self.sessions.config.lease / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return output,
                _ = tick.tick() => self.renew().await,
            }
        }
    }

    /// Clears the marker, and with an answer appends the turn: the messages sent upstream
    /// and the assistant's message. Returns the committed version.
    async fn finish(mut self, turn: Option<(Vec<Box<RawValue>>, Answer)>) -> Option<u64> {
        self.checkpoint.in_flight = None;
        self.checkpoint.updated_ms = now_ms();
        if let Some((mut messages, answer)) = turn {
            messages.push(answer.message);
            self.checkpoint.transcript = messages;
            let usage = &mut self.checkpoint.usage;
            usage.requests += 1;
            if let Some(u) = answer.usage {
                usage.prompt_tokens += u.prompt_tokens;
                usage.completion_tokens += u.completion_tokens;
                usage.cached_tokens += u.cached_tokens();
            }
        }
        let commit = self.sessions.store.commit(&self.key, self.version, &self.checkpoint);
        let outcome = match timed(&self.metrics, "commit", commit).await {
            Ok(Commit::Committed(version)) => {
                self.metrics.checkpoint_bytes.observe(self.checkpoint.to_bytes().len() as f64);
                self.metrics.session_commits.get_or_create(&OutcomeLabel { outcome: "committed" }).inc();
                return Some(version);
            }
            Ok(Commit::Conflict(_)) => "conflict",
            Err(_) => "error",
        };
        tracing::warn!(session = ?self.key, outcome, "session turn was not committed");
        self.metrics.session_commits.get_or_create(&OutcomeLabel { outcome }).inc();
        None
    }
}

/// Runs a store operation within the configured bound, recording its latency; failures become
/// `SessionStore` errors.
async fn timed<T>(
    metrics: &Metrics,
    op: &'static str,
    future: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, GatewayError> {
    let started = Instant::now();
    let result = future.await;
    metrics.session_store_duration.get_or_create(&OpLabel { op }).observe(started.elapsed().as_secs_f64());
    result.map_err(|err| {
        metrics.session_store_errors.inc();
        GatewayError::SessionStore(err)
    })
}

// === sessions API ===

/// `GET`/`DELETE /v1/sessions/{id}`, `GET /v1/sessions/{id}/messages`, and
/// `GET`/`PUT`/`DELETE /v1/sessions/{id}/goal`.
pub async fn api(state: Arc<AppState>, request: http::Request<Body>) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let rest = path.trim_start_matches("/v1/sessions/");
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (rest, None),
    };
    let not_found = || GatewayError::NotFound { method: parts.method.to_string(), path: path.to_string() };
    if !crate::session::valid_id(id) {
        return Err(not_found());
    }
    let key = session_key(&parts.headers, id);
    let store = &state.sessions.store;
    let metrics = &state.metrics;
    let missing = || GatewayError::SessionNotFound { id: id.to_string() };
    match (&parts.method, sub) {
        (&Method::GET, None) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let cp = &stored.checkpoint;
            Ok(json_response(json!({
                "id": id,
                "object": "session",
                "version": stored.version,
                "messages": cp.transcript.len(),
                "usage": cp.usage,
                "goal": cp.goal,
                "in_flight": cp.in_flight,
                "history_rewrites": cp.history_rewrites,
                "created_at_ms": cp.created_ms,
                "updated_at_ms": cp.updated_ms,
            })))
        }
        (&Method::GET, Some("messages")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            Ok(json_response(json!({"object": "list", "data": stored.checkpoint.transcript})))
        }
        (&Method::DELETE, None) => {
            if timed(metrics, "delete", store.delete(&key)).await? {
                Ok(json_response(json!({"id": id, "object": "session.deleted", "deleted": true})))
            } else {
                Err(missing())
            }
        }
        (&Method::GET, Some("goal")) => {
            let stored = timed(metrics, "load", store.load(&key)).await?.ok_or_else(missing)?;
            let goal = stored.checkpoint.goal.ok_or_else(missing)?;
            Ok(json_response(goal_json(id, &goal)))
        }
        (&Method::PUT, Some("goal")) => {
            let request = read_goal(body).await?;
            let mut holder =
                Holder::admit(state.sessions.clone(), state.metrics.clone(), key, "goal".into()).await?;
            let goal = GoalLock {
                goal: request.goal,
                strategy: request.strategy,
                constraints: request.constraints,
                locked_ms: now_ms(),
                on_conflict: request.on_conflict,
                block: None,
                system: None,
            };
            let goal = GoalLock { block: Some(goal.block()), ..goal };
            let rendered = goal_json(id, &goal);
            holder.checkpoint.goal = Some(goal);
            holder.finish(None).await.ok_or_else(|| GatewayError::SessionBusy { id: id.to_string() })?;
            Ok(json_response(rendered))
        }
        (&Method::DELETE, Some("goal")) => {
            let mut holder =
                Holder::admit(state.sessions.clone(), state.metrics.clone(), key, "goal".into()).await?;
            let had = holder.checkpoint.goal.take().is_some();
            holder.finish(None).await.ok_or_else(|| GatewayError::SessionBusy { id: id.to_string() })?;
            if had {
                Ok(json_response(json!({"id": id, "object": "session.goal.deleted", "deleted": true})))
            } else {
                Err(missing())
            }
        }
        (_, None | Some("messages" | "goal")) => {
            Err(GatewayError::MethodNotAllowed { method: parts.method.to_string(), path: path.to_string() })
        }
        _ => Err(not_found()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalRequest {
    goal: String,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    constraints: Vec<String>,
    #[serde(default)]
    on_conflict: OnGoalConflict,
}

async fn read_goal(body: Body) -> Result<GoalRequest, GatewayError> {
    let bytes = body
        .collect()
        .await
        .map_err(|e| GatewayError::invalid(e.to_string(), None, "invalid_body"))?
        .to_bytes();
    let request: GoalRequest = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::invalid(format!("Invalid goal: {e}"), Some("goal"), "invalid_goal"))?;
    if request.goal.trim().is_empty() {
        return Err(GatewayError::invalid("Invalid 'goal': empty string.", Some("goal"), "invalid_value"));
    }
    Ok(request)
}

fn goal_json(id: &str, goal: &GoalLock) -> Value {
    json!({
        "id": id,
        "object": "session.goal",
        "goal": goal.goal,
        "strategy": goal.strategy,
        "constraints": goal.constraints,
        "on_conflict": goal.on_conflict,
        "locked_at_ms": goal.locked_ms,
    })
}

fn json_response(value: Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

// === impl ChannelBody ===

/// A response body fed by the turn's task, so the client reads frames while the task keeps
/// ownership of the upstream body.
struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.receiver.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn splicing_replaces_only_the_messages_array() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#;
        let start = body.windows(12).position(|w| w == b"[{\"role\":\"us").unwrap();
        let end = start + br#"[{"role":"user","content":"new"}]"#.len();
        let messages = [raw(r#"{"role":"user","content":"old"}"#), raw(r#"{"role":"user","content":"new"}"#)];
        let out = splice_messages(body, start..end, &messages);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"old"},{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#
        );
    }

    #[test]
    fn prefix_matching_tolerates_reserialisation() {
        let stored = [raw(r#"{"role":"user","content":"hi"}"#)];
        let same = [raw(r#"{ "content": "hi", "role": "user" }"#), raw(r#"{"role":"user"}"#)];
        let edited = [raw(r#"{"role":"user","content":"HI"}"#), raw(r#"{"role":"user"}"#)];
        assert!(is_prefix(&stored, &same));
        assert!(!is_prefix(&stored, &edited));
        assert!(!is_prefix(&stored, &[]));
        assert!(is_prefix(&[], &edited));
    }
}
