//! The gateway's own tool calls on an upstream with the Responses API: its HTTP and MCP tools
//! (the injected ones offered after the client's own, in the flat Responses shape) and
//! `ctxgate_expand` (offered last when compression left markers, fixed bytes). The calls the
//! model makes to them are answered here, in rounds, as the chat pipeline's tool loop answers
//! them over a chat upstream: a round that only calls the gateway's tools is sent again with
//! its items and the results as `function_call_output` items. The client never sees those
//! calls: it gets the items of every round but the hidden calls (and the reasoning that led to
//! them), numbered as one response, with the rounds' usage summed.
//!
//! A round that also calls the client's own tools ends the loop (the gateway's calls dropped
//! from what the client sees): the client answers its calls. After `tool_loop.max_rounds`
//! rounds the last one is asked with `tool_choice: "none"`. Each round is charged to the
//! caller's tokens per minute, as the first request was.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::body::{Body, FrameSender};
use crate::chat::tool_loop::Originals;
use crate::compress::expand;
use crate::compress::marker::EXPAND_TOOL;
use crate::error::GatewayError;
use crate::openai::events::EventSplitter;
use crate::openai::sse;
use crate::tools::tasks::TaskLog;
use crate::tools::Call;
use crate::upstream::{Outgoing, OutgoingBody, UsageSink};
use crate::AppState;

/// `ctxgate_expand` as the Responses API takes it.
pub(super) fn definition() -> Value {
    flat(&expand::definition())
}

/// A chat tool definition in the Responses API's flat shape.
pub(super) fn flat(chat: &RawValue) -> Value {
    let chat: Value = serde_json::from_str(chat.get()).unwrap_or(Value::Null);
    let mut tool = chat["function"].clone();
    tool["type"] = json!("function");
    tool
}

/// One request's rounds: what was sent, and where the originals are.
pub(super) struct Rounds {
    pub(super) app: Arc<AppState>,
    /// The request as sent upstream (its `input` the compressed items).
    pub(super) fields: Map<String, Value>,
    /// Headers for the next rounds (the client's, as sent).
    pub(super) headers: HeaderMap,
    /// With `ctxgate_expand` offered: the conversation as the compressor read it, for originals
    /// it still carries.
    pub(super) originals: Option<Vec<Box<RawValue>>>,
    pub(super) scope: String,
    /// Who asked (with gateway keys): each round is charged to its tokens per minute, as the
    /// first request was.
    pub(super) caller: Option<Caller>,
    /// On a session: where the gateway's tool tasks are recorded, so a turn re-issued after
    /// its process died finds a durable task and finishes it instead of starting it again.
    pub(super) tasks: Option<Arc<TaskLog>>,
}

/// What one round's answer asks for.
#[derive(Default)]
struct Round {
    /// Every output item, in order (the next round's input needs them all).
    items: Vec<Value>,
    /// The gateway's calls, in order.
    calls: Vec<Call>,
    /// The round also called a client tool.
    client_calls: bool,
}

impl Round {
    fn read(output: &[Value], runs: impl Fn(&str) -> bool) -> Self {
        let mut round = Round { items: output.to_vec(), ..Round::default() };
        for item in output {
            match (item["type"].as_str(), item["name"].as_str()) {
                (Some("function_call"), Some(name)) if runs(name) => round.calls.push(Call {
                    id: item["call_id"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                    arguments: item["arguments"].as_str().unwrap_or_default().to_string(),
                }),
                (Some("function_call" | "custom_tool_call"), _) => round.client_calls = true,
                _ => {}
            }
        }
        round
    }

    /// Whether the model is to be asked again with the gateway's results.
    fn continues(&self) -> bool {
        !self.calls.is_empty() && !self.client_calls
    }
}

/// Whether `items[at]` is hidden from the client: a call to the gateway's tools, or reasoning
/// that led to one.
fn hidden(items: &[Value], at: usize, runs: &impl Fn(&str) -> bool) -> bool {
    let is_call = |item: &Value| item["type"] == "function_call" && item["name"].as_str().is_some_and(runs);
    match items[at]["type"].as_str() {
        Some("reasoning") => items[at + 1..].iter().find(|i| i["type"] != "reasoning").is_some_and(is_call),
        _ => is_call(&items[at]),
    }
}

impl Rounds {
    /// Whether a call to `name` is the gateway's to answer.
    fn runs(&self, name: &str) -> bool {
        self.app.tools.get(name).is_some() || (name == EXPAND_TOOL && self.originals.is_some())
    }

    fn visible<'a>(&self, items: &'a [Value]) -> Vec<&'a Value> {
        let runs = |name: &str| self.runs(name);
        (0..items.len()).filter(|&at| !hidden(items, at, &runs)).map(|at| &items[at]).collect()
    }

    /// The results of a round's calls, in call order: the gateway's tools run together (with
    /// their deadlines, retries and limits), `ctxgate_expand` from the originals.
    async fn results(&self, calls: &[Call]) -> Vec<Value> {
        let tools: Vec<Call> = calls.iter().filter(|c| c.name != EXPAND_TOOL).cloned().collect();
        let mut ran = self.app.tools.run_all(tools, self.tasks.clone()).await.into_iter();
        let mut out = Vec::with_capacity(calls.len());
        for call in calls {
            let output = match (call.name == EXPAND_TOOL, &self.originals) {
                (true, Some(messages)) => {
                    let originals = Originals { messages, scope: self.scope.clone() };
                    originals.answer(&self.app, &call.arguments).await.0
                }
                _ => ran.next().map(|outcome| outcome.content).unwrap_or_default(),
            };
            out.push(json!({"type": "function_call_output", "call_id": call.id, "output": output}));
        }
        out
    }

    /// Sends the next round: what was sent, the round's items and its calls' results.
    /// `last`: asked with `tool_choice: "none"`.
    async fn next(&mut self, round: &Round, last: bool) -> Result<Body, GatewayError> {
        let outputs = self.results(&round.calls).await;
        if let Some(Value::Array(input)) = self.fields.get_mut("input") {
            input.extend(round.items.iter().cloned());
            input.extend(outputs);
        }
        if last {
            self.fields.insert("tool_choice".into(), json!("none"));
        }
        let model = self.fields.get("model").and_then(Value::as_str).map(str::to_string);
        let body = serde_json::to_vec(&self.fields).map_err(|e| GatewayError::Internal(e.into()))?;
        let charge = match &model {
            Some(model) => {
                let counter = self.app.compressor.counter_for(model);
                let estimate = || u64::from(counter.text(&String::from_utf8_lossy(&body)));
                self.app.auth.charge(self.caller.as_ref(), model, estimate).await?
            }
            None => None,
        };
        let outgoing = Outgoing {
            method: Method::POST,
            path_and_query: "/v1/responses".into(),
            headers: self.headers.clone(),
            body: OutgoingBody::Replayable(Bytes::from(body)),
            affinity: None,
        };
        let route = self.app.upstreams.router.route(model.as_deref());
        let mut forwarded = self.app.upstreams.forward(route, outgoing).await?;
        if let Some(charge) = charge {
            forwarded.usage_sink = UsageSink::default().with(Arc::new(charge));
        }
        let response = forwarded.into_response();
        if !response.status().is_success() {
            return Err(GatewayError::Internal(
                format!("the upstream answered {} to a gateway tool round", response.status()).into(),
            ));
        }
        Ok(response.into_body())
    }

    fn last_round(&self, rounds: u32) -> bool {
        rounds + 1 >= self.app.tools.limits.max_rounds
    }

    /// The final Response object of a JSON answer, the gateway's rounds run.
    pub(super) async fn json(mut self, first: Value) -> Result<Value, GatewayError> {
        let limit = self.app.config.server.max_answer_bytes.get();
        let mut object = first;
        let mut shown: Vec<Value> = Vec::new();
        let mut usage = Usage::default();
        let mut rounds = 0;
        loop {
            usage.add(&object["usage"]);
            let output = object["output"].as_array().cloned().unwrap_or_default();
            let round = Round::read(&output, |name| self.runs(name));
            shown.extend(self.visible(&output).into_iter().cloned());
            if !round.continues() || rounds >= self.app.tools.limits.max_rounds {
                break;
            }
            let last = self.last_round(rounds);
            let body = self.next(&round, last).await?;
            let bytes = super::collect(body, limit).await?;
            object = serde_json::from_slice(&bytes).map_err(|e| {
                GatewayError::Internal(format!("a gateway tool round's answer is not JSON: {e}").into())
            })?;
            rounds += 1;
        }
        self.count(rounds);
        object["output"] = Value::Array(shown);
        usage.put(&mut object["usage"]);
        Ok(object)
    }

    /// Relays a stream's events to `client`, running the gateway's rounds in between: one response's
    /// events, numbered from 0, ending with its `response.completed`.
    pub(super) async fn stream(mut self, first: Body, client: FrameSender) {
        let mut out = Relay { client: Some(client), sequence: 0, shown: Vec::new(), usage: Usage::default() };
        let mut body = first;
        let mut rounds = 0;
        loop {
            let finished = match out.round(&self, body, rounds).await {
                Some(finished) => finished,
                None => break,
            };
            let output = finished["response"]["output"].as_array().map(Vec::as_slice).unwrap_or_default();
            let round = Round::read(output, |name| self.runs(name));
            if !round.continues() || rounds >= self.app.tools.limits.max_rounds {
                out.finish(finished).await;
                break;
            }
            out.usage.add(&finished["response"]["usage"]);
            let last = self.last_round(rounds);
            body = match self.next(&round, last).await {
                Ok(body) => body,
                Err(err) => {
                    out.fail(&err).await;
                    break;
                }
            };
            rounds += 1;
        }
        self.count(rounds);
    }

    fn count(&self, rounds: u32) {
        if rounds > 0 {
            self.app.metrics.tools.rounds.observe(f64::from(rounds));
        }
    }
}

/// The rounds' `usage`, summed.
#[derive(Default)]
struct Usage {
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
}

impl Usage {
    fn add(&mut self, usage: &Value) {
        let n = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
        self.input += n("/input_tokens");
        self.cached += n("/input_tokens_details/cached_tokens");
        self.output += n("/output_tokens");
        self.reasoning += n("/output_tokens_details/reasoning_tokens");
    }

    fn put(&self, usage: &mut Value) {
        if !usage.is_object() {
            return;
        }
        usage["input_tokens"] = json!(self.input);
        usage["output_tokens"] = json!(self.output);
        usage["total_tokens"] = json!(self.input + self.output);
        if usage.get("input_tokens_details").is_some() {
            usage["input_tokens_details"]["cached_tokens"] = json!(self.cached);
        }
        if usage.get("output_tokens_details").is_some() {
            usage["output_tokens_details"]["reasoning_tokens"] = json!(self.reasoning);
        }
    }
}

/// The client's side of a streamed answer over its rounds.
struct Relay {
    client: Option<FrameSender>,
    /// The next `sequence_number` the client sees.
    sequence: u64,
    /// The items the client has been shown, over every round.
    shown: Vec<Value>,
    usage: Usage,
}

/// What an item of a round's stream is to the client.
enum Slot {
    /// Shown at this output index.
    Shown(u64),
    /// Reasoning held until the item after it shows whether it led to an expand call.
    Held(Vec<Value>),
    Hidden,
}

impl Relay {
    /// Relays one round's events; returns its finished Response object (not sent), or `None`
    /// when the stream ended otherwise (its last events sent as they came).
    async fn round(&mut self, owner: &Rounds, mut body: Body, rounds: u32) -> Option<Value> {
        let mut splitter = EventSplitter::new(owner.app.config.server.max_sse_event_bytes.get());
        let mut slots: HashMap<u64, Slot> = HashMap::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else { continue };
            let Ok(events) = splitter.feed(&data) else {
                self.fail(&GatewayError::Internal("an event of a gateway tool round is too large".into()))
                    .await;
                return None;
            };
            for event in events {
                let parsed = event
                    .split(|b| *b == b'\n')
                    .find_map(sse::data)
                    .and_then(|data| serde_json::from_slice::<Value>(data).ok());
                let Some(mut event_json) = parsed else {
                    // A comment or a line the gateway does not read: passed on as it came.
                    self.send_raw(event).await;
                    continue;
                };
                let kind = event_json["type"].as_str().unwrap_or_default().to_string();
                match kind.as_str() {
                    "response.created" | "response.in_progress" if rounds > 0 => {}
                    "response.completed" | "response.incomplete" => {
                        self.flush_held(&mut slots).await;
                        return Some(event_json);
                    }
                    "response.output_item.added" => {
                        let index = event_json["output_index"].as_u64().unwrap_or(0);
                        let item = &event_json["item"];
                        if item["type"] == "function_call"
                            && item["name"].as_str().is_some_and(|n| owner.runs(n))
                        {
                            // The reasoning held so far led here: hidden with it.
                            slots
                                .values_mut()
                                .filter(|s| matches!(s, Slot::Held(_)))
                                .for_each(|s| *s = Slot::Hidden);
                            slots.insert(index, Slot::Hidden);
                        } else if item["type"] == "reasoning" {
                            slots.insert(index, Slot::Held(vec![event_json]));
                        } else {
                            self.flush_held(&mut slots).await;
                            let shown = self.next_index(&slots);
                            slots.insert(index, Slot::Shown(shown));
                            self.send(&mut event_json, Some(shown)).await;
                        }
                    }
                    _ => match event_json["output_index"].as_u64().and_then(|i| slots.get_mut(&i)) {
                        Some(Slot::Hidden) => {}
                        Some(Slot::Held(events)) => events.push(event_json),
                        Some(Slot::Shown(shown)) => {
                            let shown = *shown;
                            if kind == "response.output_item.done" {
                                self.shown.push(event_json["item"].clone());
                            }
                            self.send(&mut event_json, Some(shown)).await;
                        }
                        None => self.send(&mut event_json, None).await,
                    },
                }
            }
        }
        None
    }

    /// The client's next output index: one past the items shown and those being shown.
    fn next_index(&self, slots: &HashMap<u64, Slot>) -> u64 {
        let open = slots
            .values()
            .filter_map(|s| match s {
                Slot::Shown(i) => Some(*i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        open.max(self.shown.len() as u64)
    }

    /// Shows held reasoning (what followed it was not an expand call).
    async fn flush_held(&mut self, slots: &mut HashMap<u64, Slot>) {
        let mut held: Vec<(u64, Vec<Value>)> = slots
            .iter_mut()
            .filter_map(|(i, s)| match std::mem::replace(s, Slot::Hidden) {
                Slot::Held(events) => Some((*i, events)),
                other => {
                    *s = other;
                    None
                }
            })
            .collect();
        held.sort_by_key(|(i, _)| *i);
        for (index, events) in held {
            let shown = self.next_index(slots);
            slots.insert(index, Slot::Shown(shown));
            for mut event in events {
                if event["type"] == "response.output_item.done" {
                    self.shown.push(event["item"].clone());
                }
                self.send(&mut event, Some(shown)).await;
            }
        }
    }

    /// Sends the final `response.completed` with every round's shown items and usage.
    async fn finish(&mut self, mut finished: Value) {
        self.usage.add(&finished["response"]["usage"]);
        finished["response"]["output"] = Value::Array(std::mem::take(&mut self.shown));
        let mut usage = finished["response"]["usage"].take();
        self.usage.put(&mut usage);
        finished["response"]["usage"] = usage;
        self.send(&mut finished, None).await;
    }

    async fn fail(&mut self, err: &GatewayError) {
        let mut event =
            json!({"type": "error", "code": "upstream_error", "message": err.to_string(), "param": null});
        self.send(&mut event, None).await;
    }

    /// Numbers `event` (and places it at `index`) and sends it.
    async fn send(&mut self, event: &mut Value, index: Option<u64>) {
        if let Some(index) = index {
            event["output_index"] = json!(index);
        }
        if event.get("sequence_number").is_some()
            || event["type"].as_str().is_some_and(|t| t.starts_with("response."))
        {
            event["sequence_number"] = json!(self.sequence);
            self.sequence += 1;
        }
        let kind = event["type"].as_str().unwrap_or("message").to_string();
        self.send_raw(Bytes::from(format!("event: {kind}\ndata: {event}\n\n"))).await;
    }

    async fn send_raw(&mut self, event: Bytes) {
        super::send(&mut self.client, vec![event]).await;
    }
}

/// The headers the next rounds go with: the first request's, unencoded, without a length.
pub(super) fn round_headers(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_ENCODING);
    headers
}
