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
//! The gateway's tools (its injected HTTP and MCP tools, and `ctxgate_expand` when the items
//! carry markers) are offered after the client's and answered in rounds of the gateway's own
//! ([`super::tool_rounds`]). A request that names a session runs as a turn of
//! it ([`super::native_session`]): its lease, its goal lock, its transcript; the turn is
//! committed before the client sees the response complete.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, HeaderMap, Request, Response};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::items::ItemConversation;
use super::native_session::{self, GoalItem, SessionTurn};
use super::request::{items_of, listed};
use super::store::{self, Chain, New};
use super::tool_rounds::{self, Rounds};
use super::{collect, send};
use crate::body::{self, Body, ChannelBody, FrameSender};
use crate::chat;
use crate::chat::compression::{self, Conversation};
use crate::compress::marker::EXPAND_TOOL;
use crate::compress::Acted;
use crate::error::GatewayError;
use crate::handlers::passthrough;
use crate::headers;
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::session::{Lease, StoredRequest};
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
    /// `store` (and not `background`): the response is kept.
    store: bool,
    /// The session the turn ran on, recorded with the response so its chain stays on it.
    session: Option<String>,
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
    let instructions = fields.get("instructions").and_then(Value::as_str).map(str::to_string);
    let earlier = previous.as_ref().map_or(&[][..], |p| p.items.as_slice());
    let conversation = ItemConversation::new(instructions, earlier, &input);
    let opted_out =
        parts.headers.get(&headers::COMPRESSION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off"));
    // The client's own conversation id, before compression may add a derived one.
    let client_key = fields.get("prompt_cache_key").and_then(Value::as_str).map(str::to_string);
    // The gateway's own tools, offered after the client's (counted in the budget with them).
    let engaged = !background && offer_gateway_tools(&app, &mut fields);
    let mut annotations = HeaderMap::new();
    let compressed = match opted_out {
        true => None,
        false => compress(&app, &parts, &scope, &mut fields, &conversation, &mut annotations).await?,
    };
    // A background response runs upstream, out of the gateway's sight: the gateway can neither
    // answer its expand calls nor commit its turn.
    let mut originals = None;
    let sent = compressed.map(|compressed| {
        if compressed.markers && app.compressor.config.expand && !background {
            offer_expand(&mut fields);
            originals = Some(compressed.originals);
        }
        compressed.items
    });
    let rewritten = previous.is_some() || sent.is_some() || engaged;
    if rewritten {
        fields.remove("previous_response_id");
        let input = sent.unwrap_or_else(|| conversation.items());
        fields.insert("input".into(), Value::Array(input));
    }
    let mut sent_body = SentBody { fields, bytes, rewritten, goal: false };
    let admitted = match (background, fields_model(&sent_body.fields)) {
        (false, Some(model)) => {
            let key = client_key.as_deref();
            let mut body = |goal| sent_body.body(goal, &conversation);
            native_session::admit(&app, &parts, &model, key, previous.as_ref(), &conversation, &mut body)
                .await?
        }
        _ => None,
    };
    let (session, body) = match admitted {
        Some((turn, body)) => (Some(turn), body),
        None => (None, sent_body.body(None, &conversation)?),
    };
    let mut fields = sent_body.fields;
    let session_id = session.as_ref().map(SessionTurn::id);
    // The gateway reads the answer: it must come unencoded.
    parts.headers.remove(header::ACCEPT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    // ctxgate's own request headers stay here, as on the chat pipeline.
    strip_gateway_headers(&app, &mut parts.headers);
    let rounds = (engaged || originals.is_some()).then(|| Rounds {
        app: app.clone(),
        // The request as sent; nothing reads it here after this.
        fields: std::mem::take(&mut fields),
        headers: tool_rounds::round_headers(&parts.headers),
        originals,
        scope: scope.clone(),
        caller: parts.extensions.get::<crate::auth::Caller>().cloned(),
        tasks: session.as_ref().map(SessionTurn::tasks),
    });
    let keeper = Keep {
        app: app.clone(),
        scope,
        previous,
        input_items: listed(&input),
        input,
        store: keep,
        session: session_id,
    };
    let request = Request::from_parts(parts, body::full(body));
    if session.is_none() {
        return Exchange { app, keeper, rounds, session, stream, annotations }.run(request).await;
    }
    // A session turn is detached from the client's connection, as on the chat pipeline: a
    // client that goes away does not leave the session held until its lease runs out, and the
    // turn still commits.
    let (reply, answer) = tokio::sync::oneshot::channel();
    let detached = app.clone();
    detached.spawn(async move {
        let exchange = Exchange { app, keeper, rounds, session, stream, annotations };
        let _ = reply.send(exchange.run(request).await);
    });
    answer
        .await
        .unwrap_or_else(|_| Err(GatewayError::Internal("the session turn ended without a response".into())))
}

/// Re-issues a session turn whose process died ([`chat::Reissue`]): the request its marker
/// recorded, byte for byte, with the resuming caller's headers, under the taken-over lease; the
/// gateway's tool rounds run if it offered their tools (a durable task the dead process started
/// is found in the checkpoint), and the answer is committed. No client waits for it: it is read
/// to its end here, and kept in no stored response (the client never saw its id).
pub(super) fn reissue(
    app: Arc<AppState>,
    lease: Lease,
    request: StoredRequest,
    headers: HeaderMap,
) -> chat::BoxFuture<()> {
    Box::pin(async move {
        let scope = lease.key().scope.clone();
        let conversation = request.conversation.unwrap_or_default();
        let turn = SessionTurn::resumed(lease, conversation.clone());
        let Ok(fields) = serde_json::from_str::<Map<String, Value>>(request.body.get()) else {
            tracing::warn!(session = %turn.id(), "an interrupted turn's request cannot be read; given up");
            let _ = turn.finish(None).await;
            return;
        };
        let stream = fields.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let offered: Vec<&str> = match fields.get("tools") {
            Some(Value::Array(tools)) => tools.iter().filter_map(|t| t["name"].as_str()).collect(),
            _ => Vec::new(),
        };
        let expand = offered.contains(&EXPAND_TOOL);
        let engaged = offered.iter().any(|name| app.tools.get(name).is_some());
        let mut headers = tool_rounds::round_headers(&headers);
        strip_gateway_headers(&app, &mut headers);
        headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        let tasks = Some(turn.tasks());
        let session = Some(turn.id());
        let rounds = (engaged || expand).then(|| Rounds {
            app: app.clone(),
            fields,
            headers: headers.clone(),
            originals: expand.then_some(conversation),
            scope: scope.clone(),
            caller: None,
            tasks,
        });
        let keeper = Keep {
            app: app.clone(),
            scope,
            previous: None,
            input: Vec::new(),
            input_items: Vec::new(),
            store: false,
            session,
        };
        let mut sent = Request::new(body::full(Bytes::from(request.body.get().to_string())));
        *sent.method_mut() = http::Method::POST;
        *sent.headers_mut() = headers;
        match request.path.parse() {
            Ok(uri) => *sent.uri_mut() = uri,
            Err(_) => *sent.uri_mut() = http::Uri::from_static("/v1/responses"),
        }
        let exchange =
            Exchange { app, keeper, rounds, session: Some(turn), stream, annotations: HeaderMap::new() };
        match exchange.run(sent).await {
            Ok(response) => chat::drain(response).await,
            Err(err) => tracing::warn!(error = %err, "an interrupted turn's re-issue failed"),
        }
    })
}

/// Removes ctxgate's own request headers: they never go upstream on this path.
fn strip_gateway_headers(app: &AppState, headers: &mut HeaderMap) {
    headers.remove(&headers::COMPRESSION);
    headers.remove(&headers::SESSION_MODE);
    headers.remove(app.sessions.config.header.primary());
}

/// The request as it goes upstream: the client's bytes when nothing changes, else its fields
/// with the conversation as `input`, led by the goal block of the session it runs on.
struct SentBody {
    fields: Map<String, Value>,
    /// The client's body.
    bytes: Bytes,
    /// `fields` carry the conversation as `input` (not the client's `input` as sent).
    rewritten: bool,
    /// `input` starts with a goal block.
    goal: bool,
}

impl SentBody {
    /// The body with `goal` first (fixed bytes, so the prefix stays stable). Admission may
    /// call it again (it retries its compare-and-set): the last call's goal is what is sent.
    fn body(&mut self, goal: GoalItem, conversation: &ItemConversation<'_>) -> Result<Bytes, GatewayError> {
        if std::mem::take(&mut self.goal) {
            if let Some(Value::Array(input)) = self.fields.get_mut("input") {
                input.remove(0);
            }
        }
        match goal {
            None if !self.rewritten => return Ok(self.bytes.clone()),
            None => {}
            Some(goal) => {
                if !std::mem::replace(&mut self.rewritten, true) {
                    self.fields.remove("previous_response_id");
                    self.fields.insert("input".into(), Value::Array(conversation.items()));
                }
                if let Some(Value::Array(input)) = self.fields.get_mut("input") {
                    input.insert(0, goal);
                    self.goal = true;
                }
            }
        }
        serde_json::to_vec(&self.fields).map(Bytes::from).map_err(|e| GatewayError::Internal(e.into()))
    }
}

fn fields_model(fields: &Map<String, Value>) -> Option<String> {
    fields.get("model").and_then(Value::as_str).map(str::to_string)
}

/// One request on its way: sent, its answer relayed (with the gateway's tool rounds), kept and committed.
struct Exchange {
    app: Arc<AppState>,
    keeper: Keep,
    rounds: Option<Rounds>,
    session: Option<SessionTurn>,
    stream: bool,
    annotations: HeaderMap,
}

impl Exchange {
    async fn run(self, request: Request<Body>) -> Result<Response<Body>, GatewayError> {
        let Exchange { app, keeper, rounds, mut session, stream, annotations } = self;
        let sent = passthrough::passthrough(app.clone(), request);
        let answered = match &mut session {
            Some(turn) => turn.during(sent).await,
            None => sent.await,
        };
        let mut answer = match answered {
            Ok(answer) if answer.status().is_success() => answer,
            other => {
                // The upstream's error (or none at all): the turn did not happen.
                if let Some(turn) = session {
                    let _ = turn.finish(None).await;
                }
                return other;
            }
        };
        answer.headers_mut().extend(annotations);
        if rounds.is_none() && !keeper.store && session.is_none() {
            return Ok(answer);
        }
        answer.headers_mut().remove(header::CONTENT_LENGTH);
        if let (true, Some(turn)) = (stream, &session) {
            answer.headers_mut().insert(headers::SESSION_VERSION, http::HeaderValue::from(turn.version()));
        }
        if stream {
            let (frames, client_body) = ChannelBody::channel(32);
            let mut upstream = std::mem::replace(answer.body_mut(), client_body);
            if let Some(rounds) = rounds {
                let (round_frames, relayed) = ChannelBody::channel(32);
                app.spawn(rounds.stream(upstream, round_frames));
                upstream = relayed;
            }
            app.spawn(keeper.relay(upstream, frames, session));
            return Ok(answer);
        }
        let (head, upstream) = answer.into_parts();
        let limit = app.config.server.max_answer_bytes.get();
        // The answer as it came (unless rounds ran), and as JSON when it is.
        let read = async {
            let bytes = collect(upstream, limit).await?;
            match (rounds, serde_json::from_slice::<Value>(&bytes).ok()) {
                (Some(rounds), Some(object)) => {
                    let object = rounds.json(object).await?;
                    let bytes = serde_json::to_vec(&object).map_err(|e| GatewayError::Internal(e.into()))?;
                    Ok((Bytes::from(bytes), Some(object)))
                }
                (_, object) => Ok((bytes, object)),
            }
        };
        let read = match &mut session {
            Some(turn) => turn.during(read).await,
            None => read.await,
        };
        let (bytes, object) = match read {
            Ok(read) => read,
            Err(err) => {
                if let Some(turn) = session {
                    let _ = turn.finish(None).await;
                }
                return Err(err);
            }
        };
        let saved = match &object {
            Some(object) => keeper.save(object).await,
            None => Ok(()),
        };
        // A response that could not be kept is not committed either; the session is released.
        let mut head = head;
        if let Some(turn) = session {
            match turn.finish(object.as_ref().filter(|_| saved.is_ok())).await {
                Ok(version) => {
                    head.headers.insert(headers::SESSION_VERSION, http::HeaderValue::from(version));
                }
                // The session moved on without this turn: the answer is still the client's,
                // marked as not saved, as on the chat pipeline.
                Err(GatewayError::SessionConflict { .. }) => {
                    head.headers.insert(headers::SESSION_STATE, http::HeaderValue::from_static("not_saved"));
                }
                Err(err) => return Err(err),
            }
        }
        saved?;
        Ok(Response::from_parts(head, body::full(bytes)))
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

/// Adds the gateway's injected tools the request does not declare itself to its `tools`, after
/// the client's own (in the flat Responses shape). Returns whether the request can reach a
/// gateway tool (one injected, or one it declares by name).
fn offer_gateway_tools(app: &AppState, fields: &mut Map<String, Value>) -> bool {
    let declared: Vec<String> = match fields.get("tools") {
        Some(Value::Array(tools)) => {
            tools.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect()
        }
        _ => Vec::new(),
    };
    let (missing, engaged) = app.tools.offer(&declared);
    if !missing.is_empty() {
        if let Value::Array(tools) = fields.entry("tools").or_insert_with(|| Value::Array(Vec::new())) {
            tools.extend(missing.into_iter().map(tool_rounds::flat));
        }
    }
    engaged
}

/// `ctxgate_expand` after the client's tools.
fn offer_expand(fields: &mut Map<String, Value>) {
    let tools = fields.entry("tools").or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(tools) = tools {
        tools.push(tool_rounds::definition());
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
    conversation: &ItemConversation<'_>,
    annotations: &mut HeaderMap,
) -> Result<Option<Compressed>, GatewayError> {
    let Some(model) = fields.get("model").and_then(Value::as_str).map(str::to_string) else {
        return Ok(None);
    };
    if app.compressor.active(&model).is_none() {
        return Ok(None);
    }
    let Some(mapped) = conversation.mapped() else { return Ok(None) };
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
    Ok(items.map(|items| Compressed { items, markers, originals: mapped.messages.clone() }))
}

impl Keep {
    /// Keeps the Response object `object` (a finished one) with the conversation through its
    /// output, with `store`.
    async fn save(&self, object: &Value) -> Result<(), GatewayError> {
        if !self.store {
            return Ok(());
        }
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
            session: self.session.clone(),
            streamed: false,
        };
        store::save(&self.app.sessions, &self.scope, new).await
    }

    /// Passes the upstream's events on as they come. The one that finishes the response is
    /// held until the response is kept and the turn committed; the session's lease is renewed
    /// until then, and released without a commit if the stream ends otherwise.
    async fn relay(self, mut upstream: Body, client: FrameSender, mut session: Option<SessionTurn>) {
        let mut client = Some(client);
        let mut splitter = EventSplitter::new(self.app.config.server.max_sse_event_bytes.get());
        let relayed = Self::until_finished(&mut upstream, &mut splitter, &mut client);
        let finished = match &mut session {
            Some(turn) => turn.during(relayed).await,
            None => relayed.await,
        };
        let Some((object, event)) = finished else {
            if let Some(rest) = splitter.finish() {
                send(&mut client, vec![rest]).await;
            }
            if let Some(turn) = session {
                let _ = turn.finish(None).await;
            }
            return;
        };
        if let Err(err) = self.save(&object).await {
            tracing::warn!(error = %err, "cannot keep a streamed response");
        }
        if let Some(turn) = session {
            if let Err(err) = turn.finish(Some(&object)).await {
                tracing::warn!(error = %err, "cannot commit a streamed turn");
            }
        }
        send(&mut client, vec![event]).await;
        // What follows the finishing event (a `[DONE]` some servers add).
        while let Some(frame) = upstream.frame().await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else { continue };
            if let Ok(events) = splitter.feed(&data) {
                send(&mut client, events).await;
            }
        }
        if let Some(rest) = splitter.finish() {
            send(&mut client, vec![rest]).await;
        }
    }

    /// Sends events until the one that finishes the response, which is returned unsent with
    /// its Response object; `None` when the stream ends (or fails) first.
    async fn until_finished(
        upstream: &mut Body,
        splitter: &mut EventSplitter,
        client: &mut Option<FrameSender>,
    ) -> Option<(Value, Bytes)> {
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
                    send(client, vec![Bytes::from(format!("event: error\ndata: {error}\n\n"))]).await;
                    return None;
                }
            };
            let mut events = events.into_iter();
            for event in events.by_ref() {
                if let Some(finished) = finished_response(&event) {
                    // Events split with it from the same frame follow it.
                    let rest: Vec<Bytes> = events.collect();
                    let mut held = bytes::BytesMut::from(&event[..]);
                    rest.iter().for_each(|e| held.extend_from_slice(e));
                    return Some((finished, held.freeze()));
                }
                send(client, vec![event]).await;
            }
        }
        None
    }
}

/// The Response object of a `response.completed` or `response.incomplete` event.
fn finished_response(event: &[u8]) -> Option<Value> {
    let data = event.split(|b| *b == b'\n').find_map(sse::data)?;
    let mut value: Value = serde_json::from_slice(data).ok()?;
    matches!(value["type"].as_str(), Some("response.completed" | "response.incomplete"))
        .then(|| value["response"].take())
}
