//! The assistant message of a response, rebuilt for a session's transcript: taken verbatim
//! from a JSON completion, or assembled from SSE deltas (content, refusal and tool-call
//! fragments by index) the way OpenAI's SDKs assemble them.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::sse::{self, LineSplitter};
use super::usage::Usage;

/// The answer to one request: the message to append, and the usage reported with it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub message: Box<RawValue>,
    pub usage: Option<Usage>,
}

#[derive(Debug)]
pub(crate) enum AnswerBuilder {
    Json(Vec<Bytes>),
    Sse(LineSplitter, Box<StreamState>),
}

#[derive(Debug, Default)]
pub(crate) struct StreamState {
    role: Option<String>,
    content: String,
    refusal: String,
    tool_calls: BTreeMap<u64, ToolCall>,
    usage: Option<Usage>,
    finished: bool,
}

#[derive(Debug, Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(borrow)]
    choices: Vec<ChoiceMessage<'a>>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChoiceMessage<'a> {
    #[serde(borrow)]
    message: &'a RawValue,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct Delta {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: u64,
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

impl AnswerBuilder {
    pub(crate) fn new(stream: bool) -> Self {
        if stream {
            Self::Sse(LineSplitter::default(), Box::default())
        } else {
            Self::Json(Vec::new())
        }
    }

    pub(crate) fn observe(&mut self, chunk: &Bytes) {
        match self {
            Self::Json(frames) => frames.push(chunk.clone()),
            Self::Sse(lines, state) => lines.feed(
                chunk,
                |_| true,
                |line| {
                    if let Some(data) = sse::data(line).filter(|d| !d.is_empty()) {
                        state.apply(data);
                    }
                },
            ),
        }
    }

    /// How much a streamed answer holds so far (its text and tool calls); a JSON one's frames
    /// are the caller's.
    pub(crate) fn assembled_bytes(&self) -> usize {
        match self {
            Self::Json(_) => 0,
            Self::Sse(_, state) => {
                state.content.len()
                    + state.refusal.len()
                    + state.tool_calls.values().map(|c| c.name.len() + c.arguments.len()).sum::<usize>()
            }
        }
    }

    /// The message, or `None` when the body held no answer (an error body, a cut stream).
    pub(crate) fn finish(self) -> Option<Answer> {
        match self {
            Self::Json(frames) => {
                // A body read whole is one frame: parsed where it lies, not copied.
                let body = match <[Bytes; 1]>::try_from(frames) {
                    Ok([body]) => body,
                    Err(frames) => Bytes::from(frames.concat()),
                };
                let completion: Completion<'_> = serde_json::from_slice(&body).ok()?;
                let message = completion.choices.first()?.message.to_owned();
                Some(Answer { message, usage: completion.usage })
            }
            Self::Sse(_, state) => state.finish(),
        }
    }
}

impl StreamState {
    fn apply(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.finished = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            return;
        };
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        // The transcript follows the first choice, as clients do with n = 1.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta;
            if let Some(role) = delta.role {
                self.role = Some(role);
            }
            self.content.push_str(delta.content.as_deref().unwrap_or(""));
            self.refusal.push_str(delta.refusal.as_deref().unwrap_or(""));
            for call in delta.tool_calls {
                let entry = self.tool_calls.entry(call.index).or_default();
                entry.id = entry.id.take().or(call.id);
                entry.kind = entry.kind.take().or(call.kind);
                if let Some(function) = call.function {
                    entry.name.push_str(function.name.as_deref().unwrap_or(""));
                    entry.arguments.push_str(function.arguments.as_deref().unwrap_or(""));
                }
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
        }
    }

    fn finish(self) -> Option<Answer> {
        if !self.finished {
            return None;
        }
        let mut message = Map::new();
        message.insert("role".into(), self.role.unwrap_or_else(|| "assistant".into()).into());
        let content = if self.content.is_empty() && !self.tool_calls.is_empty() {
            Value::Null
        } else {
            self.content.into()
        };
        message.insert("content".into(), content);
        if !self.refusal.is_empty() {
            message.insert("refusal".into(), self.refusal.into());
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<Value> = self
                .tool_calls
                .into_values()
                .map(|c| {
                    json!({
                        "id": c.id.unwrap_or_default(),
                        "type": c.kind.unwrap_or_else(|| "function".into()),
                        "function": {"name": c.name, "arguments": c.arguments},
                    })
                })
                .collect();
            message.insert("tool_calls".into(), calls.into());
        }
        let message = serde_json::value::to_raw_value(&Value::Object(message)).ok()?;
        Some(Answer { message, usage: self.usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(events: &[Value]) -> Bytes {
        let mut text = String::new();
        for e in events {
            text.push_str(&format!("data: {e}\n\n"));
        }
        text.push_str("data: [DONE]\n\n");
        Bytes::from(text)
    }

    #[test]
    fn json_completion_message_is_kept_verbatim() {
        let body = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi","z":1,"a":2},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let mut b = AnswerBuilder::new(false);
        b.observe(&Bytes::from_static(&body[..20]));
        b.observe(&Bytes::from_static(&body[20..]));
        let answer = b.finish().unwrap();
        assert_eq!(answer.message.get(), r#"{"role":"assistant","content":"hi","z":1,"a":2}"#);
        assert_eq!(answer.usage.unwrap().prompt_tokens, 3);
    }

    #[test]
    fn streamed_content_and_parallel_tool_calls_are_assembled() {
        let body = sse(&[
            json!({"choices":[{"index":0,"delta":{"role":"assistant","content":"Let me "}}]}),
            json!({"choices":[{"index":0,"delta":{"content":"check."}}]}),
            json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get","arguments":""}}]}}]}),
            json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"put","arguments":"{\"k\""}}]}}]}),
            json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}),
            json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":":1}"}}]}}]}),
            json!({"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}),
            json!({"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}),
        ]);
        for split in [1, 17, 100, body.len() - 3] {
            let mut b = AnswerBuilder::new(true);
            b.observe(&body.slice(..split));
            b.observe(&body.slice(split..));
            let answer = b.finish().unwrap();
            let message: Value = serde_json::from_str(answer.message.get()).unwrap();
            assert_eq!(message["content"], "Let me check.");
            assert_eq!(message["tool_calls"][0]["function"], json!({"name":"get","arguments":"{}"}));
            assert_eq!(message["tool_calls"][1]["id"], "call_b");
            assert_eq!(message["tool_calls"][1]["function"]["arguments"], "{\"k\":1}");
            assert_eq!(answer.usage.unwrap().completion_tokens, 4);
        }
    }

    #[test]
    fn a_cut_stream_has_no_answer() {
        let mut b = AnswerBuilder::new(true);
        b.observe(&Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\n",
        ));
        assert!(b.finish().is_none());
    }
}
