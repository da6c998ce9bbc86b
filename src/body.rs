//! The one body type that flows through the stack; [`Tracked`], a body wrapper that runs a
//! callback when the body ends or is dropped (how in-flight gauges, concurrency permits and
//! durations cover a whole stream rather than just its headers); and [`ChannelBody`], a body a
//! task feeds. A leaf: it knows nothing of requests, errors or features.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use tokio::sync::mpsc;

/// A boxed error, as tower's layers produce.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Request and response body inside ctxgate.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A request body went past `server.max_body_bytes` while it was read (the limit's own error,
/// so whoever reads the body can tell it from a broken connection).
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {0} bytes")]
pub struct BodyTooLarge(pub usize);

/// A request body did not arrive in full within `server.body_read_timeout` (the deadline's own
/// error, so whoever reads the body can answer 408 rather than blame the connection).
#[derive(Debug, thiserror::Error)]
#[error("request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTimedOut(pub Duration);

/// The sending half of a [`ChannelBody`].
pub type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// How a tracked body ended.
#[derive(Clone, Copy, Debug)]
pub struct BodyEnd {
    /// From the wrapper's creation to its first data frame, if one came.
    pub first_frame: Option<Duration>,
    /// From creation to the end (or the drop).
    pub total: Duration,
    /// True when the body reached its end; false when it errored or was dropped early
    /// (a client that disconnected mid-stream).
    pub complete: bool,
}

pin_project_lite::pin_project! {
    /// Passes frames through untouched and calls `on_end` exactly once.
    #[project = TrackedProj]
    pub struct Tracked<B, F: FnOnce(BodyEnd)> {
        #[pin]
        inner: B,
        started: Instant,
        first_frame: Option<Duration>,
        on_end: Option<F>,
    }

    impl<B, F: FnOnce(BodyEnd)> PinnedDrop for Tracked<B, F> {
        fn drop(this: Pin<&mut Self>) {
            this.project().finish(false);
        }
    }
}

impl<B, F: FnOnce(BodyEnd)> Tracked<B, F> {
    pub fn new(inner: B, started: Instant, on_end: F) -> Self {
        Self { inner, started, first_frame: None, on_end: Some(on_end) }
    }
}

impl<B, F: FnOnce(BodyEnd)> TrackedProj<'_, B, F> {
    fn finish(&mut self, complete: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd { first_frame: *self.first_frame, total: self.started.elapsed(), complete });
        }
    }
}

impl<B, F> HttpBody for Tracked<B, F>
where
    B: HttpBody,
    F: FnOnce(BodyEnd),
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.first_frame.is_none() && frame.is_data() {
                    *this.first_frame = Some(this.started.elapsed());
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl ChannelBody ===

/// A response body fed by a task, so the client reads frames while the task keeps ownership
/// of the upstream body (or of a replay loop). The body ends when every sender is dropped.
#[derive(Debug)]
pub struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it, holding up to `capacity` frames.
    pub fn channel(capacity: usize) -> (FrameSender, Body) {
        let (sender, receiver) = mpsc::channel(capacity);
        (sender, Self { receiver }.boxed_unsync())
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.receiver.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn reports_completion_once() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = ends.clone();
        let body = Tracked::new(full("hello"), Instant::now(), move |end| sink.lock().unwrap().push(end));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        let ends = ends.lock().unwrap();
        assert_eq!(ends.len(), 1);
        assert!(ends[0].complete);
        assert!(ends[0].first_frame.is_some());
    }

    #[tokio::test]
    async fn reports_early_drop_as_incomplete() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = ends.clone();
        drop(Tracked::new(full("hello"), Instant::now(), move |end| sink.lock().unwrap().push(end)));
        let ends = ends.lock().unwrap();
        assert_eq!(ends.len(), 1);
        assert!(!ends[0].complete);
        assert!(ends[0].first_frame.is_none());
    }
}
