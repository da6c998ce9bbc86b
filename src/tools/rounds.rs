//! The tool loop around the upstream call. When the model's answer calls gateway tools, they
//! run (all at once, see [`super::call`]), their results are appended as `tool` messages in
//! call order, and the model is asked again, for up to `tool_loop.max_rounds` rounds; the
//! request after the last round carries `tool_choice: "none"`. The final answer goes to the
//! client.
//!
//! - Non-streamed answers gain a `ctxgate` object: `tool_runs` (tool, timing, attempts,
//!   outcome) and `rounds`.
//! - Streamed answers flow live until the first tool-call delta; from there events are held
//!   until the round ends. Held events of a round that only called gateway tools are dropped,
//!   and SSE comments keep the connection alive while the tools run.
//! - An answer that also calls client tools: on a session, the gateway's calls run and are
//!   removed from what the client sees (their results are owed to the next turn, see
//!   [`super::record`]); without a session nothing runs and the answer passes through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response};
use http_body_util::BodyExt;
use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::call::{Call, ToolRun};
use super::record::Expansion;
use super::tasks::TaskLog;
use crate::body::{self, Body};
use crate::conversation::{send_frame as send_event, ChannelBody, FrameSender as Frames};
use crate::error::GatewayError;
use crate::openai::answer::AnswerBuilder;
use crate::openai::events::{is_done, EventSplitter};
use crate::openai::{sse, ChatRequestHead};
use crate::upstream::{Outgoing, OutgoingBody, Upstream, UpstreamWait, UsageSink};
use crate::AppState;

/// A chat request that may call gateway tools.
pub struct Request<'a> {
    pub route: &'a [Arc<Upstream>],
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    /// On a session: an answer mixing gateway and client calls runs the gateway's.
    pub session: bool,
    pub usage_sink: UsageSink,
    /// Where tasks are recorded (on a session).
    pub tasks: Option<Arc<TaskLog>>,
    /// Every round goes to the same pool endpoint (see `upstream::affinity`).
    pub affinity: Option<crate::upstream::AffinityKey>,
}

/// What the loop did, ready once the response body has ended.
#[derive(Debug, Default)]
pub struct Report {
    pub rounds: u32,
    pub runs: Vec<ToolRun>,
    /// Messages added before the final answer: each round's assistant message and results.
    pub messages: Vec<Box<RawValue>>,
    /// The final assistant message as the model wrote it.
    pub answer: Option<Box<RawValue>>,
    /// The final answer mixed gateway and client calls (sessions only).
    pub held: Option<Expansion>,
}

/// Sends `request` upstream and runs the loop. The response is returned as soon as its head is
/// known; for streams, the body is fed by a task, and `Report` arrives when it ends.
pub async fn forward(
    state: &Arc<AppState>,
    request: Request<'_>,
) -> Result<(Response<Body>, oneshot::Receiver<Report>), GatewayError> {
    let (report_tx, report_rx) = oneshot::channel();
    let mut conversation = Conversation::parse(&request.body)?;
    let response = send(state, &request, request.body.clone()).await?;
    if !response.status().is_success() {
        let _ = report_tx.send(Report::default());
        return Ok((response, report_rx));
    }
    if request.stream {
        let (frames, receiver) = mpsc::channel(32);
        let (mut parts, upstream_body) = response.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let state = state.clone();
        let owned = OwnedRequest::from(&request);
        tokio::spawn(async move {
            let report = stream_rounds(&state, owned, &mut conversation, upstream_body, frames).await;
            state.metrics.tools.rounds.observe(f64::from(report.rounds));
            let _ = report_tx.send(report);
        });
        let response = Response::from_parts(parts, ChannelBody::new(receiver).boxed_unsync());
        return Ok((response, report_rx));
    }
    let (response, report) = json_rounds(state, &request, &mut conversation, response).await?;
    state.metrics.tools.rounds.observe(f64::from(report.rounds));
    let _ = report_tx.send(report);
    Ok((response, report_rx))
}

/// The request's messages, and the rounds' messages appended after them.
struct Conversation {
    body: Bytes,
    span: std::ops::Range<usize>,
    messages: Vec<Box<RawValue>>,
}

impl Conversation {
    fn parse(body: &Bytes) -> Result<Self, GatewayError> {
        let (_, messages) = ChatRequestHead::parse_with_messages(body)?;
        Ok(Self {
            body: body.clone(),
            span: messages.span.clone(),
            messages: messages.items.iter().map(|m| (*m).to_owned()).collect(),
        })
    }

    /// The body of the next round: every added message, and `tool_choice: "none"` once the
    /// rounds are used up.
    fn next_body(&self, last: bool) -> Result<Bytes, GatewayError> {
        let body = crate::conversation::splice_messages(&self.body, self.span.clone(), &self.messages);
        if !last {
            return Ok(body);
        }
        let mut fields: IndexMap<String, Box<RawValue>> =
            serde_json::from_slice(&body).map_err(|e| GatewayError::Internal(e.into()))?;
        fields.insert("tool_choice".into(), raw(&json!("none")));
        Ok(Bytes::from(serde_json::to_vec(&fields).map_err(|e| GatewayError::Internal(e.into()))?))
    }
}

/// The parts of a request a streaming task keeps.
struct OwnedRequest {
    route: Vec<Arc<Upstream>>,
    path: String,
    headers: HeaderMap,
    session: bool,
    usage_sink: UsageSink,
    tasks: Option<Arc<TaskLog>>,
    affinity: Option<crate::upstream::AffinityKey>,
}

impl From<&Request<'_>> for OwnedRequest {
    fn from(r: &Request<'_>) -> Self {
        Self {
            route: r.route.to_vec(),
            path: r.path.clone(),
            headers: r.headers.clone(),
            session: r.session,
            usage_sink: r.usage_sink.clone(),
            tasks: r.tasks.clone(),
            affinity: r.affinity,
        }
    }
}

async fn send(state: &AppState, request: &Request<'_>, body: Bytes) -> Result<Response<Body>, GatewayError> {
    let sink = request.usage_sink.clone();
    send_parts(state, request.route, &request.path, &request.headers, sink, request.affinity, body).await
}

async fn send_parts(
    state: &AppState,
    route: &[Arc<Upstream>],
    path: &str,
    headers: &HeaderMap,
    usage_sink: UsageSink,
    affinity: Option<crate::upstream::AffinityKey>,
    body: Bytes,
) -> Result<Response<Body>, GatewayError> {
    let mut headers = headers.clone();
    headers.remove(header::CONTENT_LENGTH);
    let outgoing = Outgoing {
        method: Method::POST,
        path_and_query: path.to_string(),
        headers,
        body: OutgoingBody::Replayable(body),
        affinity,
    };
    let mut forwarded = state.upstreams.forward(route, outgoing).await?;
    forwarded.usage_sink = usage_sink;
    Ok(forwarded.into_response())
}

/// The calls of an assistant message, split into gateway and client calls, each with its
/// position in the message.
struct Split {
    gateway: Vec<(usize, Call)>,
    client: Vec<(usize, Call)>,
}

fn split_calls(state: &AppState, message: &RawValue) -> Split {
    let mut split = Split { gateway: Vec::new(), client: Vec::new() };
    let Ok(value) = serde_json::from_str::<Value>(message.get()) else { return split };
    let Some(calls) = value.get("tool_calls").and_then(Value::as_array) else { return split };
    for (i, call) in calls.iter().enumerate() {
        let text = |pointer| call.pointer(pointer).and_then(Value::as_str).unwrap_or("").to_string();
        let call =
            Call { id: text("/id"), name: text("/function/name"), arguments: text("/function/arguments") };
        if state.tools.get(&call.name).is_some() {
            split.gateway.push((i, call));
        } else {
            split.client.push((i, call));
        }
    }
    split
}

/// The assistant message with only the calls at `keep`.
fn only_calls(message: &RawValue, keep: &[usize]) -> Box<RawValue> {
    let Ok(mut value) = serde_json::from_str::<IndexMap<String, Value>>(message.get()) else {
        return message.to_owned();
    };
    if let Some(Value::Array(calls)) = value.get_mut("tool_calls") {
        let kept: Vec<Value> =
            calls.drain(..).enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, c)| c).collect();
        *calls = kept;
    }
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| message.to_owned())
}

fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Runs the gateway calls of a round; returns their `tool` messages in call order.
async fn run_round(
    state: &AppState,
    calls: Vec<Call>,
    tasks: Option<Arc<TaskLog>>,
    report: &mut Report,
) -> Vec<Box<RawValue>> {
    let outcomes = state.tools.run_all(calls, tasks).await;
    report.rounds += 1;
    let messages = outcomes.iter().map(super::Outcome::message).collect();
    report.runs.extend(outcomes.into_iter().map(|o| o.run));
    messages
}

// === non-streamed ===

async fn json_rounds(
    state: &Arc<AppState>,
    request: &Request<'_>,
    conversation: &mut Conversation,
    mut response: Response<Body>,
) -> Result<(Response<Body>, Report), GatewayError> {
    let max_rounds = state.tools.limits.max_rounds;
    let mut report = Report::default();
    // Time spent on others' work before the client's headers: every model call (to its
    // headers and its body) and every tool round. The overhead metric subtracts it.
    let mut waited = Duration::ZERO;
    loop {
        waited += response.extensions().get::<UpstreamWait>().map_or(Duration::ZERO, |w| w.0);
        let reading = Instant::now();
        let bytes = read_all(request.route, std::mem::replace(response.body_mut(), body::empty())).await?;
        waited += reading.elapsed();
        response.extensions_mut().insert(UpstreamWait(waited));
        let mut builder = AnswerBuilder::new(false);
        builder.observe(&bytes);
        let Some(answer) = builder.finish() else {
            *response.body_mut() = body::full(bytes);
            return Ok((response, report));
        };
        let split = split_calls(state, &answer.message);
        let last = report.rounds >= max_rounds;
        if split.gateway.is_empty() || last || (!split.client.is_empty() && !request.session) {
            report.answer = Some(answer.message);
            let bytes = if report.rounds > 0 { with_extension(&bytes, None, &report) } else { bytes };
            return Ok((finish(response, bytes), report));
        }
        let client_ids: Vec<usize> = split.client.iter().map(|(i, _)| *i).collect();
        let calls = split.gateway.into_iter().map(|(_, c)| c).collect();
        let running = Instant::now();
        let results = run_round(state, calls, request.tasks.clone(), &mut report).await;
        waited += running.elapsed();
        if !split.client.is_empty() {
            response.extensions_mut().insert(UpstreamWait(waited));
            let visible = only_calls(&answer.message, &client_ids);
            report.held = Some(Expansion {
                client_call_ids: split.client.into_iter().map(|(_, c)| c.id).collect(),
                full: answer.message,
                results,
            });
            let bytes = with_extension(&bytes, Some(&visible), &report);
            return Ok((finish(response, bytes), report));
        }
        conversation.messages.push(answer.message.clone());
        report.messages.push(answer.message);
        conversation.messages.extend(results.iter().cloned());
        report.messages.extend(results);
        let body = conversation.next_body(report.rounds >= max_rounds)?;
        response = send(state, request, body).await?;
        if !response.status().is_success() {
            let own = response.extensions().get::<UpstreamWait>().map_or(Duration::ZERO, |w| w.0);
            response.extensions_mut().insert(UpstreamWait(waited + own));
            return Ok((response, report));
        }
    }
}

async fn read_all(route: &[Arc<Upstream>], body: Body) -> Result<Bytes, GatewayError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(source) => Err(GatewayError::UpstreamUnreachable {
            upstream: route.first().map_or_else(String::new, |u| u.name.clone()),
            source,
        }),
    }
}

fn finish(mut response: Response<Body>, bytes: Bytes) -> Response<Body> {
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = body::full(bytes);
    response
}

/// The completion with the `ctxgate` object added and, when given, its first choice's
/// message replaced.
fn with_extension(bytes: &Bytes, message: Option<&RawValue>, report: &Report) -> Bytes {
    let Ok(mut fields) = serde_json::from_slice::<IndexMap<String, Value>>(bytes) else {
        return bytes.clone();
    };
    if let Some(message) = message {
        if let (Some(slot), Ok(value)) = (
            fields.get_mut("choices").and_then(|c| c.get_mut(0)),
            serde_json::from_str::<Value>(message.get()),
        ) {
            slot["message"] = value;
        }
    }
    fields.insert("ctxgate".into(), json!({"rounds": report.rounds, "tool_runs": report.runs}));
    serde_json::to_vec(&fields).map(Bytes::from).unwrap_or_else(|_| bytes.clone())
}

// === streamed ===

async fn stream_rounds(
    state: &Arc<AppState>,
    request: OwnedRequest,
    conversation: &mut Conversation,
    mut upstream: Body,
    frames: Frames,
) -> Report {
    let max_rounds = state.tools.limits.max_rounds;
    let mut report = Report::default();
    let mut client = Some(frames);
    loop {
        let Some(round) = read_round(&mut upstream, &mut client).await else {
            // Cut mid-stream: the client's body ends with an error already sent.
            return report;
        };
        let Some(message) = round.answer else {
            flush(&mut client, round.held).await;
            return report;
        };
        let split = split_calls(state, &message);
        let last = report.rounds >= max_rounds;
        if split.gateway.is_empty() || last || (!split.client.is_empty() && !request.session) {
            report.answer = Some(message);
            flush(&mut client, round.held).await;
            return report;
        }
        let client_positions: Vec<usize> = split.client.iter().map(|(i, _)| *i).collect();
        let calls: Vec<Call> = split.gateway.into_iter().map(|(_, c)| c).collect();
        let results =
            keep_alive(state, &mut client, run_round(state, calls, request.tasks.clone(), &mut report)).await;
        if !split.client.is_empty() {
            let held = round.held.into_iter().map(|e| only_call_deltas(&e, &client_positions)).collect();
            report.held = Some(Expansion {
                client_call_ids: split.client.into_iter().map(|(_, c)| c.id).collect(),
                full: message,
                results,
            });
            flush(&mut client, held).await;
            return report;
        }
        conversation.messages.push(message.clone());
        report.messages.push(message);
        conversation.messages.extend(results.iter().cloned());
        report.messages.extend(results);
        let next = conversation.next_body(report.rounds >= max_rounds);
        let response = match next {
            Ok(body) => {
                send_parts(
                    state,
                    &request.route,
                    &request.path,
                    &request.headers,
                    request.usage_sink.clone(),
                    request.affinity,
                    body,
                )
                .await
            }
            Err(err) => Err(err),
        };
        match response {
            Ok(response) if response.status().is_success() => upstream = response.into_body(),
            Ok(response) => {
                let status = response.status();
                let bytes = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let error = serde_json::from_slice::<Value>(&bytes).unwrap_or_else(|_| {
                    json!({"error": {"message": format!("upstream answered {status}"), "type": "upstream_error"}})
                });
                send_event(&mut client, error_event(&error)).await;
                return report;
            }
            Err(err) => {
                let error = json!({"error": {"message": err.to_string(), "type": "upstream_error", "code": "upstream_unreachable"}});
                send_event(&mut client, error_event(&error)).await;
                return report;
            }
        }
    }
}

/// One round of a stream: events before the first tool-call delta went to the client; the
/// rest (and `[DONE]`) are held.
struct Round {
    answer: Option<Box<RawValue>>,
    held: Vec<Bytes>,
}

async fn read_round(upstream: &mut Body, client: &mut Option<Frames>) -> Option<Round> {
    let mut splitter = EventSplitter::default();
    let mut builder = AnswerBuilder::new(true);
    let mut held = Vec::new();
    let mut holding = false;
    loop {
        match upstream.frame().await {
            None => break,
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else { continue };
                for event in splitter.feed(data) {
                    builder.observe(&event);
                    holding = holding || has_tool_call_delta(&event);
                    if holding || is_done(&event) {
                        held.push(event);
                    } else {
                        send_event(client, event).await;
                    }
                }
            }
            Some(Err(err)) => {
                if let Some(tx) = client.take() {
                    let _ = tx.send(Err(err)).await;
                }
                return None;
            }
        }
    }
    if let Some(rest) = splitter.finish() {
        builder.observe(&rest);
        held.push(rest);
    }
    Some(Round { answer: builder.finish().map(|a| a.message), held })
}

fn has_tool_call_delta(event: &[u8]) -> bool {
    memchr::memmem::find(event, b"\"tool_calls\"").is_some()
        && event.split(|b| *b == b'\n').filter_map(sse::data).any(|data| {
            serde_json::from_slice::<Value>(data).is_ok_and(|v| {
                v.get("choices").and_then(Value::as_array).is_some_and(|choices| {
                    choices.iter().any(|c| c.pointer("/delta/tool_calls").is_some_and(|t| !t.is_null()))
                })
            })
        })
}

/// A held event with only the client's tool-call deltas, renumbered from 0 as the client will
/// see them. Events without tool-call deltas are kept as they are.
fn only_call_deltas(event: &Bytes, keep: &[usize]) -> Bytes {
    if !has_tool_call_delta(event) {
        return event.clone();
    }
    let mut out = String::new();
    for line in event.split(|b| *b == b'\n') {
        let Some(data) = sse::data(line) else { continue };
        let Ok(mut value) = serde_json::from_slice::<IndexMap<String, Value>>(data) else { continue };
        if let Some(Value::Array(choices)) = value.get_mut("choices") {
            for choice in choices {
                if let Some(Value::Array(calls)) = choice.pointer_mut("/delta/tool_calls") {
                    let kept: Vec<Value> = calls
                        .drain(..)
                        .filter_map(|mut call| {
                            let index = call.get("index").and_then(Value::as_u64)? as usize;
                            let position = keep.iter().position(|&k| k == index)?;
                            call["index"] = json!(position);
                            Some(call)
                        })
                        .collect();
                    *calls = kept;
                }
            }
        }
        if let Ok(text) = serde_json::to_string(&value) {
            out.push_str("data: ");
            out.push_str(&text);
            out.push_str("\n\n");
        }
    }
    Bytes::from(out)
}

/// Runs `work` while sending an SSE comment at once and then every `keepalive_interval`.
async fn keep_alive<T>(
    state: &AppState,
    client: &mut Option<Frames>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let interval = state.tools.limits.keepalive_interval.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(interval);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => send_event(client, Bytes::from_static(b": ctxgate: running tools\n\n")).await,
        }
    }
}

async fn flush(client: &mut Option<Frames>, events: Vec<Bytes>) {
    for event in events {
        send_event(client, event).await;
    }
}

fn error_event(error: &Value) -> Bytes {
    Bytes::from(format!("data: {error}\n\ndata: [DONE]\n\n"))
}

/// Adds `x-ctxgate-tool-rounds` once the rounds are known (non-streamed responses).
pub fn annotate(headers: &mut HeaderMap, report: &Report) {
    if report.rounds > 0 {
        headers.insert("x-ctxgate-tool-rounds", HeaderValue::from(report.rounds));
    }
}
