//! `POST /v1/responses` (OpenAI's Responses API) through the chat pipeline, and the stored
//! responses: `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`,
//! `DELETE /v1/responses/{id}`.
//!
//! This is the pipeline's second front-end protocol, an adapter at its step 1 (see
//! [`crate::chat`]): the request becomes a chat request ([`request`]) with the conversation a
//! `previous_response_id` names rebuilt in front of it ([`store`]), and runs as any chat
//! request does (compression, gateway tools, retries and failover). Its answer, JSON or SSE,
//! becomes a Response object ([`response`]) or Responses events ([`stream`]).
//!
//! A chain of stored responses is a session: its first response's id names the session its
//! turns run on (unless the client names one with the session header), so compression epochs,
//! the goal lock and the commit apply to it as to any session. Each stored response keeps the
//! conversation through its answer, so a chain continues from any of its responses (a fork is a
//! history rewrite of the session), across a restart (embedded store) and across replicas
//! (Redis).
//!
//! Upstreams that speak the Responses API themselves (`upstreams[].api = "responses"`, the
//! default for OpenAI) get the request as the client sent it ([`native`]), with the
//! conversation of a `previous_response_id` the gateway holds in its `input`.

mod native;
mod request;
mod response;
mod store;
mod stream;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use self::request::Parsed;
use self::response::Base;
use self::store::Record;
use self::stream::Translator;
use crate::auth::scope_credential;
use crate::body::{Body, FrameSender};
use crate::chat::{self, ChatContext};
use crate::config::UpstreamApi;
use crate::error::GatewayError;
use crate::handlers::passthrough;
use crate::headers;
use crate::http_util::{json_response, read_body, require_json};
use crate::openai::events::EventSplitter;
use crate::openai::request::{body_model, check_nesting, BodyModel};
use crate::openai::sse;
use crate::AppState;

/// `POST /v1/responses`.
pub(crate) async fn create(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = request.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(body).await?;
    check_nesting(&bytes, app.config.server.max_json_depth.get())?;
    let model = match body_model(&bytes)? {
        BodyModel::Object(model) => model,
        BodyModel::NotAnObject => None,
    };
    let route = app.upstreams.router.route(model.as_deref());
    let scope = scope_credential(&parts.headers, &parts.extensions);
    if !route.is_empty() && route.iter().all(|u| u.api == UpstreamApi::Responses) {
        return native::create(app, parts, bytes, scope).await;
    }
    let parsed = request::parse(&bytes)?;
    let previous = match &parsed.previous_response_id {
        Some(id) => Some(
            store::load(&app.sessions, &scope, id)
                .await?
                .ok_or_else(|| GatewayError::ResponseNotFound { id: id.clone() })?,
        ),
        None => None,
    };
    let id = new_id("resp");
    let earlier = previous.as_ref().map(|p| p.items.clone()).unwrap_or_default();
    let mut messages = Vec::new();
    messages.extend(parsed.instructions.clone());
    messages.extend(request::messages_of(&earlier)?);
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
    let session = match ctx.session_id.clone() {
        Some(named) => Some(named),
        None if parsed.store => {
            Some(previous.as_ref().and_then(|p| p.session.clone()).unwrap_or_else(|| id.clone()))
        }
        None => None,
    };
    ctx.session_id = session.clone();
    let base = Base {
        id: id.clone(),
        created_at: now_secs(),
        model: parsed.model.clone(),
        echo: parsed.echo.clone(),
    };
    let turn = Turn { app: app.clone(), scope, parsed, earlier, session, base };

    let mut answer = chat::answer(app.clone(), ctx).await?;
    if !answer.status().is_success() {
        // The upstream's error, in OpenAI's shape already; the response did not happen.
        return Ok(answer);
    }
    answer.headers_mut().remove(header::CONTENT_LENGTH);
    if turn.parsed.stream {
        let (frames, client_body) = crate::body::ChannelBody::channel(32);
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
    Ok(response)
}

/// A JSON answer, up to `limit` bytes.
async fn collect(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(GatewayError::Internal)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(GatewayError::UpstreamTooLarge {
                    upstream: "upstream".into(),
                    what: "an answer",
                    limit,
                });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// One Responses request on its way through the pipeline: what it needs once the answer is in.
struct Turn {
    app: Arc<AppState>,
    scope: Vec<u8>,
    parsed: Parsed,
    /// The conversation before this request, as Responses items.
    earlier: Vec<Value>,
    session: Option<String>,
    base: Base,
}

impl Turn {
    /// Stores the response (with `store`), with the conversation through its answer.
    async fn save(&self, object: &Value, output: &[Value]) -> Result<(), GatewayError> {
        if !self.parsed.store {
            return Ok(());
        }
        let mut items = self.earlier.clone();
        items.extend(self.parsed.items.iter().cloned());
        items.extend(output.iter().cloned());
        let record = Record {
            response: object.clone(),
            input_items: self.parsed.input_items.clone(),
            items,
            session: self.session.clone(),
            ..Record::default()
        };
        store::save(&self.app.sessions, &self.scope, &self.base.id, record).await
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

/// Sends `events` while the client is there; a client gone is forgotten, not an error.
async fn send(client: &mut Option<FrameSender>, events: Vec<Bytes>) {
    let Some(sender) = client else { return };
    for event in events {
        if sender.send(Ok(Frame::data(event))).await.is_err() {
            *client = None;
            return;
        }
    }
}

/// `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `DELETE /v1/responses/{id}`.
/// An id the gateway does not hold goes to an upstream that has the Responses API, if the
/// default route has one; else it is not found.
pub(crate) async fn api(app: Arc<AppState>, request: Request<Body>) -> Result<Response<Body>, GatewayError> {
    let path = request.uri().path().to_string();
    let rest = path.trim_start_matches("/v1/responses/");
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (rest, None),
    };
    let method = request.method().clone();
    let known =
        matches!((&method, sub), (&Method::GET, None | Some("input_items")) | (&Method::DELETE, None));
    if !known || !crate::session::valid_id(id) {
        return passthrough_or(app, request, GatewayError::NotFound { method: method.to_string(), path })
            .await;
    }
    let scope = scope_credential(request.headers(), request.extensions());
    let sessions = &app.sessions;
    let record = store::load(sessions, &scope, id).await?;
    let Some(record) = record else {
        return passthrough_or(app.clone(), request, GatewayError::ResponseNotFound { id: id.to_string() })
            .await;
    };
    match (&method, sub) {
        (&Method::GET, None) => Ok(json_response(&record.response)),
        (&Method::GET, _) => Ok(json_response(&input_items(record.input_items, request.uri().query()))),
        _ => {
            store::delete(sessions, &scope, id).await?;
            Ok(json_response(&json!({"id": id, "object": "response.deleted", "deleted": true})))
        }
    }
}

/// The request passed to the Responses upstream of the default route, or `error`.
async fn passthrough_or(
    app: Arc<AppState>,
    request: Request<Body>,
    error: GatewayError,
) -> Result<Response<Body>, GatewayError> {
    let route = app.upstreams.router.route(None);
    if route.iter().any(|u| u.api == UpstreamApi::Responses) {
        return passthrough::passthrough(app, request).await;
    }
    Err(error)
}

/// A page of input items, as OpenAI lists them: newest first unless `order=asc`, `limit`
/// (default 20, at most 100) after the item `after`.
fn input_items(mut items: Vec<Value>, query: Option<&str>) -> Value {
    let param = |name: &str| {
        query?
            .split('&')
            .find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    };
    if param("order").as_deref() != Some("asc") {
        items.reverse();
    }
    if let Some(after) = param("after") {
        if let Some(at) = items.iter().position(|item| item["id"].as_str() == Some(after.as_str())) {
            items.drain(..=at);
        }
    }
    let limit = param("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20).clamp(1, 100);
    let has_more = items.len() > limit;
    items.truncate(limit);
    json!({
        "object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
        "data": items,
    })
}

/// A fresh id with OpenAI's prefix (`resp`, `msg`, `fc`, ...).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", fastrand::u128(..))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_are_listed_newest_first_unless_asked() {
        let items: Vec<Value> = (0..3).map(|i| json!({"id": format!("m{i}")})).collect();
        let page = input_items(items.clone(), None);
        assert_eq!(page["data"][0]["id"], "m2");
        assert_eq!(page["first_id"], "m2");
        assert_eq!(page["has_more"], false);
        let page = input_items(items, Some("order=asc&limit=1&after=m0"));
        assert_eq!(page["data"], json!([{"id": "m1"}]));
        assert_eq!(page["has_more"], true);
    }
}
