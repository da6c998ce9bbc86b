//! Canned OpenAI payloads: the bodies default mode serves, and the shapes tests script and
//! compare against. Ids and timestamps are fixed so outputs are reproducible.

use serde_json::{json, Value};

const ID: &str = "chatcmpl-mock";
const CREATED: u64 = 1_700_000_000;
const MODEL: &str = "mock-model";

/// The two tool-call argument strings, pre-split the way a model streams them.
const TOOL_ARG_FRAGMENTS: [[&str; 3]; 2] =
    [[r#"{"ci"#, r#"ty":"Pa"#, r#"ris"}"#], [r#"{"c"#, r#"ity":"To"#, r#"kyo"}"#]];

/// A complete non-streamed `chat.completion`.
pub fn completion(content: &str) -> Value {
    json!({
        "id": ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage()
    })
}

/// A streamed chunk carrying `text` as `choices[0].delta.content`.
pub fn content_chunk(i: usize, text: &str) -> Value {
    // OpenAI announces the role in the first delta only.
    let delta = if i == 0 { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
    chunk(choice(delta, None))
}

/// The chunk that ends the choice: empty delta plus `finish_reason`.
pub fn finish_chunk(finish_reason: &str) -> Value {
    chunk(choice(json!({}), Some(finish_reason)))
}

/// Two parallel tool calls streamed as OpenAI does: each call's first chunk has its id and
/// name with empty arguments, then argument fragments for both indexes interleave, then a
/// `tool_calls` finish chunk.
pub fn tool_call_chunks() -> Vec<Value> {
    let [a, b] = TOOL_ARG_FRAGMENTS;
    vec![
        tool_call_start(0),
        tool_call_fragment(0, a[0]),
        tool_call_start(1),
        tool_call_fragment(1, b[0]),
        tool_call_fragment(0, a[1]),
        tool_call_fragment(1, b[1]),
        tool_call_fragment(0, a[2]),
        tool_call_fragment(1, b[2]),
        finish_chunk("tool_calls"),
    ]
}

/// The full arguments of tool calls 0 and 1 once [`tool_call_chunks`] is reassembled.
pub fn tool_call_arguments() -> [&'static str; 2] {
    [r#"{"city":"Paris"}"#, r#"{"city":"Tokyo"}"#]
}

/// The arguments default tool-call mode gives call `i`: `{"q":"item-i"}`.
pub fn tool_call_argument(i: usize) -> String {
    json!({"q": format!("item-{i}")}).to_string()
}

/// A non-streamed answer calling `name` `n` times in parallel (default tool-call mode).
pub fn tool_call_completion(name: &str, n: usize) -> Value {
    let calls: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": format!("call_mock_{i}"),
                "type": "function",
                "function": {"name": name, "arguments": tool_call_argument(i)}
            })
        })
        .collect();
    json!({
        "id": ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "tool_calls": calls},
            "logprobs": null,
            "finish_reason": "tool_calls"
        }],
        "usage": usage()
    })
}

/// The streamed form of [`tool_call_completion`]: one chunk per call carrying its id, name and
/// whole arguments, then the `tool_calls` finish chunk.
pub fn tool_call_completion_chunks(name: &str, n: usize) -> Vec<Value> {
    let mut chunks: Vec<Value> = (0..n)
        .map(|i| {
            let call = json!({
                "index": i,
                "id": format!("call_mock_{i}"),
                "type": "function",
                "function": {"name": name, "arguments": tool_call_argument(i)}
            });
            let delta = if i == 0 {
                json!({"role": "assistant", "content": null, "tool_calls": [call]})
            } else {
                json!({"tool_calls": [call]})
            };
            chunk(choice(delta, None))
        })
        .collect();
    chunks.push(finish_chunk("tool_calls"));
    chunks
}

/// What the mock's tool endpoint (`POST /tools/...`) answers.
pub fn tool_result() -> Value {
    json!({"ok": true, "result": "mock tool result"})
}

/// The trailing `stream_options.include_usage` chunk: no choices, same usage as [`completion`].
pub fn usage_chunk() -> Value {
    let mut c = chunk(json!([]));
    c["usage"] = usage();
    c
}

pub fn models() -> Value {
    json!({
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]
    })
}

pub fn embeddings() -> Value {
    json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
        "model": MODEL,
        "usage": {"prompt_tokens": 3, "total_tokens": 3}
    })
}

/// An OpenAI error body; `kind` is its `type` (e.g. `server_error`, `invalid_request_error`).
pub fn error(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

fn usage() -> Value {
    json!({
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4}
    })
}

fn chunk(choices: Value) -> Value {
    json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": choices
    })
}

fn choice(delta: Value, finish_reason: Option<&str>) -> Value {
    json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}])
}

fn tool_call_start(index: usize) -> Value {
    let call = json!({
        "index": index,
        "id": format!("call_mock_{index}"),
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""}
    });
    // As with content, only the very first delta carries the role.
    let delta = if index == 0 {
        json!({"role": "assistant", "content": null, "tool_calls": [call]})
    } else {
        json!({"tool_calls": [call]})
    };
    chunk(choice(delta, None))
}

fn tool_call_fragment(index: usize, arguments: &str) -> Value {
    let call = json!({"index": index, "function": {"arguments": arguments}});
    chunk(choice(json!({"tool_calls": [call]}), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_fragments_reassemble_to_the_arguments() {
        let mut args = [String::new(), String::new()];
        for c in tool_call_chunks() {
            for call in c["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = call["index"].as_u64().unwrap_or(9) as usize;
                args[i].push_str(call["function"]["arguments"].as_str().unwrap_or("?"));
            }
        }
        assert_eq!(args, tool_call_arguments());
        for a in tool_call_arguments() {
            assert!(serde_json::from_str::<Value>(a).is_ok(), "{a} is not JSON");
        }
    }
}

/// A completed Response object (the Responses API) with `output` as its items.
pub fn response(id: &str, output: Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": CREATED, "status": "completed", "model": MODEL,
        "output": output,
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    })
}

/// A completed Response object answering `text` in one assistant message.
pub fn response_text(id: &str, text: &str) -> Value {
    let message = json!({
        "id": format!("msg_{id}"), "type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
    });
    response(id, json!([message]))
}
