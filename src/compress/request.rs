//! Rebuilding a chat request around new messages: every other top-level field keeps its bytes
//! and its place; `tools` is serialised canonically so a client that rebuilds its tool list
//! each turn still sends the same prefix bytes.

use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// The request with `messages` replaced, `tools` canonical, and `prompt_cache_key` set when
/// `cache_key` is given and the client set none.
pub fn rebuild(
    body: &[u8],
    messages: &[Box<RawValue>],
    cache_key: Option<&str>,
) -> Result<Bytes, GatewayError> {
    let mut fields: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|e| GatewayError::Internal(e.into()))?;
    let array = serde_json::value::to_raw_value(messages).map_err(|e| GatewayError::Internal(e.into()))?;
    fields.insert("messages".into(), array);
    if let Some(tools) = fields.get_mut("tools") {
        if let Some(canonical) = canonical(tools.get()) {
            *tools = canonical;
        }
    }
    if let Some(key) = cache_key {
        if !fields.contains_key("prompt_cache_key") {
            let value = serde_json::value::to_raw_value(key).map_err(|e| GatewayError::Internal(e.into()))?;
            fields.insert("prompt_cache_key".into(), value);
        }
    }
    serde_json::to_vec(&fields).map(Bytes::from).map_err(|e| GatewayError::Internal(e.into()))
}

/// The request's `tools` array, as sent.
pub fn tools_of(body: &[u8]) -> Option<Box<RawValue>> {
    #[derive(serde::Deserialize)]
    struct Tools {
        tools: Option<Box<RawValue>>,
    }
    serde_json::from_slice::<Tools>(body).ok()?.tools
}

/// JSON with object keys sorted and no insignificant whitespace (serde_json's `Value` keeps
/// keys in a sorted map).
pub fn canonical(json: &str) -> Option<Box<RawValue>> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    serde_json::value::to_raw_value(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_tools_and_the_cache_key_change() {
        let body = br#"{"model":"m", "messages":[{"role":"user","content":"a"}],"tools":[{"type":"function","function":{"parameters":{"b":1,"a":2},"name":"f"}}],"x_unknown":{"z": 1}}"#;
        let messages = [RawValue::from_string(r#"{"role":"user","content":"b"}"#.into()).unwrap()];
        let out = rebuild(body, &messages, Some("k1")).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"b"}],"tools":[{"function":{"name":"f","parameters":{"a":2,"b":1}},"type":"function"}],"x_unknown":{"z": 1},"prompt_cache_key":"k1"}"#
        );
        let own = br#"{"model":"m","messages":[],"prompt_cache_key":"mine"}"#;
        let out = rebuild(own, &messages, Some("k1")).unwrap();
        assert!(std::str::from_utf8(&out).unwrap().ends_with(r#""prompt_cache_key":"mine"}"#));
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
