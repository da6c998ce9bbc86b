//! The routes ctxgate does not interpret: `GET /v1/models` (from the default upstream, or from
//! config when it has none) and every other `/v1/*` route, passed through with method, path,
//! query, headers and body.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;

use crate::auth::Caller;
use crate::body::Body;
use crate::error::GatewayError;
use crate::http_util::{is_json, json_response, path_and_query, read_body};
use crate::openai::request::peek_model;
use crate::upstream::{Outgoing, OutgoingBody};
use crate::AppState;

/// Pass-through bodies up to this size are buffered so they can be retried; larger or
/// unsized ones (file uploads) stream to the upstream in one attempt.
const REPLAY_BUFFER_LIMIT: u64 = 1024 * 1024;

/// `GET /v1/models` from the default upstream; when it has no such endpoint (or cannot be
/// reached) and models are listed in config, the list is served from config instead.
pub(crate) async fn models(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, _body) = request.into_parts();
    let configured = app.configured_models();
    let outgoing = Outgoing {
        method: Method::GET,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body: OutgoingBody::Replayable(Bytes::new()),
        affinity: None,
    };
    let route = app.upstreams.router.route(None);
    let result = app.upstreams.forward(route, outgoing).await;
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
pub(crate) async fn passthrough(
    app: Arc<AppState>,
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
        app.auth.check_model(parts.extensions.get::<Caller>(), model)?;
    }
    let route = app.upstreams.router.route(model.as_deref());
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body,
        affinity: None,
    };
    let forwarded = app.upstreams.forward(route, outgoing).await?;
    Ok(forwarded.into_response())
}

fn model_list(models: &[String]) -> Response<Body> {
    let data: Vec<_> = models
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "ctxgate"}))
        .collect();
    json_response(&serde_json::json!({"object": "list", "data": data}))
}
