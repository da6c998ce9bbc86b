//! `POST /v1/chat/completions` bodies: validated in one borrowed pass (the fields ctxgate needs,
//! `model`, `messages`, `stream`, with OpenAI's wording and `param`), then held as a
//! [`ChatRequest`]: the bytes as sent plus where `messages` and `tools` sit in them, so every
//! later step (charges, tool injection, compression, the tool loop) reads the one parse and
//! rewrites only the part it changes.

use std::ops::Range;

use bytes::Bytes;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// What ctxgate needs from a chat request; the rest of the body is forwarded as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRequestHead {
    pub model: String,
    pub stream: bool,
    pub message_count: usize,
    /// `prompt_cache_key`, when it is a string: a client's own conversation id, which may name
    /// the request's session (`sessions.prompt_cache_key`).
    pub prompt_cache_key: Option<String>,
}

/// The top-level fields, borrowed; everything else is skipped by serde.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// Present (`null` included) or absent: `null` must be found to be replaced in place.
    #[serde(borrow, default, deserialize_with = "present")]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_key: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct MessageFields<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
}

/// A validated chat request's messages, borrowed from the body, and where the `messages` array
/// sits in it (so it can be replaced without re-serialising anything else).
#[derive(Debug)]
pub struct ChatMessages<'a> {
    pub items: Vec<&'a RawValue>,
    pub span: Range<usize>,
    /// The `tools` value as sent (`null` included), and where it sits.
    pub tools: Option<(&'a RawValue, Range<usize>)>,
}

/// 400 `json_too_deep` when `body` nests objects and arrays more than `max` levels deep (the
/// body itself is level 1). Checked before anything is stored: a message nested past
/// serde_json's recursion limit parses as a `RawValue` but not as a `Value`, so a later reader
/// would fail on it. One pass that skips string contents with memchr; malformed JSON is left
/// to the parser.
pub(crate) fn check_nesting(body: &[u8], max: usize) -> Result<(), GatewayError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip to the closing quote, past escaped characters.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i.min(body.len())..]) {
                        Some(at) if body[i + at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at;
                            break;
                        }
                        None => return Ok(()),
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(GatewayError::invalid(
                        format!("The request body nests JSON more than {max} levels deep."),
                        None,
                        "json_too_deep",
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

impl ChatRequestHead {
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        Self::parse_with_messages(body).map(|(head, _)| head)
    }

    pub fn parse_with_messages(body: &[u8]) -> Result<(Self, ChatMessages<'_>), GatewayError> {
        let fields: Fields<'_> = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                // Valid JSON of the wrong shape, e.g. an array at the top level.
                GatewayError::invalid("The request body must be a JSON object.", None, "invalid_type")
            } else {
                GatewayError::invalid(
                    format!("We could not parse the JSON body of your request. (HINT: {e}.)"),
                    None,
                    "invalid_json",
                )
            }
        })?;

        let model = match fields.model.map(RawValue::get) {
            None | Some("null") => return Err(missing("model")),
            Some(raw) => match serde_json::from_str::<String>(raw) {
                Ok(model) if !model.is_empty() => model,
                Ok(_) => {
                    return Err(GatewayError::invalid(
                        "Invalid 'model': empty string.",
                        Some("model"),
                        "invalid_value",
                    ))
                }
                Err(_) => return Err(wrong_type("model", "a string", raw)),
            },
        };

        let (messages, span) = match fields.messages {
            None => return Err(missing("messages")),
            Some(raw) if raw.get() == "null" => return Err(missing("messages")),
            Some(raw) => {
                let items = serde_json::from_str::<Vec<&RawValue>>(raw.get())
                    .map_err(|_| wrong_type("messages", "an array", raw.get()))?;
                (items, span_in(body, raw))
            }
        };
        if messages.is_empty() {
            return Err(GatewayError::invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                "empty_array",
            ));
        }
        for (i, message) in messages.iter().enumerate() {
            let fields: MessageFields<'_> = serde_json::from_str(message.get()).map_err(|_| {
                GatewayError::invalid(
                    format!(
                        "Invalid type for 'messages[{i}]': expected an object, but got {} instead.",
                        json_kind(message.get())
                    ),
                    Some("messages"),
                    "invalid_type",
                )
            })?;
            match fields.role.map(RawValue::get) {
                None => {
                    return Err(GatewayError::invalid(
                        format!("Missing required parameter: 'messages[{i}].role'."),
                        Some("messages"),
                        "missing_required_parameter",
                    ))
                }
                Some(raw) if !raw.starts_with('"') => {
                    return Err(GatewayError::invalid(
                        format!(
                            "Invalid type for 'messages[{i}].role': expected a string, but got {} instead.",
                            json_kind(raw)
                        ),
                        Some("messages"),
                        "invalid_type",
                    ))
                }
                Some(_) => {}
            }
        }

        let stream = match fields.stream.map(RawValue::get) {
            None | Some("null") | Some("false") => false,
            Some("true") => true,
            Some(raw) => return Err(wrong_type("stream", "a boolean", raw)),
        };

        let prompt_cache_key = fields.prompt_cache_key.and_then(|raw| serde_json::from_str(raw.get()).ok());
        let head = Self { model, stream, message_count: messages.len(), prompt_cache_key };
        let tools = fields.tools.map(|raw| (raw, span_in(body, raw)));
        Ok((head, ChatMessages { items: messages, span, tools }))
    }
}

/// Where `raw`, borrowed from `body`, sits in it: its address minus the body's.
fn span_in(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// A validated chat request, parsed once: the body as the client sent it, the head fields, the
/// messages (each message's exact bytes), and where `messages` and `tools` sit in the body.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    body: Bytes,
    pub model: String,
    pub stream: bool,
    /// The client's `prompt_cache_key`, when it is a string (kept through rewrites that add
    /// the gateway's own).
    pub prompt_cache_key: Option<String>,
    messages: Vec<Box<RawValue>>,
    messages_span: Range<usize>,
    /// The `tools` array, when the request has one (not `null`).
    tools: Option<Box<RawValue>>,
    /// Where the `tools` value sits, `null` included.
    tools_span: Option<Range<usize>>,
}

impl ChatRequest {
    pub fn parse(body: Bytes) -> Result<Self, GatewayError> {
        let (head, parsed) = ChatRequestHead::parse_with_messages(&body)?;
        let messages = parsed.items.iter().map(|m| (*m).to_owned()).collect();
        let messages_span = parsed.span;
        let (tools, tools_span) = match parsed.tools {
            Some((raw, span)) => ((raw.get() != "null").then(|| raw.to_owned()), Some(span)),
            None => (None, None),
        };
        Ok(Self {
            body,
            model: head.model,
            stream: head.stream,
            prompt_cache_key: head.prompt_cache_key,
            messages,
            messages_span,
            tools,
            tools_span,
        })
    }

    /// The body exactly as the client sent it (after any tool injection).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn messages(&self) -> &[Box<RawValue>] {
        &self.messages
    }

    pub fn tools(&self) -> Option<&RawValue> {
        self.tools.as_deref()
    }

    /// The request with its `messages` array replaced, every other byte as sent.
    pub fn with_messages(&self, messages: Vec<Box<RawValue>>) -> Self {
        let body = splice_messages(&self.body, self.messages_span.clone(), &messages);
        let delta = body.len() as isize - self.body.len() as isize;
        let start = self.messages_span.start;
        let tools_span = self.tools_span.as_ref().map(|span| {
            if span.start > start {
                span.start.saturating_add_signed(delta)..span.end.saturating_add_signed(delta)
            } else {
                span.clone()
            }
        });
        Self {
            messages_span: start..self.messages_span.end.saturating_add_signed(delta),
            body,
            model: self.model.clone(),
            stream: self.stream,
            prompt_cache_key: self.prompt_cache_key.clone(),
            messages,
            tools: self.tools.clone(),
            tools_span,
        }
    }

    /// The request with its `tools` array replaced by `tools` (added at the end of the object
    /// when it had none), every other byte as sent.
    pub fn with_tools(self, tools: &[Box<RawValue>]) -> Self {
        let array = json_array(tools);
        let (start, end, key) = match &self.tools_span {
            Some(span) => (span.start, span.end, ""),
            None => {
                // A validated body is an object: its last non-blank byte is the closing brace.
                let close = self.body.iter().rposition(|b| *b == b'}').unwrap_or(self.body.len());
                (close, close, ",\"tools\":")
            }
        };
        let mut body = Vec::with_capacity(self.body.len() + key.len() + array.len());
        body.extend_from_slice(&self.body[..start]);
        body.extend_from_slice(key.as_bytes());
        let at = body.len();
        body.extend_from_slice(array.as_bytes());
        body.extend_from_slice(&self.body[end..]);
        // The two arrays never overlap: `messages` lies wholly before or wholly after `tools`.
        let messages_span = if self.messages_span.start >= end {
            let delta = body.len() as isize - self.body.len() as isize;
            let moved = |i: usize| i.saturating_add_signed(delta);
            moved(self.messages_span.start)..moved(self.messages_span.end)
        } else {
            self.messages_span.clone()
        };
        Self {
            tools_span: Some(at..at + array.len()),
            tools: RawValue::from_string(array).ok(),
            body: Bytes::from(body),
            model: self.model,
            stream: self.stream,
            prompt_cache_key: self.prompt_cache_key,
            messages: self.messages,
            messages_span,
        }
    }

    /// The request rebuilt around `messages` for a compacted request: every other top-level
    /// field keeps its bytes and its place, `tools` is serialised canonically (a client that
    /// rebuilds its tool list each turn still sends the same prefix bytes) with `extra_tool`
    /// after the client's own, and `prompt_cache_key` is set to `cache_key` when given and the
    /// client set none.
    pub fn rebuild(
        &self,
        messages: Vec<Box<RawValue>>,
        cache_key: Option<&str>,
        extra_tool: Option<&RawValue>,
    ) -> Result<Self, GatewayError> {
        let internal = |e: serde_json::Error| GatewayError::Internal(e.into());
        let mut fields: IndexMap<String, &RawValue> = serde_json::from_slice(&self.body).map_err(internal)?;
        let key = cache_key.map(serde_json::value::to_raw_value).transpose().map_err(internal)?;
        if let Some(key) = &key {
            fields.entry("prompt_cache_key".to_string()).or_insert(key);
        }
        let mut canonical_tools = fields.get("tools").and_then(|t| canonical(t.get()));
        if let Some(extra) = extra_tool {
            let mut tools: Vec<Box<RawValue>> = match canonical_tools.as_deref().filter(|t| t.get() != "null")
            {
                Some(tools) => serde_json::from_str(tools.get()).map_err(internal)?,
                None => Vec::new(),
            };
            tools.push(extra.to_owned());
            canonical_tools = Some(RawValue::from_string(json_array(&tools)).map_err(internal)?);
            fields.entry("tools".to_string()).or_insert(RawValue::NULL);
        }
        // Written by hand, as serde_json would (compact), to know where the arrays land.
        let mut body = Vec::with_capacity(self.body.len());
        let (mut messages_span, mut tools_span) = (0..0, None);
        body.push(b'{');
        for (i, (name, value)) in fields.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, name).map_err(internal)?;
            body.push(b':');
            let start = body.len();
            match name.as_str() {
                "messages" => {
                    body.extend_from_slice(json_array(&messages).as_bytes());
                    messages_span = start..body.len();
                }
                "tools" => {
                    let tools = canonical_tools.as_deref().unwrap_or(value);
                    body.extend_from_slice(tools.get().as_bytes());
                    tools_span = Some(start..body.len());
                }
                _ => body.extend_from_slice(value.get().as_bytes()),
            }
        }
        body.push(b'}');
        let tools = match canonical_tools {
            Some(tools) if tools.get() != "null" => Some(tools),
            _ => None,
        };
        Ok(Self {
            body: Bytes::from(body),
            model: self.model.clone(),
            stream: self.stream,
            prompt_cache_key: self.prompt_cache_key.clone(),
            messages,
            messages_span,
            tools,
            tools_span,
        })
    }
}

/// `[a,b,...]` from raw values, without re-serialising them.
fn json_array(items: &[Box<RawValue>]) -> String {
    let mut out = String::with_capacity(items.iter().map(|i| i.get().len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item.get());
    }
    out.push(']');
    out
}

/// Replaces the `messages` array at `span` with `messages`, leaving every other byte as sent.
pub(crate) fn splice_messages(body: &[u8], span: Range<usize>, messages: &[Box<RawValue>]) -> Bytes {
    let array = json_array(messages);
    let mut out = Vec::with_capacity(body.len() - span.len() + array.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(array.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// The body with top-level `field` set to `value` (added at the end when absent).
pub(crate) fn with_field(body: &[u8], field: &str, value: &RawValue) -> Result<Bytes, GatewayError> {
    let mut fields: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|e| GatewayError::Internal(e.into()))?;
    fields.insert(field.into(), value.to_owned());
    serde_json::to_vec(&fields).map(Bytes::from).map_err(|e| GatewayError::Internal(e.into()))
}

/// JSON with object keys sorted and no insignificant whitespace (serde_json's `Value` keeps
/// keys in a sorted map).
pub(crate) fn canonical(json: &str) -> Option<Box<RawValue>> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    serde_json::value::to_raw_value(&value).ok()
}

/// Reads only a top-level `"model"` string, for routing pass-through requests (embeddings,
/// completions) that ctxgate does not otherwise validate.
/// What a passed-through body says at its top level, for the model allowlist and routing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyModel {
    /// A JSON object; `model` when it names one (a `null` model names none).
    Object(Option<String>),
    /// Not a JSON object (another content type, or malformed).
    NotAnObject,
}

/// Reads the top-level `model` of a body. Every top-level key is read as serde unescapes it
/// (`"mod\u0065l"` is `model`), and a key that appears twice is an error: parsers disagree on
/// which one wins, so the gateway could check one model while the upstream uses the other.
pub(crate) fn body_model(body: &[u8]) -> Result<BodyModel, GatewayError> {
    use serde::de::{IgnoredAny, MapAccess, Visitor};

    /// The model (or `Err` with the raw value when it is not a string) and the first repeated key.
    type TopLevel = (Option<Result<String, String>>, Option<String>);

    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = TopLevel;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let (mut model, mut repeated) = (None, None);
            while let Some(key) = map.next_key::<String>()? {
                if key == "model" {
                    let raw = map.next_value::<Box<RawValue>>()?;
                    model = match serde_json::from_str::<Option<String>>(raw.get()) {
                        Ok(name) => name.map(Ok),
                        Err(_) => Some(Err(raw.get().to_string())),
                    };
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                if repeated.is_none() && !seen.insert(key.clone()) {
                    repeated = Some(key);
                }
            }
            Ok((model, repeated))
        }
    }

    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = serde::Deserializer::deserialize_map(&mut deserializer, Keys).and_then(|top| {
        deserializer.end()?;
        Ok(top)
    });
    match parsed {
        Err(_) => Ok(BodyModel::NotAnObject),
        Ok((_, Some(key))) => {
            let named = if key.len() <= 64 { format!(" '{key}'") } else { String::new() };
            Err(GatewayError::invalid(
                format!("The request body repeats the top-level key{named}; each key may appear once."),
                None,
                "duplicate_key",
            ))
        }
        Ok((Some(Err(raw)), None)) => Err(wrong_type("model", "a string", &raw)),
        Ok((model, None)) => Ok(BodyModel::Object(model.and_then(Result::ok))),
    }
}

fn missing(param: &'static str) -> GatewayError {
    GatewayError::invalid(
        format!("Missing required parameter: '{param}'."),
        Some(param),
        "missing_required_parameter",
    )
}

fn wrong_type(param: &'static str, expected: &str, raw: &str) -> GatewayError {
    GatewayError::invalid(
        format!("Invalid type for '{param}': expected {expected}, but got {} instead.", json_kind(raw)),
        Some(param),
        "invalid_type",
    )
}

fn json_kind(raw: &str) -> &'static str {
    match raw.trim_start().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!(r#"{{"a":"[{{\\\"[","b":{}1{}}}"#, "[".repeat(depth - 1), "]".repeat(depth - 1))
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        // The body is level 1; brackets and escaped quotes inside strings do not count.
        assert_eq!(nested(3), r#"{"a":"[{\\\"[","b":[[1]]}"#);
        assert!(check_nesting(nested(3).as_bytes(), 3).is_ok());
        let err = check_nesting(nested(4).as_bytes(), 3).unwrap_err().to_json();
        assert_eq!(err["error"]["code"], "json_too_deep");
        assert!(check_nesting(br#"{"a":[[1],[2],{"b":2}]}"#, 3).is_ok());
        assert!(check_nesting(br#"{"a":[[1],[2],{"b":{}}]}"#, 3).is_err());
        assert!(check_nesting(br#"{"unterminated":"\"#, 1).is_ok());
    }

    fn err(body: &str) -> serde_json::Value {
        ChatRequestHead::parse(body.as_bytes()).unwrap_err().to_json()["error"].clone()
    }

    #[test]
    fn reads_model_stream_and_messages() {
        let head = ChatRequestHead::parse(
            br#"{"model":"gpt-4o","x_unknown":{"a":1},"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            head,
            ChatRequestHead {
                model: "gpt-4o".into(),
                stream: true,
                message_count: 1,
                prompt_cache_key: None
            }
        );
    }

    #[test]
    fn messages_and_their_span_are_borrowed_from_the_body() {
        let body =
            br#"{"model":"m", "messages" : [ {"role":"user","content":"a"} ,{"role":"assistant"}],"n":1}"#;
        let (_, messages) = ChatRequestHead::parse_with_messages(body).unwrap();
        assert_eq!(messages.items.len(), 2);
        assert_eq!(messages.items[1].get(), r#"{"role":"assistant"}"#);
        assert_eq!(
            &body[messages.span.clone()],
            br#"[ {"role":"user","content":"a"} ,{"role":"assistant"}]"#
        );
    }

    #[test]
    fn escaped_model_names_decode() {
        let head = ChatRequestHead::parse(br#"{"model":"a\u002Fb","messages":[{"role":"user"}]}"#).unwrap();
        assert_eq!(head.model, "a/b");
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let e = err(r#"{"model": "m", "messages": ["#);
        assert_eq!(e["code"], "invalid_json");
        assert!(e["message"].as_str().unwrap().contains("could not parse the JSON body"));
    }

    #[test]
    fn missing_and_ill_typed_fields_name_the_param() {
        let e = err(r#"{"messages":[{"role":"user"}]}"#);
        assert_eq!(
            (e["param"].as_str(), e["code"].as_str()),
            (Some("model"), Some("missing_required_parameter"))
        );
        let e = err(r#"{"model":42,"messages":[{"role":"user"}]}"#);
        assert_eq!(e["param"], "model");
        assert_eq!(e["message"], "Invalid type for 'model': expected a string, but got a number instead.");
        let e = err(r#"{"model":"m","messages":"hi"}"#);
        assert_eq!(e["param"], "messages");
        assert_eq!(e["code"], "invalid_type");
        let e = err(r#"{"model":"m"}"#);
        assert_eq!(e["param"], "messages");
        let e = err(r#"{"model":"m","messages":[]}"#);
        assert_eq!(e["code"], "empty_array");
        let e = err(r#"{"model":"m","messages":[3]}"#);
        assert!(e["message"].as_str().unwrap().contains("messages[0]"));
        let e = err(r#"{"model":"m","messages":[{"content":"x"}]}"#);
        assert!(e["message"].as_str().unwrap().contains("messages[0].role"));
        let e = err(r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#);
        assert_eq!(e["param"], "stream");
    }

    #[test]
    fn non_object_body_is_rejected() {
        assert_eq!(err("[1,2]")["code"], "invalid_type");
    }

    #[test]
    fn body_model_reads_the_top_level_model_once() {
        let model = |b: &str| body_model(b.as_bytes());
        assert_eq!(
            model(r#"{"input":"x","model":"emb","nested":{"model":"other"}}"#).unwrap(),
            BodyModel::Object(Some("emb".into()))
        );
        assert_eq!(model(r#"{"mod\u0065l":"emb"}"#).unwrap(), BodyModel::Object(Some("emb".into())));
        assert_eq!(model(r#"{"input":"x"}"#).unwrap(), BodyModel::Object(None));
        assert_eq!(model(r#"{"model":null}"#).unwrap(), BodyModel::Object(None));
        assert_eq!(model("not json").unwrap(), BodyModel::NotAnObject);
        assert_eq!(model(r#"["model"]"#).unwrap(), BodyModel::NotAnObject);
        assert_eq!(model(r#"{"model":"a"} trailing"#).unwrap(), BodyModel::NotAnObject);
        for repeated in
            [r#"{"model":"a","model":"b"}"#, r#"{"model":"a","mod\u0065l":"b"}"#, r#"{"n":1,"n":2}"#]
        {
            let err = model(repeated).unwrap_err();
            assert_eq!(err.status(), 400, "{repeated}");
            assert_eq!(err.code(), Some("duplicate_key"));
        }
        assert_eq!(model(r#"{"model":["a"]}"#).unwrap_err().status(), 400);
    }

    #[test]
    fn splicing_replaces_only_the_messages_array() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#;
        let start = body.windows(12).position(|w| w == b"[{\"role\":\"us").unwrap();
        let end = start + br#"[{"role":"user","content":"new"}]"#.len();
        let messages = [raw(r#"{"role":"user","content":"old"}"#), raw(r#"{"role":"user","content":"new"}"#)];
        let out = splice_messages(body, start..end, &messages);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"old"},{"role":"user","content":"new"}],"x":{"b":1,"a":2}}"#
        );
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn tools_are_replaced_or_added_and_the_messages_still_splice() {
        let tool = |name: &str| raw(&format!(r#"{{"type":"function","function":{{"name":"{name}"}}}}"#));
        let cases: [&[u8]; 4] = [
            br#"{"model":"m","tools":[{"type":"function","function":{"name":"a"}}],"messages":[{"role":"user"}]}"#,
            br#"{"model":"m", "messages":[{"role":"user"}] ,"tools":null, "n":1 }"#,
            br#"{"tools":  [], "model":"m","messages":[{"role":"user"}]}"#,
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\"}]}  \n",
        ];
        for body in cases {
            let request = ChatRequest::parse(Bytes::from_static(body)).unwrap();
            let with = request.with_tools(&[tool("a"), tool("b")]);
            let reparsed = ChatRequest::parse(with.body().clone())
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(with.body())));
            assert_eq!(reparsed.tools().unwrap().get(), with.tools().unwrap().get());
            let names: Vec<String> = serde_json::from_str::<serde_json::Value>(with.tools().unwrap().get())
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["function"]["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(names, ["a", "b"], "{}", String::from_utf8_lossy(body));
            // The spans still point at the arrays: splicing after the edit is exact.
            let spliced = with.with_messages(vec![raw(r#"{"role":"user","content":"x"}"#)]);
            let again = ChatRequest::parse(spliced.body().clone()).unwrap();
            assert_eq!(spliced.tools().unwrap().get(), again.tools().unwrap().get());
            assert_eq!(again.messages()[0].get(), r#"{"role":"user","content":"x"}"#);
            assert_eq!(again.tools().unwrap().get(), with.tools().unwrap().get());
        }
    }

    #[test]
    fn only_messages_tools_and_the_cache_key_change() {
        let body = br#"{"model":"m", "messages":[{"role":"user","content":"a"}],"tools":[{"type":"function","function":{"parameters":{"b":1,"a":2},"name":"f"}}],"x_unknown":{"z": 1}}"#;
        let messages = [RawValue::from_string(r#"{"role":"user","content":"b"}"#.into()).unwrap()];
        let out = ChatRequest::parse(Bytes::from_static(body))
            .unwrap()
            .rebuild(messages.to_vec(), Some("k1"), None)
            .unwrap();
        let out = out.body();
        assert_eq!(
            std::str::from_utf8(out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"b"}],"tools":[{"function":{"name":"f","parameters":{"a":2,"b":1}},"type":"function"}],"x_unknown":{"z": 1},"prompt_cache_key":"k1"}"#
        );
        let own = br#"{"model":"m","messages":[{"role":"user"}],"prompt_cache_key":"mine"}"#;
        let out = ChatRequest::parse(Bytes::from_static(own))
            .unwrap()
            .rebuild(messages.to_vec(), Some("k1"), None)
            .unwrap();
        let out = out.body();
        assert!(std::str::from_utf8(out).unwrap().ends_with(r#""prompt_cache_key":"mine"}"#));
    }

    #[test]
    fn reordered_tool_lists_serialise_the_same() {
        let a = canonical(r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#)
            .unwrap();
        let b = canonical(
            r#"[ { "function" : { "parameters": {"type":"object"}, "name":"f" }, "type":"function" } ]"#,
        )
        .unwrap();
        assert_eq!(a.get(), b.get());
    }
}
