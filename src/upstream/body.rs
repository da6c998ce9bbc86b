//! [`UpstreamBody`]: an upstream response body on its way to the client. Frames pass through
//! as they arrive; around them it enforces the idle timeout, reads `usage` for the token
//! metrics and records the upstream's duration when the body ends; a pool endpoint's lease (its
//! in-flight count) is released then too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::{Lease, Upstream, UsageSink};
use crate::body::BoxError;
use crate::openai::UsageScanner;

/// The upstream went silent for longer than its `idle_timeout` mid-body.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream} sent nothing for {}", humantime::format_duration(*.after))]
pub(super) struct IdleTimeout {
    upstream: String,
    after: Duration,
}

pin_project_lite::pin_project! {
    #[project = UpstreamBodyProj]
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        // Re-arming the timer on every frame costs a timer-wheel update per token; instead the
        // timer fires once per `idle_timeout` and is pushed back if a frame came meanwhile.
        last_frame: tokio::time::Instant,
        scanner: UsageScanner,
        upstream: Arc<Upstream>,
        usage_sink: UsageSink,
        endpoint: Option<Lease>,
        sent_at: Instant,
        ended: bool,
    }
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        upstream: Arc<Upstream>,
        sent_at: Instant,
        scanner: UsageScanner,
        usage_sink: UsageSink,
        endpoint: Option<Lease>,
    ) -> Self {
        let idle_timeout = upstream.idle_timeout;
        Self {
            inner,
            idle: tokio::time::sleep(idle_timeout),
            idle_timeout,
            last_frame: tokio::time::Instant::now(),
            scanner,
            upstream,
            usage_sink,
            endpoint,
            sent_at,
            ended: false,
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scanner.observe(data);
                }
                *this.last_frame = tokio::time::Instant::now();
                if this.inner.is_end_stream() {
                    finish(&mut this);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                *this.ended = true;
                this.endpoint.take();
                this.upstream.metrics.stream_aborts.inc();
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                finish(&mut this);
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                if this.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = *this.last_frame + *this.idle_timeout;
                if deadline > tokio::time::Instant::now() {
                    // A frame came since the timer was armed: wait out the rest.
                    this.idle.as_mut().reset(deadline);
                    continue;
                }
                *this.ended = true;
                this.endpoint.take();
                this.upstream.metrics.stream_aborts.inc();
                tracing::warn!(upstream = %this.upstream.name, "upstream body idle timeout");
                return Poll::Ready(Some(Err(Box::new(IdleTimeout {
                    upstream: this.upstream.name.clone(),
                    after: *this.idle_timeout,
                }))));
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn finish(this: &mut UpstreamBodyProj<'_>) {
    if std::mem::replace(this.ended, true) {
        return;
    }
    this.endpoint.take();
    this.upstream.metrics.duration.observe(this.sent_at.elapsed().as_secs_f64());
    let scanner = std::mem::replace(this.scanner, UsageScanner::Off);
    if let Some(usage) = scanner.finish() {
        this.upstream.metrics.record_usage(&usage);
        this.usage_sink.record(&usage);
    }
}
