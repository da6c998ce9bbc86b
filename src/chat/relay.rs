//! [`Relay`]: the one place an upstream answer is read and passed on to the client, streamed
//! or not. For each upstream answer (a round of the tool loop) it:
//!
//! - splits an SSE body into whole events and assembles the answer from them (content, tool-call
//!   fragments, `usage`), or collects a JSON body and reads its message;
//! - rewrites the answer's `usage` to the whole turn's ([`TurnUsage`]) after tool rounds;
//! - on a session, numbers each event it sends (`id: TURN-SEQ`) and writes it to the session's
//!   event log for replay;
//! - when the loop asks it to, holds events back from the first tool-call delta on, so a round
//!   the gateway answers itself never reaches the client;
//! - sends keep-alive comments while the gateway's tools run, and failures after the first
//!   byte as one error event ([`GatewayError::to_sse_event`]);
//! - on a session, holds `[DONE]` until the turn is committed, and sends an error event in its
//!   place when the commit fails ([`Relay::end`]).
//!
//! A client that goes away is noted, not fatal: on a session the turn is still read to its
//! end and committed.
//!
//! What it holds is bounded ([`Limits`]): a JSON body, a streamed answer as assembled (with the
//! events it holds back), and each SSE event. Past a bound the round fails with
//! [`AnswerTooLarge`] and the rest of the body is not read.

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError, FrameSender};
use crate::error::GatewayError;
use crate::openai::answer::{Answer, AnswerBuilder};
use crate::openai::events::{has_tool_call_delta, is_done, EventSplitter};
use crate::openai::sse;
use crate::openai::usage::TurnUsage;
use crate::session::events::EventLog;

pub(crate) enum Relay {
    /// An SSE stream, passed on event by event as it arrives.
    Stream(StreamRelay),
    /// A JSON answer, returned whole once the loop is done.
    Json(Limits),
}

pub(crate) struct StreamRelay {
    client: Option<FrameSender>,
    /// On a session: the turn's id and the last event number, and its log.
    numbered: Option<(u64, u64, EventLog)>,
    /// On a session: the `[DONE]` event, numbered, held from the client until the turn is
    /// committed ([`Relay::end`]); it is not logged.
    done: Option<Bytes>,
    limits: Limits,
}

/// What one round may hold (`server.max_answer_bytes`, `server.max_sse_event_bytes`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) answer: usize,
    pub(crate) event: usize,
}

impl Limits {
    pub(crate) fn of(config: &crate::config::ServerConfig) -> Self {
        Self { answer: config.max_answer_bytes.get(), event: config.max_sse_event_bytes.get() }
    }
}

/// An answer, or one of its events, went past its limit.
#[derive(Debug, thiserror::Error)]
#[error("{what} is larger than {limit} bytes")]
pub(crate) struct AnswerTooLarge {
    pub(crate) what: &'static str,
    pub(crate) limit: usize,
}

impl AnswerTooLarge {
    fn answer(limit: usize) -> Self {
        Self { what: "an answer", limit }
    }

    /// The error a client gets, naming the upstream.
    pub(crate) fn to_gateway_error(&self, upstream: String) -> GatewayError {
        GatewayError::UpstreamTooLarge { upstream, what: self.what, limit: self.limit }
    }
}

/// One upstream answer, read to its end.
pub(crate) struct Round {
    /// The answer it held, or `None` for an error body or a stream cut short.
    pub(crate) answer: Option<Answer>,
    pub(crate) rest: Rest,
}

/// What of a round has not reached the client yet.
pub(crate) enum Rest {
    /// Stream events held back (from the first tool-call delta, and `[DONE]`).
    Held(Vec<Bytes>),
    /// A JSON body.
    Body(Bytes),
}

impl Relay {
    /// A stream to `client`; on a session, `numbered` is the turn's id and its event log.
    pub(crate) fn stream(client: FrameSender, numbered: Option<(u64, EventLog)>, limits: Limits) -> Self {
        Self::Stream(StreamRelay {
            client: Some(client),
            numbered: numbered.map(|(turn, log)| (turn, 0, log)),
            done: None,
            limits,
        })
    }

    /// Reads one upstream body to its end. A stream's events go to the client as they arrive,
    /// except, with `hold_tool_calls`, those from the first tool-call delta on, and `[DONE]`.
    /// A body that fails mid-way is an error; the stream's client gets that error too. So is
    /// an answer past its [`Limits`] ([`AnswerTooLarge`]); a stream's client then gets an error
    /// event from `upstream` (the route's name).
    /// A `usage` the answer carries reaches the client as the turn's so far (`usage`).
    pub(crate) async fn read(
        &mut self,
        mut body: Body,
        hold_tool_calls: bool,
        usage: &mut TurnUsage,
        upstream: &str,
    ) -> Result<Round, BoxError> {
        match self {
            Self::Json(limits) => {
                let bytes = collect_limited(body, limits.answer).await?;
                let mut answer = AnswerBuilder::new(false);
                answer.observe(&bytes);
                let bytes = usage.json(&bytes);
                Ok(Round { answer: answer.finish(), rest: Rest::Body(bytes) })
            }
            Self::Stream(relay) => {
                let limits = relay.limits;
                let mut splitter = EventSplitter::new(limits.event);
                let mut answer = AnswerBuilder::new(true);
                let mut held = Vec::new();
                let mut held_bytes = 0;
                let mut holding = false;
                while let Some(frame) = body.frame().await {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(err) => {
                            relay.abort(&err).await;
                            return Err(err);
                        }
                    };
                    let Some(data) = frame.data_ref() else { continue };
                    let events = match splitter.feed(data) {
                        Ok(events) => events,
                        Err(too_large) => {
                            let err = AnswerTooLarge { what: "an SSE event", limit: too_large.0 };
                            return Err(relay.too_large(err, upstream).await);
                        }
                    };
                    for event in events {
                        answer.observe(&event);
                        let event = usage.event(&event);
                        holding = holding || (hold_tool_calls && has_tool_call_delta(&event));
                        if holding || (hold_tool_calls && is_done(&event)) {
                            held_bytes += event.len();
                            held.push(event);
                        } else {
                            relay.send(event).await;
                        }
                    }
                    if answer.assembled_bytes() + held_bytes > limits.answer {
                        return Err(relay.too_large(AnswerTooLarge::answer(limits.answer), upstream).await);
                    }
                }
                if let Some(rest) = splitter.finish() {
                    answer.observe(&rest);
                    let rest = usage.event(&rest);
                    if hold_tool_calls {
                        held.push(rest);
                    } else {
                        relay.send(rest).await;
                    }
                }
                usage.end_round();
                Ok(Round { answer: answer.finish(), rest: Rest::Held(held) })
            }
        }
    }

    /// Sends held events on (a stream; a JSON body is the caller's to return).
    pub(crate) async fn flush(&mut self, held: Vec<Bytes>) {
        if let Self::Stream(relay) = self {
            for event in held {
                relay.send(event).await;
            }
        }
    }

    /// Runs `work`, sending the stream's client an SSE comment at once and then every
    /// `interval` while it runs.
    pub(crate) async fn keep_alive<T>(
        &mut self,
        interval: std::time::Duration,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let Self::Stream(relay) = self else { return work.await };
        let mut ticks = tokio::time::interval(interval.max(std::time::Duration::from_millis(10)));
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = ticks.tick() => relay.send(sse::comment("ctxgate: running tools")).await,
            }
        }
    }

    /// Ends a stream with an error event and `[DONE]`: a failure after the first byte.
    pub(crate) async fn fail(&mut self, error: Bytes) {
        if let Self::Stream(relay) = self {
            relay.send(error).await;
            relay.send(Bytes::from_static(sse::DONE)).await;
        }
    }

    /// [`Self::fail`] with one of ctxgate's own errors.
    pub(crate) async fn fail_with(&mut self, error: &GatewayError) {
        self.fail(error.to_sse_event()).await;
    }

    /// Whether the stream's client is gone (a JSON client is never known to be): a send
    /// failed, or its connection closed since (seen without sending: a client that leaves while
    /// the tools run, between keep-alives, is known gone when they finish).
    pub(crate) fn client_gone(&self) -> bool {
        match self {
            Self::Stream(relay) => relay.client.as_ref().is_none_or(|client| client.is_closed()),
            Self::Json(_) => false,
        }
    }

    /// Ends a session's stream once its commit is known: the held `[DONE]` when it
    /// succeeded, else the failure as one error event and no `[DONE]`, so a client that saw
    /// `[DONE]` can rely on the turn being saved.
    pub(crate) async fn end(&mut self, committed: Result<(), &GatewayError>) {
        let Self::Stream(relay) = self else { return };
        let last = match committed {
            Ok(()) => relay.done.take(),
            Err(err) => Some(err.to_sse_event()),
        };
        if let (Some(client), Some(last)) = (&relay.client, last) {
            let _ = client.send(Ok(Frame::data(last))).await;
        }
    }

    /// Waits until every logged event is written. The client's body stays open until the relay
    /// is dropped, so a caller that commits first and drops after keeps its promise: a client
    /// that read to the end can rely on the commit.
    pub(crate) async fn close_log(&mut self) {
        if let Self::Stream(relay) = self {
            if let Some((_, _, log)) = relay.numbered.take() {
                log.close().await;
            }
        }
    }
}

impl StreamRelay {
    /// Numbers and logs the event (on a session), then sends it while the client is there.
    async fn send(&mut self, event: Bytes) {
        let bytes = match &mut self.numbered {
            Some((turn, seq, log)) => {
                *seq += 1;
                let numbered = sse::with_id(*turn, *seq, &event);
                if is_done(&event) {
                    // Not logged: followers get it from the commit (`stream_committed`).
                    self.done = Some(numbered);
                    return;
                }
                log.push(event).await;
                numbered
            }
            None => event,
        };
        if let Some(client) = &self.client {
            if client.send(Ok(Frame::data(bytes))).await.is_err() {
                self.client = None;
            }
        }
    }

    /// Ends the client's stream with the error event for an answer past its limit (the rest
    /// of the upstream's body is dropped unread); returns the error for the caller.
    async fn too_large(&mut self, err: AnswerTooLarge, upstream: &str) -> BoxError {
        let event = err.to_gateway_error(upstream.to_string()).to_sse_event();
        self.send(event).await;
        self.send(Bytes::from_static(sse::DONE)).await;
        Box::new(err)
    }

    /// Passes a mid-stream transport failure to the client as a body error: the stream ends
    /// without a clean end, as the upstream's did.
    async fn abort(&mut self, err: &BoxError) {
        if let Some(client) = self.client.take() {
            let _ = client.send(Err(err.to_string().into())).await;
        }
    }
}

/// The whole body in one buffer, sized up front when its length is known; past `max` bytes
/// (declared or read) it is [`AnswerTooLarge`] and nothing more is read.
async fn collect_limited(mut body: Body, max: usize) -> Result<Bytes, BoxError> {
    let hint = body.size_hint();
    if hint.lower() > max as u64 {
        return Err(Box::new(AnswerTooLarge::answer(max)));
    }
    let mut first: Option<Bytes> = None;
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let len = first.as_ref().map_or(0, Bytes::len) + buffer.len() + data.len();
        if len > max {
            return Err(Box::new(AnswerTooLarge::answer(max)));
        }
        // A body in one frame is kept as it came, without a copy.
        match first.take() {
            None if buffer.is_empty() => first = Some(data),
            held => {
                if buffer.is_empty() {
                    buffer.reserve(hint.exact().map_or(len, |n| n as usize));
                }
                if let Some(held) = held {
                    buffer.extend_from_slice(&held);
                }
                buffer.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buffer.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: Vec<&'static [u8]>) -> Body {
        let stream = futures_util::stream::iter(
            frames.into_iter().map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from_static(f)))),
        );
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }

    #[tokio::test]
    async fn a_json_body_is_collected_whole_under_its_limit() {
        let bytes = collect_limited(framed(vec![b"{\"a\":", b"1", b"}"]), 7).await.unwrap();
        assert_eq!(&bytes[..], b"{\"a\":1}");
        let one = collect_limited(framed(vec![b"{}"]), 2).await.unwrap();
        assert_eq!(&one[..], b"{}");
    }

    #[tokio::test]
    async fn a_json_body_past_its_limit_is_refused() {
        let err = collect_limited(framed(vec![b"{\"a\":", b"12", b"}"]), 7).await.unwrap_err();
        assert!(err.is::<AnswerTooLarge>(), "{err}");
        let declared = collect_limited(crate::body::full(vec![b'x'; 9]), 8).await.unwrap_err();
        assert!(declared.is::<AnswerTooLarge>(), "{declared}");
    }
}
