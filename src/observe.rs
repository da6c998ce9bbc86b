//! [`layer`]: per-request metrics recorded at the edge of the stack, above error
//! rendering, so shed, timed-out and rejected requests are counted with their real status.
//! Durations and the in-flight gauge cover a stream until its last byte.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::body::{Body, Tracked};
use crate::error::ErrorLabel;
use crate::router::Route;
use crate::telemetry::{ErrorKind, Metrics, RouteLabel, RouteStatus};
use crate::upstream::UpstreamWait;

/// The layer that records `metrics` for every request.
pub(crate) fn layer<S>(metrics: Arc<Metrics>) -> impl Layer<S, Service = RecordMetrics<S>> + Clone {
    tower::layer::layer_fn(move |inner| RecordMetrics { inner, metrics: metrics.clone() })
}

#[derive(Clone, Debug)]
pub(crate) struct RecordMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Decrements the in-flight gauge when dropped: with the body on success, or with the future
/// if the client goes away before the response headers.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl<S, B> Service<Request<B>> for RecordMetrics<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The path as the router will see it (a refused one is unknown).
        let route = crate::request_path::normalize(request.uri().path())
            .map_or(Route::Unknown, |path| Route::of(&path))
            .label();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        metrics.in_flight.inc();
        let in_flight = InFlight(metrics.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let to_headers = started.elapsed();
            let label = RouteLabel { route };
            metrics.requests.get_or_create(&RouteStatus { route, status: response.status().as_u16() }).inc();
            if let Some(ErrorLabel(kind)) = response.extensions().get::<ErrorLabel>() {
                metrics.errors.get_or_create(&ErrorKind { kind }).inc();
            }
            if let Some(UpstreamWait(wait)) = response.extensions().get::<UpstreamWait>() {
                let overhead = to_headers.saturating_sub(*wait);
                metrics.gateway_overhead.get_or_create(&label).observe(overhead.as_secs_f64());
            }
            Ok(response.map(|body| {
                Tracked::new(body, started, move |end| {
                    let _in_flight = in_flight;
                    metrics.request_duration.get_or_create(&label).observe(end.total.as_secs_f64());
                    if let Some(first) = end.first_frame {
                        metrics.time_to_first_byte.get_or_create(&label).observe(first.as_secs_f64());
                    }
                })
                .boxed_unsync()
            }))
        })
    }
}
