//! Sessions end to end, each scenario on both stores: the embedded redb file and a real
//! `redis-server` on its own port. Every test asserts the exact transcript afterwards.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::stores::{self, Store, StoreUrl};
use support::{fixtures, Chunk, Gate, Harness, HarnessBuilder, Reply};

/// A gateway on the chosen store; the store lives as long as the pair.
async fn start(store: Store, builder: HarnessBuilder) -> (Harness, StoreUrl) {
    let store = store.url().await;
    let url = store.url.clone();
    (builder.config(move |c| c.sessions.store = url).start().await, store)
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn request(messages: &[Value], stream: bool) -> Value {
    json!({"model": "mock-model", "messages": messages, "stream": stream, "x_keep": {"b": 1, "a": 2}})
}

async fn send(h: &Harness, session: &str, body: &Value) -> reqwest::Response {
    h.chat().header("x-session-id", session).json(body).send().await.unwrap()
}

async fn session(h: &Harness, id: &str, key: &str) -> (u16, Value) {
    let response =
        h.client.get(h.v1(&format!("/sessions/{id}"))).header("authorization", key).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn transcript(h: &Harness, id: &str) -> Vec<Value> {
    stores::transcript(&h.client, &h.url, id, "Bearer sk-test-client").await
}

fn assistant(content: &str) -> Value {
    fixtures::completion(content)["choices"][0]["message"].clone()
}

async fn full_history_turns_are_recorded(store: Store) {
    let upstream = Server::builder().chat(fixtures::completion("one")).chat(fixtures::completion("two"));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;

    // Turn 1
    let first = send(&h, "s", &request(&[user("a")], false)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ctxgate-session-version"], "2");
    // Turn 2 resends the whole history
    let second = send(&h, "s", &request(&[user("a"), assistant("one"), user("b")], false)).await;
    assert_eq!(second.headers()["x-ctxgate-session-version"], "4");

    assert_eq!(transcript(&h, "s").await, [user("a"), assistant("one"), user("b"), assistant("two")]);
    // The upstream got the client's bytes as sent both times
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded[1].json(), request(&[user("a"), assistant("one"), user("b")], false));
    let (_, info) = session(&h, "s", "Bearer sk-test-client").await;
    assert_eq!(info["usage"]["requests"], 2);
    assert_eq!(info["usage"]["prompt_tokens"], 24);
    assert_eq!(info["history_rewrites"], 0);
    assert_eq!(info["in_flight"], Value::Null);
}

async fn append_clients_send_only_new_messages(store: Store) {
    let upstream = Server::builder().chat(fixtures::completion("one")).chat(fixtures::completion("two"));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let append =
        |body: Value| h.chat().header("x-session-id", "ap").header("x-session-mode", "append").json(&body);

    append(request(&[user("a")], false)).send().await.unwrap();
    let second = r#"{"model":"mock-model","zeta":[1, 2],"messages":[{"role":"user","content":"b"}],"x":{"b":1,"a":2}}"#;
    let response = h
        .chat()
        .header("x-session-id", "ap")
        .header("x-session-mode", "append")
        .body(second)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The upstream saw the stored transcript spliced in, every other byte as sent
    let sent = String::from_utf8(h.upstream(0).requests()[1].body.to_vec()).unwrap();
    let messages = format!("[{},{},{}]", user("a"), assistant("one"), r#"{"role":"user","content":"b"}"#);
    assert_eq!(sent, second.replace(r#"[{"role":"user","content":"b"}]"#, &messages));
    let messages = transcript(&h, "ap").await;
    assert_eq!(messages, [user("a"), assistant("one"), user("b"), assistant("two")]);
}

async fn streamed_answers_are_assembled_and_committed(store: Store) {
    let mut chunks: Vec<Chunk> = fixtures::tool_call_chunks().into_iter().map(Chunk::json).collect();
    chunks.push(Chunk::done());
    let (h, _store) = start(store, Harness::builder().upstream(Server::builder().stream(chunks))).await;

    let response = send(&h, "st", &request(&[user("weather?")], true)).await;
    // A stream carries the version that admitted it; its answer commits after the last event.
    assert_eq!(response.headers()["x-ctxgate-session-version"], "1");
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));

    let messages = transcript(&h, "st").await;
    assert_eq!(messages.len(), 2);
    assert_eq!(session(&h, "st", "Bearer sk-test-client").await.1["version"], 2);
    let [args0, args1] = fixtures::tool_call_arguments();
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], Value::Null);
    assert_eq!(messages[1]["tool_calls"][0]["function"]["arguments"], args0);
    assert_eq!(messages[1]["tool_calls"][1]["function"]["arguments"], args1);
}

async fn a_client_disconnect_mid_stream_still_commits_the_answer(store: Store) {
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "Hel")),
        Chunk::Wait(gate.clone()),
        Chunk::json(fixtures::content_chunk(1, "lo")),
        Chunk::json(fixtures::finish_chunk("stop")),
        Chunk::done(),
    ]);
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;
    let response = send(&h, "dc", &request(&[user("greet")], true)).await;
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();

    // The client leaves, then the upstream finishes
    drop(stream);
    gate.open();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, info) = session(&h, "dc", "Bearer sk-test-client").await;
        if info["messages"] == 2 && info["in_flight"].is_null() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never committed: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messages = transcript(&h, "dc").await;
    assert_eq!(messages[1], json!({"role": "assistant", "content": "Hello"}));
}

async fn another_callers_key_never_sees_the_session(store: Store) {
    let (h, _store) = start(store, Harness::builder()).await;
    send(&h, "private", &request(&[user("secret")], false)).await;

    let (status, body) = session(&h, "private", "Bearer sk-someone-else").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "session_not_found");
    let (status, _) = session(&h, "private", "Bearer sk-test-client").await;
    assert_eq!(status, 200);

    // The same id under another key is another session
    let other = h
        .client
        .post(h.v1("/chat/completions"))
        .header("authorization", "Bearer sk-someone-else")
        .header("x-session-id", "private")
        .header("x-session-mode", "append")
        .json(&request(&[user("mine")], false))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    let upstream_saw = h.upstream(0).requests()[1].json();
    assert_eq!(upstream_saw["messages"], json!([user("mine")]), "nothing of the first caller's session");
    assert_eq!(transcript(&h, "private").await[0], user("secret"));
}

async fn concurrent_requests_on_one_session_are_serialised(store: Store) {
    let (h, _store) = start(
        store,
        Harness::builder()
            .upstream(Server::builder().latency(Duration::from_millis(2)))
            .config(|c| c.sessions.busy_timeout = Duration::from_secs(60)),
    )
    .await;

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..50 {
        let request = h
            .chat()
            .header("x-session-id", "busy")
            .header("x-session-mode", "append")
            .json(&request(&[user(&format!("m{i}"))], false));
        requests.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    let statuses = requests.join_all().await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // Every turn landed exactly once, whole: user message then answer, 50 times
    let messages = transcript(&h, "busy").await;
    assert_eq!(messages.len(), 100);
    let mut users: Vec<String> =
        messages.iter().step_by(2).map(|m| m["content"].as_str().unwrap().to_string()).collect();
    assert!(messages.iter().skip(1).step_by(2).all(|m| m["role"] == "assistant"));
    users.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(users, expected);
    let (_, info) = session(&h, "busy", "Bearer sk-test-client").await;
    assert_eq!(info["version"], 100, "one admit and one commit per turn");
}

async fn a_held_session_answers_409_after_the_busy_timeout(store: Store) {
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "x")),
        Chunk::Wait(gate.clone()),
        Chunk::json(fixtures::finish_chunk("stop")),
        Chunk::done(),
    ]);
    let (h, _store) = start(
        store,
        Harness::builder()
            .upstream(upstream)
            .config(|c| c.sessions.busy_timeout = Duration::from_millis(100)),
    )
    .await;
    let held = send(&h, "held", &request(&[user("first")], true)).await;

    let second = send(&h, "held", &request(&[user("first")], false)).await;
    assert_eq!(second.status(), 409);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_busy");

    gate.open();
    held.text().await.unwrap();
    assert_eq!(transcript(&h, "held").await, [user("first"), json!({"role": "assistant", "content": "x"})]);
}

async fn edited_history_is_followed_and_counted(store: Store) {
    let (h, _store) = start(store, Harness::builder()).await;
    send(&h, "ed", &request(&[user("a")], false)).await;
    let reply = assistant("Hello from mock-upstream.");

    send(&h, "ed", &request(&[user("a, edited"), reply.clone(), user("b")], false)).await;

    assert_eq!(transcript(&h, "ed").await, [user("a, edited"), reply.clone(), user("b"), reply]);
    let (_, info) = session(&h, "ed", "Bearer sk-test-client").await;
    assert_eq!(info["history_rewrites"], 1);
    assert_eq!(h.metric("ctxgate_session_history_rewrites_total").await, 1.0);
}

async fn a_failed_upstream_call_records_nothing(store: Store) {
    let upstream = Server::builder().reply(Reply::json(
        400,
        json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}}),
    ));
    let (h, _store) = start(store, Harness::builder().upstream(upstream)).await;

    let response = send(&h, "f", &request(&[user("a")], false)).await;

    assert_eq!(response.status(), 400);
    let (_, info) = session(&h, "f", "Bearer sk-test-client").await;
    assert_eq!(info["messages"], 0);
    assert_eq!(info["in_flight"], Value::Null);
}

async fn sessions_can_be_deleted(store: Store) {
    let (h, _store) = start(store, Harness::builder()).await;
    send(&h, "del", &request(&[user("a")], false)).await;
    let url = h.v1("/sessions/del");
    let auth = "Bearer sk-test-client";

    let deleted = h.client.delete(&url).header("authorization", auth).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(session(&h, "del", auth).await.0, 404);
    assert_eq!(h.client.delete(&url).header("authorization", auth).send().await.unwrap().status(), 404);
}

fn system(text: &str) -> Value {
    json!({"role": "system", "content": text})
}

async fn put_goal(h: &Harness, id: &str, body: Value) -> reqwest::Response {
    h.client
        .put(h.v1(&format!("/sessions/{id}/goal")))
        .header("authorization", "Bearer sk-test-client")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The raw bytes of each message the upstream received in request `i`.
fn upstream_messages(h: &Harness, i: usize) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        messages: Vec<Box<serde_json::value::RawValue>>,
    }
    let body: Body = serde_json::from_slice(&h.upstream(0).requests()[i].body).unwrap();
    body.messages.iter().map(|m| m.get().to_string()).collect()
}

async fn a_locked_goal_is_sent_as_one_fixed_block_after_the_system_messages(store: Store) {
    let (h, _store) = start(store, Harness::builder()).await;
    let reply = assistant("Hello from mock-upstream.");
    send(&h, "g", &request(&[system("Be terse."), user("a")], false)).await;

    // When the goal is locked
    let locked = put_goal(&h, "g", json!({"goal": "Ship the parser", "constraints": ["no new deps"]})).await;
    assert_eq!(locked.status(), 200);

    // Then every later request carries it right after the client's system messages
    send(&h, "g", &request(&[system("Be terse."), user("a"), reply.clone(), user("b")], false)).await;
    send(
        &h,
        "g",
        &request(
            &[system("Be terse."), user("a"), reply.clone(), user("b"), reply.clone(), user("c")],
            false,
        ),
    )
    .await;
    let second = upstream_messages(&h, 1);
    let third = upstream_messages(&h, 2);
    assert_eq!(second.len(), 5);
    assert!(second[1].contains("Ship the parser") && second[1].contains("no new deps"), "{}", second[1]);
    assert_eq!(second[1], third[1], "identical bytes every time");
    assert_eq!(second[..], third[..5], "the whole prefix is stable");

    // And the transcript keeps the conversation without the block
    let messages = transcript(&h, "g").await;
    assert_eq!(messages.len(), 7);
    assert!(messages.iter().all(|m| !m.to_string().contains("Ship the parser")));
    let goal: Value = h
        .client
        .get(h.v1("/sessions/g/goal"))
        .header("authorization", "Bearer sk-test-client")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(goal["goal"], "Ship the parser");
    assert_eq!(goal["on_conflict"], "reject");
}

async fn changing_the_system_prompt_under_a_goal_is_409_or_kept(store: Store) {
    let (h, _store) = start(store, Harness::builder()).await;
    put_goal(&h, "c", json!({"goal": "Stay on task"})).await;
    send(&h, "c", &request(&[system("Original."), user("a")], false)).await;
    let reply = assistant("Hello from mock-upstream.");

    // A changed system prompt is refused
    let changed =
        send(&h, "c", &request(&[system("Changed!"), user("a"), reply.clone(), user("b")], false)).await;
    assert_eq!(changed.status(), 409);
    let body: Value = changed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "goal_locked");
    assert_eq!(h.upstream(0).requests().len(), 1);

    // With on_conflict = "keep", it is sent with the locked system prompt instead
    put_goal(&h, "c", json!({"goal": "Stay on task", "on_conflict": "keep"})).await;
    send(&h, "c", &request(&[system("Original."), user("a"), reply.clone(), user("b")], false)).await;
    let kept = send(
        &h,
        "c",
        &request(&[system("Changed!"), user("a"), reply.clone(), user("b"), reply, user("c")], false),
    )
    .await;
    assert_eq!(kept.status(), 200);
    let sent = upstream_messages(&h, 2);
    assert_eq!(serde_json::from_str::<Value>(&sent[0]).unwrap(), system("Original."));
    assert!(sent[1].contains("Stay on task"));

    // Unlocking removes the block
    let deleted = h
        .client
        .delete(h.v1("/sessions/c/goal"))
        .header("authorization", "Bearer sk-test-client")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    send(&h, "c", &request(&[system("Changed!"), user("z")], false)).await;
    assert!(upstream_messages(&h, 3).iter().all(|m| !m.contains("Stay on task")));

    // And the session, still there, says it has no goal (not that it does not exist)
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let gone = h
            .client
            .request(method, h.v1("/sessions/c/goal"))
            .header("authorization", "Bearer sk-test-client")
            .send()
            .await
            .unwrap();
        assert_eq!(gone.status(), 404);
        let body: Value = gone.json().await.unwrap();
        assert_eq!(body["error"]["code"], "goal_not_set", "{body}");
    }
    let session = h
        .client
        .get(h.v1("/sessions/c"))
        .header("authorization", "Bearer sk-test-client")
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 200);
}

async fn the_goal_lock_survives_a_restart_byte_for_byte(store: Store) {
    let store = store.url().await;
    let url = store.url.clone();
    let reply = assistant("Hello from mock-upstream.");
    let conversation = [system("S"), user("a"), reply.clone(), user("b")];

    let first_block = {
        let u = url.clone();
        let mut h = Harness::builder().config(move |c| c.sessions.store = u).start().await;
        send(&h, "r", &request(&[system("S"), user("a")], false)).await;
        put_goal(&h, "r", json!({"goal": "Survive restarts", "strategy": "checkpoint"})).await;
        send(&h, "r", &request(&conversation, false)).await;
        let block = upstream_messages(&h, 1)[1].clone();
        h.begin_shutdown();
        h.join().await;
        block
    };

    let u = url.clone();
    let h = Harness::builder().config(move |c| c.sessions.store = u).start().await;
    let mut next = conversation.to_vec();
    next.extend([reply, user("c")]);
    assert_eq!(send(&h, "r", &request(&next, false)).await.status(), 200);
    assert_eq!(upstream_messages(&h, 0)[1], first_block);
}

on_both_stores!(
    full_history_turns_are_recorded,
    append_clients_send_only_new_messages,
    streamed_answers_are_assembled_and_committed,
    a_client_disconnect_mid_stream_still_commits_the_answer,
    another_callers_key_never_sees_the_session,
    concurrent_requests_on_one_session_are_serialised,
    a_held_session_answers_409_after_the_busy_timeout,
    edited_history_is_followed_and_counted,
    a_failed_upstream_call_records_nothing,
    sessions_can_be_deleted,
    a_locked_goal_is_sent_as_one_fixed_block_after_the_system_messages,
    changing_the_system_prompt_under_a_goal_is_409_or_kept,
    the_goal_lock_survives_a_restart_byte_for_byte,
);

/// Without gateway keys a session is scoped by the caller's `Authorization`: a caller without
/// one would share every session id with every other such caller, so it is refused, and so are
/// the sessions API's reads. The request without the session header still works.
#[tokio::test]
async fn a_session_without_a_caller_credential_is_refused() {
    let h = Harness::builder().upstream(Server::builder().chat(fixtures::completion("ok"))).start().await;
    let body = request(&[user("a")], false);
    let anonymous = |path: &str| h.client.post(h.v1(path)).json(&body);
    let refused = anonymous("/chat/completions").header("x-session-id", "shared").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "session_requires_credential");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(h.upstream(0).requests().is_empty(), "nothing went upstream");

    let read = h.client.get(h.v1("/sessions/shared/messages")).send().await.unwrap();
    assert_eq!(read.status(), 401);
    assert_eq!(anonymous("/chat/completions").send().await.unwrap().status(), 200, "stateless is fine");
    assert_eq!(send(&h, "shared", &body).await.status(), 200, "with a credential, a session");
}

#[tokio::test]
async fn malformed_session_ids_are_400() {
    let h = Harness::start().await;
    let response = send(&h, &"x".repeat(129), &request(&[user("a")], false)).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_session_id");
}

#[tokio::test]
async fn redis_down_fails_closed_then_recovers() {
    let (h, mut store) = start(Store::Redis, Harness::builder()).await;
    let redis = store.redis.as_mut().unwrap();
    redis.kill().await;

    let response = send(&h, "r", &request(&[user("a")], false)).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_store_unavailable");
    assert_eq!(h.client.get(format!("{}/readyz", h.url)).send().await.unwrap().status(), 503);
    assert!(h.upstream(0).requests().is_empty(), "nothing is served without its checkpoint");

    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = send(&h, "r", &request(&[user("a")], false)).await;
        if response.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never recovered: {}", response.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(transcript(&h, "r").await.len(), 2);
}

#[tokio::test]
async fn ctxgate_does_not_start_without_its_redis_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut config = ctxgate::config::Config::default();
    config.upstreams = vec![ctxgate::config::UpstreamConfig::default()];
    config.sessions.store = format!("redis://127.0.0.1:{port}/");
    config.sessions.store_timeout = Duration::from_millis(300);

    let env = std::collections::BTreeMap::new();
    let config = config.validated(&env).unwrap();
    let started = tokio::time::Instant::now();
    let result = ctxgate::AppState::new(config, &env).await;

    assert!(matches!(result, Err(ctxgate::StartupError::Store(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by store_timeout");
}

#[tokio::test]
async fn redis_down_fails_open_when_configured() {
    let (h, mut store) = start(
        Store::Redis,
        Harness::builder().config(|c| c.sessions.on_store_error = ctxgate::config::OnStoreError::FailOpen),
    )
    .await;
    let redis = store.redis.as_mut().unwrap();
    redis.kill().await;

    let response = send(&h, "open", &request(&[user("a")], false)).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ctxgate-session"], "degraded");
    assert_eq!(h.upstream(0).requests().len(), 1);
}
