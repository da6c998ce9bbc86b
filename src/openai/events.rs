//! Whole SSE events of a chat stream: splitting a body into events (blocks ending in a blank
//! line) as frames arrive, so each can be numbered, logged or held on its own, and reading or
//! rewriting the tool-call deltas an event carries.

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use serde_json::{json, Value};

use super::sse;

#[derive(Debug, Default)]
pub(crate) struct EventSplitter {
    buffer: BytesMut,
}

impl EventSplitter {
    /// The events `chunk` completes, each with its terminating blank line.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buffer) {
            events.push(self.buffer.split_to(end).freeze());
        }
        events
    }

    /// What is left when the body ends (an unterminated last event), if anything.
    pub(crate) fn finish(self) -> Option<Bytes> {
        (!self.buffer.is_empty()).then(|| self.buffer.freeze())
    }
}

/// The end (exclusive) of the first complete event: after `\n\n` or `\r\n\r\n`.
fn event_end(buffer: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buffer, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buffer, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether an event is the stream's `data: [DONE]`.
pub(crate) fn is_done(event: &[u8]) -> bool {
    event.split(|b| *b == b'\n').any(|line| super::sse::data(line) == Some(b"[DONE]"))
}

/// Whether an event carries a tool-call delta (a non-null `delta.tool_calls`).
pub(crate) fn has_tool_call_delta(event: &[u8]) -> bool {
    memchr::memmem::find(event, b"\"tool_calls\"").is_some()
        && event.split(|b| *b == b'\n').filter_map(sse::data).any(|data| {
            serde_json::from_slice::<Value>(data).is_ok_and(|v| {
                v.get("choices").and_then(Value::as_array).is_some_and(|choices| {
                    choices.iter().any(|c| c.pointer("/delta/tool_calls").is_some_and(|t| !t.is_null()))
                })
            })
        })
}

/// The event with only the tool-call deltas at positions `keep`, renumbered from 0 as a client
/// that sees only those calls expects. Events without tool-call deltas are returned as they are.
pub(crate) fn only_tool_calls(event: &Bytes, keep: &[usize]) -> Bytes {
    if !has_tool_call_delta(event) {
        return event.clone();
    }
    let mut out = BytesMut::new();
    for line in event.split(|b| *b == b'\n') {
        let Some(data) = sse::data(line) else { continue };
        let Ok(mut value) = serde_json::from_slice::<IndexMap<String, Value>>(data) else { continue };
        if let Some(Value::Array(choices)) = value.get_mut("choices") {
            for choice in choices {
                if let Some(Value::Array(calls)) = choice.pointer_mut("/delta/tool_calls") {
                    let kept: Vec<Value> = calls
                        .drain(..)
                        .filter_map(|mut call| {
                            let index = call.get("index").and_then(Value::as_u64)? as usize;
                            let position = keep.iter().position(|&k| k == index)?;
                            call["index"] = json!(position);
                            Some(call)
                        })
                        .collect();
                    *calls = kept;
                }
            }
        }
        if let Ok(text) = serde_json::to_string(&value) {
            out.extend_from_slice(&sse::data_event(&text));
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_whole_at_any_split() {
        let text = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut splitter = EventSplitter::default();
            let mut events = splitter.feed(&text[..split]);
            events.extend(splitter.feed(&text[split..]));
            assert_eq!(events.len(), 3, "split at {split}");
            assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
            assert!(is_done(&events[2]));
            assert!(!is_done(&events[0]));
            assert!(splitter.finish().is_none());
        }
    }
}
