//! `POST /v1/responses` (OpenAI's Responses API) and the stored responses:
//! `GET /v1/responses/{id}` (with `stream=true`, its events: [`replay`]),
//! `GET /v1/responses/{id}/input_items`, `DELETE /v1/responses/{id}`,
//! `POST /v1/responses/{id}/cancel` ([`background`]).
//!
//! Over a Chat-Completions-only upstream ([`over_chat`]) this is the chat pipeline's second
//! front-end protocol, an adapter at its step 1 (see [`crate::chat`]): the request becomes a
//! chat request ([`request`]) with the conversation a `previous_response_id` names rebuilt in
//! front of it ([`store`]), and runs as any chat request does (compression, gateway tools,
//! retries and failover). Its answer, JSON or SSE, becomes a Response object ([`response`]) or
//! Responses events ([`stream`]).
//!
//! A chain of stored responses is a session: its first response's id names the session its
//! turns run on (unless the client names one with the session header, or with its own
//! conversation id: see [`crate::session::identify`]), so compression epochs,
//! the goal lock and the commit apply to it as to any session. Each stored response keeps the
//! conversation through its answer, so a chain continues from any of its responses (a fork is a
//! history rewrite of the session), across a restart (embedded store) and across replicas
//! (Redis).
//!
//! With `background` ([`background`]) the response runs detached from its request, is stored
//! as it starts and as it ends, and with `stream` its events are logged for replay.
//!
//! Upstreams that speak the Responses API themselves (`upstreams[].api = "responses"`, the
//! default for OpenAI) get the request as the client sent it ([`native`]), with the
//! conversation of a `previous_response_id` the gateway holds in its `input`.
//!
//! `POST /v1/responses/compact` is answered by ctxgate's own compaction ([`compact`]).
//!
//! The Responses API's WebSocket mode (`GET /v1/responses` upgraded) runs each
//! `response.create` as the `POST /v1/responses` it stands for ([`websocket`]).

mod background;
mod compact;
pub mod items;
mod native;
mod native_session;
mod over_chat;
mod replay;
mod request;
mod response;
mod store;
mod stream;
mod tool_rounds;
pub(crate) mod websocket;

pub(crate) use background::Running;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::auth::scope_credential;
use crate::body::{Body, FrameSender};
use crate::config::UpstreamApi;
use crate::error::GatewayError;
use crate::handlers::passthrough;
use crate::http_util::{json_response, read_body, require_json};
use crate::openai::request::{body_model, check_nesting, BodyModel};
use crate::AppState;

pub(crate) use self::compact::compact;

/// The part of this front end in a turn it began, resumed after a takeover (see
/// [`crate::chat::Resumer`]): a session turn to an upstream with the Responses API is
/// re-issued here; a background response's turn is re-issued by the chat pipeline and
/// finished here.
pub(crate) fn resumed(
    app: Arc<AppState>,
    session: crate::session::SessionKey,
    origin: String,
) -> crate::chat::BoxFuture<Option<crate::chat::FrontEndPart>> {
    if origin == native_session::ORIGIN {
        return Box::pin(async { Some(crate::chat::FrontEndPart::Reissue(native::reissue)) });
    }
    background::resumed(app, session, origin)
}

/// `POST /v1/responses`: to [`native`] when the model's route has only upstreams with the
/// Responses API, else [`over_chat`].
pub(crate) async fn create(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();
    let (bytes, model) = read_request(&app, &parts, body).await?;
    let scope = store::scope_of(&scope_credential(&parts.headers, &parts.extensions));
    if speaks_responses(&app, model.as_deref()) {
        return native::create(app, parts, bytes, scope).await;
    }
    over_chat::create(app, parts, bytes, scope).await
}

/// A Responses request's body, read whole and checked as JSON, and the model it names.
async fn read_request(
    app: &AppState,
    parts: &http::request::Parts,
    body: Body,
) -> Result<(Bytes, Option<String>), GatewayError> {
    require_json(&parts.headers)?;
    let bytes = read_body(body).await?;
    check_nesting(&bytes, app.config.server.max_json_depth.get())?;
    let model = match body_model(&bytes)? {
        BodyModel::Object(model) => model,
        BodyModel::NotAnObject => None,
    };
    Ok((bytes, model))
}

/// Whether `model`'s route has only upstreams with the Responses API: they get Responses
/// requests, the rest go through the chat pipeline.
fn speaks_responses(app: &AppState, model: Option<&str>) -> bool {
    let route = app.upstreams.router.route(model);
    !route.is_empty() && route.iter().all(|u| u.api == UpstreamApi::Responses)
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

/// `GET /v1/responses/{id}` (`?stream=true`: its events), `GET /v1/responses/{id}/input_items`,
/// `DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`. An id the gateway does not
/// hold goes to an upstream that has the Responses API, if the default route has one; else it
/// is not found.
pub(crate) async fn api(app: Arc<AppState>, request: Request<Body>) -> Result<Response<Body>, GatewayError> {
    let path = request.uri().path().to_string();
    let rest = path.trim_start_matches("/v1/responses/");
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (rest, None),
    };
    let method = request.method().clone();
    let known = matches!(
        (&method, sub),
        (&Method::GET, None | Some("input_items"))
            | (&Method::DELETE, None)
            | (&Method::POST, Some("cancel"))
    );
    if !known || !crate::session::valid_id(id) {
        return passthrough_or(app, request, GatewayError::NotFound { method: method.to_string(), path })
            .await;
    }
    let scope = store::scope_of(&scope_credential(request.headers(), request.extensions()));
    let sessions = &app.sessions;
    let record = store::load(sessions, &scope, id).await?;
    let Some(record) = record else {
        return passthrough_or(app.clone(), request, GatewayError::ResponseNotFound { id: id.to_string() })
            .await;
    };
    let headers = request.headers();
    match (&method, sub) {
        (&Method::GET, None) => match replay::stream_query(request.uri().query())? {
            Some(starting_after) => {
                replay::stream(app.clone(), scope, id.to_string(), &record, starting_after, headers.clone())
            }
            // A running response whose process died is taken over (or stored failed) first.
            None => Ok(json_response(&background::settle(&app, &scope, id, record, headers).await?.response)),
        },
        (&Method::POST, Some(_)) => Ok(json_response(&background::cancel(&app, &scope, id, headers).await?)),
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
