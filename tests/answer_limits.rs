//! The bounds on what the gateway holds of an answer on a session: a JSON answer past
//! `server.max_answer_bytes`, one SSE event past `server.max_sse_event_bytes`, a streamed answer
//! assembling past `server.max_answer_bytes`, and a goal past `sessions.max_goal_bytes`. Each is
//! refused with a clear error, nothing is committed, and the session serves the next turn.
#![allow(clippy::unwrap_used)]

mod support;

use std::num::NonZeroUsize;

use bytes::Bytes;
use mock_upstream::Server;
use serde_json::{json, Value};
use support::{fixtures, Chunk, Harness, Reply};

fn ask(text: &str, stream: bool) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": text}], "stream": stream})
}

async fn send(h: &Harness, session: &str, body: &Value) -> reqwest::Response {
    h.chat().header("x-session-id", session).json(body).send().await.unwrap()
}

async fn transcript(h: &Harness, id: &str) -> Vec<Value> {
    support::stores::transcript(&h.client, &h.url, id, "Bearer sk-test-client").await
}

/// The session answers its next turn, whose transcript holds only that turn.
async fn serves_the_next_turn(h: &Harness, session: &str) {
    let next = send(h, session, &ask("again", false)).await;
    assert_eq!(next.status(), 200);
    let body: Value = next.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "small");
    let messages = transcript(h, session).await;
    assert_eq!(messages.len(), 2, "the refused turn left nothing: {messages:?}");
    assert_eq!(messages[0]["content"], "again");
}

#[tokio::test]
async fn a_64_mib_json_answer_on_a_session_is_a_502_and_the_session_goes_on() {
    // Given an upstream whose first answer is 64 MiB (the default limit is 32 MiB)
    let huge = fixtures::completion(&"x".repeat(64 * 1024 * 1024));
    let upstream = Server::builder().chat(huge).chat(fixtures::completion("small"));
    let h = Harness::builder().upstream(upstream).start().await;

    // When a session turn gets it
    let response = send(&h, "big", &ask("tell me everything", false)).await;

    // Then the client gets a clear 502, and the session serves the next turn
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_response_too_large", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("33554432"), "{body}");
    serves_the_next_turn(&h, "big").await;
}

#[tokio::test]
async fn one_32_mib_sse_event_ends_the_stream_with_an_error_event() {
    // Given an upstream streaming one 32 MiB event (the default event limit is 4 MiB)
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(fixtures::content_chunk(0, &"y".repeat(32 * 1024 * 1024)).to_string().as_bytes());
    event.extend_from_slice(b"\n\n");
    let upstream = Server::builder()
        .reply(Reply::sse(vec![Chunk::Raw(Bytes::from(event)), Chunk::done()]))
        .chat(fixtures::completion("small"));
    let h = Harness::builder().upstream(upstream).start().await;

    // When a streamed session turn gets it
    let response = send(&h, "event", &ask("stream it", true)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();

    // Then the stream ends with one error event and [DONE], and the session goes on
    let data = support::sse_data(&text);
    assert_eq!(data.len(), 2, "{}", &text[..text.len().min(500)]);
    let error: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_response_too_large", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("SSE event"), "{error}");
    assert_eq!(data[1], "[DONE]");
    serves_the_next_turn(&h, "event").await;
}

#[tokio::test]
async fn a_streamed_answer_assembling_past_the_limit_is_cut_with_an_error_event() {
    // Given a limit of 64 KiB and a stream of 256 small events of 1 KiB of text each
    let words: Vec<String> = (0..256).map(|_| "z".repeat(1024)).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let upstream = Server::builder()
        .reply(Reply::sse(support::chunks(&words, None)))
        .chat(fixtures::completion("small"));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.max_answer_bytes = NonZeroUsize::new(64 * 1024).unwrap())
        .start()
        .await;

    // When a streamed session turn reads it
    let text = send(&h, "long", &ask("go on", true)).await.text().await.unwrap();

    // Then the client got what came before the limit, then an error event and [DONE]
    let data = support::sse_data(&text);
    assert!(data.len() < 100, "{} events", data.len());
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_response_too_large", "{error}");
    assert_eq!(data[data.len() - 1], "[DONE]");
    serves_the_next_turn(&h, "long").await;
}

#[tokio::test]
async fn a_goal_past_its_limit_is_400_and_a_small_one_is_locked() {
    let h = Harness::start().await;
    let put = |goal: String| {
        h.client
            .put(h.v1("/sessions/g/goal"))
            .header("authorization", "Bearer sk-test-client")
            .json(&json!({"goal": goal}))
            .send()
    };

    // A 4 MiB goal (the default limit is 64 KiB) is refused
    let refused = put("g".repeat(4 * 1024 * 1024)).await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "string_above_max_length", "{body}");
    assert_eq!(body["error"]["param"], "goal");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // A small one is locked
    let locked = put("ship it".into()).await.unwrap();
    assert_eq!(locked.status(), 200);
}
