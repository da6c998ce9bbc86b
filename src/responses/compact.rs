//! `POST /v1/responses/compact`: a conversation compacted by ctxgate's own rules, returned as
//! Responses items a client sends as `input` next time (OpenAI's `response.compaction` object).
//!
//! The conversation is `input`, after the one a `previous_response_id` names (rebuilt from the
//! store, in the caller's scope). It is compacted as the chat pipeline compacts a stateless
//! conversation at its first epoch ([`crate::chat::compression::compact`]): the same rules, the
//! same budget (the low-water mark of the model's window), the same markers, with the originals
//! kept in the caller's store so `ctxgate_expand` and `GET /v1/ctxgate/originals/{id}` resolve
//! them. No model is called, so nothing here can be OpenAI's encrypted `compaction` item: the
//! output is plain messages, `function_call` and `function_call_output` items, in order.
//!
//! Items are derived from the compacted messages alone, ids included, so the same conversation
//! compacts to the same bytes every time. A model whose route has only Responses upstreams gets
//! the request as sent, as other Responses requests do.

use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::request as translate;
use super::{new_id, now_secs, response, store};
use crate::auth::{scope_credential, Caller};
use crate::body::{self, Body};
use crate::chat::compression;
use crate::error::GatewayError;
use crate::handlers::passthrough;
use crate::headers;
use crate::http_util::json_response;
use crate::AppState;

/// The handler.
pub(crate) async fn compact(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = request.into_parts();
    let (bytes, model) = super::read_request(&app, &parts, body).await?;
    if super::speaks_responses(&app, model.as_deref()) {
        return passthrough::passthrough(app, Request::from_parts(parts, body::full(bytes))).await;
    }
    let asked = parse(&bytes)?;
    // A key limited to some models compacts under their policies only, as it calls them only.
    app.auth.check_model(parts.extensions.get::<Caller>(), &asked.model)?;
    let scope = store::scope_of(&scope_credential(&parts.headers, &parts.extensions));
    let mut items = match &asked.previous_response_id {
        Some(id) => {
            store::chain(&app.sessions, &scope, id)
                .await?
                .ok_or_else(|| GatewayError::ResponseNotFound { id: id.clone() })?
                .items
        }
        None => Vec::new(),
    };
    items.extend(asked.items);

    // `instructions` lead the conversation as the chat pipeline would send them, but are not
    // part of what comes back: a client sends its instructions with each request.
    let mut conversation: Vec<Value> = asked.instructions.into_iter().collect();
    let lead = conversation.len();
    conversation.extend(translate::messages_of(&items)?);
    let messages = conversation
        .iter()
        .map(serde_json::value::to_raw_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GatewayError::Internal(e.into()))?;
    let compacted = compression::compact(&app, &scope, &asked.model, messages).await?;

    let output = items_of(&compacted.messages[lead.min(compacted.messages.len())..]);
    let object = json!({
        "id": new_id("resp"),
        "object": "response.compaction",
        "created_at": now_secs(),
        "output": output,
        // What the rules read, counted as the model's tokenizer would; nothing was generated.
        "usage": response::usage(Some(&json!({"prompt_tokens": compacted.tokens_before, "completion_tokens": 0}))),
    });
    let mut response = json_response(&object);
    let headers = response.headers_mut();
    headers.insert(headers::TOKENS_BEFORE, HeaderValue::from(compacted.tokens_before));
    headers.insert(headers::TOKENS_AFTER, HeaderValue::from(compacted.tokens_after));
    headers.insert(headers::COMPRESSION, HeaderValue::from_static(compacted.acted.as_str()));
    Ok(response)
}

/// A compact request, read.
#[derive(Debug)]
struct Asked {
    model: String,
    previous_response_id: Option<String>,
    /// `instructions` as a system message.
    instructions: Option<Value>,
    items: Vec<Value>,
}

fn invalid(message: &str, param: &'static str) -> GatewayError {
    GatewayError::invalid(message, Some(param), "invalid_value")
}

/// Reads the fields compaction uses; the others (`prompt_cache_key`, `service_tier`, ...) say
/// nothing to rules that call no model.
fn parse(body: &[u8]) -> Result<Asked, GatewayError> {
    let fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        GatewayError::invalid(format!("The request body is not a JSON object: {e}"), None, "invalid_json")
    })?;
    let model = match fields.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        None | Some(Value::Null) => {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'model'.",
                Some("model"),
                "missing_required_parameter",
            ))
        }
        Some(_) => return Err(invalid("model must be a non-empty string.", "model")),
    };
    let (previous_response_id, instructions) = translate::chain_fields(&fields)?;
    let items = match fields.get("input") {
        // The conversation may be the stored one alone.
        None | Some(Value::Null) if previous_response_id.is_some() => Vec::new(),
        input => translate::items_of(input.unwrap_or(&Value::Null))?,
    };
    Ok(Asked { model, previous_response_id, instructions, items })
}

/// Chat messages as Responses items, as `GET /v1/responses/{id}/input_items` lists them: a
/// message's text as one `input_text` part (`output_text` for the assistant), an assistant's
/// tool calls as `function_call` items after its text, a tool result as `function_call_output`.
fn items_of(messages: &[Box<RawValue>]) -> Vec<Value> {
    let mut items = Vec::with_capacity(messages.len());
    for (at, raw) in messages.iter().enumerate() {
        let Ok(message) = serde_json::from_str::<Value>(raw.get()) else { continue };
        // Derived from the message and its place, so compacting again gives the same ids.
        let id = |prefix: &str, part: usize| format!("{prefix}_{}", item_id(at, part, raw.get()));
        let role = message["role"].as_str().unwrap_or("user");
        match role {
            "tool" => items.push(json!({
                "id": id("fco", 0),
                "type": "function_call_output",
                "status": "completed",
                "call_id": message["tool_call_id"],
                "output": text_of(&message["content"]),
            })),
            "assistant" => {
                let text = text_of(&message["content"]);
                if !text.is_empty() {
                    items.push(response::message_item(&id("msg", 0), &text, "completed"));
                }
                for (n, call) in message["tool_calls"].as_array().into_iter().flatten().enumerate() {
                    items.push(response::function_call_item(
                        &id("fc", n + 1),
                        call["id"].as_str().unwrap_or_default(),
                        call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default(),
                        call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or_default(),
                        "completed",
                    ));
                }
            }
            _ => items.push(json!({
                "id": id("msg", 0),
                "type": "message",
                "status": "completed",
                "role": if role == "system" { "system" } else { "user" },
                "content": input_parts(&message["content"]),
            })),
        }
    }
    items
}

/// 32 hex digits of SHA-256 over a message's place, the item's place within it, and its bytes.
fn item_id(at: usize, part: usize, message: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update((at as u64).to_le_bytes());
    hasher.update((part as u64).to_le_bytes());
    hasher.update(message.as_bytes());
    hasher.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A chat content's text: the string, or its text parts joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// A user or system message's chat content as Responses input parts (images as `input_image`).
fn input_parts(content: &Value) -> Value {
    let Value::Array(parts) = content else {
        return json!([{"type": "input_text", "text": text_of(content)}]);
    };
    let parts = parts.iter().filter_map(|part| match part["type"].as_str() {
        Some("image_url") => {
            let mut image = json!({"type": "input_image", "image_url": part["image_url"]["url"]});
            image["detail"] = part["image_url"].get("detail").cloned().unwrap_or(json!("auto"));
            Some(image)
        }
        _ => part["text"].as_str().map(|text| json!({"type": "input_text", "text": text})),
    });
    Value::Array(parts.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(value: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    #[test]
    fn messages_become_the_items_they_were_read_from() {
        let items = vec![
            json!({"type": "message", "role": "user", "content": "Look it up."}),
            json!({"type": "function_call", "call_id": "call_1", "name": "search", "arguments": "{\"q\":1}"}),
            json!({"type": "function_call_output", "call_id": "call_1", "output": "found"}),
            json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]}),
        ];
        let messages: Vec<Box<RawValue>> =
            translate::messages_of(&items).unwrap().into_iter().map(raw).collect();
        let back = items_of(&messages);
        let kinds: Vec<&str> = back.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["message", "function_call", "function_call_output", "message"]);
        assert_eq!(back[0]["content"], json!([{"type": "input_text", "text": "Look it up."}]));
        assert_eq!(back[1]["call_id"], "call_1");
        assert_eq!(back[2]["output"], "found");
        assert_eq!(back[3]["role"], "assistant");
        // Read again, they are the same chat messages.
        let again: Vec<Box<RawValue>> = translate::messages_of(&back).unwrap().into_iter().map(raw).collect();
        let texts = |m: &[Box<RawValue>]| m.iter().map(|m| m.get().to_string()).collect::<Vec<_>>();
        assert_eq!(texts(&again), texts(&messages));
        assert_eq!(items_of(&messages), back, "the same messages give the same items, ids included");
    }

    #[test]
    fn a_malformed_request_names_its_field() {
        let param = |body: &str| match parse(body.as_bytes()) {
            Err(GatewayError::InvalidRequest { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(param(r#"{"input": "x"}"#), Some("model"));
        assert_eq!(param(r#"{"model": "m", "input": 3}"#), Some("input"));
        assert_eq!(param(r#"{"model": "m"}"#), Some("input"));
        assert_eq!(
            param(r#"{"model": "m", "input": "x", "previous_response_id": 1}"#),
            Some("previous_response_id")
        );
        assert_eq!(param(r#"{"model": "m", "input": "x", "instructions": []}"#), Some("instructions"));
        assert!(parse(br#"{"model": "m", "previous_response_id": "resp_1"}"#).is_ok());
    }
}
