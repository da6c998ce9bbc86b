//! Every error ctxgate makes itself: the right status and an OpenAI-shaped body, and the
//! gateway keeps serving afterwards. Upstream errors pass through unchanged.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use mock_upstream::Server;
use serde_json::Value;
use support::{chat_body, fixtures, Chunk, Gate, Harness, Reply};

/// Asserts the OpenAI error shape and returns the `error` object.
async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "missing {key} in {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

#[tokio::test]
async fn malformed_json_is_400() {
    let h = Harness::start().await;
    let response = h.chat().body(r#"{"model": "m", "messages": [}"#).send().await.unwrap();
    let error = openai_error(response, 400).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "invalid_json");
    assert!(h.upstream(0).requests().is_empty(), "nothing reaches the upstream");
}

#[tokio::test]
async fn missing_or_ill_typed_fields_are_400_naming_the_field() {
    let h = Harness::start().await;
    let cases = [
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (r#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (r#"{"model":"m"}"#, "messages"),
        (r#"{"model":"m","messages":{"role":"user"}}"#, "messages"),
    ];
    for (body, param) in cases {
        let error = openai_error(h.chat().body(body).send().await.unwrap(), 400).await;
        assert_eq!(error["param"], param, "{body}");
        assert!(error["message"].as_str().unwrap().contains(param), "{error}");
    }
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405() {
    let h = Harness::start().await;
    let error = openai_error(h.client.get(format!("{}/nope", h.url)).send().await.unwrap(), 404).await;
    assert_eq!(error["code"], "unknown_url");
    assert_eq!(error["message"], "Invalid URL (GET /nope)");
    let error = openai_error(h.client.get(h.v1("/chat/completions")).send().await.unwrap(), 405).await;
    assert_eq!(error["code"], "method_not_allowed");
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_streamed() {
    let h = Harness::builder().config(|c| c.server.max_body_bytes = 1024.try_into().unwrap()).start().await;
    let big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(2048));

    // Declared by Content-Length
    let error = openai_error(h.chat().body(big.clone()).send().await.unwrap(), 413).await;
    assert_eq!(error["code"], "request_too_large");

    // Chunked, found while reading
    let chunks: Vec<Result<String, std::io::Error>> =
        big.as_bytes().chunks(256).map(|c| Ok(String::from_utf8(c.to_vec()).unwrap())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    openai_error(h.chat().body(body).send().await.unwrap(), 413).await;

    assert!(h.upstream(0).requests().is_empty());
    // And a request within the limit still works afterwards
    assert_eq!(h.chat().json(&chat_body(false)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.v1("/chat/completions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("model=m")
        .send()
        .await
        .unwrap();
    let error = openai_error(response, 415).await;
    assert_eq!(error["code"], "unsupported_media_type");
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = Harness::builder()
        .config(move |c| c.upstreams[0].base_url = format!("http://127.0.0.1:{port}/v1"))
        .start()
        .await;

    let error = openai_error(h.chat().json(&chat_body(false)).send().await.unwrap(), 502).await;
    assert_eq!(error["code"], "upstream_unreachable");
    assert_eq!(error["type"], "server_error");
    assert_eq!(
        h.metric(r#"ctxgate_upstream_retries_total{upstream="u0",reason="connect_error"}"#).await,
        2.0
    );
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let upstream = Server::builder().latency(Duration::from_secs(5));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.upstreams[0].first_byte_timeout = Duration::from_millis(100))
        .start()
        .await;

    let error = openai_error(h.chat().json(&chat_body(false)).send().await.unwrap(), 504).await;
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(h.upstream(0).requests().len(), 1, "a slow upstream is not retried");
}

#[tokio::test]
async fn request_timeout_is_504() {
    let upstream = Server::builder().latency(Duration::from_secs(5));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.request_timeout = Duration::from_millis(100))
        .start()
        .await;
    let error = openai_error(h.chat().json(&chat_body(false)).send().await.unwrap(), 504).await;
    assert_eq!(error["code"], "request_timeout");
}

#[tokio::test]
async fn over_the_concurrency_limit_is_503_and_recovers() {
    // Given one allowed request, held open by a stream parked upstream
    let gate = Gate::new();
    let upstream = Server::builder().stream(vec![
        Chunk::json(fixtures::content_chunk(0, "a")),
        Chunk::Wait(gate.clone()),
        Chunk::done(),
    ]);
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.server.max_concurrent_requests = 1.try_into().unwrap())
        .start()
        .await;
    let held = h.chat().json(&chat_body(true)).send().await.unwrap();

    // Then another request is shed at once
    let error = openai_error(h.chat().json(&chat_body(false)).send().await.unwrap(), 503).await;
    assert_eq!(error["code"], "overloaded");

    // And once the stream ends, requests are served again
    gate.open();
    held.text().await.unwrap();
    assert_eq!(h.chat().json(&chat_body(false)).send().await.unwrap().status(), 200);
    assert_eq!(h.metric(r#"ctxgate_errors_total{kind="overloaded"}"#).await, 1.0);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let upstream_error = serde_json::json!({"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
    let upstream =
        Server::builder().reply(Reply::json(400, upstream_error.clone()).header("x-upstream", "1"));
    let h = Harness::builder().upstream(upstream).start().await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-upstream"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, upstream_error);
    assert_eq!(h.upstream(0).requests().len(), 1, "a 400 is not retried");
}
