//! Incremental SSE bodies: a producer task plays a `Vec<Chunk>` into a channel, the body hands
//! each chunk to hyper as its own frame, and a guard inside the body keeps the open-stream
//! count that tests use to prove a client disconnect reached the upstream.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use crate::Chunk;

/// Frames buffered ahead of the client; small, so a slow reader back-pressures the producer.
const BUFFER: usize = 16;

/// A streamed response body. Counted as open from creation until it ends or is dropped.
#[derive(Debug)]
pub(crate) struct SseBody {
    rx: mpsc::Receiver<Bytes>,
    open: Option<OpenGuard>,
}

impl SseBody {
    /// Starts playing `chunks` in a background task; must be called inside a tokio runtime.
    pub(crate) fn spawn(chunks: Vec<Chunk>, open: &Arc<AtomicUsize>) -> SseBody {
        let (tx, rx) = mpsc::channel(BUFFER);
        let body = SseBody { rx, open: Some(OpenGuard::new(open)) };
        tokio::spawn(async move {
            // When the body is dropped (client gone), `closed` fires and cancels playback even
            // if it is parked on a Delay or a Gate that will never open.
            tokio::select! {
                () = play(&tx, chunks) => {}
                () = tx.closed() => {}
            }
        });
        body
    }
}

async fn play(tx: &mpsc::Sender<Bytes>, chunks: Vec<Chunk>) {
    for chunk in chunks {
        let frame = match chunk {
            Chunk::Data(s) => Bytes::from(format!("data: {s}\n\n")),
            Chunk::Raw(b) => b,
            Chunk::Delay(d) => {
                tokio::time::sleep(d).await;
                continue;
            }
            Chunk::Wait(gate) => {
                gate.wait().await;
                continue;
            }
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = ready!(this.rx.poll_recv(cx));
        if next.is_none() {
            // Finished: stop counting now rather than whenever hyper gets round to dropping us.
            this.open = None;
        }
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }
}

/// Holds one unit of the open-stream count.
#[derive(Debug)]
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
