//! THE one place the tower stack is assembled. Layers, outermost first:
//!
//! 1. **catch-panic**: a panicking handler becomes a 500 in the OpenAI shape, and the
//!    connection lives on.
//! 2. **sensitive headers**: `authorization` and API-key headers are marked so no later layer
//!    (trace included) can print them.
//! 3. **request id** (set, trace, propagate): `x-request-id` is taken from the client or
//!    generated, is in the trace span, goes upstream, and comes back on the response.
//! 4. **metrics**: above error rendering, so shed (503), timed-out (504) and rejected (4xx)
//!    requests are counted with the status the client saw.
//! 5. **error rendering**: every error from below becomes an OpenAI error body; the service
//!    hyper sees is `Infallible`. It sits above timeout and the limits because those fail with
//!    errors, not responses.
//! 6. **head size**: 431 for a request line and headers over `server.max_header_bytes`, with
//!    an error body (hyper's own cap, twice that, is in [`crate::server`]).
//! 7. **path normalisation**: dot segments resolved (`/v1/../x` is `/x`), or 400 when one hides
//!    behind an encoded separator, so keys, routes and the upstream read one path. Below error
//!    rendering for its 400; metrics label the route by the same normal form.
//! 8. **timeout**: `server.request_timeout` to response headers (a stream, once started, is
//!    bounded by each upstream's idle timeout instead).
//! 9. **body read timeout**: the body must arrive within `server.body_read_timeout` of its
//!    first read, or reading it fails and the handler answers 408; a client trickling its body
//!    holds a concurrency slot for that long at most.
//! 10. **body limit**: 413 on a declared-too-large body before anything is read.
//! 11. **the operations split** ([`OpsBypass`]): `/healthz`, `/readyz` and `/metrics` go straight
//!     to the router, so probes and scrapes answer while the data plane is saturated (and are
//!     never shed into a restart loop). It sees the normalised path.
//! 12. **concurrency limit with load shedding**: at the limit, 503 at once rather than a queue.
//! 13. **gateway keys and per-key limits** (only with `[auth]` keys): 401/403/429 before any
//!     handler runs; the key itself is removed from the request here.
//! 14. **router**.
//!
//! Limits on connections rather than requests (request heads, idle connections, open
//! connections) live in [`crate::server`], below any request.
//!
//! Request and response extensions are the contract between these layers and the handlers:
//!
//! | extension | set by | read by |
//! |---|---|---|
//! | `RequestId` (request) | request id layer | trace span, `x-request-id` propagation |
//! | [`crate::auth::Caller`] (request) | gateway keys | handlers: model allowlist, charges, session scope |
//! | [`crate::upstream::UpstreamWait`] (response) | upstream transport, tool loop | metrics: `gateway_overhead_seconds` |
//! | [`crate::error::ErrorLabel`] (response) | error rendering | metrics: `errors_total{kind}` |
//! | `hyper::upgrade::OnUpgrade` (request) | hyper, on an HTTP/1.1 upgrade | the upgrade handlers (passthrough, Responses WebSocket) |
//! | [`crate::tunnel::Tunnel`] (response, a 101's) | the upgrade handlers | [`crate::server`], which runs it |
//!
//! Every layer maps bodies and keeps extensions, so both upgrade handles get through.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderName, Request, Response};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::body::{Body, BoxError};
use crate::error::{ErrorResponseLayer, GatewayError};
use crate::limit::{head_limit, BodyLimitLayer, BodyTimeoutLayer, ConcurrencyLimitLayer};
use crate::request_path::NormalizePathLayer;
use crate::router::{Route, Router};
use crate::AppState;

/// The response body hyper sends: catch-panic's box around ctxgate's [`crate::body::Body`].
pub(crate) type ResponseBody = tower_http::body::UnsyncBoxBody<Bytes, BoxError>;

/// The complete gateway as one cloneable service.
pub(crate) type GatewayService = BoxCloneSyncService<Request<Incoming>, Response<ResponseBody>, Infallible>;

use crate::headers::REQUEST_ID;

pub(crate) fn build(state: Arc<AppState>) -> GatewayService {
    let server = &state.config.server;
    let data_plane = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::shared(state.permits.clone()))
        .layer(crate::auth::layer(state.auth.clone()))
        .service(Router::new(state.clone()));
    let service = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
            HeaderName::from_static("api-key"),
            HeaderName::from_static("x-api-key"),
        ]))
        .layer(SetRequestIdLayer::new(REQUEST_ID, RandomRequestId))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<Incoming>| {
            // Path only: a query string may carry a key (`?api-key=`).
            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", method = %request.method(), path = request.uri().path(), request_id = id)
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(crate::observe::layer(state.metrics.clone()))
        .layer(ErrorResponseLayer)
        .filter(head_limit(server.max_header_bytes.get()))
        .layer(NormalizePathLayer)
        .timeout(server.request_timeout)
        .layer(BodyTimeoutLayer::new(server.body_read_timeout))
        .layer(BodyLimitLayer::new(server.max_body_bytes.get()))
        .service(OpsBypass { ops: Router::new(state.clone()), data: data_plane });
    BoxCloneSyncService::new(service)
}

/// Serves one request that did not come through [`build`]'s stack (a `response.create` on a
/// terminated WebSocket, whose upgrade did) as the data plane serves one: counted in the request
/// metrics, under `server.max_concurrent_requests` until its answer's last byte, an error
/// rendered in OpenAI's shape.
pub(crate) fn serve_inner(
    state: &Arc<AppState>,
    request: Request<Body>,
    handler: Handler,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
    let app = state.clone();
    let mut service = ServiceBuilder::new()
        .layer(crate::observe::layer(state.metrics.clone()))
        .layer(ErrorResponseLayer)
        .layer(ConcurrencyLimitLayer::shared(state.permits.clone()))
        .service(tower::service_fn(move |request| handler(app.clone(), request)));
    // Every layer here is always ready (the limit rejects in `call`), as in the stack above.
    let answered = tower::Service::call(&mut service, request);
    async move {
        match answered.await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// A handler [`serve_inner`] runs.
pub(crate) type Handler = fn(Arc<AppState>, Request<Body>) -> HandlerFuture;
pub(crate) type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

/// Routes the operations endpoints around the data plane's limits (step 11 above). Hand-written
/// because tower's `Steer` is `Sync` only for a `Sync` request, and our request body is not.
#[derive(Clone, Debug)]
struct OpsBypass<D> {
    ops: Router,
    data: D,
}

impl<D> tower::Service<Request<Body>> for OpsBypass<D>
where
    D: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    D::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        // The router is always ready, and the limits reject in `call`, not by backpressure.
        self.data.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if Route::of(request.uri().path()).is_operational() {
            let future = tower::Service::call(&mut self.ops, request);
            Box::pin(async move { future.await.map_err(Into::into) })
        } else {
            Box::pin(self.data.call(request))
        }
    }
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response<crate::body::Body> {
    tracing::error!("request handler panicked");
    GatewayError::Internal("the request handler panicked".into()).into_response()
}

/// 128 random bits in hex: unique without coordination between replicas.
#[derive(Clone, Copy, Debug)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = format!("{:032x}", fastrand::u128(..));
        http::HeaderValue::try_from(id).ok().map(RequestId::new)
    }
}
