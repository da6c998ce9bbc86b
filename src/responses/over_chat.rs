//! `POST /v1/responses` over a Chat Completions upstream: the request becomes a chat request
//! ([`super::request`]) with the conversation a `previous_response_id` names put in front of it,
//! runs through the chat pipeline as any chat request does, and its answer becomes a Response
//! object ([`super::response`]) or Responses events ([`super::stream`]). The turn runs on the
//! session the request names (the session header, else the chain's, else a client's own
//! conversation id, see [`crate::session::identify`]), `store` or not; with `store` the
//! response is stored ([`super::store`]) before the client sees it complete, and one that names
//! no session begins a chain of its own.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::request::{self as translate, Parsed};
use super::response::{self, Base};
use super::store::{self, Chain, New};
use super::stream::Translator;
use super::{collect, new_id, now_secs, send};
use crate::body::{Body, ChannelBody, FrameSender};
use crate::chat::{self, ChatContext};
use crate::error::GatewayError;
use crate::headers;
use crate::http_util::json_response;
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::session::Identity;
use crate::AppState;

/// `POST /v1/responses` as a chat request through the pipeline.
pub(super) async fn create(
    app: Arc<AppState>,
    mut parts: request::Parts,
    bytes: Bytes,
    scope: Vec<u8>,
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
struct Turn {
    app: Arc<AppState>,
    scope: Vec<u8>,
    parsed: Parsed,
    /// The conversation before this request.
    previous: Option<Chain>,
    session: Option<String>,
    base: Base,
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
        };
        store::save(&self.app.sessions, &self.scope, new).await
    }

    /// Translates the chat stream into Responses events for the client. The response is stored
    /// before `response.completed` is sent: a client that saw it can continue the chain. A
    /// client that goes away does not stop the turn: it is read to its end and stored.
    async fn relay(self, mut upstream: Body, client: FrameSender) {
        let mut client = Some(client);
        let mut translator = Translator::new(self.base.clone());
        send(&mut client, translator.start()).await;
        let mut splitter = EventSplitter::new(self.app.config.server.max_sse_event_bytes.get());
        let mut done = false;
        let mut failure: Option<Value> = None;
        'read: while let Some(frame) = upstream.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(err) => {
                    failure = Some(stream_error(&format!("The upstream stream failed: {err}")));
                    break;
                }
            };
            let events = match splitter.feed(&data) {
                Ok(events) => events,
                Err(too_large) => {
                    failure = Some(stream_error(&too_large.to_string()));
                    break;
                }
            };
            for event in events {
                match self.translate(&mut translator, &event) {
                    Step::Events(events) => send(&mut client, events).await,
                    Step::Done => done = true,
                    Step::Failed(error) => {
                        failure = Some(error);
                        break 'read;
                    }
                }
            }
        }
        if failure.is_none() && !done {
            failure = Some(stream_error("The upstream stream ended before the response was complete."));
        }
        if let Some(error) = failure {
            send(&mut client, translator.failed(&error)).await;
            return;
        }
        let (closing, finished) = translator.finish();
        send(&mut client, closing).await;
        if let Err(err) = self.save(&finished.response, &finished.output).await {
            tracing::warn!(error = %err, "cannot store a streamed response");
            send(&mut client, translator.failed(&err.to_json()["error"])).await;
            return;
        }
        let completed = translator.completed(&finished);
        send(&mut client, vec![completed]).await;
    }

    /// What one chat SSE event becomes.
    fn translate(&self, translator: &mut Translator, event: &[u8]) -> Step {
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
}

enum Step {
    Events(Vec<Bytes>),
    Done,
    Failed(Value),
}

fn stream_error(message: &str) -> Value {
    json!({"message": message, "type": "server_error", "code": "upstream_error", "param": null})
}
