//! Splitting an SSE body into whole events (blocks ending in a blank line) as frames arrive,
//! so each event can be numbered and logged on its own.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Default)]
pub struct EventSplitter {
    buffer: BytesMut,
}

impl EventSplitter {
    /// The events `chunk` completes, each with its terminating blank line.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buffer) {
            events.push(self.buffer.split_to(end).freeze());
        }
        events
    }

    /// What is left when the body ends (an unterminated last event), if anything.
    pub fn finish(self) -> Option<Bytes> {
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
pub fn is_done(event: &[u8]) -> bool {
    event.split(|b| *b == b'\n').any(|line| super::sse::data(line) == Some(b"[DONE]"))
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
