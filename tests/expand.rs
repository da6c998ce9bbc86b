//! Recoverable compression through the gateway: a request whose compacted history carries
//! markers offers `ctxgate_expand`; the model's call to it is answered by the gateway in its own
//! tool loop (streamed or not, with or without a session, on both stores) and the client never
//! sees it; `GET /v1/ctxgate/originals/{id}` returns an original byte for byte to its caller
//! only; a session whose cache went cold compacts early.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::Duration;

use ctxgate::compress::marker;
use ctxgate::config::{CompressionMode, Config, RulesConfig};
use mock_upstream::Server;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use support::stores::{Store, StoreUrl};
use support::{fixtures, Chunk, Harness, Reply};

const SECRET: &str = "the vault code is 4417-ALPHA";

/// Masking only, so which result goes (the largest) is known.
fn policy(c: &mut Config, window: u64) {
    c.compression.policy.mode = CompressionMode::Rules;
    c.compression.policy.context_window = window;
    c.compression.policy.keep_recent_turns = 1;
    c.compression.policy.rules = RulesConfig { mask_old_tool_results: true, ..RulesConfig::none() };
}

/// An agent conversation whose largest (and oldest) tool result holds the secret.
fn conversation() -> Vec<Value> {
    let big: String = (0..400)
        .map(|l| if l == 250 { format!("{SECRET}\n") } else { format!("log line {l}: nothing to see\n") })
        .collect();
    let mut messages = vec![
        json!({"role": "system", "content": "You are an agent."}),
        json!({"role": "user", "content": "Audit the vault."}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_big", "type": "function", "function": {"name": "read_logs", "arguments": "{}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_big", "content": big}),
    ];
    for n in 0..3 {
        let id = format!("call_{n}");
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "check", "arguments": format!("{{\"n\":{n}}}")}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": format!("check {n} passed")}));
    }
    messages.push(json!({"role": "user", "content": "What is the vault code?"}));
    messages
}

/// The id of the big result, as the gateway computes it from the bytes the client sent.
fn big_id(messages: &[Value]) -> String {
    marker::id_of(&RawValue::from_string(messages[3].to_string()).unwrap())
}

fn request(messages: &[Value], stream: bool) -> Value {
    json!({"model": "mock-model", "messages": messages, "stream": stream,
           "tools": [{"type": "function", "function": {"name": "check", "parameters": {"type": "object"}}}]})
}

fn expand_call(id: &str) -> Value {
    json!({"id": "call_x", "type": "function", "function": {"name": "ctxgate_expand", "arguments": json!({"id": id, "query": "vault code"}).to_string()}})
}

fn calling(call: Value) -> Value {
    json!({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "mock-model",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": "tool_calls"}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
}

fn sse_expand(id: &str) -> Vec<Chunk> {
    let arguments = json!({"id": id, "query": "vault code"}).to_string();
    let start = json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model",
        "choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_x","type":"function","function":{"name":"ctxgate_expand","arguments":""}}]},"finish_reason":null}]});
    let args = json!({"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"mock-model",
        "choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":arguments}}]},"finish_reason":null}]});
    vec![
        Chunk::json(start),
        Chunk::json(args),
        Chunk::json(fixtures::finish_chunk("tool_calls")),
        Chunk::done(),
    ]
}

fn sse_answer(text: &str) -> Vec<Chunk> {
    vec![
        Chunk::json(fixtures::content_chunk(0, text)),
        Chunk::json(fixtures::finish_chunk("stop")),
        Chunk::done(),
    ]
}

/// The upstream's two requests: the compacted one offering the tool, and the one after the
/// gateway answered the call.
fn assert_expanded(server: &Server, id: &str) {
    let requests: Vec<Value> = server.requests().iter().map(|r| r.json()).collect();
    assert_eq!(requests.len(), 2, "one call to the model, then one after the expansion");
    let first = &requests[0];
    let names: Vec<&str> =
        first["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["check", "ctxgate_expand"], "the tool comes after the client's own");
    let masked = first["messages"][3]["content"].as_str().unwrap();
    assert!(masked.starts_with("[ctxgate:elided id=") && masked.contains(id), "{masked}");
    assert!(!first.to_string().contains(SECRET), "the secret was masked");
    let second = &requests[1];
    let messages = second["messages"].as_array().unwrap();
    let answer = &messages[messages.len() - 1];
    assert_eq!(answer["role"], "tool");
    assert_eq!(answer["tool_call_id"], "call_x");
    assert!(answer["content"].as_str().unwrap().contains(SECRET), "{answer}");
    assert_eq!(messages[messages.len() - 2]["tool_calls"][0]["function"]["name"], "ctxgate_expand");
}

async fn start(store: Option<Store>, upstream: mock_upstream::Builder) -> (Harness, Option<StoreUrl>) {
    let store = match store {
        Some(store) => Some(store.url().await),
        None => None,
    };
    let url = store.as_ref().map(|s| s.url.clone());
    let h = Harness::builder()
        .upstream(upstream)
        .config(move |c| {
            policy(c, 4_500);
            if let Some(url) = url {
                c.sessions.store = url;
            }
        })
        .start()
        .await;
    (h, store)
}

#[tokio::test]
async fn the_model_expands_a_marker_and_the_client_never_sees_the_call() {
    let messages = conversation();
    let id = big_id(&messages);
    let upstream = Server::builder()
        .reply(Reply::json(200, calling(expand_call(&id))))
        .chat(fixtures::completion("4417-ALPHA"));
    let (h, _) = start(None, upstream).await;

    let response = h.chat().json(&request(&messages, false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ctxgate-tool-rounds"], "1");
    assert_eq!(response.headers()["x-ctxgate-compression"], "rules", "the turn's headers survive its rounds");
    assert!(response.headers().contains_key("x-ctxgate-tokens-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "4417-ALPHA");
    assert!(body["choices"][0]["message"]["tool_calls"].is_null());
    assert_eq!(body["ctxgate"]["tool_runs"][0]["tool"], "ctxgate_expand");
    assert_expanded(h.upstream(0), &id);
    let ok = h.metric(r#"ctxgate_tool_calls_total{tool="ctxgate_expand",outcome="ok"}"#).await;
    assert_eq!(ok, 1.0);
}

#[tokio::test]
async fn a_streamed_expansion_is_held_back_and_the_answer_streams() {
    let messages = conversation();
    let id = big_id(&messages);
    let upstream =
        Server::builder().reply(Reply::sse(sse_expand(&id))).reply(Reply::sse(sse_answer("4417-ALPHA")));
    let (h, _) = start(None, upstream).await;

    let response = h.chat().json(&request(&messages, true)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("4417-ALPHA"));
    assert!(!text.contains("ctxgate_expand") && !text.contains("tool_calls\":[{"), "the call leaked: {text}");
    assert_eq!(text.matches("data: [DONE]").count(), 1);
    assert_expanded(h.upstream(0), &id);
}

/// On a session the expansion is answered from the transcript and the turn commits the answer.
async fn a_session_expands_from_its_transcript(store: Store) {
    let messages = conversation();
    let id = big_id(&messages);
    let upstream = Server::builder()
        .reply(Reply::json(200, calling(expand_call(&id))))
        .chat(fixtures::completion("4417-ALPHA"))
        .reply(Reply::sse(sse_expand(&id)))
        .reply(Reply::sse(sse_answer("still 4417-ALPHA")));
    let (h, _store) = start(Some(store), upstream).await;

    let response =
        h.chat().header("x-session-id", "vault").json(&request(&messages, false)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "4417-ALPHA");
    let transcript: Value = h
        .client
        .get(h.v1("/sessions/vault/messages"))
        .header("authorization", "Bearer sk-test-client")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = transcript["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"], "4417-ALPHA", "the answer is committed");

    // Streamed, on the next turn (full history with the answer appended).
    let mut next = messages.clone();
    next.push(json!({"role": "assistant", "content": "4417-ALPHA"}));
    next.push(json!({"role": "user", "content": "Say it again."}));
    let response = h.chat().header("x-session-id", "vault").json(&request(&next, true)).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(text.contains("still 4417-ALPHA") && !text.contains("ctxgate_expand"), "{text}");
    let requests = h.upstream(0).requests();
    let last = requests.last().unwrap().json();
    assert!(last.to_string().contains(SECRET), "the second turn's expansion reached the model");
}

/// The original of a marker, byte for byte, for its caller only; a session's from its transcript.
async fn originals_are_returned_to_their_caller_only(store: Store) {
    let messages = conversation();
    // The big result as a client might send it: its own key order and spacing.
    let sent =
        format!(r#"{{"tool_call_id": "call_big",  "role": "tool", "content": {}}}"#, messages[3]["content"]);
    let body = request(&messages, false).to_string().replace(&messages[3].to_string(), &sent);
    let id = marker::id_of(&RawValue::from_string(sent.clone()).unwrap());
    let upstream = Server::builder().chat(fixtures::completion("a")).chat(fixtures::completion("b"));
    let (h, _store) = start(Some(store), upstream).await;
    let send = |session: Option<&'static str>| {
        let mut chat = h.chat().header("content-type", "application/json").body(body.clone());
        if let Some(session) = session {
            chat = chat.header("x-session-id", session);
        }
        chat.send()
    };
    assert_eq!(send(None).await.unwrap().status(), 200);
    assert_eq!(send(Some("s1")).await.unwrap().status(), 200);
    let get = |key: &'static str, session: Option<&'static str>| {
        let mut request =
            h.client.get(h.v1(&format!("/ctxgate/originals/{id}"))).header("authorization", key);
        if let Some(session) = session {
            request = request.header("x-session-id", session);
        }
        request.send()
    };
    for session in [None, Some("s1")] {
        let response = get("Bearer sk-test-client", session).await.unwrap();
        assert_eq!(response.status(), 200, "{session:?}");
        let body = response.text().await.unwrap();
        let original = format!(r#""message":{sent}"#);
        assert!(body.contains(&original), "not byte for byte ({session:?}): {body:.200}");
        let other = get("Bearer sk-someone-else", session).await.unwrap();
        assert_eq!(other.status(), 404, "another caller sees nothing ({session:?})");
        let error: Value = other.json().await.unwrap();
        assert!(
            error["error"]["code"] == "original_not_found" || error["error"]["code"] == "session_not_found"
        );
    }
    let bad = h.client.get(h.v1("/ctxgate/originals/nothex")).send().await.unwrap();
    assert_eq!(bad.status(), 404);
}

/// Dropped steps become one marker naming the run by its first and last ids; the originals
/// endpoint returns every message of the run, in order, byte for byte.
async fn a_dropped_run_is_named_by_one_id_and_returned_whole(store: Store) {
    let mut messages = vec![
        json!({"role": "system", "content": "You are an agent."}),
        json!({"role": "user", "content": "Check every host."}),
    ];
    for n in 0..60 {
        let id = format!("call_{n}");
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "ping", "arguments": format!("{{\"host\":{n}}}")}}]}));
        messages.push(
            json!({"role": "tool", "tool_call_id": id, "content": format!("host {n} answered in {n} ms")}),
        );
    }
    messages.push(json!({"role": "user", "content": "Which host was slowest?"}));
    let store = store.url().await;
    let url = store.url.clone();
    let upstream = Server::builder().chat(fixtures::completion("a")).chat(fixtures::completion("b"));
    let h = Harness::builder()
        .upstream(upstream)
        .config(move |c| {
            c.compression.policy.mode = CompressionMode::Rules;
            c.compression.policy.context_window = 1_500;
            c.compression.policy.keep_recent_turns = 1;
            c.compression.policy.rules = RulesConfig { drop_oldest: true, ..RulesConfig::none() };
            c.sessions.store = url;
        })
        .start()
        .await;
    let body = request(&messages, false);
    assert_eq!(h.chat().json(&body).send().await.unwrap().status(), 200);
    assert_eq!(h.chat().header("x-session-id", "hosts").json(&body).send().await.unwrap().status(), 200);

    let sent = h.upstream(0).requests()[0].json();
    let text = sent["messages"].to_string();
    let runs: Vec<&str> = marker::ids_in(&text).into_iter().filter(|id| id.contains("..")).collect();
    assert_eq!(runs.len(), 1, "one marker for the dropped steps: {text:.600}");
    let marker_text = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|m| m["content"].as_str().filter(|c| c.starts_with("[ctxgate:elided")));
    assert!(marker_text.unwrap().contains("ping ×"), "{marker_text:?}");
    let (first, last) = runs[0].split_once("..").unwrap();
    let ids: Vec<String> =
        messages.iter().map(|m| marker::id_of(&RawValue::from_string(m.to_string()).unwrap())).collect();
    let start = ids.iter().position(|id| id == first).unwrap();
    let end = ids.iter().position(|id| id == last).unwrap();
    assert!(end > start + 10, "a run of many steps ({start}..={end})");
    let want = format!(
        r#""messages":[{}]"#,
        messages[start..=end].iter().map(Value::to_string).collect::<Vec<_>>().join(",")
    );
    for session in [None, Some("hosts")] {
        let mut get = h.client.get(h.v1(&format!("/ctxgate/originals/{}", runs[0])));
        get = get.header("authorization", "Bearer sk-test-client");
        if let Some(session) = session {
            get = get.header("x-session-id", session);
        }
        let response = get.send().await.unwrap();
        assert_eq!(response.status(), 200, "{session:?}");
        let got = response.text().await.unwrap();
        assert!(got.contains(&want), "every message of the run, in order ({session:?}): {got:.300}");
    }
}

on_both_stores!(
    a_session_expands_from_its_transcript,
    originals_are_returned_to_their_caller_only,
    a_dropped_run_is_named_by_one_id_and_returned_whole
);

#[tokio::test]
async fn expansion_can_be_switched_off() {
    let messages = conversation();
    let h = Harness::builder()
        .config(|c| {
            policy(c, 4_500);
            c.compression.expand = false;
        })
        .start()
        .await;
    assert_eq!(h.chat().json(&request(&messages, false)).send().await.unwrap().status(), 200);
    let sent = h.upstream(0).requests().pop().unwrap().json();
    assert!(
        sent["messages"][3]["content"].as_str().unwrap().starts_with("[ctxgate:elided id="),
        "still marked"
    );
    let names: Vec<&str> =
        sent["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["check"], "no tool offered");
}

#[tokio::test]
async fn a_session_whose_cache_went_cold_compacts_from_the_pre_compaction_mark() {
    let messages = conversation();
    let h = Harness::builder()
        .config(|c| {
            // Between the marks: over pre-compaction (0.6), under high water (0.8).
            policy(c, 6_000);
            c.compression.cache_lifetime = Duration::from_millis(300);
        })
        .start()
        .await;
    let send = |messages: Vec<Value>| {
        h.chat().header("x-session-id", "cold").json(&request(&messages, false)).send()
    };
    let first = send(messages.clone()).await.unwrap();
    assert_eq!(
        first.headers()["x-ctxgate-compression"],
        "none",
        "warm: under the high-water mark nothing moves"
    );
    let mut next = messages.clone();
    next.push(json!({"role": "assistant", "content": "Looking."}));
    next.push(json!({"role": "user", "content": "And?"}));
    let warm = send(next.clone()).await.unwrap();
    assert_eq!(warm.headers()["x-ctxgate-compression"], "none");

    tokio::time::sleep(Duration::from_millis(500)).await;
    next.push(json!({"role": "assistant", "content": "Still looking."}));
    next.push(json!({"role": "user", "content": "Now?"}));
    let cold = send(next).await.unwrap();

    assert_eq!(cold.headers()["x-ctxgate-compression"], "rules", "a cold cache compacts now");
    let cold_epochs = h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="cold"}"#).await;
    assert_eq!(cold_epochs, 1.0);
}
