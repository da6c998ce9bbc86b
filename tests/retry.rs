//! Retries and failover happen before the first response byte reaches the client, never after.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_upstream::Server;
use support::{chat_body, fixtures, Chunk, Gate, Harness, Reply};

#[tokio::test]
async fn server_errors_are_retried_on_the_same_upstream() {
    let upstream = Server::builder().fail(503).fail(502).chat(fixtures::completion("third time"));
    let h = Harness::builder().upstream(upstream).start().await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "third time");
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 3);
    assert!(recorded.iter().all(|r| r.body == recorded[0].body), "every attempt sends the same bytes");
    assert_eq!(h.metric(r#"ctxgate_upstream_retries_total{upstream="u0",reason="server_error"}"#).await, 2.0);
}

#[tokio::test]
async fn rate_limits_are_retried_after_the_upstreams_retry_after() {
    let upstream = Server::builder()
        .reply(Reply::error(429).header("retry-after-ms", "300"))
        .chat(fixtures::completion("ok"));
    let h = Harness::builder().upstream(upstream).start().await;

    let started = Instant::now();
    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "waited {:?}", started.elapsed());
    assert_eq!(h.upstream(0).requests().len(), 2);
}

#[tokio::test]
async fn exhausted_retries_fail_over_to_the_next_upstream() {
    let first = Server::builder().fail(500).fail(500).fail(500);
    let second = Server::builder().chat(fixtures::completion("from the backup"));
    let h = Harness::builder().upstream(first).upstream(second).start().await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "from the backup");
    assert_eq!(h.upstream(0).requests().len(), 3, "first attempt plus max_retries = 2");
    assert_eq!(h.upstream(1).requests().len(), 1);
    assert_eq!(h.metric(r#"ctxgate_upstream_failovers_total{upstream="u0"}"#).await, 1.0);
}

#[tokio::test]
async fn a_long_retry_after_fails_over_without_waiting() {
    let first = Server::builder().reply(Reply::error(429).header("retry-after", "3600"));
    let second = Server::builder();
    let h = Harness::builder().upstream(first).upstream(second).start().await;

    let started = Instant::now();
    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.upstream(0).requests().len(), 1);
}

#[tokio::test]
async fn when_every_attempt_fails_the_last_upstream_error_is_returned() {
    let upstream = Server::builder().fail(503).fail(503).reply(Reply::error(503).header("x-last", "yes"));
    let h = Harness::builder().upstream(upstream).start().await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-last"], "yes");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock failure 503");
}

#[tokio::test]
async fn connect_errors_fail_over() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = Harness::builder()
        .upstream(Server::builder())
        .upstream(Server::builder())
        .config(move |c| c.upstreams[0].base_url = format!("http://127.0.0.1:{port}/v1"))
        .start()
        .await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(h.upstream(1).requests().len(), 1);
}

#[tokio::test]
async fn no_retry_or_failover_once_a_stream_has_started() {
    // Given a primary that starts a stream and then dies
    let gate = Gate::new();
    let first =
        Server::builder().stream(vec![Chunk::json(fixtures::content_chunk(0, "begun")), Chunk::Wait(gate)]);
    let mut h = Harness::builder().upstream(first).upstream(Server::builder()).start().await;
    let response = h.chat().json(&chat_body(true)).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let first_chunk = stream.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first_chunk).unwrap().contains("begun"));

    // When the primary dies mid-stream
    h.kill_upstream(0);

    // Then the client's stream ends in an error, and the backup never saw the request
    let mut failed = false;
    while let Some(next) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap() {
        if next.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a truncated stream must not end cleanly");
    assert!(h.upstream(1).requests().is_empty());
}
