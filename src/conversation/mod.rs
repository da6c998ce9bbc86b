//! Chat requests on a session (`X-Session-Id`), and the sessions API.
//!
//! A turn runs in its own task, detached from the client's connection, so a client that
//! disconnects cancels nothing: the upstream answer is read to its end and committed.
//!
//! 1. **Admit** ([`holder`]): compose the turn from the checkpoint and mark the session in
//!    flight with the upstream request, in one compare-and-set. While another request holds a
//!    live marker, wait up to `sessions.busy_timeout`, then 409 `session_busy`. The marker's
//!    lease is renewed while the turn runs.
//! 2. **Compose** ([`compose`]): full-history clients' bytes go upstream as sent, and the
//!    transcript follows the client if its earlier messages differ; append clients
//!    (`X-Session-Mode: append`) get the transcript spliced in front of their messages. A
//!    locked goal is placed after the system messages.
//! 3. **Stream**: each SSE event gets an `id: TURN-SEQ` line and is written to the session's
//!    event log, so `GET /v1/sessions/{id}/stream` can replay after `Last-Event-ID`.
//! 4. **Commit**: the conversation plus the assistant's answer, in one atomic write that also
//!    clears the marker. A failed upstream call or a cut stream records nothing.
//! 5. **Resume**: a marker whose owner died (lease expired) still holds the request; the next
//!    request on the session, or `POST /v1/sessions/{id}/resume`, re-issues it.

mod api;
mod compose;
mod holder;

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, request, HeaderMap, HeaderName, HeaderValue, Method, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

pub use api::api;
pub use compose::splice_messages;

use self::compose::GoalConflict;
use self::holder::{Admitted, Holder};
use crate::body::{self, Body};
use crate::compress;
use crate::config::OnStoreError;
use crate::error::{BoxError, GatewayError};
use crate::openai::answer::{Answer, AnswerBuilder};
use crate::openai::events::EventSplitter;
use crate::session::{SessionKey, Sessions, Stored, StoredRequest};
use crate::telemetry::{Metrics, ModelStage, OutcomeLabel};
use crate::tools;
use crate::upstream::{Outgoing, OutgoingBody, UsageSink};
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
    /// The caller's token charge, corrected by the turn's `usage`.
    pub charge: Option<Arc<crate::auth::TokenCharge>>,
}

/// The session id a request names, if any; 400 when it is malformed.
pub fn session_id(sessions: &Sessions, headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
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

/// The session key for a request: its id under the caller's gateway key when keys are on,
/// else under its `Authorization` header.
pub fn session_key(headers: &HeaderMap, extensions: &http::Extensions, id: &str) -> SessionKey {
    match extensions.get::<crate::auth::Caller>() {
        Some(caller) => SessionKey::new(&caller.scope_credential(), id),
        None => {
            let credential = headers.get(header::AUTHORIZATION).map_or(&b""[..], HeaderValue::as_bytes);
            SessionKey::new(credential, id)
        }
    }
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
    let headers = &turn.parts.headers;
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let append = headers.get(&MODE_HEADER).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"append"));
    let path = turn.parts.uri.path_and_query().map_or("/v1/chat/completions", |p| p.as_str()).to_string();

    // Compression: the policy for this model, and a state sheet written since the last turn.
    let active = state.compressor.active(&turn.model, headers);
    let compression_key = format!("s:{}", turn.key.storage_key());
    let tools = compress::request::tools_of(&turn.body);
    let ready = match &active {
        Some(active) => compress::ready_summary(&state, active, &compression_key, &turn.messages).await,
        None => None,
    };
    let cache_key = state
        .upstreams
        .router
        .route(Some(&turn.model))
        .first()
        .filter(|u| u.prompt_cache_key)
        .map(|_| compress::cache_key(&compression_key));

    let admitted = loop {
        let prepare = |checkpoint: &mut crate::session::Checkpoint| {
            let mut composed =
                compose::compose(checkpoint, &turn.body, &turn.messages, turn.messages_span.clone(), append)
                    .map_err(|GoalConflict| GatewayError::GoalLocked { id: turn.key.id.clone() })?;
            if composed.rewrote_history {
                checkpoint.history_rewrites += 1;
            }
            let mut compressed = None;
            if let Some(active) = &active {
                let goal = checkpoint.goal.as_ref().map(crate::session::GoalLock::block);
                let analysed = compress::analyse(active.counter, &composed.conversation);
                let mut record = compress::SessionRecord::from_raw(checkpoint.compression.as_deref());
                let plan = compress::run(
                    &state.compressor,
                    active,
                    &composed.conversation,
                    &analysed,
                    goal.as_deref(),
                    tools.as_deref(),
                    record.state.take(),
                    ready.as_ref(),
                );
                composed.body = compress::request::rebuild(&turn.body, &plan.messages, cache_key.as_deref())?;
                let shared = record.shared_prefix(&plan.messages);
                record.state = plan.state.clone();
                checkpoint.compression = record.to_raw();
                compressed = Some((plan, shared));
            }
            let request = StoredRequest {
                path: path.clone(),
                model: turn.model.clone(),
                stream: turn.stream,
                body: raw_json(&composed.body)?,
                conversation: compressed
                    .as_ref()
                    .filter(|(plan, _)| plan.state.is_some())
                    .map(|_| composed.conversation.clone()),
            };
            Ok(((composed, compressed), Some(request)))
        };
        match Holder::admit(sessions.clone(), metrics.clone(), turn.key.clone(), &request_id, prepare).await {
            Ok(Admitted::Turn(holder, composed)) => break Ok((holder, composed)),
            Ok(Admitted::Interrupted(stored)) => {
                // Finish the dead owner's turn first; this request then waits its turn.
                resume(&state, turn.key.clone(), headers.clone(), stored).await;
            }
            Err(err) => break Err(err),
        }
    };

    match admitted {
        Ok((holder, (composed, compressed))) => {
            if composed.rewrote_history {
                metrics.session_history_rewrites.inc();
            }
            let mut annotations = HeaderMap::new();
            if let (Some(active), Some((plan, (previous, shared)))) = (&active, compressed) {
                compress::record(&metrics, &active.label, &plan);
                let stage = |stage| ModelStage { model: active.label.clone(), stage };
                metrics.compression_prefix_bytes.get_or_create(&stage("previous")).inc_by(previous);
                metrics.compression_prefix_bytes.get_or_create(&stage("shared")).inc_by(shared);
                compress::annotate(&mut annotations, &plan);
                if let Some(request) = plan.summarize {
                    let call = compress::summary_call(
                        &state.compressor.config,
                        &turn.model,
                        headers,
                        tools.as_deref(),
                    );
                    let len = composed.conversation.len();
                    compress::start_summary(&state, &compression_key, request, call, len, plan.tokens_after);
                }
            }
            let call =
                Call { path, model: turn.model, stream: turn.stream, annotations, charge: turn.charge };
            execute(
                state,
                holder,
                composed.conversation,
                call,
                composed.body,
                turn.parts.headers,
                Some(reply),
            )
            .await;
        }
        Err(GatewayError::SessionStore(err)) if sessions.config.on_store_error == OnStoreError::FailOpen => {
            tracing::warn!(error = %err, "session store unavailable; serving without the session");
            let _ = reply.send(degraded(&state, turn).await);
        }
        Err(err) => {
            let _ = reply.send(Err(err));
        }
    }
}

fn raw_json(body: &Bytes) -> Result<Box<RawValue>, GatewayError> {
    let text = std::str::from_utf8(body).map_err(|e| GatewayError::Internal(e.into()))?;
    RawValue::from_string(text.to_string()).map_err(|e| GatewayError::Internal(e.into()))
}

/// Takes over a turn whose owner died and re-issues it in the background, answering no
/// client (readers use the stream endpoint). Returns the new turn id if this call took it.
async fn resume(state: &Arc<AppState>, key: SessionKey, headers: HeaderMap, stored: Stored) -> Option<u64> {
    let goal = stored.checkpoint.goal.clone();
    let metrics = state.metrics.clone();
    let label = |outcome| OutcomeLabel { outcome };
    match Holder::take_over(state.sessions.clone(), metrics.clone(), key, stored).await {
        Ok(Some((holder, request))) => {
            let conversation = request
                .conversation
                .clone()
                .or_else(|| compose::conversation_of(request.body.get().as_bytes(), goal.as_ref()));
            let Some(conversation) = conversation else {
                metrics.session_resumes.get_or_create(&label("unreadable")).inc();
                holder.finish(None).await;
                return None;
            };
            tracing::info!(session = ?holder.key, turn = holder.turn, "resuming an interrupted turn");
            metrics.session_resumes.get_or_create(&label("resumed")).inc();
            let turn = holder.turn;
            let body = Bytes::from(request.body.get().to_string());
            let call = Call {
                path: request.path,
                model: request.model,
                stream: request.stream,
                annotations: HeaderMap::new(),
                charge: None,
            };
            tokio::spawn(execute(state.clone(), holder, conversation, call, body, headers, None));
            Some(turn)
        }
        Ok(None) => {
            metrics.session_resumes.get_or_create(&label("taken_by_another")).inc();
            None
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot resume an interrupted turn");
            metrics.session_resumes.get_or_create(&label("error")).inc();
            None
        }
    }
}

/// Where and how a turn goes upstream.
struct Call {
    path: String,
    model: String,
    stream: bool,
    /// Response headers to add (what compression did).
    annotations: HeaderMap,
    charge: Option<Arc<crate::auth::TokenCharge>>,
}

/// Sends an admitted turn upstream, streams or returns the answer to `reply` (if a client is
/// waiting), and commits it.
async fn execute(
    state: Arc<AppState>,
    mut holder: Holder,
    conversation: Vec<Box<RawValue>>,
    request: Call,
    body: Bytes,
    mut headers: HeaderMap,
    reply: Option<Reply>,
) {
    let send = |reply: Option<Reply>, response| {
        if let Some(reply) = reply {
            let _ = reply.send(response);
        }
    };
    headers.remove(state.sessions.config.header.as_str());
    headers.remove(&MODE_HEADER);
    headers.remove(compress::OPT_OUT_HEADER);
    headers.remove(header::CONTENT_LENGTH);
    let route = state.upstreams.router.route(Some(&request.model));
    let usage_sink = UsageSink {
        model: state
            .compressor
            .active(&request.model, &HeaderMap::new())
            .map(|active| state.metrics.for_model(&active.label)),
        charge: request.charge.clone(),
    };
    let sent = if state.tools.engaged_by(&body) {
        let loop_request = tools::rounds::Request {
            route,
            path: request.path.clone(),
            headers,
            body,
            stream: request.stream,
            session: true,
            usage_sink,
            tasks: Some(holder.task_log()),
            affinity: Some(crate::upstream::AffinityKey::session(&holder.key.scope, &holder.key.id)),
        };
        holder
            .while_renewing(tools::rounds::forward(&state, loop_request))
            .await
            .map(|(response, report)| (response, Some(report)))
    } else {
        let outgoing = Outgoing {
            method: Method::POST,
            path_and_query: request.path.clone(),
            headers,
            body: OutgoingBody::Replayable(body),
            affinity: Some(crate::upstream::AffinityKey::session(&holder.key.scope, &holder.key.id)),
        };
        holder.while_renewing(state.upstreams.forward(route, outgoing)).await.map(|mut forwarded| {
            forwarded.usage_sink = usage_sink;
            (forwarded.into_response(), None)
        })
    };
    let (mut response, report) = match sent {
        Ok(sent) => sent,
        Err(err) => {
            holder.finish(None).await;
            return send(reply, Err(err));
        }
    };
    response.headers_mut().extend(request.annotations.clone());
    if !response.status().is_success() {
        // The upstream's error passes through; the turn did not happen.
        holder.finish(None).await;
        return send(reply, Ok(response));
    }

    let upstream_body = std::mem::replace(response.body_mut(), body::empty());
    let mut answer = AnswerBuilder::new(request.stream);
    if request.stream {
        response.headers_mut().insert(VERSION_HEADER, HeaderValue::from(holder.version));
        let (frames, receiver) = mpsc::channel(32);
        *response.body_mut() = ChannelBody { receiver }.boxed_unsync();
        let mut frames = reply.is_some().then_some(frames);
        send(reply, Ok(response));
        let log = EventLog::start(&holder);
        let turn = holder.turn;
        let complete = holder.while_renewing(pump(upstream_body, turn, &mut answer, &mut frames, &log)).await;
        log.close().await;
        let answer = if complete { answer.finish() } else { None };
        let report = match report {
            Some(report) => report.await.ok(),
            None => None,
        };
        let turn = answer.and_then(|a| with_tool_rounds(&mut holder, conversation, a, report));
        holder.finish(turn).await;
        // The client's body ends only now, so a client that has read to the end can rely on
        // the turn being committed.
        drop(frames);
    } else {
        let bytes = match holder.while_renewing(upstream_body.collect()).await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                holder.finish(None).await;
                let upstream = route.first().map_or_else(String::new, |u| u.name.clone());
                return send(reply, Err(GatewayError::UpstreamUnreachable { upstream, source: err }));
            }
        };
        answer.observe(&bytes);
        let report = match report {
            Some(mut report) => report.try_recv().ok(),
            None => None,
        };
        if let Some(report) = &report {
            tools::rounds::annotate(response.headers_mut(), report);
        }
        let turn = answer.finish().and_then(|a| with_tool_rounds(&mut holder, conversation, a, report));
        if let Some(version) = holder.finish(turn).await {
            response.headers_mut().insert(VERSION_HEADER, HeaderValue::from(version));
        }
        *response.body_mut() = body::full(bytes);
        send(reply, Ok(response));
    }
}

/// What a turn commits when gateway tools ran: the rounds' messages before the final answer,
/// and for an answer that also called client tools, the whole answer and the gateway's results
/// (the client got only its own calls; the expansion restores the rest on the next turn).
fn with_tool_rounds(
    holder: &mut Holder,
    mut conversation: Vec<Box<RawValue>>,
    mut answer: Answer,
    report: Option<tools::rounds::Report>,
) -> Option<(Vec<Box<RawValue>>, Answer)> {
    let Some(report) = report else { return Some((conversation, answer)) };
    conversation.extend(report.messages);
    if let Some(held) = report.held {
        let mut record = tools::record::ToolRecord::from_raw(holder.checkpoint.tools.as_deref());
        conversation.push(held.full.clone());
        let mut results = held.results.clone();
        let last = results.pop()?;
        conversation.extend(results);
        answer.message = last;
        record.remember(held);
        holder.checkpoint.tools = record.to_raw();
    } else if let Some(message) = report.answer {
        answer.message = message;
    }
    Some((conversation, answer))
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
        affinity: Some(crate::upstream::AffinityKey::session(&turn.key.scope, &turn.key.id)),
    };
    let mut response = state.upstreams.forward(route, outgoing).await?.into_response();
    response.headers_mut().insert(DEGRADED_HEADER, HeaderValue::from_static("degraded"));
    Ok(response)
}

pub(crate) type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Reads the upstream stream to its end, one SSE event at a time: each is numbered, logged for
/// replay, fed to `answer` and, while the client is there, sent to it. True when the body
/// ended cleanly.
async fn pump(
    mut upstream: Body,
    turn: u64,
    answer: &mut AnswerBuilder,
    frames: &mut Option<FrameSender>,
    log: &EventLog,
) -> bool {
    let mut splitter = EventSplitter::default();
    let mut seq = 0u64;
    loop {
        match upstream.frame().await {
            None => break,
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else { continue };
                for event in splitter.feed(data) {
                    seq += 1;
                    answer.observe(&event);
                    log.push(event.clone());
                    send_frame(frames, with_id(turn, seq, &event)).await;
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
    if let Some(rest) = splitter.finish() {
        answer.observe(&rest);
        send_frame(frames, rest).await;
    }
    true
}

pub(crate) async fn send_frame(frames: &mut Option<FrameSender>, bytes: Bytes) {
    if let Some(tx) = frames.as_ref() {
        if tx.send(Ok(Frame::data(bytes))).await.is_err() {
            // The client left: keep reading so the answer is still committed.
            *frames = None;
        }
    }
}

/// `id: TURN-SEQ` followed by the event as the upstream sent it.
pub fn with_id(turn: u64, seq: u64, event: &[u8]) -> Bytes {
    use std::fmt::Write;
    let mut out = BytesMut::with_capacity(event.len() + 48);
    // Writing into a BytesMut cannot fail.
    let _ = writeln!(out, "id: {turn}-{seq}");
    out.extend_from_slice(event);
    out.freeze()
}

// === impl EventLog ===

/// Writes a turn's events to the store in the background, in batches, so a slow store never
/// holds back the client's stream.
struct EventLog {
    tx: mpsc::UnboundedSender<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    fn start(holder: &Holder) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let store = holder.sessions.store.clone();
        let key = holder.key.clone();
        let turn = holder.turn;
        let metrics: Arc<Metrics> = holder.metrics.clone();
        let task = tokio::spawn(async move {
            let mut next = 1;
            let mut batch = Vec::with_capacity(64);
            while rx.recv_many(&mut batch, 64).await > 0 {
                if let Err(err) = store.append_events(&key, turn, next, &batch).await {
                    metrics.session_store_errors.inc();
                    tracing::warn!(session = ?key, error = %err, "cannot log stream events for replay");
                }
                next += batch.len() as u64;
                batch.clear();
            }
        });
        Self { tx, task }
    }

    fn push(&self, event: Bytes) {
        let _ = self.tx.send(event);
    }

    /// Waits until every event pushed is written.
    async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

// === impl ChannelBody ===

/// A response body fed by a task, so the client reads frames while the task keeps ownership
/// of the upstream body (or of the replay loop).
pub struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl ChannelBody {
    pub fn new(receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> Self {
        Self { receiver }
    }
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
