//! The routes ctxgate does not interpret: `GET /v1/models` (from the default upstream, or from
//! config when it has none) and every other `/v1/*` route, passed through with method, path,
//! query, headers and body.
//!
//! An HTTP/1.1 upgrade (a WebSocket, such as `/v1/realtime`) on these routes is tunnelled:
//! [`upgrade`] forwards the handshake and hands the 101 back with a [`Tunnel`] that copies
//! bytes both ways without reading them.
//!
//! A passed-through body is read whole (up to `server.max_body_bytes`) whatever its framing or
//! content type, so the model it names is always the one checked against the caller's key and
//! charged to its tokens per minute: a chunked, untyped or large body is no way around them.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use crate::auth::Caller;
use crate::body::Body;
use crate::error::GatewayError;
use crate::http_util::{form_fields, is_form, json_response, path_and_query, read_body};
use crate::openai::request::{body_model, BodyModel};
use crate::tunnel::{self, Tunnel};
use crate::upstream::{Outgoing, OutgoingBody, UpstreamWait, UsageSink, ENDPOINT_HEADER};
use crate::AppState;

/// The routes whose body names a model (as a JSON object), so a body that is not one cannot
/// be checked and is refused. Any other route's body is checked when it is a JSON object.
const MODEL_ROUTES: [&str; 6] = [
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/audio/speech",
];

/// The routes whose `multipart/form-data` body names a model in a `model` field.
const FORM_MODEL_ROUTES: [&str; 4] =
    ["/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits", "/v1/images/variations"];

/// The `model` field of a form: one at most, readable, UTF-8.
fn form_model(headers: &http::HeaderMap, body: &[u8]) -> Result<Option<String>, GatewayError> {
    let unreadable =
        || GatewayError::invalid("The multipart/form-data body could not be read.", None, "invalid_form");
    match form_fields(headers, body, "model").ok_or_else(unreadable)?.as_slice() {
        [] => Ok(None),
        [model] => {
            let model = std::str::from_utf8(model).map_err(|_| unreadable())?.trim();
            Ok((!model.is_empty()).then(|| model.to_string()))
        }
        _ => Err(GatewayError::invalid(
            "The request body repeats the form field 'model'; each field may appear once.",
            None,
            "duplicate_key",
        )),
    }
}

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
    let bytes = read_body(body).await?;
    let on_model_route = MODEL_ROUTES.contains(&parts.uri.path());
    let mut from_form = false;
    let model = match body_model(&bytes)? {
        BodyModel::Object(model) => model,
        BodyModel::NotAnObject if bytes.is_empty() => None,
        BodyModel::NotAnObject if is_form(&parts.headers) => {
            from_form = true;
            form_model(&parts.headers, &bytes)?
        }
        BodyModel::NotAnObject if on_model_route => {
            return Err(GatewayError::invalid(
                format!("The body of {} must be a JSON object naming a model.", parts.uri.path()),
                None,
                "invalid_json",
            ));
        }
        BodyModel::NotAnObject => None,
    };
    let caller = parts.extensions.get::<Caller>();
    let names_a_model = on_model_route || FORM_MODEL_ROUTES.contains(&parts.uri.path());
    if model.is_none() && names_a_model && caller.is_some_and(|c| c.key.restricts_models()) {
        // An upstream may fall back to a default model: with an allowlist, say which.
        return Err(GatewayError::invalid(
            "Missing required parameter: 'model'.",
            Some("model"),
            "missing_required_parameter",
        ));
    }
    let charge = match &model {
        // A form's other fields are files (audio, images): not text to estimate tokens from.
        Some(model) if from_form => {
            app.auth.check_model(caller, model)?;
            None
        }
        Some(model) => {
            let counter = app.compressor.counter_for(model);
            // The body's text is the estimate (JSON syntax included: over, never under); the
            // upstream's `usage`, when it reports one, corrects it.
            app.auth
                .charge(caller, model, || u64::from(counter.text(&String::from_utf8_lossy(&bytes))))
                .await?
        }
        None => None,
    };
    let route = app.upstreams.router.route(model.as_deref());
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body: OutgoingBody::Replayable(bytes),
        affinity: None,
    };
    let mut forwarded = app.upstreams.forward(route, outgoing).await?;
    if let Some(charge) = charge {
        forwarded.usage_sink = UsageSink::default().with(Arc::new(charge));
    }
    Ok(forwarded.into_response())
}

/// An HTTP/1.1 upgrade on a passthrough route, routed by its `model` query parameter (the
/// one place such a request names its model): the handshake goes to the route's upstream with
/// its `Upgrade`, `Connection` and `Sec-WebSocket-*` headers; a 101 comes back with the tunnel
/// for [`crate::server`] to run, any other answer as a normal response.
///
/// What flows through a tunnel is not read, so a key's limits that need the content cannot be
/// kept there: a key with a model allowlist must name an allowed model in the query, and a key
/// with a token limit may not open tunnels at all.
pub(crate) async fn upgrade(
    app: Arc<AppState>,
    mut request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let Some(protocol) = tunnel::requested(&request).cloned() else {
        return passthrough(app, request).await;
    };
    let client_side = hyper::upgrade::on(&mut request);
    let (parts, _body) = request.into_parts();
    let model = query_model(&parts.uri)?;
    if let Some(caller) = parts.extensions.get::<Caller>() {
        if caller.key.limits.tokens_per_minute.is_some() {
            return Err(GatewayError::invalid(
                "This key has a token limit, which cannot be counted through a WebSocket tunnel; use a key without one.",
                None,
                "upgrade_not_allowed",
            ));
        }
        match &model {
            Some(model) => app.auth.check_model(Some(caller), model)?,
            None if caller.key.restricts_models() => {
                return Err(GatewayError::invalid(
                    "Missing required query parameter: 'model'.",
                    Some("model"),
                    "missing_required_parameter",
                ))
            }
            None => {}
        }
    }
    let route = app.upstreams.router.route(model.as_deref());
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body: OutgoingBody::Replayable(Bytes::new()),
        affinity: None,
    };
    let mut forwarded = app.upstreams.forward_upgrade(route, outgoing, protocol).await?;
    if forwarded.response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(forwarded.into_response());
    }
    let response = &mut forwarded.response;
    let Some(chosen) = response.headers().get(http::header::UPGRADE).cloned() else {
        return Err(GatewayError::UpstreamStatus {
            upstream: forwarded.upstream.name.clone(),
            status: StatusCode::SWITCHING_PROTOCOLS,
        });
    };
    let upstream_side = hyper::upgrade::on(&mut *response);
    let mut headers = http::HeaderMap::new();
    crate::upstream::copy_end_to_end(response.headers(), &mut headers);
    if let Some(endpoint) = forwarded.endpoint_header() {
        headers.insert(ENDPOINT_HEADER, endpoint);
    }
    // The endpoint's lease is held while the tunnel is open: it is in flight there.
    let hold = Box::new(forwarded.endpoint.take());
    let mut response = tunnel::switching(headers, chosen, Tunnel::new(client_side, upstream_side, hold));
    response.extensions_mut().insert(UpstreamWait(forwarded.upstream_wait));
    Ok(response)
}

/// The `model` query parameter; at most one and sent unencoded (model names need no escapes),
/// so the model checked is the one the upstream reads.
fn query_model(uri: &http::Uri) -> Result<Option<String>, GatewayError> {
    let mut models = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('=').filter(|(name, _)| *name == "model"))
        .map(|(_, value)| value);
    match (models.next(), models.next()) {
        (None, _) => Ok(None),
        (Some(model), None) if model.contains(['%', '+']) => Err(GatewayError::invalid(
            "The query parameter 'model' must be sent unencoded.",
            Some("model"),
            "invalid_value",
        )),
        (Some(model), None) => Ok((!model.is_empty()).then(|| model.to_string())),
        (Some(_), Some(_)) => Err(GatewayError::invalid(
            "The query repeats the parameter 'model'; it may appear once.",
            Some("model"),
            "duplicate_key",
        )),
    }
}

fn model_list(models: &[String]) -> Response<Body> {
    let data: Vec<_> = models
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "ctxgate"}))
        .collect();
    json_response(&serde_json::json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_of(uri: &str) -> Result<Option<String>, u16> {
        query_model(&uri.parse().unwrap()).map_err(|e| e.status().as_u16())
    }

    #[test]
    fn the_query_names_one_plain_model_at_most() {
        assert_eq!(model_of("/v1/realtime?model=gpt-realtime&x=1"), Ok(Some("gpt-realtime".into())));
        assert_eq!(model_of("/v1/realtime?xmodel=a"), Ok(None));
        assert_eq!(model_of("/v1/realtime"), Ok(None));
        // Two, or an escaped one, could be read otherwise upstream than here
        assert_eq!(model_of("/v1/realtime?model=a&model=b"), Err(400));
        assert_eq!(model_of("/v1/realtime?model=gpt-%41"), Err(400));
    }
}
