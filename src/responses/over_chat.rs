//! `POST /v1/responses` over a Chat Completions upstream: the request becomes a chat request
//! ([`super::request`]) with the conversation a `previous_response_id` names put in front of it,
//! runs through the chat pipeline as any chat request does, and its answer becomes a Response
//! object ([`super::response`]) or Responses events ([`super::stream`]). The turn runs on the
//! session the request names (the session header, else the chain's, else a client's own
//! conversation id, see [`crate::session::identify`]), `store` or not; with `store` the
//! response is stored ([`super::store`]) before the client sees it complete, and one that names
//! no session begins a chain of its own. With `background`, [`super::background`] runs it
//! detached.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::request::{self as translate, Parsed};
use super::response::{self, Base};
use super::store::{self, Chain, New};
use super::stream::Translator;
use super::{background, collect, new_id, now_secs, send};
use crate::body::{Body, ChannelBody, FrameSender};
use crate::chat::{self, ChatContext};
use crate::error::GatewayError;
use crate::headers;
use crate::http_util::json_response;
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::session::events::EventLog;
use crate::session::Identity;
use crate::AppState;

/// `POST /v1/responses` as a chat request through the pipeline.
pub(super) async fn create(
    app: Arc<AppState>,
    mut parts: request::Parts,
    bytes: Bytes,
    scope: String,
) -> Result<Response<Body>, GatewayError> {
    let parsed = translate::parse(&bytes)?;
    let previous = match &parsed.previous_response_id {
        Some(id) => Some(
            store::chain(&app.sessions, &scope, id)
                .await?
                .ok_or_else(|| GatewayError::ResponseNotFound { id: id.clone() })?,
        ),
        None => None,
    };
    let id = new_id("resp");
    let mut messages = Vec::new();
    messages.extend(parsed.instructions.clone());
    if let Some(previous) = &previous {
        messages.extend(translate::messages_of(&previous.items)?);
    }
    messages.extend(parsed.messages.iter().cloned());
    let mut chat = parsed.chat.clone();
    chat.insert("messages".into(), Value::Array(messages));
    let chat = serde_json::to_vec(&chat).map_err(|e| GatewayError::Internal(e.into()))?;

    // The pipeline reads and rewrites what the upstream answers: it must come unencoded. The
    // whole conversation is sent every time, so a session sees no append mode.
    parts.uri = http::Uri::from_static("/v1/chat/completions");
    parts.headers.remove(header::ACCEPT_ENCODING);
    parts.headers.remove(&headers::SESSION_MODE);
    let mut ctx = ChatContext::from_body(&app, parts, Bytes::from(chat)).await?;
    let session = match ctx.session.clone() {
        Some(named) if !named.implicit => Some(named.id),
        implicit => {
            // A stored chain keeps its session; else a client's own conversation id names it;
            // else a stored response begins a chain, and a session, of its own.
            let chained = previous.as_ref().and_then(|p| p.session.clone()).filter(|_| parsed.store);
            let chosen = match (chained, implicit) {
                (Some(chain), _) => Some(Identity::named(chain)),
                (None, Some(implicit)) => Some(implicit),
                (None, None) => parsed.store.then(|| Identity::named(id.clone())),
            };
            if let Some(chosen) = &chosen {
                ctx.on_session(&app, chosen.clone());
            }
            chosen.map(|chosen| chosen.id)
        }
    };
    let base = Base {
        id: id.clone(),
        created_at: now_secs(),
        model: parsed.model.clone(),
        echo: parsed.echo.clone(),
    };
    let turn = Turn { app: app.clone(), scope, parsed, previous, session, base };
    if turn.parsed.background {
        return background::start(turn, ctx).await;
    }

    let mut answer = chat::answer(app.clone(), ctx).await?;
    if !answer.status().is_success() {
        // The upstream's error, in OpenAI's shape already; the response did not happen.
        return Ok(answer);
    }
    answer.headers_mut().remove(header::CONTENT_LENGTH);
    if turn.parsed.stream {
        let (frames, client_body) = ChannelBody::channel(32);
        let upstream = std::mem::replace(answer.body_mut(), client_body);
        app.spawn(turn.relay(upstream, frames));
        return Ok(answer);
    }
    let limit = app.config.server.max_answer_bytes.get();
    let (mut head, upstream) = answer.into_parts();
    let collected = collect(upstream, limit).await?;
    let completion: Value = serde_json::from_slice(&collected)
        .map_err(|e| GatewayError::Internal(format!("the upstream answer is not JSON: {e}").into()))?;
    let (object, output) = response::from_completion(&turn.base, &completion);
    turn.save(&object, &output).await?;
    let mut response = json_response(&object);
    head.headers.remove(header::CONTENT_TYPE);
    for (name, value) in head.headers.iter() {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    *response.status_mut() = head.status;
    // What the layers above read off the answer (the upstream wait for the overhead metric).
    *response.extensions_mut() = head.extensions;
    Ok(response)
}

/// One Responses request on its way through the pipeline: what it needs once the answer is in.
pub(super) struct Turn {
    pub(super) app: Arc<AppState>,
    pub(super) scope: String,
    pub(super) parsed: Parsed,
    /// The conversation before this request.
    pub(super) previous: Option<Chain>,
    pub(super) session: Option<String>,
    pub(super) base: Base,
}

impl Turn {
    /// Stores the response (with `store`), with the conversation through its answer.
    async fn save(&self, object: &Value, output: &[Value]) -> Result<(), GatewayError> {
        if !self.parsed.store {
            return Ok(());
        }
        let new = New {
            id: &self.base.id,
            response: object.clone(),
            input_items: self.parsed.input_items.clone(),
            previous: self.previous.as_ref(),
            items: self.parsed.items.iter().chain(output).cloned().collect(),
            session: self.session.clone(),
            streamed: false,
        };
        store::save(&self.app.sessions, &self.scope, new).await
    }

    /// Translates the chat stream into Responses events for the client. The response is stored
    /// before `response.completed` is sent: a client that saw it can continue the chain. A
    /// client that goes away does not stop the turn: it is read to its end and stored.
    async fn relay(self, upstream: Body, client: FrameSender) {
        let mut events = Events { client: Some(client), log: None };
        let mut translator = Translator::new(self.base.clone());
        events.send(translator.start()).await;
        let limit = self.app.config.server.max_sse_event_bytes.get();
        if let Err(error) = translate_stream(upstream, limit, &mut translator, &mut events).await {
            events.send(translator.failed(&error)).await;
            return;
        }
        let (closing, finished) = translator.finish();
        events.send(closing).await;
        if let Err(err) = self.save(&finished.response, &finished.output).await {
            tracing::warn!(error = %err, "cannot store a streamed response");
            events.send(translator.failed(&err.to_json()["error"])).await;
            return;
        }
        let completed = translator.completed(&finished);
        events.send(vec![completed]).await;
    }
}

/// Where a response's stream events go: its client while it is there, and for a background
/// response its log, for replay.
pub(super) struct Events {
    pub(super) client: Option<FrameSender>,
    pub(super) log: Option<EventLog>,
}

impl Events {
    /// Logs `events` (not keep-alive comments, which carry no number) and sends them.
    pub(super) async fn send(&mut self, events: Vec<Bytes>) {
        if let Some(log) = &self.log {
            for event in events.iter().filter(|e| !e.starts_with(b":")) {
                log.push(event.clone()).await;
            }
        }
        send(&mut self.client, events).await;
    }

    /// Waits until every logged event is written.
    pub(super) async fn close_log(&mut self) {
        if let Some(log) = self.log.take() {
            log.close().await;
        }
    }
}

/// Reads a chat stream to its end, sending what each event becomes to `events`; `Err` with
/// the error the response failed with. The closing events are the caller's to send.
pub(super) async fn translate_stream(
    mut upstream: Body,
    max_event_bytes: usize,
    translator: &mut Translator,
    events: &mut Events,
) -> Result<(), Value> {
    let mut splitter = EventSplitter::new(max_event_bytes);
    let mut done = false;
    while let Some(frame) = upstream.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(err) => return Err(stream_error(&format!("The upstream stream failed: {err}"))),
        };
        let split = splitter.feed(&data).map_err(|too_large| stream_error(&too_large.to_string()))?;
        for event in split {
            match translate(translator, &event) {
                Step::Events(out) => events.send(out).await,
                Step::Done => done = true,
                Step::Failed(error) => return Err(error),
            }
        }
    }
    if !done {
        return Err(stream_error("The upstream stream ended before the response was complete."));
    }
    Ok(())
}

/// What one chat SSE event becomes.
fn translate(translator: &mut Translator, event: &[u8]) -> Step {
    let mut out = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b":") {
            // A keep-alive while the gateway's tools run: passed on as one.
            out.push(Bytes::from([line, b"\n\n"].concat()));
            continue;
        }
        let Some(data) = sse::data(line) else { continue };
        if data == b"[DONE]" {
            return if out.is_empty() { Step::Done } else { Step::Events(out) };
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else { continue };
        match translator.chunk(&chunk) {
            Ok(events) => out.extend(events),
            Err(error) => return Step::Failed(error),
        }
    }
    Step::Events(out)
}

enum Step {
    Events(Vec<Bytes>),
    Done,
    Failed(Value),
}

pub(super) fn stream_error(message: &str) -> Value {
    json!({"message": message, "type": "server_error", "code": "upstream_error", "param": null})
}
