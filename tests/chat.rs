//! Non-streamed chat completions and the other proxied routes: what the client sends reaches
//! the upstream untouched, and what the upstream answers reaches the client untouched.

mod support;

use mock_upstream::Server;
use support::{chat_body, fixtures, Harness, Reply};

#[tokio::test]
async fn request_bytes_reach_upstream_unchanged_with_unknown_fields_and_key_order() {
    // Given a body with unknown fields, nested objects and a key order serde would not keep
    let h = Harness::start().await;
    let sent = r#"{"zeta":1,"messages":[{"role":"user","content":"hi \u00e9","x_meta":{"b":2,"a":1}}],"model":"mock-model","temperature":0.25,"x_vendor":{"z":[3,2,1],"a":null}}"#;

    // When it goes through the gateway
    let response = h.chat().body(sent).send().await.unwrap();

    // Then the upstream saw the same bytes
    assert_eq!(response.status(), 200);
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(std::str::from_utf8(&recorded[0].body).unwrap(), sent);
}

#[tokio::test]
async fn response_bytes_and_headers_reach_the_client_unchanged() {
    let completion = fixtures::completion("exact bytes");
    let upstream = Server::builder().reply(
        Reply::json(200, completion.clone())
            .header("x-upstream-trace", "abc")
            .header("openai-processing-ms", "7"),
    );
    let h = Harness::builder().upstream(upstream).start().await;

    let response = h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream-trace"], "abc");
    assert_eq!(response.headers()["openai-processing-ms"], "7");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.bytes().await.unwrap();
    assert_eq!(&body[..], completion.to_string().as_bytes());
}

#[tokio::test]
async fn client_headers_pass_through_and_hop_by_hop_ones_do_not() {
    let h = Harness::start().await;

    h.chat()
        .header("x-custom", "kept")
        .header("openai-organization", "org-1")
        .header("connection", "keep-alive, x-conn-private")
        .header("x-conn-private", "dropped")
        .header("proxy-authorization", "Basic abc")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();

    let headers = &h.upstream(0).requests()[0].headers;
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["openai-organization"], "org-1");
    assert_eq!(headers["authorization"], "Bearer sk-test-client");
    assert!(!headers.contains_key("x-conn-private"));
    assert!(!headers.contains_key("proxy-authorization"));
}

#[tokio::test]
async fn gateway_held_key_replaces_the_client_key() {
    let h = Harness::builder()
        .config(|c| {
            c.upstreams[0].api_key_env = Some("UNUSED_IN_TEST".into());
        })
        .start_with_env([("UNUSED_IN_TEST", "sk-gateway-secret")])
        .await;

    h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(h.upstream(0).requests()[0].headers["authorization"], "Bearer sk-gateway-secret");
}

#[tokio::test]
async fn request_id_is_generated_or_kept_and_goes_upstream() {
    let h = Harness::start().await;

    let generated = h.chat().json(&chat_body(false)).send().await.unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(h.upstream(0).requests()[0].headers["x-request-id"], id.as_str());

    let kept = h.chat().header("x-request-id", "client-id-1").json(&chat_body(false)).send().await.unwrap();
    assert_eq!(kept.headers()["x-request-id"], "client-id-1");
    assert_eq!(h.upstream(0).requests()[1].headers["x-request-id"], "client-id-1");
}

#[tokio::test]
async fn models_come_from_the_upstream() {
    let h = Harness::start().await;

    let response = h.client.get(h.v1("/models")).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, fixtures::models());
}

#[tokio::test]
async fn models_come_from_config_when_the_upstream_has_none() {
    let upstream = Server::builder().fail(404);
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.upstreams[0].models = vec!["local-a".into(), "local-b".into()])
        .start()
        .await;

    let response = h.client.get(h.v1("/models")).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["local-a", "local-b"]);
    assert_eq!(body["object"], "list");
}

#[tokio::test]
async fn other_v1_routes_pass_through_with_method_query_and_body() {
    let h = Harness::start().await;

    let embeddings = h
        .client
        .post(h.v1("/embeddings?api-version=2024"))
        .json(&serde_json::json!({"model": "mock-model", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 200);
    let body: serde_json::Value = embeddings.json().await.unwrap();
    assert_eq!(body, fixtures::embeddings());

    let deleted = h.client.delete(h.v1("/files/file-123")).send().await.unwrap();
    assert_eq!(deleted.status(), 404, "the mock has no such route; its 404 passes through");
    let body: serde_json::Value = deleted.json().await.unwrap();
    assert!(body["error"]["message"].is_string());

    let recorded = h.upstream(0).requests();
    assert_eq!(recorded[0].path, "/v1/embeddings?api-version=2024");
    assert_eq!(recorded[0].json()["input"], "hello");
    assert_eq!(recorded[1].method, http::Method::DELETE);
    assert_eq!(recorded[1].path, "/v1/files/file-123");
}

#[tokio::test]
async fn large_unsized_uploads_stream_through() {
    // Given a chunked body larger than the replay buffer (so it is streamed, not buffered)
    let h = Harness::start().await;
    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..24).map(|_| Ok(chunk.clone())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));

    let response = h.client.post(h.v1("/files")).body(body).send().await.unwrap();

    assert_eq!(response.status(), 404);
    assert_eq!(h.upstream(0).requests()[0].body.len(), 24 * 64 * 1024);
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let h = Harness::start().await;
    h.chat().json(&chat_body(false)).send().await.unwrap();

    assert_eq!(h.client.get(format!("{}/healthz", h.url)).send().await.unwrap().status(), 200);
    assert_eq!(h.client.get(format!("{}/readyz", h.url)).send().await.unwrap().status(), 200);
    let metrics = h.metrics().await;
    assert_eq!(
        support::sample_value(&metrics, r#"ctxgate_requests_total{route="chat_completions",status="200"}"#),
        1.0
    );
    assert_eq!(support::sample_value(&metrics, r#"ctxgate_tokens_total{upstream="u0",kind="prompt"}"#), 12.0);
    assert_eq!(support::sample_value(&metrics, r#"ctxgate_tokens_total{upstream="u0",kind="cached"}"#), 4.0);
    assert_eq!(
        support::sample_value(
            &metrics,
            r#"ctxgate_gateway_overhead_seconds_count{route="chat_completions"}"#
        ),
        1.0
    );
    assert!(metrics.contains("ctxgate_upstream_duration_seconds_bucket"));
}
