//! Maps `(method, path)` to a handler. Global concerns (limits, metrics, errors) belong to
//! [`crate::stack`], never here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Method, Request, Response};

use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::{conversation, proxy, AppState};

/// The route a request belongs to, as a low-cardinality metric label.
pub fn route_label(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (_, "/v1/chat/completions") => "chat_completions",
        (_, "/v1/models") => "models",
        (_, p) if p.starts_with("/v1/sessions/") => "sessions",
        (_, p) if p.starts_with("/v1/") => "passthrough",
        (_, "/healthz") => "healthz",
        (_, "/readyz") => "readyz",
        (_, "/metrics") => "metrics",
        _ => "unknown",
    }
}

#[derive(Clone, Debug)]
pub struct Router {
    state: Arc<AppState>,
}

impl Router {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

impl tower::Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let state = self.state.clone();
        let method = request.method().clone();
        let path = request.uri().path();
        let not_allowed = || {
            let err = GatewayError::MethodNotAllowed { method: method.to_string(), path: path.to_string() };
            Box::pin(std::future::ready(Err(err))) as Self::Future
        };
        match path {
            "/v1/chat/completions" if method == Method::POST => {
                Box::pin(proxy::chat_completions(state, request))
            }
            "/v1/chat/completions" => not_allowed(),
            "/v1/models" if method == Method::GET => Box::pin(proxy::models(state, request)),
            p if p.starts_with("/v1/sessions/") => Box::pin(conversation::api(state, request)),
            p if p.starts_with("/v1/") => Box::pin(proxy::passthrough(state, request)),
            "/healthz" | "/readyz" | "/metrics" if method != Method::GET => not_allowed(),
            "/healthz" => ready(text("ok\n", "text/plain")),
            "/readyz" => Box::pin(async move {
                // Ready when the session store answers: a replica that cannot reach Redis
                // should leave the load balancer rather than fail requests.
                match state.sessions.store.ping().await {
                    Ok(()) => Ok(text("ready\n", "text/plain")),
                    Err(err) => Err(GatewayError::SessionStore(err)),
                }
            }),
            "/metrics" => ready(text(state.metrics.encode(), "text/plain; version=0.0.4; charset=utf-8")),
            _ => {
                let err = GatewayError::NotFound { method: method.to_string(), path: path.to_string() };
                Box::pin(std::future::ready(Err(err)))
            }
        }
    }
}

fn ready(
    response: Response<Body>,
) -> Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>> {
    Box::pin(std::future::ready(Ok(response)))
}

fn text(content: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(content));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
