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

/// `POST /v1/batches`: creates something upstream, so it is not idempotent. It names no
/// model, so it goes to the first upstream only.
fn create_batch(h: &Harness) -> reqwest::RequestBuilder {
    let body = serde_json::json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"});
    h.client.post(h.v1("/batches")).json(&body)
}

/// `POST /v1/images/generations`: not idempotent, not a retried inference path, and it names
/// a model, so its route is every upstream.
fn generate_image(h: &Harness) -> reqwest::RequestBuilder {
    h.client
        .post(h.v1("/images/generations"))
        .json(&serde_json::json!({"model": "mock-model", "prompt": "x"}))
}

#[tokio::test]
async fn a_non_idempotent_request_the_upstream_answered_is_not_sent_again() {
    // Given two upstreams whose first answers are 502s
    let first = Server::builder().fail(502).fail(502).fail(502).fail(502);
    let second = Server::builder().fail(502);
    let h = Harness::builder().upstream(first).upstream(second).start().await;

    // When a batch is created and an image generated
    let batch = create_batch(&h).send().await.unwrap();
    let image = generate_image(&h).send().await.unwrap();

    // Then each upstream 502 comes back from its one attempt: no retry, no failover
    assert_eq!(batch.status(), 502);
    assert_eq!(image.status(), 502);
    assert_eq!(h.upstream(0).requests().len(), 2);
    assert!(h.upstream(1).requests().is_empty());
    let withheld = r#"ctxgate_upstream_retries_withheld_total{upstream="u0",reason="not_idempotent"}"#;
    assert_eq!(h.metric(withheld).await, 2.0);
}

#[tokio::test]
async fn a_non_idempotent_request_that_never_reached_the_upstream_fails_over() {
    // Given a first upstream that refuses connections
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = Harness::builder()
        .upstream(Server::builder())
        .upstream(Server::builder())
        .config(move |c| c.upstreams[0].base_url = format!("http://127.0.0.1:{port}/v1"))
        .start()
        .await;

    // When an image is generated
    let response = generate_image(&h).send().await.unwrap();

    // Then it is sent to the next upstream, once (whose mock has no such route: 404)
    assert_eq!(response.status(), 404);
    assert_eq!(h.upstream(1).requests().len(), 1);
}

#[tokio::test]
async fn idempotent_and_inference_requests_are_still_retried() {
    // Given an upstream that fails each request's first attempt
    let upstream = Server::builder().fail(503).reply(Reply::json(200, fixtures::embeddings())).fail(503);
    let h = Harness::builder().upstream(upstream).start().await;

    // When an embeddings request (inference) and a file lookup (GET) are sent
    let embeddings = h
        .client
        .post(h.v1("/embeddings"))
        .json(&serde_json::json!({"model": "m", "input": "x"}))
        .send()
        .await
        .unwrap();
    let file = h.client.get(h.v1("/files/file-1")).send().await.unwrap();

    // Then each was retried once and answered
    assert_eq!(embeddings.status(), 200);
    assert_ne!(file.status(), 503);
    assert_eq!(h.upstream(0).requests().len(), 4);
}

#[tokio::test]
async fn retries_after_an_answer_stay_within_the_budget() {
    // Given an upstream that answers every attempt with 503, and a budget of a fifth of
    // requests without a floor
    let mut upstream = Server::builder();
    for _ in 0..40 {
        upstream = upstream.fail(503);
    }
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| {
            c.retry.budget_ratio = 0.2;
            c.retry.budget_min_per_second = 0;
            c.retry.base_delay = Duration::from_millis(1);
            c.retry.max_delay = Duration::from_millis(2);
        })
        .start()
        .await;

    // When ten chat requests are sent one after another
    for _ in 0..10 {
        let response = h.chat().json(&chat_body(false)).send().await.unwrap();
        assert_eq!(response.status(), 503);
    }

    // Then two retries were allowed in all (not two per request: 30 attempts)
    let attempts = h.upstream(0).requests().len();
    assert_eq!(attempts, 12, "10 requests and a fifth of them retried");
    assert_eq!(h.metric(r#"ctxgate_upstream_retries_total{upstream="u0",reason="server_error"}"#).await, 2.0);
    let withheld = r#"ctxgate_upstream_retries_withheld_total{upstream="u0",reason="budget"}"#;
    assert_eq!(h.metric(withheld).await, 10.0, "each request ends on a withheld retry");
}
