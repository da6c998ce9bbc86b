//! The gateway's tool loop around the upstream: when the model's answer calls gateway tools,
//! they run (all at once, see [`crate::tools::call`]), their results are appended as `tool`
//! messages in call order, and the model is asked again, for up to `tool_loop.max_rounds`
//! rounds; the request after the last round carries `tool_choice: "none"`.
//!
//! - Non-streamed answers gain a `ctxgate` object: `tool_runs` (tool, timing, attempts,
//!   outcome) and `rounds`.
//! - Streamed answers flow live until the first tool-call delta; from there the [`Relay`] holds
//!   events until the round ends. A round that only called gateway tools never reaches the
//!   client, and keep-alive comments cover the time the tools run.
//! - An answer that also calls client tools: on a session, the gateway's calls run and are
//!   removed from what the client sees (their results are owed to the next turn, see
//!   [`crate::tools::record`]); without a session nothing runs and the answer passes through.
//!
//! Without gateway tools the loop is one round: the same code reads every answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::BodyExt;
use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::context::ChatContext;
use super::relay::{AnswerTooLarge, Limits, Relay, Rest, Round};
use crate::body::{self, Body};
use crate::compress::expand;
use crate::compress::marker::{self, EXPAND_TOOL};
use crate::error::GatewayError;
use crate::headers;
use crate::openai::answer::Answer;
use crate::openai::events::only_tool_calls;
use crate::openai::usage::TurnUsage;
use crate::openai::Usage;
use crate::openai::{request, ChatRequest};
use crate::telemetry::ToolOutcomeLabel;
use crate::tools::record::Expansion;
use crate::tools::tasks::TaskLog;
use crate::tools::{Call, Outcome as ToolOutcome, ToolRun};
use crate::upstream::UpstreamWait;
use crate::AppState;

/// What the loop did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) rounds: u32,
    pub(crate) runs: Vec<ToolRun>,
    /// Messages added before the final answer: each round's assistant message and results.
    pub(crate) added: Vec<Box<RawValue>>,
    /// The final answer: the model's message as it wrote it and its round's usage; `None` when
    /// the answer was cut short or was an error.
    pub(crate) answer: Option<Answer>,
    /// The final answer mixed gateway and client calls (sessions only).
    pub(crate) held: Option<Expansion>,
    /// What the turn's model calls used, summed (the session's totals count this).
    pub(crate) usage: Option<Usage>,
}

impl Outcome {
    /// The transcript the turn commits after `conversation`: the rounds' messages, then the
    /// final answer (for an answer that also called client tools: the whole answer and the
    /// gateway's results; the client got only its own calls, and the next turn restores the
    /// rest). `None` when there is no answer to commit.
    pub(crate) fn into_transcript(self, mut conversation: Vec<Box<RawValue>>) -> Option<Vec<Box<RawValue>>> {
        let answer = self.answer?;
        conversation.extend(self.added);
        match self.held {
            Some(held) => {
                conversation.push(held.full);
                conversation.extend(held.results);
            }
            None => conversation.push(answer.message),
        }
        Some(conversation)
    }
}

/// Where `ctxgate_expand` finds the originals markers name.
pub(crate) struct Originals<'a> {
    /// The turn's whole conversation (as the client sent it, or the session's transcript).
    pub(crate) messages: &'a [Box<RawValue>],
    /// The caller's scope in the store of originals, for those the conversation no longer
    /// carries.
    pub(crate) scope: String,
}

impl Originals<'_> {
    /// The answer to one `ctxgate_expand` call with `arguments`: the original its id names, or
    /// the passages of it a query asks for; and whether that original was found (counted in
    /// the tool metrics either way). Front ends other than this loop answer with it too.
    pub(crate) async fn answer(&self, app: &AppState, arguments: &str) -> (String, bool) {
        let id = serde_json::from_str::<Value>(arguments).ok().and_then(|v| {
            v.get("id").and_then(Value::as_str).map(|id| id.trim().trim_start_matches("id=").to_string())
        });
        let found = match id {
            Some(id) => self.find(app, &id).await.map(|m| (id, m)),
            None => None,
        };
        let max = app.compressor.config.expand_max_bytes;
        let content = expand::answer(arguments, max, |want| {
            found.as_ref().filter(|(id, _)| id == want).map(|(_, m)| m.clone())
        });
        let outcome = if found.is_some() { "ok" } else { "tool_error" };
        let label = ToolOutcomeLabel { tool: EXPAND_TOOL.to_string(), outcome };
        app.metrics.tools.calls.get_or_create(&label).inc();
        (content, found.is_some())
    }

    /// The original named `id`, from the conversation or else the store.
    async fn find(&self, app: &AppState, id: &str) -> Option<Box<RawValue>> {
        if let Some(found) = expand::resolve(self.messages, id) {
            return Some(found);
        }
        let mut stored = super::compression::stored_original(app, &self.scope, id).await?;
        match id.contains(marker::RUN) {
            true => Some(expand::joined(&stored)),
            false => stored.pop(),
        }
    }
}

/// The loop over one turn's rounds.
pub(crate) struct ToolLoop<'a> {
    app: &'a AppState,
    ctx: &'a ChatContext,
    /// The request as last sent upstream: each round appends to its messages.
    sent: Cow<'a, ChatRequest>,
    /// Whether to run gateway calls at all (a context with gateway tools).
    engaged: bool,
    /// On a session: an answer mixing gateway and client calls runs the gateway's.
    session: bool,
    /// Where tasks are recorded (on a session).
    tasks: Option<Arc<TaskLog>>,
    /// The request offers `ctxgate_expand`: its calls are the gateway's, answered from here.
    originals: Option<Originals<'a>>,
    pub(crate) outcome: Outcome,
    /// The rounds' `usage`, summed: the client gets the turn's, not the last call's.
    usage: TurnUsage,
}

/// What to do with a round's answer.
enum Step {
    /// The final answer: deliver it.
    Deliver,
    /// Run the gateway's calls; `client` are the positions of the client's own calls.
    Run { calls: Vec<Call>, client: Vec<(usize, String)> },
}

impl<'a> ToolLoop<'a> {
    pub(crate) fn new(
        app: &'a AppState,
        ctx: &'a ChatContext,
        sent: &'a ChatRequest,
        session: bool,
        tasks: Option<Arc<TaskLog>>,
    ) -> Self {
        let sent = Cow::Borrowed(sent);
        Self {
            app,
            ctx,
            sent,
            engaged: ctx.tools_engaged,
            session,
            tasks,
            originals: None,
            outcome: Outcome::default(),
            usage: TurnUsage::default(),
        }
    }

    /// Answers `ctxgate_expand` calls from `originals`.
    pub(crate) fn with_originals(mut self, originals: Option<Originals<'a>>) -> Self {
        self.originals = originals;
        self
    }

    /// Whether the gateway runs a call to `name` itself.
    fn runs(&self, name: &str) -> bool {
        self.app.tools.get(name).is_some() || (name == EXPAND_TOOL && self.originals.is_some())
    }

    /// What the loop did (its rounds are counted in the metrics when gateway tools were in play).
    pub(crate) fn finish(mut self) -> Outcome {
        if self.engaged {
            self.app.metrics.tools.rounds.observe(f64::from(self.outcome.rounds));
        }
        // The answer's own, when no round's usage could be summed (not a JSON object there).
        let last = self.outcome.answer.as_ref().and_then(|a| a.usage);
        self.outcome.usage = self.usage.total().or(last);
        self.outcome
    }

    fn decide(&self, message: &RawValue) -> Step {
        if !self.engaged || self.outcome.rounds >= self.app.tools.limits.max_rounds {
            return Step::Deliver;
        }
        let Ok(value) = serde_json::from_str::<Value>(message.get()) else { return Step::Deliver };
        let Some(calls) = value.get("tool_calls").and_then(Value::as_array) else { return Step::Deliver };
        let (mut gateway, mut client) = (Vec::new(), Vec::new());
        for (i, call) in calls.iter().enumerate() {
            let text = |pointer| call.pointer(pointer).and_then(Value::as_str).unwrap_or("").to_string();
            let call = Call {
                id: text("/id"),
                name: text("/function/name"),
                arguments: text("/function/arguments"),
            };
            if self.runs(&call.name) {
                gateway.push(call);
            } else {
                client.push((i, call.id));
            }
        }
        if gateway.is_empty() || (!client.is_empty() && !self.session) {
            return Step::Deliver;
        }
        Step::Run { calls: gateway, client }
    }

    /// Runs the gateway calls of a round; returns their `tool` messages in call order.
    async fn run_round(&mut self, calls: Vec<Call>) -> Vec<Box<RawValue>> {
        type Numbered = Vec<(usize, Call)>;
        let (expands, tools): (Numbered, Numbered) = calls
            .into_iter()
            .enumerate()
            .partition(|(_, c)| c.name == EXPAND_TOOL && self.originals.is_some());
        let order: Vec<usize> = tools.iter().map(|(i, _)| *i).collect();
        let mut outcomes: Vec<(usize, ToolOutcome)> = match tools.is_empty() {
            true => Vec::new(),
            false => {
                let ran = self
                    .app
                    .tools
                    .run_all(tools.into_iter().map(|(_, c)| c).collect(), self.tasks.clone())
                    .await;
                order.into_iter().zip(ran).collect()
            }
        };
        for (i, call) in expands {
            outcomes.push((i, self.expand(call).await));
        }
        outcomes.sort_by_key(|(i, _)| *i);
        self.outcome.rounds += 1;
        let messages = outcomes.iter().map(|(_, o)| o.message()).collect();
        self.outcome.runs.extend(outcomes.into_iter().map(|(_, o)| o.run));
        messages
    }

    /// Answers one `ctxgate_expand` call: the original its id names, or the passages of it a
    /// query asks for.
    async fn expand(&self, call: Call) -> ToolOutcome {
        let started = Instant::now();
        // Only a request that offers the tool gets here (see `runs`).
        let (content, found) = match &self.originals {
            Some(originals) => originals.answer(self.app, &call.arguments).await,
            None => (String::new(), false),
        };
        let outcome = if found { "ok" } else { "tool_error" };
        let run = ToolRun {
            tool: EXPAND_TOOL.to_string(),
            tool_call_id: call.id.clone(),
            started_after_ms: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            attempts: 1,
            outcome,
        };
        ToolOutcome { call, content, run }
    }

    /// Appends a round that only called gateway tools, and asks the model again.
    async fn next_round(
        &mut self,
        message: Box<RawValue>,
        results: Vec<Box<RawValue>>,
    ) -> Result<Response<Body>, GatewayError> {
        let mut messages = self.sent.messages().to_vec();
        messages.push(message.clone());
        messages.extend(results.iter().cloned());
        self.outcome.added.push(message);
        self.outcome.added.extend(results);
        self.sent = Cow::Owned(self.sent.with_messages(messages));
        let mut body = self.sent.body().clone();
        if self.outcome.rounds >= self.app.tools.limits.max_rounds {
            body = request::with_field(&body, "tool_choice", &raw(&json!("none")))?;
        }
        Ok(self.ctx.send(self.app, body).await?.into_response())
    }

    /// Reads a JSON answer, running rounds until the final one; returns the client's response.
    pub(crate) async fn json(&mut self, response: Response<Body>) -> Result<Response<Body>, GatewayError> {
        let mut response = self.json_rounds(response).await?;
        if self.outcome.rounds > 0 {
            response.headers_mut().insert(headers::TOOL_ROUNDS, HeaderValue::from(self.outcome.rounds));
        }
        Ok(response)
    }

    async fn json_rounds(&mut self, mut response: Response<Body>) -> Result<Response<Body>, GatewayError> {
        let mut relay = Relay::Json(Limits::of(&self.app.config.server));
        let upstream = self.upstream_name();
        // Time spent on others' work before the client's headers: every model call (to its
        // headers and its body) and every tool round. The overhead metric subtracts it.
        let mut waited = Duration::ZERO;
        loop {
            waited += response.extensions().get::<UpstreamWait>().map_or(Duration::ZERO, |w| w.0);
            let reading = Instant::now();
            let body = std::mem::replace(response.body_mut(), body::empty());
            let round = relay
                .read(body, false, &mut self.usage, &upstream)
                .await
                .map_err(|source| self.unreachable(source))?;
            waited += reading.elapsed();
            response.extensions_mut().insert(UpstreamWait(waited));
            let Round { answer, rest: Rest::Body(bytes) } = round else {
                return Err(GatewayError::Internal("a JSON round held stream events".into()));
            };
            let Some(answer) = answer else {
                *response.body_mut() = body::full(bytes);
                return Ok(response);
            };
            let (calls, client) = match self.decide(&answer.message) {
                Step::Deliver => {
                    let bytes =
                        if self.outcome.rounds > 0 { self.with_extension(&bytes, None) } else { bytes };
                    self.outcome.answer = Some(answer);
                    return Ok(replace_body(response, bytes));
                }
                Step::Run { calls, client } => (calls, client),
            };
            let running = Instant::now();
            let results = self.run_round(calls).await;
            waited += running.elapsed();
            if !client.is_empty() {
                response.extensions_mut().insert(UpstreamWait(waited));
                let visible = only_calls(&answer.message, &client);
                let bytes = self.with_extension(&bytes, Some(&visible));
                self.hold(answer, client, results);
                return Ok(replace_body(response, bytes));
            }
            response = self.next_round(answer.message, results).await?;
            if !response.status().is_success() {
                let own = response.extensions().get::<UpstreamWait>().map_or(Duration::ZERO, |w| w.0);
                response.extensions_mut().insert(UpstreamWait(waited + own));
                return Ok(response);
            }
        }
    }

    /// Relays a streamed answer, running rounds until the final one.
    pub(crate) async fn stream(&mut self, mut upstream: Body, relay: &mut Relay) {
        let keepalive = self.app.tools.limits.keepalive_interval;
        let name = self.upstream_name();
        loop {
            let Ok(round) = relay.read(upstream, self.engaged, &mut self.usage, &name).await else {
                // Cut mid-stream or too large: the client's body has ended with the error already.
                return;
            };
            let held = match round.rest {
                Rest::Held(held) => held,
                Rest::Body(bytes) => vec![bytes],
            };
            let Some(answer) = round.answer else {
                relay.flush(held).await;
                return;
            };
            let (calls, client) = match self.decide(&answer.message) {
                Step::Deliver => {
                    self.outcome.answer = Some(answer);
                    relay.flush(held).await;
                    return;
                }
                Step::Run { calls, client } => (calls, client),
            };
            let results = relay.keep_alive(keepalive, self.run_round(calls)).await;
            if !client.is_empty() {
                let positions: Vec<usize> = client.iter().map(|(i, _)| *i).collect();
                let visible = held.into_iter().map(|e| only_tool_calls(&e, &positions)).collect();
                self.hold(answer, client, results);
                relay.flush(visible).await;
                return;
            }
            if !self.continues(relay) {
                return;
            }
            let response = match self.next_round(answer.message, results).await {
                Ok(response) => response,
                Err(err) => return relay.fail_with(&err).await,
            };
            if !response.status().is_success() {
                // The upstream's own error, as one event (it is its error, not ctxgate's).
                let status = response.status();
                let bytes = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let event = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(error) => crate::openai::sse::data_event(&error.to_string()),
                    Err(_) => GatewayError::UpstreamStatus { upstream: name.clone(), status }.to_sse_event(),
                };
                return relay.fail(event).await;
            }
            upstream = response.into_body();
        }
    }

    /// Whether another round is worth asking for: a detached turn (a session) is read to its
    /// end for its commit; without a session a client that left wants nothing more.
    fn continues(&self, relay: &Relay) -> bool {
        self.session || !relay.client_gone()
    }

    fn hold(&mut self, answer: Answer, client: Vec<(usize, String)>, results: Vec<Box<RawValue>>) {
        self.outcome.held = Some(Expansion {
            client_call_ids: client.into_iter().map(|(_, id)| id).collect(),
            full: answer.message.clone(),
            results,
        });
        self.outcome.answer = Some(answer);
    }

    /// The route's first upstream, as errors name it.
    fn upstream_name(&self) -> String {
        self.ctx.route(self.app).first().map_or_else(String::new, |u| u.name.clone())
    }

    fn unreachable(&self, source: crate::body::BoxError) -> GatewayError {
        let upstream = self.upstream_name();
        match source.downcast::<AnswerTooLarge>() {
            Ok(too_large) => too_large.to_gateway_error(upstream),
            Err(source) => GatewayError::UpstreamUnreachable { upstream, source },
        }
    }

    /// The completion with the `ctxgate` object added and, when given, its first choice's
    /// message replaced.
    fn with_extension(&self, bytes: &Bytes, message: Option<&RawValue>) -> Bytes {
        let Ok(mut fields) = serde_json::from_slice::<IndexMap<String, Value>>(bytes) else {
            return bytes.clone();
        };
        if let Some(message) = message {
            if let (Some(slot), Ok(value)) = (
                fields.get_mut("choices").and_then(|c| c.get_mut(0)),
                serde_json::from_str::<Value>(message.get()),
            ) {
                slot["message"] = value;
            }
        }
        let report = json!({"rounds": self.outcome.rounds, "tool_runs": self.outcome.runs});
        fields.insert("ctxgate".into(), report);
        serde_json::to_vec(&fields).map(Bytes::from).unwrap_or_else(|_| bytes.clone())
    }
}

fn replace_body(mut response: Response<Body>, bytes: Bytes) -> Response<Body> {
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = body::full(bytes);
    response
}

/// The assistant message with only the client's calls (positions `keep`).
fn only_calls(message: &RawValue, keep: &[(usize, String)]) -> Box<RawValue> {
    let Ok(mut value) = serde_json::from_str::<IndexMap<String, Value>>(message.get()) else {
        return message.to_owned();
    };
    if let Some(Value::Array(calls)) = value.get_mut("tool_calls") {
        let kept: Vec<Value> = calls
            .drain(..)
            .enumerate()
            .filter(|(i, _)| keep.iter().any(|(k, _)| k == i))
            .map(|(_, c)| c)
            .collect();
        *calls = kept;
    }
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| message.to_owned())
}

fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}
