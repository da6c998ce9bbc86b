//! Request-path CPU cost that grows with the request: validating a chat body and copying headers.
//!
//! `chat_request_parse` times [`ChatRequestHead::parse`], the one borrowed serde pass ctxgate makes
//! over every `POST /v1/chat/completions` body, on realistic requests of about 1 KiB, 32 KiB and
//! 512 KiB (system prompt, tools, many user/assistant/tool turns, unknown fields). Next to it, on
//! the same bytes, is what a gateway that re-serialises would pay: a full
//! `serde_json::from_slice::<Value>`, `serde_json::to_vec` of that `Value`, and both together.
//! `validate_only` (a `serde::de::IgnoredAny` pass: JSON syntax checked, nothing kept) is the
//! floor for any pass that validates the whole body.
//! The ratio is the argument for forwarding the client's bytes untouched; long agent
//! conversations make the 512 KiB case common, so it is the one to watch.
//!
//! `headers` times [`copy_end_to_end`], run once per request and once per response, on typical
//! header maps (a Python SDK chat request, an OpenAI streamed response).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ctxgate::openai::ChatRequestHead;
use ctxgate::upstream::copy_end_to_end;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::de::IgnoredAny;
use serde_json::{json, Value};

/// Prose for message contents: plain text, markdown, a code block with quotes, backslashes,
/// tabs and newlines (escapes), and non-ASCII text, as real conversations have.
const PARAGRAPHS: [&str; 6] = [
    "The service keeps a rolling window of the last 500 requests per tenant and rejects anything \
     above the configured quota with a 429. Please review the rate limiter and tell me whether the \
     window is computed correctly when the clock moves backwards.",
    "Here is the function in question:\n\n```rust\nfn admit(&mut self, now: Instant) -> bool {\n\
     \tlet cutoff = now - self.window;\n\twhile self.log.front().is_some_and(|t| *t < cutoff) {\n\
     \t\tself.log.pop_front();\n\t}\n\tif self.log.len() >= self.limit { return false; }\n\
     \tself.log.push_back(now);\n\ttrue\n}\n```\n\nIt logs \"admitted\" or \"rejected\" with the path \
     C:\\\\srv\\\\logs\\\\limiter.log.",
    "Short answer: `Instant` is monotonic, so it cannot move backwards; the bug is elsewhere. \
     The deque grows without bound if `limit` is raised at runtime, because entries older than \
     the window are only removed on admission.",
    "Résumé des changements — naïve café test: 日本語のテキストも含まれています。Emoji too: 🚀✅. \
     Make sure the tokenizer and the JSON escaping both survive multi-byte characters.",
    "- step 1: read the config\n- step 2: validate the quota (must be > 0)\n- step 3: build the \
     limiter\n- step 4: wire it into the tower stack before the concurrency limit\n",
    "Can you run the tests again with RUST_LOG=debug and paste the lines mentioning the limiter? \
     I want to see the timestamps of the first three rejections after the deploy at 14:02 UTC.",
];

fn prose(turn: usize, paragraphs: usize) -> String {
    (0..paragraphs).map(|i| PARAGRAPHS[(turn + i) % PARAGRAPHS.len()]).collect::<Vec<_>>().join("\n\n")
}

fn tool(name: &str, description: &str) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "strict": true,
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path relative to the repository root."},
                    "query": {"type": "string", "description": "Search text or regular expression."},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 200},
                    "include_hidden": {"type": "boolean"}
                },
                "required": ["path", "query", "max_results", "include_hidden"],
                "additionalProperties": false
            }
        }
    })
}

/// One conversation step: a user turn, an assistant tool call, the tool's result and the
/// assistant's answer.
fn turn_messages(turn: usize, paragraphs: usize) -> [Value; 4] {
    let call_id = format!("call_{turn:04}aB3xYz9QpL7mN2kR5tV8wC");
    let arguments = json!({
        "path": format!("src/limiter/mod{turn}.rs"),
        "query": "fn admit\\(",
        "max_results": 20,
        "include_hidden": false
    })
    .to_string();
    let tool_output = json!({
        "matches": [
            {"file": format!("src/limiter/mod{turn}.rs"), "line": 41, "text": "fn admit(&mut self, now: Instant) -> bool {"},
            {"file": "tests/limiter.rs", "line": 7, "text": "assert!(limiter.admit(t0 + Duration::from_millis(5)));"}
        ],
        "truncated": false
    })
    .to_string();
    [
        json!({"role": "user", "content": prose(turn, paragraphs)}),
        json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "search_code", "arguments": arguments}}]
        }),
        json!({"role": "tool", "tool_call_id": call_id, "content": tool_output}),
        json!({"role": "assistant", "content": prose(turn + 2, paragraphs), "refusal": null}),
    ]
}

/// A chat request body of about `target` bytes, serialised compactly as SDKs send it.
fn chat_body(target: usize) -> Vec<u8> {
    let small = target < 4 * 1024;
    let tools: Vec<Value> = if small {
        vec![json!({
            "type": "function",
            "function": {
                "name": "search_code",
                "description": "Search the repository.",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
            }
        })]
    } else {
        vec![
            tool("search_code", "Search the repository for text or a regular expression."),
            tool("read_file", "Read a file of the repository, optionally a line range."),
            tool("list_directory", "List the entries of a directory of the repository."),
            tool("run_tests", "Run the test suite, or the tests whose name matches the query."),
        ]
    };
    let system = if small {
        "You are a concise senior engineer. Answer with code when useful.".to_string()
    } else {
        format!("You are a senior engineer reviewing a Rust service.\n\n{}", prose(0, 6))
    };
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut body = json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [],
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": true,
        "temperature": 0.2,
        "top_p": 1,
        "max_completion_tokens": 4096,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "tenant-42/user-1337",
        "metadata": {"session": "b3d9c1e2-7f3a-4a55-9d0e-2c1b6f4e8a90", "env": "prod"},
        "seed": 1234,
        "x_vendor_extension": {"cache": {"ttl": "5m", "key": "conv-1337"}, "trace": [1, 2, 3]}
    });
    let fixed = serde_json::to_vec(&body).unwrap().len();
    let mut size = fixed + serde_json::to_vec(&messages[0]).unwrap().len();
    if small {
        messages.push(json!({"role": "user", "content": PARAGRAPHS[0]}));
        messages
            .push(json!({"role": "assistant", "content": "`Instant` is monotonic; the bug is elsewhere."}));
        messages.push(json!({"role": "user", "content": "And if the limit is lowered at runtime?"}));
    } else {
        let mut turn = 0;
        while size < target {
            for message in turn_messages(turn, 2) {
                size += serde_json::to_vec(&message).unwrap().len() + 1;
                messages.push(message);
            }
            turn += 1;
        }
    }
    body["messages"] = Value::Array(messages);
    serde_json::to_vec(&body).unwrap()
}

fn chat_request_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("chat_request_parse");
    for (label, target) in [("1KiB", 1024), ("32KiB", 32 * 1024), ("512KiB", 512 * 1024)] {
        let body = chat_body(target);
        let head = ChatRequestHead::parse(&body).unwrap();
        assert!(head.stream && head.model == "gpt-4o-2024-08-06");
        eprintln!("chat_request_parse/{label}: {} bytes, {} messages", body.len(), head.message_count);
        let value: Value = serde_json::from_slice(&body).unwrap();

        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("head_parse", label), &body, |b, body| {
            b.iter(|| ChatRequestHead::parse(black_box(body)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("validate_only", label), &body, |b, body| {
            b.iter(|| serde_json::from_slice::<IgnoredAny>(black_box(body)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("value_parse", label), &body, |b, body| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(body)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("value_to_vec", label), &value, |b, value| {
            b.iter(|| serde_json::to_vec(black_box(value)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("value_roundtrip", label), &body, |b, body| {
            b.iter(|| {
                let value = serde_json::from_slice::<Value>(black_box(body)).unwrap();
                serde_json::to_vec(&value).unwrap()
            })
        });
    }
    group.finish();
}

fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    map
}

fn headers(c: &mut Criterion) {
    // What the OpenAI Python SDK sends, through a load balancer: 16 headers, two hop-by-hop.
    let request = header_map(&[
        ("host", "gateway.internal:8080"),
        ("connection", "keep-alive"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        ("content-length", "32768"),
        ("authorization", "Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"),
        ("user-agent", "OpenAI/Python 1.51.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.51.0"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.12.6"),
        ("x-stainless-retry-count", "0"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ]);
    // An OpenAI streamed chat response: 15 headers, two hop-by-hop.
    let response = header_map(&[
        ("date", "Tue, 24 Sep 2024 10:15:02 GMT"),
        ("content-type", "text/event-stream; charset=utf-8"),
        ("transfer-encoding", "chunked"),
        ("connection", "keep-alive"),
        ("access-control-expose-headers", "X-Request-ID"),
        ("openai-organization", "org-abc123"),
        ("openai-processing-ms", "231"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", "29991234"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-reset-tokens", "17ms"),
        ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
    ]);

    let mut group = c.benchmark_group("headers");
    for (label, from) in [("request_16", &request), ("response_15", &response)] {
        group.throughput(Throughput::Elements(from.len() as u64));
        group.bench_with_input(BenchmarkId::new("copy_end_to_end", label), from, |b, from| {
            b.iter(|| {
                let mut to = HeaderMap::new();
                copy_end_to_end(black_box(from), &mut to);
                to
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = chat_request_parse, headers
}
criterion_main!(benches);
