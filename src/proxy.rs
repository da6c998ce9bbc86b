//! The request handlers that talk to upstreams: chat completions (validated, then forwarded
//! byte for byte), the model list, and every other `/v1/*` route passed through.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;

use serde_json::value::RawValue;

use crate::auth::{self, Caller};
use crate::body::{self, Body};
use crate::compress;
use crate::conversation;
use crate::error::GatewayError;
use crate::limit::BodyTooLarge;
use crate::openai::request::peek_model;
use crate::openai::ChatRequestHead;
use crate::tools;
use crate::upstream::{Outgoing, OutgoingBody, UsageSink};
use crate::AppState;

/// Pass-through bodies up to this size are buffered so they can be retried; larger or
/// unsized ones (file uploads) stream to the upstream in one attempt.
const REPLAY_BUFFER_LIMIT: u64 = 1024 * 1024;

pub async fn chat_completions(
    state: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = request.into_parts();
    require_json(&parts.headers)?;
    let mut bytes = read_body(body).await?;
    if let Some(injected) = state.tools.inject(&bytes)? {
        bytes = injected;
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let caller = parts.extensions.get::<Caller>().cloned();
    if let Some(id) = conversation::session_id(&state.sessions, &parts.headers)? {
        let (head, messages) = ChatRequestHead::parse_with_messages(&bytes)?;
        let counter = state.compressor.counter_for(&head.model);
        let prompt_tokens = || auth::count_parsed(counter, &messages.items, &bytes);
        let charge = state.auth.charge(caller.as_ref(), &head.model, prompt_tokens).await?;
        let turn = conversation::Turn {
            key: conversation::session_key(&parts.headers, &parts.extensions, &id),
            charge: charge.map(Arc::new),
            messages: messages.items.iter().map(|m| (*m).to_owned()).collect(),
            messages_span: messages.span,
            model: head.model,
            stream: head.stream,
            parts,
            body: bytes,
        };
        return conversation::chat(state, turn).await;
    }
    let head = ChatRequestHead::parse(&bytes)?;
    let counter = state.compressor.counter_for(&head.model);
    let prompt_tokens = || auth::count_prompt_tokens(counter, &bytes);
    let charge = state.auth.charge(caller.as_ref(), &head.model, prompt_tokens).await?;
    let route = state.upstreams.router.route(Some(&head.model));
    let (bytes, plan) = match state.compressor.active(&head.model, &parts.headers) {
        Some(active) => {
            compress_stateless(&state, &active, &parts.headers, &parts.extensions, bytes, route).await?
        }
        None => (bytes, None),
    };
    if plan.is_some() {
        // The body was rebuilt: its length is the new one's.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    parts.headers.remove(compress::OPT_OUT_HEADER);
    let usage_sink = UsageSink {
        model: state
            .compressor
            .active(&head.model, &HeaderMap::new())
            .map(|active| state.metrics.for_model(&active.label)),
        charge: charge.map(Arc::new),
    };
    let mut response = if state.tools.engaged_by(&bytes) {
        let request = tools::rounds::Request {
            route,
            affinity: crate::upstream::AffinityKey::for_stateless(route, &bytes),
            path: path_and_query(&parts.uri),
            headers: parts.headers,
            body: bytes,
            stream: head.stream,
            session: false,
            usage_sink,
            tasks: None,
        };
        let (mut response, mut report) = tools::rounds::forward(&state, request).await?;
        if let Ok(report) = report.try_recv() {
            tools::rounds::annotate(response.headers_mut(), &report);
        }
        response
    } else {
        let outgoing = Outgoing {
            method: parts.method,
            path_and_query: path_and_query(&parts.uri),
            headers: parts.headers,
            affinity: crate::upstream::AffinityKey::for_stateless(route, &bytes),
            body: OutgoingBody::Replayable(bytes),
        };
        let mut forwarded = state.upstreams.forward(route, outgoing).await?;
        forwarded.usage_sink = usage_sink;
        forwarded.into_response()
    };
    if let Some(plan) = plan {
        compress::annotate(response.headers_mut(), &plan);
    }
    Ok(response)
}

/// Compression without a session: the conversation's state is stored under a key derived from
/// the caller and its first messages, so a client that resends the same history gets the same
/// bytes upstream.
async fn compress_stateless(
    state: &Arc<AppState>,
    active: &compress::Active<'_>,
    headers: &HeaderMap,
    extensions: &http::Extensions,
    bytes: Bytes,
    route: &[Arc<crate::upstream::Upstream>],
) -> Result<(Bytes, Option<compress::Plan>), GatewayError> {
    let (head, messages) = ChatRequestHead::parse_with_messages(&bytes)?;
    let messages: Vec<Box<RawValue>> = messages.items.iter().map(|m| (*m).to_owned()).collect();
    let tools = compress::request::tools_of(&bytes);
    let analysed = compress::analyse(active.counter, &messages);
    let total = compress::fixed_tokens(active.counter, tools.as_deref(), None)
        + analysed.tokens.iter().map(|&t| u64::from(t)).sum::<u64>();
    // Under the first mark nothing was ever compacted: no state to look up.
    let first_mark = active.policy.pre_tokens().min(active.policy.high_tokens());
    let scope = conversation::session_key(headers, extensions, "").scope;
    let key = compress::conversation_key(&scope, &messages, &analysed.infos);
    let (previous, ready) = if total > first_mark {
        let ready = compress::ready_summary(state, active, &key, &messages).await;
        (compress::load_state(state, &key).await, ready)
    } else {
        (None, None)
    };
    let plan = compress::run(
        &state.compressor,
        active,
        &messages,
        &analysed,
        None,
        tools.as_deref(),
        previous,
        ready.as_ref(),
    );
    let cache_key = route.first().filter(|u| u.prompt_cache_key).map(|_| compress::cache_key(&key));
    let body = compress::request::rebuild(&bytes, &plan.messages, cache_key.as_deref())?;
    compress::record(&state.metrics, &active.label, &plan);
    if plan.epoch.is_some() || plan.reset {
        if let Some(new_state) = &plan.state {
            if let Err(err) = compress::save_state(state, &key, new_state).await {
                // The request still goes out; the next one recomputes the epoch.
                tracing::warn!(error = %err, "cannot store compression state");
            }
        }
    }
    if let Some(request) = plan.summarize.clone() {
        let call = compress::summary_call(&state.compressor.config, &head.model, headers, tools.as_deref());
        compress::start_summary(state, &key, request, call, messages.len(), plan.tokens_after);
    }
    Ok((body, Some(plan)))
}

/// `GET /v1/models` from the default upstream; when it has no such endpoint (or cannot be
/// reached) and models are listed in config, the list is served from config instead.
pub async fn models(state: Arc<AppState>, request: Request<Body>) -> Result<Response<Body>, GatewayError> {
    let (parts, _body) = request.into_parts();
    let configured = state.configured_models();
    let outgoing = Outgoing {
        method: Method::GET,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body: OutgoingBody::Replayable(Bytes::new()),
        affinity: None,
    };
    let route = state.upstreams.router.route(None);
    let result = state.upstreams.forward(route, outgoing).await;
    let upstream_has_none = match &result {
        Ok(forwarded) => matches!(
            forwarded.response.status(),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ),
        Err(GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamTimeout { .. }) => true,
        Err(_) => false,
    };
    if upstream_has_none && !configured.is_empty() {
        return Ok(model_list(&configured));
    }
    Ok(result?.into_response())
}

/// Any other `/v1/*` route: method, path, query, headers and body go upstream as sent.
pub async fn passthrough(
    state: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();
    let small = body.size_hint().exact().is_some_and(|n| n <= REPLAY_BUFFER_LIMIT);
    let (body, model) = if small {
        let bytes = read_body(body).await?;
        let model = is_json(&parts.headers).then(|| peek_model(&bytes)).flatten();
        (OutgoingBody::Replayable(bytes), model)
    } else {
        (OutgoingBody::Stream(body), None)
    };
    if let Some(model) = &model {
        state.auth.check_model(parts.extensions.get::<Caller>(), model)?;
    }
    let route = state.upstreams.router.route(model.as_deref());
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body,
        affinity: None,
    };
    let forwarded = state.upstreams.forward(route, outgoing).await?;
    Ok(forwarded.into_response())
}

fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json") || mime.to_ascii_lowercase().ends_with("+json")
        })
}

/// A JSON endpoint takes `application/json`; a request without a `Content-Type` is read as JSON
/// too, as OpenAI's API does.
fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(_) if is_json(headers) => Ok(()),
        Some(value) => Err(GatewayError::UnsupportedMediaType {
            content_type: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        }),
    }
}

async fn read_body(body: Body) -> Result<Bytes, GatewayError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => match err.downcast::<BodyTooLarge>() {
            Ok(too_large) => Err(GatewayError::PayloadTooLarge { limit: too_large.0 }),
            Err(err) => Err(GatewayError::invalid(
                format!("Could not read the request body: {err}"),
                None,
                "invalid_body",
            )),
        },
    }
}

fn model_list(models: &[String]) -> Response<Body> {
    let data: Vec<_> = models
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "ctxgate"}))
        .collect();
    let json = serde_json::json!({"object": "list", "data": data});
    let mut response = Response::new(body::full(json.to_string()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        h
    }

    #[test]
    fn json_content_types() {
        assert!(require_json(&HeaderMap::new()).is_ok());
        assert!(require_json(&headers("application/json; charset=utf-8")).is_ok());
        assert!(require_json(&headers("Application/JSON")).is_ok());
        assert!(require_json(&headers("application/vnd.api+json")).is_ok());
        let err = require_json(&headers("text/plain")).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
