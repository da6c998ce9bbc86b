//! Gateway tools over real sockets: a mock upstream (the model) that calls tools, and an
//! in-process HTTP tool endpoint with scripted latency and failures.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use ctxgate::config::{Config, ToolConfig};
use serde_json::{json, Value};
use support::tool_server::{Behaviour, ToolServer};
use support::{Chunk, Harness, Reply};

/// The shared HTTP tool with `q` required and two retries.
fn http_tool(name: &str, url: String) -> ToolConfig {
    ToolConfig {
        parameters: json!({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
        retries: 2,
        ..support::tool_server::http_tool(name, url)
    }
}

fn call(id: &str, name: &str, arguments: Value) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments.to_string()}})
}

/// A completion whose message calls `calls`.
fn calling(calls: Vec<Value>) -> Value {
    json!({
        "id": "chatcmpl-tools", "object": "chat.completion", "created": 1, "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
}

fn request(tools: &[&str]) -> Value {
    let tools: Vec<Value> = tools
        .iter()
        .map(|n| json!({"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}))
        .collect();
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Look things up."}],
        "tools": tools,
        "x_unknown": 7,
    })
}

async fn start(
    tools: ToolServer,
    replies: Vec<Reply>,
    configure: impl FnOnce(&mut Config, &ToolServer) + Send + 'static,
) -> Harness {
    let mut mock = mock_upstream::Server::builder();
    for reply in replies {
        mock = mock.reply(reply);
    }
    Harness::builder()
        .upstream(mock)
        .config(move |c| {
            c.tool_loop.keepalive_interval = Duration::from_millis(100);
            configure(c, &tools)
        })
        .start()
        .await
}

fn tool_messages(body: &Value) -> Vec<Value> {
    body["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").cloned().collect()
}

#[tokio::test]
async fn five_tools_run_at_once_and_the_turn_takes_the_slowest() {
    let tools = ToolServer::start().await;
    let delays = [1000, 1500, 2000, 2500, 3000];
    for (i, ms) in delays.iter().enumerate() {
        tools.set(&format!("/t{i}"), Behaviour { delay: Duration::from_millis(*ms), ..Default::default() });
    }
    let calls: Vec<Value> =
        (0..5).map(|i| call(&format!("c{i}"), &format!("t{i}"), json!({"q": i.to_string()}))).collect();
    let names: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
    let h = start(
        tools.clone(),
        vec![Reply::json(200, calling(calls)), Reply::json(200, support::fixtures::completion("done"))],
        |c, t| c.tools = (0..5).map(|i| http_tool(&format!("t{i}"), t.url(&format!("/t{i}")))).collect(),
    )
    .await;

    let started = Instant::now();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let response = h.chat().json(&request(&names)).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ctxgate-tool-rounds"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "done");
    assert_eq!(body["x_unknown"], Value::Null, "the response is the model's");

    // About the slowest (3 s), far from the sum (10 s).
    assert!(elapsed >= Duration::from_millis(3000), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(4500), "{elapsed:?}");
    let hits = tools.hits();
    assert_eq!(hits.len(), 5);
    let last_start = hits.iter().map(|h| h.start).max().unwrap();
    let first_end = hits.iter().map(|h| h.end).min().unwrap();
    assert!(last_start < first_end, "every call started before the first one ended");

    let runs = body["ctxgate"]["tool_runs"].as_array().unwrap();
    assert_eq!(body["ctxgate"]["rounds"], 1);
    assert_eq!(runs.len(), 5);
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["tool"], format!("t{i}"));
        assert_eq!(run["tool_call_id"], format!("c{i}"));
        assert_eq!(run["outcome"], "ok");
        assert_eq!(run["attempts"], 1);
        assert!(run["duration_ms"].as_u64().unwrap() >= delays[i]);
    }

    // The second model call: the request as sent, plus the assistant message and the results
    // in call order.
    let requests = h.upstream(0).requests();
    assert_eq!(requests.len(), 2);
    let second = requests[1].json();
    assert_eq!(second["x_unknown"], 7);
    let messages = second["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 7);
    assert_eq!(messages[1]["tool_calls"].as_array().unwrap().len(), 5);
    for (i, message) in tool_messages(&second).iter().enumerate() {
        assert_eq!(message["tool_call_id"], format!("c{i}"));
        let content: Value = serde_json::from_str(message["content"].as_str().unwrap()).unwrap();
        assert_eq!(content["path"], format!("/t{i}"));
        assert_eq!(content["args"], json!({"q": i.to_string()}));
    }
    assert_eq!(h.metric("ctxgate_tool_calls_total{tool=\"t4\",outcome=\"ok\"}").await, 1.0);
    // The gateway's own overhead leaves out both model calls and the 3 s tool round.
    let overhead = h.metric("ctxgate_gateway_overhead_seconds_sum{route=\"chat_completions\"}").await;
    assert!(overhead < 0.25, "overhead {overhead} s counts others' work");
}

#[tokio::test]
async fn per_tool_and_global_limits_hold() {
    let tools = ToolServer::start().await;
    tools.set("/a", Behaviour { delay: Duration::from_millis(300), ..Default::default() });
    tools.set("/b", Behaviour { delay: Duration::from_millis(300), ..Default::default() });
    let mut calls: Vec<Value> = (0..6).map(|i| call(&format!("a{i}"), "a", json!({"q": "x"}))).collect();
    calls.extend((0..6).map(|i| call(&format!("b{i}"), "b", json!({"q": "x"}))));
    let h = start(
        tools.clone(),
        vec![Reply::json(200, calling(calls)), Reply::json(200, support::fixtures::completion("done"))],
        |c, t| {
            let mut a = http_tool("a", t.url("/a"));
            a.max_concurrency = 2;
            c.tools = vec![a, http_tool("b", t.url("/b"))];
            c.tool_loop.max_concurrency = 5;
        },
    )
    .await;
    let response = h.chat().json(&request(&["a", "b"])).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["ctxgate"]["tool_runs"].as_array().unwrap().len(), 12);
    assert_eq!(tools.peak("/a"), 2, "per-tool limit");
    let hits = tools.hits();
    let peak_all = hits
        .iter()
        .map(|h| hits.iter().filter(|o| o.start <= h.start && h.start < o.end).count())
        .max()
        .unwrap();
    assert!(peak_all <= 5, "global limit: {peak_all} at once");
    assert!(tools.peak("/b") >= 3, "b is not held back by a's limit");
    // Queued calls are timed from their start, so none timed out.
    assert!(body["ctxgate"]["tool_runs"].as_array().unwrap().iter().all(|r| r["outcome"] == "ok"));
}

#[tokio::test]
async fn timeouts_retries_and_invalid_arguments_become_tool_results() {
    let tools = ToolServer::start().await;
    tools.set("/slow", Behaviour { delay: Duration::from_secs(3), ..Default::default() });
    tools.set("/flaky", Behaviour { failures: vec![503, 502], ..Default::default() });
    tools.set("/limited", Behaviour { failures: vec![429], retry_after: Some(1), ..Default::default() });
    tools.set("/broken", Behaviour { failures: vec![500, 500, 500, 500], ..Default::default() });
    tools.set("/denied", Behaviour { failures: vec![403], ..Default::default() });
    tools.set("/huge", Behaviour { body_bytes: Some(4096), ..Default::default() });
    let calls = vec![
        call("c0", "slow", json!({"q": "x"})),
        call("c1", "flaky", json!({"q": "x"})),
        call("c2", "limited", json!({"q": "x"})),
        call("c3", "broken", json!({"q": "x"})),
        call("c4", "denied", json!({"q": "x"})),
        call("c5", "huge", json!({"q": "x"})),
        call("c6", "flaky", json!({"q": 5})),
        json!({"id": "c7", "type": "function", "function": {"name": "flaky", "arguments": "{not json"}}),
    ];
    let h = start(
        tools.clone(),
        vec![Reply::json(200, calling(calls)), Reply::json(200, support::fixtures::completion("done"))],
        |c, t| {
            let mut slow = http_tool("slow", t.url("/slow"));
            slow.timeout = Duration::from_millis(300);
            let mut broken = http_tool("broken", t.url("/broken"));
            broken.retries = 2;
            c.tools = vec![
                slow,
                http_tool("flaky", t.url("/flaky")),
                http_tool("limited", t.url("/limited")),
                broken,
                http_tool("denied", t.url("/denied")),
                http_tool("huge", t.url("/huge")),
            ];
            c.tool_loop.max_response_bytes = 1024;
        },
    )
    .await;
    let started = Instant::now();
    let response = h.chat().json(&request(&["slow"])).send().await.unwrap();
    assert_eq!(response.status(), 200, "failing tools do not fail the turn");
    let body: Value = response.json().await.unwrap();
    let runs = body["ctxgate"]["tool_runs"].as_array().unwrap();
    let outcome =
        |i: usize| (runs[i]["outcome"].as_str().unwrap().to_string(), runs[i]["attempts"].as_u64().unwrap());
    assert_eq!(outcome(0).0, "timeout");
    assert_eq!(outcome(1), ("ok".into(), 3), "two 5xx retried");
    assert_eq!(outcome(2), ("ok".into(), 2), "429 retried");
    assert_eq!(outcome(3), ("upstream_error".into(), 3), "retries are bounded");
    assert_eq!(outcome(4), ("upstream_error".into(), 1), "4xx is final");
    assert_eq!(outcome(5), ("upstream_error".into(), 1), "too large");
    assert_eq!(outcome(6), ("invalid_arguments".into(), 0));
    assert_eq!(outcome(7), ("invalid_arguments".into(), 0));
    // Retry-After: 1 was waited for.
    assert!(started.elapsed() >= Duration::from_secs(1));
    let limited = tools.hits_on("/limited");
    assert!(limited[1].start - limited[0].end >= Duration::from_millis(950));
    assert_eq!(tools.hits_on("/flaky").len(), 3, "invalid arguments never reach the tool");

    let results = tool_messages(&h.upstream(0).requests()[1].json());
    let content =
        |i: usize| -> Value { serde_json::from_str(results[i]["content"].as_str().unwrap()).unwrap() };
    assert_eq!(content(0)["kind"], "timeout");
    assert_eq!(content(3)["kind"], "upstream_error");
    assert!(content(4)["error"].as_str().unwrap().contains("403"));
    assert!(content(5)["error"].as_str().unwrap().contains("larger than 1024"));
    assert_eq!(content(6)["kind"], "invalid_arguments");
    assert!(content(6)["error"].as_str().unwrap().contains("/q"), "{}", content(6));
    assert_eq!(content(7)["kind"], "invalid_arguments");
    let ids: Vec<&str> = results.iter().map(|m| m["tool_call_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"], "results in call order");
}

#[tokio::test]
async fn rounds_stop_at_max_rounds_with_tool_choice_none() {
    let tools = ToolServer::start().await;
    let again = |i: usize| Reply::json(200, calling(vec![call(&format!("r{i}"), "look", json!({"q": "x"}))]));
    let h = start(
        tools.clone(),
        vec![again(0), again(1), Reply::json(200, support::fixtures::completion("enough"))],
        |c, t| {
            c.tools = vec![http_tool("look", t.url("/look"))];
            c.tool_loop.max_rounds = 2;
        },
    )
    .await;
    let body: Value = h.chat().json(&request(&["look"])).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "enough");
    assert_eq!(body["ctxgate"]["rounds"], 2);
    assert_eq!(tools.hits().len(), 2);
    let requests = h.upstream(0).requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].json().get("tool_choice"), None);
    assert_eq!(requests[1].json().get("tool_choice"), None);
    assert_eq!(requests[2].json()["tool_choice"], "none");
    assert_eq!(requests[2].json()["messages"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn without_a_session_mixed_calls_pass_through_and_nothing_runs() {
    let tools = ToolServer::start().await;
    let calls = vec![call("g", "look", json!({"q": "x"})), call("k", "client_tool", json!({}))];
    let h = start(tools.clone(), vec![Reply::json(200, calling(calls.clone()))], |c, t| {
        c.tools = vec![http_tool("look", t.url("/look"))];
    })
    .await;
    let body: Value =
        h.chat().json(&request(&["look", "client_tool"])).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["tool_calls"], json!(calls));
    assert_eq!(body.get("ctxgate"), None);
    assert!(tools.hits().is_empty());
    assert_eq!(h.upstream(0).requests().len(), 1);
}

#[tokio::test]
async fn only_configured_endpoints_are_ever_called() {
    let tools = ToolServer::start().await;
    let canary = ToolServer::start().await;
    let calls = vec![
        // Arguments naming another URL are data, not a destination.
        call("c0", "look", json!({"q": canary.url("/steal"), "url": canary.url("/steal")})),
        // A name the gateway does not know is the client's, and never run.
        call("c1", "fetch", json!({"url": canary.url("/steal")})),
    ];
    let h = start(tools.clone(), vec![Reply::json(200, calling(calls))], |c, t| {
        let mut look = http_tool("look", t.url("/look"));
        look.parameters = json!({"type": "object"});
        c.tools = vec![look];
    })
    .await;
    let body: Value = h.chat().json(&request(&["look", "fetch"])).send().await.unwrap().json().await.unwrap();
    assert!(body["choices"][0]["message"]["tool_calls"].is_array());
    // Only the configured tool's own URL was called (the mixed answer passed through without
    // a session, so nothing ran at all here); the canary saw nothing.
    assert!(canary.hits().is_empty());
    assert!(tools.hits().iter().all(|h| h.path == "/look"));

    // A gateway-only answer runs, still only at the configured URL.
    let tools2 = ToolServer::start().await;
    let h = start(
        tools2.clone(),
        vec![
            Reply::json(200, calling(vec![call("c0", "look", json!({"url": canary.url("/steal")}))])),
            Reply::json(200, support::fixtures::completion("done")),
        ],
        |c, t| {
            let mut look = http_tool("look", t.url("/look"));
            look.parameters = json!({"type": "object"});
            c.tools = vec![look];
        },
    )
    .await;
    let response = h.chat().json(&request(&["look"])).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(tools2.hits().len(), 1);
    assert_eq!(tools2.hits()[0].path, "/look");
    assert!(canary.hits().is_empty());
}

#[tokio::test]
async fn injected_tools_are_added_in_a_stable_order() {
    let tools = ToolServer::start().await;
    let h = start(tools.clone(), vec![], |c, t| {
        let mut b = http_tool("zeta", t.url("/z"));
        b.inject = true;
        let mut a = http_tool("alpha", t.url("/a"));
        a.inject = true;
        c.tools = vec![b, a, http_tool("hidden", t.url("/h"))];
    })
    .await;
    let mut body = request(&["mine"]);
    for _ in 0..2 {
        let response = h.chat().json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    body["tools"] = json!([]);
    body.as_object_mut().unwrap().remove("tools");
    h.chat().json(&body).send().await.unwrap();
    let requests = h.upstream(0).requests();
    assert_eq!(requests[0].body, requests[1].body, "same bytes every time");
    let names = |r: &mock_upstream::Recorded| -> Vec<String> {
        r.json()["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&requests[0]), ["mine", "alpha", "zeta"]);
    assert_eq!(names(&requests[2]), ["alpha", "zeta"]);
    assert_eq!(requests[0].json()["x_unknown"], 7);
    assert_eq!(requests[0].json()["tools"][1]["function"]["description"], "The alpha tool.");
}

fn sse_tool_call(id: &str, name: &str, arguments: &str, index: u64) -> Vec<Chunk> {
    let start = json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model",
        "choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":index,"id":id,"type":"function","function":{"name":name,"arguments":""}}]},"finish_reason":null}]});
    let args = json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model",
        "choices":[{"index":0,"delta":{"tool_calls":[{"index":index,"function":{"arguments":arguments}}]},"finish_reason":null}]});
    vec![Chunk::json(start), Chunk::json(args)]
}

fn sse_finish(reason: &str) -> Chunk {
    Chunk::json(support::fixtures::finish_chunk(reason))
}

fn sse_text(text: &str) -> Vec<Chunk> {
    vec![
        Chunk::json(support::fixtures::content_chunk(0, text)),
        Chunk::json(support::fixtures::finish_chunk("stop")),
        Chunk::done(),
    ]
}

#[tokio::test]
async fn streamed_requests_keep_alive_while_tools_run_then_stream_the_answer() {
    let tools = ToolServer::start().await;
    tools.set("/look", Behaviour { delay: Duration::from_millis(600), ..Default::default() });
    let mut first = sse_tool_call("c0", "look", "{\"q\":\"x\"}", 0);
    first.push(sse_finish("tool_calls"));
    first.push(Chunk::done());
    let h = start(tools.clone(), vec![Reply::sse(first), Reply::sse(sse_text("streamed answer"))], |c, t| {
        c.tools = vec![http_tool("look", t.url("/look"))];
    })
    .await;
    let mut body = request(&["look"]);
    body["stream"] = json!(true);
    let response = h.chat().json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let comments = text.matches(": ctxgate: running tools").count();
    assert!(comments >= 3, "keep-alive comments while the 600 ms tool ran: {text}");
    assert!(!text.contains("\"tool_calls\""), "the gateway's calls are not shown: {text}");
    assert!(text.contains("streamed answer"));
    assert_eq!(text.matches("[DONE]").count(), 1);
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let second = h.upstream(0).requests()[1].json();
    assert_eq!(second["stream"], true);
    assert_eq!(tool_messages(&second).len(), 1);
}

/// On a session, an answer calling a gateway tool and a client tool: the client gets only its
/// call; the next turn sends the model the whole answer, the gateway's result, then the
/// client's; the transcript holds them in that order.
async fn mixed_calls_on_a_session(store: support::stores::Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let tools = ToolServer::start().await;
    let mixed =
        calling(vec![call("g0", "look", json!({"q": "x"})), call("k0", "client_tool", json!({"z": 1}))]);
    let h = start(
        tools.clone(),
        vec![Reply::json(200, mixed.clone()), Reply::json(200, support::fixtures::completion("all done"))],
        move |c, t| {
            c.tools = vec![http_tool("look", t.url("/look"))];
            c.sessions.store = url;
        },
    )
    .await;
    let session = |b: reqwest::RequestBuilder| b.header("x-session-id", "mixed-1");
    let first = request(&["look", "client_tool"]);
    let body: Value = session(h.chat()).json(&first).send().await.unwrap().json().await.unwrap();
    let seen = &body["choices"][0]["message"];
    assert_eq!(seen["tool_calls"], json!([mixed["choices"][0]["message"]["tool_calls"][1]]));
    assert_eq!(body["ctxgate"]["tool_runs"][0]["tool"], "look");
    assert_eq!(tools.hits().len(), 1);

    // The client answers its own call, echoing the answer it got.
    let mut next = first.clone();
    let messages = next["messages"].as_array_mut().unwrap();
    messages.push(seen.clone());
    messages.push(json!({"role": "tool", "tool_call_id": "k0", "content": "client result"}));
    let response = session(h.chat()).json(&next).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let sent = h.upstream(0).requests()[1].json();
    let sent = sent["messages"].as_array().unwrap();
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[1], mixed["choices"][0]["message"], "the whole answer, as the model wrote it");
    assert_eq!(sent[2]["tool_call_id"], "g0");
    assert!(sent[2]["content"].as_str().unwrap().contains("/look"));
    assert_eq!(sent[3], json!({"role": "tool", "tool_call_id": "k0", "content": "client result"}));
    let client = reqwest::Client::new();
    let transcript = support::stores::transcript(&client, &h.url, "mixed-1", "Bearer sk-test-client").await;
    assert_eq!(transcript.len(), 5);
    assert_eq!(&transcript[..4], &sent[..4]);
    assert_eq!(transcript[4]["content"], "all done");
    assert_eq!(h.metric("ctxgate_session_history_rewrites_total").await, 0.0);
}

on_both_stores!(mixed_calls_on_a_session);
