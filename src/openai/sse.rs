//! Server-sent events on the wire: splitting a body into lines as frames arrive (carrying a
//! partial line between frames), and writing the events ctxgate adds itself.

use bytes::{Bytes, BytesMut};

/// Longest line kept; a longer one is dropped (it cannot be a chunk ctxgate needs to read).
const MAX_LINE: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: BytesMut,
    overflowed: bool,
}

impl LineSplitter {
    /// Calls `line` for every complete line in `chunk` (without its `\n`), in order.
    /// `interesting` filters cheaply: a frame's whole lines are only visited when it returns
    /// true for them (it may be called on several lines at once).
    pub fn feed(&mut self, chunk: &[u8], interesting: impl Fn(&[u8]) -> bool, mut line: impl FnMut(&[u8])) {
        let mut rest = chunk;
        if !self.partial.is_empty() || self.overflowed {
            match memchr::memchr(b'\n', rest) {
                Some(nl) => {
                    if !self.overflowed {
                        self.partial.extend_from_slice(&rest[..nl]);
                        if interesting(&self.partial) {
                            line(&self.partial);
                        }
                    }
                    self.partial.clear();
                    self.overflowed = false;
                    rest = &rest[nl + 1..];
                }
                None => {
                    self.keep(rest);
                    return;
                }
            }
        }
        let (whole, tail) = match memchr::memrchr(b'\n', rest) {
            Some(nl) => (&rest[..nl], &rest[nl + 1..]),
            None => (&rest[..0], rest),
        };
        if !whole.is_empty() && interesting(whole) {
            whole.split(|b| *b == b'\n').for_each(&mut line);
        }
        self.keep(tail);
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.partial.clear();
            self.overflowed = true;
        } else if !self.overflowed {
            self.partial.extend_from_slice(bytes);
        }
    }
}

/// The payload of a `data:` line, trimmed.
pub(crate) fn data(line: &[u8]) -> Option<&[u8]> {
    line.strip_prefix(b"data:").map(<[u8]>::trim_ascii)
}

/// `id: TURN-SEQ` followed by the event as the upstream sent it.
pub(crate) fn with_id(turn: u64, seq: u64, event: &[u8]) -> Bytes {
    use std::fmt::Write;
    let mut out = BytesMut::with_capacity(event.len() + 48);
    // Writing into a BytesMut cannot fail.
    let _ = writeln!(out, "id: {turn}-{seq}");
    out.extend_from_slice(event);
    out.freeze()
}

/// One `data:` event carrying `json`.
pub(crate) fn data_event(json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// A comment line, which clients ignore: a keep-alive.
pub(crate) fn comment(text: &'static str) -> Bytes {
    Bytes::from(format!(": {text}\n\n"))
}

/// The end of an OpenAI stream.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_reassembled_across_any_split() {
        let text = b"data: one\n\ndata: two\r\ndata: three\n\n";
        for split in 0..text.len() {
            let mut splitter = LineSplitter::default();
            let mut seen = Vec::new();
            for part in [&text[..split], &text[split..]] {
                splitter.feed(
                    part,
                    |_| true,
                    |l| {
                        if let Some(d) = data(l) {
                            seen.push(String::from_utf8(d.to_vec()).unwrap());
                        }
                    },
                );
            }
            assert_eq!(seen, ["one", "two", "three"], "split at {split}");
        }
    }
}
