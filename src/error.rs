//! `GatewayError`: every failure ctxgate itself produces while serving a request, and its one
//! mapping to an HTTP status, an OpenAI error `type`, a `code` and a metric label.
//!
//! Errors the upstream returns are not `GatewayError`s: their responses pass through unchanged.
//! Rendering to the OpenAI JSON shape happens once, in [`crate::stack`]'s error layer.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// A boxed error, as tower's layers produce.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// The upstream did not answer within its first-byte timeout, or the request overran the
    /// gateway's request timeout.
    #[error("Upstream {upstream} did not respond within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { upstream: String, after: Duration },
    /// Another request on the same session held it for longer than `sessions.busy_timeout`.
    #[error("Session {id} is busy with another request; retry when it completes")]
    SessionBusy { id: String },
    /// The request changes the system prompt of a session whose goal is locked.
    #[error("Session {id} has a locked goal; its system prompt cannot change (unlock with DELETE /v1/sessions/{id}/goal)")]
    GoalLocked { id: String },
    /// No such session for this caller (sessions of other callers are invisible).
    #[error("No session {id}")]
    SessionNotFound { id: String },
    /// The session store is unreachable and `sessions.on_store_error` is `fail_closed`.
    #[error("The session store is unavailable")]
    SessionStore(#[source] crate::session::StoreError),
    /// The request overran the gateway's own `server.request_timeout`.
    #[error("The request did not complete within the gateway's request timeout")]
    RequestTimeout,
    #[error("Internal error")]
    Internal(#[source] BoxError),
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>, code: &'static str) -> Self {
        Self::InvalidRequest { message: message.into(), param, code }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } | Self::SessionNotFound { .. } => StatusCode::NOT_FOUND,
            Self::SessionBusy { .. } | Self::GoalLocked { .. } => StatusCode::CONFLICT,
            Self::SessionStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } | Self::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
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
            | Self::UnsupportedMediaType { .. }
            | Self::SessionBusy { .. }
            | Self::GoalLocked { .. }
            | Self::SessionNotFound { .. } => "invalid_request_error",
            Self::Overloaded
            | Self::SessionStore(_)
            | Self::UpstreamUnreachable { .. }
            | Self::UpstreamTimeout { .. }
            | Self::RequestTimeout
            | Self::Internal(_) => "server_error",
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidRequest { code, .. } => code,
            Self::NotFound { .. } => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::Overloaded => "overloaded",
            Self::SessionBusy { .. } => "session_busy",
            Self::GoalLocked { .. } => "goal_locked",
            Self::SessionNotFound { .. } => "session_not_found",
            Self::SessionStore(_) => "session_store_unavailable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::RequestTimeout => "request_timeout",
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

    pub fn into_response(self) -> Response<Body> {
        let bytes = Bytes::from(self.to_json().to_string());
        let mut response = Response::new(body::full(bytes));
        *response.status_mut() = self.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
    fn invalid_request_names_the_param() {
        let json = GatewayError::invalid("bad", Some("messages"), "invalid_type").to_json();
        assert_eq!(json["error"]["param"], "messages");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
}
