//! Scripted replies: what a test queues on the server ([`Reply`]), the SSE pieces a streamed
//! reply is made of ([`Chunk`]), and the [`Gate`] a test uses to hold a stream mid-flight.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;

use crate::fixtures;

/// One scripted response, served to exactly one request (whatever its path).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ReplyBody,
    /// Extra delay before the response headers, on top of the server-wide latency.
    pub delay: Duration,
}

#[derive(Clone, Debug)]
pub enum ReplyBody {
    /// Sent in one frame with a content-length.
    Full(Bytes),
    /// Sent incrementally, one frame per chunk.
    Sse(Vec<Chunk>),
}

impl Reply {
    /// `status` with `body` as `application/json`.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: ReplyBody::Full(Bytes::from(body.to_string())),
            delay: Duration::ZERO,
        }
    }

    /// A 200 `text/event-stream` made of `chunks`.
    pub fn sse(chunks: Vec<Chunk>) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: ReplyBody::Sse(chunks),
            delay: Duration::ZERO,
        }
    }

    /// An OpenAI-shaped error; 429 gets `rate_limit_error` so retry logic sees a realistic body.
    pub fn error(status: u16) -> Reply {
        let kind = if status == 429 { "rate_limit_error" } else { "server_error" };
        Reply::json(status, fixtures::error(&format!("mock failure {status}"), kind))
    }

    /// Sets a header, replacing any earlier value of the same name (so a test can override the
    /// content-type a constructor chose).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds `d` to this reply's delay before headers.
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay += d;
        self
    }
}

/// One step of a streamed body.
#[derive(Clone, Debug)]
pub enum Chunk {
    /// Written as `data: {s}\n\n` in one body frame.
    Data(String),
    /// Written verbatim as one body frame (for malformed or oddly split events).
    Raw(Bytes),
    /// Sleeps before the next chunk.
    Delay(Duration),
    /// Holds the stream until the gate opens.
    Wait(Gate),
}

impl Chunk {
    pub fn json(v: Value) -> Chunk {
        Chunk::Data(v.to_string())
    }

    pub fn done() -> Chunk {
        Chunk::Data("[DONE]".into())
    }
}

/// A latch shared between a test and a stream: once opened it stays open, so a stream that
/// reaches its `Wait` after `open()` passes straight through.
#[derive(Clone, Debug, Default)]
pub struct Gate(watch::Sender<bool>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub(crate) async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // Only fails when every sender is gone, and `self` is one.
        let _ = rx.wait_for(|open| *open).await;
    }
}
