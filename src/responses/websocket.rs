//! The Responses API's WebSocket mode, terminated by ctxgate: `GET /v1/responses` with
//! `Upgrade: websocket` (Codex's built-in provider, the SDKs' `responses.connect()`), then one
//! `response.create` message per turn, answered with the response's events as text frames.
//!
//! Each turn is the `POST /v1/responses` request it stands for (the message without `type`,
//! with `stream: true`, the upgrade request's headers and extensions: its credential, caller
//! and session headers) run through [`super::create`], so it takes the same pipeline: over a
//! chat upstream translation, compression, sessions, the goal lock and gateway tools; over a
//! Responses upstream the native path. The `data:` of every SSE event it answers is sent as one
//! frame; an error is an `{"type":"error","status",...,"error":{...}}` frame, after which the
//! socket serves the next turn. Each turn is admitted against the caller's key limits as a
//! request is.
//!
//! The socket keeps each lane's last unstored response's conversation (its input items, the
//! conversation it continued, its output), so a turn sending only new input with that
//! `previous_response_id` and `store: false` continues it: the request is sent with the whole
//! conversation in `input`, as a client without the socket would send it. A stored response is
//! continued through the store, as over HTTP. The kept conversation is bounded by the request
//! body limit (the equivalent HTTP request could be no larger); past it, it is forgotten and the
//! client is told `previous_response_not_found`, which clients answer with the whole context.
//!
//! A `generate: false` turn (a warm-up: Codex sends one first) is answered here with an empty
//! completed response, and prepares the conversation the next turn continues.
//!
//! Lanes (`stream_id`, OpenAI's WebSocket multiplexing): a `response.create` with a
//! `stream_id` runs on that lane, beside the other lanes' turns; messages on one lane run in
//! order (one waits behind the lane's running turn), and every frame of a lane's turn carries
//! its `stream_id`. Each lane remembers its last unstored response, and a turn on any lane may
//! continue any lane's (a fork). Messages without a `stream_id` share one lane, on which a
//! `response.create` while a turn runs is refused with an error frame, as before lanes.
//!
//! Bounds: a message over `server.max_body_bytes` closes the socket with 1009; a socket with no
//! turn in flight and no message for `server.idle_timeout` is closed; at most [`MAX_LANES`]
//! lanes run at once and [`MAX_QUEUED`] messages wait on one (past either, an error frame);
//! the messages waiting and the conversations remembered each take at most
//! `server.max_body_bytes` per socket (the oldest lane's conversation is forgotten first);
//! `background` is refused.
//! A client that leaves mid-turn drops the turn's stream, as an HTTP client that disconnects
//! does. The connection itself is run by [`crate::server`] as any upgraded connection is.
//!
//! What this module does not own: the pipeline ([`super::create`]), the 101 and the running of
//! the upgraded connection ([`crate::tunnel`], [`crate::server`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::request::items_of;
use super::response::Base;
use super::stream::Translator;
use super::{new_id, now_secs};
use crate::auth::{Admission, Caller};
use crate::body::{self, Body};
use crate::error::{ErrorLabel, GatewayError};
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::tunnel::{self, Closed, Tunnel};
use crate::AppState;

/// How much of an error answer is read to turn it into an error frame.
const MAX_ERROR_BYTES: usize = 64 * 1024;

/// The handshake's headers that describe the socket, not the turns sent on it.
const SOCKET_HEADERS: [HeaderName; 8] = [
    header::CONNECTION,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// Whether `protocol` (an `Upgrade` header) asks for a WebSocket.
pub(crate) fn is_websocket(protocol: &HeaderValue) -> bool {
    protocol.as_bytes().eq_ignore_ascii_case(b"websocket")
}

/// Accepts the upgrade (the request passed the stack: its key is checked and admitted) and
/// answers 101 with the connection for [`crate::server`] to run.
pub(crate) async fn accept(
    app: Arc<AppState>,
    mut request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let headers = request.headers();
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(GatewayError::invalid(
            "A WebSocket handshake must send Sec-WebSocket-Version: 13.",
            None,
            "invalid_websocket_handshake",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(GatewayError::invalid(
            "A WebSocket handshake must send Sec-WebSocket-Key.",
            None,
            "invalid_websocket_handshake",
        ));
    };
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|e| GatewayError::Internal(e.into()))?;
    let client = hyper::upgrade::on(&mut request);
    let (mut parts, _body) = request.into_parts();
    for name in SOCKET_HEADERS {
        parts.headers.remove(name);
    }
    // The pipeline reads the answer (it must come unencoded) and is sent JSON.
    parts.headers.remove(header::ACCEPT_ENCODING);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
    let socket = Socket {
        app: app.clone(),
        headers: parts.headers,
        extensions: parts.extensions,
        remembered: VecDeque::new(),
    };
    app.metrics.websocket.connections.inc();
    let mut switched = HeaderMap::new();
    switched.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    let serve: tunnel::Serve = Box::new(move |io, idle| Box::pin(socket.serve(io, idle)));
    Ok(tunnel::switching(switched, HeaderValue::from_static("websocket"), Tunnel::served(client, serve)))
}

/// One accepted socket: what each turn's request is made of, and the conversation it keeps.
struct Socket {
    app: Arc<AppState>,
    /// The upgrade request's headers (credential, session headers), less the socket's own.
    headers: HeaderMap,
    /// The upgrade request's extensions (the caller the key layer found, the request id).
    extensions: http::Extensions,
    /// The conversation through each lane's last unstored response, oldest first (at most
    /// [`MAX_LANES`]).
    remembered: VecDeque<Remembered>,
}

/// The conversation through a lane's last unstored response.
struct Remembered {
    lane: Lane,
    id: String,
    items: Vec<Value>,
    /// Its size as JSON: what the socket keeps is bounded by `server.max_body_bytes` in all.
    bytes: usize,
}

/// A `response.create`'s `stream_id`: `None` is the lane of messages without one.
type Lane = Option<String>;

/// Lanes with a turn running or waiting, per socket; past it a new lane is refused. Also how
/// many lanes' conversations a socket remembers.
const MAX_LANES: usize = 16;

/// Messages waiting on one lane behind its running turn; past it the message is refused.
const MAX_QUEUED: usize = 16;

/// A `response.create`, read once: its fields, and its size as sent (what waiting costs).
struct Create {
    fields: Map<String, Value>,
    bytes: usize,
}

/// The turns running on a socket, one per lane, and the messages waiting behind them.
struct Lanes {
    running: Vec<Turn>,
    queued: Vec<(Lane, VecDeque<Create>)>,
    /// Bytes of the waiting messages, at most `limit` (one request's worth) in all.
    queued_bytes: usize,
    limit: usize,
}

impl Lanes {
    fn busy(&self, lane: &Lane) -> bool {
        self.running.iter().any(|t| &t.lane == lane)
    }

    /// Lanes in use: a queue only waits behind its lane's running turn.
    fn count(&self) -> usize {
        self.running.len()
    }

    /// Queues `message` behind the lane's running turn; gives it back when its queue is full,
    /// or the socket's waiting messages would pass `limit` bytes.
    fn enqueue(&mut self, lane: Lane, message: Create) -> Result<(), Create> {
        if self.queued_bytes + message.bytes > self.limit {
            return Err(message);
        }
        let bytes = message.bytes;
        match self.queued.iter_mut().find(|(l, _)| *l == lane) {
            Some((_, queue)) if queue.len() >= MAX_QUEUED => return Err(message),
            Some((_, queue)) => queue.push_back(message),
            None => self.queued.push((lane, VecDeque::from([message]))),
        }
        self.queued_bytes += bytes;
        Ok(())
    }

    /// The next message waiting on `lane`.
    fn dequeue(&mut self, lane: &Lane) -> Option<Create> {
        let at = self.queued.iter().position(|(l, _)| l == lane)?;
        let message = self.queued[at].1.pop_front();
        if self.queued[at].1.is_empty() {
            self.queued.remove(at);
        }
        self.queued_bytes -= message.as_ref().map_or(0, |m| m.bytes);
        message
    }
}

/// What a running turn needs once its response is complete, to remember it.
struct Sent {
    store: bool,
    /// The `previous_response_id` the socket resolved (the request went without it).
    continued: Option<String>,
    /// The conversation as sent (the remembered one and this input), when the input reads as
    /// items.
    items: Option<Vec<Value>>,
}

/// The turn's request answered: the events' body and the caller's admission (its in-flight
/// slot, held until the turn ends), or an error frame.
type Calling = Pin<Box<dyn Future<Output = Result<(Body, Option<Admission>), String>> + Send>>;

/// A turn in flight: its request being answered, then its events.
struct Turn {
    /// Its lane: every frame it sends carries the lane's `stream_id`.
    lane: Lane,
    state: State,
    pending: VecDeque<String>,
    sent: Sent,
    /// The largest event read: a `response.completed` carries the whole answer.
    max_event: usize,
    outcome: &'static str,
    /// Its final event (`response.completed`, `.incomplete`, `.failed`) is sent.
    ended: bool,
}

enum State {
    Calling(Calling),
    Streaming { body: Body, splitter: EventSplitter, _admission: Option<Admission> },
    Done,
}

impl Socket {
    /// Serves turns until the client closes, the socket is idle for `idle`, or a message is too
    /// large.
    async fn serve(mut self, io: TokioIo<Upgraded>, idle: Duration) -> Closed {
        let limit = self.app.config.server.max_body_bytes.get();
        let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let mut lanes = Lanes { running: Vec::new(), queued: Vec::new(), queued_bytes: 0, limit };
        let mut heard = Instant::now();
        loop {
            let idle_at = heard + idle;
            tokio::select! {
                message = ws.next() => {
                    heard = Instant::now();
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                            self.cancel(lanes);
                            let reason = format!("A message may be at most {limit} bytes.");
                            let frame = CloseFrame { code: CloseCode::Size, reason: reason.into() };
                            let _ = ws.close(Some(frame)).await;
                            return Closed::Ended;
                        }
                        Some(Err(err)) => {
                            tracing::debug!(error = %err, "responses websocket failed");
                            self.cancel(lanes);
                            return Closed::Ended;
                        }
                        None => {
                            self.cancel(lanes);
                            return Closed::Ended;
                        }
                    };
                    let refusal = match message {
                        Message::Text(text) => self.take(&mut lanes, text.as_str()).await,
                        Message::Binary(_) => Some(error_frame(&GatewayError::invalid(
                            "Messages are JSON text frames.",
                            None,
                            "invalid_message",
                        ))),
                        // The close reply is queued by tungstenite; the flush sends it.
                        Message::Close(_) => {
                            self.cancel(lanes);
                            let _ = ws.flush().await;
                            return Closed::Ended;
                        }
                        // A ping's pong is queued by tungstenite; the flush sends it now.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                            let _ = ws.flush().await;
                            None
                        }
                    };
                    if let Some(frame) = refusal {
                        if ws.send(Message::text(frame)).await.is_err() {
                            self.cancel(lanes);
                            return Closed::Ended;
                        }
                    }
                }
                (at, frame) = next_frame(&mut lanes.running), if !lanes.running.is_empty() => {
                    let Some(mut frame) = frame else {
                        for frame in self.finish(&mut lanes, at, &mut heard).await {
                            if ws.send(Message::text(frame)).await.is_err() {
                                self.cancel(lanes);
                                return Closed::Ended;
                            }
                        }
                        continue;
                    };
                    let turn = &mut lanes.running[at];
                    self.observe(turn, &mut frame);
                    if ws.send(Message::text(on_lane(frame, &turn.lane))).await.is_err() {
                        self.cancel(lanes);
                        return Closed::Ended;
                    }
                    // Over with its last frame: the next response.create is not refused as
                    // coming while it runs.
                    if lanes.running[at].over() {
                        for frame in self.finish(&mut lanes, at, &mut heard).await {
                            if ws.send(Message::text(frame)).await.is_err() {
                                self.cancel(lanes);
                                return Closed::Ended;
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(idle_at), if lanes.running.is_empty() => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "idle timeout".into() };
                    let _ = ws.close(Some(frame)).await;
                    return Closed::Idle;
                }
            }
        }
    }

    /// Takes a `response.create`: starts its turn when its lane is free, queues it behind the
    /// lane's running turn (a lane named by `stream_id`: FIFO), or refuses it with the error
    /// frame returned (a second turn on the unnamed lane, a full queue, too many lanes, a
    /// message that cannot run).
    async fn take(&mut self, lanes: &mut Lanes, text: &str) -> Option<String> {
        // Read once: the lane comes from the fields the turn is made of.
        let Ok(fields) = serde_json::from_str::<Map<String, Value>>(text) else {
            self.count("error");
            return Some(error_frame(&GatewayError::invalid(
                "The message is not a JSON object.",
                None,
                "invalid_json",
            )));
        };
        let lane = fields.get("stream_id").and_then(Value::as_str).map(str::to_string);
        let message = Create { fields, bytes: text.len() };
        let refused = |code: &'static str, message: &str| {
            on_lane(error_frame(&GatewayError::invalid(message.to_string(), None, code)), &lane)
        };
        let refusal = if lanes.busy(&lane) {
            match &lane {
                None => Some(refused(
                    "conversation_already_has_active_response",
                    "Another response is in progress on this socket; send response.create once it is done, or give it a stream_id of its own.",
                )),
                Some(_) => match lanes.enqueue(lane.clone(), message) {
                    Ok(()) => return None,
                    Err(_) => Some(refused(
                    "too_many_queued_responses",
                    &format!(
                        "At most {MAX_QUEUED} responses may wait on one stream_id, and at most server.max_body_bytes of messages on a socket."
                    ),
                    )),
                },
            }
        } else if lanes.count() >= MAX_LANES {
            Some(refused(
                "too_many_streams",
                &format!("At most {MAX_LANES} stream_ids may run at once on a socket."),
            ))
        } else {
            match self.start(message.fields, lane.clone()).await {
                Ok(started) => {
                    lanes.running.push(started);
                    return None;
                }
                Err(frame) => Some(on_lane(frame, &lane)),
            }
        };
        self.count("error");
        refusal
    }

    /// Ends the turn at `at`, counting its outcome, and starts the next message waiting on its
    /// lane; the idle clock starts again. Returns the error frames of the waiting messages that
    /// could not start (each refused in turn until one starts).
    async fn finish(&mut self, lanes: &mut Lanes, at: usize, heard: &mut Instant) -> Vec<String> {
        let done = lanes.running.swap_remove(at);
        self.count(done.outcome);
        *heard = Instant::now();
        let mut refused = Vec::new();
        while let Some(next) = lanes.dequeue(&done.lane) {
            match self.start(next.fields, done.lane.clone()).await {
                Ok(started) => {
                    lanes.running.push(started);
                    break;
                }
                Err(frame) => {
                    self.count("error");
                    refused.push(on_lane(frame, &done.lane));
                }
            }
        }
        refused
    }

    fn count(&self, outcome: &'static str) {
        let label = crate::telemetry::OutcomeLabel { outcome };
        self.app.metrics.websocket.turns.get_or_create(&label).inc();
    }

    /// Drops the turns of a client that left: their streams end as an HTTP client's would.
    fn cancel(&self, lanes: Lanes) {
        for _ in &lanes.running {
            self.count("cancelled");
        }
    }

    /// Reads a `response.create` and starts its turn; an error frame if it cannot run.
    async fn start(&mut self, fields: Map<String, Value>, lane: Lane) -> Result<Turn, String> {
        let (body, sent, generate) = self.request_body(fields).map_err(|e| error_frame(&e))?;
        if !generate {
            return warm_up(&body, sent, lane).map_err(|e| error_frame(&e));
        }
        let mut request = Request::new(body::full(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static("/v1/responses");
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        let caller = self.extensions.get::<Caller>().cloned();
        let admission = match &caller {
            Some(caller) => {
                Some(self.app.auth.limiter.admit(&caller.key).await.map_err(|e| error_frame(&e))?)
            }
            None => None,
        };
        let app = self.app.clone();
        let calling: Calling = Box::pin(async move {
            let answer = crate::stack::serve_inner(&app, request, |app, request| {
                Box::pin(async move { super::create(app, request).await.map_err(socket_error) })
            })
            .await;
            if answer.status().is_success() {
                return Ok((answer.into_body(), admission));
            }
            let refused = answer.extensions().get::<ErrorLabel>().is_some_and(|l| l.0 == "model_not_allowed");
            if let (true, Some(caller), Some(admission)) = (refused, &caller, &admission) {
                app.auth.limiter.refund(&caller.key, admission).await;
            }
            Err(answered_error(answer).await)
        });
        Ok(Turn {
            lane,
            state: State::Calling(calling),
            pending: VecDeque::new(),
            sent,
            max_event: self.app.config.server.max_answer_bytes.get(),
            outcome: "error",
            ended: false,
        })
    }

    /// The `POST /v1/responses` body a `response.create` message stands for, and whether it
    /// asks for an answer (`generate: false` is a warm-up).
    fn request_body(&self, mut fields: Map<String, Value>) -> Result<(Bytes, Sent, bool), GatewayError> {
        if fields.remove("type").as_ref().and_then(Value::as_str) != Some("response.create") {
            return Err(GatewayError::invalid(
                "Unsupported message type: only 'response.create' is accepted.",
                Some("type"),
                "invalid_value",
            ));
        }
        if fields.get("background").and_then(Value::as_bool) == Some(true) {
            return Err(GatewayError::invalid(
                "background is not supported over WebSocket.",
                Some("background"),
                "unsupported_parameter",
            ));
        }
        fields.remove("background");
        // WebSocket-only: the lane, which the socket routes by.
        fields.remove("stream_id");
        fields.insert("stream".into(), Value::Bool(true));
        // WebSocket-only: answered here, never sent on.
        let generate = fields.remove("generate").and_then(|g| g.as_bool()).unwrap_or(true);
        // A warm-up is stored nowhere but on the socket.
        let store = generate && fields.get("store").and_then(Value::as_bool).unwrap_or(true);
        let input = items_of(fields.get("input").unwrap_or(&Value::Null)).ok();
        // Any lane's last response: a new lane may fork from another's.
        let previous = fields.get("previous_response_id").and_then(Value::as_str);
        let continued = self.remembered.iter().find(|last| Some(last.id.as_str()) == previous);
        let resolved = continued.filter(|_| input.is_some()).map(|last| last.id.clone());
        let items = match (continued, input) {
            (Some(last), Some(input)) => {
                let items: Vec<Value> = last.items.iter().cloned().chain(input).collect();
                fields.remove("previous_response_id");
                fields.insert("input".into(), Value::Array(items.clone()));
                Some(items)
            }
            // Continued through the store (or not found there), as over HTTP: not remembered.
            (None, _) if fields.get("previous_response_id").is_some_and(|id| !id.is_null()) => None,
            (_, input) => input,
        };
        let body = serde_json::to_vec(&fields).map_err(|e| GatewayError::Internal(e.into()))?;
        Ok((Bytes::from(body), Sent { store, continued: resolved, items }, generate))
    }

    /// Remembers the conversation through a turn's unstored response as its last event goes
    /// out, and notes the turn's outcome.
    fn observe(&mut self, turn: &mut Turn, frame: &mut String) {
        if let Some(id) = &turn.sent.continued {
            // The request went with the whole conversation instead of the id: the response
            // says which one it continues, as the client asked.
            const UNSET: &str = "\"previous_response_id\":null";
            if let Some(at) = frame.find(UNSET) {
                let id = Value::String(id.clone());
                frame.replace_range(at..at + UNSET.len(), &format!("\"previous_response_id\":{id}"));
            }
        }
        let finishing = ["response.completed", "response.incomplete", "response.failed"];
        if !finishing.iter().any(|word| frame.contains(word)) {
            return;
        }
        let Ok(mut event) = serde_json::from_str::<Value>(frame) else { return };
        match event["type"].as_str() {
            Some("response.completed" | "response.incomplete") => {
                turn.outcome = "completed";
                turn.ended = true;
                self.remembered.retain(|last| last.lane != turn.lane);
                let response = event["response"].take();
                let (Some(id), Some(items)) = (response["id"].as_str(), turn.sent.items.take()) else {
                    return;
                };
                if turn.sent.store {
                    return;
                }
                let output = response["output"].as_array().cloned().unwrap_or_default();
                let items: Vec<Value> = items.into_iter().chain(output).collect();
                let bytes: usize = items.iter().map(|item| item.to_string().len()).sum();
                let limit = self.app.config.server.max_body_bytes.get();
                if bytes <= limit {
                    // The oldest lanes' conversations go first (their next turn is told
                    // previous_response_not_found and resends its context).
                    while self.remembered.len() >= MAX_LANES
                        || self.remembered.iter().map(|r| r.bytes).sum::<usize>() + bytes > limit
                    {
                        self.remembered.pop_front();
                    }
                    let lane = turn.lane.clone();
                    self.remembered.push_back(Remembered { lane, id: id.to_string(), items, bytes });
                }
            }
            Some("response.failed") => {
                turn.outcome = "failed";
                turn.ended = true;
            }
            _ => {}
        }
    }
}

impl Turn {
    /// Whether it has nothing more to send: its final event is out (what its body may still
    /// hold after it, `[DONE]`, is not sent), or it ended without one.
    fn over(&self) -> bool {
        self.ended || (matches!(self.state, State::Done) && self.pending.is_empty())
    }

    /// The next frame to send; `None` once the turn is over. Cancel-safe: the request in
    /// flight and the body are kept between calls.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            match &mut self.state {
                State::Calling(calling) => match calling.await {
                    Ok((body, admission)) => {
                        // Until its last event says otherwise.
                        self.outcome = "failed";
                        let splitter = EventSplitter::new(self.max_event);
                        self.state = State::Streaming { body, splitter, _admission: admission };
                    }
                    Err(frame) => {
                        self.state = State::Done;
                        return Some(frame);
                    }
                },
                State::Streaming { body, splitter, .. } => match body.frame().await {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        match splitter.feed(&data) {
                            Ok(events) => self.pending.extend(events.iter().filter_map(|e| payload(e))),
                            Err(too_large) => {
                                self.pending.push_back(stream_error(&too_large.to_string()));
                                self.state = State::Done;
                            }
                        }
                    }
                    Some(Err(err)) => {
                        self.pending.push_back(stream_error(&format!("The response stream failed: {err}")));
                        self.state = State::Done;
                    }
                    None => {
                        let State::Streaming { splitter, .. } =
                            std::mem::replace(&mut self.state, State::Done)
                        else {
                            continue;
                        };
                        self.pending.extend(splitter.finish().and_then(|rest| payload(&rest)));
                    }
                },
                State::Done => return None,
            }
        }
    }
}

/// A `generate: false` turn (Codex sends one as a thread starts): a completed response with
/// no output and no upstream call, whose id a next turn continues from on this socket (the
/// request state it prepares is the conversation the socket keeps).
fn warm_up(body: &[u8], sent: Sent, lane: Lane) -> Result<Turn, GatewayError> {
    let parsed = super::request::parse(body)?;
    let base = Base { id: new_id("resp"), created_at: now_secs(), model: parsed.model, echo: parsed.echo };
    let mut translator = Translator::new(base);
    let mut events = translator.start();
    let (closing, finished) = translator.finish();
    events.extend(closing);
    events.push(translator.completed(&finished));
    Ok(Turn {
        lane,
        state: State::Done,
        pending: events.iter().filter_map(|event| payload(event)).collect(),
        sent,
        max_event: 0,
        outcome: "completed",
        ended: false,
    })
}

/// The next frame of any running turn, with the turn's index (`None`: that turn is over).
/// Cancel-safe, as [`Turn::next`] is. Pending forever when nothing runs (the caller does not
/// poll it then).
async fn next_frame(running: &mut [Turn]) -> (usize, Option<String>) {
    match running {
        [] => return std::future::pending().await,
        // The usual socket, one lane: no allocation per frame.
        [only] => return (0, only.next().await),
        _ => {}
    }
    let nexts =
        running.iter_mut().enumerate().map(|(at, turn)| Box::pin(async move { (at, turn.next().await) }));
    futures_util::future::select_all(nexts).await.0
}

/// `frame` (a JSON object) with the lane's `stream_id`, as OpenAI's WebSocket mode echoes it
/// on every event of a response created with one.
fn on_lane(frame: String, lane: &Lane) -> String {
    let Some(id) = lane else { return frame };
    let Some(rest) = frame.strip_prefix('{') else { return frame };
    let id = Value::String(id.clone());
    match rest.trim_start().starts_with('}') {
        true => format!("{{\"stream_id\":{id}{rest}"),
        false => format!("{{\"stream_id\":{id},{rest}"),
    }
}

/// The `data:` of one SSE event (its lines joined, as SSE does); none for a comment (a
/// keep-alive) or `[DONE]`.
fn payload(event: &[u8]) -> Option<String> {
    let lines: Vec<&[u8]> = event
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter_map(sse::data)
        .collect();
    if lines.is_empty() || lines == [b"[DONE]".as_slice()] {
        return None;
    }
    String::from_utf8(lines.join(&b'\n')).ok()
}

/// An error as the WebSocket mode sends it.
fn error_frame(err: &GatewayError) -> String {
    let mut body = err.to_json();
    frame(err.status(), body["error"].take())
}

/// A turn's error as the socket reports it. A `previous_response_id` the socket and the store
/// do not hold is `previous_response_not_found`, as OpenAI's WebSocket mode says it (clients
/// answer it by sending the whole context).
fn socket_error(err: GatewayError) -> GatewayError {
    match err {
        GatewayError::ResponseNotFound { .. } => GatewayError::invalid(
            err.to_string(),
            Some("previous_response_id"),
            "previous_response_not_found",
        ),
        other => other,
    }
}

fn frame(status: StatusCode, error: Value) -> String {
    json!({"type": "error", "status": status.as_u16(), "error": error}).to_string()
}

/// An error answer (the upstream's, in OpenAI's shape, or the gateway's) as an error frame.
async fn answered_error(answer: Response<Body>) -> String {
    let status = answer.status();
    let mut bytes = Vec::new();
    let mut body = answer.into_body();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
            if bytes.len() > MAX_ERROR_BYTES {
                break;
            }
        }
    }
    let error = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .map(|mut body| body["error"].take())
        .filter(Value::is_object)
        .unwrap_or_else(|| {
            json!({
                "type": "server_error",
                "code": "upstream_error",
                "message": format!("The upstream answered {status}."),
                "param": null,
            })
        });
    frame(status, error)
}

fn stream_error(message: &str) -> String {
    frame(
        StatusCode::BAD_GATEWAY,
        json!({"type": "server_error", "code": "upstream_error", "message": message, "param": null}),
    )
}
