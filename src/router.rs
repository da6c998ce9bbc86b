//! Maps `(method, path)` to a handler through one route table ([`Route`]), which also names the
//! route in metrics. Global concerns (limits, metrics, errors) belong to [`crate::stack`],
//! never here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Method, Request, Response};

use crate::body::{self, Body};
use crate::config::WebSocketMode;
use crate::error::GatewayError;
use crate::handlers::{originals, passthrough, sessions};
use crate::{chat, responses, AppState};

/// The routes ctxgate serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    ChatCompletions,
    Responses,
    /// `POST /v1/responses/compact`.
    ResponsesCompact,
    /// A stored response: `/v1/responses/{id}` and below.
    Response,
    Models,
    Sessions,
    Originals,
    Passthrough,
    Healthz,
    Readyz,
    Metrics,
    Unknown,
}

impl Route {
    pub(crate) fn of(path: &str) -> Self {
        match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/responses" => Self::Responses,
            "/v1/responses/compact" => Self::ResponsesCompact,
            p if p.starts_with("/v1/responses/") => Self::Response,
            "/v1/models" => Self::Models,
            p if p.starts_with("/v1/sessions/") => Self::Sessions,
            p if p.starts_with("/v1/ctxgate/originals/") => Self::Originals,
            p if p.starts_with("/v1/") => Self::Passthrough,
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            "/metrics" => Self::Metrics,
            _ => Self::Unknown,
        }
    }

    /// Probes and metrics: served outside the data plane's limits (see [`crate::stack`]).
    pub(crate) fn is_operational(self) -> bool {
        matches!(self, Self::Healthz | Self::Readyz | Self::Metrics)
    }

    /// The route as a low-cardinality metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Responses => "responses",
            Self::ResponsesCompact => "responses_compact",
            Self::Response => "response",
            Self::Models => "models",
            Self::Sessions => "sessions",
            Self::Originals => "originals",
            Self::Passthrough => "passthrough",
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::Metrics => "metrics",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Router {
    state: Arc<AppState>,
}

impl Router {
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

impl tower::Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let state = self.state.clone();
        let method = request.method();
        let path = request.uri().path();
        let get = method == Method::GET;
        let upgrade = crate::tunnel::requested(&request);
        // The Responses API's WebSocket mode is answered by the gateway unless configured to
        // go to the upstream as it is.
        let terminated = upgrade.is_some_and(responses::websocket::is_websocket)
            && state.config.responses.websocket == WebSocketMode::Terminate;
        let upgrade = upgrade.is_some();
        match Route::of(path) {
            Route::ChatCompletions if method == Method::POST => Box::pin(chat::completions(state, request)),
            Route::Responses if method == Method::POST => Box::pin(responses::create(state, request)),
            Route::ResponsesCompact if method == Method::POST => Box::pin(responses::compact(state, request)),
            Route::Response => Box::pin(responses::api(state, request)),
            Route::Models if get => Box::pin(passthrough::models(state, request)),
            Route::Sessions => Box::pin(sessions::api(state, request)),
            Route::Originals if get => Box::pin(originals::original(state, request)),
            Route::Responses if terminated => Box::pin(responses::websocket::accept(state, request)),
            Route::Models | Route::Passthrough | Route::Responses if upgrade => {
                Box::pin(passthrough::upgrade(state, request))
            }
            Route::Models | Route::Passthrough => Box::pin(passthrough::passthrough(state, request)),
            Route::Healthz if get => ready(Ok(text("ok\n", "text/plain"))),
            Route::Readyz if get => Box::pin(async move {
                // Ready when the session store answers: a replica that cannot reach Redis
                // should leave the load balancer rather than fail requests.
                state.sessions.ping().await?;
                Ok(text("ready\n", "text/plain"))
            }),
            Route::Metrics if get => {
                ready(Ok(text(state.metrics.encode(), "text/plain; version=0.0.4; charset=utf-8")))
            }
            Route::ChatCompletions
            | Route::Responses
            | Route::ResponsesCompact
            | Route::Originals
            | Route::Healthz
            | Route::Readyz
            | Route::Metrics => ready(Err(GatewayError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
            })),
            Route::Unknown => {
                ready(Err(GatewayError::NotFound { method: method.to_string(), path: path.to_string() }))
            }
        }
    }
}

fn ready(result: Result<Response<Body>, GatewayError>) -> RouteFuture {
    Box::pin(std::future::ready(result))
}

fn text(content: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(content));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
