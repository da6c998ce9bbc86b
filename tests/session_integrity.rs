//! What a session keeps stays readable and true: nothing stored can make a session unreadable,
//! a deleted session stays deleted, a stream says `[DONE]` only once its turn is committed, a
//! rewritten stream carries no stale framing, a client that left a stateless tool loop stops
//! it, and a turn's `usage` covers every model call it made.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::Duration;

use ctxgate::session::embedded::EmbeddedStore;
use ctxgate::session::{Checkpoint, SessionKey, SessionStore};
use mock_upstream::Server;
use serde_json::{json, Value};
use support::stores::{self, Store, StoreUrl};
use support::{fixtures, Harness, HarnessBuilder};

const AUTH: &str = "Bearer sk-test-client";

/// A gateway on the chosen store; the store lives as long as the pair.
async fn start(store: Store, builder: HarnessBuilder) -> (Harness, StoreUrl) {
    let store = store.url().await;
    let url = store.url.clone();
    (builder.config(move |c| c.sessions.store = url).start().await, store)
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// A JSON value nested `depth` levels deep: `[[[...{"deep":true}...]]]`.
fn nested(depth: usize) -> String {
    format!("{}{{\"deep\":true}}{}", "[".repeat(depth - 1), "]".repeat(depth - 1))
}

async fn get(h: &Harness, path: &str) -> (u16, String) {
    let response = h.client.get(h.v1(path)).header("authorization", AUTH).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

// === item: deep JSON ===

async fn a_deeply_nested_message_is_refused_and_the_session_stays_readable(store: Store) {
    // Given a session with one turn
    let upstream = Server::builder().chat(fixtures::completion("one"));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let first = json!({"model": "mock-model", "messages": [user("a")]});
    let response = h.chat().header("x-session-id", "deep").json(&first).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // When the next turn carries a message nested 200 levels deep
    let body = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"a"}},{{"role":"user","content":"b","x":{}}}]}}"#,
        nested(200)
    );
    let response = h.chat().header("x-session-id", "deep").body(body).send().await.unwrap();

    // Then it is refused at the edge, nothing goes upstream, and the session reads as before
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "json_too_deep", "{error}");
    assert_eq!(h.upstream(0).requests().len(), 1);
    let messages = stores::transcript(&h.client, &h.url, "deep", AUTH).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(get(&h, "/sessions/deep").await.0, 200);
    // A body nested as deep as allowed still goes through
    let ok = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"c","x":{}}}]}}"#,
        nested(97)
    );
    let response = h.chat().body(ok).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_checkpoint_already_holding_deep_json_reads_without_a_panic() {
    // Given a checkpoint written before the limit existed: a message, the in-flight marker's
    // request and the goal's system messages nested 300 levels deep
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    let key = SessionKey::new(AUTH.as_bytes(), "old");
    let deep = format!(r#"{{"role":"user","content":"x","x":{}}}"#, nested(300));
    {
        let store = EmbeddedStore::open(&path, Duration::from_secs(3600)).unwrap();
        let mut checkpoint = Checkpoint::new(ctxgate::session::checkpoint::now_ms());
        let raw = |text: &str| serde_json::value::RawValue::from_string(text.to_string()).unwrap();
        checkpoint.transcript = vec![raw(r#"{"role":"user","content":"a"}"#), raw(&deep)];
        checkpoint.tools = Some(raw(&nested(300)));
        let stored = checkpoint.encode();
        assert!(matches!(
            store.commit(&key, 0, &stored).await.unwrap(),
            ctxgate::session::Commit::Committed(1)
        ));
    }
    let url = format!("embedded:{}", path.display());
    let h = Harness::builder().config(move |c| c.sessions.store = url).start().await;

    // When it is read through every endpoint, Then each answers, the message byte for byte
    let (status, body) = get(&h, "/sessions/old/messages").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&deep), "the deep message is not returned as stored");
    for path in ["/sessions/old", "/sessions/old/tasks"] {
        let (status, body) = get(&h, path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // And the session takes its next turn
    let next = json!({"model": "mock-model", "messages": [user("next")]});
    let response = h
        .chat()
        .header("x-session-id", "old")
        .header("x-session-mode", "append")
        .json(&next)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // (read as text: the deep message is past the test client's own JSON recursion limit)
    let (_, body) = get(&h, "/sessions/old/messages").await;
    assert!(body.contains(&deep) && body.ends_with(r#"{"content":"next","role":"user"},{"content":"Hello from mock-upstream.","role":"assistant"}]}"#), "{}", &body[body.len() - 200..]);
}

// === item: a delete ends the session's incarnation ===

/// Reads an SSE response until `pred` holds for the body so far, or the stream ends.
async fn read_until(response: &mut reqwest::Response, body: &mut String, pred: impl Fn(&str) -> bool) {
    while !pred(body) {
        match tokio::time::timeout(Duration::from_secs(10), response.chunk()).await.unwrap().unwrap() {
            Some(bytes) => body.push_str(std::str::from_utf8(&bytes).unwrap()),
            None => return,
        }
    }
}

async fn read_to_end(mut response: reqwest::Response) -> String {
    let mut body = String::new();
    read_until(&mut response, &mut body, |_| false).await;
    body
}

fn streamed(text: &str) -> Value {
    json!({"model": "mock-model", "messages": [user(text)], "stream": true})
}

async fn a_turn_in_flight_during_a_delete_never_commits_into_the_next_session(store: Store) {
    // Given a streamed turn held mid-answer by the upstream, and a second one queued after it
    let (first_gate, second_gate) = (support::Gate::new(), support::Gate::new());
    let upstream = Server::builder()
        .reply(support::Reply::sse(support::chunks(&["old", "answer"], Some((1, &first_gate)))))
        .reply(support::Reply::sse(support::chunks(&["new", "answer"], Some((1, &second_gate)))));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let mut first = h.chat().header("x-session-id", "d").json(&streamed("first")).send().await.unwrap();
    let mut first_body = String::new();
    read_until(&mut first, &mut first_body, |b| b.contains("old")).await;

    // When the session is deleted, and a new conversation starts on its id while the old turn
    // still runs
    let deleted = h.client.delete(h.v1("/sessions/d")).header("authorization", AUTH).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let mut second = h.chat().header("x-session-id", "d").json(&streamed("second")).send().await.unwrap();
    let mut second_body = String::new();
    read_until(&mut second, &mut second_body, |b| b.contains("new")).await;
    first_gate.open();
    read_until(&mut first, &mut first_body, |_| false).await;
    second_gate.open();
    let second_body = second_body + &read_to_end(second).await;

    // Then the old turn's client got its answer, then an error in place of `[DONE]`
    let events = support::sse_data(&first_body);
    assert!(first_body.contains("answer"), "{first_body}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "{first_body}");
    let error: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "session_conflict", "{error}");
    // And the new conversation holds its own turn only, committed
    assert_eq!(support::sse_data(&second_body).last().unwrap(), "[DONE]");
    let messages = stores::transcript(&h.client, &h.url, "d", AUTH).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0], user("second"));
    assert_eq!(messages[1]["content"], "newanswer");
    let (_, info) = get(&h, "/sessions/d").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["in_flight"], Value::Null);
}

async fn a_non_streamed_turn_across_a_delete_gets_its_answer_marked_not_saved(store: Store) {
    // Given a JSON turn whose upstream answers slowly
    let upstream = Server::builder()
        .reply(support::Reply::json(200, fixtures::completion("late")).delay(Duration::from_millis(600)));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let body = json!({"model": "mock-model", "messages": [user("q")]});
    let turn = tokio::spawn(h.chat().header("x-session-id", "j").json(&body).send());
    while h.upstream(0).requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // When the session is deleted meanwhile
    let deleted = h.client.delete(h.v1("/sessions/j")).header("authorization", AUTH).send().await.unwrap();
    assert_eq!(deleted.status(), 200);

    // Then the client gets its answer, marked as not saved, and the session stays deleted
    let response = turn.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ctxgate-session"], "not_saved");
    assert!(response.headers().get("x-ctxgate-session-version").is_none());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "late");
    assert_eq!(get(&h, "/sessions/j").await.0, 404);
}

// === item: `[DONE]` only after the commit ===

#[tokio::test]
async fn redis_killed_mid_stream_ends_the_stream_with_an_error_not_done() {
    // Given a streamed session turn on Redis, held mid-answer by the upstream
    let gate = support::Gate::new();
    let upstream = Server::builder()
        .reply(support::Reply::sse(support::chunks(&["partial", "answer"], Some((1, &gate)))));
    let (h, mut store) = start(Store::Redis, Harness::builder().upstream(upstream)).await;
    let mut response = h.chat().header("x-session-id", "k").json(&streamed("q")).send().await.unwrap();
    let mut body = String::new();
    read_until(&mut response, &mut body, |b| b.contains("partial")).await;

    // When Redis dies before the turn ends
    store.redis.as_mut().unwrap().kill().await;
    gate.open();
    read_until(&mut response, &mut body, |_| false).await;

    // Then the client has the answer, then an error event, and no `[DONE]`
    let events = support::sse_data(&body);
    assert!(body.contains("answer"), "{body}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "{body}");
    let error: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "session_store_unavailable", "{error}");
}

#[tokio::test]
async fn redis_killed_during_a_json_turn_is_503_not_an_unsaved_200() {
    // Given a JSON session turn on Redis whose upstream answers slowly
    let upstream = Server::builder()
        .reply(support::Reply::json(200, fixtures::completion("unsaved")).delay(Duration::from_millis(500)));
    let (h, mut store) = start(Store::Redis, Harness::builder().upstream(upstream)).await;
    let body = json!({"model": "mock-model", "messages": [user("q")]});
    let turn = tokio::spawn(h.chat().header("x-session-id", "k").json(&body).send());
    while h.upstream(0).requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // When Redis dies before the answer comes back
    store.redis.as_mut().unwrap().kill().await;

    // Then the client is told the turn was not saved
    let response = turn.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "session_store_unavailable", "{error}");
}

// === item: no stale framing on a rewritten body ===

/// An SSE reply of `words` whose upstream declares its exact `Content-Length`.
fn sse_with_length(words: &[&str]) -> support::Reply {
    let chunks = support::chunks(words, None);
    let length: usize = chunks
        .iter()
        .map(|c| match c {
            support::Chunk::Data(s) => format!("data: {s}\n\n").len(),
            _ => 0,
        })
        .sum();
    support::Reply::sse(chunks).header("content-length", &length.to_string())
}

async fn a_session_stream_whose_upstream_sends_a_content_length_arrives_whole(store: Store) {
    // Given an upstream that frames its SSE answer with a Content-Length
    let upstream = Server::builder().reply(sse_with_length(&["framed", "answer"]));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;

    // When a session turn streams it (the gateway adds `id:` lines)
    let response = h.chat().header("x-session-id", "cl").json(&streamed("q")).send().await.unwrap();

    // Then the client gets no stale length and the whole stream, `[DONE]` included
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-length").is_none(), "{:?}", response.headers());
    let body = read_to_end(response).await;
    assert!(body.contains("id: "), "{body}");
    assert_eq!(support::sse_data(&body).last().unwrap(), "[DONE]", "{body}");
    let messages = stores::transcript(&h.client, &h.url, "cl", AUTH).await;
    assert_eq!(messages[1]["content"], "framedanswer");
}

async fn a_session_turn_asks_the_upstream_for_an_unencoded_answer(store: Store) {
    // Given a client that accepts gzip
    let (h, _store) = start(store, Harness::builder()).await;

    // When it takes a session turn (whose answer the gateway reads and rewrites), streamed and not
    for stream in [false, true] {
        let body = json!({"model": "mock-model", "messages": [user("q")], "stream": stream});
        let response = h
            .chat()
            .header("x-session-id", format!("enc-{stream}"))
            .header("accept-encoding", "gzip")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        read_to_end(response).await;
    }
    // And a stateless request the gateway passes straight through
    let body = json!({"model": "mock-model", "messages": [user("q")]});
    h.chat().header("accept-encoding", "gzip").json(&body).send().await.unwrap();

    // Then the session turns' upstream requests ask for no encoding (an encoded answer could
    // be neither numbered nor committed); the straight one keeps the client's preference
    let encodings: Vec<bool> =
        h.upstream(0).requests().iter().map(|r| r.headers.contains_key("accept-encoding")).collect();
    assert_eq!(encodings, [false, false, true]);
}

// === item: a client that left a stateless tool loop stops it ===

/// A streamed answer calling the gateway tool `look` once, with `usage` of (10, 5).
fn streamed_tool_call() -> Vec<support::Chunk> {
    let chunk = |delta: Value, finish: Value| {
        support::Chunk::json(
            json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model",
            "choices":[{"index":0,"delta":delta,"finish_reason":finish}]}),
        )
    };
    let call =
        json!({"index":0,"id":"c0","type":"function","function":{"name":"look","arguments":"{\"q\":\"x\"}"}});
    vec![
        chunk(json!({"role":"assistant","content":null,"tool_calls":[call]}), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        support::Chunk::json(
            json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model","choices":[],
            "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":2}}}),
        ),
        support::Chunk::done(),
    ]
}

/// A gateway whose model calls `look` (taking `tool_delay`) then answers, each call with its
/// `usage`; keep-alives every 5 s.
async fn tool_gateway(
    store: Option<Store>,
    tool_delay: Duration,
) -> (Harness, support::tool_server::ToolServer, Option<StoreUrl>) {
    let tools = support::tool_server::ToolServer::start().await;
    tools.set("/look", support::tool_server::Behaviour { delay: tool_delay, ..Default::default() });
    let upstream =
        Server::builder().reply(support::Reply::sse(streamed_tool_call())).reply(support::Reply::sse(vec![
            support::Chunk::json(fixtures::content_chunk(0, "looked")),
            support::Chunk::json(fixtures::finish_chunk("stop")),
            support::Chunk::json(fixtures::usage_chunk()),
            support::Chunk::done(),
        ]));
    let url = tools.url("/look");
    let builder = Harness::builder().upstream(upstream).config(move |c| {
        c.tool_loop.keepalive_interval = Duration::from_secs(5);
        c.tools = vec![support::tool_server::http_tool("look", url)];
    });
    match store {
        Some(store) => {
            let (h, store) = start(store, builder).await;
            (h, tools, Some(store))
        }
        None => (builder.start().await, tools, None),
    }
}

fn tool_request() -> Value {
    json!({"model": "mock-model", "messages": [user("look")], "stream": true,
        "stream_options": {"include_usage": true},
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]})
}

/// Starts a streamed tool turn, reads until the tools run, and hangs up.
async fn leave_while_tools_run(h: &Harness, session: Option<&str>) {
    let mut request = h.chat().json(&tool_request());
    if let Some(id) = session {
        request = request.header("x-session-id", id);
    }
    let mut response = request.send().await.unwrap();
    let mut body = String::new();
    read_until(&mut response, &mut body, |b| b.contains("running tools")).await;
    drop(response);
}

#[tokio::test]
async fn a_stateless_client_that_leaves_while_tools_run_gets_no_further_model_call() {
    // Given a stateless streamed turn whose model calls a gateway tool taking 800 ms
    let (h, tools, _) = tool_gateway(None, Duration::from_millis(800)).await;

    // When the client hangs up while the tool runs
    leave_while_tools_run(&h, None).await;

    // Then the tool finishes, and the model is not asked again (well past the tool's end)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tools.hits_on("/look").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the tool never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.upstream(0).requests().len(), 1, "a model call for a client that left");
}

#[tokio::test]
async fn a_session_client_that_leaves_while_tools_run_still_gets_its_turn_committed() {
    // Given the same turn on a session
    let (h, _tools, _store) = tool_gateway(Some(Store::Embedded), Duration::from_millis(300)).await;

    // When the client hangs up while the tool runs
    leave_while_tools_run(&h, Some("left")).await;

    // Then the turn goes on, by design: the model is asked again and the answer committed
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&h, "/sessions/left/messages").await;
        if status == 200 && body.contains("looked") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the turn was not committed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.upstream(0).requests().len(), 2);
}

// === item: a turn's usage covers all its model calls ===

/// The turn's two calls: the tool call (10 + 5 = 15, 2 cached) and the answer (the mock's
/// 12 + 5 = 17, 4 cached).
fn turn_usage() -> Value {
    json!({"prompt_tokens": 22, "completion_tokens": 10, "total_tokens": 32, "prompt_tokens_details": {"cached_tokens": 6}})
}

#[tokio::test]
async fn a_streamed_tool_turn_reports_the_usage_of_all_its_model_calls() {
    // Given a streamed turn with one gateway tool round, on a session
    let (h, _tools, _store) = tool_gateway(Some(Store::Embedded), Duration::from_millis(10)).await;

    // When the client reads it
    let response = h.chat().header("x-session-id", "u").json(&tool_request()).send().await.unwrap();
    let body = read_to_end(response).await;

    // Then its one usage chunk is the turn's, and the session counts the same
    let usages: Vec<Value> = support::sse_data(&body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .collect();
    assert_eq!(usages, [turn_usage()], "{body}");
    let (_, info) = get(&h, "/sessions/u").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["usage"]["prompt_tokens"], 22);
    assert_eq!(info["usage"]["completion_tokens"], 10);
    assert_eq!(info["usage"]["cached_tokens"], 6);
}

#[tokio::test]
async fn a_json_tool_turn_reports_the_usage_of_all_its_model_calls() {
    // Given a non-streamed stateless turn with one gateway tool round
    let tools = support::tool_server::ToolServer::start().await;
    let call = json!({"id": "c0", "type": "function", "function": {"name": "look", "arguments": "{}"}});
    let calling = json!({"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 2}}});
    let upstream = Server::builder().chat(calling).chat(fixtures::completion("done"));
    let url = tools.url("/look");
    let h = Harness::builder()
        .upstream(upstream)
        .config(move |c| c.tools = vec![support::tool_server::http_tool("look", url)])
        .start()
        .await;

    // When the client reads it
    let mut body = tool_request();
    body["stream"] = json!(false);
    let response = h.chat().json(&body).send().await.unwrap();

    // Then its usage is the sum of both calls
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "done");
    assert_eq!(answer["usage"], turn_usage());
}

/// A follower that read `[DONE]` can rely on the turn being saved, as a live client can: it
/// reads the transcript at once, five times over (a follower is woken by the log write, so a
/// `[DONE]` logged before the commit was seen before it).
async fn a_follower_gets_done_only_once_the_turn_is_committed(store: Store) {
    for i in 0..5 {
        // Given a streamed session turn held by its upstream, and a follower of it
        let gate = support::Gate::new();
        let upstream = Server::builder().stream(vec![
            support::Chunk::json(fixtures::content_chunk(0, "held")),
            support::Chunk::Wait(gate.clone()),
            support::Chunk::json(fixtures::finish_chunk("stop")),
            support::Chunk::done(),
        ]);
        let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
        let body = json!({"model": "mock-model", "stream": true, "messages": [user(&format!("q{i}"))]});
        let live = h.chat().header("x-session-id", "df").json(&body).send().await.unwrap();
        let follower = h.client.get(h.v1("/sessions/df/stream")).header("authorization", AUTH);
        let follower = follower.send().await.unwrap();
        assert_eq!(follower.status(), 200);

        // When the answer completes and the follower has read to [DONE]
        gate.open();
        let events = tokio::time::timeout(Duration::from_secs(10), follower.text()).await.unwrap().unwrap();
        assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");

        // Then the transcript already holds the turn
        let messages = stores::transcript(&h.client, &h.url, "df", AUTH).await;
        assert_eq!(messages.len(), 2, "round {i}: {messages:?}");
        assert_eq!(messages[1]["content"], "held", "round {i}: {messages:?}");
        live.text().await.unwrap();
    }
}

on_both_stores!(
    a_follower_gets_done_only_once_the_turn_is_committed,
    a_deeply_nested_message_is_refused_and_the_session_stays_readable,
    a_turn_in_flight_during_a_delete_never_commits_into_the_next_session,
    a_non_streamed_turn_across_a_delete_gets_its_answer_marked_not_saved,
    a_session_stream_whose_upstream_sends_a_content_length_arrives_whole,
    a_session_turn_asks_the_upstream_for_an_unencoded_answer,
);
