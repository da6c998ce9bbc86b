//! Admission limits: [`BodyTimeoutLayer`] (a request body must arrive within a deadline, so a
//! client trickling its body cannot hold a concurrency slot for minutes), [`BodyLimitLayer`]
//! (request body size, checked on `Content-Length` and again while streaming) and
//! [`ConcurrencyLimitLayer`] (requests served at once, streams included until their last byte;
//! excess load is shed with 503 rather than queued, so a saturated gateway answers fast instead
//! of building latency), and [`head_limit`] (431 with an error body for a large request head).
//! Connection-level limits (a head's hard cap, idle connections, open connections) belong to
//! [`crate::server`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::body::{Body, BodyTimedOut, BodyTooLarge, BoxError, Tracked};
use crate::error::GatewayError;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Boxes a future and its error. (A generic fn rather than an inline `async` block: rustc cannot
/// prove `Send` for an associated future type whose trait mentions `BoxError` inline.)
fn box_err<F, T, E>(future: F) -> BoxFuture<Result<T, BoxError>>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::pin(async move { future.await.map_err(Into::into) })
}

// === impl BodyTimeout ===

#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyTimeoutLayer {
    timeout: Duration,
}

impl BodyTimeoutLayer {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;
    fn layer(&self, inner: S) -> BodyTimeout<S> {
        BodyTimeout { inner, timeout: self.timeout }
    }
}

/// Gives the request body a deadline: it errors with [`BodyTimedOut`] when it is still
/// incomplete `timeout` after its first read. The clock starts at the first read, not at the
/// head, so a handler that waits (for a session, say) before reading does not eat the budget.
#[derive(Clone, Debug)]
pub(crate) struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<Request<B>> for BodyTimeout<S>
where
    S: Service<Request<TimedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let timeout = self.timeout;
        self.inner.call(request.map(|inner| TimedBody { inner, timeout, deadline: None }))
    }
}

pin_project_lite::pin_project! {
    /// A request body with a deadline, armed on its first poll.
    pub(crate) struct TimedBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let this = self.project();
        let timeout = *this.timeout;
        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A `tower::filter` predicate: 431 with an OpenAI error body for a request whose head (request
/// line and headers, as HTTP/1 sends them) is over `limit`. hyper reads heads of up to twice
/// the limit (see [`crate::server`]), so an oversized head still gets an answer a client can
/// read; past that, hyper refuses it alone, with no body, before there is a request.
pub(crate) fn head_limit<B>(limit: usize) -> impl Fn(Request<B>) -> Result<Request<B>, BoxError> + Clone {
    move |request| {
        if head_size(&request) > limit {
            return Err(GatewayError::HeadTooLarge { limit }.into());
        }
        Ok(request)
    }
}

fn head_size<B>(request: &Request<B>) -> usize {
    // `METHOD target HTTP/1.1\r\n`, each `name: value\r\n`, then `\r\n`.
    let target = request.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = request.method().as_str().len() + target + 11;
    let fields: usize =
        request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    line + fields + 2
}

// === impl BodyLimit ===

#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimitLayer {
    limit: usize,
}

impl BodyLimitLayer {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit { inner, limit: self.limit }
    }
}

/// Rejects a declared-too-large body up front and caps a streamed one; the inner service sees
/// a [`Body`] whose error is [`BodyTooLarge`] past the limit.
#[derive(Clone, Debug)]
pub(crate) struct BodyLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = self.limit;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Box::pin(async move { Err(GatewayError::PayloadTooLarge { limit }.into()) });
        }
        let request = request.map(|body| {
            Limited::new(body, limit)
                .map_err(move |e| -> BoxError {
                    if e.is::<LengthLimitError>() {
                        Box::new(BodyTooLarge(limit))
                    } else {
                        e
                    }
                })
                .boxed_unsync()
        });
        box_err(self.inner.call(request))
    }
}

// === impl ConcurrencyLimit ===

#[derive(Clone, Debug)]
pub(crate) struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimitLayer {
    /// A limit drawing on `permits`, which every limited path shares (HTTP requests, and the
    /// turns of a terminated WebSocket).
    pub(crate) fn shared(permits: Arc<Semaphore>) -> Self {
        Self { permits }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit { inner, permits: self.permits.clone() }
    }
}

/// Holds a permit from the call until the response body ends or is dropped.
#[derive(Clone, Debug)]
pub(crate) struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, Req> Service<Req> for ConcurrencyLimit<S>
where
    S: Service<Req, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Box::pin(async { Err(GatewayError::Overloaded.into()) });
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await.map_err(Into::into)?;
            Ok(response.map(|body| Tracked::new(body, Instant::now(), move |_| drop(permit)).boxed_unsync()))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::body;

    #[tokio::test]
    async fn declared_oversize_is_rejected_before_reading() {
        let svc = BodyLimitLayer::new(4).layer(service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(body::empty()))
        }));
        let request = Request::builder().header("content-length", "5").body(body::full("12345")).unwrap();
        let err = svc.oneshot(request).await.unwrap_err();
        assert_eq!(GatewayError::from_boxed(err).status(), 413);
    }

    #[tokio::test]
    async fn streamed_oversize_errors_with_body_too_large() {
        let svc = BodyLimitLayer::new(4).layer(service_fn(|req: Request<Body>| async move {
            let err = req.into_body().collect().await.unwrap_err();
            assert!(err.is::<BodyTooLarge>());
            Ok::<_, Infallible>(Response::new(body::empty()))
        }));
        svc.oneshot(Request::new(body::full("12345"))).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_still_incomplete_at_its_deadline_errors_with_body_timed_out() {
        // Given a body whose first frame arrives and whose rest never does
        let (sender, body) = body::ChannelBody::channel(1);
        sender.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"{")))).await.unwrap();
        let svc = BodyTimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(
            |req: Request<TimedBody<Body>>| async move {
                let started = tokio::time::Instant::now();
                let err = req.into_body().collect().await.unwrap_err();
                Ok::<_, Infallible>((err.downcast_ref::<BodyTimedOut>().map(|t| t.0), started.elapsed()))
            },
        ));
        // When it is read
        let (timed_out, after) = svc.oneshot(Request::new(body)).await.unwrap();
        // Then reading fails with the deadline's own error, at the deadline
        assert_eq!(timed_out, Some(Duration::from_secs(5)));
        assert_eq!(after, Duration::from_secs(5));
        drop(sender);
    }

    #[tokio::test]
    async fn sheds_load_while_a_stream_holds_the_permit() {
        let layer = ConcurrencyLimitLayer::shared(Arc::new(Semaphore::new(1)));
        let mut svc =
            layer.layer(service_fn(|_: ()| async { Ok::<_, Infallible>(Response::new(body::full("x"))) }));
        let held = svc.ready().await.unwrap().call(()).await.unwrap();
        // The first response's body is still alive: a second request is shed.
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert_eq!(GatewayError::from_boxed(err).status(), 503);
        drop(held);
        assert!(svc.ready().await.unwrap().call(()).await.is_ok());
    }
}
