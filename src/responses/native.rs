//! `POST /v1/responses` to upstreams that have the Responses API: the request goes as the
//! client sent it, except that a `previous_response_id` the gateway holds is replaced by the
//! conversation it names, put in front of `input` (so a chain continues on any upstream and
//! replica). With `store`, the upstream's answer is kept as the gateway keeps its own, before a
//! stream's `response.completed` reaches the client. The answer itself passes through unchanged.
//!
//! The conversation sent (the chain's and this request's items) is compressed as the chat
//! pipeline compresses a stateless conversation ([`crate::chat::compression::stateless_plan`]):
//! the same policy, epochs frozen under a key of the caller and the conversation's start, so
//! the upstream's prompt cache keeps hitting, and the originals of what markers replace kept in
//! the caller's store. The items go to the compressor as chat messages and come back as items
//! ([`super::items`]): what it left alone byte for byte, reasoning included.
//!
//! Not done here: the chat pipeline's sessions (goal lock, checkpointed resume) and the
//! `ctxgate_expand` tool, which needs the gateway's tool loop; markers name originals that
//! `GET /v1/ctxgate/originals/{id}` returns.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, HeaderMap, Request, Response};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::expand_rounds::{self, Rounds};
use super::items;
use super::request::{items_of, listed};
use super::store::{self, Chain, New};
use super::{collect, send};
use crate::body::{self, Body, ChannelBody, FrameSender};
use crate::chat::compression::{self, Conversation};
use crate::compress::Acted;
use crate::error::GatewayError;
use crate::handlers::passthrough;
use crate::headers;
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::AppState;

/// What the gateway keeps of one request, once the upstream has answered.
struct Keep {
    app: Arc<AppState>,
    scope: String,
    /// The conversation before this request.
    previous: Option<Chain>,
    /// This request's input, as items.
    input: Vec<Value>,
    /// This request's input items, as listed.
    input_items: Vec<Value>,
}

pub(super) async fn create(
    app: Arc<AppState>,
    mut parts: request::Parts,
    bytes: Bytes,
    scope: String,
) -> Result<Response<Body>, GatewayError> {
    let Ok(mut fields) = serde_json::from_slice::<Map<String, Value>>(&bytes) else {
        // Not an object: the upstream says what is wrong with it.
        return passthrough::passthrough(app, Request::from_parts(parts, body::full(bytes))).await;
    };
    // A background response is the upstream's to run, store and cancel: the gateway keeps
    // none of it, and reads of its id go to the upstream.
    let background = fields.get("background").and_then(Value::as_bool).unwrap_or(false);
    let keep = fields.get("store").and_then(Value::as_bool).unwrap_or(true) && !background;
    let stream = fields.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let named = fields.get("previous_response_id").filter(|id| !id.is_null());
    let previous = match named.and_then(Value::as_str) {
        Some(id) => store::chain(&app.sessions, &scope, id).await?,
        None => None,
    };
    // An input the gateway cannot read as items is the upstream's to refuse.
    let input = items_of(fields.get("input").unwrap_or(&Value::Null)).ok();
    // A chain the gateway does not hold is the upstream's own: its conversation is not the
    // gateway's to compress, and keeping its next response would keep one without its start.
    let Some(input) = input.filter(|_| previous.is_some() || named.is_none()) else {
        return passthrough::passthrough(app, Request::from_parts(parts, body::full(bytes))).await;
    };
    let conversation: Vec<Value> = match &previous {
        Some(previous) => previous.items.iter().chain(&input).cloned().collect(),
        None => input.clone(),
    };
    let opted_out =
        parts.headers.get(&headers::COMPRESSION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off"));
    let mut annotations = HeaderMap::new();
    let compressed = match opted_out {
        true => None,
        false => compress(&app, &parts, &scope, &mut fields, &conversation, &mut annotations).await?,
    };
    let mut rounds = None;
    let body = match (&previous, compressed) {
        (None, None) => bytes,
        (_, compressed) => {
            fields.remove("previous_response_id");
            let sent = match compressed {
                Some(compressed) => {
                    if compressed.markers && app.compressor.config.expand {
                        offer_expand(&mut fields);
                        rounds = Some(compressed.originals);
                    }
                    compressed.items
                }
                None => conversation,
            };
            fields.insert("input".into(), Value::Array(sent));
            Bytes::from(serde_json::to_vec(&fields).map_err(|e| GatewayError::Internal(e.into()))?)
        }
    };
    // The gateway reads the answer: it must come unencoded.
    parts.headers.remove(header::ACCEPT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(&headers::COMPRESSION);
    let rounds = rounds.map(|originals| Rounds {
        app: app.clone(),
        fields: fields.clone(),
        headers: expand_rounds::round_headers(&parts.headers, app.sessions.config.header.primary()),
        originals,
        scope: scope.clone(),
    });
    let mut answer =
        passthrough::passthrough(app.clone(), Request::from_parts(parts, body::full(body))).await?;
    answer.headers_mut().extend(annotations);
    if !answer.status().is_success() {
        return Ok(answer);
    }
    let keeper = keep.then(|| Keep { app: app.clone(), scope, previous, input_items: listed(&input), input });
    if rounds.is_none() && keeper.is_none() {
        return Ok(answer);
    }
    answer.headers_mut().remove(header::CONTENT_LENGTH);
    if stream {
        let (frames, client_body) = ChannelBody::channel(32);
        let mut upstream = std::mem::replace(answer.body_mut(), client_body);
        if let Some(rounds) = rounds {
            let (round_frames, relayed) = ChannelBody::channel(32);
            app.spawn(rounds.stream(upstream, round_frames));
            upstream = relayed;
        }
        match keeper {
            Some(keeper) => app.spawn(keeper.relay(upstream, frames)),
            None => app.spawn(pipe(upstream, frames)),
        }
        return Ok(answer);
    }
    let (head, upstream) = answer.into_parts();
    let mut bytes = collect(upstream, app.config.server.max_answer_bytes.get()).await?;
    if let Some(rounds) = rounds {
        let first: Value = serde_json::from_slice(&bytes)
            .map_err(|e| GatewayError::Internal(format!("the upstream answer is not JSON: {e}").into()))?;
        let last = rounds.json(first).await?;
        bytes = Bytes::from(serde_json::to_vec(&last).map_err(|e| GatewayError::Internal(e.into()))?);
    }
    if let Some(keeper) = keeper {
        if let Ok(object) = serde_json::from_slice::<Value>(&bytes) {
            keeper.save(object).await?;
        }
    }
    Ok(Response::from_parts(head, body::full(bytes)))
}

/// Passes a body's frames on to `client` while it is there.
async fn pipe(mut upstream: Body, client: FrameSender) {
    while let Some(Ok(frame)) = upstream.frame().await {
        if client.send(Ok(frame)).await.is_err() {
            return;
        }
    }
}

/// A conversation as compression left it.
struct Compressed {
    items: Vec<Value>,
    /// The items carry markers: `ctxgate_expand` can restore what they name.
    markers: bool,
    /// The conversation as the compressor read it (where originals are found).
    originals: Vec<Box<RawValue>>,
}

/// `ctxgate_expand` after the client's tools.
fn offer_expand(fields: &mut Map<String, Value>) {
    let tools = fields.entry("tools").or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(tools) = tools {
        tools.push(expand_rounds::definition());
    }
}

/// The conversation's items as compression leaves them, when it rewrote any (`None` when
/// compression is off for the model, or the conversation is under its marks); what it did goes
/// in `annotations`, and a derived `prompt_cache_key` in `fields` when the route takes one.
async fn compress(
    app: &Arc<AppState>,
    parts: &request::Parts,
    scope: &str,
    fields: &mut Map<String, Value>,
    conversation: &[Value],
    annotations: &mut HeaderMap,
) -> Result<Option<Compressed>, GatewayError> {
    let Some(model) = fields.get("model").and_then(Value::as_str).map(str::to_string) else {
        return Ok(None);
    };
    if app.compressor.active(&model).is_none() {
        return Ok(None);
    }
    let instructions = fields.get("instructions").and_then(Value::as_str);
    let Some(mapped) = items::map(instructions, conversation.to_vec()) else { return Ok(None) };
    let tools = fields.get("tools").and_then(|t| serde_json::value::to_raw_value(t).ok());
    let asked = Conversation {
        scope: scope.to_string(),
        model: &model,
        route: app.upstreams.router.route(Some(&model)),
        messages: &mapped.messages,
        tools: tools.as_deref(),
    };
    let Some((compaction, mut plan)) = compression::stateless_plan(app, &asked).await? else {
        return Ok(None);
    };
    let items = matches!(plan.acted, Acted::Rules | Acted::Hybrid).then(|| mapped.rebuild(&plan.messages));
    if let (Some(key), true) = (compaction.cache_key(), items.is_some()) {
        fields.entry("prompt_cache_key").or_insert_with(|| Value::String(key.to_string()));
    }
    let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
    let markers =
        compaction.finish_foreign(app, annotations, &mut plan, mapped.messages.len(), &model, authorization);
    Ok(items.map(|items| Compressed { items, markers, originals: mapped.messages }))
}

impl Keep {
    /// Keeps the Response object `object` (a finished one) with the conversation through its
    /// output.
    async fn save(&self, object: Value) -> Result<(), GatewayError> {
        let Some(id) = object.get("id").and_then(Value::as_str).filter(|id| crate::session::valid_id(id))
        else {
            return Ok(());
        };
        let output = object["output"].as_array().into_iter().flatten();
        let new = New {
            id,
            response: object.clone(),
            input_items: self.input_items.clone(),
            previous: self.previous.as_ref(),
            items: self.input.iter().chain(output).cloned().collect(),
            session: None,
            streamed: false,
        };
        store::save(&self.app.sessions, &self.scope, new).await
    }

    /// Passes the upstream's events on as they come; the one that finishes the response is
    /// held until the response is kept.
    async fn relay(self, mut upstream: Body, client: FrameSender) {
        let mut client = Some(client);
        let mut splitter = EventSplitter::new(self.app.config.server.max_sse_event_bytes.get());
        while let Some(frame) = upstream.frame().await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else { continue };
            let events = match splitter.feed(&data) {
                Ok(events) => events,
                Err(too_large) => {
                    let error = serde_json::json!({
                        "type": "error", "code": "upstream_response_too_large",
                        "message": too_large.to_string(), "param": null,
                    });
                    send(&mut client, vec![Bytes::from(format!("event: error\ndata: {error}\n\n"))]).await;
                    return;
                }
            };
            for event in events {
                if let Some(finished) = finished_response(&event) {
                    if let Err(err) = self.save(finished).await {
                        tracing::warn!(error = %err, "cannot keep a streamed response");
                    }
                }
                send(&mut client, vec![event]).await;
            }
        }
        if let Some(rest) = splitter.finish() {
            send(&mut client, vec![rest]).await;
        }
    }
}

/// The Response object of a `response.completed` or `response.incomplete` event.
fn finished_response(event: &[u8]) -> Option<Value> {
    let data = event.split(|b| *b == b'\n').find_map(sse::data)?;
    let mut value: Value = serde_json::from_slice(data).ok()?;
    matches!(value["type"].as_str(), Some("response.completed" | "response.incomplete"))
        .then(|| value["response"].take())
}
