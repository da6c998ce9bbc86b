//! Whole SSE events of a chat stream: splitting a body into events (blocks ending in a blank
//! line) as frames arrive, so each can be numbered, logged or held on its own, and reading or
//! rewriting the tool-call deltas an event carries.

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use serde_json::{json, Value};

use super::sse;

/// Splits a stream into events. Each feed scans only the bytes not scanned before (plus the
/// three a split delimiter may have left behind), so a large event arriving in many frames
/// costs linear time, and an event growing past `max` bytes is an error, not a buffer.
#[derive(Debug)]
pub(crate) struct EventSplitter {
    buffer: BytesMut,
    /// How much of `buffer` holds no delimiter start (but a partial one at its end).
    scanned: usize,
    max: usize,
}

/// An SSE event longer than the splitter's limit.
#[derive(Debug, thiserror::Error)]
#[error("an SSE event is larger than {0} bytes")]
pub(crate) struct EventTooLarge(pub(crate) usize);

impl EventSplitter {
    /// A splitter refusing events longer than `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self { buffer: BytesMut::new(), scanned: 0, max }
    }

    /// The events `chunk` completes, each with its terminating blank line.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, EventTooLarge> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        loop {
            // A delimiter is at most 4 bytes: 3 of one may end the part already scanned.
            let from = self.scanned.saturating_sub(3);
            match event_end(&self.buffer[from..]) {
                Some(end) if from + end > self.max => return Err(EventTooLarge(self.max)),
                Some(end) => {
                    events.push(self.buffer.split_to(from + end).freeze());
                    self.scanned = 0;
                }
                None => {
                    self.scanned = self.buffer.len();
                    break;
                }
            }
        }
        if self.buffer.len() > self.max {
            return Err(EventTooLarge(self.max));
        }
        Ok(events)
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
            let mut splitter = EventSplitter::new(1024);
            let mut events = splitter.feed(&text[..split]).unwrap();
            events.extend(splitter.feed(&text[split..]).unwrap());
            assert_eq!(events.len(), 3, "split at {split}");
            assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
            assert!(is_done(&events[2]));
            assert!(!is_done(&events[0]));
            assert!(splitter.finish().is_none());
        }
    }

    #[test]
    fn crlf_delimiters_split_across_frames_are_found() {
        let text = b"data: a\r\n\r\ndata: b\n\n";
        for split in 0..text.len() {
            for second in split..text.len() {
                let mut splitter = EventSplitter::new(1024);
                let mut events = splitter.feed(&text[..split]).unwrap();
                events.extend(splitter.feed(&text[split..second]).unwrap());
                events.extend(splitter.feed(&text[second..]).unwrap());
                assert_eq!(events.len(), 2, "splits at {split}, {second}");
                assert_eq!(&events[0][..], b"data: a\r\n\r\n");
            }
        }
    }

    #[test]
    fn an_event_over_the_limit_is_an_error_complete_or_not() {
        let mut splitter = EventSplitter::new(16);
        assert!(splitter.feed(b"data: short\n\n").unwrap().len() == 1);
        assert!(splitter.feed(b"data: 0123456789").is_ok());
        assert!(splitter.feed(b"abcdef").is_err());
        let mut splitter = EventSplitter::new(16);
        assert!(splitter.feed(b"data: 0123456789abcdef\n\n").is_err());
    }

    #[test]
    fn a_large_event_in_small_frames_is_split_in_linear_time() {
        // 8 MiB in 1 KiB frames: rescanning from the start each frame would scan ~32 GiB.
        let frame = vec![b'x'; 1024];
        let mut splitter = EventSplitter::new(16 * 1024 * 1024);
        splitter.feed(b"data: ").unwrap();
        let started = std::time::Instant::now();
        for _ in 0..8 * 1024 {
            assert!(splitter.feed(&frame).unwrap().is_empty());
        }
        let events = splitter.feed(b"\n\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].len(), 6 + 8 * 1024 * 1024 + 2);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
