//! A Responses API request as a Chat Completions request: `instructions` and `input` become
//! `messages`, function tools and `text.format` take their chat shapes, and the fields chat
//! has no place for are kept for the Response object. Pure: no I/O.
//!
//! Fields this module does not know are passed on to the chat request (a server's own
//! sampling options); the Responses-only ones it knows are not.

use serde_json::{json, Map, Value};

use crate::error::GatewayError;

/// The fields of a Responses request that do not go to the chat request as they are.
const RESPONSES_ONLY: [&str; 22] = [
    "model",
    "instructions",
    "input",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "text",
    "metadata",
    "store",
    "previous_response_id",
    "stream",
    "stream_options",
    "include",
    "reasoning",
    "background",
    "truncation",
    "conversation",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    // Server-side compaction: ctxgate's own compression applies to the conversation instead,
    // by the model's policy; a chat upstream has no such field (OpenAI's refuses it).
    "context_management",
];

/// A Responses request, read.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) model: String,
    pub(crate) stream: bool,
    /// `store`, true unless the client said otherwise (as OpenAI's default).
    pub(crate) store: bool,
    /// `background`: the response runs detached from this request (with `store` only).
    pub(crate) background: bool,
    pub(crate) previous_response_id: Option<String>,
    /// `instructions` as a system message (not carried to the next response of a chain).
    pub(crate) instructions: Option<Value>,
    /// This request's input items, as sent (a string input as one user message).
    pub(crate) items: Vec<Value>,
    /// This request's input as chat messages.
    pub(crate) messages: Vec<Value>,
    /// This request's input as items, each with an `id`, for `GET .../input_items`.
    pub(crate) input_items: Vec<Value>,
    /// The chat request without its `messages` (set when the conversation is known).
    pub(crate) chat: Map<String, Value>,
    /// What the Response object echoes from the request.
    pub(crate) echo: Echo,
}

/// The request fields a Response object carries back.
#[derive(Clone, Debug, Default)]
pub(crate) struct Echo {
    pub(crate) instructions: Value,
    pub(crate) max_output_tokens: Value,
    pub(crate) metadata: Value,
    pub(crate) parallel_tool_calls: Value,
    pub(crate) previous_response_id: Value,
    pub(crate) reasoning: Value,
    pub(crate) store: bool,
    pub(crate) background: bool,
    pub(crate) temperature: Value,
    pub(crate) text: Value,
    pub(crate) tool_choice: Value,
    pub(crate) tools: Value,
    pub(crate) top_p: Value,
    pub(crate) truncation: Value,
    pub(crate) user: Value,
    pub(crate) prompt_cache_key: Value,
}

fn invalid(message: impl Into<String>, param: &'static str) -> GatewayError {
    GatewayError::invalid(message, Some(param), "invalid_value")
}

/// `previous_response_id`, and `instructions` as the system message they become: read alike
/// by create and compact.
pub(crate) fn chain_fields(
    fields: &Map<String, Value>,
) -> Result<(Option<String>, Option<Value>), GatewayError> {
    let previous_response_id = match fields.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(invalid("previous_response_id must be a string.", "previous_response_id")),
    };
    let instructions = match fields.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(json!({"role": "system", "content": text})),
        Some(_) => return Err(invalid("instructions must be a string.", "instructions")),
    };
    Ok((previous_response_id, instructions))
}

fn unsupported(message: impl Into<String>, param: &'static str) -> GatewayError {
    GatewayError::invalid(message, Some(param), "unsupported_parameter")
}

/// Reads a Responses request body.
pub(crate) fn parse(body: &[u8]) -> Result<Parsed, GatewayError> {
    let mut fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        GatewayError::invalid(format!("The request body is not a JSON object: {e}"), None, "invalid_json")
    })?;
    let model = match fields.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'model'.",
                Some("model"),
                "missing_required_parameter",
            ))
        }
    };
    if fields.get("conversation").is_some_and(|c| !c.is_null()) {
        return Err(unsupported(
            "Conversations are not supported by this gateway yet; use previous_response_id.",
            "conversation",
        ));
    }
    let stream = fields.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let store = fields.get("store").and_then(Value::as_bool).unwrap_or(true);
    let background = fields.get("background").and_then(Value::as_bool).unwrap_or(false);
    if background && !store {
        // The response runs detached and is read back by id: it must be stored.
        return Err(invalid("Background mode requires 'store' to be true.", "store"));
    }
    let (previous_response_id, instructions) = chain_fields(&fields)?;
    let items = items_of(fields.get("input").unwrap_or(&Value::Null))?;
    let messages = messages_of(&items)?;
    let input_items = listed(&items);

    let get = |name: &str| fields.get(name).cloned().unwrap_or(Value::Null);
    let echo = Echo {
        instructions: get("instructions"),
        max_output_tokens: get("max_output_tokens"),
        metadata: match get("metadata") {
            Value::Null => json!({}),
            other => other,
        },
        parallel_tool_calls: fields.get("parallel_tool_calls").cloned().unwrap_or(Value::Bool(true)),
        previous_response_id: get("previous_response_id"),
        reasoning: match get("reasoning") {
            Value::Null => json!({"effort": null, "summary": null}),
            other => other,
        },
        store,
        background,
        temperature: fields.get("temperature").cloned().unwrap_or(json!(1.0)),
        text: match get("text") {
            Value::Null => json!({"format": {"type": "text"}}),
            other => other,
        },
        tool_choice: fields.get("tool_choice").cloned().unwrap_or(json!("auto")),
        tools: fields.get("tools").cloned().unwrap_or(json!([])),
        top_p: fields.get("top_p").cloned().unwrap_or(json!(1.0)),
        truncation: fields.get("truncation").cloned().unwrap_or(json!("disabled")),
        user: get("user"),
        prompt_cache_key: get("prompt_cache_key"),
    };

    let mut chat = Map::new();
    chat.insert("model".into(), Value::String(model.clone()));
    if let Some(tools) = fields.get("tools").filter(|t| !t.is_null()) {
        let tools = chat_tools(tools)?;
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
            if let Some(choice) = fields.get("tool_choice").filter(|c| !c.is_null()) {
                chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
            }
            if let Some(parallel) = fields.get("parallel_tool_calls").filter(|p| !p.is_null()) {
                chat.insert("parallel_tool_calls".into(), parallel.clone());
            }
        }
    }
    if let Some(max) = fields.get("max_output_tokens").filter(|m| !m.is_null()) {
        // `max_tokens`: what every OpenAI-compatible server reads (OpenAI too, for non-reasoning
        // models).
        chat.insert("max_tokens".into(), max.clone());
    }
    if let Some(format) = fields.get("text").and_then(|t| t.get("format")).filter(|f| !f.is_null()) {
        if let Some(format) = response_format(format)? {
            chat.insert("response_format".into(), format);
        }
    }
    if let Some(effort) = fields.get("reasoning").and_then(|r| r.get("effort")).filter(|e| !e.is_null()) {
        chat.insert("reasoning_effort".into(), effort.clone());
    }
    if fields.get("top_logprobs").is_some_and(|n| n.as_u64().is_some_and(|n| n > 0)) {
        chat.insert("logprobs".into(), Value::Bool(true));
        chat.insert("top_logprobs".into(), get("top_logprobs"));
    }
    if stream {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    for name in RESPONSES_ONLY {
        fields.remove(name);
    }
    // Everything else (temperature, top_p, user, prompt_cache_key, a server's own options).
    for (name, value) in fields {
        chat.entry(name).or_insert(value);
    }
    Ok(Parsed {
        model,
        stream,
        store,
        background,
        previous_response_id,
        instructions,
        items,
        messages,
        input_items,
        chat,
        echo,
    })
}

/// `input` as items, as the client sent them: a string is one user message.
pub(crate) fn items_of(input: &Value) -> Result<Vec<Value>, GatewayError> {
    match input {
        Value::String(text) => Ok(vec![json!({"type": "message", "role": "user", "content": text})]),
        Value::Array(items) if items.iter().all(Value::is_object) => Ok(items.clone()),
        Value::Array(_) => Err(invalid("Each input item must be an object.", "input")),
        Value::Null => Err(GatewayError::invalid(
            "Missing required parameter: 'input'.",
            Some("input"),
            "missing_required_parameter",
        )),
        _ => Err(invalid("input must be a string or an array of items.", "input")),
    }
}

/// Items as `GET /v1/responses/{id}/input_items` lists them: each with an `id`, a `type` and
/// a `status`, a message's content as parts.
pub(crate) fn listed(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .map(|item| {
            let mut item = item.as_object().cloned().unwrap_or_default();
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
            item.insert("type".into(), json!(kind));
            if kind == "message" {
                if let Some(Value::String(text)) = item.get("content") {
                    let part = if item.get("role").and_then(Value::as_str) == Some("assistant") {
                        json!([{"type": "output_text", "text": text, "annotations": []}])
                    } else {
                        json!([{"type": "input_text", "text": text}])
                    };
                    item.insert("content".into(), part);
                }
            }
            let prefix = match kind.as_str() {
                "message" => "msg",
                "function_call" => "fc",
                "function_call_output" => "fco",
                _ => "item",
            };
            item.entry("status").or_insert(json!("completed"));
            item.entry("id").or_insert_with(|| json!(super::new_id(prefix)));
            Value::Object(item)
        })
        .collect()
}

/// Items (input, or an earlier answer's output) as chat messages.
pub(crate) fn messages_of(items: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let mut messages: Vec<Value> = Vec::new();
    for item in items {
        let Some(item) = item.as_object() else {
            return Err(invalid("Each input item must be an object.", "input"));
        };
        match item.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    // Chat-only servers know `system`; `developer` means the same to them.
                    "developer" => "system",
                    _ => return Err(invalid(format!("Invalid input message role: '{role}'."), "input")),
                };
                let content = message_content(item.get("content").unwrap_or(&Value::Null))?;
                messages.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let call_id = str_field(item, "call_id")?;
                let name = str_field(item, "name")?;
                let arguments = item.get("arguments").and_then(Value::as_str).unwrap_or("{}").to_string();
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls that follow an assistant message (or each other) are one chat message.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        if let Some(calls) = last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                            calls.push(call);
                        } else {
                            last["tool_calls"] = json!([call]);
                        }
                    }
                    _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let call_id = str_field(item, "call_id")?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => text_of(parts)?,
                    _ => return Err(invalid("function_call_output needs an output.", "input")),
                };
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            // Reasoning of an earlier answer: a chat upstream has no place for it.
            "reasoning" => {}
            other => {
                return Err(unsupported(
                    format!(
                        "Input items of type '{other}' are not supported with a Chat Completions upstream."
                    ),
                    "input",
                ))
            }
        }
    }
    Ok(messages)
}

fn str_field(item: &Map<String, Value>, name: &str) -> Result<String, GatewayError> {
    item.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("An input item is missing its '{name}'."), "input"))
}

/// A message's content: a string, or parts. Text-only parts become one string (what every
/// chat server reads, and assistant messages must be); images become `image_url` parts.
fn message_content(content: &Value) -> Result<Value, GatewayError> {
    let parts = match content {
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        _ => return Err(invalid("A message's content must be a string or an array of parts.", "input")),
    };
    if parts.iter().all(|p| matches!(p["type"].as_str(), Some("input_text" | "output_text" | "text"))) {
        return Ok(Value::String(text_of(parts)?));
    }
    let mut chat = Vec::with_capacity(parts.len());
    for part in parts {
        chat.push(match part["type"].as_str() {
            Some("input_text" | "output_text" | "text") => json!({"type": "text", "text": part["text"]}),
            Some("input_image") => {
                let url = part.get("image_url").filter(|u| u.is_string()).ok_or_else(|| {
                    unsupported("Only input_image parts with an image_url are supported.", "input")
                })?;
                let mut image = json!({"url": url});
                if let Some(detail) = part.get("detail").filter(|d| !d.is_null()) {
                    image["detail"] = detail.clone();
                }
                json!({"type": "image_url", "image_url": image})
            }
            other => {
                return Err(unsupported(
                    format!(
                        "Content parts of type {other:?} are not supported with a Chat Completions upstream."
                    ),
                    "input",
                ))
            }
        });
    }
    Ok(Value::Array(chat))
}

fn text_of(parts: &[Value]) -> Result<String, GatewayError> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part.get("text").and_then(Value::as_str) {
            Some(text) => texts.push(text),
            None => return Err(unsupported("Only text parts are supported here.", "input")),
        }
    }
    Ok(texts.concat())
}

/// Responses' flat function tools as chat tools.
fn chat_tools(tools: &Value) -> Result<Vec<Value>, GatewayError> {
    let Some(tools) = tools.as_array() else {
        return Err(invalid("tools must be an array.", "tools"));
    };
    tools
        .iter()
        .map(|tool| match tool["type"].as_str() {
            Some("function") => {
                let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
                    GatewayError::invalid("Missing required parameter: 'tools[].name'.", Some("tools"), "missing_required_parameter")
                })?;
                let mut function = json!({"name": name});
                for field in ["description", "parameters", "strict"] {
                    if let Some(value) = tool.get(field).filter(|v| !v.is_null()) {
                        function[field] = value.clone();
                    }
                }
                Ok(json!({"type": "function", "function": function}))
            }
            other => Err(unsupported(
                format!("Tools of type {other:?} are not supported with a Chat Completions upstream; only function tools are."),
                "tools",
            )),
        })
        .collect()
}

fn chat_tool_choice(choice: &Value) -> Result<Value, GatewayError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => Ok(
            json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}}),
        ),
        _ => Err(unsupported(
            "Only 'auto', 'none', 'required' or a function tool_choice are supported.",
            "tool_choice",
        )),
    }
}

/// `text.format` as chat's `response_format`; plain text needs none.
fn response_format(format: &Value) -> Result<Option<Value>, GatewayError> {
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for field in ["name", "schema", "strict", "description"] {
                if let Some(value) = format.get(field).filter(|v| !v.is_null()) {
                    schema.insert(field.into(), value.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid("text.format.type must be text, json_object or json_schema.", "text.format")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_tools_and_options_take_their_chat_shapes() {
        let body = json!({
            "model": "m",
            "instructions": "Be terse.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 50,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "metadata": {"k": "v"},
            "store": false,
            "reasoning": {"effort": "low"},
            "context_management": [{"type": "compaction", "compact_threshold": 200000}],
            "top_k": 40,
        });
        let parsed = parse(body.to_string().as_bytes()).unwrap();
        assert!(!parsed.store);
        assert_eq!(parsed.instructions, Some(json!({"role": "system", "content": "Be terse."})));
        assert_eq!(
            parsed.messages,
            vec![
                json!({"role": "system", "content": "Use tools."}),
                json!({"role": "user", "content": "Weather?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}),
            ]
        );
        assert_eq!(parsed.input_items.len(), 4);
        assert!(parsed.input_items.iter().all(|i| i["id"].is_string()));
        let chat = Value::Object(parsed.chat);
        assert_eq!(
            chat["tools"][0],
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": true}})
        );
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
        assert_eq!(chat["max_tokens"], 50);
        assert_eq!(chat["response_format"]["json_schema"]["name"], "w");
        // An option the gateway does not know reaches the upstream; Responses-only ones do not
        assert_eq!(chat["top_k"], 40);
        assert_eq!(chat["reasoning_effort"], "low");
        assert!(chat.get("metadata").is_none() && chat.get("store").is_none() && chat.get("input").is_none());
        assert!(chat.get("context_management").is_none());
        assert_eq!(parsed.echo.metadata, json!({"k": "v"}));
    }

    #[test]
    fn a_string_input_is_one_user_message_and_a_stream_asks_for_usage() {
        let parsed = parse(br#"{"model":"m","input":"hi","stream":true}"#).unwrap();
        assert!(parsed.store, "store defaults to true");
        assert_eq!(parsed.messages, vec![json!({"role": "user", "content": "hi"})]);
        assert_eq!(parsed.input_items[0]["content"][0], json!({"type": "input_text", "text": "hi"}));
        assert_eq!(parsed.chat["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn images_logprobs_and_reasoning_items() {
        let body = json!({
            "model": "m",
            "input": [
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
                ]}
            ],
            "top_logprobs": 2,
        });
        let parsed = parse(body.to_string().as_bytes()).unwrap();
        // A reasoning item has no place in a chat request; an image becomes an image_url part
        assert_eq!(
            parsed.messages,
            vec![json!({"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
            ]})]
        );
        // It is still the request's input, kept as sent
        assert_eq!(parsed.items[0]["encrypted_content"], "opaque");
        assert_eq!(parsed.chat["logprobs"], true);
        assert_eq!(parsed.chat["top_logprobs"], 2);
    }

    #[test]
    fn what_a_chat_upstream_cannot_do_is_a_400_naming_the_field() {
        for (body, param) in [
            (r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#, "tools"),
            (r#"{"model":"m","input":"x","background":true,"store":false}"#, "store"),
            (r#"{"model":"m","input":"x","conversation":"conv_1"}"#, "conversation"),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}"#,
                "input",
            ),
            (r#"{"model":"m","input":[{"type":"item_reference","id":"x"}]}"#, "input"),
            (r#"{"model":"m"}"#, "input"),
            (r#"{"input":"x"}"#, "model"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.to_json()["error"]["param"], param, "{body}");
        }
    }
}
