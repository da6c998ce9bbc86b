//! Sessions named without the session header: the other `sessions.header` names (Codex CLI's
//! `thread-id` by default) and, when switched on, a body's `prompt_cache_key`. Such an implicit
//! id is scoped to the caller as any session is, and never turns a request that works without
//! it into an error: one that cannot be a session runs statelessly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use ctxgate::config::SessionHeaders;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::gateway::AUTH;
use support::stores::Store;
use support::{chunks, fixtures, stores, Gate, Harness, Reply};

const OTHER: &str = "Bearer sk-another-client";

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// `POST /v1/responses` as Codex CLI sends it: the whole history, `store: false`.
fn responses(
    h: &Harness,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    input: Value,
) -> reqwest::RequestBuilder {
    let mut request = h.client.post(h.v1("/responses"));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.json(&json!({"model": "mock-model", "input": input, "store": false}))
}

/// A chat request from `auth` with `headers`.
fn chat(h: &Harness, auth: &str, headers: &[(&str, &str)], body: Value) -> reqwest::RequestBuilder {
    let mut request = h.client.post(h.v1("/chat/completions")).header("authorization", auth);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.json(&body)
}

fn chat_body(text: &str) -> Value {
    json!({"model": "mock-model", "messages": [user(text)]})
}

/// The status of `GET /v1/sessions/{id}` for `auth` (none: no `Authorization`).
async fn session_status(h: &Harness, id: &str, auth: Option<&str>) -> u16 {
    let mut request = h.client.get(h.v1(&format!("/sessions/{id}")));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    request.send().await.unwrap().status().as_u16()
}

fn upstream(answers: &[&str]) -> mock_upstream::Builder {
    answers.iter().fold(Server::builder(), |b, a| b.chat(fixtures::completion(a)))
}

#[tokio::test]
async fn a_codex_thread_id_makes_a_full_history_client_one_session_with_store_false() {
    // Given a gateway with the default session headers
    let h = Harness::builder().upstream(upstream(&["On it.", "Done."])).start().await;

    // When a client sends its whole history each turn, store false, with its thread id
    let thread = [("thread-id", "019a-thread-1")];
    let first = responses(&h, Some(AUTH), &thread, json!([user("Fix the build.")])).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().contains_key("x-ctxgate-session-version"), "a session turn's answer");
    let history = json!([user("Fix the build."), assistant("On it."), user("Thanks.")]);
    let second = responses(&h, Some(AUTH), &thread, history).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["output"][0]["content"][0]["text"], "Done.");

    // Then the thread is one session holding the conversation
    let transcript = stores::transcript(&h.client, &h.url, "019a-thread-1", AUTH).await;
    assert_eq!(
        transcript,
        [user("Fix the build."), assistant("On it."), user("Thanks."), assistant("Done.")]
    );
    // And store false still stores no response; the client's own header goes upstream as sent
    let id = second["id"].as_str().unwrap();
    let stored =
        h.client.get(h.v1(&format!("/responses/{id}"))).header("authorization", AUTH).send().await.unwrap();
    assert_eq!(stored.status(), 404);
    assert_eq!(h.upstream(0).requests()[1].headers["thread-id"], "019a-thread-1");
}

#[tokio::test]
async fn a_stored_response_with_a_thread_id_runs_on_that_session_and_its_chain_stays_there() {
    let h = Harness::builder().upstream(upstream(&["Blue.", "Green."])).start().await;
    let thread = [("thread-id", "thread-store")];

    // When a response is stored with a thread id, then continued by id
    let first = h
        .client
        .post(h.v1("/responses"))
        .header("authorization", AUTH)
        .header(thread[0].0, thread[0].1)
        .json(&json!({"model": "mock-model", "input": "A colour?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let first_id = first["id"].as_str().unwrap();
    let next = h
        .client
        .post(h.v1("/responses"))
        .header("authorization", AUTH)
        .json(&json!({"model": "mock-model", "input": "Another?", "previous_response_id": first_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);

    // Then both turns ran on the thread's session, not on a session of the chain's own
    let transcript = stores::transcript(&h.client, &h.url, "thread-store", AUTH).await;
    assert_eq!(transcript, [user("A colour?"), assistant("Blue."), user("Another?"), assistant("Green.")]);
    assert_eq!(session_status(&h, first_id, Some(AUTH)).await, 404);
}

#[tokio::test]
async fn an_implicit_session_is_scoped_to_its_caller() {
    let h = Harness::builder().upstream(upstream(&["For the first.", "For the other."])).start().await;
    let thread = [("thread-id", "shared-thread")];

    // Given one caller's thread is a session
    let r = chat(&h, AUTH, &thread, chat_body("Mine.")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-ctxgate-session-version"));

    // Then another caller does not see it, and the same thread id is a session of its own
    assert_eq!(session_status(&h, "shared-thread", Some(OTHER)).await, 404);
    let r = chat(&h, OTHER, &thread, chat_body("Theirs.")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        stores::transcript(&h.client, &h.url, "shared-thread", OTHER).await,
        [user("Theirs."), assistant("For the other.")]
    );
    assert_eq!(
        stores::transcript(&h.client, &h.url, "shared-thread", AUTH).await,
        [user("Mine."), assistant("For the first.")]
    );
}

#[tokio::test]
async fn an_implicit_id_that_cannot_be_a_session_runs_the_request_statelessly() {
    let h = Harness::start().await;
    let long = "t".repeat(129);

    // Without a caller credential to scope it by
    let r = responses(&h, None, &[("thread-id", "no-credential")], json!("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("x-ctxgate-session-version"), "not a session turn");
    // (and the sessions API, asked without a credential, refuses rather than looks)
    assert_eq!(session_status(&h, "no-credential", None).await, 401);

    // With an id no session may have (named on purpose, the same id is refused)
    let r = chat(&h, AUTH, &[("thread-id", &long)], chat_body("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("x-ctxgate-session-version"), "not a session turn");
    let named = chat(&h, AUTH, &[("x-session-id", &long)], chat_body("hi")).send().await.unwrap();
    assert_eq!(named.status(), 400);

    // While a valid one from a caller with a credential is a session
    let r = chat(&h, AUTH, &[("thread-id", "fine")], chat_body("hi")).send().await.unwrap();
    assert!(r.headers().contains_key("x-ctxgate-session-version"), "a session turn");
}

#[tokio::test]
async fn a_busy_implicit_session_serves_the_turn_without_it() {
    // Given a turn held in flight on a thread's session, and a short wait for busy sessions
    let gate = Gate::new();
    let h = Harness::builder()
        .upstream(Server::builder().reply(Reply::sse(chunks(&["held", "open"], Some((1, &gate))))))
        .config(|c| c.sessions.busy_timeout = Duration::from_millis(200))
        .start()
        .await;
    let thread = [("thread-id", "busy-thread")];
    let mut held_body = chat_body("First.");
    held_body["stream"] = json!(true);
    let held = chat(&h, AUTH, &thread, held_body).send().await.unwrap();
    assert!(held.headers().contains_key("x-ctxgate-session-version"), "the held turn is a session's");
    assert!(h.upstream(0).wait_for_open_streams(1, Duration::from_secs(5)).await);

    // When the same thread sends another request meanwhile
    let r = chat(&h, AUTH, &thread, chat_body("Second.")).send().await.unwrap();

    // Then it is answered without the session, marked so, not refused as busy
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ctxgate-session"], "degraded");
    gate.open();
    let body = held.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(
        stores::transcript(&h.client, &h.url, "busy-thread", AUTH).await,
        [user("First."), assistant("heldopen")]
    );
}

#[tokio::test]
async fn an_implicit_session_whose_store_is_down_serves_the_turn_without_it() {
    // Given sessions on Redis, failing closed, and a thread that is a session
    let mut store = Store::Redis.url().await;
    let url = store.url.clone();
    let h = Harness::builder().config(move |c| c.sessions.store = url).start().await;
    let thread = [("thread-id", "thread-on-redis")];
    let r = chat(&h, AUTH, &thread, chat_body("hi")).send().await.unwrap();
    assert!(r.headers().contains_key("x-ctxgate-session-version"), "a session turn");

    // When the store goes away
    store.redis.as_mut().unwrap().kill().await;

    // Then the thread's next request is served without its session, while one naming its
    // session on purpose still fails closed
    let r = chat(&h, AUTH, &thread, chat_body("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ctxgate-session"], "degraded");
    let named = chat(&h, AUTH, &[("x-session-id", "thread-on-redis")], chat_body("hi")).send().await.unwrap();
    assert_eq!(named.status(), 503);
}

#[tokio::test]
async fn prompt_cache_key_names_a_session_only_when_switched_on_and_last() {
    let h = Harness::builder().config(|c| c.sessions.prompt_cache_key = true).start().await;

    // On the Responses API and on chat completions
    let mut body =
        json!({"model": "mock-model", "input": "hi", "store": false, "prompt_cache_key": "pck-responses"});
    let r = h.client.post(h.v1("/responses")).header("authorization", AUTH).json(&body).send().await.unwrap();
    assert!(r.headers().contains_key("x-ctxgate-session-version"), "a session turn");
    assert_eq!(session_status(&h, "pck-responses", Some(AUTH)).await, 200);
    let mut chat_request = chat_body("hi");
    chat_request["prompt_cache_key"] = json!("pck-chat");
    chat(&h, AUTH, &[], chat_request).send().await.unwrap();
    assert_eq!(session_status(&h, "pck-chat", Some(AUTH)).await, 200);

    // A session header comes first
    body["prompt_cache_key"] = json!("pck-second");
    let r = h
        .client
        .post(h.v1("/responses"))
        .header("authorization", AUTH)
        .header("thread-id", "thread-first")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(session_status(&h, "thread-first", Some(AUTH)).await, 200);
    assert_eq!(session_status(&h, "pck-second", Some(AUTH)).await, 404);

    // And by default a cache key is only a cache key
    let off = Harness::start().await;
    body["prompt_cache_key"] = json!("pck-off");
    let r =
        off.client.post(off.v1("/responses")).header("authorization", AUTH).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("x-ctxgate-session-version"), "not a session turn");
    assert_eq!(session_status(&off, "pck-off", Some(AUTH)).await, 404);
}

#[tokio::test]
async fn a_configured_list_of_session_headers_is_tried_in_order() {
    // Given the session headers `x-session-id`, then `x-conversation`, then `session-id`
    let h = Harness::builder()
        .config(|c| c.sessions.header = SessionHeaders::new(["x-session-id", "x-conversation", "session-id"]))
        .start()
        .await;

    // The first present names the session
    let both = [("session-id", "from-session-id"), ("x-conversation", "from-conversation")];
    chat(&h, AUTH, &both, chat_body("hi")).send().await.unwrap();
    assert_eq!(session_status(&h, "from-conversation", Some(AUTH)).await, 200);
    assert_eq!(session_status(&h, "from-session-id", Some(AUTH)).await, 404);
    chat(&h, AUTH, &[("session-id", "only-session-id")], chat_body("hi")).send().await.unwrap();
    assert_eq!(session_status(&h, "only-session-id", Some(AUTH)).await, 200);

    // The primary header before them all; a name not listed names nothing
    let named = [("x-session-id", "named"), ("x-conversation", "ignored")];
    chat(&h, AUTH, &named, chat_body("hi")).send().await.unwrap();
    assert_eq!(session_status(&h, "named", Some(AUTH)).await, 200);
    assert_eq!(session_status(&h, "ignored", Some(AUTH)).await, 404);
    let r = chat(&h, AUTH, &[("thread-id", "not-listed")], chat_body("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(session_status(&h, "not-listed", Some(AUTH)).await, 404);
}
