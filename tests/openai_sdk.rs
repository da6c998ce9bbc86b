//! End to end with the official `openai` Python SDK as the client (in the test venv, see `support::python`):
//! plain, streamed, and tool-calling requests, the model list, and a gateway error, all as
//! the SDK parses them.

mod support;

use mock_upstream::Server;
use serde_json::{json, Value};
use support::{fixtures, Chunk, Harness, Reply};

fn tool_call_completion() -> Value {
    let mut completion = fixtures::completion("");
    completion["choices"][0]["message"] = json!({
        "role": "assistant",
        "content": null,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Tokyo\"}"}}
        ]
    });
    completion["choices"][0]["finish_reason"] = "tool_calls".into();
    completion
}

#[tokio::test]
async fn official_python_sdk_works_through_the_gateway() {
    // Given an upstream scripted in the order the SDK script calls it
    let mut stream = vec![
        Chunk::json(fixtures::content_chunk(0, "one ")),
        Chunk::json(fixtures::content_chunk(1, "two")),
        Chunk::json(fixtures::finish_chunk("stop")),
    ];
    stream.push(Chunk::json(fixtures::usage_chunk()));
    stream.push(Chunk::done());
    let mut tool_stream: Vec<Chunk> = fixtures::tool_call_chunks().into_iter().map(Chunk::json).collect();
    tool_stream.push(Chunk::done());
    let upstream = Server::builder()
        .chat(fixtures::completion("Hello from the SDK test"))
        .stream(stream)
        .stream(tool_stream)
        .reply(Reply::json(200, tool_call_completion()));
    let h = Harness::builder().upstream(upstream).start().await;

    // When the SDK script runs against the gateway
    let seen = support::python::run_script("openai_sdk.py", &h.v1(""), b"").await;

    // Then the SDK parsed every response as it would from OpenAI
    assert_eq!(
        seen["plain"],
        json!({"content": "Hello from the SDK test", "prompt_tokens": 12, "cached_tokens": 4})
    );
    assert_eq!(seen["stream"], json!({"text": "one two", "completion_tokens": 5}));
    let [args0, args1] = fixtures::tool_call_arguments();
    let stream_calls = &seen["stream_tools"]["calls"];
    assert_eq!(stream_calls.as_array().unwrap().len(), 2);
    assert_eq!(stream_calls[0]["arguments"], args0);
    assert_eq!(stream_calls[1]["arguments"], args1);
    assert_eq!(seen["stream_tools"]["finish_reason"], "tool_calls");
    assert_eq!(
        seen["tools"]["calls"][1],
        json!({"id": "call_b", "name": "get_weather", "arguments": "{\"city\":\"Tokyo\"}"})
    );
    assert_eq!(seen["tools"]["finish_reason"], "tool_calls");
    assert_eq!(seen["models"], json!(["mock-model"]));
    assert_eq!(
        seen["error"],
        json!({"status": 400, "code": "empty_array", "param": "messages", "type": "invalid_request_error"})
    );

    // And the upstream saw the SDK's requests with its headers and tools intact
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 5, "the invalid request never reached the upstream");
    assert!(recorded[0].headers["user-agent"].to_str().unwrap().starts_with("OpenAI/Python"));
    assert_eq!(recorded[0].headers["authorization"], "Bearer sk-sdk-test");
    assert!(!recorded[0].headers.contains_key("x-session-id"), "the session header stays at the gateway");
    assert_eq!(recorded[1].json()["stream_options"], json!({"include_usage": true}));
    assert_eq!(recorded[2].json()["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(recorded[4].path, "/v1/models");

    // And the SDK's default X-Session-Id made it a session: the transcript ends with the last
    // turn the SDK sent (full history) and the answer it got
    let messages = support::stores::transcript(&h.client, &h.url, "sdk-session", "Bearer sk-sdk-test").await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["content"], "Weather in Paris and Tokyo?");
    assert_eq!(messages[1], tool_call_completion()["choices"][0]["message"]);
}
