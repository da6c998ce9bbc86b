//! `GatewayError`: every failure ctxgate itself produces while serving a request, and its one
//! mapping to an HTTP status, an OpenAI error `type`, a `code` and a metric label.
//!
//! Errors the upstream returns are not `GatewayError`s: their responses pass through unchanged.
//! Rendering to the OpenAI JSON shape happens once: before the response head in
//! [`crate::stack`]'s error layer ([`GatewayError::into_response`]), after it as one SSE event
//! ([`GatewayError::to_sse_event`]).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body, BoxError};

/// Failures grouped by who is at fault: the client (4xx), ctxgate's own limits (503), or the
/// upstream (502/504).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed; `param` names the offending field when there is one.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<&'static str>, code: &'static str },
    #[error("Invalid URL ({method} {path})")]
    NotFound { method: String, path: String },
    #[error("Method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("Request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Request line and headers are larger than the limit of {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// The client did not send its whole body within `server.body_read_timeout`.
    #[error("The request body did not arrive within {}", humantime::format_duration(*.after))]
    RequestBodyTimeout { after: Duration },
    #[error("Unsupported Content-Type {content_type:?}: this endpoint takes application/json")]
    UnsupportedMediaType { content_type: String },
    /// The concurrency limit is reached; the request was shed rather than queued.
    #[error("ctxgate is overloaded; retry shortly")]
    Overloaded,
    /// No upstream could be reached (connect error, reset before a response).
    #[error("Upstream {upstream} is unreachable")]
    UpstreamUnreachable {
        upstream: String,
        #[source]
        source: BoxError,
    },
    /// An upstream answered a later call of a turn (a tool-loop round) with an error status
    /// whose body is not an OpenAI error, after the client's stream had started.
    #[error("Upstream {upstream} answered {status}")]
    UpstreamStatus { upstream: String, status: StatusCode },
    /// An answer (or one SSE event of it) the gateway must hold is past its configured limit
    /// (`server.max_answer_bytes`, `server.max_sse_event_bytes`); it is not read further.
    #[error("Upstream {upstream} sent {what} larger than the gateway's limit of {limit} bytes")]
    UpstreamTooLarge { upstream: String, what: &'static str, limit: usize },
    /// The upstream did not answer within its first-byte timeout, or the request overran the
    /// gateway's request timeout.
    #[error("Upstream {upstream} did not respond within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { upstream: String, after: Duration },
    /// Another request on the same session held it for longer than `sessions.busy_timeout`.
    #[error("Session {id} is busy with another request; retry when it completes")]
    SessionBusy { id: String },
    /// The session moved on while the turn ran (deleted, or the turn taken over by another
    /// replica): the answer was not saved.
    #[error("Session {id} changed during this turn (deleted, or taken over by another replica); the turn was not saved")]
    SessionConflict { id: String },
    /// The request changes the system prompt of a session whose goal is locked.
    #[error("Session {id} has a locked goal; its system prompt cannot change (unlock with DELETE /v1/sessions/{id}/goal)")]
    GoalLocked { id: String },
    /// No such session for this caller (sessions of other callers are invisible).
    #[error("No session {id}")]
    SessionNotFound { id: String },
    /// No stored response with this id for this caller (another caller's are invisible).
    #[error("Response with id '{id}' not found.")]
    ResponseNotFound { id: String },
    /// The turn was cancelled while it ran (`POST /v1/responses/{id}/cancel`).
    #[error("The request was cancelled")]
    Cancelled,
    /// The session exists but has no locked goal.
    #[error("Session {id} has no locked goal")]
    GoalNotSet { id: String },
    /// A followed turn stopped without its answer and could not be taken over.
    #[error("The turn on session {id} did not complete: {reason}; POST /v1/sessions/{id}/resume or send the request again")]
    TurnIncomplete { id: String, reason: &'static str },
    /// No original with this id for this caller (a marker of another caller, or expired).
    #[error("No original {id} is kept for this caller")]
    OriginalNotFound { id: String },
    /// The session store is unreachable and `sessions.on_store_error` is `fail_closed`.
    #[error("The session store is unavailable")]
    SessionStore(#[source] BoxError),
    /// The request overran the gateway's own `server.request_timeout`.
    #[error("The request did not complete within the gateway's request timeout")]
    RequestTimeout,
    /// No gateway key, or one ctxgate does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A session was named by a request with no credential to scope it by (no gateway keys and
    /// no `Authorization`): every such caller would share the session's id.
    #[error("Sessions are kept per caller credential and this request has none: send an Authorization header of this caller's own, or turn gateway keys on")]
    SessionNeedsCredential,
    /// The caller's key may not call this model.
    #[error("This key may not use the model `{model}`")]
    ModelNotAllowed { model: String },
    /// One of the caller's limits is reached; `retry_after` is when it frees up.
    #[error("Rate limit reached for key {key}: {limit}. Retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited { key: String, limit: LimitKind, retry_after: Duration },
    /// Keys are held in Redis, and Redis cannot say whether this one exists.
    #[error("The key store is unavailable")]
    KeyStore(#[source] BoxError),
    #[error("Internal error")]
    Internal(#[source] BoxError),
}

/// Which per-key limit a request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Requests => "requests per minute",
            Self::Tokens => "tokens per minute",
            Self::Concurrency => "concurrent requests",
        })
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>, code: &'static str) -> Self {
        Self::InvalidRequest { message: message.into(), param, code }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. }
            | Self::SessionNotFound { .. }
            | Self::ResponseNotFound { .. }
            | Self::GoalNotSet { .. }
            | Self::OriginalNotFound { .. } => StatusCode::NOT_FOUND,
            Self::TurnIncomplete { .. } => StatusCode::BAD_GATEWAY,
            Self::SessionBusy { .. }
            | Self::SessionConflict { .. }
            | Self::GoalLocked { .. }
            | Self::Cancelled => StatusCode::CONFLICT,
            Self::SessionStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamStatus { .. }
            | Self::UpstreamTooLarge { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } | Self::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unauthorized(_) | Self::SessionNeedsCredential => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::KeyStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type`: clients' SDKs branch on it.
    pub fn openai_type(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::NotFound { .. }
            | Self::MethodNotAllowed { .. }
            | Self::PayloadTooLarge { .. }
            | Self::HeadTooLarge { .. }
            | Self::RequestBodyTimeout { .. }
            | Self::UnsupportedMediaType { .. }
            | Self::SessionBusy { .. }
            | Self::SessionConflict { .. }
            | Self::GoalLocked { .. }
            | Self::Cancelled
            | Self::SessionNotFound { .. }
            | Self::ResponseNotFound { .. }
            | Self::GoalNotSet { .. }
            | Self::OriginalNotFound { .. }
            | Self::Unauthorized(_)
            | Self::SessionNeedsCredential
            | Self::ModelNotAllowed { .. } => "invalid_request_error",
            // OpenAI names the exhausted resource in `type`.
            Self::RateLimited { limit: LimitKind::Tokens, .. } => "tokens",
            Self::RateLimited { .. } => "requests",
            Self::Overloaded
            | Self::SessionStore(_)
            | Self::UpstreamUnreachable { .. }
            | Self::UpstreamStatus { .. }
            | Self::UpstreamTooLarge { .. }
            | Self::UpstreamTimeout { .. }
            | Self::TurnIncomplete { .. }
            | Self::RequestTimeout
            | Self::KeyStore(_)
            | Self::Internal(_) => "server_error",
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidRequest { code, .. } => code,
            Self::NotFound { .. } => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::HeadTooLarge { .. } => "request_header_too_large",
            Self::RequestBodyTimeout { .. } => "request_body_timeout",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::Overloaded => "overloaded",
            Self::SessionBusy { .. } => "session_busy",
            Self::SessionConflict { .. } => "session_conflict",
            Self::GoalLocked { .. } => "goal_locked",
            Self::Cancelled => "cancelled",
            Self::SessionNotFound { .. } => "session_not_found",
            Self::ResponseNotFound { .. } => "response_not_found",
            Self::GoalNotSet { .. } => "goal_not_set",
            Self::TurnIncomplete { .. } => "turn_incomplete",
            Self::OriginalNotFound { .. } => "original_not_found",
            Self::SessionStore(_) => "session_store_unavailable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamStatus { .. } => "upstream_error",
            Self::UpstreamTooLarge { .. } => "upstream_response_too_large",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::RequestTimeout => "request_timeout",
            Self::Unauthorized(_) => "invalid_api_key",
            Self::SessionNeedsCredential => "session_requires_credential",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::KeyStore(_) => "key_store_unavailable",
            Self::Internal(_) => return None,
        })
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { param, .. } => *param,
            _ => None,
        }
    }

    /// A low-cardinality label for the `ctxgate_errors_total` metric: the error `code`, with
    /// the many invalid-request codes folded into one.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            other => other.code().unwrap_or("internal"),
        }
    }

    /// Maps the errors tower's own layers return (load shedding, timeouts, body limits) and our
    /// own, boxed on the way up, back to a `GatewayError`.
    pub fn from_boxed(err: BoxError) -> Self {
        let err = match err.downcast::<GatewayError>() {
            Ok(err) => return *err,
            Err(err) => err,
        };
        if err.is::<tower::load_shed::error::Overloaded>() {
            return Self::Overloaded;
        }
        if err.is::<tower::timeout::error::Elapsed>() {
            return Self::RequestTimeout;
        }
        Self::Internal(err)
    }

    /// The OpenAI error body: `{"error":{"message","type","param","code"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.openai_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    /// The error as one SSE event, for failures after a stream's first byte: the OpenAI error
    /// body as its `data`, which OpenAI's SDKs raise as an API error.
    pub fn to_sse_event(&self) -> Bytes {
        Bytes::from(format!("data: {}\n\n", self.to_json()))
    }

    pub fn into_response(self) -> Response<Body> {
        let bytes = Bytes::from(self.to_json().to_string());
        let mut response = Response::new(body::full(bytes));
        *response.status_mut() = self.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Self::RateLimited { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
        }
        // Recorded by the metrics layer; the body never carries the source chain.
        response.extensions_mut().insert(ErrorLabel(self.metric_label()));
        response
    }
}

/// Response extension naming the error a response was rendered from, for metrics and logs.
#[derive(Clone, Copy, Debug)]
pub struct ErrorLabel(pub &'static str);

// === impl ErrorResponse ===

/// Turns every error raised below it (ours, and tower's timeout and load-shed errors) into an
/// OpenAI-shaped response, so the service handed to hyper is infallible. Errors are logged here,
/// at the edge, by kind and status only.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorResponseLayer;

impl<S> tower::Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> ErrorResponse<S> {
        ErrorResponse { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ErrorResponse<S> {
    inner: S,
}

impl<S, Req> tower::Service<Req> for ErrorResponse<S>
where
    S: tower::Service<Req, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // Our inner services are always ready (limits reject in `call`, never by backpressure).
        match self.inner.poll_ready(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(_) => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            Ok(future.await.unwrap_or_else(|err| {
                let err = GatewayError::from_boxed(err.into());
                if err.status().is_server_error() {
                    tracing::warn!(kind = err.metric_label(), error = %err, source = ?std::error::Error::source(&err), "request failed");
                } else {
                    tracing::debug!(kind = err.metric_label(), error = %err, "request rejected");
                }
                err.into_response()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_renders_the_openai_shape() {
        let cases = [
            GatewayError::invalid(
                "Missing required parameter: 'model'.",
                Some("model"),
                "missing_required_parameter",
            ),
            GatewayError::PayloadTooLarge { limit: 10 },
            GatewayError::Overloaded,
            GatewayError::UpstreamTimeout { upstream: "a".into(), after: Duration::from_secs(3) },
        ];
        let statuses = [400, 413, 503, 504];
        for (err, status) in cases.into_iter().zip(statuses) {
            assert_eq!(err.status().as_u16(), status);
            let json = err.to_json();
            let obj = json["error"].as_object().unwrap();
            let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["code", "message", "param", "type"]);
        }
    }

    #[test]
    fn tower_errors_map_to_statuses() {
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(GatewayError::from_boxed(shed).status(), StatusCode::SERVICE_UNAVAILABLE);
        let ours: BoxError = Box::new(GatewayError::PayloadTooLarge { limit: 1 });
        assert_eq!(GatewayError::from_boxed(ours).status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn rate_limits_say_when_to_retry() {
        let err = GatewayError::RateLimited {
            key: "team-a".into(),
            limit: LimitKind::Tokens,
            retry_after: Duration::from_millis(1200),
        };
        assert_eq!(err.to_json()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(err.to_json()["error"]["type"], "tokens");
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let json = GatewayError::Unauthorized("Missing key").to_json();
        assert_eq!(json["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn invalid_request_names_the_param() {
        let json = GatewayError::invalid("bad", Some("messages"), "invalid_type").to_json();
        assert_eq!(json["error"]["param"], "messages");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
}
