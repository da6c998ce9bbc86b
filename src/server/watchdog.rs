//! What one client connection is doing, for its connection-level deadlines: idle (nothing in
//! flight, nothing read), reading a head (bytes arrived, no request yet), or busy (requests in
//! flight, each until its response's last byte). [`Watched`] reports reads, [`Activity::begin`]
//! requests, and [`deadline`] says when the connection is due to close and why. Request-level
//! deadlines (body, response) are not here: they belong to the stack.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts when a connection goes idle,
//! so it would also close every keep-alive connection after the head timeout; and it covers
//! neither the auto builder's HTTP/1-or-2 sniffing nor HTTP/2.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// The connection's phase, as the watchdog sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// No request in flight, nothing read since `since`.
    Idle { since: Instant },
    /// Bytes arrived at `since` while no request was in flight: a head is on its way.
    Head { since: Instant },
    /// Requests in flight.
    Busy { requests: usize },
}

/// Why a connection was closed by its watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expiry {
    /// A head started and did not complete in time: the connection is cut.
    Head,
    /// Nothing happened for the idle timeout: the connection is shut down gracefully.
    Idle,
}

impl Expiry {
    /// The `reason` label of `ctxgate_connections_closed_total`.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Self::Head => "header_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) idle: Duration,
}

/// When a connection in `phase` is due to close. While draining, an idle connection is already
/// closing, and only a stalled head still has a deadline.
pub(super) fn deadline(phase: Phase, timeouts: Timeouts, draining: bool) -> Option<(Instant, Expiry)> {
    match phase {
        Phase::Head { since } => Some((since + timeouts.header_read, Expiry::Head)),
        Phase::Idle { since } if !draining => Some((since + timeouts.idle, Expiry::Idle)),
        Phase::Idle { .. } | Phase::Busy { .. } => None,
    }
}

/// One connection's phase, shared by its IO, its service and its watchdog.
#[derive(Debug)]
pub(super) struct Activity {
    phase: watch::Sender<Phase>,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self { phase: watch::Sender::new(Phase::Idle { since: Instant::now() }) })
    }

    /// Wakes on every phase change.
    pub(super) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A request's head was parsed; it is in flight until the returned guard drops (with the
    /// response body, or with the request if the client leaves first).
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.phase.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy { requests } => Phase::Busy { requests: requests + 1 },
                Phase::Idle { .. } | Phase::Head { .. } => Phase::Busy { requests: 1 },
            }
        });
        Busy(self.clone())
    }

    fn read(&self) {
        self.phase.send_if_modified(|phase| match *phase {
            Phase::Idle { .. } => {
                *phase = Phase::Head { since: Instant::now() };
                true
            }
            Phase::Head { .. } | Phase::Busy { .. } => false,
        });
    }

    fn end(&self) {
        self.phase.send_modify(|phase| {
            if let Phase::Busy { requests } = *phase {
                *phase = match requests {
                    0 | 1 => Phase::Idle { since: Instant::now() },
                    n => Phase::Busy { requests: n - 1 },
                };
            }
        });
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end();
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO that reports reads to its [`Activity`].
    #[derive(Debug)]
    pub(super) struct Watched<IO> {
        #[pin]
        io: IO,
        activity: Arc<Activity>,
    }
}

impl<IO> Watched<IO> {
    pub(super) fn new(io: IO, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }
}

impl<IO: AsyncRead> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts =
        Timeouts { header_read: Duration::from_secs(10), idle: Duration::from_secs(60) };

    #[tokio::test(start_paused = true)]
    async fn phases_follow_reads_and_requests() {
        let activity = Activity::new();
        let start = Instant::now();
        // Given an idle connection: due to close after the idle timeout
        assert_eq!(
            deadline(*activity.subscribe().borrow(), TIMEOUTS, false),
            Some((start + TIMEOUTS.idle, Expiry::Idle))
        );

        // When a head starts: the shorter head deadline runs from its first byte
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.read();
        let head = Instant::now();
        assert_eq!(
            deadline(*activity.subscribe().borrow(), TIMEOUTS, false),
            Some((head + TIMEOUTS.header_read, Expiry::Head))
        );

        // When two requests are in flight: no deadline until the last ends
        let first = activity.begin();
        let second = activity.begin();
        activity.read();
        drop(first);
        assert_eq!(deadline(*activity.subscribe().borrow(), TIMEOUTS, false), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(second);
        let idle = Instant::now();
        assert_eq!(
            deadline(*activity.subscribe().borrow(), TIMEOUTS, false),
            Some((idle + TIMEOUTS.idle, Expiry::Idle))
        );

        // And while draining an idle connection has no deadline of its own
        assert_eq!(deadline(*activity.subscribe().borrow(), TIMEOUTS, true), None);
    }
}
