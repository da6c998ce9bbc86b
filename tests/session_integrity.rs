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

on_both_stores!(a_deeply_nested_message_is_refused_and_the_session_stays_readable);
