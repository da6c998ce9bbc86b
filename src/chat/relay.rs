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

use bytes::Bytes;
use http_body::Frame;
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
    Json,
}

pub(crate) struct StreamRelay {
    client: Option<FrameSender>,
    /// On a session: the turn's id and the last event number, and its log.
    numbered: Option<(u64, u64, EventLog)>,
    /// On a session: the `[DONE]` event, numbered and logged, held from the client until the
    /// turn is committed ([`Relay::end`]).
    done: Option<Bytes>,
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
    pub(crate) fn stream(client: FrameSender, numbered: Option<(u64, EventLog)>) -> Self {
        Self::Stream(StreamRelay {
            client: Some(client),
            numbered: numbered.map(|(turn, log)| (turn, 0, log)),
            done: None,
        })
    }

    /// Reads one upstream body to its end. A stream's events go to the client as they arrive,
    /// except, with `hold_tool_calls`, those from the first tool-call delta on, and `[DONE]`.
    /// A body that fails mid-way is an error; the stream's client gets that error too.
    /// A `usage` the answer carries reaches the client as the turn's so far (`usage`).
    pub(crate) async fn read(
        &mut self,
        mut body: Body,
        hold_tool_calls: bool,
        usage: &mut TurnUsage,
    ) -> Result<Round, BoxError> {
        match self {
            Self::Json => {
                let bytes = body.collect().await?.to_bytes();
                let mut answer = AnswerBuilder::new(false);
                answer.observe(&bytes);
                let bytes = usage.json(&bytes);
                Ok(Round { answer: answer.finish(), rest: Rest::Body(bytes) })
            }
            Self::Stream(relay) => {
                let mut splitter = EventSplitter::default();
                let mut answer = AnswerBuilder::new(true);
                let mut held = Vec::new();
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
                    for event in splitter.feed(data) {
                        answer.observe(&event);
                        let event = usage.event(&event);
                        holding = holding || (hold_tool_calls && has_tool_call_delta(&event));
                        if holding || (hold_tool_calls && is_done(&event)) {
                            held.push(event);
                        } else {
                            relay.send(event).await;
                        }
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
            Self::Json => false,
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
                log.push(event.clone());
                let numbered = sse::with_id(*turn, *seq, &event);
                if is_done(&event) {
                    self.done = Some(numbered);
                    return;
                }
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

    /// Passes a mid-stream transport failure to the client as a body error: the stream ends
    /// without a clean end, as the upstream's did.
    async fn abort(&mut self, err: &BoxError) {
        if let Some(client) = self.client.take() {
            let _ = client.send(Err(err.to_string().into())).await;
        }
    }
}
