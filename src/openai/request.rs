//! Validation of `POST /v1/chat/completions` bodies: the fields ctxgate needs (`model`,
//! `messages`, `stream`) are checked in one borrowed pass, with OpenAI's wording and `param`.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// What ctxgate needs from a chat request; the rest of the body is forwarded as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRequestHead {
    pub model: String,
    pub stream: bool,
    pub message_count: usize,
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
    pub span: std::ops::Range<usize>,
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
                // `raw` borrows from `body`: its offset is its address minus the body's.
                let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
                (items, start..start + raw.get().len())
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

        let head = Self { model, stream, message_count: messages.len() };
        Ok((head, ChatMessages { items: messages, span }))
    }
}

/// Reads only a top-level `"model"` string, for routing pass-through requests (embeddings,
/// completions) that ctxgate does not otherwise validate.
pub fn peek_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ModelOnly {
        model: Option<String>,
    }
    serde_json::from_slice::<ModelOnly>(body).ok()?.model
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

    fn err(body: &str) -> serde_json::Value {
        ChatRequestHead::parse(body.as_bytes()).unwrap_err().to_json()["error"].clone()
    }

    #[test]
    fn reads_model_stream_and_messages() {
        let head = ChatRequestHead::parse(
            br#"{"model":"gpt-4o","x_unknown":{"a":1},"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        )
        .unwrap();
        assert_eq!(head, ChatRequestHead { model: "gpt-4o".into(), stream: true, message_count: 1 });
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
    fn peek_model_reads_only_the_model() {
        assert_eq!(peek_model(br#"{"input":"x","model":"emb"}"#).as_deref(), Some("emb"));
        assert_eq!(peek_model(b"not json"), None);
    }
}
