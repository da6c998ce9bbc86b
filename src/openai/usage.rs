//! The `usage` object of chat and embeddings responses, and [`UsageScanner`], which finds it in
//! a body as the body streams past without holding the stream back.
//!
//! For SSE the scanner looks at each `data:` line that mentions `"usage"` (the last chunk when
//! `stream_options.include_usage` is set); for JSON it keeps cheap `Bytes` handles and parses
//! once at the end. Anything it cannot parse is ignored: usage is for metrics only.

use bytes::Bytes;
use serde::Deserialize;

use super::sse::{self, LineSplitter};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

impl Usage {
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

/// Told the `usage` of a response when its body ends.
pub trait UsageObserver: Send + Sync + std::fmt::Debug {
    fn record(&self, usage: &Usage);
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<Usage>,
}

/// Largest JSON body or SSE line the scanner keeps for parsing; beyond it usage is skipped.
const MAX_KEPT: usize = 4 * 1024 * 1024;
const NEEDLE: &[u8] = b"\"usage\"";

#[derive(Debug)]
pub enum UsageScanner {
    /// `text/event-stream`: lines mentioning `"usage"` are parsed.
    Sse {
        lines: LineSplitter,
        found: Option<Usage>,
    },
    /// `application/json`: the frames so far, parsed at the end.
    Json {
        frames: Vec<Bytes>,
        len: usize,
    },
    Off,
}

impl UsageScanner {
    /// A scanner for a response with this content type and encoding; `Off` for compressed or
    /// other bodies.
    pub fn for_response(content_type: Option<&str>, content_encoding: bool) -> Self {
        if content_encoding {
            return Self::Off;
        }
        match content_type {
            Some(ct) if ct.starts_with("text/event-stream") => {
                Self::Sse { lines: LineSplitter::default(), found: None }
            }
            Some(ct) if ct.starts_with("application/json") => Self::Json { frames: Vec::new(), len: 0 },
            _ => Self::Off,
        }
    }

    pub fn observe(&mut self, chunk: &Bytes) {
        match self {
            Self::Off => {}
            Self::Json { frames, len } => {
                *len += chunk.len();
                if *len > MAX_KEPT {
                    *self = Self::Off;
                } else {
                    frames.push(chunk.clone());
                }
            }
            Self::Sse { lines, found } => {
                lines.feed(chunk, has_usage_object, |line| {
                    let Some(data) = sse::data(line).filter(|d| has_usage_object(d)) else {
                        return;
                    };
                    if let Ok(Envelope { usage: Some(usage) }) = serde_json::from_slice::<Envelope>(data) {
                        *found = Some(usage);
                    }
                });
            }
        }
    }

    /// The usage seen, once the body has ended.
    pub fn finish(self) -> Option<Usage> {
        match self {
            Self::Off => None,
            Self::Sse { found, .. } => found,
            Self::Json { frames, .. } => parse_json_usage(&frames),
        }
    }
}

/// Whether `bytes` holds `"usage"` followed by an object. OpenAI sends `"usage":null` on every
/// chunk of a stream with `include_usage`; skipping those without parsing keeps the scan cheap.
fn has_usage_object(bytes: &[u8]) -> bool {
    memchr::memmem::find_iter(bytes, NEEDLE).any(|at| {
        let rest = &bytes[at + NEEDLE.len()..];
        let rest = rest.trim_ascii_start().strip_prefix(b":").unwrap_or(rest);
        rest.trim_ascii_start().first() == Some(&b'{')
    })
}

/// The `usage` of a JSON body held as frames.
pub(super) fn parse_json_usage(frames: &[Bytes]) -> Option<Usage> {
    let parsed = if let [single] = frames {
        serde_json::from_slice::<Envelope>(single)
    } else {
        serde_json::from_slice::<Envelope>(&frames.concat())
    };
    parsed.ok().and_then(|e| e.usage)
}

/// The `usage` of a turn that made several model calls (a tool loop's rounds): every call's
/// usage object added field by field (each number, and nested objects such as
/// `prompt_tokens_details` likewise), so the client is told what the whole turn used, not what
/// its last call did. Each round's answer is passed through [`Self::json`] or, event by event,
/// [`Self::event`] and then [`Self::end_round`]; a usage object it carries is rewritten to the
/// sum of the rounds before and its own.
#[derive(Debug, Default)]
pub(crate) struct TurnUsage {
    /// The rounds read so far, summed.
    sum: Option<serde_json::Map<String, serde_json::Value>>,
    /// The round being read.
    own: Option<serde_json::Map<String, serde_json::Value>>,
}

impl TurnUsage {
    /// A JSON completion (a whole round): rewritten when earlier rounds used tokens.
    pub(crate) fn json(&mut self, body: &Bytes) -> Bytes {
        let out = self.rewrite(body).map_or_else(|| body.clone(), Bytes::from);
        self.end_round();
        out
    }

    /// One SSE event of the round being read: its `data:` rewritten when it carries a usage
    /// object and earlier rounds used tokens.
    pub(crate) fn event(&mut self, event: &Bytes) -> Bytes {
        if !has_usage_object(event) {
            return event.clone();
        }
        let mut out = bytes::BytesMut::with_capacity(event.len() + 64);
        let mut rewritten = false;
        for line in event.split_inclusive(|b| *b == b'\n') {
            match sse::data(line).and_then(|data| self.rewrite(data)) {
                Some(json) => {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&json);
                    out.extend_from_slice(b"\n");
                    rewritten = true;
                }
                None => out.extend_from_slice(line),
            }
        }
        if rewritten {
            out.freeze()
        } else {
            event.clone()
        }
    }

    /// Adds the round just read to the sum.
    pub(crate) fn end_round(&mut self) {
        if let Some(own) = self.own.take() {
            add(self.sum.get_or_insert_with(Default::default), &own);
        }
    }

    /// The turn's usage so far, in the fields ctxgate counts.
    pub(crate) fn total(&self) -> Option<Usage> {
        let sum = self.sum.as_ref()?;
        serde_json::from_value(serde_json::Value::Object(sum.clone())).ok()
    }

    /// `doc` (a completion or a chunk) with its usage object replaced by the earlier rounds'
    /// sum plus its own (kept as this round's); `None` when nothing changes.
    fn rewrite(&mut self, doc: &[u8]) -> Option<Vec<u8>> {
        if !has_usage_object(doc) {
            return None;
        }
        let mut fields: indexmap::IndexMap<String, serde_json::Value> = serde_json::from_slice(doc).ok()?;
        let serde_json::Value::Object(own) = fields.get("usage")? else { return None };
        self.own = Some(own.clone());
        let mut total = self.sum.clone()?;
        add(&mut total, own);
        fields.insert("usage".into(), serde_json::Value::Object(total));
        serde_json::to_vec(&fields).ok()
    }
}

/// Adds `from`'s numbers into `into`, recursively; fields `into` lacks are taken as they are.
fn add(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: &serde_json::Map<String, serde_json::Value>,
) {
    use serde_json::Value;
    for (key, value) in from {
        if !into.contains_key(key) {
            into.insert(key.clone(), value.clone());
            continue;
        }
        match (into.get_mut(key), value) {
            (Some(Value::Number(a)), Value::Number(b)) => {
                let sum = match (a.as_u64(), b.as_u64()) {
                    (Some(a), Some(b)) => serde_json::Number::from(a.saturating_add(b)),
                    _ => match serde_json::Number::from_f64(
                        a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0),
                    ) {
                        Some(sum) => sum,
                        None => continue,
                    },
                };
                *a = sum;
            }
            (Some(Value::Object(a)), Value::Object(b)) => add(a, b),
            (Some(slot), value) if slot.is_null() => *slot = value.clone(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = r#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}"#;

    fn expected() -> Usage {
        Usage {
            prompt_tokens: 12,
            completion_tokens: 5,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 4 }),
        }
    }

    #[test]
    fn finds_usage_in_a_json_body_split_across_frames() {
        let body = format!(r#"{{"id":"x","choices":[],"usage":{USAGE}}}"#);
        let mut scanner = UsageScanner::for_response(Some("application/json"), false);
        for part in body.as_bytes().chunks(7) {
            scanner.observe(&Bytes::copy_from_slice(part));
        }
        assert_eq!(scanner.finish(), Some(expected()));
    }

    #[test]
    fn finds_the_usage_chunk_of_a_stream_at_any_split() {
        let stream = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"hi\"}}}}],\"usage\":null}}\n\n\
             data: {{\"choices\":[],\"usage\":{USAGE}}}\n\ndata: [DONE]\n\n"
        );
        for split in 1..stream.len() {
            let mut scanner = UsageScanner::for_response(Some("text/event-stream"), false);
            let (a, b) = stream.as_bytes().split_at(split);
            scanner.observe(&Bytes::copy_from_slice(a));
            scanner.observe(&Bytes::copy_from_slice(b));
            assert_eq!(scanner.finish(), Some(expected()), "split at {split}");
        }
    }

    #[test]
    fn null_usage_is_skipped_and_objects_are_found() {
        assert!(!has_usage_object(br#"{"choices":[],"usage":null}"#));
        assert!(!has_usage_object(br#"{"usage" : null, "x": ""usage""}"#));
        assert!(has_usage_object(br#"{"usage" : {"prompt_tokens":1}}"#));
        assert!(has_usage_object(br#"{"usage":null}{"usage":{}}"#));
    }

    #[test]
    fn a_turn_reports_the_sum_of_its_rounds() {
        let mut turn = TurnUsage::default();
        let first = Bytes::from(format!(r#"{{"id":"a","usage":{USAGE}}}"#));
        assert_eq!(turn.json(&first), first, "the first round is as sent");
        let last = r#"data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":1,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":6},"completion_tokens_details":{"reasoning_tokens":3}}}"#;
        let event = turn.event(&Bytes::from(format!("{last}\n\n")));
        turn.end_round();
        let data: serde_json::Value =
            serde_json::from_slice(sse::data(&event[..event.len() - 2]).unwrap()).unwrap();
        assert_eq!(
            data["usage"],
            serde_json::json!({"prompt_tokens":32,"completion_tokens":6,"total_tokens":38,
                "prompt_tokens_details":{"cached_tokens":10},"completion_tokens_details":{"reasoning_tokens":3}})
        );
        assert!(event.ends_with(b"\n\n"));
        let total = turn.total().unwrap();
        assert_eq!((total.prompt_tokens, total.completion_tokens, total.cached_tokens()), (32, 6, 10));
        let plain = Bytes::from_static(b"data: {\"choices\":[],\"usage\":null}\n\n");
        assert_eq!(turn.event(&plain), plain);
    }

    #[test]
    fn compressed_bodies_are_not_scanned() {
        let mut scanner = UsageScanner::for_response(Some("application/json"), true);
        scanner.observe(&Bytes::from_static(b"{\"usage\":{\"prompt_tokens\":1}}"));
        assert_eq!(scanner.finish(), None);
    }
}
